"""Dynamic MLM masking: exact counts, eligibility, 80/10/10, smoothing, determinism."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from distil_jax.train.masking import IGNORE_INDEX, mask_tokens, token_probs_from_counts

VOCAB, PAD, CLS, SEP, MASK = 40, 0, 1, 2, 3
SPECIALS = (PAD, CLS, SEP, MASK)


def _batch(seed, b=8, s=32):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, s + 1, size=b)
    ids = rng.integers(4, VOCAB, size=(b, s))
    mask = (np.arange(s)[None] < lengths[:, None]).astype(np.int32)
    ids[:, 0] = CLS
    ids[np.arange(b), lengths - 1] = SEP
    ids = np.where(mask == 1, ids, PAD)
    return ids.astype(np.int32), mask


@functools.partial(jax.jit, static_argnames="mask_prop")
def _jit_mask(rng, ids, am, probs, mask_prop):
    return mask_tokens(rng, ids, am, probs, SPECIALS, MASK, VOCAB, mask_prop=mask_prop)


def _mask(rng, ids, am, probs=None, mask_prop=0.15):
    if probs is None:
        probs = token_probs_from_counts(np.ones(VOCAB), 0.7, SPECIALS)
    return _jit_mask(rng, ids, am, probs, mask_prop)


def test_token_probs_from_counts():
    probs = token_probs_from_counts([0, 1, 4, 100], smoothing=0.5, special_ids=[1])
    np.testing.assert_allclose(probs, [1.0, 0.0, 0.5, 0.1], rtol=1e-6)
    assert probs.dtype == np.float32


def test_exact_target_count_and_never_pad_or_special():
    for seed in range(5):
        ids, am = _batch(seed)
        masked, labels, weights = _mask(jax.random.key(seed), ids, am)
        chex.assert_shape([masked, labels, weights], ids.shape)
        weights = np.asarray(weights)
        assert weights.sum() == math.ceil(0.15 * am.sum())
        assert not weights[am == 0].any()
        assert not np.isin(ids[weights == 1], SPECIALS).any()
        labels = np.asarray(labels)
        np.testing.assert_array_equal(labels[weights == 1], ids[weights == 1])
        assert (labels[weights == 0] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(np.asarray(masked)[weights == 0], ids[weights == 0])


def test_count_is_capped_by_eligible_tokens():
    ids = np.array([[CLS, 5, SEP, PAD]], np.int32)  # 3 real tokens, one eligible
    am = np.array([[1, 1, 1, 0]], np.int32)
    _, _, weights = _mask(jax.random.key(0), ids, am, mask_prop=0.9)
    np.testing.assert_array_equal(np.asarray(weights), [[0, 1, 0, 0]])


def test_80_10_10_split():
    ids, am = _batch(0, b=64, s=64)
    masks = keeps = rands = 0
    for seed in range(20):
        masked, _, weights = _mask(jax.random.key(seed), ids, am)
        w = np.asarray(weights) == 1
        new, old = np.asarray(masked)[w], ids[w]
        masks += (new == MASK).sum()
        keeps += (new == old).sum()
        rands += ((new != MASK) & (new != old)).sum()
    total = masks + keeps + rands
    # A random replacement equals the original or [MASK] with probability 1/VOCAB each.
    expect = np.array([0.8 + 0.1 / VOCAB, 0.1 + 0.1 / VOCAB, 0.1 * (1 - 2 / VOCAB)])
    got = np.array([masks, keeps, rands]) / total
    sd = np.sqrt(expect * (1 - expect) / total)
    assert np.all(np.abs(got - expect) < 5 * sd), (got, expect, total)


def test_smoothing_makes_rare_tokens_likelier_than_their_frequency():
    # Token 4 is 9x more frequent than token 5 in the batch and in the counts.
    ids = np.where(np.arange(100) % 10 == 0, 5, 4)[None].astype(np.int32)
    am = np.ones_like(ids)
    counts = np.ones(VOCAB)
    counts[4], counts[5] = 900, 100
    probs = token_probs_from_counts(counts, 0.7, SPECIALS)
    rare = 0
    n = 200
    for seed in range(n):
        _, _, w = _mask(jax.random.key(seed), ids, am, probs=probs)
        rare += np.asarray(w)[ids == 5].sum()
    rare_share = rare / (n * math.ceil(0.15 * 100))
    assert rare_share > 0.2, rare_share  # frequency alone: 0.1; smoothed: ~0.3
    uniform = token_probs_from_counts(np.ones(VOCAB), 0.7, SPECIALS)
    rare_uniform = sum(np.asarray(_mask(jax.random.key(s), ids, am, probs=uniform)[2])[ids == 5].sum()
                       for s in range(n)) / (n * math.ceil(0.15 * 100))
    assert rare_uniform < 0.15, rare_uniform


def test_same_rng_same_masks_and_new_rng_new_masks():
    ids, am = _batch(1)
    a = _mask(jax.random.key(7), ids, am)
    b = _mask(jax.random.key(7), ids, am)
    c = _mask(jax.random.key(8), ids, am)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(np.asarray(a[2]), np.asarray(c[2]))


def test_jit_handles_different_real_token_counts_without_retracing():
    probs = token_probs_from_counts(np.ones(VOCAB), 0.7, SPECIALS)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(rng, ids, am):
        return mask_tokens(rng, ids, am, probs, SPECIALS, MASK, VOCAB)[2].sum()

    for seed in range(3):
        ids, am = _batch(seed)
        assert int(step(jax.random.key(seed), jnp.asarray(ids), jnp.asarray(am))) == math.ceil(0.15 * am.sum())
