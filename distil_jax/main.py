"""Entry point: `python -m distil_jax.main --config=configs/FILE.py --workdir=DIR`.

Parses the ml_collections config (overrides: --config.a.b=value) and starts what
`config.mode` names (`APPS`): training (distill, pretrain; train/trainer.py), data
preparation, and the apps (eval, export, finetune, demo, ablate, shapes, deploy; apps/). One run per
workdir: a second start on a workdir in use is refused, naming the first.

Several processes (hosts, or one per GPU) run the same command: on a TPU VM or in a
SLURM job JAX finds its peers by itself; elsewhere give every process
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (launch/README.md).

Exit status: 0 when the run finished; 75 (`runtime.RESUMABLE_EXIT`) when SIGTERM or
Ctrl-C stopped it with a checkpoint before its last update (run the same command to
resume); 1 on an error.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from distil_jax import parallel, runtime, storage
from distil_jax.train import trainer
from distil_jax.apps import ablate, demo, deploy, evaluate, export, finetune, shapes
from distil_jax.checkpoint import CheckpointMismatch, CheckpointSaveError, NoCheckpointError
from distil_jax.config import ConfigError
from distil_jax.data import DataError
from distil_jax.data.prepare import run as run_prepare
from distil_jax.train.optim import NonFiniteError

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

# config.mode -> run(config, workdir) -> a JSON-safe summary.
APPS = {
    "distill": trainer.run, "pretrain": trainer.run, "prepare": run_prepare,
    "eval": evaluate.run, "export": export.run, "finetune": finetune.run,
    "demo": demo.run, "ablate": ablate.run, "shapes": shapes.run, "deploy": deploy.run,
}
# Errors whose message says what is wrong and what to do: printed without a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointMismatch, CheckpointSaveError, NoCheckpointError,
               NonFiniteError, runtime.WorkdirBusy, storage.StorageError)


def run(config, workdir: str) -> dict:
    if config.mode not in APPS:
        raise ConfigError(f"config.mode {config.mode!r} is not one of {tuple(APPS)}")
    if not runtime.is_remote(workdir):  # a bucket (gs://...) needs no directories
        os.makedirs(workdir, exist_ok=True)
    storage.check_writable(workdir)
    with runtime.hold_workdir(workdir):
        return APPS[config.mode](config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config.mode != "prepare":  # (its single malloc arena would serialise the tokenizer's threads)
        runtime.keep_host_memory()  # first, before any array: reuse host memory between steps
    try:
        parallel.initialize_distributed(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
            FLAGS.initialization_timeout, FLAGS.heartbeat_timeout, FLAGS.local_device_ids)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if jax.process_index() != 0:  # logs from process 0; the others only warn
        logging.set_verbosity(logging.WARNING)
    try:
        result = run(FLAGS.config, FLAGS.workdir)
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    except runtime.Stopped as e:  # a stage of a longer mode: the same command resumes it
        logging.warning("%s: %s", FLAGS.config.mode, e)
        result = e.summary
    logging.info("%s: %s", FLAGS.config.mode, result)
    if jax.process_index() == 0:
        print(json.dumps(result, indent=2, default=str))
    if runtime.stopped_early(result):  # every process: they all stopped at the same update
        return runtime.RESUMABLE_EXIT
    return 0


if __name__ == "__main__":
    app.run(main)
