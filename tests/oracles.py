"""Second implementations that prove the product's, used by the tests only.

- `whole_logits_loss_and_grads`: the objective from whole [B, S, V] logits (the plain
  losses.py functions) differentiated by autodiff: the oracle of the fused, blocked
  vocabulary terms and their closed-form gradient (objective.py).
- `multisteps_updates`: accumulation as `optax.MultiSteps` does it, one micro-batch per
  call: the oracle of the update over stacked micro-batches (step.py).
"""

import jax
import jax.numpy as jnp
import optax

from distil_jax import losses, step
from distil_jax.objective import REPRESENTATION_TERMS


def whole_logits_terms(obj, out, teacher_out, labels, targets, attention_mask):
    """(total loss, metrics) of one micro-batch from whole logits; the teacher's are constants."""
    logits, w = out.logits, obj.weights
    terms = {"loss_mlm": losses.mlm_loss(logits, labels, targets)}
    metrics = {"mlm_accuracy": losses.accuracy(logits, labels, targets)}
    weights = {"loss_mlm": w.mlm}
    if teacher_out is not None:
        t_logits = jax.lax.stop_gradient(teacher_out.logits)
        ce_rows = targets if obj.restrict_ce_to_mask else attention_mask
        terms["loss_ce"] = losses.kd_loss(logits, t_logits, ce_rows, obj.temperature)
        weights["loss_ce"] = w.ce
        if w.mse:
            terms["loss_mse"] = losses.mse_loss(logits, t_logits, ce_rows)
            weights["loss_mse"] = w.mse
        for name, term in REPRESENTATION_TERMS.items():
            terms[f"loss_{name}"] = term(out, jax.lax.stop_gradient(teacher_out), attention_mask)
            weights[f"loss_{name}"] = getattr(w, name)
        s_const = jax.lax.stop_gradient(logits)
        metrics["kl_t1"] = losses.kd_loss(s_const, t_logits, ce_rows, 1.0)
        metrics["agreement"] = losses.accuracy(s_const, jnp.argmax(t_logits, -1), ce_rows)
    loss = sum(weights[k] * v for k, v in terms.items())
    return loss, {**terms, **metrics, "loss": loss}


def whole_logits_loss_and_grads(params, teacher_params, masked_ids, attention_mask, labels, targets,
                                dropout_rng, *, model, teacher, obj):
    """objective.loss_and_grads, computed from whole logits by autodiff."""
    teacher_out = None
    if teacher is not None and obj.weights.uses_teacher:
        teacher_out = teacher.apply({"params": teacher_params}, masked_ids, attention_mask, deterministic=True)

    def loss_fn(p):
        out = model.apply({"params": p}, masked_ids, attention_mask, deterministic=False,
                          rngs={"dropout": dropout_rng})
        return whole_logits_terms(obj, out, teacher_out, labels, targets, attention_mask)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return metrics, grads


def multisteps_updates(trainer, params, rng, micro_batches):
    """Params after `len(micro_batches) / k` updates by optax.MultiSteps over `trainer.tx`,
    one micro-batch per call with the masks the step draws (fold_in(rng, micro-step));
    and each micro-batch's metrics."""
    tx = optax.MultiSteps(trainer.tx, every_k_schedule=trainer.accumulation)
    opt_state = tx.init(params)
    grads_fn = jax.jit(lambda r, b, p: step.micro_batch_grads(
        r, b, p, trainer.teacher_params, model=trainer.model, teacher=trainer.teacher, obj=trainer.objective))
    update = jax.jit(tx.update)
    metrics = []
    for i, batch in enumerate(micro_batches):
        grads, m = grads_fn(jax.random.fold_in(rng, i), batch, params)
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics.append(m)
    return params, metrics
