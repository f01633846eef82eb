"""`python -m distil_jax.main` end to end on the tiny configs."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_main(config, workdir, *overrides):
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "distil_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_smoke_mode_runs_and_exports(tmp_path):
    proc = _run_main("configs/smoke.py", tmp_path, "--config.student_layers=1")
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["student_params"] < result["teacher_params"]
    assert result["loss"] > 0 and result["targets"] > 0
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForMaskedLM.from_pretrained(result["student_hf"])
    assert model.config.n_layers == 1


def test_unknown_override_is_refused(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "distil_jax.main", "--config=configs/smoke.py",
         f"--workdir={tmp_path}", "--config.no_such_key=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr
