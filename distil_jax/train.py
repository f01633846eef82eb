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
    opt_state: optax.MultiStepsState
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
    """(MultiSteps(clip -> AdamW), schedule) accumulating to train.batch_size sequences."""
    t = train_config
    schedule = learning_rate_schedule(t.learning_rate, total_updates, t.warmup_fraction)
    inner = optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                    weight_decay=t.weight_decay, mask=decay_mask))
    return optax.MultiSteps(inner, every_k_schedule=t.batch_size // t.micro_batch_size), schedule


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
                   token_probs=token_probs_from_counts(vocab.token_counts, m.smoothing, vocab.special_ids))

    def mask(self, rng, input_ids, attention_mask):
        return mask_tokens(rng, input_ids, attention_mask, self.token_probs, self.special_ids,
                           self.mask_id, self.vocab_size, **self.masking)


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
        metrics["kl_t1"] = losses.kd_loss(s_const, t_logits, attention_mask, 1.0)
        metrics["agreement"] = losses.accuracy(s_const, jnp.argmax(t_logits, -1), attention_mask)
    loss = sum(obj.alphas.get(k, 0.0) * v for k, v in terms.items())
    return loss, {**terms, **metrics, "loss": loss}


def loss_and_grads(params, teacher_params, masked_ids, attention_mask, labels, targets,
                   dropout_rng, *, model, teacher, obj: Objective):
    """(metrics, gradients) of one masked micro-batch; the teacher runs outside the gradient."""
    teacher_out = None
    if teacher is not None:
        teacher_out = teacher.apply({"params": teacher_params}, masked_ids, attention_mask,
                                    deterministic=True)

    def loss_fn(p):
        out = model.apply({"params": p}, masked_ids, attention_mask, deterministic=False,
                          rngs={"dropout": dropout_rng})
        return objective_terms(obj, out, teacher_out, labels, targets, attention_mask)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return metrics, grads


def train_step(state: TrainState, teacher_params, batch, *, model, teacher, tx, schedule,
               obj: Objective, accumulation: int):
    """One micro-batch: mask, teacher forward, student forward/backward, MultiSteps update."""
    rng = jax.random.fold_in(state.rng, state.step)
    mask_rng, dropout_rng = jax.random.split(rng)
    am = batch["attention_mask"]
    masked, labels, targets = obj.mask(mask_rng, batch["input_ids"], am)
    metrics, grads = loss_and_grads(state.params, teacher_params, masked, am, labels, targets,
                                    dropout_rng, model=model, teacher=teacher, obj=obj)
    opt = state.opt_state
    emit = (opt.mini_step == accumulation - 1).astype(jnp.float32)  # this call applies an update
    # MultiSteps keeps the running mean of the micro-batch gradients; its value at the
    # last micro-batch is the gradient of the update, whose norm is worth watching.
    mean_grads = jax.tree.map(lambda a, g: a + (g.astype(a.dtype) - a) / (opt.mini_step + 1),
                              opt.acc_grads, grads)
    metrics.update(grad_norm=emit * optax.tree.norm(mean_grads),
                   lr=emit * schedule(opt.gradient_step), updates=emit, micro_steps=1.0,
                   real_tokens=jnp.sum(am).astype(jnp.float32),
                   targets=jnp.sum(targets).astype(jnp.float32))
    updates, new_opt = tx.update(grads, opt, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=new_opt), metrics


# --- metrics over a logging window ----------------------------------------------------
_PER_UPDATE = ("grad_norm", "lr")
_COUNTS = ("updates", "micro_steps", "real_tokens", "targets")


def window_summary(sums: Dict[str, float], seconds: float, flops: float, sequences: int,
                   num_devices: int, peak_tflops: Optional[float]) -> Dict[str, float]:
    """Means of a window's summed step metrics, plus throughput (model FLOPs per device)."""
    micro, updates = sums["micro_steps"], max(sums["updates"], 1.0)
    out = {k: v / micro for k, v in sums.items() if k not in _PER_UPDATE + _COUNTS}
    out.update({k: sums[k] / updates for k in _PER_UPDATE})
    tflops = flops / seconds / 1e12 / num_devices
    out.update(tokens_per_s=sums["real_tokens"] / seconds, sequences_per_s=sequences / seconds,
               step_time_s=seconds / updates, tflops_per_device=tflops,
               mfu=(tflops / peak_tflops) if peak_tflops else None)
    return out


def check_finite(metrics: Dict[str, float], step: int, last_checkpoint: Optional[int]) -> None:
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(
            f"non-finite loss ({metrics['loss']}) at update {step}; nothing after the last "
            f"checkpoint ({last_checkpoint}) is kept. Lower train.learning_rate or check the data")


def add_metrics(acc, metrics):
    return metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)


def jit_train_step(step_fn: Callable, state_shardings, teacher_shardings, batch_shardings,
                   out_metrics_sharding):
    return jax.jit(step_fn, in_shardings=(state_shardings, teacher_shardings, batch_shardings),
                   out_shardings=(state_shardings, out_metrics_sharding), donate_argnums=0)



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
                        config.checkpoint.async_save)
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
    state, last_ckpt = restore_or_init(run)
    mesh, accum, total_updates = exp.mesh, exp.accumulation, exp.total_updates
    replicated = parallel.replicated(mesh)

    def step_fn(state, teacher_params, batch):
        return train_step(state, teacher_params, batch, model=exp.model, teacher=exp.teacher,
                          tx=run.tx, schedule=run.schedule, obj=run.objective, accumulation=accum)

    batch_sh = {"input_ids": parallel.batch_sharding(mesh), "attention_mask": parallel.batch_sharding(mesh)}
    jitted = jit_train_step(step_wrapper(step_fn), run.state_shardings, exp.teacher_shardings,
                            batch_sh, replicated)

    is_main = jax.process_index() == 0
    micro = int(jax.device_get(state.step))
    writer = MetricWriter(workdir, total_updates, initial_step=micro // accum, enabled=is_main)
    teacher_config = exp.teacher.config if exp.teacher is not None else None
    peak = device_peak_tflops(config.train.peak_tflops)
    window, flops, sequences, last = None, 0.0, 0, {}
    window_start = time.perf_counter()
    stopped_by = None

    def save(force=False):
        nonlocal last_ckpt
        if ckpt.save(micro, state, exp.train_data.get_state(), exp.meta(), force=force):
            last_ckpt = micro

    with PreemptionFlag() as stop:
        while micro < total_updates * accum:
            local = next(exp.train_data)
            batch = parallel.global_batch(local, mesh)
            state, metrics = jitted(state, exp.teacher_params, batch)
            window = add_metrics(window, metrics)
            seq = local["input_ids"].shape[1]
            flops += step_flops_per_token(exp.model_config, teacher_config, seq) * config.train.micro_batch_size * seq
            sequences += config.train.micro_batch_size
            micro += 1
            if micro % accum == 0:
                update = micro // accum
                writer.advance()
                is_last = update == total_updates
                if update % config.train.log_every == 0 or is_last or update % config.checkpoint.every_steps == 0:
                    sums = {k: float(v) for k, v in jax.device_get(window).items()}
                    last = window_summary(sums, time.perf_counter() - window_start, flops, sequences,
                                          jax.device_count(), peak)
                    check_finite(last, update, last_ckpt)
                    writer.write(update, last)
                    window, flops, sequences, window_start = None, 0.0, 0, time.perf_counter()
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
    return {"update": micro // accum, "micro_step": micro, "last_checkpoint": last_ckpt,
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
