"""Several real processes on JAX's distributed runtime, started by launch/local.sh.

Two processes of 4 fake CPU devices each train the tiny config together; one process
of 8 devices (this one, conftest.py) trains it alone. Same global mesh, same global
batches: the same losses and params, up to the order of float sums in the collectives
(gloo across processes, XLA's in-process ones here). Checkpoints move between the
two layouts in both directions.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from distil_jax import metrics, parallel, runtime
from distil_jax.train import trainer
from distil_jax.checkpoint import load_model
from distil_jax.config import with_changes

from conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 updates of 2 micro-batches of 16 sequences of 16 tokens; checkpoints at updates 2 and 4.
# The model of the suite's tiny config (conftest.TINY): a shape does not matter here, and a
# smaller program compiles faster in each of the processes.
CHANGES = {"train.steps": 4, "train.log_every": 1, "checkpoint.every_steps": 2, "checkpoint.keep": 5,
           "data.seq_len": 16, "data.synthetic.num_sequences": 128,
           **{k: v for k, v in TINY.items() if k.startswith(("teacher.model.", "student."))}}
FLAGS = [f"--config.{k}={v}" for k, v in CHANGES.items()]
PARAMS_ATOL = 1e-6
# The loss and the gradient's global norm of every update (metrics.jsonl), two processes
# against one: float32 round-off of the collectives' sums, measured at most 9.8e-8 (loss) and
# 0 (grad_norm) relative, in all three comparisons. AdamW's first step moves every weight by
# about lr * sign(g) and later ones by m / sqrt(v), which can hide a gradient of the wrong
# scale in the params; these show it directly: each process dividing by its own rows doubles
# the loss, a sum over the processes where their mean belongs doubles grad_norm, a process
# reading the other's rows changes the loss (all measured by hand-made mutations).
LOSS_RTOL = 1e-6
GRAD_NORM_RTOL = 1e-6


# A stand-in for a TPU slice's topology-aware device order: every process's devices
# interleaved with the other's along the mesh, so each process holds separate runs of every
# global batch's rows. The processes run main through this (test-only) wrapper of the mesh.
INTERLEAVED = """import runpy, sys
import jax
from distil_jax import parallel
make_mesh = parallel.make_mesh
def interleaved(shape, devices=None):
    by_process = [sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
                  for p in range(jax.process_count())]
    mesh = make_mesh(shape, [d for group in zip(*by_process) for d in group])
    print("process rows", parallel.process_rows(mesh, 16).tolist(), file=sys.stderr, flush=True)
    return mesh
parallel.make_mesh = interleaved
sys.argv = ["distil_jax.main", *sys.argv[3:]]  # after '-m distil_jax.main'
runpy.run_module("distil_jax.main", run_name="__main__")
"""


def launch_local(workdir, env, num_processes=2, devices=4, python=sys.executable):
    """launch/local.sh: num_processes processes of `devices` fake CPU devices each (the
    session's compilation cache is in the environment `env`: a second launch loads the
    step; local.sh keeps its XLA_FLAGS and sets the device count)."""
    proc = subprocess.run(
        ["bash", "launch/local.sh", f"--num_processes={num_processes}",
         f"--devices_per_process={devices}", f"--python={python}",
         f"--log_dir={workdir}/logs", "--", "--config=configs/tiny.py", f"--workdir={workdir}", *FLAGS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def per_update(workdir):
    """{update: (loss, grad_norm)} of a run's metrics.jsonl (log_every 1)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, f)}


def assert_same_updates(got_dir, want_dir, updates):
    """The loss and grad_norm of `updates` in got_dir's metrics.jsonl are want_dir's, to
    float32 round-off; returns the largest relative differences (loss, grad_norm)."""
    got, want = per_update(got_dir), per_update(want_dir)
    assert sorted(got) == list(updates), sorted(got)
    worst = []
    for i, (name, rtol) in enumerate((("loss", LOSS_RTOL), ("grad_norm", GRAD_NORM_RTOL))):
        a, b = np.array([got[u][i] for u in updates]), np.array([want[u][i] for u in updates])
        assert np.all(b > 0) and len(set(b.tolist())) == len(updates), (name, b)  # moving, not constant
        np.testing.assert_allclose(a, b, rtol=rtol, atol=0, err_msg=f"{name} of updates {list(updates)}")
        worst.append(float(np.max(np.abs(a / b - 1))))
    return tuple(worst)


