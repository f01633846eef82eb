"""Held-out evaluation: identical masks for every model, metrics that can be checked."""

import jax
import numpy as np

from distil_jax import evaluate
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


def test_masks_are_fixed_and_shared_by_every_model():
    batches = _batches()
    a = evaluate.fixed_masked_batches(batches, _vocab(), seed=5)
    b = evaluate.fixed_masked_batches(batches, _vocab(), seed=5)
    for x, y in zip(a, b):
        for k in ("masked_ids", "labels", "targets"):
            np.testing.assert_array_equal(x[k], y[k])
        assert x["targets"].sum() == int(np.ceil(0.15 * x["attention_mask"].sum()))
        assert not np.isin(x["input_ids"][x["targets"] == 1], SPECIALS).any()
    # A model's metrics do not depend on which other models are evaluated beside it.
    m1, m2 = _model(0), _model(1)
    alone = evaluate.evaluate_models({"a": m1}, a)["a"]
    together = evaluate.evaluate_models({"a": m1, "b": m2}, a, reference="a")
    assert alone == {k: together["a"][k] for k in alone}
    # Against itself: zero KL and full agreement.
    same = evaluate.evaluate_models({"t": m1, "copy": m1}, a, reference="t")["copy"]
    assert same["agreement_with_teacher"] == 1.0 and abs(same["kl_from_teacher"]) < 1e-6


def test_accuracy_and_perplexity_match_a_direct_computation():
    batches = evaluate.fixed_masked_batches(_batches(seed=1), _vocab(), seed=0)
    module, params = _model(2)
    got = evaluate.evaluate_models({"m": (module, params)}, batches)["m"]
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


def test_most_frequent_token_baseline():
    batches = evaluate.fixed_masked_batches(_batches(seed=2), _vocab(), seed=0)
    counts = np.zeros(VOCAB)
    counts[0] = 1e9  # a special token never counts
    counts[9] = 50
    token, acc = evaluate.most_frequent_accuracy(batches, counts, SPECIALS)
    hits = sum(((b["labels"] == 9) & (b["targets"] == 1)).sum() for b in batches)
    assert token == 9 and acc == hits / sum(b["targets"].sum() for b in batches)
