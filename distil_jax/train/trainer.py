"""Training, top to bottom: build what the config describes, restore or initialise, loop.

`build(config, workdir)` validates first (every problem at once, before anything is
loaded or compiled), then makes the mesh and what the mode trains (`TrainingSetup`): for
distill / pretrain (`mlm_parts`) the teacher loaded once in float32 (the student copies
exact weights), the student, the corpus and the masked-LM objective; for finetune
(`task_parts`) a task head on `finetune.model`'s encoder, the fine-tuned teacher if any,
the task's arrays and the task objective (task.py). Then the teacher on the mesh in
`teacher.dtype`, the trained parameters' shardings by their logical axes, the optimizer
and the checkpoints: the same for every mode.
`fit(trainer)` restores the newest checkpoint or initialises, then runs the jitted
update (step.py) until the last update or a SIGTERM/SIGINT, logging windows of
updates and checkpointing every `checkpoint.every_steps` updates.
`train(config, workdir)` is both, holding the workdir's lock: -> (state, summary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from distil_jax import config as config_lib
from distil_jax import data as data_lib
from distil_jax import parallel, runtime
from distil_jax.interop import hf
from distil_jax.train import optim, task
from distil_jax.checkpoint import Checkpointer, model_meta, params_fingerprint
from distil_jax.data import tasks
from distil_jax.data import vocab_prune
from distil_jax.data.arrays import ShuffledBatches
from distil_jax.data.tasks import TaskSet
from distil_jax.data.tokenizer import special_ids
from distil_jax.metrics import MetricWriter, device_peak_tflops, train_flops_per_token, window_summary
from distil_jax.models import Bert, MaskedLM, init_params, logical_axes, module_for
from distil_jax.train.objective import Objective, init_projections
from distil_jax.terms import PROJECTIONS, TrainingObjective, model_params
from distil_jax.train.step import TrainState, compiled_step, tree_all_finite
from distil_jax.train.student_init import (activation_importance, init_student_from_teacher,
                                     student_config_from_teacher)


def load_teacher(config) -> Tuple[MaskedLM, Any]:
    """(module in teacher.dtype, float32 params): teacher.path, or random of teacher.model."""
    dtype = config_lib.DTYPES[config.teacher.dtype]
    if config.teacher.path:
        module, params = hf.load_hf_model(config.teacher.path)
    else:
        logging.warning("teacher.path is empty: the teacher is random (teacher.model); "
                        "useful for tests only")
        module = Bert(config_lib.teacher_model(config))
        params = jax.jit(lambda key: init_params(module, key))(jax.random.key(config.train.seed + 1))
    return type(module)(module.config, dtype=dtype, param_dtype=dtype,
                        attention_impl=config.train.attention or None), params


def pruned_teacher(teacher: MaskedLM, params, kept) -> Tuple[MaskedLM, Any]:
    """The teacher on the kept vocabulary (vocab_prune.py): its word embeddings and MLM
    head cut to the kept ids. On text of the corpus it computes what it did, and its
    softmax over the kept ids is its distribution conditioned on them (the mass on dropped
    tokens removed, the rest renormalised): what the student's KL is taken against."""
    pruned = type(teacher)(vocab_prune.prune_config(teacher.config, kept), dtype=teacher.dtype,
                           param_dtype=teacher.param_dtype, attention_impl=teacher.attention_impl)
    return pruned, vocab_prune.prune_params(params, kept, vocab_prune.vocab_paths(type(teacher)(teacher.config)))


def validate_with_teacher(config) -> None:
    """ConfigError listing every problem, with the teacher's architecture read from disk."""
    teacher, found = None, []
    if config.teacher.path and config.mode == "distill":
        try:
            teacher = hf.read_config(config.teacher.path)
        except (OSError, ValueError) as e:
            found.append(f"teacher: {e}")
    config_lib.validate(config, num_devices=jax.device_count(), teacher=teacher, more=found)


