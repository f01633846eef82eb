"""The trainer on its mesh: accumulation, sharding, resume, learning, the frozen teacher,
checkpoints, the config's problems (the objective alone: test_objective.py)."""

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles
from distil_jax import config as config_lib
from distil_jax import parallel
from distil_jax.train import step, trainer
from distil_jax.checkpoint import Checkpointer, params_fingerprint
from distil_jax.data import next_update
from distil_jax.train.masking import IGNORE_INDEX
from distil_jax.train.objective import Objective

NO_DROPOUT = {"teacher.model.hidden_dropout": 0.0, "teacher.model.attention_dropout": 0.0,
              "train.warmup_fraction": 0.0}


# --- accumulation ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FixedMasks(Objective):
    """Targets at fixed columns (2, 7, 12, ...) whatever the rng: the same rows get the same
    masks however they are grouped into micro-batches."""

    def mask(self, rng, input_ids, attention_mask):
        col = jnp.arange(input_ids.shape[-1])[None, :]
        targets = ((col % 5 == 2) & (attention_mask == 1)).astype(jnp.int32)
        masked = jnp.where(targets == 1, self.mask_id, input_ids)
        return masked, jnp.where(targets == 1, input_ids, IGNORE_INDEX), targets


def _recording_step(tr, obj=None):
    """The trainer's update (on its mesh: the per-device micro-batch loop and the one gradient
    reduction) with oracles.recording_tx: (state, teacher_params, batches) -> (the update's
    gradient, metrics). Nothing donated."""
    tx = oracles.recording_tx()
    update = jax.jit(functools.partial(step.train_step, model=tr.model, teacher=tr.teacher, tx=tx,
                                       schedule=tr.schedule, obj=obj or tr.objective, mesh=tr.mesh))

    def run(state, teacher_params, batches):
        fresh = step.TrainState(step=state.step, params=state.params, opt_state=tx.init(state.params), rng=state.rng)
        after, metrics = update(fresh, teacher_params, parallel.global_batch(batches, tr.mesh))
        return jax.device_get(after.opt_state.inner_state), jax.device_get(metrics)
    return run


# float32 round-off: the step's gradient (micro-batches summed on 8 devices' rows, then
# averaged) against the oracle's (each micro-batch whole, the mean taken in float64) differs
# by at most 4.3e-7 of the gradient's largest element, and grad_norm by 2e-7 (measured: k=4
# and k=1 over the same rows, two updates with dropout). A sum in place of the mean is off
# by k - 1, a division by k + 1 by 1 / (k + 1), a shard counted twice or a pmean in place
# of a psum by 1 / 8 or more.
GRAD_RTOL = 2e-6


