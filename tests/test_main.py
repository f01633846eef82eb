"""`python -m distil_jax.main` end to end, every mode, on the tiny config."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.train.steps=4", "--config.train.log_every=2", "--config.checkpoint.every_steps=2",
         "--config.data.seq_len=16", "--config.data.synthetic.num_sequences=128"]


def _main(workdir, *flags, expect_ok=True):
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "distil_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
         *SMALL, *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout[proc.stdout.index("{"):])
    return proc


def test_every_mode(tmp_path):
    out = _main(tmp_path)
    assert out["update"] == 4 and out["last_checkpoint"] == 8  # micro-steps: 2 per update
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    # A second run finds the work done and stops at once.
    assert _main(tmp_path)["update"] == 4
    export = _main(tmp_path, "--config.mode=export")["export_dir"]
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForMaskedLM.from_pretrained(export)
    assert type(model).__name__ == "DistilBertForMaskedLM" and model.config.n_layers == 2
    # The checkpoint and its export are the same model: same metrics on the same masks.
    ev = _main(tmp_path, "--config.mode=eval", f"--config.eval.hf_dirs=('{export}',)")
    assert json.loads((tmp_path / "eval.json").read_text()) == ev
    for key in ("mlm_accuracy", "perplexity", "targets"):
        assert ev["checkpoint"][key] == pytest.approx(ev["hf"][key], rel=1e-5), key
    assert 0 < ev["most_frequent_token"]["mlm_accuracy"] < 1

    pre = _main(tmp_path / "pretrain", "--config.mode=pretrain")
    assert pre["update"] == 4 and "loss_ce" not in pre["metrics"]
    bert = _main(tmp_path / "pretrain", "--config.mode=export")["export_dir"]
    assert type(transformers.AutoModelForMaskedLM.from_pretrained(bert)).__name__ == "BertForMaskedLM"


def test_bad_config_lists_problems_before_compiling(tmp_path):
    proc = _main(tmp_path, "--config.train.batch_size=30", "--config.distill.temperature=0",
                 expect_ok=False)
    assert proc.returncode != 0
    assert "batch_size 30 is not a multiple" in proc.stderr and "temperature must be > 0" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_override_is_refused(tmp_path):
    proc = _main(tmp_path, "--config.train.no_such_key=1", expect_ok=False)
    assert proc.returncode != 0 and "no_such_key" in proc.stderr


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])  # a preemption notice; Ctrl-C
def test_signal_checkpoints_exits_cleanly_and_resumes(tmp_path, signame):
    import signal
    import time
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
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
    assert f"{signame} received: checkpoint at step {stopped['micro_step'] / 2:g}, stopping" in out
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) \
        == [stopped["micro_step"]]
    done = json.loads((lambda p: p.stdout[p.stdout.index("{"):])(subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)))
    assert done["update"] == 60 and done["stopped_by"] is None
    # Every update logged exactly once across the stop and the resume.
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 61))
