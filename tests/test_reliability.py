"""Fault injection: kill -9, a failing disk, NaNs. Nothing done before the last checkpoint is lost."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distil_jax.train import optim, trainer
from distil_jax.checkpoint import Checkpointer
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax 0.12 writes step N here, then renames it to N


# --- kill -9 at random moments ---------------------------------------------------------
UPDATES, EVERY = 24, 2  # checkpoints are named by update
KILL_FLAGS = [f"--config.train.steps={UPDATES}", "--config.train.log_every=1",
              f"--config.checkpoint.every_steps={EVERY}", "--config.data.seq_len=16",
              "--config.data.synthetic.num_sequences=128"]


def _start(workdir, log, env):
    # Every start shares the session's compilation cache (conftest.py): a restart loads
    # the step instead of compiling it again.
    return subprocess.Popen(
        [sys.executable, "-m", "distil_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
         *KILL_FLAGS], cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)


def _finished_steps(workdir):
    d = workdir / "checkpoints"
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if d.exists() else []


def _writing(workdir, after):
    """Names of temporary (half-written) checkpoint dirs of steps after `after`."""
    d = workdir / "checkpoints"
    names = os.listdir(d) if d.exists() else []
    return [n for n in names if TMP_SUFFIX in n and int(n.split(".")[0]) > after]


def _logged(workdir):
    path = workdir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _wait_for(condition, proc, timeout=300, poll=0.01):
    """Until `condition()` (a file or directory of the run appears, a record is logged): one
    listing every `poll` s, which leaves the cores to the run under test (a 1 ms poll took a
    good share of one of this machine's two). `timeout` is a safety net; the run's exit
    (proc.poll) ends the wait at once."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "timed out waiting for the kill point"
        time.sleep(poll)


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _records(workdir):
    """Complete lines only: a kill can tear the last one."""
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().split("\n")[:-1]]


def test_sigkill_at_random_moments_loses_nothing(tmp_path, env, host):
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight_log = open(tmp_path / "straight.log", "w")
    straight = _start(straight_dir, straight_log, env)  # runs beside the killed ones

    rng = np.random.default_rng(8)
    kinds = ["after checkpoint"] * 2 + ["during checkpoint write"]
    rng.shuffle(kinds)
    kills, missed = [], 0
    with open(tmp_path / "killed.log", "w") as log:
        for kind in kinds:
            for _attempt in range(3):  # a write can finish between seeing it and the kill landing
                resumed_from = (_finished_steps(killed_dir) or [0])[-1]
                proc = _start(killed_dir, log, env)
                if kind == "during checkpoint write":
                    _wait_for(lambda: _writing(killed_dir, resumed_from), proc)
                    _kill(proc)
                    half_written = _writing(killed_dir, resumed_from)
                    if not half_written:
                        missed += 1
                        continue
                    kills.append((kind, resumed_from, half_written))
                else:
                    # Past the next checkpoint by 0 to 2 logged updates and up to 0.1 s more.
                    target = resumed_from + EVERY
                    _wait_for(lambda: _finished_steps(killed_dir)[-1:] >= [target], proc)
                    extra = int(rng.integers(0, 3))
                    _wait_for(lambda: _logged(killed_dir) >= target + extra, proc)
                    time.sleep(float(rng.uniform(0, 0.1)))
                    _kill(proc)
                    kills.append((kind, resumed_from, _records(killed_dir)[-1]["step"]))
                break
        assert len(kills) == 3 and any(k[0] == "during checkpoint write" for k in kills), kills
        done = _start(killed_dir, log, env)
        assert done.wait(timeout=600) == 0, (tmp_path / "killed.log").read_text()[-3000:]
    assert straight.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    straight_log.close()
    print("kills (kind, resumed from update, last logged update or half-written dir):", kills,
          f"; {missed} write(s) finished before the kill landed")

    # No half-written directory is left, and the final checkpoints agree bit for bit.
    assert not [n for n in os.listdir(killed_dir / "checkpoints") if TMP_SUFFIX in n]
    final = UPDATES
    assert _finished_steps(killed_dir)[-1] == _finished_steps(straight_dir)[-1] == final
    ours, _ = Checkpointer(str(killed_dir / "checkpoints"), keep=3).restore(final)
    want, _ = Checkpointer(str(straight_dir / "checkpoints"), keep=3).restore(final)
    chex.assert_trees_all_equal(host(ours), host(want))
    # Every update logged once, with the uninterrupted run's values.
    a, b = _records(straight_dir), _records(killed_dir)
    assert [r["step"] for r in b] == list(range(1, UPDATES + 1))
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "loss_ce", "loss_mlm", "loss_cos", "grad_norm", "lr"):
            assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])


