"""Orbax checkpoints: the train state, the data iterator's position and the run's identity.

One composite item per saved update, named by the update: `state` (student params, optimizer
state, update count, rng), `data` (the iterator's state, JSON) and `meta` (mode, the
model's type and config, the teacher's path and fingerprint, the tokenizer's directory,
the config). The teacher's params are never saved. `load_model(workdir)` reads the
newest checkpoint's model back from its metadata alone (what the apps use: no
optimizer, teacher or data is built to read weights).

Nothing half-written is taken for a checkpoint: orbax (0.12) writes step N into
`N.orbax-checkpoint-tmp`, writes `commit_success.txt` and then renames the directory
to `N`, and lists only directories named by a bare step number. A directory left over
by a killed process is removed when the next run opens the manager
(`cleanup_tmp_directories`); one that is listed but cannot be read is skipped for the
next older one. A save that fails (disk full, permissions) leaves the older checkpoints
as they were, removes its own temporary directory and either stops the run or, with
`checkpoint.on_save_error="retry"`, is tried again at the next checkpoint step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from distil_jax import runtime
from distil_jax.data.tokenizer import load_tokenizer
from distil_jax.models import MODULES, QuestionAnswerer, SequenceClassifier
from distil_jax.terms import model_params

# meta["model"]["type"] -> (module, config): what load_model builds; a task head's
# meta["model"] is {"type": head, "encoder": the encoder's, and num_labels for a classifier}.
MODEL_TYPES = {module.__name__: (module, config) for config, module in MODULES.items()}
HEAD_TYPES = {"SequenceClassifier": SequenceClassifier, "QuestionAnswerer": QuestionAnswerer}


class CheckpointMismatch(ValueError):
    """The workdir holds a checkpoint of another run or another model shape."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission, ...)."""


