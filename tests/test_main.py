"""`python -m distil_jax.main` end to end, every mode, on the tiny config.

The command line itself (flags, overrides, the JSON it prints, errors without a
traceback, signals, a second process on a busy workdir) runs in subprocesses; what
follows a first run (the other modes on its workdir, resumes) calls `main.run`, the
function the command line ends in, in this process: a process start costs seconds of
imports each time.
"""

import json
import os
import select
import signal
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import transformers

from distil_jax import main as main_lib
from distil_jax import runtime
from distil_jax.checkpoint import NoCheckpointError
from distil_jax.config import with_changes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"train.steps": 4, "train.log_every": 2, "checkpoint.every_steps": 2, "data.seq_len": 16,
         "data.synthetic.num_sequences": 128}
SMALL_FLAGS = [f"--config.{k}={v}" for k, v in SMALL.items()]


@pytest.fixture
def main(run_main):
    """`main(workdir, *flags, expect_ok=True)`: configs/tiny.py, small, through main."""
    return lambda workdir, *flags, **kw: run_main("configs/tiny.py", workdir, *SMALL_FLAGS, *flags, **kw)


@pytest.fixture
def run_here(config_file):
    """`run_here(workdir, **changes)`: what `main` runs (configs/tiny.py, small), in this process."""
    def run(workdir, **changes):
        config = with_changes(config_file("tiny").get_config(), **{**SMALL, **changes})
        return main_lib.run(config, str(workdir))
    return run