# --- a disk that fails during a save ----------------------------------------------------
# Root ignores file permissions, so the failure is a real one of the operating system
# instead: a file size limit (RLIMIT_FSIZE) below the size of the checkpoint's array data,
# set just before the chosen save and lifted before the next. Writes beyond it fail with
# EFBIG ("File too large") inside orbax's writer, as ENOSPC would on a full disk.
FAILING_SAVE = r"""
import json, os, resource, signal
from distil_jax import checkpoint
from distil_jax.train import trainer

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
LIMIT, FAIL_AT = 16 * 1024, {fail_at}
original = checkpoint.Checkpointer.save

def save(self, step, *args, **kwargs):
    self._finish_pending(fatal=False)  # the previous write, under the previous limit
    limit = LIMIT if step == FAIL_AT else resource.RLIM_INFINITY
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return original(self, step, *args, **kwargs)

checkpoint.Checkpointer.save = save
try:
    _, summary = trainer.train(config, {workdir!r})
    out = {{"update": summary["update"], "error": None}}
except checkpoint.CheckpointSaveError as e:
    out = {{"error": str(e)}}
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
ckpt = checkpoint.Checkpointer(os.path.join({workdir!r}, "checkpoints"), keep=3)
out["steps"] = ckpt.all_steps()
out["left"] = sorted(os.listdir(ckpt.directory))
checkpoint.Checkpointer.save = original  # the disk is fine again
if out["error"]:  # what a user does next: run the same command again
    state, step = trainer.build(config, {workdir!r}).restore_or_init()
    out["restored"] = step
    out["resumed"] = trainer.train(config, {workdir!r})[1]["update"]
print("RESULT" + json.dumps(out))
"""


@pytest.mark.parametrize("policy", ["stop", "retry"])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, policy, tiny_source, env):
    # A checkpoint every 2 updates: 2, 4, 6; the one of update 4 fails.
    config = tiny_source(**{"train.steps": 6, "checkpoint.every_steps": 2, "checkpoint.keep": 1 if policy == "stop" else 3,
                            "checkpoint.on_save_error": policy, "mesh.shape": (1, 1, 1)})
    code = config + FAILING_SAVE.format(fail_at=4, workdir=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("RESULT") + 6:])
    assert not [n for n in out["left"] if TMP_SUFFIX in n], out["left"]  # nothing half-written stays
    if policy == "stop":
        # keep=1: had orbax dropped checkpoint 2 before 4 was complete, nothing would be left.
        assert "could not write checkpoint 4" in out["error"] and "File too large" in out["error"]
        assert "checkpoint 2 is intact" in out["error"] and "make the directory writable" in out["error"]
        assert out["steps"] == [2] and out["restored"] == 2 and out["resumed"] == 6
    else:
        assert out["error"] is None and out["update"] == 6
        assert out["steps"] == [2, 6]  # 4 failed; training went on and saved again
        assert "training goes on and saves again" in proc.stderr


# --- non-finite updates -------------------------------------------------------------------
def nan_at(updates):
    """A step wrapper (the trainer's test seam): the updates numbered in `updates` (1-based)
    see a NaN teacher, so their loss and gradients are NaN."""
    def wrap(step_fn):
        def poisoned(state, teacher_params, batches):
            bad = jnp.isin(state.step + 1, jnp.asarray(updates))
            teacher_params = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x).astype(x.dtype), teacher_params)
            return step_fn(state, teacher_params, batches)
        return poisoned
    return wrap


def _saved_state(workdir, update):
    state, _ = Checkpointer(str(workdir / "checkpoints"), keep=3).restore(update)
    return jax.tree.map(np.asarray, jax.device_get(state))


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_nan_update_is_skipped_and_counted(tmp_path, tiny, host, micro_batches):
    config = tiny(**{"train.steps": 3, "checkpoint.every_steps": 1, "train.batch_size": 16 * micro_batches})
    state, summary = trainer.train(config, str(tmp_path), step_wrapper=nan_at((2,)))
    assert summary["update"] == 3

    # The skipped update moved nothing: after update 2 the student and AdamW's moments are
    # bit for bit those after update 1, as if update 2's batches had never been seen.
    before, skipped = _saved_state(tmp_path, 1), _saved_state(tmp_path, 2)
    chex.assert_trees_all_equal(skipped["params"], before["params"])
    chex.assert_trees_all_equal(skipped["opt_state"]["inner_state"], before["opt_state"]["inner_state"])
    assert int(skipped["opt_state"]["total_notfinite"]) == 1 and int(before["opt_state"]["total_notfinite"]) == 0
    assert int(skipped["step"]) == 2  # the update is counted: the schedule goes on

    # Update 3 applies again, from finite params.
    final = host(state.params)
    assert not np.array_equal(final["mlm_head"]["bias"], skipped["params"]["mlm_head"]["bias"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(final))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["skipped_updates"], r["skipped_updates_total"], r["consecutive_skips"]) for r in records] \
        == [(0, 0, 0), (1, 1, 1), (0, 1, 0)]
    assert records[1]["loss"] is None and records[1]["grad_norm"] == 0  # no finite micro-batch to average
    assert np.isfinite(records[2]["loss"]) and records[2]["grad_norm"] > 0
    # AdamW's schedule does not count the skip: update 3 runs at the rate update 2 would have had.
    schedule = optim.learning_rate_schedule(config.train.learning_rate, 3, config.train.warmup_fraction)
    assert records[0]["lr"] == pytest.approx(float(schedule(0))) and records[1]["lr"] == 0
    assert records[2]["lr"] == pytest.approx(float(schedule(1)))


