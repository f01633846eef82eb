"""`python -m distil_jax.main` end to end, every mode, on the tiny config."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.train.steps=4", "--config.train.log_every=2", "--config.checkpoint.every_steps=2",
         "--config.data.seq_len=16", "--config.data.synthetic.num_sequences=128"]


@pytest.fixture
def main(run_main):
    """`main(workdir, *flags, expect_ok=True)`: configs/tiny.py, small, through main."""
    return lambda workdir, *flags, **kw: run_main("configs/tiny.py", workdir, *SMALL, *flags, **kw)


def test_every_mode(tmp_path, main):
    out = main(tmp_path)
    assert out["update"] == 4 and out["last_checkpoint"] == 4  # checkpoints are named by update
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    # A second run finds the work done and stops at once.
    assert main(tmp_path)["update"] == 4
    export = main(tmp_path, "--config.mode=export")["export_dir"]
    model = transformers.AutoModelForMaskedLM.from_pretrained(export)
    assert type(model).__name__ == "DistilBertForMaskedLM" and model.config.n_layers == 2
    # The checkpoint and its export are the same model: same metrics on the same masks.
    ev = main(tmp_path, "--config.mode=eval", f"--config.eval.hf_dirs=('{export}',)")
    assert json.loads((tmp_path / "eval.json").read_text()) == ev
    for key in ("mlm_accuracy", "perplexity", "targets"):
        assert ev["models"]["checkpoint"][key] == pytest.approx(ev["models"]["hf"][key], rel=1e-5), key
    same = ev["comparisons"]["checkpoint - hf"]
    assert same["only_first"] == same["only_second"] == 0 and same["difference"] == 0
    assert 0 < ev["most_frequent_token"]["mlm_accuracy"] < 1
    small = main(tmp_path / "bf16", "--config.mode=export", f"--config.export.dir={tmp_path / 'bf16'}",
                  "--config.export.dtype=bfloat16", expect_ok=False)
    assert small.returncode != 0 and "no checkpoint in" in small.stderr  # another workdir: nothing to export
    half = main(tmp_path, "--config.mode=export", f"--config.export.dir={tmp_path / 'bf16'}",
                 "--config.export.dtype=bfloat16")["export_dir"]
    assert os.path.getsize(os.path.join(half, "model.safetensors")) < 0.6 * os.path.getsize(
        os.path.join(export, "model.safetensors"))

    pre = main(tmp_path / "pretrain", "--config.mode=pretrain")
    assert pre["update"] == 4 and "loss_ce" not in pre["metrics"]
    bert = main(tmp_path / "pretrain", "--config.mode=export")["export_dir"]
    assert type(transformers.AutoModelForMaskedLM.from_pretrained(bert)).__name__ == "BertForMaskedLM"


def test_bad_config_lists_problems_before_compiling(tmp_path, main):
    proc = main(tmp_path, "--config.train.batch_size=30", "--config.distill.temperature=0",
                 expect_ok=False)
    assert proc.returncode != 0
    assert "batch_size 30 is not a multiple" in proc.stderr and "temperature must be > 0" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
    proc = main(tmp_path, "--config.data.seq_len=0", expect_ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "data.seq_len must be at least 12" in proc.stderr


def test_unknown_override_is_refused(tmp_path, main):
    proc = main(tmp_path, "--config.train.no_such_key=1", expect_ok=False)
    assert proc.returncode != 0 and "no_such_key" in proc.stderr


def test_a_second_run_in_a_busy_workdir_is_refused_and_touches_nothing(tmp_path, env):
    """Two starts on one workdir, the second 4 s after the first: it refuses before it writes
    anything, naming the first; the first finishes intact. A kill -9's successor starts."""
    cmd = [sys.executable, "-m", "distil_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
           *SMALL, "--config.train.steps=40", "--config.checkpoint.every_steps=10"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    second = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode != 0 and "Traceback" not in second.stderr
    assert f"is in use by process {first.pid}" in second.stderr and "another --workdir" in second.stderr
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2 * i for i in range(1, 21)]  # the first run's records, each once
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1] == 40
    assert not (tmp_path / "lock").exists()  # released at the end

    killed = subprocess.Popen(cmd[:-2] + ["--config.train.steps=1000"], cwd=ROOT, env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "lock").exists() and time.time() < deadline:
        time.sleep(0.1)
    killed.kill()
    killed.wait(timeout=60)
    assert (tmp_path / "lock").exists()  # left behind by the kill
    after = subprocess.run(cmd[:-2] + ["--config.train.steps=42"], cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=600)
    assert after.returncode == 0, after.stderr[-3000:]


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])  # a preemption notice; Ctrl-C
def test_signal_checkpoints_exits_cleanly_and_resumes(tmp_path, signame, env):
    env = env()
    cmd = [sys.executable, "-m", "distil_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
           "--config.train.steps=60", "--config.train.log_every=1", "--config.checkpoint.every_steps=1000",
           "--config.data.seq_len=16"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = json.loads(out[out.index("{"):])
    assert stopped["stopped_by"] == signame and 0 < stopped["update"] < 60
    assert f"{signame} received: checkpoint at update {stopped['update']}, stopping" in out
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) \
        == [stopped["update"]]
    done = json.loads((lambda p: p.stdout[p.stdout.index("{"):])(subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)))
    assert done["update"] == 60 and done["stopped_by"] is None
    # Every update logged exactly once across the stop and the resume.
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 61))
