"""Entry point: `python -m distil_jax.main --config=configs/FILE.py --workdir=DIR`.

Parses the ml_collections config (overrides: --config.a.b=value) and dispatches on
`config.mode`: distill (default), pretrain, eval, export. The work lives in train.py.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (ml_collections).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def run(config, workdir: str) -> dict:
    from distil_jax import train
    os.makedirs(workdir, exist_ok=True)
    if config.mode in ("distill", "pretrain"):
        result = train.train_and_evaluate(config, workdir)
        result.pop("state")
        result.pop("teacher_params")
        return result
    if config.mode == "eval":
        from distil_jax import evaluate
        return evaluate.run_eval(config, workdir)
    if config.mode == "demo":
        from distil_jax import demo
        return demo.run_demo(config, workdir)
    if config.mode == "export":
        return {"export_dir": train.export_checkpoint(config, workdir)}
    raise app.UsageError(f"config.mode {config.mode!r} is not one of distill, pretrain, eval, export, demo")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from distil_jax.checkpoint import CheckpointMismatch, CheckpointSaveError
    from distil_jax.config import ConfigError
    from distil_jax.data.sources import DataError
    from distil_jax.train import NonFiniteError
    try:
        result = run(FLAGS.config, FLAGS.workdir)
    except (ConfigError, DataError, CheckpointMismatch, CheckpointSaveError, NonFiniteError) as e:
        raise SystemExit(f"error: {e}") from None
    logging.info("%s: %s", FLAGS.config.mode, result)
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    app.run(main)