def signal_at(update, signum=signal.SIGTERM):
    """A step wrapper that signals this process while update `update` (1-based) runs."""
    def wrap(step_fn):
        def signalled(state, teacher_params, batches):
            jax.debug.callback(lambda s: os.kill(os.getpid(), signum) if int(s) + 1 == update else None,
                               state.step)
            return step_fn(state, teacher_params, batches)
        return signalled
    return wrap


def test_a_signal_on_a_checkpoint_update_saves_once_and_stops(tmp_path, tiny):
    """SIGTERM during update 2, which is due a checkpoint anyway: one save, a clean stop."""
    config = tiny(**{"train.steps": 6, "checkpoint.every_steps": 2})
    _, summary = trainer.train(config, str(tmp_path), step_wrapper=signal_at(2))
    assert summary["stopped_by"] == "SIGTERM" and summary["update"] == 2 and summary["last_checkpoint"] == 2
    assert _finished_steps(tmp_path) == [2]
    _, resumed = trainer.train(config, str(tmp_path))
    assert resumed["update"] == 6 and resumed["stopped_by"] is None


def test_nans_in_a_row_stop_the_run_with_the_last_checkpoint_intact(tmp_path, tiny, host):
    config = tiny(**{"train.steps": 6, "checkpoint.every_steps": 2, "train.max_consecutive_skips": 2})
    with pytest.raises(optim.NonFiniteError, match=r"2 updates in a row \(the last at update 4\).*"
                                                    r"Last checkpoint: update 2 in .*checkpoints"):
        trainer.train(config, str(tmp_path), step_wrapper=nan_at((3, 4)))
    assert _finished_steps(tmp_path) == [2]  # update 4 was due a checkpoint; the stop came first
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and records[-1]["consecutive_skips"] == 2
    state, step = trainer.build(config, str(tmp_path)).restore_or_init()
    assert step == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(host(state.params)))


def test_a_non_finite_state_is_never_saved(tmp_path, tiny):
    # A learning rate that overflows float32: the first update's gradients are finite, so it
    # applies, and the params it gives are not. The checkpoint after it must not be written.
    config = tiny(**{"train.steps": 2, "checkpoint.every_steps": 1, "train.learning_rate": 1e39,
                     "train.warmup_fraction": 0.0})
    with pytest.raises(optim.NonFiniteError, match="update 1 is not finite; it was not saved"):
        trainer.train(config, str(tmp_path))
    assert _finished_steps(tmp_path) == []


def test_the_loop_reads_nothing_of_the_update_it_just_dispatched(tmp_path, tiny, monkeypatch):
    """No host sync per update: the loop reads an update's outputs to the host (its skip
    counters, the window's metrics) only at a log or checkpoint; otherwise one update late,
    so the device always has the next update queued. (On this CPU a dispatch is nearly
    synchronous, so the property is checked on what the loop reads, not on timing.)"""
    calls, latest, fetched = [0], [set()], set()
    compiled = trainer.compiled_step

    def counting(*args, **kwargs):
        jitted = compiled(*args, **kwargs)

        def call(*a):
            out = jitted(*a)
            calls[0] += 1
            latest[0] = {id(x) for x in jax.tree.leaves(out)}
            return out
        return call
    device_get = jax.device_get

    def watched(x):
        if any(id(leaf) in latest[0] for leaf in jax.tree.leaves(x)):
            fetched.add(calls[0])
        return device_get(x)
    monkeypatch.setattr(trainer, "compiled_step", counting)
    monkeypatch.setattr(jax, "device_get", watched)
    config = tiny(**{"train.steps": 6, "train.log_every": 3, "checkpoint.every_steps": 6})
    _, summary = trainer.train(config, str(tmp_path))
    assert summary["update"] == 6 and calls[0] == 6
    assert fetched == {3, 6}  # the updates that log
