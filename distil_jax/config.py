"""The config schema (every key, with its default) and its validation, in one place.

Config files start from `defaults()` and change what they need. `find_problems` / `validate`
list every problem at once, before anything is loaded or compiled; they are pure (no
file is read): the teacher's architecture is passed in by whoever read it (hf.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import List, Optional, Sequence

import jax.numpy as jnp
import ml_collections

from distil_jax import parallel
from distil_jax.data import sources
from distil_jax.models import BertConfig, EncoderConfig
from distil_jax.models.students import distils_to_distilbert, pattern_problems, student_config_from_teacher
from distil_jax.terms import LAYER_KINDS, LossWeights, layer_terms

# What `python -m distil_jax.main` runs for each config.mode (main.py dispatches).
TRAIN_MODES = ("distill", "pretrain")
MODES = TRAIN_MODES + ("prepare", "eval", "export", "finetune", "demo", "ablate", "shapes", "deploy")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
STUDENT_INITS = ("teacher", "random", "prune")
SOURCE_KINDS = tuple(sources.KINDS)
MIN_SEQ_LEN = 12  # the reference drops sequences of 11 tokens or fewer
# The rules flax's lm1b example uses, with the batch over both data-parallel axes.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_in", None),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
)


class ConfigError(ValueError):
    """A config that cannot work; the message lists every problem."""


def _bert_fields(**changes) -> dict:
    fields = {f.name: f.default for f in dataclasses.fields(BertConfig)}
    fields.update(changes)
    return fields


def defaults() -> ml_collections.ConfigDict:
    """Every key a config may have. Values here are the paper's where it has one."""
    c = ml_collections.ConfigDict()
    c.mode = "distill"

    # The teacher: a Hugging Face dir or hub name; with path "" a teacher of
    # `teacher.model` fields (random in distill mode: for tests; trained in pretrain mode).
    c.teacher = ml_collections.ConfigDict(dict(
        path="", dtype="float32", model=_bert_fields()))

    # The student: a DistilBERT of a BERT teacher, of its own family otherwise
    # (models/students.py); sizes 0 mean "the teacher's value". init: "teacher" (copy
    # the layers of layer_map; the teacher's width only), "random", or "prune" (the
    # teacher cut to the student's width by activation importance on prune_batches
    # batches of the training corpus, then the layers of layer_map; student_init.py).
    # vocab: "full" (the teacher's vocabulary) or "prune" (only the ids the prepared
    # corpus holds, plus the specials: teacher and student sliced to them, a matching
    # tokenizer written; data/vocab_prune.py).
    c.student = ml_collections.ConfigDict(dict(
        num_layers=6, init="teacher", layer_map=(), vocab_transform=True,
        fold_token_type=True, hidden_size=0, num_heads=0, intermediate_size=0, prune_batches=8, vocab="full"))

    # layer_terms: layer-pair terms, each (kind,), (kind, teacher_layer, student_layer) or
    # (kind, teacher_layer, student_layer, weight); kinds hidden_mse, hidden_cos (TinyBERT;
    # through a learned projection across widths), attention_kl (MiniLM; equal head
    # counts), relation (MiniLMv2: Q-Q, K-K, V-V in relation_heads heads, 0: the
    # teacher's head count). Layers: 0 the embeddings, i encoder layer i (1-based), -1
    # the last (objective.py).
    c.distill = ml_collections.ConfigDict(dict(
        temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, alpha_mse=0.0,
        restrict_ce_to_mask=False, layer_terms=(), relation_heads=0))
    c.masking = ml_collections.ConfigDict(dict(
        mask_prop=0.15, word_mask=0.8, word_keep=0.1, word_rand=0.1, smoothing=0.7))

    c.data = ml_collections.ConfigDict(dict(
        # "corpus": data.sources prepared into data.dir (default WORKDIR/data) by
        # data/prepare.py (mode prepare, or the first run), read by the grain loader. "synthetic": a fixed corpus
        # from a seeded Markov chain, no files (tests and smoke configs).
        source="corpus", seq_len=512,
        # name -> {kind: embedded | text | parquet | datasets | tfds, weight, and the kind's
        # fields}; see data/sources.py.
        sources={"embedded": {"kind": "embedded", "weight": 1.0}},
        # prepare_workers: preparation's processes (0: one per core; 1: in this process);
        # beam_options: Beam pipeline options for another runner (data/prepare.py).
        dir="", tokenizer="", lowercase=True, docs_per_shard=10000, prepare_workers=0, beam_options=(),
        group_by_length=True, group_window=64, pad_multiple=8, length_buckets=(),
        num_threads=2, prefetch=8,
        synthetic=dict(num_sequences=1024, min_len=12, branching=4, seed=0)))

    c.train = ml_collections.ConfigDict(dict(
        steps=0, epochs=3, batch_size=4096, micro_batch_size=32, seed=56,
        learning_rate=5e-4, warmup_fraction=0.05, adam_b1=0.9, adam_b2=0.98, adam_eps=1e-6,
        weight_decay=0.0, grad_clip=5.0, dtype="float32", log_every=10, peak_tflops=0.0,
        # Performance (BENCHMARKS.md). loss_chunk: rows per block of the fused vocabulary
        # projection + losses, so no [tokens, vocab] logits are ever live (0: all rows in
        # one block). remat: none | full | dots (what the student's backward keeps).
        # attention: "" (XLA) or "cudnn" (flash attention on GPU, bf16).
        loss_chunk=512, remat="none", attention="",
        # An update whose loss or gradients are not finite is skipped (and counted in
        # metrics.jsonl); this many in a row stop the run.
        max_consecutive_skips=10))
    # on_save_error: "stop" (the previous checkpoint stays; the same command resumes from
    # it) or "retry" (keep training, try again at the next checkpoint step; a failed
    # final save still stops the run).
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True,
                                                  on_save_error="stop"))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules=DEFAULT_RULES))
    # eval.passes: every held-out token is a target in exactly one of this many passes (apps/evaluate.py);
    # eval.batches: held-out batches of eval.batch_size (0: all).
    c.eval = ml_collections.ConfigDict(dict(batches=8, batch_size=32, seed=0, passes=7, hf_dirs=()))
    # Mode finetune (apps/finetune.py, train/task.py): the trainer's step and loop in `dir`
    # (default WORKDIR/finetune/TASK). model: a Hugging Face masked LM or a distill/pretrain
    # workdir (empty: this one); teacher: a fine-tuned model to distil from (alpha_task x task
    # loss + alpha_kd x KL x T^2; empty: plain fine-tuning); task: stdlib_packages, glue/NAME
    # or squad/v1.1 (TFDS in data_dir); max_len/stride: SQuAD's windows. finetune.train: the
    # train.* values the fine-tuning runs with (BERT's fine-tuning recipe), each set here
    # once; every train.* key it does not name is the config's (`stage_train`).
    c.finetune = ml_collections.ConfigDict(dict(
        model="", teacher="", task="stdlib_packages", data_dir="", dir="", max_len=128, stride=128, classes=6,
        alpha_task=1.0, alpha_kd=1.0, temperature=2.0,
        train=dict(steps=0, epochs=3, learning_rate=5e-5, batch_size=32, micro_batch_size=32, warmup_fraction=0.1,
                   seed=0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=0.01, grad_clip=1.0)))
    # The embedded demo's stages (modes demo, ablate, shapes, deploy; apps/stages.py); its
    # fine-tuning uses the finetune group. teacher: "shipped" (the package's,
    # distil_jax/assets/demo_teacher), "train" (pretrained in the workdir by teacher_train,
    # the shipped one's recipe) or a Hugging Face directory. teacher_train / student_train:
    # the train.* values of the teacher's pretraining and of the students' distillation.
    c.demo = ml_collections.ConfigDict(dict(
        teacher="shipped", mlm_only_baseline=True, inference_batches=8, examples=6,
        teacher_train=dict(steps=7000, epochs=0, batch_size=64, micro_batch_size=64, learning_rate=1e-3,
                           warmup_fraction=0.05, weight_decay=0.01, grad_clip=1.0, seed=0),
        student_train=dict(steps=500, epochs=0, learning_rate=1e-3),
        # mode ablate: the variants to run (names of apps/ablate.py:VARIANTS; empty: all).
        ablations=(),
        # mode shapes (apps/shapes.py): the narrow student; 0: the teacher's depth, half
        # its width, heads and feed-forward size.
        narrow=dict(num_layers=0, hidden_size=0, num_heads=0, intermediate_size=0)))
    # export.dtype: the Hugging Face weights' dtype (bfloat16 halves the files); export.onnx:
    # "" (none), "fp32" (EXPORT_DIR/onnx/model.onnx, checked against PyTorch) or "int8" (that
    # and its dynamic quantization, model_quantized.onnx); needs the deploy extra (onnx_export.py).
    c.export = ml_collections.ConfigDict(dict(dir="", dtype="float32", onnx=""))
    return c


