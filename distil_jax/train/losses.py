"""The DistilBERT losses, with the reference implementation's semantics (distiller.py).

Every loss takes explicit [B, S] 0/1 row weights (which rows count) and averages over
the rows with weight 1, so padding, masked positions and `restrict_ce_to_mask` are all
just different weights. All math is float32 whatever the input dtype, and a batch with
no selected row gives 0, not NaN.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from distil_jax import parallel

# torch.nn.functional.cosine_embedding_loss guards its norms with this epsilon.
_COSINE_EPS = 1e-12


def _mean_over_rows(per_row: jax.Array, weights: jax.Array) -> jax.Array:
    """The weighted mean over the micro-batch's rows; on one device group of several
    (parallel.per_device), this group's share of it: its rows' sum over the whole count."""
    weights = weights.astype(jnp.float32)
    return jnp.sum(per_row * weights) / jnp.maximum(parallel.batch_sum(weights), 1.0)


def mean_over_rows(per_row: jax.Array) -> jax.Array:
    """The mean over every row of the micro-batch (a task's examples)."""
    return _mean_over_rows(per_row, jnp.ones_like(per_row, jnp.float32))


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


def task_kd_loss(student_logits, teacher_logits, temperature: float, mask=None) -> jax.Array:
    """Task distillation: `kd_loss` of a task head's logits, one distribution per row.

    Classification: [B, C], over the classes. Extractive QA: start (or end) logits [B, S]
    with `mask` [B, S], one distribution over each row's real positions (padding gets
    probability 0 in both). Averaged over rows, times T^2."""
    if mask is not None:
        real = mask > 0
        student_logits = jnp.where(real, student_logits.astype(jnp.float32), -1e9)
        teacher_logits = jnp.where(real, teacher_logits.astype(jnp.float32), -1e9)
    rows = jnp.ones(student_logits.shape[:-1], jnp.float32)
    return kd_loss(student_logits, teacher_logits, rows, temperature)


def token_nll(logits, labels) -> jax.Array:
    """-log softmax(logits)[label] per row, in float32: the cross-entropy on whole logits
    (evaluation, a task's loss, `mlm_loss`; training's MLM term is the fused, blocked
    `vocab_terms`, proven equal to it). A label outside the vocabulary (HF's -100 on a
    row the caller leaves out) is clipped into it."""
    safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)


def mlm_loss(logits, labels, weights) -> jax.Array:
    """Cross-entropy of `labels` averaged over rows with weight 1 (rows with weight 0 may
    hold any label)."""
    return _mean_over_rows(token_nll(logits, labels), weights)


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


# --- terms inside the encoders (TinyBERT, MiniLM, MiniLMv2) -----------------------------
def hidden_mse_loss(student_hidden, teacher_hidden, weights) -> jax.Array:
    """Mean over rows with weight 1 of the squared difference averaged over the hidden
    dimensions (TinyBERT's MSE on hidden states, with padding left out)."""
    diff = student_hidden.astype(jnp.float32) - teacher_hidden.astype(jnp.float32)
    return _mean_over_rows(jnp.mean(diff * diff, axis=-1), weights)


def attention_scores(query, key) -> jax.Array:
    """Scaled dot products [B, H, S, S] in float32 of query and key [B, S, H, d]."""
    q, k = query.astype(jnp.float32), key.astype(jnp.float32)
    return jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))


def attention_kl(student_scores, teacher_scores, attention_mask) -> jax.Array:
    """KL(teacher || student) of the softmaxes over the real keys of scores [B, H, S, S],
    summed over keys, averaged over heads and over the real query tokens.

    A padded key never enters a softmax (it gets probability 0 in both); a padded query
    row has weight 0."""
    keep = attention_mask[:, None, None, :].astype(bool)
    lowest = jnp.finfo(jnp.float32).min
    log_t = jax.nn.log_softmax(jnp.where(keep, teacher_scores.astype(jnp.float32), lowest), axis=-1)
    log_s = jax.nn.log_softmax(jnp.where(keep, student_scores.astype(jnp.float32), lowest), axis=-1)
    per_query = jnp.sum(jnp.where(keep, jnp.exp(log_t) * (log_t - log_s), 0.0), axis=-1)  # [B, H, S]
    return _mean_over_rows(jnp.mean(per_query, axis=1), attention_mask)


def relation_heads(x, heads: int) -> jax.Array:
    """[B, S, H, d] (a layer's heads) or [B, S, D] -> [B, S, heads, D / heads]: the heads
    concatenated and re-split into `heads` relation heads (MiniLMv2)."""
    b, s = x.shape[:2]
    return x.reshape(b, s, heads, -1)


def relation_loss(student_vectors, teacher_vectors, attention_mask, heads: int) -> jax.Array:
    """MiniLMv2's self-attention relation loss, summed over the pairs of vectors given
    (a layer's queries, keys and values: Q-Q, K-K and V-V relations).

    Each of a pair is re-split into `heads` relation heads of its own width (d_r = D /
    heads, so the two models' widths and head counts may differ), relation =
    softmax(X X^T / sqrt(d_r)) over the real tokens, and the pair's term is
    `attention_kl` of the two relations."""
    total = jnp.zeros((), jnp.float32)
    for s, t in zip(student_vectors, teacher_vectors):
        s_r, t_r = relation_heads(s, heads), relation_heads(t, heads)
        total = total + attention_kl(attention_scores(s_r, s_r), attention_scores(t_r, t_r), attention_mask)
    return total


