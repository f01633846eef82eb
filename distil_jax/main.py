"""Entry point: `python -m distil_jax.main --config=configs/FILE.py --workdir=DIR`.

Parses the ml_collections config (overrides: --config.a.b=value) and dispatches on
`config.mode`: distill (default), pretrain, eval, export. The work lives in train.py.

Several processes (hosts, or one per GPU) run the same command: on a TPU VM or in a
SLURM job JAX finds its peers by itself; elsewhere give every process
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (launch/README.md).
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (ml_collections).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: HOST:PORT of process 0, where the coordinator listens. Leave out "
                    "(with the two flags below) on a TPU VM or in a SLURM job: JAX detects them.")
flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes run this command.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0 .. num_processes-1.")
flags.DEFINE_list("local_device_ids", None,
                  "Multi-host: this process's devices, e.g. 0,1,2,3 (default: JAX's choice, which "
                  "in a SLURM job on GPUs is one GPU per process).")
flags.DEFINE_integer("initialization_timeout", 300,
                     "Multi-host: seconds to wait for every process to join before giving up.")
flags.DEFINE_integer("heartbeat_timeout", 100,
                     "Multi-host: seconds of silence after which a process counts as dead and the "
                     "others stop.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def run(config, workdir: str) -> dict:
    from distil_jax import train
    if "://" not in workdir:  # a bucket (gs://...) needs no directories
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
    from distil_jax import hostmem
    hostmem.keep_host_memory()  # before JAX starts: reuse host memory between steps
    import jax

    from distil_jax import parallel
    try:
        parallel.initialize_distributed(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
            FLAGS.initialization_timeout, FLAGS.heartbeat_timeout, FLAGS.local_device_ids)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if jax.process_index() != 0:  # logs from process 0; the others only warn
        logging.set_verbosity(logging.WARNING)

    from distil_jax.checkpoint import CheckpointMismatch, CheckpointSaveError
    from distil_jax.config import ConfigError
    from distil_jax.data.sources import DataError
    from distil_jax.train import NonFiniteError
    try:
        result = run(FLAGS.config, FLAGS.workdir)
    except (ConfigError, DataError, CheckpointMismatch, CheckpointSaveError, NonFiniteError) as e:
        raise SystemExit(f"error: {e}") from None
    logging.info("%s: %s", FLAGS.config.mode, result)
    if jax.process_index() == 0:
        print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    app.run(main)