def test_k_micro_batches_equal_one_batch_of_k_times_the_rows(tiny, tmp_path):
    """One update over [k, b, seq] hands the optimizer the gradient of one over [1, k*b, seq]
    of the same rows (same masks, no dropout, every micro-batch with as many real tokens and
    targets), which is the plain autodiff gradient of the whole batch; its grad_norm the
    same; and moves the params alike through AdamW."""
    k, b = 4, 8
    tr = trainer.build(tiny(**NO_DROPOUT, **{"train.batch_size": k * b, "train.micro_batch_size": b}),
                       str(tmp_path))
    obj = FixedMasks(**{f.name: getattr(tr.objective, f.name) for f in dataclasses.fields(Objective)})
    update = jax.jit(functools.partial(step.train_step, model=tr.model, teacher=tr.teacher, tx=tr.tx,
                                       schedule=tr.schedule, obj=obj))
    ids = np.random.default_rng(0).integers(5, 128, size=(k * b, 16)).astype(np.int32)
    batches = {"input_ids": ids.reshape(k, b, 16), "attention_mask": np.ones((k, b, 16), np.int32)}
    one = {key: v.reshape(1, k * b, 16) for key, v in batches.items()}
    state = tr.create(tr.initial_params())
    # The gradients themselves: the step over k, over 1, and the oracle's (no mesh, one batch).
    record = _recording_step(tr, obj)
    grads_k, rec_k = record(state, tr.teacher_params, batches)
    grads_1, rec_1 = record(state, tr.teacher_params, one)
    want, want_norm = oracles.mean_gradient(state.params, tr.teacher_params, state.rng, 0, [
        {key: v[0] for key, v in one.items()}], model=tr.model, teacher=tr.teacher, obj=obj)
    errors = {"k": oracles.gradient_error(grads_k, want), "1": oracles.gradient_error(grads_1, want)}
    assert max(errors.values()) < GRAD_RTOL, errors
    np.testing.assert_allclose([rec_k["grad_norm"], rec_1["grad_norm"]], want_norm, rtol=GRAD_RTOL)
    # AdamW after it.
    after_k, metrics_k = update(state, tr.teacher_params, batches)
    after_1, metrics_1 = update(state, tr.teacher_params, one)
    start = jax.device_get(state.params)
    assert not np.allclose(jax.device_get(after_1.params)["word_embeddings"]["embedding"],
                           start["word_embeddings"]["embedding"])
    chex.assert_trees_all_close(jax.device_get(after_k.params), jax.device_get(after_1.params),
                                atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose([metrics_k["grad_norm"], metrics_1["grad_norm"]], want_norm, rtol=GRAD_RTOL)
    np.testing.assert_allclose(metrics_k["loss"] / k, metrics_1["loss"], rtol=1e-5)
    assert float(metrics_k["finite_micro_batches"]) == k and float(metrics_k["updates"]) == 1.0


def test_the_update_equals_multisteps_over_the_same_micro_batches(tiny, tmp_path, host):
    """The step (one call per update, optax.microbatch over [k, rows, seq]) = optax.MultiSteps
    fed one micro-batch per call, masks and dropout included, over two updates: the
    gradient handed to the optimizer and its grad_norm (the mean of the micro-batches'
    gradients, oracles.mean_gradient) at each update, then the params after AdamW."""
    k = 3
    tr = trainer.build(tiny(**{"train.steps": 2, "train.batch_size": 16 * k, "train.warmup_fraction": 0.0}),
                       str(tmp_path))
    state = tr.create(tr.initial_params())
    micro = [{key: v[:, :12] for key, v in next(tr.data).items()} for _ in range(2 * k)]  # one length
    want, want_metrics = oracles.multisteps_updates(tr, state.params, state.rng, micro)
    jitted = step.compiled_step(tr.model, tr.teacher, tr.tx, tr.schedule, tr.objective, tr.mesh,
                                tr.state_shardings, tr.teacher_shardings)
    record = _recording_step(tr)
    for u in range(2):
        group = micro[u * k:(u + 1) * k]
        stacked = {key: np.stack([m[key] for m in group]) for key in group[0]}
        grads, _ = record(state, tr.teacher_params, stacked)  # at this update's params, before AdamW's
        mean, norm = oracles.mean_gradient(state.params, tr.teacher_params, state.rng, u, group,
                                           model=tr.model, teacher=tr.teacher, obj=tr.objective)
        error = oracles.gradient_error(grads, mean)
        state, metrics = jitted(state, tr.teacher_params, stacked)
        assert error < GRAD_RTOL, (u, error)
        np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=GRAD_RTOL)
        summed = jax.tree.map(lambda *x: sum(x), *want_metrics[u * k:(u + 1) * k])
        chex.assert_trees_all_close(host({key: metrics[key] for key in summed}), host(summed), rtol=1e-4, atol=1e-6)
    assert int(state.step) == 2
    chex.assert_trees_all_close(host(state.params), host(want), rtol=1e-4, atol=1e-6)
    assert not np.allclose(host(state.params)["mlm_head"]["bias"], 0.0)


def test_the_loop_counts_and_checkpoints_updates(tiny, tmp_path):
    """3 micro-batches per update, stacked and padded to several lengths: checkpoints are
    named by update, every_steps and log_every count updates."""
    config = tiny(**{"train.steps": 3, "train.batch_size": 48, "checkpoint.every_steps": 2, "train.log_every": 2})
    state, summary = trainer.train(config, str(tmp_path))
    assert summary["update"] == 3 and int(state.step) == 3 and summary["last_checkpoint"] == 3
    assert Checkpointer(str(tmp_path / "checkpoints"), keep=3).all_steps() == [2, 3]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3] and np.isfinite(records[-1]["loss"])
    json.dumps(summary)  # JSON-safe