def calibration_importance(config, workdir: str, teacher: MaskedLM, teacher_params, process_index: int,
                           process_count: int, rows: np.ndarray, data_vocab: Dict[str, int]) -> Dict[str, Any]:
    """The teacher's activation importance (student_init.py) on the first
    `student.prune_batches` training batches, in float32: each process reads its rows of
    them, and the sums over all rows are gathered, so every process prunes alike."""
    data, _ = data_lib.make_data(config, "train", config.train.micro_batch_size, process_index, process_count,
                                 workdir=workdir, rows=rows, **data_vocab)
    batches = [next(data) for _ in range(config.student.prune_batches)]
    logging.info("pruning the teacher to the student's shape by activation importance on %d batches",
                 len(batches))

    def over_processes(sums):
        if process_count == 1:
            return sums
        return {k: np.sum(multihost_utils.process_allgather(v), axis=0) for k, v in sums.items()}
    return activation_importance(type(teacher)(teacher.config), teacher_params, batches, over_processes)


@dataclasses.dataclass
class TrainingSetup:
    """What a mode trains: built by `mlm_parts` (distill, pretrain) or `task_parts` (finetune)."""

    model: Any  # a MaskedLM, or a task head on one (finetune)
    teacher: Any  # None when nothing distils from one
    teacher_params: Any  # float32, on the host
    teacher_ref: Dict[str, str]  # path and fingerprint, recorded in checkpoints
    data: data_lib.BatchIterator
    vocab: data_lib.VocabInfo
    objective: TrainingObjective  # objective.Objective or task.TaskObjective
    abstract_params: Any  # ShapeDtypeStructs of the trained params
    initial_params: Callable[[Any], Any]  # (param shardings) -> fresh params on the mesh
    meta: Dict[str, Any] = dataclasses.field(default_factory=dict)  # more for the checkpoints
    task: Optional[TaskSet] = None  # finetune: the task's data, for its evaluation


@dataclasses.dataclass
class Trainer:
    """A run's parts, built: what `fit` needs and nothing an app needs to read weights."""

    config: Any
    workdir: str
    mesh: jax.sharding.Mesh
    parts: TrainingSetup
    teacher_params: Any  # on the mesh, in teacher.dtype; None without a teacher
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: TrainState
    teacher_shardings: Any
    abstract_state: TrainState  # ShapeDtypeStructs with shardings, for restore
    checkpointer: Checkpointer
    total_updates: int
    accumulation: int  # micro-batches per update
    initial_params: Callable[[], Any]  # fresh params on the mesh (student init or random)

    @property
    def model(self):
        return self.parts.model

    @property
    def teacher(self):
        return self.parts.teacher

    @property
    def data(self) -> data_lib.BatchIterator:
        return self.parts.data

    @property
    def vocab(self) -> data_lib.VocabInfo:
        return self.parts.vocab

    @property
    def objective(self):
        return self.parts.objective

    def meta(self) -> Dict[str, Any]:
        return {"mode": self.config.mode, "teacher": self.parts.teacher_ref, "model": model_meta(self.model),
                "tokenizer_dir": self.vocab.tokenizer_dir, "config": self.config.to_dict(),
                "total_updates": self.total_updates, **self.parts.meta}

    def create(self, params) -> TrainState:
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          rng=jax.random.PRNGKey(self.config.train.seed))

    def restore_or_init(self) -> Tuple[TrainState, Optional[int]]:
        """(state, restored update or None): the newest checkpoint, else a fresh state."""
        restored = self.checkpointer.restore_latest(self.abstract_state, self.meta())
        if restored is not None:
            state, data_state, step = restored
            self.data.set_state(data_state)
            logging.info("resumed from the checkpoint of update %d", step)
            return state, step
        init = jax.jit(self.create, out_shardings=self.state_shardings)
        return init(self.initial_params()), None