def test_every_mode(tmp_path, main, run_here):
    out = main(tmp_path)
    assert out["update"] == 4 and out["last_checkpoint"] == 4  # checkpoints are named by update
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    # A second run finds the work done and stops at once.
    assert run_here(tmp_path)["update"] == 4
    export = run_here(tmp_path, mode="export")["export_dir"]
    model = transformers.AutoModelForMaskedLM.from_pretrained(export)
    assert type(model).__name__ == "DistilBertForMaskedLM" and model.config.n_layers == 2
    # The checkpoint and its export are the same model: same metrics on the same masks.
    ev = run_here(tmp_path, mode="eval", **{"eval.hf_dirs": (export,)})
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(json.dumps(ev))
    for key in ("mlm_accuracy", "perplexity", "targets"):
        assert ev["models"]["checkpoint"][key] == pytest.approx(ev["models"]["hf"][key], rel=1e-5), key
    same = ev["comparisons"]["checkpoint - hf"]
    assert same["only_first"] == same["only_second"] == 0 and same["difference"] == 0
    assert 0 < ev["most_frequent_token"]["mlm_accuracy"] < 1
    half_changes = {"mode": "export", "export.dir": str(tmp_path / "bf16"), "export.dtype": "bfloat16"}
    with pytest.raises(NoCheckpointError, match="no checkpoint in"):  # another workdir: nothing to export
        run_here(tmp_path / "bf16", **half_changes)
    half = run_here(tmp_path, **half_changes)["export_dir"]
    # The bf16 export: the float32 export's tensors (same names), each rounded to bf16.
    full = safetensors.numpy.load_file(os.path.join(export, "model.safetensors"))
    halved = safetensors.numpy.load_file(os.path.join(half, "model.safetensors"))
    assert set(halved) == set(full) and {x.dtype for x in full.values()} == {np.dtype(np.float32)}
    for name, x in full.items():
        assert halved[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(halved[name], x.astype(ml_dtypes.bfloat16), err_msg=name)
    # The deploy extra is installed wherever the tests run (CI installs it): no condition.
    onnx = run_here(tmp_path, mode="export", **{"export.onnx": "int8"})["onnx"]
    assert onnx["fp32"]["path"] == os.path.join(export, "onnx", "model.onnx") and onnx["fp32"]["max_difference"] < 1e-4
    assert os.path.getsize(onnx["int8"]["path"]) < os.path.getsize(onnx["fp32"]["path"])

    pre = run_here(tmp_path / "pretrain", mode="pretrain")
    assert pre["update"] == 4 and "loss_ce" not in pre["metrics"]
    bert = run_here(tmp_path / "pretrain", mode="export")["export_dir"]
    assert type(transformers.AutoModelForMaskedLM.from_pretrained(bert)).__name__ == "BertForMaskedLM"


def test_bad_config_lists_problems_before_compiling(tmp_path, main):
    proc = main(tmp_path, "--config.train.batch_size=30", "--config.distill.temperature=0",
                "--config.data.seq_len=0", "--config.export.onnx=int4", expect_ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "batch_size 30 is not a multiple" in proc.stderr and "temperature must be > 0" in proc.stderr
    assert "data.seq_len must be at least 12" in proc.stderr and "export.onnx 'int4' is not one of" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_override_is_refused(tmp_path, main):
    proc = main(tmp_path, "--config.train.no_such_key=1", expect_ok=False)
    assert proc.returncode != 0 and "no_such_key" in proc.stderr


# `python -m distil_jax.main` with a gate: once metrics.jsonl has the record of update
# `at`, the run writes that update to a pipe and waits for the test to close another
# (inside MetricWriter.write, before the loop checks for a signal), so the test acts while
# the run is at a known update, with no sleeps and no race against the run's speed.
GATED_MAIN = """
import os, runpy
from distil_jax import metrics
at, reached, release = (int(x) for x in os.environ.pop("DISTIL_TEST_GATE").split(","))
write = metrics.MetricWriter.write
def gated(self, step, values):
    write(self, step, values)
    if step == at:
        os.write(reached, b"%d" % step)
        os.read(release, 1)  # until the test closes its end
metrics.MetricWriter.write = gated
runpy.run_module("distil_jax.main", run_name="__main__", alter_sys=True)
"""


class GatedRun:
    """main's command line in a subprocess that stops after update `at` until `release()`."""

    def __init__(self, env, workdir, flags, at):
        reached_r, reached_w = os.pipe()
        release_r, self._release = os.pipe()
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # no pipe to fill
        self.proc = subprocess.Popen(
            [sys.executable, "-c", GATED_MAIN, "--config=configs/tiny.py", f"--workdir={workdir}", *flags],
            cwd=ROOT, env=env(DISTIL_TEST_GATE=f"{at},{reached_w},{release_r}"), stdout=self.out,
            stderr=self.err, pass_fds=(reached_w, release_r))
        os.close(reached_w)
        os.close(release_r)
        # Wait for the event: the gate's byte, or end of file if the run exited without
        # reaching it (the select's limit only ends a hung run's test).
        assert select.select([reached_r], [], [], 600)[0], "the run never reached its gate"
        reached = os.read(reached_r, 16)
        os.close(reached_r)
        assert reached == b"%d" % at, self.finish()[1][-3000:]

    def release(self):
        os.close(self._release)

    def finish(self, timeout=600):
        """(stdout, stderr) once the run has ended."""
        self.proc.wait(timeout=timeout)
        self.out.seek(0)
        self.err.seek(0)
        return self.out.read(), self.err.read()


def test_a_second_run_in_a_busy_workdir_is_refused_and_touches_nothing(tmp_path, env, run_here):
    """Two starts on one workdir, the second while the first runs: it refuses before it
    writes anything, naming the first; the first finishes intact. A kill -9's successor
    starts."""
    flags = [*SMALL_FLAGS, "--config.train.steps=20", "--config.checkpoint.every_steps=10"]
    first = GatedRun(env, tmp_path, flags, at=2)  # the first is training: update 2, held there
    with pytest.raises(runtime.WorkdirBusy) as refused:  # the second start, here
        run_here(tmp_path, **{"train.steps": 20, "checkpoint.every_steps": 10})
    first.release()
    out, err = first.finish()
    assert first.proc.returncode == 0, err[-3000:]
    assert f"is in use by process {first.proc.pid}" in str(refused.value) and "another --workdir" in str(refused.value)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2 * i for i in range(1, 11)]  # the first run's records, each once
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1] == 20
    assert not (tmp_path / "lock").exists()  # released at the end

    killed = GatedRun(env, tmp_path, flags[:-2] + ["--config.train.steps=1000"], at=22)  # holds the lock
    killed.proc.kill()
    killed.finish()
    assert (tmp_path / "lock").exists()  # left behind by the kill
    # (30 updates: the signal tests' resumes below run the same program, compiled once)
    assert run_here(tmp_path, **{"train.steps": 30, "checkpoint.every_steps": 10})["update"] == 30


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])  # a preemption notice; Ctrl-C
def test_signal_checkpoints_exits_75_and_resumes(tmp_path, signame, env, run_here):
    changes = {"train.steps": 30, "train.log_every": 1, "checkpoint.every_steps": 1000}
    run = GatedRun(env, tmp_path, [*SMALL_FLAGS, *(f"--config.{k}={v}" for k, v in changes.items())], at=2)
    run.proc.send_signal(getattr(signal, signame))  # during update 2, after its record
    run.release()
    out, err = run.finish()
    assert run.proc.returncode == runtime.RESUMABLE_EXIT == 75, err[-3000:]  # stopped, not finished
    stopped = json.loads(out[out.index("{"):])
    assert stopped["stopped_by"] == signame and stopped["update"] == 2  # at the update it was in
    assert f"{signame} received: checkpoint at update {stopped['update']}, stopping" in out
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) \
        == [stopped["update"]]
    done = run_here(tmp_path, **changes)  # the same command again (here: main.run)
    assert done["update"] == 30 and done["stopped_by"] is None
    # Every update logged exactly once across the stop and the resume.
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))


def test_only_a_stop_before_the_last_update_is_resumable():
    """main's exit status: 75 when a signal stopped the run early, 0 when it finished (a
    signal during the last update stops nothing), 0 for the apps' summaries."""
    stopped = {"stopped_by": "SIGTERM", "update": 12, "total_updates": 30}
    assert runtime.stopped_early(stopped)
    assert not runtime.stopped_early({**stopped, "update": 30})
    assert not runtime.stopped_early({**stopped, "stopped_by": None})
    assert not runtime.stopped_early({"mlm_accuracy": 0.5}) and not runtime.stopped_early(None)
