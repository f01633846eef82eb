"""Downstream fine-tuning: sequence classification (or regression) on either encoder.

    python -m distil_jax.main --config=CONFIG --workdir=DIR --config.mode=finetune \
        --config.finetune.model=HF_DIR --config.finetune.task=glue/sst2 --config.finetune.data_dir=TFDS_DIR

`finetune.model` empty takes DIR's newest checkpoint; `finetune.task=stdlib_packages`
needs no data. Writes DIR/finetune.json.

A head on the first token ([CLS]): dense + tanh + dropout + dense (BERT's pooler and
classifier), dense + ReLU + dropout + dense for DistilBERT (its pre_classifier and
classifier), as transformers' *ForSequenceClassification (models/heads.py), trained with
the encoder by AdamW; `hf_heads.save_hf_classifier` exports it as that class. Metrics as
GLUE defines them per task: Matthews correlation (CoLA), F1 and accuracy (MRPC, QQP),
Pearson and Spearman (STS-B), accuracy (the others).
`stdlib_packages` is an offline task with real labels: which standard-library package
a docstring comes from.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sysconfig
from typing import Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epy

from distil_jax import hf
from distil_jax.apps.export import checkpoint_tokenizer
from distil_jax.checkpoint import load_model
from distil_jax.data.sources import docstrings, held_out, stdlib_files
from distil_jax.data.tokenizer import load_tokenizer
from distil_jax.models import MaskedLM, SequenceClassifier

with epy.lazy_imports():  # heavy, and only GLUE needs it
    import tensorflow_datasets as tfds

# --- GLUE metrics ---------------------------------------------------------------------
def accuracy(pred, gold) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def f1(pred, gold) -> float:
    """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp = np.sum((pred == 1) & (gold == 1))
    precision = tp / max(np.sum(pred == 1), 1)
    recall = tp / max(np.sum(gold == 1), 1)
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def matthews(pred, gold) -> float:
    """Matthews correlation of binary predictions (CoLA)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp = float(np.sum((pred == 1) & (gold == 1)))
    tn = float(np.sum((pred == 0) & (gold == 0)))
    fp = float(np.sum((pred == 1) & (gold == 0)))
    fn = float(np.sum((pred == 0) & (gold == 1)))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom else 0.0


def _ranks(x) -> np.ndarray:
    """Ranks with ties given their average rank (as Spearman's definition needs)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x, y) -> float:
    return pearson(_ranks(x), _ranks(y))


# task -> (text fields, number of labels (1: regression), metrics, eval split)
GLUE_TASKS = {
    "cola": (("sentence",), 2, ("matthews",), "validation"),
    "sst2": (("sentence",), 2, ("accuracy",), "validation"),
    "mrpc": (("sentence1", "sentence2"), 2, ("f1", "accuracy"), "validation"),
    "qqp": (("question1", "question2"), 2, ("f1", "accuracy"), "validation"),
    "stsb": (("sentence1", "sentence2"), 1, ("pearson", "spearman"), "validation"),
    "mnli": (("premise", "hypothesis"), 3, ("accuracy",), "validation_matched"),
    "qnli": (("question", "sentence"), 2, ("accuracy",), "validation"),
    "rte": (("sentence1", "sentence2"), 2, ("accuracy",), "validation"),
    "wnli": (("sentence1", "sentence2"), 2, ("accuracy",), "validation"),
}
METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def task_metrics(names: Sequence[str], predictions, gold) -> Dict[str, float]:
    return {name: METRICS[name](predictions, gold) for name in names}


# --- data -------------------------------------------------------------------------------
Arrays = Dict[str, np.ndarray]


def encode(tokenizer, texts_a: Sequence[str], texts_b=None, labels=None, max_len: int = 128) -> Arrays:
    """Token ids padded to the longest (rounded up to 8, at most max_len), with labels."""
    enc = tokenizer(list(texts_a), list(texts_b) if texts_b is not None else None,
                    truncation=True, max_length=max_len)
    longest = max(len(x) for x in enc["input_ids"])
    length = min(max_len, -(-longest // 8) * 8)
    ids = np.full((len(enc["input_ids"]), length), tokenizer.pad_token_id, np.int32)
    am = np.zeros_like(ids)
    for i, row in enumerate(enc["input_ids"]):
        ids[i, : len(row)] = row
        am[i, : len(row)] = 1
    out = {"input_ids": ids, "attention_mask": am}
    if labels is not None:
        out["labels"] = np.asarray(labels)
    return out


def glue_data(task: str, tokenizer, data_dir: str = "", max_len: int = 128) -> Tuple[Arrays, Arrays, tuple]:
    """(train, eval, metrics) of a GLUE task read with tfds.data_source('glue/TASK')."""
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; one of {sorted(GLUE_TASKS)}")
    fields, _, metrics, eval_split = GLUE_TASKS[task]
    out = []
    for split in ("train", eval_split):
        source = tfds.data_source(f"glue/{task}", split=split, data_dir=data_dir or None, download=False)
        rows = [source[i] for i in range(len(source))]
        text = lambda r, k: r[k].decode() if isinstance(r[k], bytes) else str(r[k])  # noqa: E731
        a = [text(r, fields[0]) for r in rows]
        b = [text(r, fields[1]) for r in rows] if len(fields) > 1 else None
        out.append(encode(tokenizer, a, b, [r["label"] for r in rows], max_len))
    return out[0], out[1], metrics


def stdlib_packages_data(tokenizer, classes: int = 6, max_len: int = 128,
                         eval_percent: int = 20) -> Tuple[Arrays, Arrays, List[str]]:
    """Docstrings labelled by the standard-library package they come from (the `classes`
    packages with the most docstrings); held out by content hash."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for path in stdlib_files():
        rel = os.path.relpath(path, root).split(os.sep)
        if len(rel) > 1:  # files inside a package
            docs += [(rel[0], d) for d in docstrings(path) if len(d.split()) >= 8]
    counts = collections.Counter(p for p, _ in docs)
    names = sorted(p for p, _ in counts.most_common(classes))
    label = {p: i for i, p in enumerate(names)}
    chosen = [(label[p], d) for p, d in docs if p in label]
    train = [(y, d) for y, d in chosen if not held_out(d, eval_percent)]
    held = [(y, d) for y, d in chosen if held_out(d, eval_percent)]
    make = lambda rows: encode(tokenizer, [d for _, d in rows], None, [y for y, _ in rows], max_len)  # noqa: E731
    return make(train), make(held), names


# --- the model and its training ---------------------------------------------------------
def outputs_in_blocks(forward, arrays: Arrays, rows: int = 256) -> np.ndarray:
    """forward(input_ids, attention_mask) over `arrays` in blocks of `rows`, concatenated."""
    return np.concatenate([np.asarray(forward(arrays["input_ids"][i: i + rows], arrays["attention_mask"][i: i + rows]))
                           for i in range(0, len(arrays["input_ids"]), rows)])


def encoder_params(mlm_params):
    """An MLM's params without its vocabulary head (which classification does not use)."""
    return {k: v for k, v in mlm_params.items() if k != "mlm_head"}


def finetune(encoder: MaskedLM, mlm_params, train: Arrays, held_out: Arrays, num_labels: int,
             metrics: Sequence[str], epochs: int = 3, learning_rate: float = 2e-4,
             batch_size: int = 32, seed: int = 0, warmup_fraction: float = 0.1) -> Tuple[Dict[str, float], np.ndarray, Tuple]:
    """Fine-tune encoder + head: (the held-out metrics after the last epoch, the held-out
    predictions, for paired comparisons of models on the same examples, and the fine-tuned
    (SequenceClassifier, params))."""
    model = SequenceClassifier(encoder, num_labels)
    rng = jax.random.key(seed)
    init = model.init(rng, train["input_ids"][:1], train["attention_mask"][:1])["params"]
    params = nn.meta.unbox({**init, "encoder": encoder_params(mlm_params)})
    steps_per_epoch = max(1, len(train["labels"]) // batch_size)
    total = steps_per_epoch * epochs
    warmup = max(1, int(warmup_fraction * total))
    schedule = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup),
                                     optax.linear_schedule(learning_rate, 0.0, total - warmup)], [warmup])
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = tx.init(params)
    regression = num_labels == 1

    @jax.jit
    def step(params, opt_state, ids, am, labels, rng):
        def loss_fn(p):
            out = model.apply({"params": p}, ids, am, deterministic=False, rngs={"dropout": rng})
            if regression:
                return jnp.mean((out[:, 0] - labels) ** 2)
            return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda p, ids, am: model.apply({"params": p}, ids, am))
    order_rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = order_rng.permutation(len(train["labels"]))
        for s in range(steps_per_epoch):
            idx = np.sort(order[s * batch_size: (s + 1) * batch_size])
            labels = train["labels"][idx].astype(np.float32 if regression else np.int32)
            params, opt_state, _ = step(params, opt_state, train["input_ids"][idx],
                                        train["attention_mask"][idx], labels,
                                        jax.random.fold_in(rng, epoch * steps_per_epoch + s))
    outputs = outputs_in_blocks(lambda ids, am: predict(params, ids, am), held_out)
    predictions = outputs[:, 0] if regression else outputs.argmax(-1)
    return task_metrics(metrics, predictions, held_out["labels"]), predictions, (model, params)


