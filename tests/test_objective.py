"""The objective: the fused, blocked vocabulary terms against whole logits differentiated by
autodiff, bfloat16 compute, the MLM-only baseline without a teacher. On one device (none of
these needs a mesh: conftest.EIGHT_DEVICE_FILES)."""

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles
from conftest import NARROW
from distil_jax.metrics import train_flops_per_token
from distil_jax.terms import model_params
from distil_jax.train import objective, trainer


def _masked_inputs(obj, seed=3):
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 128, size=(4, 16)), jnp.int32)
    am = jnp.asarray(np.arange(16)[None, :] < np.array([[16], [11], [7], [16]]), jnp.int32)
    masked, labels, targets = obj.mask(jax.random.key(seed), ids, am)
    return masked, am, labels, targets


@pytest.mark.parametrize("changes", [
    {"distill.restrict_ce_to_mask": False, "distill.alpha_mse": 0.5},
    {"distill.restrict_ce_to_mask": True},
    {"mode": "pretrain"},
    {"train.remat": "full"},
    {"train.remat": "dots", "distill.restrict_ce_to_mask": True, "train.loss_chunk": 0},
    # Layer-pair terms: a narrow pruned student (projections across widths), and one of the
    # teacher's width and heads (attention distributions compared head by head).
    {**NARROW, "distill.layer_terms": (("relation",), ("hidden_mse", 0, 0, 0.5), ("hidden_cos", -1, -1))},
    {"distill.layer_terms": (("attention_kl", 2, 1), ("hidden_mse", 1, 1), ("relation", 1, 1, 0.3)),
     "distill.relation_heads": 2},
])
def test_fused_objective_equals_whole_logits_autodiff(changes, tiny, tmp_path, host):
    """The fused, blocked vocabulary terms (and remat) give the metrics and gradients of the
    plain losses on whole logits differentiated by autodiff (oracles.py)."""
    tr = trainer.build(tiny(**{"train.loss_chunk": 7, **changes}), str(tmp_path))
    args = (tr.initial_params(), tr.teacher_params, *_masked_inputs(tr.objective), jax.random.key(4))
    kw = dict(model=tr.model, teacher=tr.teacher, obj=tr.objective)
    m_fused, g_fused = host(jax.jit(functools.partial(objective.loss_and_grads, **kw))(*args))
    m_plain, g_plain = host(jax.jit(functools.partial(oracles.whole_logits_loss_and_grads, **kw))(*args))
    assert set(m_plain) == set(m_fused)
    chex.assert_trees_all_close(m_fused, m_plain, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)
    assert float(m_plain["loss"]) > 0


def _dot_operand_types(model, params, ids, attention_mask):
    """The element types of every dot_general's operands in the model's lowered forward."""
    text = jax.jit(lambda p, i, a: model.apply({"params": model_params(p)}, i, a, deterministic=True)).lower(
        params, ids, attention_mask).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    return [tuple(re.findall(r"tensor<[\dx]*x(\w+)>", re.search(r": \((.*)\) ->", line).group(1)))
            for line in dots]


def test_bfloat16_compute_keeps_float32_master_params_and_loss(tiny, tmp_path, host):
    """train.dtype=bfloat16: the student's forward multiplies in bf16 (every dot of its
    lowered program; float32's in float32), params and gradients stay float32, the teacher
    is stored in bf16, the loss is float32, and loss and gradients are float32's to bf16's
    precision, not to float32's (they were computed in bf16)."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        tr = trainer.build(tiny(**{"train.dtype": dtype, "teacher.dtype": dtype}), str(tmp_path / dtype))
        masked, am, labels, targets = _masked_inputs(tr.objective)
        params = tr.initial_params()
        dots = _dot_operand_types(tr.model, params, masked, am)
        assert len(dots) >= 8 and set(dots) == {({"float32": "f32", "bfloat16": "bf16"}[dtype],) * 2}, (dtype, dots)
        metrics, grads = jax.jit(functools.partial(objective.loss_and_grads, model=tr.model, teacher=tr.teacher,
                                                   obj=tr.objective))(
            params, tr.teacher_params, masked, am, labels, targets, jax.random.key(4))
        results[dtype] = host(metrics), host(grads), params, tr.teacher_params
    m16, g16, p16, t16 = results["bfloat16"]
    m32, g32 = results["float32"][:2]
    assert {x.dtype for x in jax.tree.leaves(p16)} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(g16)} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(t16)} == {np.dtype(jnp.bfloat16)}
    assert m16["loss"].dtype == np.float32 and np.isfinite(m16["loss"])
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=3e-2)
    # Measured: 5.9e-3 of the largest element (bf16 keeps 8 bits: 3.9e-3 per rounding);
    # float32 against float32 in another order: below 5e-7 (the same measure: test_trainer's GRAD_RTOL).
    error = oracles.gradient_error(g16, g32)
    assert 1e-4 < error < 3e-2, error
    norm = lambda g: np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(g)))  # noqa: E731
    np.testing.assert_allclose(norm(g16), norm(g32), rtol=1e-2)


def test_mlm_only_distill_runs_no_teacher_and_equals_the_same_loss_with_it(tiny, tmp_path):
    """All teacher terms weighed 0 (the demo's MLM-only baseline): the teacher's forward is
    skipped, the FLOPs leave it out, and the gradient is the MLM loss's alone."""
    tr = trainer.build(tiny(**{"distill.alpha_ce": 0.0, "distill.alpha_cos": 0.0, "distill.alpha_mse": 0.0,
                               "distill.alpha_mlm": 1.0}), str(tmp_path))
    obj = tr.objective
    assert not obj.weights.uses_teacher and objective.LossWeights(ce=1.0).uses_teacher
    args = (tr.initial_params(), tr.teacher_params, *_masked_inputs(obj), jax.random.key(4))
    grads_with = lambda teacher: jax.jit(functools.partial(  # noqa: E731
        objective.loss_and_grads, model=tr.model, teacher=teacher, obj=obj))(*args)
    (m_skip, g_skip), (m_none, g_none) = grads_with(tr.teacher), grads_with(None)
    assert "kl_t1" not in m_skip and "loss_cos" not in m_skip
    chex.assert_trees_all_close(g_skip, g_none)
    chex.assert_trees_all_close(m_skip, m_none)
    np.testing.assert_allclose(m_skip["loss"], m_skip["loss_mlm"])
    cfg = tr.teacher.config
    assert train_flops_per_token(obj, tr.model.config, cfg, 16) == train_flops_per_token(obj, tr.model.config, None, 16)
    full = dataclasses.replace(obj, weights=objective.LossWeights(ce=1.0, mlm=1.0))
    assert train_flops_per_token(full, tr.model.config, cfg, 16) > train_flops_per_token(obj, tr.model.config, cfg, 16)
