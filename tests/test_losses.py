"""The losses against float64 NumPy references and torch's reference semantics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distil_jax.train import losses


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ref_kd(s, t, w, temp):
    lt, ls = _log_softmax64(np.asarray(t, np.float64) / temp), _log_softmax64(np.asarray(s, np.float64) / temp)
    per_row = (np.exp(lt) * (lt - ls)).sum(-1)
    return (per_row * w).sum() / max(w.sum(), 1) * temp**2


def _ref_mlm(logits, labels, w):
    lp = _log_softmax64(logits)
    safe = np.clip(labels, 0, logits.shape[-1] - 1)
    per_row = -np.take_along_axis(lp, safe[..., None], -1)[..., 0]
    return (per_row * w).sum() / max(w.sum(), 1)


def _ref_cos(s, t, w):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    cos = (s * t).sum(-1) / np.sqrt((s * s).sum(-1) * (t * t).sum(-1))
    return ((1 - cos) * w).sum() / max(w.sum(), 1)


def _ref_mse(s, t, w):
    d = np.asarray(s, np.float64) - np.asarray(t, np.float64)
    return ((d * d).sum(-1) * w).sum() / max(w.sum(), 1)


def _inputs(seed, dtype=np.float32, b=3, s=7, v=50, d=16):
    rng = np.random.default_rng(seed)
    student = (rng.normal(size=(b, s, v)) * 3).astype(dtype)
    teacher = (rng.normal(size=(b, s, v)) * 3).astype(dtype)
    hs, ht = rng.normal(size=(b, s, d)).astype(dtype), rng.normal(size=(b, s, d)).astype(dtype)
    labels = rng.integers(0, v, size=(b, s))
    weights = (rng.random((b, s)) < 0.6).astype(np.int32)
    labels = np.where(weights == 1, labels, -100)
    return student, teacher, hs, ht, labels, weights


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_losses_match_float64_reference(seed, temperature):
    s, t, hs, ht, labels, w = _inputs(seed)
    np.testing.assert_allclose(losses.kd_loss(s, t, w, temperature), _ref_kd(s, t, w, temperature), rtol=1e-5)
    np.testing.assert_allclose(losses.mlm_loss(s, labels, w), _ref_mlm(s, labels, w), rtol=1e-5)
    np.testing.assert_allclose(losses.cosine_loss(hs, ht, w), _ref_cos(hs, ht, w), rtol=1e-5)
    np.testing.assert_allclose(losses.mse_loss(s, t, w), _ref_mse(s, t, w), rtol=1e-5)


def test_bf16_inputs_computed_in_float32():
    s, t, hs, ht, labels, w = _inputs(2)
    to_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    # The reference sees exactly the bf16-rounded values: the loss math adds no bf16 error.
    sb, tb, hsb, htb = (np.asarray(to_bf16(x).astype(jnp.float32)) for x in (s, t, hs, ht))
    for got, want in [
        (losses.kd_loss(to_bf16(s), to_bf16(t), w, 2.0), _ref_kd(sb, tb, w, 2.0)),
        (losses.mlm_loss(to_bf16(s), labels, w), _ref_mlm(sb, labels, w)),
        (losses.cosine_loss(to_bf16(hs), to_bf16(ht), w), _ref_cos(hsb, htb, w)),
        (losses.mse_loss(to_bf16(s), to_bf16(t), w), _ref_mse(sb, tb, w)),
    ]:
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_no_selected_row_gives_zero_and_finite_gradients():
    s, t, hs, ht, labels, _ = _inputs(3)
    w = np.zeros(labels.shape, np.int32)

    def total(s, hs):
        return (losses.kd_loss(s, t, w, 2.0) + losses.mlm_loss(s, labels, w)
                + losses.cosine_loss(hs, ht, w) + losses.mse_loss(s, t, w))

    value, grads = jax.value_and_grad(total, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(hs))
    assert float(value) == 0.0
    for g in grads:
        chex.assert_tree_all_finite(g)
        assert float(jnp.abs(g).max()) == 0.0


def test_rows_with_weight_zero_do_not_matter():
    s, t, hs, ht, labels, w = _inputs(4)
    noise = np.random.default_rng(5).normal(size=s.shape).astype(np.float32) * 100
    s2 = np.where(w[..., None] == 1, s, noise)
    np.testing.assert_allclose(losses.kd_loss(s2, t, w, 2.0), losses.kd_loss(s, t, w, 2.0), rtol=1e-6)
    np.testing.assert_allclose(losses.mlm_loss(s2, labels, w), losses.mlm_loss(s, labels, w), rtol=1e-6)


def test_kd_loss_equals_torch_kldiv_batchmean_times_t_squared():
    import torch  # the test extra: missing, this fails (it does not skip)
    s, t, _, _, _, w = _inputs(6)
    temp = 2.0
    sel = w.astype(bool)
    s_rows, t_rows = torch.tensor(s[sel]), torch.tensor(t[sel])
    want = torch.nn.KLDivLoss(reduction="batchmean")(
        torch.log_softmax(s_rows / temp, -1), torch.softmax(t_rows / temp, -1)) * temp**2
    np.testing.assert_allclose(losses.kd_loss(s, t, w, temp), want.item(), rtol=1e-5)


def test_cosine_loss_equals_torch_cosine_embedding_loss():
    import torch  # the test extra: missing, this fails (it does not skip)
    _, _, hs, ht, _, w = _inputs(7)
    sel = w.astype(bool)
    want = torch.nn.CosineEmbeddingLoss()(torch.tensor(hs[sel]), torch.tensor(ht[sel]),
                                          torch.ones(int(sel.sum())))
    np.testing.assert_allclose(losses.cosine_loss(hs, ht, w), want.item(), rtol=1e-5)


def test_kd_loss_gradient_matches_float64_finite_differences():
    s, t, _, _, _, w = _inputs(8, b=2, s=3, v=6)
    grad = np.asarray(jax.grad(lambda x: losses.kd_loss(x, t, w, 2.0))(jnp.asarray(s)))
    eps, numeric = 1e-6, np.zeros_like(s, np.float64)
    for idx in np.ndindex(s.shape):
        up, down = s.astype(np.float64), s.astype(np.float64)
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (_ref_kd(up, t, w, 2.0) - _ref_kd(down, t, w, 2.0)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=2e-5)


def test_accuracy():
    logits = np.eye(4, dtype=np.float32)[None]  # argmax of row i is i
    labels = np.array([[0, 1, 3, 0]])
    np.testing.assert_allclose(losses.accuracy(logits, labels, np.array([[1, 1, 1, 0]])), 2 / 3, rtol=1e-6)


# --- chunked, fused vocabulary losses ------------------------------------------------
def _vocab_case(seed, n=37, d=16, v=50, no_rows=False):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
    s_head, t_head = (f(v, d), f(v)), (f(v, d), f(v))
    labels = jnp.asarray(r.integers(0, v, n))
    real = r.random(n) < 0.8  # the rest is padding
    mlm_w = jnp.asarray(real & (r.random(n) < 0.3) & (not no_rows), jnp.float32)
    kd_w = jnp.asarray(real & (not no_rows), jnp.float32)
    return f(n, d), s_head, f(n, d), t_head, labels, mlm_w, kd_w


def _plain_terms(s_feat, s_head, t_feat, t_head, labels, mlm_w, kd_w, temperature):
    s, t = losses.project(s_feat, *s_head), losses.project(t_feat, *t_head)
    return {"loss_mlm": losses.mlm_loss(s, labels, mlm_w), "mlm_accuracy": losses.accuracy(s, labels, mlm_w),
            "loss_ce": losses.kd_loss(s, t, kd_w, temperature), "kl_t1": losses.kd_loss(s, t, kd_w, 1.0),
            "agreement": losses.accuracy(s, jnp.argmax(t, -1), kd_w), "loss_mse": losses.mse_loss(s, t, kd_w)}


@pytest.mark.parametrize("chunk", [0, 1, 8, 16, 64])
@pytest.mark.parametrize("no_rows", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0, 1.5])
def test_chunked_vocab_terms_and_gradients_equal_whole_logits(chunk, no_rows, temperature):
    s_feat, s_head, t_feat, t_head, labels, mlm_w, kd_w = _vocab_case(chunk, no_rows=no_rows)
    alphas = {"loss_mlm": 2.0, "loss_ce": 5.0, "loss_mse": 0.1}

    def chunked(feat, head):
        return losses.vocab_terms(feat, head, labels, mlm_w, t_feat, t_head, kd_w, temperature,
                                  chunk=chunk, mlm=2.0, ce=5.0, mse=0.1)

    def plain(feat, head):
        terms = _plain_terms(feat, head, t_feat, t_head, labels, mlm_w, kd_w, temperature)
        return sum(w * terms[k] for k, w in alphas.items()), terms

    grad = lambda fn: jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(s_feat, s_head)  # noqa: E731
    ((loss_c, terms_c), g_c), ((loss_p, terms_p), g_p) = grad(chunked), grad(plain)
    chex.assert_trees_all_close(terms_c, terms_p, rtol=2e-5, atol=1e-6)
    chex.assert_trees_all_close(loss_c, loss_p, rtol=2e-5, atol=1e-6)
    chex.assert_trees_all_close(g_c, g_p, rtol=2e-5, atol=1e-6)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(g_c))
    if no_rows:
        assert all(float(v) == 0.0 for v in terms_c.values())
        assert all(float(np.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_c))
    else:
        assert float(terms_c["loss_ce"]) > 0 and float(terms_c["loss_mlm"]) > 0
        assert float(np.abs(g_c[0]).max()) > 0

    # Scaled cotangents scale the gradient (the custom backward pass is linear in it).
    g3 = jax.grad(lambda f, h: 3.0 * chunked(f, h)[0], argnums=(0, 1))(s_feat, s_head)
    chex.assert_trees_all_close(g3, jax.tree.map(lambda x: 3.0 * x, g_c), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 1.5])
def test_fused_kl_keeps_its_precision_when_student_and_teacher_are_close(temperature):
    """The fused KL is a difference of row sums (no log-softmax is formed); where the two
    distributions nearly agree (KL ~ 1e-3) it must still match a float64 reference."""
    r = np.random.default_rng(0)
    n, d, v = 64, 32, 5000
    emb, bias = r.normal(size=(v, d)).astype(np.float32), r.normal(size=v).astype(np.float32)
    s_feat = r.normal(size=(n, d)).astype(np.float32)
    t_feat = (s_feat + 0.01 * r.normal(size=(n, d))).astype(np.float32)
    w = np.ones(n, np.float32)
    _, terms = losses.vocab_terms(jnp.asarray(s_feat), (emb, bias), r.integers(0, v, n), w,
                                  jnp.asarray(t_feat), (emb, bias), w, temperature, chunk=16)
    s, t = (x.astype(np.float64) @ emb.T.astype(np.float64) + bias for x in (s_feat, t_feat))
    assert 1e-4 < _ref_kd(s, t, w, temperature) < 1e-2
    np.testing.assert_allclose(terms["loss_ce"], _ref_kd(s, t, w, temperature), rtol=2e-4)
    np.testing.assert_allclose(terms["kl_t1"], _ref_kd(s, t, w, 1.0), rtol=2e-4)


def test_vocab_terms_without_teacher_is_the_mlm_loss():
    s_feat, s_head, _, _, labels, mlm_w, _ = _vocab_case(1)
    loss, terms = losses.vocab_terms(s_feat, s_head, labels, mlm_w, chunk=8)
    logits = losses.project(s_feat, *s_head)
    np.testing.assert_allclose(loss, losses.mlm_loss(logits, labels, mlm_w), rtol=1e-5)
    assert set(terms) == {"loss_mlm", "mlm_accuracy"}
    g = jax.grad(lambda f: losses.vocab_terms(f, s_head, labels, mlm_w, chunk=8)[0])(s_feat)
    g_ref = jax.grad(lambda f: losses.mlm_loss(losses.project(f, *s_head), labels, mlm_w))(s_feat)
    np.testing.assert_allclose(g, g_ref, rtol=2e-5, atol=1e-7)


def test_chunked_memory_grows_with_the_chunk_not_with_rows_times_vocab():
    """Compiled temp memory of the backward: whole logits hold at least one [N, V] array; in
    chunks, 8x the rows barely moves it, and doubling the chunk doubles it."""
    d, v = 32, 4096
    r = np.random.default_rng(0)

    def temp_bytes(n, chunk):
        args = (jnp.asarray(r.normal(size=(n, d)), jnp.float32),
                (jnp.asarray(r.normal(size=(v, d)), jnp.float32), jnp.zeros(v)),
                jnp.asarray(r.integers(0, v, n)), jnp.ones(n), jnp.asarray(r.normal(size=(n, d)), jnp.float32))

        def loss(feat, head, labels, w, t_feat):
            return losses.vocab_terms(feat, head, labels, w, t_feat, head, w, 2.0, chunk=chunk)[0]
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain_small, plain_big = temp_bytes(1024, 0), temp_bytes(8192, 0)
    small, big, wide = temp_bytes(1024, 128), temp_bytes(8192, 128), temp_bytes(1024, 256)
    big_logits_bytes = 8192 * v * 4
    assert plain_big >= big_logits_bytes and plain_big > 1.5 * plain_small, (plain_small, plain_big)
    assert big <= 1.2 * small, (small, big)
    assert 1.6 * small <= wide <= 2.4 * small, (small, wide)
    assert big < big_logits_bytes / 8, (big, big_logits_bytes)


# --- the layer-pair terms (TinyBERT, MiniLM, MiniLMv2) ---------------------------------
def _ref_attention_kl(s_scores, t_scores, am):
    """float64: per head KL(teacher || student) of softmaxes over the real keys, mean over
    heads and real queries. Padded keys are removed from the arrays, not masked."""
    total, rows = 0.0, 0
    for b in range(am.shape[0]):
        real = np.flatnonzero(am[b])
        s = np.asarray(s_scores, np.float64)[b][:, real][:, :, real]  # [H, R, R]
        t = np.asarray(t_scores, np.float64)[b][:, real][:, :, real]
        lt, ls = _log_softmax64(t), _log_softmax64(s)
        total += (np.exp(lt) * (lt - ls)).sum(-1).mean(0).sum()
        rows += len(real)
    return total / max(rows, 1)


def _ref_scores(q, k):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    return np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])


def _ref_relation(s_xs, t_xs, am, heads):
    total = 0.0
    for s, t in zip(s_xs, t_xs):
        split = lambda x: np.asarray(x, np.float64).reshape(*x.shape[:2], heads, -1)  # noqa: E731
        total += _ref_attention_kl(_ref_scores(split(s), split(s)), _ref_scores(split(t), split(t)), am)
    return total


def _layer_inputs(seed, b=3, s=6, heads=(2, 4), dims=(8, 16)):
    """Student and teacher queries, keys, values [B, S, H, d] of different shapes, and an
    attention mask with padding at the ends of the rows."""
    rng = np.random.default_rng(seed)
    make = lambda h, d: [rng.normal(size=(b, s, h, d // h)).astype(np.float32) for _ in range(3)]  # noqa: E731
    am = np.ones((b, s), np.int32)
    am[1, s - 2:] = 0
    am[-1, 2:] = 0
    return make(heads[0], dims[0]), make(heads[1], dims[1]), am


@pytest.mark.parametrize("seed", [0, 1])
def test_layer_terms_match_float64_reference(seed):
    (sq, sk, sv), (tq, tk, tv), am = _layer_inputs(seed)
    rng = np.random.default_rng(seed + 10)
    hs, ht = rng.normal(size=(3, 6, 16)).astype(np.float32), rng.normal(size=(3, 6, 16)).astype(np.float32)
    want_mse = (((hs.astype(np.float64) - ht) ** 2).mean(-1) * am).sum() / am.sum()
    np.testing.assert_allclose(losses.hidden_mse_loss(hs, ht, am), want_mse, rtol=1e-5)
    tq2, tk2 = rng.normal(size=sq.shape).astype(np.float32), rng.normal(size=sk.shape).astype(np.float32)
    np.testing.assert_allclose(
        losses.attention_kl(losses.attention_scores(sq, sk), losses.attention_scores(tq2, tk2), am),
        _ref_attention_kl(_ref_scores(sq, sk), _ref_scores(tq2, tk2), am), rtol=1e-5)
    for heads in (1, 2, 4):  # relation heads independent of either model's (2 and 4) and widths (8 and 16)
        np.testing.assert_allclose(losses.relation_loss([sq, sk, sv], [tq, tk, tv], am, heads),
                                   _ref_relation([sq, sk, sv], [tq, tk, tv], am, heads), rtol=1e-5)


def test_layer_term_gradients_match_float64_finite_differences():
    (sq, sk, sv), (tq, tk, tv), am = _layer_inputs(2, b=3, s=4, dims=(4, 8))
    direction = [np.random.default_rng(i).normal(size=x.shape) for i, x in enumerate((sq, sk, sv))]
    grads = jax.grad(lambda xs: losses.relation_loss(xs, [tq, tk, tv], am, 2))([jnp.asarray(x) for x in (sq, sk, sv)])
    analytic = sum(float(np.sum(np.asarray(g, np.float64) * d)) for g, d in zip(grads, direction))
    eps = 1e-6
    moved = lambda sign: [x.astype(np.float64) + sign * eps * d for x, d in zip((sq, sk, sv), direction)]  # noqa: E731
    numeric = (_ref_relation(moved(1), [tq, tk, tv], am, 2) - _ref_relation(moved(-1), [tq, tk, tv], am, 2)) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-6)
    hs, ht = (np.random.default_rng(7 + i).normal(size=(3, 4, 8)).astype(np.float32) for i in range(2))
    g = np.asarray(jax.grad(lambda x: losses.hidden_mse_loss(x, ht, am))(jnp.asarray(hs)))
    np.testing.assert_allclose(g, 2 * (hs - ht) / 8 * am[..., None] / am.sum(), rtol=1e-5, atol=1e-7)


def test_padding_never_enters_a_relation_or_an_attention_term():
    (sq, sk, sv), (tq, tk, tv), am = _layer_inputs(3)
    pad = am[..., None, None] == 0
    noise = lambda x, i: np.where(pad, np.random.default_rng(i).normal(size=x.shape) * 100, x)  # noqa: E731
    a = losses.relation_loss([sq, sk, sv], [tq, tk, tv], am, 2)
    b = losses.relation_loss([noise(x, i) for i, x in enumerate((sq, sk, sv))],
                             [noise(x, i + 3) for i, x in enumerate((tq, tk, tv))], am, 2)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    grads = jax.grad(lambda q: losses.attention_kl(losses.attention_scores(q, sk),
                                                   losses.attention_scores(tq[..., :2, :], tk[..., :2, :]),
                                                   am))(jnp.asarray(sq[..., :2, :4]))
    chex.assert_tree_all_finite(grads)
    assert float(jnp.abs(jnp.where(pad, grads, 0.0)).max()) == 0.0  # a padded query gets no gradient


def test_a_model_related_to_itself_has_zero_loss_and_head_order_does_not_matter_with_one_relation_head():
    _, (tq, tk, tv), am = _layer_inputs(4)
    assert float(losses.relation_loss([tq, tk, tv], [tq, tk, tv], am, 4)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.attention_kl(losses.attention_scores(tq, tk), losses.attention_scores(tq, tk), am)) == \
        pytest.approx(0.0, abs=1e-6)
    (sq, sk, sv), _, _ = _layer_inputs(5)
    permuted = [x[:, :, [2, 0, 3, 1]] for x in (tq, tk, tv)]  # the teacher's 4 heads in another order
    one = lambda t: losses.relation_loss([sq, sk, sv], t, am, 1)  # noqa: E731
    np.testing.assert_allclose(one(permuted), one([tq, tk, tv]), rtol=1e-5)
    assert abs(float(losses.relation_loss([sq, sk, sv], permuted, am, 2))
               - float(losses.relation_loss([sq, sk, sv], [tq, tk, tv], am, 2))) > 1e-4  # two heads do see it


def _kl_t2_float64(s, t, temperature):
    s, t = np.asarray(s, np.float64) / temperature, np.asarray(t, np.float64) / temperature
    log_ps = s - np.log(np.exp(s - s.max()).sum()) - s.max()
    log_pt = t - np.log(np.exp(t - t.max()).sum()) - t.max()
    return float(np.sum(np.exp(log_pt) * (log_pt - log_ps))) * temperature ** 2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_task_kd_loss_matches_float64_reference(temperature):
    rng = np.random.default_rng(int(temperature))
    s, t = rng.normal(size=(5, 3)) * 3, rng.normal(size=(5, 3)) * 3  # classification, 3 classes
    want = np.mean([_kl_t2_float64(s[i], t[i], temperature) for i in range(5)])
    np.testing.assert_allclose(losses.task_kd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                                   temperature), want, rtol=1e-5)
    # Span logits [B, S] over each row's real positions only: padding changes nothing.
    s, t = rng.normal(size=(4, 12)) * 3, rng.normal(size=(4, 12)) * 3
    lengths = [12, 9, 5, 1]
    mask = (np.arange(12)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    want = np.mean([_kl_t2_float64(s[i, :n], t[i, :n], temperature) for i, n in enumerate(lengths)])
    got = losses.task_kd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temperature, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    s[mask == 0] = 1e4  # what the padded positions hold does not matter
    again = losses.task_kd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temperature, mask)
    np.testing.assert_allclose(again, got, rtol=1e-6)
    grads = jax.grad(lambda x: losses.task_kd_loss(x, jnp.asarray(t, jnp.float32), temperature, mask))(
        jnp.asarray(s, jnp.float32))
    assert np.all(np.asarray(grads)[mask == 0] == 0) and np.all(np.isfinite(grads))