def mlm_parts(config, workdir: str, kw: Dict[str, Any], process_index: int, process_count: int,
              rows: np.ndarray, accumulation: int) -> TrainingSetup:
    """Masked LM distillation (the student from the teacher) or pretraining (a BERT)."""
    t = config.train
    if config.mode == "pretrain":
        model = Bert(config_lib.teacher_model(config), **kw)
        teacher = teacher_params32 = None
        teacher_ref = {"path": "", "fingerprint": ""}
        data, vocab = data_lib.make_data(config, "train", t.micro_batch_size, process_index, process_count,
                                         vocab_size=model.config.vocab_size, workdir=workdir,
                                         keep_together=accumulation, rows=rows)
    else:
        teacher, teacher_params32 = load_teacher(config)
        # The data in the teacher's ids (as prepared); pruned to the kept ones when asked.
        data_vocab = dict(vocab_size=teacher.config.vocab_size, pad_id=teacher.config.pad_token_id)
        data, vocab = data_lib.make_data(config, "train", t.micro_batch_size, process_index, process_count,
                                         workdir=workdir, keep_together=accumulation, rows=rows, **data_vocab)
        if vocab.kept is not None:  # student.vocab='prune': the teacher too speaks the kept ids only
            teacher, teacher_params32 = pruned_teacher(teacher, teacher_params32, vocab.kept)
        s_config = student_config_from_teacher(
            teacher.config, num_layers=config.student.num_layers,
            **config_lib.student_sizes(config, teacher.config))
        model = module_for(s_config)(s_config, **kw)
        teacher_ref = {"path": config.teacher.path or "(random teacher.model)",
                       "fingerprint": params_fingerprint(teacher_params32)}
    obj = Objective.from_config(config, vocab, None if teacher is None else teacher.config, model.config)
    # The hidden-state terms' projections across widths train with the student (replicated).
    new_projections = functools.partial(
        init_projections, weights=obj.weights, student_width=model.config.hidden_size,
        teacher_width=model.config.hidden_size if teacher is None else teacher.config.hidden_size,
        stddev=model.config.initializer_range)

    def with_projections(student, rng):
        projections = new_projections(jax.random.fold_in(rng, 1))
        return {**student, PROJECTIONS: projections} if projections else student

    def initial_params(param_sh):
        rng = jax.random.key(t.seed + 2)
        if teacher is None or config.student.init == "random":
            return jax.jit(lambda r: with_projections(init_params(model, r), r), out_shardings=param_sh)(rng)
        importance = None
        if config.student.init == "prune":
            importance = calibration_importance(config, workdir, teacher, teacher_params32, process_index,
                                                process_count, rows, data_vocab)
        host = init_student_from_teacher(
            teacher_params32, teacher.config, model.config,
            layer_map=tuple(config.student.layer_map) or None,
            vocab_transform=config.student.vocab_transform,
            fold_token_type=config.student.fold_token_type, rng=rng, importance=importance)
        return jax.device_put(with_projections(host, rng), param_sh)

    abstract = jax.eval_shape(lambda r: with_projections(init_params(model, r), r), jax.random.key(0))
    return TrainingSetup(model=model, teacher=teacher, teacher_params=teacher_params32, teacher_ref=teacher_ref,
                 data=data, vocab=vocab, objective=obj, abstract_params=abstract, initial_params=initial_params)


def task_parts(config, workdir: str, kw: Dict[str, Any], process_index: int, process_count: int,
               rows: np.ndarray, accumulation: int) -> TrainingSetup:
    """Fine-tuning a task head on `finetune.model`'s encoder, distilled from the fine-tuned
    `finetune.teacher` when one is given (task.py)."""
    f, t = config.finetune, config.train
    encoder, encoder_params, tokenizer, tokenizer_dir = task.load_encoder(f.model)
    task_set = tasks.task_data(f, tokenizer)
    model = task.head_model(type(encoder)(encoder.config, **kw), task_set)
    teacher = teacher_params32 = None
    teacher_ref = {"path": "", "fingerprint": ""}
    if f.teacher:
        teacher, teacher_params32, labels = task.load_task_model(f.teacher)
        if type(teacher) is not type(model) or len(labels) != task_set.num_labels:
            raise config_lib.ConfigError(
                f"finetune.teacher {f.teacher} is a {type(teacher).__name__} with {len(labels)} labels; "
                f"{task_set.name} needs a {type(model).__name__} with {task_set.num_labels}: fine-tune the "
                "teacher on the same task first")
        teacher = task.with_dtype(teacher, config_lib.DTYPES[config.teacher.dtype])
        teacher_ref = {"path": f.teacher, "fingerprint": params_fingerprint(teacher_params32)}
    data = ShuffledBatches(task_set.train, t.micro_batch_size, t.seed, rows)
    vocab = data_lib.VocabInfo(len(tokenizer), tokenizer.pad_token_id, tokenizer.mask_token_id,
                               special_ids(tokenizer), np.zeros(0), tokenizer, tokenizer_dir)
    obj = task.TaskObjective(task_set.kind, f.alpha_task, f.alpha_kd if teacher is not None else 0.0,
                             f.temperature)

    def fresh(rng):
        return task.initial_params(model, encoder_params, rng, task_set.train)

    meta = {"task": {"name": task_set.name, "kind": task_set.kind, "labels": task_set.labels},
            "student_source": f.model}
    return TrainingSetup(model=model, teacher=teacher, teacher_params=teacher_params32, teacher_ref=teacher_ref,
                 data=data, vocab=vocab, objective=obj, abstract_params=jax.eval_shape(fresh, jax.random.key(0)),
                 initial_params=lambda sh: jax.device_put(fresh(jax.random.key(t.seed + 2)), sh),
                 meta=meta, task=task_set)


