"""Held-out evaluation: identical masks for every model, metrics and paired errors that can be checked."""

import jax
import numpy as np
import pytest

from distil_jax.apps import evaluate
from distil_jax.data import VocabInfo
from distil_jax.models import DistilBert, DistilBertConfig, init_params

VOCAB = 64
SPECIALS = (0, 1, 2, 3, 4)


def _batches(n=3, b=4, s=24, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(5, VOCAB, size=(b, s)).astype(np.int32)
        am = np.ones_like(ids)
        am[1, 15:] = 0
        ids[:, 0], ids[am == 0] = 2, 0
        out.append({"input_ids": ids, "attention_mask": am})
    return out


def _vocab():
    return VocabInfo(VOCAB, 0, 4, SPECIALS, np.arange(VOCAB))


def _model(seed):
    m = DistilBert(DistilBertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                                    intermediate_size=64, max_position_embeddings=32))
    return m, init_params(m, jax.random.key(seed))


def test_masks_are_fixed_shared_and_cover_every_token_once():
    batches = _batches()
    a = evaluate.fixed_masked_batches(batches, _vocab(), seed=5, passes=4)
    b = evaluate.fixed_masked_batches(batches, _vocab(), seed=5, passes=4)
    assert len(a) == 4 * len(batches)
    for x, y in zip(a, b):
        for k in ("masked_ids", "labels", "targets"):
            np.testing.assert_array_equal(x[k], y[k])
    for i, batch in enumerate(batches):
        passes = a[4 * i: 4 * i + 4]
        covered = sum(p["targets"] for p in passes)
        eligible = (batch["attention_mask"] == 1) & ~np.isin(batch["input_ids"], SPECIALS)
        np.testing.assert_array_equal(covered, eligible.astype(np.int32))  # each real token exactly once
        for p in passes:
            assert 0 < p["targets"].sum() < eligible.sum()
            np.testing.assert_array_equal(p["labels"][p["targets"] == 1], batch["input_ids"][p["targets"] == 1])
            assert (p["masked_ids"][p["targets"] == 0] == batch["input_ids"][p["targets"] == 0]).all()
    mask_share = np.mean([(p["masked_ids"] == 4)[p["targets"] == 1].mean() for p in a])
    assert 0.6 < mask_share < 0.95  # 80% of the targets become [MASK]
    # A model's metrics do not depend on which other models are evaluated beside it.
    m1, m2 = _model(0), _model(1)
    alone = evaluate.evaluate_models({"a": m1}, a)[0]["a"]
    together = evaluate.evaluate_models({"a": m1, "b": m2}, a, reference="a")[0]
    assert alone == {k: together["a"][k] for k in alone}
    # Against itself: zero KL and full agreement.
    same = evaluate.evaluate_models({"t": m1, "copy": m1}, a, reference="t")[0]["copy"]
    assert same["agreement_with_teacher"] == 1.0 and abs(same["kl_from_teacher"]) < 1e-6


def test_accuracy_and_perplexity_match_a_direct_computation():
    batches = evaluate.fixed_masked_batches(_batches(seed=1), _vocab(), seed=0, passes=3)
    module, params = _model(2)
    got = evaluate.evaluate_models({"m": (module, params)}, batches)[0]["m"]
    correct = nll = n = 0
    for b in batches:
        logits = np.asarray(module.apply({"params": params}, b["masked_ids"], b["attention_mask"]).logits, np.float64)
        sel = b["targets"] == 1
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        correct += (logits.argmax(-1)[sel] == b["labels"][sel]).sum()
        nll -= np.take_along_axis(logp, np.clip(b["labels"], 0, None)[..., None], -1)[..., 0][sel].sum()
        n += sel.sum()
    np.testing.assert_allclose(got["mlm_accuracy"], correct / n, rtol=1e-6)
    np.testing.assert_allclose(got["perplexity"], np.exp(nll / n), rtol=1e-4)
    assert got["targets"] == n


def test_paired_difference_and_its_standard_errors():
    """The iid error is std(d)/sqrt(n); the clustered one equals the formula written out,
    equals the iid one when every target is its own cluster, and grows when targets of one
    sequence move together."""
    rng = np.random.default_rng(0)
    n = 4000
    clusters = np.repeat(np.arange(400), 10)
    skill = rng.normal(size=400)[clusters]  # per-sequence difficulty shared by both models
    a = (rng.random(n) < 1 / (1 + np.exp(-skill - 0.2))).astype(float)
    b = (rng.random(n) < 1 / (1 + np.exp(-skill))).astype(float)
    got = evaluate.paired_difference(a, b, clusters)
    d = a - b
    assert got["difference"] == pytest.approx(d.mean())
    assert got["se_iid"] == pytest.approx(d.std(ddof=1) / np.sqrt(n))
    sums = np.array([(d[clusters == c] - d.mean()).sum() for c in range(400)])
    assert got["se"] == pytest.approx(np.sqrt((sums ** 2).sum() / n ** 2 * 400 / 399))
    assert got["only_first"] == int(((a == 1) & (b == 0)).sum()) and got["only_second"] == int(((a == 0) & (b == 1)).sum())
    alone = evaluate.paired_difference(a, b, np.arange(n))
    assert alone["se"] == pytest.approx(alone["se_iid"], rel=1e-3)
    together = evaluate.paired_difference(a, a * 0 + (rng.random(400) < 0.5)[clusters], clusters)
    assert together["se"] > 1.5 * together["se_iid"]  # whole sequences move together
    # Against a brute-force resampling of sequences: the clustered error is its scale.
    boot = [d[np.concatenate([np.flatnonzero(clusters == c) for c in rng.integers(0, 400, 400)])].mean()
            for _ in range(300)]
    assert got["se"] == pytest.approx(np.std(boot), rel=0.2)
    pairs = evaluate.paired_comparisons({"x": a, "y": b, "z": a}, clusters)
    assert set(pairs) == {"x - y", "x - z", "y - z"} and pairs["x - z"]["difference"] == 0


def test_most_frequent_token_baseline():
    batches = evaluate.fixed_masked_batches(_batches(seed=2), _vocab(), seed=0)
    counts = np.zeros(VOCAB)
    counts[0] = 1e9  # a special token never counts
    counts[9] = 50
    token, acc = evaluate.most_frequent_accuracy(batches, counts, SPECIALS)
    hits = sum(((b["labels"] == 9) & (b["targets"] == 1)).sum() for b in batches)
    assert token == 9 and acc == hits / sum(b["targets"].sum() for b in batches)