# --- sharding --------------------------------------------------------------------------------
SINGLE_DEVICE = """
import numpy as np, jax, chex
from distil_jax.train import trainer
chex.clear_trace_counter()
state, _ = trainer.train(config, {workdir!r}, step_wrapper=chex.assert_max_traces(n=1))
params = jax.device_get(state.params)
np.savez({out!r}, **{{jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}})
"""


def test_sharded_training_equals_single_device(tmp_path, tiny, tiny_source, env):
    assert jax.device_count() == 8, (
        f"needs 8 devices, found {jax.device_count()}: conftest.py sets XLA_FLAGS="
        "--xla_force_host_platform_device_count=8 before jax is imported; run the tests with pytest")
    # The single-device reference runs in a subprocess without fake devices.
    out = tmp_path / "single.npz"
    code = tiny_source(**{"mesh.shape": (1, 1, 1)}) + SINGLE_DEVICE.format(workdir=str(tmp_path / "single"), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = dict(np.load(out))
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        chex.clear_trace_counter()  # counted per function definition, across runs
        state, _ = trainer.train(tiny(**{"mesh.shape": shape}), str(tmp_path / "x".join(map(str, shape))),
                                 step_wrapper=chex.assert_max_traces(n=1))
        flat = {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))}
        assert flat.keys() == single.keys()
        for k in flat:
            np.testing.assert_allclose(flat[k], single[k], atol=2e-5, rtol=1e-4, err_msg=f"{shape} {k}")
        # The loss and the gradient's norm at every update, which AdamW's near scale-invariance
        # would hide in the params (a mean over one device's rows, a shard counted twice).
        got = _per_update(tmp_path / "x".join(map(str, shape)))
        want = _per_update(tmp_path / "single")
        assert sorted(got) == sorted(want) == [1, 2, 3]
        for step_ in want:
            np.testing.assert_allclose(got[step_], want[step_], rtol=2e-5, err_msg=f"{shape} update {step_}")


def _per_update(workdir):
    """{update: (loss, grad_norm)} from a run's metrics.jsonl (log_every 1)."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records if "grad_norm" in r}


def _computations(hlo: str):
    """{computation name: its instruction lines} of a compiled module's text."""
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head:
            name = head.group(1)
            comps[name] = []
        elif name and line.startswith(" "):
            comps[name].append(line)
    return comps


