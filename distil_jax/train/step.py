"""The train state and the update: one jitted call over an update's micro-batches.

An update takes its k micro-batches stacked [k, rows, seq] (k = 1 is the same code).
For each, in sequence (`optax.microbatch`, a loop that sums), the objective with the key
fold_in(rng, update * k + i): for masked LM distillation (objective.Objective) dynamic
masking -> teacher forward (frozen) -> student forward and backward -> the terms; for a
task (task.TaskObjective) the same without masking, on the task's head. Then
clip -> AdamW once, on the mean of the k gradients (the reference's gradient
accumulation), skipped whole when it is not finite. The step is pure:
(state, teacher_params, batches) -> (state, metrics), where metrics are sums over the
micro-batches (the loop divides by the counts).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from distil_jax import parallel
from distil_jax.terms import TrainingObjective
from distil_jax.train import optim


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # updates done (applied or skipped)
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key: micro-batch i of update u masks with fold_in(rng, u * k + i)


def finite_metrics(metrics):
    """(metrics with a non-finite micro-batch's values zeroed, 1.0 if they were all finite)."""
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
    return jax.tree.map(lambda v: jnp.where(ok, v, jnp.zeros_like(v)), metrics), ok.astype(jnp.float32)


def tree_all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                              if jnp.issubdtype(x.dtype, jnp.inexact)]))


def micro_batch_grads(rng, batch, params, teacher_params, *, model, teacher, obj: TrainingObjective):
    """(gradients, metrics) of one micro-batch by `obj` (objective.Objective: masked LM
    distillation; task.TaskObjective: a task), with the random key `rng`, in the global
    view: what an update with k = 1 computes (train_step), for the oracles of the tests.

    A non-finite micro-batch's metrics are zeroed and `finite_micro_batches` (0 or 1) says
    whether it was finite; `real_tokens` and the objective's counts (`targets`,
    `examples`) count what the means divide by."""
    inputs, dropout_rng, counts = obj.prepare(rng, batch)
    grads, metrics = _grads(inputs, dropout_rng, params, teacher_params, model=model, teacher=teacher, obj=obj)
    return grads, {**metrics, **counts, "real_tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32)}


def _grads(inputs, dropout_rng, params, teacher_params, *, model, teacher, obj):
    """One prepared micro-batch on this device group's rows: (its partial gradients, the
    micro-batch's metrics, zeroed when not finite, with finite_micro_batches 0 or 1)."""
    metrics, grads = obj.grads(inputs, dropout_rng, params, teacher_params, model=model, teacher=teacher)
    metrics, finite = finite_metrics(parallel.batch_psum(metrics))  # a few scalars
    return grads, {**metrics, "finite_micro_batches": finite}


def train_step(state: TrainState, teacher_params, batches, *, model, teacher, tx, schedule, obj, mesh=None):
    """One update over `batches` [k, rows, seq]: the summed micro-batch gradients, averaged,
    then clip -> AdamW (skipped and counted when not finite).

    Each micro-batch is prepared whole (masking draws its targets over all its rows); the
    k micro-batches then run on each data-parallel device group's own rows
    (parallel.per_device over `mesh`), each group summing its partial gradients locally,
    and the groups' sums are added once, after the k-th: one gradient reduction per update,
    whatever k (the losses' denominators and the metrics, a few scalars, are summed per
    micro-batch)."""
    k = batches["input_ids"].shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(state.rng, state.step * k + i))(jnp.arange(k))
    inputs, dropout_keys, counts = jax.lax.map(lambda x: obj.prepare(*x), (keys, batches))
    counts = {name: jnp.sum(v) for name, v in counts.items()}
    counts["real_tokens"] = jnp.sum(batches["attention_mask"]).astype(jnp.float32)

    def accumulate(params, teacher_params, inputs, dropout_keys):
        def one(index, x):  # index [1] and x [1, rows, ...]: one of the k micro-batches
            return _grads(jax.tree.map(lambda v: v[0], x), dropout_keys[index[0]], params, teacher_params,
                          model=model, teacher=teacher, obj=obj)

        summed = optax.microbatch(one, argnums=(0, 1), microbatch_size=1,
                                  accumulator=optax.microbatching.AccumulationType.SUM)
        grad_sum, metrics = summed(jnp.arange(k), inputs)
        return parallel.batch_psum(grad_sum), metrics  # the update's one gradient reduction

    if mesh is not None:
        accumulate = parallel.per_device(accumulate, mesh, in_specs=(P(), P(), P(None, "data"), P()),
                                         out_specs=(P(), P()))
    grad_sum, metrics = accumulate(state.params, teacher_params, inputs, dropout_keys)
    metrics.update(counts)
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    skipped_before = optim.skip_counts(state.opt_state)[0]
    skipped = (optim.skip_counts(new_opt)[0] - skipped_before).astype(jnp.float32)
    applied = 1.0 - skipped
    # AdamW's schedule counts the applied updates only (a skipped one leaves its state as it was).
    metrics.update(grad_norm=jnp.where(applied > 0, optax.tree.norm(grads), 0.0),
                   lr=applied * schedule(state.step - skipped_before), updates=applied, skipped_updates=skipped,
                   # (skipped in all, skipped in a row) after this update: read by the loop, not summed
                   skip_counters=jnp.stack(optim.skip_counts(new_opt)))
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=new_opt), metrics


def compiled_step(model, teacher, tx, schedule, obj, mesh, state_shardings,
                  teacher_shardings, step_wrapper: Callable = lambda f: f):
    """The jitted update: (state, teacher_params, batches) -> (state, metrics), the state's
    buffers donated. `step_wrapper` wraps the pure step before jit (e.g. a trace counter)."""
    def step_fn(state, teacher_params, batches):
        return train_step(state, teacher_params, batches, model=model, teacher=teacher, tx=tx,
                          schedule=schedule, obj=obj, mesh=mesh)

    rows = parallel.batch_sharding(mesh)  # every array of the batches: [k, rows, ...]
    return jax.jit(step_wrapper(step_fn), in_shardings=(state_shardings, teacher_shardings, rows),
                   out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0)
