"""Dropout in our models (no torch needed: kept out of test_hf.py, which needs it)."""

import chex
import jax
import numpy as np

from distil_jax.models import DistilBert, DistilBertConfig, init_params


def test_dropout_is_active_only_when_not_deterministic():
    config = DistilBertConfig(vocab_size=120, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    model = DistilBert(config)
    params = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 120, size=(3, 16))
    am = np.ones((3, 16), np.int64)
    am[1, 11:] = 0
    am[2, 4:] = 0
    ids = np.where(am == 1, ids, 0)
    det = model.apply({"params": params}, ids, am).logits
    a = model.apply({"params": params}, ids, am, deterministic=False, rngs={"dropout": jax.random.key(1)}).logits
    b = model.apply({"params": params}, ids, am, deterministic=False, rngs={"dropout": jax.random.key(1)}).logits
    c = model.apply({"params": params}, ids, am, deterministic=False, rngs={"dropout": jax.random.key(2)}).logits
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(a, det) and not np.allclose(a, c)