def all_reduces(hlo: str):
    """[(inside a while loop, elements reduced)] for every all-reduce of a compiled module."""
    comps = _computations(hlo)
    called = r"(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
    todo = [body for lines in comps.values() for line in lines for body in re.findall(r"body=%?([\w.\-]+)", line)]
    in_loop = set()
    while todo:
        name = todo.pop()
        if name in in_loop or name not in comps:
            continue
        in_loop.add(name)
        for line in comps[name]:
            todo += re.findall(called, line)
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                todo += [g.strip().lstrip("%") for g in group.split(",")]
    found = []
    for name, lines in comps.items():
        for line in lines:
            op = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.*?) all-reduce(?:-start)?\(", line)
            if op:
                elements = sum(math.prod(int(d) for d in dims.split(",") if d)
                               for dims in re.findall(r"[a-z]\w*\[([\d,]*)\]", op.group(1)))
                found.append((name in in_loop, elements))
    return found


def test_gradients_cross_the_devices_once_per_update_whatever_k(tiny, tmp_path):
    """On an 8-device data-parallel mesh, the compiled update reduces the gradients once,
    after its micro-batch loop: no all-reduce of more than a few scalars inside the loop, and
    as many gradient-sized all-reduces executed for k = 4 as for k = 1. (With the loop left
    to XLA's partitioner, the gradients' all-reduce sits inside it and runs k times.)"""
    assert jax.device_count() == 8, "conftest.py gives the tests 8 CPU devices"
    executed = {}
    for k in (1, 4):
        tr = trainer.build(tiny(**{"train.batch_size": 16 * k, "mesh.shape": (8, 1, 1)}), str(tmp_path / str(k)))
        state = tr.create(tr.initial_params())
        batch = parallel.global_batch(next_update(tr.data, k, tr.vocab.pad_id), tr.mesh)
        hlo = step.compiled_step(tr.model, tr.teacher, tr.tx, tr.schedule, tr.objective, tr.mesh, tr.state_shardings,
                                 tr.teacher_shardings).lower(state, tr.teacher_params, batch).compile().as_text()
        found = all_reduces(hlo)
        in_loop = [n for inside, n in found if inside]
        assert k == 1 or in_loop, "k = 4 compiles to a loop over the micro-batches"
        # (the losses' denominators and the metrics: a few scalars per micro-batch; no parameter has <= 16)
        assert all(n <= 16 for n in in_loop), f"k={k}: a gradient all-reduce inside the micro-batch loop: {in_loop}"
        big = [n for inside, n in found if not inside and n > 16]
        executed[k] = len(big)
        # the one reduction carries the student's gradients (every parameter)
        assert sum(big) >= sum(x.size for x in jax.tree.leaves(state.params)), (k, big)
    assert executed[1] == executed[4] == 1, executed


# --- resume, learning, teacher --------------------------------------------------------------
def test_resume_equals_uninterrupted(tmp_path, tiny, host):
    n = 3
    config = tiny(**{"train.steps": 2 * n, "checkpoint.every_steps": n, "checkpoint.async_save": True})
    straight, _ = trainer.train(config, str(tmp_path / "a"))
    # The same run cut at update n: remove the final checkpoint, start again.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / str(2 * n))
    resumed, _ = trainer.train(config, str(tmp_path / "b"))
    chex.assert_trees_all_close(host(resumed.params), host(straight.params), atol=1e-6)
    chex.assert_trees_all_close(host(resumed.opt_state), host(straight.opt_state), atol=1e-6)
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    keys = ("step", "loss", "loss_ce", "loss_mlm", "loss_cos", "grad_norm", "lr", "mlm_accuracy")
    a, b = read("a"), read("b")
    assert [r["step"] for r in b] == list(range(1, 2 * n + 1))
    for ra, rb in zip(a, b, strict=True):
        for k in keys:
            np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, err_msg=f"step {ra['step']} {k}")


def test_loss_falls_when_pretraining_on_a_fixed_corpus(tmp_path, tiny, read_events):
    config = tiny(**{"mode": "pretrain", "train.steps": 60, "train.learning_rate": 1e-2,
                     "train.log_every": 10, "checkpoint.every_steps": 60,
                     "data.synthetic.num_sequences": 64})
    trainer.train(config, str(tmp_path))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 0.5, (first, last)
    # TensorBoard's event file holds the same scalars, every record's checksums right.
    (events,) = (tmp_path / "tensorboard").iterdir()
    logged = read_events(events.read_bytes())
    assert logged[0].file_version == "brain.Event:2"
    assert logged[1].step == 1 and logged[1].session_log.status == logged[1].session_log.START  # the restart marker
    assert [e.step for e in logged[2:]] == [r["step"] for r in records]
    for e, r in zip(logged[2:], records):
        values = {v.tag: v.simple_value for v in e.summary.value}
        assert values["loss"] == pytest.approx(r["loss"], rel=1e-6) and values.keys() <= r.keys()


def _tensor_type(x) -> str:
    """x's StableHLO tensor type, e.g. 32x4x8xf32 or i32."""
    dtype = {"float32": "f32", "bfloat16": "bf16", "int32": "i32", "uint32": "ui32", "bool": "i1"}[str(x.dtype)]
    return "x".join([*map(str, x.shape), dtype])