def task_data(task: str, tokenizer, config) -> Tuple[Arrays, Arrays, int, tuple, list]:
    """(train, held out, number of labels, metrics, label names) of `finetune.task`."""
    f = config.finetune
    if task == "stdlib_packages":
        train, held, names = stdlib_packages_data(tokenizer, f.classes, f.max_len)
        return train, held, len(names), ("accuracy",), names
    name = task.split("/", 1)[-1]
    train, held, metrics = glue_data(name, tokenizer, f.data_dir, f.max_len)
    return train, held, GLUE_TASKS[name][1], metrics, []


def run(config, workdir: str) -> Dict:
    """Mode finetune: `finetune.model` (a Hugging Face dir; empty: the workdir's newest
    checkpoint) on `finetune.task` -> WORKDIR/finetune.json."""
    f = config.finetune
    if f.model:
        encoder, params = hf.load_hf_model(f.model)
        tokenizer = load_tokenizer(f.model)
    else:
        encoder, params, meta = load_model(workdir)
        tokenizer = checkpoint_tokenizer(meta, config, workdir)
        if tokenizer is None:
            raise FileNotFoundError(f"the checkpoint in {workdir} was trained without a tokenizer "
                                    "(synthetic data): fine-tune a Hugging Face directory instead "
                                    "(finetune.model)")
    train, held, num_labels, metrics, _ = task_data(f.task, tokenizer, config)
    scores, _, _ = finetune(encoder, params, train, held, num_labels, metrics, f.epochs, f.learning_rate,
                         f.batch_size, f.seed)
    result = {"model": f.model or workdir, "task": f.task, **scores}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "finetune.json"), "w") as out:
            json.dump(result, out, indent=2)
    return result
