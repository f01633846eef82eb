"""Second implementations that prove the product's, used by the tests only.

- `whole_logits_loss_and_grads`: the objective from whole [B, S, V] logits (the plain
  losses.py functions) differentiated by autodiff: the oracle of the fused, blocked
  vocabulary terms and their closed-form gradient (objective.py).
  The layer-pair terms are written out again (`layer_terms`), the attention KL from the
  models' own attention probabilities rather than from their queries and keys.
- `multisteps_updates`: accumulation as `optax.MultiSteps` does it, one micro-batch per
  call: the oracle of the update over stacked micro-batches (step.py).
- `mean_gradient`: an update's gradient as the plain mean of its k micro-batches'
  gradients, each taken in the global view (no mesh), one at a time, summed in float64 on
  the host; with `recording_tx`, an optimizer whose state is the gradient it was given,
  it proves the gradient the step hands the optimizer (the AdamW comparisons see a scale
  error only through weights whose gradient is near AdamW's eps).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distil_jax.train import losses, step
from distil_jax.models import apply_recording
from distil_jax.train.objective import REPRESENTATION_TERMS


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
        same_width = out.last_hidden_state.shape == teacher_out.last_hidden_state.shape
        for name, term in REPRESENTATION_TERMS.items() if same_width else ():
            terms[f"loss_{name}"] = term(out, jax.lax.stop_gradient(teacher_out), attention_mask)
            weights[f"loss_{name}"] = getattr(w, name)
        s_const = jax.lax.stop_gradient(logits)
        metrics["kl_t1"] = losses.kd_loss(s_const, t_logits, ce_rows, 1.0)
        metrics["agreement"] = losses.accuracy(s_const, jnp.argmax(t_logits, -1), ce_rows)
    loss = sum(weights[k] * v for k, v in terms.items())
    return loss, {**terms, **metrics, "loss": loss}


def _attention_kl_of_probabilities(p_s, p_t, attention_mask):
    """KL(teacher || student) of the models' own attention probabilities [B, H, S, S]."""
    keep = attention_mask[:, None, None, :].astype(bool)
    safe = lambda p: jnp.log(jnp.where(keep, p, 1.0))  # noqa: E731
    per_query = jnp.sum(jnp.where(keep, p_t * (safe(p_t) - safe(p_s)), 0.0), axis=-1)
    w = attention_mask.astype(jnp.float32)
    return jnp.sum(jnp.mean(per_query, axis=1) * w) / jnp.maximum(jnp.sum(w), 1.0)


def layer_terms(obj, s_out, s_records, t_out, t_records, projections, attention_mask):
    """The layer-pair terms written out: hidden states from the outputs, attention from the
    models' own probabilities (output_attentions), relations from the recorded q, k, v."""
    terms, weights = {}, {}
    for term in obj.weights.layers:
        key = f"loss_{term.name}"
        if term.kind.startswith("hidden"):
            h = s_out.hidden_states[term.student_layer]
            proj = projections.get(term.name)
            if proj is not None:
                h = h @ proj["kernel"] + proj["bias"]
            fn = losses.hidden_mse_loss if term.kind == "hidden_mse" else losses.cosine_loss
            terms[key] = fn(h, t_out.hidden_states[term.teacher_layer], attention_mask)
        elif term.kind == "attention_kl":
            terms[key] = _attention_kl_of_probabilities(s_out.attentions[term.student_layer - 1],
                                                        t_out.attentions[term.teacher_layer - 1], attention_mask)
        else:
            a, b = s_records[term.student_layer - 1], t_records[term.teacher_layer - 1]
            terms[key] = losses.relation_loss([a[k] for k in "qkv"], [b[k] for k in "qkv"], attention_mask,
                                              obj.relation_heads)
        weights[key] = term.weight
    return terms, weights


def whole_logits_loss_and_grads(params, teacher_params, masked_ids, attention_mask, labels, targets,
                                dropout_rng, *, model, teacher, obj):
    """objective.loss_and_grads, computed from whole logits by autodiff."""
    teacher_out = t_records = None
    layered = bool(obj.weights.layers)
    if teacher is not None and obj.weights.uses_teacher:
        teacher_out, t_records = apply_recording(teacher, teacher_params, masked_ids, attention_mask,
                                                 deterministic=True, output_attentions=layered)
        teacher_out, t_records = jax.lax.stop_gradient((teacher_out, t_records))

    def loss_fn(p):
        student = {k: v for k, v in p.items() if k != "projections"}
        out, records = apply_recording(model, student, masked_ids, attention_mask, deterministic=False,
                                       rngs={"dropout": dropout_rng}, output_attentions=layered)
        loss, metrics = whole_logits_terms(obj, out, teacher_out, labels, targets, attention_mask)
        if teacher_out is not None and layered:
            terms, weights = layer_terms(obj, out, records, teacher_out, t_records, p.get("projections", {}),
                                         attention_mask)
            loss = loss + sum(weights[k] * v for k, v in terms.items())
            metrics = {**metrics, **terms, "loss": loss}
        return loss, metrics

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


def recording_tx():
    """An optimizer that moves nothing and keeps, as its state, the last gradient it was
    given, wrapped in `optax.apply_if_finite` like optim.make_optimizer's (the step reads
    its skip counts): after a step, `state.opt_state.inner_state` is the update's gradient."""
    inner = optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))
    return optax.apply_if_finite(inner, max_consecutive_errors=np.iinfo(np.int32).max)


def mean_gradient(params, teacher_params, rng, update, micro_batches, *, model, teacher, obj):
    """The gradient of update `update` (0-based) over its k `micro_batches` ([rows, seq]
    each): the mean of each micro-batch's gradient (step.micro_batch_grads in the global
    view, the key fold_in(rng, update * k + i)), summed in float64 on the host; and the
    mean's global norm."""
    k = len(micro_batches)
    grads_fn = jax.jit(lambda r, b: step.micro_batch_grads(r, b, params, teacher_params, model=model,
                                                           teacher=teacher, obj=obj)[0])
    total = None
    for i, batch in enumerate(micro_batches):
        g = jax.tree.map(lambda x: np.asarray(x, np.float64),
                         jax.device_get(grads_fn(jax.random.fold_in(rng, update * k + i), batch)))
        total = g if total is None else jax.tree.map(np.add, total, g)
    mean = jax.tree.map(lambda x: x / k, total)
    return mean, float(np.sqrt(sum(np.sum(x * x) for x in jax.tree.leaves(mean))))


def gradient_error(got, want):
    """(largest |got - want| over every element, over the largest |want|): the error of a
    gradient tree relative to its scale."""
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want)
    worst = max(float(np.max(np.abs(np.asarray(a, np.float64) - b))) for a, b in zip(got, want))
    return worst / max(float(np.max(np.abs(b))) for b in want)