def _assert_state_donated_teacher_not(tr, state):
    """The compiled update's program aliases every state buffer it reads to the same leaf of
    the new state (donated: updated in place), and donates nothing else (not the teacher's
    params, not the batch). Read from the program, where a backend that ignored donation
    could not hide it (a deleted-buffer check on CPU could)."""
    batch = parallel.global_batch(next_update(tr.data, tr.accumulation, tr.vocab.pad_id), tr.mesh)
    jitted = step.compiled_step(tr.model, tr.teacher, tr.tx, tr.schedule, tr.objective, tr.mesh,
                                tr.state_shardings, tr.teacher_shardings)
    text = jitted.lower(state, tr.teacher_params, batch).as_text()
    signature = text[text.index("func.func public @main("):]
    signature = signature[:signature.index(") -> (")]
    args = [(re.match(r"tensor<([^>]*)>", chunk).group(1), re.search(r"tf\.aliasing_output = (\d+)", chunk),
             "jax.buffer_donor" in chunk) for chunk in re.split(r"%arg\d+: ", signature)[1:]]
    state_leaves = jax.tree.leaves(state)
    aliased = [int(a.group(1)) for _, a, _ in args if a]
    # The state's arguments come first (the step may leave out one it never reads, e.g.
    # apply_if_finite's last_finite flag): each aliased to its own leaf of the new state ...
    assert aliased == sorted(aliased) and set(aliased) <= set(range(len(state_leaves))), aliased
    for (kind, _, _), i in zip(args, aliased):
        assert kind == _tensor_type(state_leaves[i]), (i, kind)
    big = {i for i, x in enumerate(state_leaves) if x.ndim and jnp.issubdtype(x.dtype, jnp.floating)}
    assert big <= set(aliased), f"params / AdamW moments not donated: {sorted(big - set(aliased))}"
    # ... then the teacher's params and the batch, every one of them, none donated.
    rest = args[len(aliased):]
    assert [kind for kind, _, _ in rest] == [_tensor_type(x) for x in jax.tree.leaves((tr.teacher_params, batch))]
    assert not any(a or donor for _, a, donor in rest), "the teacher's params or the batch are donated"


def test_distillation_never_changes_the_teacher(tmp_path, tiny, host):
    config = tiny(**{"train.steps": 6, "checkpoint.every_steps": 3})  # the resume test's program
    tr = trainer.build(config, str(tmp_path))
    state, summary = trainer.fit(tr)
    # The arrays the steps read, after training, against a teacher built afresh (same seed).
    used = tr.teacher_params
    _assert_state_donated_teacher_not(tr, state)
    assert params_fingerprint(used) == params_fingerprint(trainer.load_teacher(config)[1])
    meta = json.loads((tmp_path / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["teacher"]["fingerprint"] == params_fingerprint(used)  # recorded, never saved
    saved, _ = Checkpointer(str(tmp_path / "checkpoints"), keep=3).restore(6)
    shapes = lambda t: jax.tree.map(np.shape, t)  # noqa: E731
    assert shapes(saved["params"]) == shapes(host(state.params))  # the student's tensors only
    assert summary["metrics"]["loss_ce"] >= 0 and np.isfinite(summary["metrics"]["loss"])
    assert list((tmp_path / "tensorboard").iterdir())
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("step", "loss", "loss_ce", "loss_mlm", "loss_cos", "lr", "tokens_per_s", "kl_t1",
                "agreement", "mlm_accuracy", "grad_norm", "sequences_per_s", "step_time_s",
                "tflops_per_device", "mfu"):
        assert key in record, key


# --- checkpoints -----------------------------------------------------------------------------
def test_unreadable_newest_checkpoint_falls_back_to_an_older_one(tmp_path, tiny):
    config = tiny(**{"train.steps": 6, "checkpoint.every_steps": 3})  # the resume test's program
    trainer.train(config, str(tmp_path))
    for f in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name.lower():
            f.write_bytes(b"\0" * 7)  # truncated garbage
    state, step_ = trainer.build(config, str(tmp_path)).restore_or_init()
    assert step_ == 3 and int(state.step) == 3


# --- config ----------------------------------------------------------------------------------
def test_every_problem_is_listed_before_anything_runs(tiny):
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
    # A teacher's architecture is an input: validation reads no file.
    far = tiny(**{"teacher.path": "/no/such/teacher"})
    config_lib.validate(far, num_devices=1)
    with pytest.raises(config_lib.ConfigError, match="longer than the teacher's 8 position"):
        config_lib.validate(far, num_devices=1, teacher=config_lib.BertConfig(max_position_embeddings=8))


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(os.path.join(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))), "configs")) if f.endswith(".py")))
def test_every_config_loads_and_validates(name, config_file):
    module = config_file(name)
    c = module.get_config()
    assert module.__doc__ and "python -m distil_jax.main" in module.__doc__ and f"{name}.py" in module.__doc__
    # A teacher dir or hub name is not at hand offline: validate against its architecture.
    teacher = None if not c.teacher.path else config_lib.BertConfig()
    config_lib.validate(c, num_devices=8, teacher=teacher)