def build(config, workdir: str, process_index: Optional[int] = None,
          process_count: Optional[int] = None) -> Trainer:
    if config.mode == "finetune":
        config = task.task_training(config)
    validate_with_teacher(config)
    process_count = jax.process_count() if process_count is None else process_count
    t = config.train
    mesh = parallel.make_mesh(config.mesh.shape)
    if process_index is None:  # the rows of every global batch this process's devices hold
        process_index, rows = jax.process_index(), parallel.process_rows(mesh, t.micro_batch_size)
    else:  # (a test standing in for process `process_index`: its block of them)
        rows = data_lib.block_rows(process_index, process_count, t.micro_batch_size)
    rules = [tuple(r) for r in config.mesh.rules]
    # Compute in train.dtype over float32 master params; the attention and remat choices.
    kw = dict(dtype=config_lib.DTYPES[t.dtype], attention_impl=t.attention or None, remat=t.remat)
    accumulation = t.batch_size // t.micro_batch_size
    make_parts = task_parts if config.mode == "finetune" else mlm_parts
    parts = make_parts(config, workdir, kw, process_index, process_count, rows, accumulation)
    teacher, model = parts.teacher, parts.model

    teacher_params = teacher_sh = None
    if teacher is not None:
        teacher_sh = parallel.logical_shardings(
            jax.eval_shape(lambda: parts.teacher_params), logical_axes(teacher), mesh, rules)
        dtype = config_lib.DTYPES[config.teacher.dtype]  # what the teacher module computes in
        teacher_params = jax.device_put(jax.tree.map(lambda x: x.astype(dtype), parts.teacher_params), teacher_sh)
    abstract_params = parts.abstract_params
    param_sh = parallel.logical_shardings(model_params(abstract_params), logical_axes(model), mesh, rules)
    if PROJECTIONS in abstract_params:
        param_sh[PROJECTIONS] = jax.tree.map(lambda _: parallel.replicated(mesh), abstract_params[PROJECTIONS])

    total = t.steps if t.steps > 0 else max(1, t.epochs * parts.data.sequences_per_epoch // t.batch_size)
    tx, schedule = optim.make_optimizer(t, int(total))
    replicated = parallel.replicated(mesh)
    abstract = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p),
                                                   jax.random.PRNGKey(0)),
                              abstract_params)
    opt_sh = optax.tree_utils.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_sh,
                                              transform_non_params=lambda _: replicated)
    state_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint.keep,
                        config.checkpoint.async_save, config.checkpoint.on_save_error)
    return Trainer(config=config, workdir=workdir, mesh=mesh, parts=parts, teacher_params=teacher_params,
                   tx=tx, schedule=schedule, state_shardings=state_sh, teacher_shardings=teacher_sh,
                   abstract_state=abstract, checkpointer=ckpt, total_updates=int(total),
                   accumulation=accumulation, initial_params=lambda: parts.initial_params(param_sh))


def _sums(acc, metrics):
    return metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)


