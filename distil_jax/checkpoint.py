"""Orbax checkpoints: the train state, the data iterator's position and the run's identity.

One composite item per step: `state` (student params, optimizer state with the
MultiSteps accumulator, step, rng), `data` (the iterator's state, JSON) and `meta`
(mode, model shapes, the teacher's path and fingerprint, the config). The teacher's
params are never saved. Orbax writes into a temporary directory and renames it when
complete, so a half-written checkpoint is never listed; one that is listed but cannot
be read is skipped for the next older one.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointMismatch(ValueError):
    """The workdir holds a checkpoint of another run or another model shape."""


def params_fingerprint(params) -> str:
    """sha256 over every tensor's path, dtype, shape and bytes (host side, canonical order)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda x: jax.tree_util.keystr(x[0])):
        arr = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()[:16]


def _shapes(tree) -> Dict[str, Tuple[int, ...]]:
    def name(path):
        return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    return {name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = directory if "://" in directory else os.path.abspath(directory)  # gs:// as is
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def all_steps(self):
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, data_state: Dict[str, Any], meta: Dict[str, Any],
             force: bool = False) -> bool:
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def read_meta(self, step: int) -> Dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_compatible(self, step: int, abstract_state, expected_meta: Dict[str, Any]) -> None:
        """Refuse a checkpoint of another mode, teacher or parameter shape, naming what differs."""
        meta = self.read_meta(step)
        where = f"checkpoint {step} in {self.directory}"
        if meta.get("mode") != expected_meta.get("mode"):
            raise CheckpointMismatch(
                f"{where} is from a {meta.get('mode')!r} run, this is a {expected_meta.get('mode')!r} "
                "run; use another --workdir (or move the old run away)")
        theirs, ours = meta.get("teacher", {}), expected_meta.get("teacher", {})
        if theirs.get("fingerprint") != ours.get("fingerprint"):
            raise CheckpointMismatch(
                f"{where} was distilled from teacher {theirs.get('path')!r} (fingerprint "
                f"{theirs.get('fingerprint')}), this run's teacher is {ours.get('path')!r} "
                f"(fingerprint {ours.get('fingerprint')}); use the same teacher or another --workdir")
        saved = _shapes(self._manager.item_metadata(step)["state"].tree["params"])
        wanted = _shapes(abstract_state.params)
        diffs = [f"{k}: checkpoint {saved.get(k, 'absent')}, model {wanted.get(k, 'absent')}"
                 for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
        if diffs:
            more = f" (and {len(diffs) - 10} more)" if len(diffs) > 10 else ""
            raise CheckpointMismatch(
                f"{where} holds a model of another shape; tensors that differ: "
                + "; ".join(diffs[:10]) + more + ". Use the config it was trained with, or another --workdir")

    def restore_latest(self, abstract_state, expected_meta: Dict[str, Any]):
        """(state, data_state, step) of the newest readable checkpoint, or None if there is none."""
        steps = self.all_steps()
        if not steps:
            return None
        errors = []
        for step in reversed(steps):
            try:
                self.check_compatible(step, abstract_state, expected_meta)
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - corrupt or truncated files
                logging.warning("checkpoint %d in %s cannot be read (%s: %s); trying an older one",
                                step, self.directory, type(e).__name__, e)
                errors.append(f"{step}: {type(e).__name__}: {str(e)[:200]}")
                continue
            return restored["state"], restored["data"], step
        raise CheckpointMismatch(
            f"no checkpoint in {self.directory} can be read ({'; '.join(errors)}). "
            "Nothing was deleted; move the directory away to start afresh")


class PreemptionFlag:
    """Set by SIGTERM (preemption notice) or SIGINT (Ctrl-C); the loop checkpoints and exits."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def __bool__(self):
        return self.signal is not None

    def agreed(self) -> bool:
        """Whether any process was signalled; all processes call it at the same step.

        A pod or a SLURM job signals every process, but not at the same step: they stop
        together, or the ones still stepping would wait forever for the ones saving. The
        answer is the gathered one: a signal that lands during the gather counts at the
        next call (it is never overwritten)."""
        if jax.process_count() == 1:
            return self.signal is not None
        from jax.experimental import multihost_utils
        gathered = int(np.max(multihost_utils.process_allgather(np.int32(self.signal or 0))))
        if gathered and self.signal is None:
            self.signal = gathered  # how the run stopped, on the processes not signalled
        return gathered != 0