# --- the vocabulary-sized losses, fused with the projection and chunked over rows ------
def project(features, embedding, bias) -> jax.Array:
    """Logits of `features` [N, D] under a tied head: features @ embedding.T + bias, in float32."""
    logits = jnp.einsum("nd,vd->nv", features, embedding.astype(features.dtype),
                        preferred_element_type=jnp.float32)
    return logits + bias.astype(jnp.float32)


def _softened_exps(z, temperature: float):
    """(exp(z / T), exp(z)) for z <= 0 (logits minus their row max). For an integer T up
    to 4 the second is the first to the power T: one exp per element instead of two."""
    if temperature == 1.0:
        e = jnp.exp(z)
        return e, e
    e_t = jnp.exp(z / temperature)
    if float(temperature).is_integer() and 1 < temperature <= 4:
        return e_t, e_t ** int(temperature)
    return e_t, jnp.exp(z)


def _block(s_feat, t_feat, labels, kd_w, mlm_w, s_head, t_head, *, temperature, scale):
    """One block of rows: the weighted sums of every term that needs [rows, V] logits, and the
    gradient of the weighted loss with respect to the student's features and head.

    `scale` holds each loss's weight divided by its row count (alpha / rows), so the block's
    gradient is already that of the mean over all blocks. The gradient with respect to
    the logits is closed-form (softmax minus target): (p - onehot) for the cross-entropy,
    T (p_T - q_T) for the T^2-scaled KL, 2 (s - t) for the squared error.

    Written for few passes over the [rows, V] blocks (on a CPU each pass is a trip through
    memory): every term is a row sum of exps of the logits minus their row max, with the
    normalisers applied per row afterwards, e.g. KL_T = sum(e_t (t - s)) / (T Z_t)
    - (max_t - max_s) / T - log Z_t + log Z_s; the logs of the softmaxes are never formed.
    Top-1 metrics compare against the row max (a tie for the top counts as a hit), which
    needs no argmax (an argmax reduces value and index together, a slow loop on a CPU).
    """
    emb, bias = s_head
    s = project(s_feat, emb, bias)
    v = s.shape[-1]
    max_s = jnp.max(s, axis=-1)
    e_st, e_s1 = _softened_exps(s - max_s[:, None], temperature)
    safe = jnp.clip(labels, 0, v - 1)
    s_label = jnp.take_along_axis(s, safe[:, None], axis=-1)[:, 0]
    z_s1 = jnp.sum(e_s1, axis=-1)
    log_z_s1 = jnp.log(z_s1)
    ce = log_z_s1 - (s_label - max_s)
    sums = {"loss_mlm": jnp.sum(ce * mlm_w), "mlm_accuracy": jnp.sum((s_label >= max_s) * mlm_w)}
    w_mlm = scale["loss_mlm"] * mlm_w
    is_label = jax.lax.broadcasted_iota(jnp.int32, s.shape, 1) == safe[:, None]
    d_logits = (w_mlm / z_s1)[:, None] * e_s1 - jnp.where(is_label, w_mlm[:, None], 0.0)
    if t_feat is not None:
        t = project(t_feat, *t_head)
        max_t = jnp.max(t, axis=-1)
        e_tt, e_t1 = _softened_exps(t - max_t[:, None], temperature)
        z_st = z_s1 if temperature == 1.0 else jnp.sum(e_st, axis=-1)
        z_tt, z_t1 = jnp.sum(e_tt, axis=-1), jnp.sum(e_t1, axis=-1)
        gap = t - s
        kl = (jnp.sum(e_tt * gap, axis=-1) / (temperature * z_tt) - (max_t - max_s) / temperature
              - jnp.log(z_tt) + jnp.log(z_st))
        kl1 = jnp.sum(e_t1 * gap, axis=-1) / z_t1 - (max_t - max_s) - jnp.log(z_t1) + log_z_s1
        both_top = jnp.max(jnp.where((s == max_s[:, None]) & (t == max_t[:, None]), 1.0, 0.0), axis=-1)
        sums.update(loss_ce=jnp.sum(kl * kd_w) * temperature**2, kl_t1=jnp.sum(kl1 * kd_w),
                    agreement=jnp.sum(both_top * kd_w))
        w_ce = temperature * scale["loss_ce"] * kd_w
        d_logits += (w_ce / z_st)[:, None] * e_st - (w_ce / z_tt)[:, None] * e_tt
        if "loss_mse" in scale:
            sums["loss_mse"] = jnp.sum(jnp.sum(jnp.square(gap), axis=-1) * kd_w)
            d_logits -= 2.0 * gap * (scale["loss_mse"] * kd_w)[:, None]
    d_feat = jnp.einsum("nv,vd->nd", d_logits, emb.astype(jnp.float32)).astype(s_feat.dtype)
    d_emb = jnp.einsum("nv,nd->vd", d_logits, s_feat.astype(jnp.float32))
    # The bias's gradient, a column sum, as a product with ones: XLA:CPU runs a reduction
    # over the rows of a [rows, V] array as a slow strided loop (50 ms at 512 x 30522),
    # a vector-matrix product in 2 ms.
    d_bias = jnp.ones((d_logits.shape[0],), jnp.float32) @ d_logits
    return sums, (d_feat, d_emb, d_bias)


