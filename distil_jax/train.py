"""TrainState, the optimizer, the train and eval steps, and the training loop.

One train step consumes one micro-batch: dynamic masking from the step's rng ->
teacher forward (frozen) -> student forward/backward -> the weighted losses ->
`optax.MultiSteps`, which applies an update every `batch_size / micro_batch_size`
micro-batches (the reference's gradient accumulation). The step is pure:
(state, teacher_params, batch) -> (state, metrics), jitted once with shardings.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Dict, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from distil_jax import experiment as experiment_lib
from distil_jax import hf, losses, parallel
from distil_jax.checkpoint import Checkpointer, PreemptionFlag
from distil_jax.masking import mask_tokens, token_probs_from_counts
from distil_jax.metrics import MetricWriter, device_peak_tflops, step_flops_per_token


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # micro-batches consumed
    params: Any
    opt_state: Any  # optax.MultiStepsState (accumulate="multisteps") or the inner optimizer's
    rng: jax.Array  # raw uint32[2] key: every micro-step's rng is fold_in(rng, step)


# --- optimizer ----------------------------------------------------------------------
def learning_rate_schedule(peak: float, total_updates: int, warmup_fraction: float) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then linear decay to 0 at `total_updates` (the reference's)."""
    warmup = int(math.ceil(warmup_fraction * total_updates))
    decay = optax.linear_schedule(peak, 0.0, max(total_updates - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
    """Weight decay on kernels and embeddings only, not on biases and LayerNorm (the reference's)."""
    def decays(path, _):
        return getattr(path[-1], "key", None) in ("kernel", "embedding")
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_config, total_updates: int):
    """(optimizer, schedule): clip -> AdamW, accumulating to train.batch_size sequences, with
    non-finite updates skipped and counted (`skip_non_finite`).

    accumulate="multisteps": `optax.MultiSteps` sees one micro-batch per call and
    applies the mean gradient every `batch_size / micro_batch_size` calls.
    accumulate="scan": no MultiSteps; `accumulated_train_step` averages the micro-batch
    gradients itself in one call and applies them once.
    """
    t = train_config
    schedule = learning_rate_schedule(t.learning_rate, total_updates, t.warmup_fraction)
    inner = optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                    weight_decay=t.weight_decay, mask=decay_mask))
    guarded = skip_non_finite(inner)
    if t.get("accumulate", "multisteps") == "scan":
        return guarded, schedule
    return optax.MultiSteps(guarded, every_k_schedule=t.batch_size // t.micro_batch_size), schedule


# --- non-finite updates ----------------------------------------------------------------
# The skip acts on whole updates: the accumulated gradient of an update is NaN or inf as
# soon as one of its micro-batches is, and then neither params nor AdamW's moments move.
# MultiSteps still counts the update (the schedule goes on) and starts a new accumulation.
# The loop stops the run after train.max_consecutive_skips skipped updates in a row.
def skip_non_finite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner`, whose non-finite updates are dropped and counted, however many in a row.

    optax.apply_if_finite with an unreachable limit: past its limit it would apply them."""
    return optax.apply_if_finite(inner, max_consecutive_errors=np.iinfo(np.int32).max)


def skip_counts(opt_state):
    """(skipped updates in all, skipped in a row up to now) from the optimizer state."""
    guard = opt_state.inner_opt_state if isinstance(opt_state, optax.MultiStepsState) else opt_state
    return guard.total_notfinite, guard.notfinite_count


def clear_accumulator(opt_state: optax.MultiStepsState) -> optax.MultiStepsState:
    """Zero the accumulator after an update: MultiSteps resets it as 0 * acc, which keeps a NaN."""
    fresh = opt_state.mini_step == 0
    acc = jax.tree.map(lambda a: jnp.where(fresh, jnp.zeros_like(a), a), opt_state.acc_grads)
    return opt_state._replace(acc_grads=acc)


def inject_nan(grads, metrics, poison):
    """Test hook (debug.nan_at_updates): NaN loss and gradients where `poison` is true."""
    factor = jnp.where(poison, jnp.nan, 1.0)
    grads = jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)
    return grads, {**metrics, "loss": metrics["loss"] * factor}


def finite_metrics(metrics):
    """(metrics with a non-finite micro-batch's values zeroed, 1.0 if they were all finite)."""
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
    return jax.tree.map(lambda v: jnp.where(ok, v, jnp.zeros_like(v)), metrics), ok.astype(jnp.float32)


def tree_all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                              if jnp.issubdtype(x.dtype, jnp.inexact)]))


# --- the objective ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Objective:
    """Static settings of the step: loss weights, masking, the vocabulary."""

    temperature: float
    alphas: Dict[str, float]  # loss_ce / loss_mlm / loss_cos / loss_mse -> weight
    restrict_ce_to_mask: bool
    masking: Dict[str, float]  # mask_prop, word_mask, word_keep, word_rand
    vocab_size: int
    mask_id: int
    special_ids: tuple
    token_probs: np.ndarray = dataclasses.field(hash=False, compare=False)
    loss_chunk: int = 0  # 0: whole logits (objective_terms); else fused_objective_terms' block

    @classmethod
    def from_config(cls, config, vocab) -> "Objective":
        d, m = config.distill, config.masking
        alphas = ({"loss_mlm": 1.0} if config.mode == "pretrain" else
                  {"loss_ce": d.alpha_ce, "loss_mlm": d.alpha_mlm, "loss_cos": d.alpha_cos,
                   "loss_mse": d.alpha_mse})
        return cls(temperature=d.temperature, alphas=alphas, restrict_ce_to_mask=d.restrict_ce_to_mask,
                   masking=dict(mask_prop=m.mask_prop, word_mask=m.word_mask, word_keep=m.word_keep,
                                word_rand=m.word_rand),
                   vocab_size=vocab.vocab_size, mask_id=vocab.mask_id, special_ids=tuple(vocab.special_ids),
                   token_probs=token_probs_from_counts(vocab.token_counts, m.smoothing, vocab.special_ids),
                   loss_chunk=config.train.loss_chunk)

    def mask(self, rng, input_ids, attention_mask):
        return mask_tokens(rng, input_ids, attention_mask, self.token_probs, self.special_ids,
                           self.mask_id, self.vocab_size, **self.masking)

    @property
    def head_rows(self) -> float:
        """The fraction of positions given logits (for model FLOPs): all, or the targets'."""
        fused_restricted = self.loss_chunk > 0 and (self.restrict_ce_to_mask or not self.uses_teacher)
        return self.masking["mask_prop"] if fused_restricted else 1.0

    @property
    def uses_teacher(self) -> bool:
        """Whether any loss weighs the teacher's outputs (not so for an MLM-only baseline)."""
        return any(self.alphas.get(k, 0.0) for k in ("loss_ce", "loss_cos", "loss_mse"))

    def max_targets(self, rows: int) -> int:
        """A static bound on the MLM targets among `rows` tokens (masking draws ceil(p x real))."""
        return min(rows, math.ceil(self.masking["mask_prop"] * rows) + 1)


def objective_terms(obj: Objective, out, teacher_out, labels, targets, attention_mask):
    """(total loss, metrics) of one micro-batch; the teacher's outputs are constants."""
    logits = out.logits
    terms = {"loss_mlm": losses.mlm_loss(logits, labels, targets)}
    metrics = {"mlm_accuracy": losses.accuracy(logits, labels, targets)}
    if teacher_out is not None:
        t_logits = jax.lax.stop_gradient(teacher_out.logits)
        t_hidden = jax.lax.stop_gradient(teacher_out.last_hidden_state)
        # KL rows: every real token (the reference's default) or only the MLM targets.
        ce_rows = targets if obj.restrict_ce_to_mask else attention_mask
        terms["loss_ce"] = losses.kd_loss(logits, t_logits, ce_rows, obj.temperature)
        terms["loss_cos"] = losses.cosine_loss(out.last_hidden_state, t_hidden, attention_mask)
        if obj.alphas.get("loss_mse", 0.0):
            terms["loss_mse"] = losses.mse_loss(logits, t_logits, ce_rows)
        s_const = jax.lax.stop_gradient(logits)
        metrics["kl_t1"] = losses.kd_loss(s_const, t_logits, ce_rows, 1.0)
        metrics["agreement"] = losses.accuracy(s_const, jnp.argmax(t_logits, -1), ce_rows)
    loss = sum(obj.alphas.get(k, 0.0) * v for k, v in terms.items())
    return loss, {**terms, **metrics, "loss": loss}


def fused_objective_terms(obj: Objective, s_hidden, s_head, t_hidden, t_head, labels, targets,
                          attention_mask):
    """`objective_terms` without whole [B, S, V] logits: the vocabulary projection only where
    a loss needs it, in blocks of `obj.loss_chunk` rows (`losses.vocab_terms`).

    s_head / t_head map last hidden rows [N, D] to `MaskedLM.head_inputs` (features,
    embedding, bias). The MLM loss needs only the targets' rows; with
    `restrict_ce_to_mask` (or no teacher) those rows are gathered first and nothing else
    is projected. Otherwise the KL covers every real token and all rows are projected.
    """
    b, s, _ = s_hidden.shape
    flat = lambda x: x.reshape(b * s, *x.shape[2:])  # noqa: E731
    hs, labels_f, mlm_w, kd_w = flat(s_hidden), flat(labels), flat(targets), flat(attention_mask)
    ht = None if t_hidden is None else flat(jax.lax.stop_gradient(t_hidden))
    if obj.restrict_ce_to_mask or t_hidden is None:
        k = obj.max_targets(b * s)
        idx = jnp.nonzero(mlm_w, size=k, fill_value=0)[0]
        mlm_w = kd_w = (jnp.arange(k) < jnp.sum(mlm_w)).astype(jnp.float32)
        hs, labels_f = hs[idx], labels_f[idx]
        ht = None if ht is None else ht[idx]
    feat, *s_proj = s_head(hs)
    t_feat, t_proj = None, None
    if ht is not None:
        t_feat, *t_proj = jax.lax.stop_gradient(t_head(ht))
    vocab_alphas = {k: obj.alphas.get(k, 0.0) for k in ("loss_mlm", "loss_ce", "loss_mse")
                    if k in obj.alphas and (k == "loss_mlm" or t_feat is not None)}
    if not obj.alphas.get("loss_mse", 0.0):
        vocab_alphas.pop("loss_mse", None)
    loss, terms = losses.vocab_terms(feat, tuple(s_proj), labels_f, mlm_w, t_feat, t_proj, kd_w,
                                     obj.temperature, obj.loss_chunk, alphas=vocab_alphas)
    if t_hidden is not None:
        terms["loss_cos"] = losses.cosine_loss(s_hidden, jax.lax.stop_gradient(t_hidden), attention_mask)
        loss = loss + obj.alphas.get("loss_cos", 0.0) * terms["loss_cos"]
    return loss, {**terms, "loss": loss}


def loss_and_grads(params, teacher_params, masked_ids, attention_mask, labels, targets,
                   dropout_rng, *, model, teacher, obj: Objective):
    """(metrics, gradients) of one masked micro-batch; the teacher runs outside the gradient."""
    fused = obj.loss_chunk > 0
    teacher_out = t_head = None
    if teacher is not None and obj.uses_teacher:  # no teacher forward when no loss reads it
        teacher_out = teacher.apply({"params": teacher_params}, masked_ids, attention_mask,
                                    deterministic=True, compute_logits=not fused)
        t_head = lambda h: teacher.apply({"params": teacher_params}, h,  # noqa: E731
                                         method=type(teacher).head_inputs)

    def loss_fn(p):
        out = model.apply({"params": p}, masked_ids, attention_mask, deterministic=False,
                          rngs={"dropout": dropout_rng}, compute_logits=not fused)
        if not fused:
            return objective_terms(obj, out, teacher_out, labels, targets, attention_mask)
        s_head = lambda h: model.apply({"params": p}, h, method=type(model).head_inputs)  # noqa: E731
        t_hidden = None if teacher_out is None else teacher_out.last_hidden_state
        return fused_objective_terms(obj, out.last_hidden_state, s_head, t_hidden, t_head, labels,
                                     targets, attention_mask)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return metrics, grads


def _micro_step(state_rng, step, batch, params, teacher_params, *, model, teacher, obj: Objective,
                poison=None):
    """Mask with fold_in(rng, step), then loss and gradients of one micro-batch.

    Returns (metrics, grads, counts): a non-finite micro-batch's metrics are zeroed and
    `micro_steps` (0 or 1) says which were finite; `poison` is the NaN test hook.
    """
    rng = jax.random.fold_in(state_rng, step)
    mask_rng, dropout_rng = jax.random.split(rng)
    am = batch["attention_mask"]
    masked, labels, targets = obj.mask(mask_rng, batch["input_ids"], am)
    metrics, grads = loss_and_grads(params, teacher_params, masked, am, labels, targets,
                                    dropout_rng, model=model, teacher=teacher, obj=obj)
    if poison is not None:
        grads, metrics = inject_nan(grads, metrics, poison)
    metrics, finite = finite_metrics(metrics)
    counts = {"micro_steps": finite, "real_tokens": jnp.sum(am).astype(jnp.float32),
              "targets": jnp.sum(targets).astype(jnp.float32)}
    return metrics, grads, counts


def _poison(update_index, nan_at_updates: tuple):
    """The test hook: is the update numbered update_index + 1 in debug.nan_at_updates?"""
    return jnp.isin(update_index + 1, jnp.asarray(nan_at_updates)) if nan_at_updates else None


def train_step(state: TrainState, teacher_params, batch, *, model, teacher, tx, schedule,
               obj: Objective, accumulation: int, nan_at_updates: tuple = ()):
    """One micro-batch: mask, teacher forward, student forward/backward, MultiSteps update."""
    opt = state.opt_state
    metrics, grads, counts = _micro_step(state.rng, state.step, batch, state.params, teacher_params,
                                         model=model, teacher=teacher, obj=obj,
                                         poison=_poison(opt.gradient_step, nan_at_updates))
    emit = (opt.mini_step == accumulation - 1).astype(jnp.float32)  # this call ends an update
    # MultiSteps keeps the running mean of the micro-batch gradients; its value at the
    # last micro-batch is the gradient of the update, whose norm is worth watching.
    mean_grads = jax.tree.map(lambda a, g: a + (g.astype(a.dtype) - a) / (opt.mini_step + 1),
                              opt.acc_grads, grads)
    updates, new_opt = tx.update(grads, opt, state.params)
    new_opt = clear_accumulator(new_opt)
    skipped = (skip_counts(new_opt)[0] - skip_counts(opt)[0]).astype(jnp.float32)
    applied = emit * (1.0 - skipped)
    metrics.update(grad_norm=jnp.where(applied > 0, optax.tree.norm(mean_grads), 0.0),
                   lr=applied * schedule(opt.gradient_step), updates=applied, skipped_updates=skipped,
                   **counts)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=new_opt), metrics


def accumulated_train_step(state: TrainState, teacher_params, batches, *, model, teacher, tx,
                           schedule, obj: Objective, accumulation: int, nan_at_updates: tuple = ()):
    """One whole update in one call: `batches` holds the update's micro-batches stacked
    [accumulation, micro_batch, seq]; a scan sums their gradients, then clip -> AdamW
    runs once on the mean (skipped and counted when it is not finite). The same masks,
    dropout and update as `accumulation` calls of `train_step` with MultiSteps (equal to
    float tolerance), without running the optimizer and touching every parameter at
    each micro-batch.
    """
    update_index = state.step // accumulation
    poison = _poison(update_index, nan_at_updates)

    def micro(grad_sum, xs):
        i, batch = xs
        metrics, grads, counts = _micro_step(state.rng, state.step + i, batch, state.params,
                                             teacher_params, model=model, teacher=teacher, obj=obj,
                                             poison=poison)
        return jax.tree.map(jnp.add, grad_sum, grads), {**metrics, **counts}

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grad_sum, per_micro = jax.lax.scan(micro, zeros, (jnp.arange(accumulation), batches))
    grads = jax.tree.map(lambda g: g / accumulation, grad_sum)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    skipped = (skip_counts(new_opt)[0] - skip_counts(state.opt_state)[0]).astype(jnp.float32)
    applied = 1.0 - skipped
    metrics = jax.tree.map(lambda m: jnp.sum(m, axis=0), per_micro)
    metrics.update(grad_norm=jnp.where(applied > 0, optax.tree.norm(grads), 0.0),
                   lr=applied * schedule(update_index), updates=applied, skipped_updates=skipped)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + accumulation, params=params, opt_state=new_opt), metrics


# --- metrics over a logging window ----------------------------------------------------
_PER_UPDATE = ("grad_norm", "lr")
_COUNTS = ("updates", "skipped_updates", "micro_steps", "real_tokens", "targets")


def window_summary(sums: Dict[str, float], seconds: float, flops: float, sequences: int,
                   num_devices: int, peak_tflops: Optional[float]) -> Dict[str, float]:
    """Means of a window's summed step metrics, plus throughput (model FLOPs per device)."""
    micro, updates = sums["micro_steps"], max(sums["updates"], 1.0)  # finite ones, applied ones
    out = {k: v / micro if micro else None for k, v in sums.items() if k not in _PER_UPDATE + _COUNTS}
    out.update({k: sums[k] / updates for k in _PER_UPDATE})
    out["skipped_updates"] = sums["skipped_updates"]
    updates = max(sums["updates"] + sums["skipped_updates"], 1.0)
    tflops = flops / seconds / 1e12 / num_devices
    out.update(tokens_per_s=sums["real_tokens"] / seconds, sequences_per_s=sequences / seconds,
               step_time_s=seconds / updates, tflops_per_device=tflops,
               mfu=(tflops / peak_tflops) if peak_tflops else None)
    return out


class NonFiniteError(FloatingPointError):
    """Too many non-finite updates in a row, or a non-finite state about to be saved."""


def check_skips(consecutive: int, limit: int, update: int, last_checkpoint: Optional[int],
                directory: str) -> None:
    if consecutive >= limit:
        raise NonFiniteError(
            f"{consecutive} updates in a row (the last at update {update}) had a non-finite loss "
            f"or gradients and were skipped (train.max_consecutive_skips={limit}); stopping. "
            f"Last checkpoint: {_describe_checkpoint(last_checkpoint, directory)}. Lower "
            "train.learning_rate or check the data, then run the same command to resume")


def _describe_checkpoint(step: Optional[int], directory: str) -> str:
    return "none" if step is None else f"micro-step {step} in {directory}"


def add_metrics(acc, metrics):
    return metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)


def stacks_micro_batches(config) -> bool:
    """accumulate="scan": one call takes an update's micro-batches stacked [k, rows, seq]."""
    return config.train.accumulate == "scan"


def micro_batches_per_call(config) -> int:
    """Micro-batches one call of the compiled step consumes (all of an update's with scan)."""
    t = config.train
    return t.batch_size // t.micro_batch_size if stacks_micro_batches(config) else 1


def compiled_step(run: "Run", step_wrapper: Callable = lambda f: f):
    """The jitted step of `run` (train_step, or accumulated_train_step with accumulate="scan"):
    (state, teacher_params, batch) -> (state, metrics), state buffers donated."""
    exp = run.exp
    stacked = stacks_micro_batches(exp.config)
    step = accumulated_train_step if stacked else train_step
    settings = dict(model=exp.model, teacher=exp.teacher, tx=run.tx, schedule=run.schedule,
                    obj=run.objective, accumulation=exp.accumulation,
                    nan_at_updates=tuple(exp.config.debug.nan_at_updates))

    def step_fn(state, teacher_params, batch):
        return step(state, teacher_params, batch, **settings)

    rows = parallel.batch_sharding(exp.mesh, stacked=stacked)
    batch_sh = {"input_ids": rows, "attention_mask": rows}
    return jax.jit(step_wrapper(step_fn), in_shardings=(run.state_shardings, exp.teacher_shardings, batch_sh),
                   out_shardings=(run.state_shardings, parallel.replicated(exp.mesh)), donate_argnums=0)


def next_local_batch(data, per_call: int, pad_id: int = 0, stacked: bool = False):
    """The next micro-batch, or (stacked) the next `per_call` as [per_call, rows, seq], each
    padded (pad id, attention mask 0) to the longest of them."""
    if not stacked:
        return next(data)
    micro = [next(data) for _ in range(per_call)]
    seq = max(m["input_ids"].shape[1] for m in micro)

    def pad(x, value):
        return np.pad(x, [(0, 0), (0, seq - x.shape[1])], constant_values=value)
    return {k: np.stack([pad(m[k], pad_id if k == "input_ids" else 0) for m in micro]) for k in micro[0]}


# --- the loop -----------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """An experiment with its optimizer, state shardings and checkpoints."""

    exp: experiment_lib.Experiment
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    objective: Objective
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs with shardings, for restore
    checkpointer: Checkpointer
    create: Callable[[Any], TrainState]  # params -> fresh state


def make_run(config, workdir: str, split: str = "train") -> Run:
    exp = experiment_lib.build(config, workdir, split=split)
    tx, schedule = make_optimizer(config.train, exp.total_updates)
    replicated = parallel.replicated(exp.mesh)

    def create(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(config.train.seed))

    abstract = jax.eval_shape(create, jax.eval_shape(exp.initial_params))
    opt_sh = optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, abstract.opt_state, exp.param_shardings,
        transform_non_params=lambda _: replicated)
    state_sh = TrainState(step=replicated, params=exp.param_shardings, opt_state=opt_sh, rng=replicated)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, state_sh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint.keep,
                        config.checkpoint.async_save, config.checkpoint.on_save_error)
    return Run(exp, tx, schedule, Objective.from_config(config, exp.vocab), state_sh, abstract, ckpt,
               create)


def restore_or_init(run: Run):
    """(state, restored checkpoint step or None): the newest checkpoint, else a fresh state."""
    restored = run.checkpointer.restore_latest(run.abstract_state, run.exp.meta())
    if restored is not None:
        state, data_state, step = restored
        run.exp.train_data.set_state(data_state)
        logging.info("resumed from checkpoint %d (update %d)", step, step // run.exp.accumulation)
        return state, step
    return jax.jit(run.create, out_shardings=run.state_shardings)(run.exp.initial_params()), None


def train_and_evaluate(config, workdir: str, step_wrapper: Callable = lambda f: f) -> Dict[str, Any]:
    """Train until config's last update (or a SIGTERM/SIGINT), checkpointing on the way.

    `step_wrapper` wraps the pure step before jit (tests use chex.assert_max_traces).
    """
    run = make_run(config, workdir)
    exp, ckpt = run.exp, run.checkpointer
    state, _ = restore_or_init(run)
    mesh, accum, total_updates = exp.mesh, exp.accumulation, exp.total_updates
    jitted = compiled_step(run, step_wrapper)
    per_call, stacked = micro_batches_per_call(config), stacks_micro_batches(config)

    is_main = jax.process_index() == 0
    micro = int(jax.device_get(state.step))
    writer = MetricWriter(workdir, total_updates, initial_step=micro // accum, enabled=is_main)
    teacher_config = exp.teacher.config if exp.teacher is not None and run.objective.uses_teacher else None
    peak = device_peak_tflops(config.train.peak_tflops)
    window, flops, sequences, last = None, 0.0, 0, {}
    window_start = time.perf_counter()
    stopped_by = None
    all_finite = jax.jit(tree_all_finite)

    def save(force=False):
        if not bool(all_finite(state)):  # never a non-finite state in a checkpoint
            ckpt.wait()
            raise NonFiniteError(
                f"the train state at micro-step {micro} is not finite; it was not saved. Last "
                f"checkpoint: {_describe_checkpoint(ckpt.last_saved(), ckpt.directory)}")
        ckpt.save(micro, state, exp.train_data.get_state(), exp.meta(), force=force)

    def stop_after_skips(consecutive, update):
        if consecutive >= config.train.max_consecutive_skips:
            ckpt.wait()  # the last checkpoint is complete before the run stops
            writer.close()
            check_skips(consecutive, config.train.max_consecutive_skips, update, ckpt.last_saved(),
                        ckpt.directory)

    with PreemptionFlag() as stop:
        while micro < total_updates * accum:
            local = next_local_batch(exp.train_data, per_call, exp.vocab.pad_id, stacked)
            batch = parallel.global_batch(local, mesh, stacked=stacked)
            state, metrics = jitted(state, exp.teacher_params, batch)
            window = add_metrics(window, metrics)
            seq = local["input_ids"].shape[-1]
            rows = per_call * config.train.micro_batch_size
            flops += step_flops_per_token(exp.model_config, teacher_config, seq,
                                          run.objective.head_rows) * rows * seq
            sequences += rows
            micro += per_call
            if micro % accum == 0:
                update = micro // accum
                writer.advance()
                is_last = update == total_updates
                # One host sync per update, so that a run of NaNs stops where it happens.
                skipped_total, consecutive = (int(x) for x in jax.device_get(skip_counts(state.opt_state)))
                too_many = consecutive >= config.train.max_consecutive_skips
                if (update % config.train.log_every == 0 or is_last or too_many
                        or update % config.checkpoint.every_steps == 0):
                    sums = {k: float(v) for k, v in jax.device_get(window).items()}
                    last = window_summary(sums, time.perf_counter() - window_start, flops, sequences,
                                          jax.device_count(), peak)
                    last.update(skipped_updates_total=skipped_total, consecutive_skips=consecutive)
                    writer.write(update, last)
                    window, flops, sequences, window_start = None, 0.0, 0, time.perf_counter()
                stop_after_skips(consecutive, update)
                if update % config.checkpoint.every_steps == 0 or is_last:
                    save()
            if stop.agreed():
                stopped_by = "SIGINT" if stop.signal == 2 else "SIGTERM"
                logging.warning("%s: saving a checkpoint at micro-step %d and stopping", stopped_by, micro)
                if is_main:
                    print(f"{stopped_by} received: checkpoint at step {micro / accum:g}, stopping; "
                          "run the same command to resume", flush=True)
                save(force=True)
                break
    ckpt.wait()
    writer.close()
    return {"update": micro // accum, "micro_step": micro, "last_checkpoint": ckpt.last_saved(),
            "stopped_by": stopped_by, "metrics": last, "state": state,
            "teacher_params": exp.teacher_params}


def host_params(params):
    """Params as numpy on this host (gathered across processes when there are several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def restore_params(run: Run):
    """Params of the newest checkpoint; a clear error when there is none."""
    restored = run.checkpointer.restore_latest(run.abstract_state, run.exp.meta())
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {run.checkpointer.directory}; train first "
                                "(mode distill or pretrain) with the same --workdir")
    return restored[0].params, restored[2]


def as_trained(config, workdir: str):
    """The config with the mode of the run whose checkpoints are in workdir (for eval/export)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpt = Checkpointer(ckpt_dir, keep=1, async_save=False) if os.path.isdir(ckpt_dir) else None
    steps = ckpt.all_steps() if ckpt else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train first (mode distill or "
                                "pretrain) with the same --workdir")
    trained = ckpt.read_meta(steps[-1])["mode"]
    config = config.copy_and_resolve_references()
    config.mode = trained
    return config


def export_checkpoint(config, workdir: str) -> str:
    """The newest checkpoint as a Hugging Face directory (DistilBERT student, or BERT in pretrain)."""
    run = make_run(as_trained(config, workdir), workdir)
    params, _ = restore_params(run)
    params = host_params(params)
    out_dir = config.export.dir or os.path.join(workdir, "hf")
    if jax.process_index() == 0:
        hf.save_hf_model(params, run.exp.model_config, out_dir, tokenizer=run.exp.vocab.tokenizer)
    return out_dir
