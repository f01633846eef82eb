"""The DistilBERT losses, with the reference implementation's semantics (distiller.py).

Every loss takes explicit [B, S] 0/1 row weights (which rows count) and averages over
the rows with weight 1, so padding, masked positions and `restrict_ce_to_mask` are all
just different weights. All math is float32 whatever the input dtype, and a batch with
no selected row gives 0, not NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# torch.nn.functional.cosine_embedding_loss guards its norms with this epsilon.
_COSINE_EPS = 1e-12


def _mean_over_rows(per_row: jax.Array, weights: jax.Array) -> jax.Array:
    weights = weights.astype(jnp.float32)
    return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def kd_loss(student_logits, teacher_logits, weights, temperature: float) -> jax.Array:
    """KL(teacher_T || student_T) summed over the vocabulary, averaged over rows, times T^2.

    The reference's `KLDivLoss(reduction="batchmean")(log_softmax(s/T), softmax(t/T)) * T**2`
    on the selected rows. The T^2 keeps the gradient's size comparable across
    temperatures (Hinton et al. 2015), since softened gradients scale as 1/T^2.
    """
    s = student_logits.astype(jnp.float32) / temperature
    t = teacher_logits.astype(jnp.float32) / temperature
    log_p_t = jax.nn.log_softmax(t, axis=-1)
    log_p_s = jax.nn.log_softmax(s, axis=-1)
    per_row = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return _mean_over_rows(per_row, weights) * temperature**2


def mlm_loss(logits, labels, weights) -> jax.Array:
    """Cross-entropy of `labels` averaged over rows with weight 1.

    Labels outside the selected rows may hold anything (HF's -100 included).
    """
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
    per_row = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
    return _mean_over_rows(per_row, weights)


def cosine_loss(student_hidden, teacher_hidden, weights) -> jax.Array:
    """Mean over rows with weight 1 of 1 - cos(student_h, teacher_h) (CosineEmbeddingLoss, y=1)."""
    s = student_hidden.astype(jnp.float32)
    t = teacher_hidden.astype(jnp.float32)
    dot = jnp.sum(s * t, axis=-1)
    norms = jnp.sqrt((jnp.sum(s * s, axis=-1) + _COSINE_EPS) * (jnp.sum(t * t, axis=-1) + _COSINE_EPS))
    return _mean_over_rows(1.0 - dot / norms, weights)


def mse_loss(student_logits, teacher_logits, weights) -> jax.Array:
    """Squared error summed over the vocabulary, averaged over rows (MSELoss(sum) / rows)."""
    diff = student_logits.astype(jnp.float32) - teacher_logits.astype(jnp.float32)
    return _mean_over_rows(jnp.sum(diff * diff, axis=-1), weights)


def accuracy(logits, labels, weights) -> jax.Array:
    """Fraction of selected rows whose argmax equals the label."""
    hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return _mean_over_rows(hit, weights)
