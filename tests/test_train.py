"""The trainer: accumulation, sharding, resume, learning, the frozen teacher, checkpoints."""

import functools
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distil_jax import config as config_lib
from distil_jax import experiment, train
from distil_jax.checkpoint import params_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**overrides):
    """configs/tiny.py made smaller still, with dotted-key overrides."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.teacher.model.update(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                           intermediate_size=64, max_position_embeddings=32)
    c.student.num_layers = 1
    c.data.seq_len = 16
    c.data.synthetic.num_sequences = 256
    c.train.update(steps=3, batch_size=32, micro_batch_size=16, log_every=1)
    c.mesh.shape = (-1, 1, 1)
    return config_lib.with_changes(c, **overrides)


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


# --- accumulation --------------------------------------------------------------------
def test_accumulated_micro_batches_equal_one_big_batch():
    k, b = 4, 8
    config = tiny(**{"teacher.model.hidden_dropout": 0.0, "teacher.model.attention_dropout": 0.0,
                     "train.warmup_fraction": 0.0, "train.batch_size": k * b, "train.micro_batch_size": b,
                     "mesh.shape": (-1, 1, 1), "train.accumulate": "multisteps"})
    exp = experiment.build(config)
    obj = train.Objective.from_config(config, exp.vocab)
    grads_fn = jax.jit(functools.partial(train.loss_and_grads, model=exp.model, teacher=exp.teacher, obj=obj))
    params = exp.initial_params()

    # k micro-batches without padding: every micro-batch has the same number of real
    # tokens and of MLM targets, so the mean of micro-batch means is the big batch's mean.
    rng = np.random.default_rng(0)
    ids = rng.integers(5, config.teacher.model.vocab_size, size=(k * b, config.data.seq_len)).astype(np.int32)
    am = np.ones_like(ids)
    micro = []
    for i in range(k):
        sl = slice(i * b, (i + 1) * b)
        masked, labels, targets = obj.mask(jax.random.key(i), jnp.asarray(ids[sl]), jnp.asarray(am[sl]))
        micro.append((masked, jnp.asarray(am[sl]), labels, targets))
    assert len({int(m[3].sum()) for m in micro}) == 1
    big = [jnp.concatenate([m[j] for m in micro]) for j in range(4)]

    tx_k, _ = train.make_optimizer(config.train, total_updates=10)
    small = config.train.copy_and_resolve_references()
    small.batch_size = small.micro_batch_size = k * b
    tx_1, _ = train.make_optimizer(small, total_updates=10)

    p_acc, s_acc = params, tx_k.init(params)
    for i, m in enumerate(micro):
        _, g = grads_fn(p_acc, exp.teacher_params, *m, jax.random.key(99))
        upd, s_acc = tx_k.update(g, s_acc, p_acc)
        p_acc = optax.apply_updates(p_acc, upd)
        if i < k - 1:  # nothing moves until the k-th micro-batch
            chex.assert_trees_all_equal(p_acc, params)
    _, g = grads_fn(params, exp.teacher_params, *big, jax.random.key(99))
    upd, _ = jax.jit(tx_1.update)(g, tx_1.init(params), params)
    p_big = optax.apply_updates(params, upd)
    assert not np.allclose(host(p_big)["word_embeddings"]["embedding"],
                           host(params)["word_embeddings"]["embedding"])
    chex.assert_trees_all_close(host(p_acc), host(p_big), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("changes", [
    {"distill.restrict_ce_to_mask": False, "distill.alpha_mse": 0.5},
    {"distill.restrict_ce_to_mask": True},
    {"mode": "pretrain"},
    {"train.remat": "full"},
    {"train.remat": "dots", "distill.restrict_ce_to_mask": True},
])
def test_fused_chunked_objective_equals_whole_logits(changes):
    """Chunked projection (and remat) give the plain step's metrics and gradients."""
    def metrics_and_grads(**more):
        config = tiny(**{**changes, **more})
        exp = experiment.build(config)
        obj = train.Objective.from_config(config, exp.vocab)
        ids = jnp.asarray(np.random.default_rng(0).integers(5, 128, size=(4, 16)), jnp.int32)
        am = jnp.asarray(np.arange(16)[None, :] < np.array([[16], [11], [7], [16]]), jnp.int32)
        masked, labels, targets = obj.mask(jax.random.key(3), ids, am)
        fn = jax.jit(functools.partial(train.loss_and_grads, model=exp.model, teacher=exp.teacher, obj=obj))
        return host(fn(exp.initial_params(), exp.teacher_params, masked, am, labels, targets,
                       jax.random.key(4)))

    (m_plain, g_plain), (m_fused, g_fused) = (metrics_and_grads(**{"train.loss_chunk": 0, "train.remat": "none"}),
                                              metrics_and_grads(**{"train.loss_chunk": 7}))
    assert set(m_plain) == set(m_fused)
    chex.assert_trees_all_close(m_fused, m_plain, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)
    assert float(m_plain["loss"]) > 0