def fit(trainer: Trainer, step_wrapper: Callable = lambda f: f) -> Tuple[TrainState, Dict[str, Any]]:
    """Train until the config's last update (or a SIGTERM/SIGINT), checkpointing on the way.

    Returns (state, summary): summary is JSON-safe (the update reached, the last
    checkpoint, how the run stopped, the last window's metrics). `step_wrapper` wraps the
    pure step before jit (e.g. chex.assert_max_traces, or a fault injector)."""
    tr, config = trainer, trainer.config
    ckpt, total, k = tr.checkpointer, tr.total_updates, tr.accumulation
    state, _ = tr.restore_or_init()
    jitted = compiled_step(tr.model, tr.teacher, tr.tx, tr.schedule, tr.objective, tr.mesh,
                           tr.state_shardings, tr.teacher_shardings, step_wrapper)
    update = int(jax.device_get(state.step))
    writer = MetricWriter(tr.workdir, total, initial_step=update, enabled=jax.process_index() == 0)
    teacher_config = None if tr.teacher is None else tr.teacher.config
    peak = device_peak_tflops(config.train.peak_tflops)
    rows = k * config.train.micro_batch_size
    window, flops, sequences, last, stopped_by, saved_at = None, 0.0, 0, {}, None, None
    window_start = time.perf_counter()
    all_finite = jax.jit(tree_all_finite)

    def last_checkpoint() -> Optional[str]:
        step = ckpt.last_saved()
        return None if step is None else f"update {step} in {ckpt.directory}"

    def save(force=False):
        nonlocal saved_at
        if not bool(all_finite(state)):  # never a non-finite state in a checkpoint
            ckpt.wait()
            raise optim.NonFiniteError(f"the train state at update {update} is not finite; it was not "
                                       f"saved. Last checkpoint: {last_checkpoint() or 'none'}")
        ckpt.save(update, state, tr.data.get_state(), tr.meta(), force=force)
        saved_at = update

    with runtime.PreemptionFlag() as stop, contextlib.ExitStack() as cleanup:
        cleanup.callback(ckpt.close)  # also on an error: no manager or writer left open
        cleanup.callback(writer.close)
        previous = None  # the last update's skip counters (device arrays), and its number
        previous_flag = None  # the last update's gathered stop flag (several processes)
        while update < total:
            local = data_lib.next_update(tr.data, k, tr.vocab.pad_id)
            state, metrics = jitted(state, tr.teacher_params, parallel.global_batch(local, tr.mesh))
            counters = metrics.pop("skip_counters")
            window = _sums(window, metrics)
            seq = local["input_ids"].shape[-1]
            flops += train_flops_per_token(tr.objective, tr.model.config, teacher_config, seq) * rows * seq
            sequences += rows
            update += 1
            writer.advance()
            # Nothing here waits for the update just dispatched, so the device always has the
            # next one queued: its skip counters are read at the next update (the previous
            # update's are done by then), or now where the loop syncs anyway (a log or a
            # checkpoint). A run of NaNs stops at most one update late.
            checkpoint_due = update % config.checkpoint.every_steps == 0 or update == total
            log_due = update % config.train.log_every == 0 or checkpoint_due
            read, previous = ((counters, update) if log_due else previous), (counters, update)
            skipped_total, consecutive = (0, 0) if read is None else (int(x) for x in jax.device_get(read[0]))
            too_many = consecutive >= config.train.max_consecutive_skips  # the one comparison
            if log_due or too_many:
                sums = {key: float(v) for key, v in jax.device_get(window).items()}
                last = window_summary(sums, time.perf_counter() - window_start, flops, sequences,
                                      jax.device_count(), peak)
                last.update(skipped_updates_total=skipped_total, consecutive_skips=consecutive)
                writer.write(update, last)
                window, flops, sequences, window_start = None, 0.0, 0, time.perf_counter()
            if too_many:
                ckpt.wait()  # the last checkpoint is complete before the run stops
                raise optim.too_many_skips(consecutive, config.train.max_consecutive_skips, read[1],
                                           last_checkpoint())
            if checkpoint_due:
                save()
            # The stop flag likewise: gathered across processes on the devices at every
            # update, read an update late (or now, where the loop syncs anyway), so every
            # process stops at the same update and none waits for the one just dispatched.
            flag = stop.gather()  # None with one process: its own flag is the answer
            if flag is None:
                stopping = stop.signal is not None
            else:
                seen, previous_flag = (flag if log_due or checkpoint_due else previous_flag), flag
                stopping = seen is not None and stop.read(seen)
            if stopping:
                stopped_by = stop.name
                logging.warning("%s: saving a checkpoint at update %d and stopping", stopped_by, update)
                if jax.process_index() == 0:
                    print(f"{stopped_by} received: checkpoint at update {update}, stopping; "
                          "run the same command to resume", flush=True)
                if saved_at != update:
                    save(force=True)
                break
        ckpt.wait()
    return state, {"update": update, "total_updates": total, "last_checkpoint": ckpt.last_saved(),
                   "stopped_by": stopped_by, "metrics": last}


def train(config, workdir: str, step_wrapper: Callable = lambda f: f) -> Tuple[TrainState, Dict[str, Any]]:
    """build + fit, holding the workdir's lock (one run per workdir)."""
    with runtime.hold_workdir(workdir):
        return fit(build(config, workdir), step_wrapper)


def run(config, workdir: str) -> Dict[str, Any]:
    """Modes distill and pretrain (main.py): the summary of `train`."""
    return train(config, workdir)[1]