def params_at(workdir, update, tmp_path_factory):
    """The params of checkpoint `update` in workdir, read in this (one) process by
    checkpoint.load_model (from a copy holding only that checkpoint: it reads the newest)."""
    only = tmp_path_factory.mktemp("only")
    shutil.copytree(os.path.join(workdir, "checkpoints", str(update)), only / "checkpoints" / str(update))
    _, params, meta = load_model(str(only))
    assert meta["step"] == update
    return jax.device_get(params)


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def resume_from(src, update, dst):
    """A new workdir holding only checkpoint `update` of src."""
    os.makedirs(dst / "checkpoints")
    shutil.copytree(src / "checkpoints" / str(update), dst / "checkpoints" / str(update))
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory, config_file, env):
    def tiny_config():  # what launch_local runs: configs/tiny.py with FLAGS
        return with_changes(config_file("tiny").get_config(), **CHANGES)

    base = tmp_path_factory.mktemp("multihost")
    two, one = base / "two", base / "one"
    t0 = time.perf_counter()
    stdout = launch_local(two, env())
    timings = {"two_processes_s": time.perf_counter() - t0}
    result = json.loads(stdout[stdout.index("\n{") + 1:])
    t0 = time.perf_counter()
    single, _ = trainer.train(tiny_config(), str(one))
    timings["one_process_s"] = time.perf_counter() - t0
    # A restart of both processes from the single process's checkpoint at update 2, their
    # devices interleaved along the mesh (INTERLEAVED): a change of layout and of device order.
    wrapper = base / "python_interleaved"
    (base / "interleaved.py").write_text(INTERLEAVED)
    wrapper.write_text(f"#!/bin/sh\n[ \"$1 $2\" = '-m distil_jax.main' ] && exec {sys.executable} "
                       f"{base / 'interleaved.py'} \"$@\"\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    t0 = time.perf_counter()
    launch_local(resume_from(one, 2, base / "one_then_two"), env(), python=str(wrapper))
    timings["two_resumed_s"] = time.perf_counter() - t0
    # One process from the two processes' checkpoint at update 2.
    one_after_two = resume_from(two, 2, base / "two_then_one")
    trainer.train(tiny_config(), str(one_after_two))
    print("timings", timings)
    return {"two": two, "one": one, "result": result, "single": single,
            "one_then_two": base / "one_then_two", "two_then_one": one_after_two,
            "params_at": lambda workdir, update: params_at(workdir, update, tmp_path_factory)}


def test_two_processes_equal_one(runs):
    assert jax.device_count() == 8 and jax.process_count() == 1
    assert runs["result"]["update"] == 4 and runs["result"]["last_checkpoint"] == 4
    # Every update's loss and gradient norm (what AdamW hides in the params), then the params.
    loss_diff, norm_diff = assert_same_updates(runs["two"], runs["one"], [1, 2, 3, 4])
    expected = jax.device_get(runs["single"].params)
    got = runs["params_at"](runs["two"], 4)
    chex.assert_trees_all_close(got, expected, atol=PARAMS_ATOL, rtol=0)
    print("two vs one process: max |param diff|", _max_diff(got, expected), "max rel diff: loss",
          loss_diff, "grad_norm", norm_diff)
    # ... and training moved the params further than the tolerance.
    start = runs["params_at"](runs["one"], 2)
    moved = _max_diff(start, expected)
    assert moved > 100 * PARAMS_ATOL


def test_any_device_order_trains_as_the_plain_one(runs):
    """Processes whose devices alternate along the mesh (process 1 holds rows 2-3, 6-7, ...
    of each global batch) read exactly those rows and train to the params of one process:
    the global batches are the same whatever the device order (updates 3 and 4 of the
    restart in test_checkpoint_of_one_process_resumes_in_two run in that order)."""
    log = (runs["one_then_two"] / "logs" / "process_1.log").read_text()
    assert "process rows [2, 3, 6, 7, 10, 11, 14, 15]" in log  # separate runs of each global batch
    expected = jax.device_get(runs["single"].params)
    chex.assert_trees_all_close(runs["params_at"](runs["one_then_two"], 4), expected, atol=PARAMS_ATOL, rtol=0)


def test_only_process_zero_writes_logs_and_metrics(runs):
    log = (runs["two"] / "logs" / "process_1.log").read_text()
    assert '"update"' not in log  # the result JSON is printed by process 0 only
    assert "could not" not in log
    # metrics.jsonl has each update once (two writers would duplicate lines).
    lines = (runs["two"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    assert len(list((runs["two"] / "tensorboard").iterdir())) == 1


def test_checkpoint_of_one_process_resumes_in_two(runs):
    expected = jax.device_get(runs["single"].params)
    chex.assert_trees_all_close(runs["params_at"](runs["one_then_two"], 4), expected, atol=PARAMS_ATOL, rtol=0)
    print("one then two (interleaved): max rel diff (loss, grad_norm)",
          assert_same_updates(runs["one_then_two"], runs["one"], [3, 4]))


def test_checkpoint_of_two_processes_resumes_in_one(runs):
    expected = jax.device_get(runs["single"].params)
    chex.assert_trees_all_close(runs["params_at"](runs["two_then_one"], 4), expected, atol=PARAMS_ATOL, rtol=0)
    print("two then one: max rel diff (loss, grad_norm)",
          assert_same_updates(runs["two_then_one"], runs["one"], [3, 4]))


# The first start of a run stands still once its first checkpoint is complete (a
# preemption is about to come): every process waits for the save, writes its pid to
# $STANDING_DIR/I, and sleeps until killed. A start that finds a checkpoint trains on.
STAND_AFTER_FIRST_CHECKPOINT = """import os, runpy, sys, time
from distil_jax import checkpoint
args = dict(a[2:].split("=", 1) for a in sys.argv[3:] if "=" in a)  # after '-m distil_jax.main'
if not checkpoint.saved_steps(args["workdir"]):
    save = checkpoint.Checkpointer.save
    def save_and_stand(self, *a, **k):
        save(self, *a, **k)
        self.wait()
        with open(os.path.join(os.environ["STANDING_DIR"], args["process_id"]), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
    checkpoint.Checkpointer.save = save_and_stand
sys.argv = ["distil_jax.main", *sys.argv[3:]]
runpy.run_module("distil_jax.main", run_name="__main__")
"""


def test_a_supervised_run_killed_after_a_checkpoint_restarts_and_ends_as_if_never_killed(runs, tmp_path, env):
    """launch/local.sh --supervise: process 1 is killed (SIGKILL) once checkpoint 2 exists;
    the supervisor stops process 0, starts both again on a new port, they resume from
    update 2 and finish (exit 0) with the params of the uninterrupted two-process run."""
    workdir, standing = tmp_path / "run", tmp_path / "standing"
    standing.mkdir()
    (tmp_path / "stand.py").write_text(STAND_AFTER_FIRST_CHECKPOINT)
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\n[ \"$1 $2\" = '-m distil_jax.main' ] && exec {sys.executable} "
                       f"{tmp_path / 'stand.py'} \"$@\"\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(
            ["bash", "launch/local.sh", "--supervise", "--num_processes=2", "--devices_per_process=4",
             f"--python={wrapper}", f"--log_dir={tmp_path}/logs", "--", "--config=configs/tiny.py",
             f"--workdir={workdir}", *FLAGS], cwd=ROOT, env=env(STANDING_DIR=str(standing)), stdout=stdout,
            stderr=stderr)
        try:
            deadline = time.monotonic() + 300
            while not ((standing / "1").exists() and (workdir / "checkpoints" / "2").is_dir()):
                assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-4000:]
                time.sleep(0.05)  # waits for the checkpoint (the event), then kills at once
            os.kill(int((standing / "1").read_text()), 9)  # SIGKILL: a lost host
            proc.wait(timeout=300)
        finally:
            proc.kill()
    assert proc.returncode == 0, err.read_text()[-4000:]
    restarts = [line for line in err.read_text().splitlines() if line.startswith("+ restart")]
    assert len(restarts) == 1 and "process 1 was killed by SIGKILL" in restarts[0], restarts
    assert json.loads(out.read_text()[out.read_text().rindex("\n{") + 1:])["update"] == 4
    assert [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert per_update(workdir) == per_update(runs["two"])  # the same layout: loss and grad_norm bit for bit
    chex.assert_trees_all_equal(runs["params_at"](workdir, 4), runs["params_at"](runs["two"], 4))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main(tmp_path, env, *flags, timeout=120):
    return subprocess.run([sys.executable, "-m", "distil_jax.main", "--config=configs/tiny.py",
                           f"--workdir={tmp_path}", *flags], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def test_missing_coordinator_fails_within_the_timeout(tmp_path, env):
    """The process gives up on its own watchdog (parallel._watchdog, after `timeout` s), not
    on JAX's later deadline (timeout + 30 s: it aborts with a message that blames a dead task)
    and not at once: the message is the watchdog's, and at least `timeout` s went by. (No
    upper bound on the time: this machine's speed varies; _main's 120 s is a safety net.)"""
    port, timeout = _free_port(), 5
    start = time.monotonic()
    proc = _main(tmp_path, env, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 "--process_id=1", f"--initialization_timeout={timeout}")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert (f"process 1 of 2 could not join the coordinator at 127.0.0.1:{port} within "
            f"--initialization_timeout={timeout} s") in proc.stderr, proc.stderr[-2000:]
    assert elapsed >= timeout, elapsed  # it waited (a slower machine only waits longer)
    print(f"gave up {elapsed:.1f} s after the start (timeout {timeout} s)")
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("flags, message", [
    (dict(process_id=1), "--process_id needs --coordinator_address"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2),
     "--process_id must be in [0, --num_processes), got 2 of 2"),
    (dict(coordinator_address="127.0.0.1", num_processes=2, process_id=0), "must be HOST:PORT"),
    (dict(coordinator_address="127.0.0.1:1234"), "needs --num_processes and --process_id"),
    (dict(num_processes=0), "--num_processes must be >= 1"),
])
def test_bad_flags_name_the_problem(flags, message):
    args = dict(coordinator_address=None, num_processes=None, process_id=None, timeout_s=300)
    problems = parallel.distributed_problems(**{**args, **flags})
    assert any(message in p for p in problems), problems
    assert not parallel.distributed_problems(**args)  # no flags: auto-detection, or one process


def test_bad_flags_stop_main_before_training(tmp_path, env):
    proc = _main(tmp_path, env, "--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=5")
    assert proc.returncode != 0
    assert "--process_id must be in [0, --num_processes), got 5 of 2" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


JOIN_AND_WAIT = """
import sys, threading
from distil_jax import parallel
parallel.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]), timeout_s=60, heartbeat_timeout_s=int(sys.argv[3]))
import jax
print("joined", jax.process_index(), jax.device_count(), flush=True)
threading.Event().wait()  # forever: only the runtime can end this process
"""


def test_a_dead_process_stops_the_other_within_the_heartbeat_timeout(env):
    """Process 0 waits forever once joined; after process 1 is killed it exits with the
    runtime's missed-heartbeat error. The safety net (90 s) is shorter than the default
    heartbeat timeout (100 s), so a --heartbeat_timeout not passed on would fail it; the
    time taken is printed, not asserted (this machine's speed varies)."""
    address, heartbeat = f"127.0.0.1:{_free_port()}", 4
    env = env(JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
    procs = [subprocess.Popen([sys.executable, "-c", JOIN_AND_WAIT, address, str(i), str(heartbeat)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    try:
        for i, p in enumerate(procs):
            assert p.stdout.readline().split() == ["joined", str(i), "4"]
        procs[1].kill()
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=90)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode != 0
    assert "stopped sending heartbeats" in err, err[-3000:]
    print(f"process 0 stopped {elapsed:.1f} s after process 1 was killed (heartbeat timeout {heartbeat} s)")


def test_metrics_on_object_storage_are_rewritten_whole_and_resume(tmp_path, monkeypatch):
    """The path a gs:// workdir takes (objects cannot be appended to), on local disk."""
    monkeypatch.setattr(runtime, "is_remote", lambda path: True)
    writer = metrics.MetricWriter(str(tmp_path), total_steps=4)
    for step in (1, 2, 3):
        writer.write(step, {"loss": float(step)})
    writer.close()
    resumed = metrics.MetricWriter(str(tmp_path), total_steps=4, initial_step=2)
    for step in (3, 4):  # a resume from update 2 repeats update 3
        resumed.write(step, {"loss": 10.0 * step})
    resumed.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


STEP_UNTIL_SIGNALLED = """
import sys
from distil_jax import parallel
parallel.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]), timeout_s=60)
import jax
from distil_jax.runtime import PreemptionFlag
with PreemptionFlag() as stop:
    print("ready", flush=True)
    previous = None
    for step in range(200000):  # what the training loop does between steps, nothing else:
        if step == 20:
            print("stepping", flush=True)  # the test signals once both are in the loop
        flag = stop.gather()  # gathered on the devices now, read an update later
        if previous is not None and stop.read(previous):
            print("stopped", step, stop.signal, flush=True)
            break
        previous = flag
"""


def _read_until(stream, line):
    """Reads `stream` (blocking) until a line equal to `line`: True, or False at its end."""
    return any(got.strip() == line for got in iter(stream.readline, ""))


def test_a_signal_to_one_process_stops_all_at_the_same_step(env):
    """SIGTERM to process 1 only, in the middle of the gathers that agree on stopping."""
    address = f"127.0.0.1:{_free_port()}"
    env = env(JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", STEP_UNTIL_SIGNALLED, address, str(i)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    try:
        for p in procs:  # blocks on each pipe until the process is in its loop of gathers
            assert p.stdout.readline().strip() == "ready"
            assert _read_until(p.stdout, "stepping"), p.poll()
        procs[1].terminate()  # SIGTERM
        outs = [next((line.split() for line in p.communicate(timeout=60)[0].splitlines()
                      if line.startswith("stopped")), None) for p in procs]  # gloo prints too
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] and outs[1] and outs[0][1] == outs[1][1], outs
    assert outs[0][2] == outs[1][2] == "15"