def config_file(path: str, *args) -> ml_collections.ConfigDict:
    """get_config(*args) of the config file at `path` (a path relative to the calling
    config file's folder works as `config_file(os.path.join(os.path.dirname(__file__), ...))`)."""
    name = "config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def with_changes(config, **changes):
    """A copy of `config` with dotted-key changes: with_changes(c, **{"train.steps": 10})."""
    c = config.copy_and_resolve_references()
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


# Groups that hold a stage's own train.* values (each a subset of train's keys).
STAGE_TRAIN = ("finetune.train", "demo.teacher_train", "demo.student_train")


def _group(config, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def stage_train(config, recipe: str):
    """`config` with train.* set from the stage group `recipe` (one of STAGE_TRAIN): the
    config a stage (fine-tuning, the demo's teacher or students) trains with."""
    return with_changes(config, **{f"train.{k}": v for k, v in _group(config, recipe).items()})


def _unknown_keys(config, schema, prefix="") -> List[str]:
    problems = []
    for key in config.keys():
        name = prefix + key
        if key not in schema:
            problems.append(f"unknown key {name!r}")
        elif name in STAGE_TRAIN:  # any of train's keys
            problems += _unknown_keys(config[key], defaults().train, name + ".")
        elif isinstance(schema[key], ml_collections.ConfigDict) and key not in ("model", "sources"):
            if isinstance(config[key], ml_collections.ConfigDict):
                problems += _unknown_keys(config[key], schema[key], name + ".")
            else:
                problems.append(f"{name} must be a group of keys, got {config[key]!r}")
    return problems


_OPEN = ("model", "sources")  # free-form groups, checked where they are used


def _type_problems(config, schema, prefix="") -> List[str]:
    """Values whose type is not the schema's (an int is a float too; lists pass as tuples)."""
    problems = []
    for key in config.keys():
        if key not in schema or key in _OPEN:
            continue
        value, default, name = config[key], schema[key], prefix + key
        if name in STAGE_TRAIN:
            if isinstance(value, ml_collections.ConfigDict):
                problems += _type_problems(value, defaults().train, name + ".")
            continue
        if isinstance(default, ml_collections.ConfigDict):
            if isinstance(value, ml_collections.ConfigDict):
                problems += _type_problems(value, default, name + ".")
            continue
        want = type(default)
        ok = (isinstance(value, (list, tuple)) if want is tuple else
              isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else
              isinstance(value, want) and (want is bool or not isinstance(value, bool)))
        if not ok:
            problems.append(f"{name} must be {want.__name__} (like its default {default!r}), "
                            f"got {type(value).__name__} {value!r}")
    return problems


def teacher_model(config) -> BertConfig:
    """The architecture in teacher.model: a random teacher (tests), or what pretrain trains."""
    return BertConfig(**config.teacher.model.to_dict())


def validate(config, num_devices: Optional[int] = None, teacher: Optional[EncoderConfig] = None,
             more: Sequence[str] = ()) -> None:
    """Raise ConfigError listing every problem of `config` and `more` (found by the caller)."""
    found = list(find_problems(config, num_devices, teacher)) + list(more)
    if found:
        raise ConfigError(_message(found))


def find_problems(config, num_devices: Optional[int] = None, teacher: Optional[EncoderConfig] = None) -> List[str]:
    """Every problem of `config`; with `teacher` (its architecture) the model's too.

    Pure: nothing is read, loaded or compiled."""
    schema = defaults()
    problems = _unknown_keys(config, schema) + _type_problems(config, schema)
    if problems:  # the rest would only trip over the same keys or values
        return problems
    c = config
    if c.mode not in MODES:
        problems.append(f"mode {c.mode!r} is not one of {MODES}")
    for name, value in (("teacher.dtype", c.teacher.dtype), ("train.dtype", c.train.dtype),
                        ("export.dtype", c.export.dtype)):
        if value not in DTYPES:
            problems.append(f"{name} {value!r} is not one of {tuple(DTYPES)}")
    if c.mode == "pretrain" and c.teacher.path:
        problems.append("mode 'pretrain' trains a BERT from scratch with the sizes in teacher.model; "
                        f"teacher.path must be empty (got {c.teacher.path!r})")
    if c.student.init not in STUDENT_INITS:
        problems.append(f"student.init {c.student.init!r} is not one of {STUDENT_INITS}")
    if c.student.vocab not in ("full", "prune"):
        problems.append(f"student.vocab {c.student.vocab!r} is not one of 'full', 'prune'")
    elif c.student.vocab == "prune" and c.mode not in ("distill", "prepare", "export"):
        problems.append(f"student.vocab='prune' cuts the vocabulary when distilling (modes prepare, distill, "
                        f"export), not in mode {c.mode!r}: set student.vocab='full' (the exported student "
                        "carries its pruned tokenizer)")
    elif c.student.vocab == "prune" and c.data.source != "corpus":
        problems.append("student.vocab='prune' keeps the ids a prepared corpus holds: it needs data.source='corpus' "
                        f"(got {c.data.source!r})")

    t = c.train
    if c.export.onnx not in ("", "fp32", "int8"):
        problems.append(f"export.onnx {c.export.onnx!r} is not one of '', 'fp32', 'int8'")
    # The train settings each stage of the mode runs with: train.* itself, or a stage group
    # over it (finetune.train, the demo's teacher_train / student_train).
    if c.mode in ("demo", "ablate", "shapes", "deploy"):
        views = [("demo.teacher_train", True), ("demo.student_train", True), ("finetune.train", False)]
    elif c.mode == "finetune":
        views = [("finetune.train", True)]
    else:
        views = [("", c.mode in TRAIN_MODES)]
    train_problems = [p for recipe, length in views for p in _train_problems(c, recipe, length)]
    problems += list(dict.fromkeys(train_problems))  # a train.* problem once, whichever stage saw it
    if t.loss_chunk < 0:
        problems.append(f"train.loss_chunk must be >= 0 (0: no chunking), got {t.loss_chunk}")
    for key, allowed in (("remat", ("none", "full", "dots")), ("attention", ("", "xla", "cudnn"))):
        if t[key] not in allowed:
            problems.append(f"train.{key} {t[key]!r} is not one of {allowed}")

    if t.log_every < 1:
        problems.append(f"train.log_every must be >= 1 (updates per logged window), got {t.log_every}")
    d = c.distill
    weights = {name: getattr(d, f"alpha_{name}") for name in LossWeights.SCALARS}
    for name, v in weights.items():
        if v < 0:
            problems.append(f"distill.alpha_{name} is negative ({v}); loss weights must be >= 0")
    if c.mode == "distill" and not any(weights.values()) and not d.layer_terms:
        problems.append(f"distill.{', '.join('alpha_' + n for n in weights)} are all 0 and there are no "
                        "distill.layer_terms: nothing to train on")
    if d.temperature <= 0:
        problems.append(f"distill.temperature must be > 0, got {d.temperature}")
    m = c.masking
    if not 0 < m.mask_prop < 1:
        problems.append(f"masking.mask_prop must be in (0, 1), got {m.mask_prop}")
    if min(m.word_mask, m.word_keep, m.word_rand) < 0 or m.word_mask + m.word_keep + m.word_rand <= 0:
        problems.append("masking.word_mask/word_keep/word_rand must be >= 0 with a positive sum")
    if c.data.source not in ("corpus", "synthetic"):
        problems.append(f"data.source {c.data.source!r} is not 'corpus' or 'synthetic'")
    if c.data.pad_multiple < 1:
        problems.append(f"data.pad_multiple must be >= 1, got {c.data.pad_multiple}")
    if c.eval.passes < 1 or c.eval.batches < 0 or c.eval.batch_size < 1:
        problems.append(f"eval.passes ({c.eval.passes}) and eval.batch_size ({c.eval.batch_size}) must be "
                        f">= 1 and eval.batches ({c.eval.batches}) >= 0 (0: the whole held-out split)")
    if c.data.seq_len < MIN_SEQ_LEN:
        problems.append(f"data.seq_len must be at least {MIN_SEQ_LEN} (sequences of "
                        f"{MIN_SEQ_LEN - 1} tokens or fewer are dropped), got {c.data.seq_len}")
    elif c.data.source == "synthetic" and not 3 <= c.data.synthetic.min_len <= c.data.seq_len:
        problems.append(f"data.synthetic.min_len {c.data.synthetic.min_len} must be in "
                        f"[3, data.seq_len={c.data.seq_len}]")
    if c.mode == "finetune":
        problems += _finetune_problems(c.finetune)
    for name, spec in (c.data.sources.items() if c.data.source == "corpus" else ()):
        if not hasattr(spec, "get") or spec.get("kind") not in SOURCE_KINDS:
            problems.append(f"data.sources.{name} needs kind {', '.join(map(repr, SOURCE_KINDS))}")
        elif spec.get("weight", 1.0) < 0:
            problems.append(f"data.sources.{name}.weight must be >= 0")
    if c.checkpoint.every_steps <= 0 or c.checkpoint.keep <= 0:
        problems.append("checkpoint.every_steps and checkpoint.keep must be positive")
    if c.checkpoint.on_save_error not in ("stop", "retry"):
        problems.append(f"checkpoint.on_save_error {c.checkpoint.on_save_error!r} is not 'stop' or 'retry'")
    if t.max_consecutive_skips < 1:
        problems.append(f"train.max_consecutive_skips must be >= 1, got {t.max_consecutive_skips}")

    problems += _mesh_problems(c, num_devices)
    if c.mode == "finetune":  # the encoders come from finetune.model / finetune.teacher
        return problems
    if teacher is None and not c.teacher.path:
        try:
            teacher = teacher_model(c)
        except (TypeError, ValueError) as e:
            problems.append(f"teacher.model: {e}")
    if teacher is not None:
        problems += _model_problems(c, teacher)
    return problems


def _train_problems(c, recipe: str, needs_length: bool) -> List[str]:
    """The train settings' problems: train.*, or with `recipe` (a STAGE_TRAIN group) the
    settings that stage runs with, each named where it is set."""
    group = _group(c, recipe) if recipe else {}
    t = {**c.train.to_dict(), **dict(group)}
    name = lambda key: f"{recipe}.{key}" if key in group else f"train.{key}"  # noqa: E731
    problems = []
    if needs_length and t["steps"] <= 0 and t["epochs"] <= 0:
        problems.append(f"{name('steps')} and {name('epochs')} are both <= 0: set one of them")
    if t["micro_batch_size"] <= 0 or t["batch_size"] <= 0:
        problems.append(f"{name('batch_size')} ({t['batch_size']}) and {name('micro_batch_size')} "
                        f"({t['micro_batch_size']}) must be positive")
    elif t["batch_size"] % t["micro_batch_size"]:
        problems.append(f"{name('batch_size')} {t['batch_size']} is not a multiple of "
                        f"{name('micro_batch_size')} {t['micro_batch_size']}")
    if t["learning_rate"] <= 0:
        problems.append(f"{name('learning_rate')} must be positive, got {t['learning_rate']}")
    if not 0 <= t["warmup_fraction"] < 1:
        problems.append(f"{name('warmup_fraction')} must be in [0, 1), got {t['warmup_fraction']}")
    return problems


def _finetune_problems(f) -> List[str]:
    problems = []
    if not (f.task in ("stdlib_packages", "squad/v1.1") or f.task.startswith("glue/")):
        problems.append(f"finetune.task {f.task!r} is not stdlib_packages, glue/NAME or squad/v1.1")
    if min(f.alpha_task, f.alpha_kd) < 0 or f.temperature <= 0:
        problems.append("finetune.alpha_task and alpha_kd must be >= 0 and finetune.temperature > 0")
    elif f.alpha_task == 0 and not (f.teacher and f.alpha_kd > 0):
        problems.append("finetune.alpha_task is 0 and nothing distils (finetune.teacher with alpha_kd > 0): "
                        "nothing to train on")
    return problems


def _mesh_problems(c, num_devices) -> List[str]:
    shape = tuple(c.mesh.shape)
    if len(shape) != 3 or any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        return [f"mesh.shape {shape} must be 3 sizes (data, fsdp, tensor), positive or one -1"]
    if num_devices is None:
        return []
    full = parallel.mesh_shape(shape, num_devices)
    if math.prod(full) != num_devices:
        return [f"mesh.shape {shape} does not fit {num_devices} devices"]
    data_parallel = full[0] * full[1]
    if c.train.micro_batch_size % data_parallel:
        return [f"train.micro_batch_size {c.train.micro_batch_size} is not a multiple of the "
                f"data-parallel size {data_parallel} (mesh data x fsdp = {full[0]} x {full[1]})"]
    return []


def student_sizes(c, teacher: EncoderConfig) -> dict:
    return dict(hidden_size=c.student.hidden_size or teacher.hidden_size,
                num_heads=c.student.num_heads or teacher.num_heads,
                intermediate_size=c.student.intermediate_size or teacher.intermediate_size)


def _model_problems(c, teacher: EncoderConfig) -> List[str]:
    problems = []
    usable_positions = teacher.max_position_embeddings - getattr(teacher, "position_offset", 0)
    if c.data.seq_len > usable_positions:
        problems.append(f"data.seq_len {c.data.seq_len} is longer than the teacher's "
                        f"{usable_positions} position embeddings; lower data.seq_len")
    if c.mode == "pretrain":
        return problems
    sizes = student_sizes(c, teacher)
    if c.student.num_layers <= 0:
        problems.append(f"student.num_layers must be positive, got {c.student.num_layers}")
    if sizes["hidden_size"] % sizes["num_heads"]:
        problems.append(f"student hidden_size {sizes['hidden_size']} is not divisible by "
                        f"num_heads {sizes['num_heads']}")
    if c.student.init == "prune":
        problems += _prune_problems(c, sizes, teacher)
    if c.student.init == "teacher":
        for k, v in sizes.items():
            if v != getattr(teacher, k):
                problems.append(f"student.{k} {v} differs from the teacher's {getattr(teacher, k)}: "
                                "student.init='teacher' copies teacher weights, so sizes must match "
                                "(student.init='prune' cuts them to a smaller size)")
    if c.student.init in ("teacher", "prune"):
        if c.student.num_layers > teacher.num_layers:
            problems.append(f"student.num_layers {c.student.num_layers} > teacher's "
                            f"{teacher.num_layers}: cannot initialise from the teacher")
        if c.student.layer_map and len(c.student.layer_map) != c.student.num_layers:
            problems.append(f"student.layer_map {tuple(c.student.layer_map)} must name "
                            f"{c.student.num_layers} teacher layers")
    problems += _family_problems(c, teacher)
    if c.distill.alpha_cos > 0 and sizes["hidden_size"] != teacher.hidden_size:
        problems.append(f"distill.alpha_cos > 0 needs equal widths (the cosine loss compares "
                        f"hidden states): student {sizes['hidden_size']}, teacher {teacher.hidden_size}; "
                        "use distill.layer_terms=(('hidden_cos',),) to compare them through a projection")
    return problems + _layer_term_problems(c, sizes, teacher)


def _family_problems(c, teacher: EncoderConfig) -> List[str]:
    """What a teacher of another family than BERT rules out (models/students.py)."""
    problems = []
    if not getattr(teacher, "mlm_head", True):
        for key in ("alpha_ce", "alpha_mse"):
            if c.distill[key] > 0:
                problems.append(
                    f"distill.{key} > 0 needs the teacher's MLM logits, and {c.teacher.path or 'the teacher'} has no "
                    "MLM head (the released DeBERTa-v3 checkpoints are ELECTRA discriminators): set "
                    f"distill.{key}=0 and distil through the hidden states (distill.alpha_cos, "
                    "distill.layer_terms such as (('relation',),)); distill.alpha_mlm trains the student's "
                    "fresh head")
    if c.student.init == "prune" and not distils_to_distilbert(teacher):
        problems.append(f"student.init='prune' cuts BERT teachers into DistilBERT students; a "
                        f"{type(teacher).__name__} student copies whole layers: use student.init='teacher' "
                        "(or 'random' for another width)")
    if c.student.init == "teacher" and c.student.layer_map and c.student.num_layers > 0:
        student = student_config_from_teacher(teacher, c.student.num_layers)
        problems += pattern_problems(teacher, student, tuple(c.student.layer_map))
    return problems


def _layer_term_problems(c, sizes, teacher: EncoderConfig) -> List[str]:
    try:
        terms = layer_terms(c.distill.layer_terms, teacher.num_layers, c.student.num_layers)
    except ValueError as e:
        return [str(e)]
    problems = []
    heads = c.distill.relation_heads or teacher.num_heads
    if any(t.kind == "relation" for t in terms):
        for who, width in (("student", sizes["hidden_size"]), ("teacher", teacher.hidden_size)):
            if heads < 1 or width % heads:
                problems.append(f"distill.relation_heads {heads} does not divide the {who}'s width {width}")
    if any(LAYER_KINDS[t.kind].needs_equal_heads for t in terms) and sizes["num_heads"] != teacher.num_heads:
        problems.append(f"distill.layer_terms: attention_kl compares heads one to one, but the student has "
                        f"{sizes['num_heads']} and the teacher {teacher.num_heads}; use 'relation' "
                        "(any head counts) instead")
    return problems


def _prune_problems(c, sizes, teacher: EncoderConfig) -> List[str]:
    problems = [f"student.{k} {v} is larger than the teacher's {getattr(teacher, k)}: pruning only removes"
                for k, v in sizes.items() if v > getattr(teacher, k)]
    if sizes["hidden_size"] // sizes["num_heads"] != teacher.head_dim:
        problems.append(f"student.init='prune' keeps whole heads of the teacher's head size {teacher.head_dim}: "
                        f"student hidden_size / num_heads must be {teacher.head_dim}, got "
                        f"{sizes['hidden_size']} / {sizes['num_heads']}")
    if c.student.prune_batches < 1:
        problems.append(f"student.prune_batches must be >= 1, got {c.student.prune_batches}")
    return problems


def _message(problems: List[str]) -> str:
    return (f"the config has {len(problems)} problem(s):\n" +
            "\n".join(f"  - {p}" for p in problems))