class NoCheckpointError(FileNotFoundError):
    """The workdir has no checkpoint to read."""

    def __init__(self, directory: str):
        super().__init__(f"no checkpoint in {directory}; train first (mode distill or pretrain) "
                         "with the same --workdir")


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
    """Saves and restores; `on_save_error` is "stop" (raise CheckpointSaveError) or "retry"."""

    def __init__(self, directory: str, keep: int, async_save: bool = True, on_save_error: str = "stop"):
        self.directory = runtime.absolute(directory)
        self.on_save_error = on_save_error
        self.failed_saves = 0
        self._pending: Optional[int] = None  # step of the save that may still be running
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def all_steps(self):
        """Steps of the complete (renamed) checkpoints on disk.

        Read from the directory: the manager's own list may name a save that failed."""
        return sorted(ocp.path.step.checkpoint_steps(self.directory))

    def save(self, step: int, state, data_state: Dict[str, Any], meta: Dict[str, Any],
             force: bool = False) -> bool:
        """Start saving `step` (async); False when it was not started or a save failed under "retry".

        A failure of the previous async save surfaces here, before this one starts."""
        self._finish_pending(fatal=False)
        try:
            started = self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta)), force=force)
        except Exception as e:  # noqa: BLE001 - any write failure; the cause is in the message
            self._failed(step, e, fatal=False)
            return False
        if started:
            self._pending = step
        return started

    def wait(self) -> None:
        """Wait for the running save; its failure stops the run whatever `on_save_error` says."""
        self._finish_pending(fatal=True)

    def last_saved(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _finish_pending(self, fatal: bool) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._failed(self._pending, e, fatal)
        finally:
            self._pending = None

    def _failed(self, step: Optional[int], error: Exception, fatal: bool) -> None:
        """Remove what the failed save left, then stop (raise) or log and go on ("retry")."""
        self.failed_saves += 1
        for name in os.listdir(self.directory) if os.path.isdir(self.directory) else ():
            if step is not None and name.startswith(f"{step}.orbax-checkpoint-tmp"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        previous = [s for s in self.all_steps() if s != step]
        kept = (f"checkpoint {previous[-1]} is intact and the same command resumes from it"
                if previous else "there is no earlier checkpoint")
        message = (f"could not write checkpoint {step} in {self.directory} ({_describe(error)}); "
                   f"{kept}. Free disk space or make the directory writable")
        if fatal or self.on_save_error != "retry":
            raise CheckpointSaveError(message) from error
        logging.warning("%s; training goes on and saves again at the next checkpoint step", message)

    def close(self) -> None:
        """Release the manager (after `wait`; on the way out of an error, a failure here is only logged)."""
        try:
            self._manager.close()
        except Exception as e:  # noqa: BLE001 - cleanup: the error that got us here matters more
            logging.warning("closing the checkpoint manager of %s: %s", self.directory, e)

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
        for key in ("task", "student_source"):  # mode finetune's: what was fine-tuned, on what
            if meta.get(key) != expected_meta.get(key):
                raise CheckpointMismatch(f"{where} fine-tuned {key} {meta.get(key)!r}, this run "
                                         f"{expected_meta.get(key)!r}; use another finetune.dir (or --workdir)")
        saved = _shapes(self._manager.item_metadata(step)["state"].tree["params"])
        wanted = _shapes(abstract_state.params)
        diffs = [f"{k}: checkpoint {saved.get(k, 'absent')}, model {wanted.get(k, 'absent')}"
                 for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
        if diffs:
            more = f" (and {len(diffs) - 10} more)" if len(diffs) > 10 else ""
            raise CheckpointMismatch(
                f"{where} holds a model of another shape; tensors that differ: "
                + "; ".join(diffs[:10]) + more + ". Use the config it was trained with, or another --workdir")

    def restore(self, step: int, abstract_state=None):
        """(state, data_state) of checkpoint `step`; without `abstract_state`, as saved."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def restore_latest(self, abstract_state, expected_meta: Dict[str, Any]):
        """(state, data_state, step) of the newest readable checkpoint, or None if there is none."""
        steps = self.all_steps()
        if not steps:
            return None

        def read(step):
            self.check_compatible(step, abstract_state, expected_meta)
            return (*self.restore(step, abstract_state), step)
        return newest_readable(steps, read, self.directory)


def newest_readable(steps, read: Callable[[int], Any], directory):
    """read(step) of the newest of `steps` that can be read: a corrupt or truncated one is
    logged and the next older tried; a CheckpointMismatch (another model) is raised at
    once; none readable raises CheckpointMismatch naming each step's error."""
    errors = []
    for step in reversed(steps):
        try:
            return read(step)
        except CheckpointMismatch:
            raise
        except Exception as e:  # noqa: BLE001 - corrupt or truncated files
            logging.warning("checkpoint %d in %s cannot be read (%s: %s); trying an older one",
                            step, directory, type(e).__name__, e)
            errors.append(f"{step}: {type(e).__name__}: {str(e)[:200]}")
    raise CheckpointMismatch(f"no checkpoint in {directory} can be read ({'; '.join(errors)}). "
                             "Nothing was deleted; move the directory away to start afresh")


def _describe(error: Exception) -> str:
    """The operating system's reason first (tensorstore puts it at the end of a long message)."""
    text = str(error).splitlines()[0] if str(error) else ""
    code = getattr(error, "errno", None)
    found = re.search(r"os_error_code='?(\d+)", str(error))
    code = code or (int(found.group(1)) if found else None)
    brief = f"{type(error).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"
    return f"{os.strerror(code)}, errno {code}; {brief}" if code else brief


def model_meta(module) -> Dict[str, Any]:
    """What a checkpoint records of its model: `model_from_meta` builds it back."""
    if isinstance(module, tuple(HEAD_TYPES.values())):
        extra = {"num_labels": module.num_labels} if isinstance(module, SequenceClassifier) else {}
        return {"type": type(module).__name__, "encoder": model_meta(module.encoder), "dropout": module.dropout,
                **extra}
    return {"type": type(module).__name__, **dataclasses.asdict(module.config)}


def _module(fields: Dict[str, Any]):
    fields = dict(fields)
    kind = fields.pop("type")
    if kind in HEAD_TYPES:
        return HEAD_TYPES[kind](_module(fields.pop("encoder")), **fields)
    module_cls, config_cls = MODEL_TYPES[kind]
    return module_cls(config_cls(**fields))


def model_from_meta(meta: Dict[str, Any]):
    """The (float32) module a checkpoint's metadata describes: a masked LM or a task head."""
    return _module(meta["model"])


def checkpoint_tokenizer(meta: Dict[str, Any], fallback_dir: str = ""):
    """The tokenizer a checkpoint's run was trained with: its recorded directory, else
    `fallback_dir`; None when neither exists (synthetic data)."""
    for path in (meta.get("tokenizer_dir") or "", fallback_dir):
        if path and os.path.isdir(path):
            return load_tokenizer(path)
    return None


def saved_steps(workdir: str):
    """The updates of the complete checkpoints in WORKDIR/checkpoints (none: [])."""
    directory = epath.Path(runtime.absolute(os.path.join(workdir, "checkpoints")))
    return sorted(ocp.path.step.checkpoint_steps(directory)) if directory.exists() else []


def load_model(workdir: str, step: Optional[int] = None):
    """(module, params, meta) of the newest readable checkpoint in WORKDIR/checkpoints (or of
    update `step`), from its metadata alone: the params restored on this process's first
    device, nothing else; an unreadable newest one is skipped for the next older."""
    directory = epath.Path(runtime.absolute(os.path.join(workdir, "checkpoints")))
    steps = saved_steps(workdir)
    if not steps or (step is not None and step not in steps):
        raise NoCheckpointError(os.fspath(directory) + ("" if step is None else f" for update {step}"))
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True), item_handlers={
        "state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler()})
    try:
        return newest_readable(steps if step is None else [step], lambda s: _read_model(manager, s), directory)
    finally:
        manager.close()


def _read_model(manager, step: int):
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    module = model_from_meta(meta)
    saved = model_params(manager.item_metadata(step)["state"].tree["params"])  # no projections
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), abstract)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True)))
    return module, restored["state"]["params"], {**meta, "step": step}