def vocab_terms(s_feat, s_head, labels, mlm_weights, t_feat=None, t_head=None, kd_weights=None,
                temperature: float = 1.0, chunk: int = 0, *, mlm: float = 1.0, ce: float = 1.0,
                mse: Optional[float] = None):
    """The losses that need logits, from head features, never holding more than chunk x V of them.

    s_feat / t_feat: [N, D] student / teacher features before the tied projection
    (`MaskedLM.head_inputs`); s_head / t_head: (embedding [V, D], bias [V]). Row
    weights are 0/1: `mlm_weights` select the MLM targets (loss_mlm, mlm_accuracy),
    `kd_weights` the rows of the KL (loss_ce, times T^2), loss_mse, kl_t1 (KL at T=1,
    a metric) and agreement (teacher-student top-1). Each term is the mean over its
    rows, exactly as `kd_loss`, `mlm_loss`, `mse_loss` and `accuracy` compute it on
    whole logits. Without a teacher only the MLM terms exist; `mse=None` leaves the
    squared error out (it costs a pass over the logits).

    Returns (loss, terms): loss = mlm * loss_mlm + ce * loss_ce + mse * loss_mse carries
    the gradient with respect to s_feat and s_head; terms are constants (metrics). The
    rows go through a scan in blocks of `chunk` (0: one block) that computes each
    block's logits once, the terms, and the gradient at the same time (`_block`), so no
    [N, V] array exists in the forward or the backward pass and nothing is recomputed:
    peak memory grows with the chunk, not with N x V.
    """
    n = s_feat.shape[0]
    has_teacher = t_feat is not None
    mlm_w = mlm_weights.astype(jnp.float32)
    kd_w = kd_weights.astype(jnp.float32) if has_teacher else jnp.zeros_like(mlm_w)
    n_mlm, n_kd = jnp.maximum(parallel.batch_sum(mlm_w), 1.0), jnp.maximum(parallel.batch_sum(kd_w), 1.0)
    per = lambda k: n_mlm if k in ("loss_mlm", "mlm_accuracy") else n_kd  # noqa: E731
    weights = {"loss_mlm": mlm}
    if has_teacher:
        weights["loss_ce"] = ce
        if mse is not None:
            weights["loss_mse"] = mse
    scale = {k: w / per(k) for k, w in weights.items()}  # so each block's gradient is the mean's
    block = functools.partial(_block, temperature=temperature, scale=scale)

    @jax.custom_vjp
    def loss_fn(feat, head):
        return forward(feat, head)[0]

    def forward(feat, head):
        if chunk <= 0 or chunk >= n:
            sums, grads = block(feat, t_feat, labels, kd_w, mlm_w, head, t_head)
        else:
            pad = -n % chunk
            rows = lambda x: None if x is None else jnp.pad(  # noqa: E731
                x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, chunk, *x.shape[1:])
            xs = tuple(rows(x) for x in (feat, t_feat, labels, kd_w, mlm_w))

            def body(acc, x):
                sums, (d_feat, d_emb, d_bias) = block(*x, head, t_head)
                acc_sums, acc_emb, acc_bias = acc
                return (jax.tree.map(jnp.add, acc_sums, sums), acc_emb + d_emb, acc_bias + d_bias), d_feat

            zero_sums = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(
                lambda *x: block(*x, head, t_head)[0], *(None if x is None else x[0] for x in xs)))
            init = (zero_sums, jnp.zeros(head[0].shape, jnp.float32), jnp.zeros(head[1].shape, jnp.float32))
            (sums, d_emb, d_bias), d_feat = jax.lax.scan(body, init, xs)
            grads = (d_feat.reshape(-1, feat.shape[-1])[:n], d_emb, d_bias)
        terms = {k: v / per(k) for k, v in sums.items()}
        loss = sum(w * terms[k] for k, w in weights.items())
        return (loss, terms), grads

    def fwd(feat, head):
        out, grads = forward(feat, head)
        return out, (grads, head)

    def bwd(res, cotangents):
        (d_feat, d_emb, d_bias), head = res
        g = cotangents[0]  # the terms are metrics: their cotangents are ignored
        return ((g * d_feat).astype(d_feat.dtype),
                ((g * d_emb).astype(head[0].dtype), (g * d_bias).astype(head[1].dtype)))

    loss_fn.defvjp(fwd, bwd)
    loss, terms = loss_fn(s_feat, tuple(s_head))
    return loss, jax.lax.stop_gradient(terms)