def test_bfloat16_compute_keeps_float32_master_params_and_loss():
    """train.dtype=bfloat16: params and gradients stay float32, the teacher is stored in
    bf16, the loss is float32 and close to the float32 step's."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny(**{"train.dtype": dtype, "teacher.dtype": dtype})
        exp = experiment.build(config)
        obj = train.Objective.from_config(config, exp.vocab)
        ids = jnp.asarray(np.random.default_rng(0).integers(5, 128, size=(4, 16)), jnp.int32)
        am = jnp.ones_like(ids)
        masked, labels, targets = obj.mask(jax.random.key(3), ids, am)
        params = exp.initial_params()
        fn = jax.jit(functools.partial(train.loss_and_grads, model=exp.model, teacher=exp.teacher, obj=obj))
        metrics, grads = fn(params, exp.teacher_params, masked, am, labels, targets, jax.random.key(4))
        results[dtype] = host(metrics), grads, params, exp.teacher_params
    m16, g16, p16, t16 = results["bfloat16"]
    assert {x.dtype for x in jax.tree.leaves(p16)} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(g16)} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(t16)} == {np.dtype(jnp.bfloat16)}
    assert m16["loss"].dtype == np.float32 and np.isfinite(m16["loss"])
    np.testing.assert_allclose(m16["loss"], results["float32"][0]["loss"], rtol=3e-2)


def test_train_step_updates_every_k_micro_batches(tmp_path):
    config = tiny(**{"train.steps": 1, "train.batch_size": 48, "train.micro_batch_size": 16,
                     "train.warmup_fraction": 0.0, "train.accumulate": "multisteps"})
    run = train.make_run(config, str(tmp_path))
    state, _ = train.restore_or_init(run)
    step = jax.jit(functools.partial(
        train.train_step, model=run.exp.model, teacher=run.exp.teacher, tx=run.tx,
        schedule=run.schedule, obj=run.objective, accumulation=3))
    start = host(state.params)
    seen = []
    for i in range(3):
        batch = {k: jnp.asarray(v) for k, v in next(run.exp.train_data).items()}
        state, metrics = step(state, run.exp.teacher_params, batch)
        seen.append(float(metrics["updates"]))
        changed = not np.allclose(host(state.params)["mlm_head"]["bias"], start["mlm_head"]["bias"])
        assert changed == (i == 2)
    assert seen == [0.0, 0.0, 1.0]
    assert float(metrics["grad_norm"]) > 0 and float(metrics["lr"]) > 0


def test_scan_accumulation_equals_multisteps(tmp_path):
    """accumulate="scan" (one call per update) = MultiSteps over the same micro-batches."""
    k = 3
    changes = {"train.steps": 2, "train.batch_size": 16 * k, "train.micro_batch_size": 16,
               "train.warmup_fraction": 0.0}
    runs = {mode: train.make_run(tiny(**changes, **{"train.accumulate": mode}), str(tmp_path / mode))
            for mode in ("multisteps", "scan")}
    states = {mode: train.restore_or_init(run)[0] for mode, run in runs.items()}
    steps = {mode: train.compiled_step(run) for mode, run in runs.items()}
    data = runs["scan"].exp.train_data
    micro = [{k: v[:, :12] for k, v in next(data).items()} for _ in range(2 * k)]  # one length
    for u in range(2):
        group = micro[u * k:(u + 1) * k]
        windows = None
        for m in group:
            states["multisteps"], metrics = steps["multisteps"](states["multisteps"], runs["multisteps"].exp.teacher_params, m)
            windows = train.add_metrics(windows, metrics)
        stacked = {key: np.stack([m[key] for m in group]) for key in group[0]}
        states["scan"], scan_metrics = steps["scan"](states["scan"], runs["scan"].exp.teacher_params, stacked)
        chex.assert_trees_all_close(host(scan_metrics), host(windows), rtol=1e-4, atol=1e-6)
    assert int(states["scan"].step) == int(states["multisteps"].step) == 2 * k
    chex.assert_trees_all_close(host(states["scan"].params), host(states["multisteps"].params),
                                rtol=1e-4, atol=1e-6)
    assert not np.allclose(host(states["scan"].params)["mlm_head"]["bias"], 0.0)
    # The loop runs with it (stacked, padded micro-batches of several lengths) and checkpoints.
    config = tiny(**{**changes, "train.accumulate": "scan", "train.steps": 3, "checkpoint.every_steps": 2})
    result = train.train_and_evaluate(config, str(tmp_path / "loop"))
    assert result["update"] == 3 and result["micro_step"] == 3 * k and np.isfinite(result["metrics"]["loss"])
    assert result["last_checkpoint"] == 3 * k


# --- sharding --------------------------------------------------------------------------
def _train_params(tmp_path, mesh_shape, name):
    config = tiny(**{"mesh.shape": mesh_shape})
    chex.clear_trace_counter()  # counted per function definition, across runs
    result = train.train_and_evaluate(config, str(tmp_path / name),
                                      step_wrapper=chex.assert_max_traces(n=1))
    return host(result["state"].params), result["metrics"]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: see conftest.py")
def test_sharded_training_equals_single_device(tmp_path):
    # The single-device reference runs in a subprocess without fake devices.
    import subprocess
    import sys
    out = tmp_path / "single.npz"
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.dirname(__file__)!r});"
            "import numpy as np, jax, test_train as t;"
            f"p, _ = t._train_params(__import__('pathlib').Path({str(tmp_path)!r}), (1, 1, 1), 'single');"
            f"np.savez({str(out)!r}, **{{jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(p)}})")
    env = dict(os.environ, XLA_FLAGS="")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = dict(np.load(out))
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        params, _ = _train_params(tmp_path, shape, "mesh_" + "x".join(map(str, shape)))
        flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
        assert flat.keys() == single.keys()
        for k in flat:
            np.testing.assert_allclose(flat[k], single[k], atol=2e-5, rtol=1e-4, err_msg=f"{shape} {k}")


# --- resume, learning, teacher ------------------------------------------------------------
def test_resume_equals_uninterrupted(tmp_path):
    n = 3
    config = tiny(**{"train.steps": 2 * n, "checkpoint.every_steps": n, "checkpoint.async_save": True})
    straight = train.train_and_evaluate(config, str(tmp_path / "a"))
    # The same run cut at update n: remove the final checkpoint, start again.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / str(2 * n * 2))
    resumed = train.train_and_evaluate(config, str(tmp_path / "b"))
    chex.assert_trees_all_close(host(resumed["state"].params), host(straight["state"].params), atol=1e-6)
    chex.assert_trees_all_close(host(resumed["state"].opt_state), host(straight["state"].opt_state), atol=1e-6)
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    keys = ("step", "loss", "loss_ce", "loss_mlm", "loss_cos", "grad_norm", "lr", "mlm_accuracy")
    a, b = read("a"), read("b")
    assert [r["step"] for r in b] == list(range(1, 2 * n + 1))
    for ra, rb in zip(a, b, strict=True):
        for k in keys:
            np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, err_msg=f"step {ra['step']} {k}")


def test_loss_falls_when_pretraining_on_a_fixed_corpus(tmp_path):
    config = tiny(**{"mode": "pretrain", "train.steps": 60, "train.learning_rate": 1e-2,
                     "train.log_every": 10, "checkpoint.every_steps": 60,
                     "data.synthetic.num_sequences": 64})
    train.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 0.5, (first, last)


def test_distillation_never_changes_the_teacher(tmp_path):
    config = tiny(**{"train.steps": 4})
    result = train.train_and_evaluate(config, str(tmp_path))
    # The arrays the steps read, after training, against a teacher built afresh (same seed).
    used = result["teacher_params"]
    assert all(not x.is_deleted() for x in jax.tree.leaves(used))  # never donated (CPU ignores donation)
    assert params_fingerprint(used) == params_fingerprint(experiment.build(config).teacher_params)
    meta = json.loads((tmp_path / "checkpoints" / "8" / "meta" / "metadata").read_text())
    assert meta["teacher"]["fingerprint"] == params_fingerprint(used)  # recorded, never saved
    from distil_jax.checkpoint import Checkpointer
    saved, _ = Checkpointer(str(tmp_path / "checkpoints"), keep=3).restore(8)
    shapes = lambda t: jax.tree.map(np.shape, t)  # noqa: E731
    assert shapes(saved["params"]) == shapes(host(result["state"].params))  # the student's tensors only
    assert result["metrics"]["loss_ce"] >= 0 and np.isfinite(result["metrics"]["loss"])
    for name in ("metrics.jsonl",):
        assert (tmp_path / name).exists()
    assert list((tmp_path / "tensorboard").iterdir())
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("step", "loss", "loss_ce", "loss_mlm", "loss_cos", "lr", "tokens_per_s", "kl_t1",
                "agreement", "mlm_accuracy", "grad_norm", "sequences_per_s", "step_time_s",
                "tflops_per_device", "mfu"):
        assert key in record, key


# --- checkpoints -------------------------------------------------------------------------
def test_unreadable_newest_checkpoint_falls_back_to_an_older_one(tmp_path):
    config = tiny(**{"train.steps": 4, "checkpoint.every_steps": 2})
    train.train_and_evaluate(config, str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    newest = ckpts / "8"
    for f in (newest / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name.lower():
            f.write_bytes(b"\0" * 7)  # truncated garbage
    run = train.make_run(config, str(tmp_path))
    state, step = train.restore_or_init(run)
    assert step == 4 and int(state.step) == 4


# --- config ------------------------------------------------------------------------------
def test_every_problem_is_listed_before_anything_runs():
    c = tiny(**{"train.batch_size": 30, "distill.temperature": 0.0, "distill.alpha_ce": -1.0,
                "data.seq_len": 64, "student.hidden_size": 48, "student.num_heads": 4})
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c, num_devices=1)
    msg = str(e.value)
    for needle in ("batch_size 30 is not a multiple of train.micro_batch_size 16",
                   "temperature must be > 0", "alpha_ce is negative",
                   "seq_len 64 is longer than the teacher's 32 position embeddings",
                   "student.hidden_size 48 differs from the teacher's 32",
                   "alpha_cos > 0 needs equal widths"):
        assert needle in msg, (needle, msg)
    zero = tiny(**{f"distill.alpha_{k}": 0.0 for k in ("ce", "mlm", "cos", "mse")})
    with pytest.raises(config_lib.ConfigError, match="all 0"):
        config_lib.validate(zero, num_devices=1)
    dp = tiny(**{"mesh.shape": (-1, 1, 1), "train.micro_batch_size": 12, "train.batch_size": 24})
    with pytest.raises(config_lib.ConfigError, match="not a multiple of the data-parallel size 8"):
        config_lib.validate(dp, num_devices=8)


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py")))
def test_every_config_loads_and_validates(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert module.__doc__ and "python -m distil_jax.main" in module.__doc__ and name in module.__doc__
    # A teacher dir or hub name is not at hand offline: validate against its architecture.
    teacher = None if not c.teacher.path else config_lib.BertConfig()
    config_lib.validate(c, num_devices=8, teacher=teacher)


def test_mlm_only_distill_runs_no_teacher_and_equals_the_same_loss_with_it():
    """All teacher losses weighed 0 (the demo's MLM-only baseline): the teacher's forward is
    skipped, and the gradient is the one the full step gives for the MLM loss alone."""
    config = tiny(**{"distill.alpha_ce": 0.0, "distill.alpha_cos": 0.0, "distill.alpha_mse": 0.0,
                     "distill.alpha_mlm": 1.0})
    exp = experiment.build(config)
    obj = train.Objective.from_config(config, exp.vocab)
    assert not obj.uses_teacher and train.Objective.from_config(tiny(), exp.vocab).uses_teacher
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 128, size=(4, 16)), jnp.int32)
    am = jnp.ones_like(ids)
    masked, labels, targets = obj.mask(jax.random.key(3), ids, am)
    params = exp.initial_params()
    args = (params, exp.teacher_params, masked, am, labels, targets, jax.random.key(4))
    m_skip, g_skip = train.loss_and_grads(*args, model=exp.model, teacher=exp.teacher, obj=obj)
    m_none, g_none = train.loss_and_grads(*args, model=exp.model, teacher=None, obj=obj)
    assert "kl_t1" not in m_skip and "loss_cos" not in m_skip
    chex.assert_trees_all_close(g_skip, g_none)
    np.testing.assert_allclose(m_skip["loss"], m_skip["loss_mlm"])
