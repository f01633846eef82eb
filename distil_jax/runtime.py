"""What a run needs from the process and the machine it runs on.

- `keep_host_memory()`: glibc's malloc keeps and reuses XLA:CPU's large per-step blocks
  (the start-up shim: call it before the first JAX array is made).
- `PreemptionFlag`: SIGTERM (a preemption notice) or SIGINT (Ctrl-C) asks the loop to
  checkpoint and stop; every process of a multi-host run stops at the same step.
  `main` then exits with `RESUMABLE_EXIT` (75), so that a supervisor (launch/) tells a
  stopped run, which the same command resumes, from a finished one (0).
- `is_remote`: a workdir on object storage (gs://...) rather than a local path.
- `WorkdirLock`: one run per workdir; a second start is refused, naming the first.

Host memory. XLA:CPU allocates each execution's temporaries as one block (1.2 GiB for
the BERT-base train step at 8 x 128) with the C library's malloc. glibc serves a block
that large with a fresh `mmap` and unmaps it on free, so every step the kernel maps and
zeroes the whole block again, one 4 KiB page fault at a time: 350,000 faults and 0.7 s
of system time per step at those shapes. `keep_host_memory()` tells glibc to serve large
blocks from its heap (no mmap), never to trim that heap, and to use one arena (otherwise
a block allocated on XLA's executor thread comes from a thread arena, whose heaps cannot
hold it, and glibc falls back to mmap). After the first step the same memory is reused.
The cost: the process keeps its peak memory until it exits, as accelerator allocators
do. `main` calls it first; a library user calls it or not. DISTIL_JAX_HOST_MALLOC=system
leaves malloc as it is; where the C library has no `mallopt` (macOS, musl) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import signal
import socket
import threading
import time
from typing import Dict, Optional

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from distil_jax import storage


# --- host memory (the start-up shim) ---------------------------------------------------
# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
HOST_MALLOC_ENV = "DISTIL_JAX_HOST_MALLOC"
_host_memory_kept = False


def host_memory_kept() -> bool:
    """Whether `keep_host_memory()` took effect in this process."""
    return _host_memory_kept


def keep_host_memory() -> bool:
    """Make glibc's malloc keep and reuse large freed blocks (see the module docstring).

    Call it before the first JAX array is made (importing JAX is fine: its threads start
    with its backend). Returns whether the setting took effect; False where
    DISTIL_JAX_HOST_MALLOC=system, or where the C library is not glibc.
    """
    global _host_memory_kept
    if os.environ.get(HOST_MALLOC_ENV, "keep") == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # All three are needed: one arena for every thread, no mmap for large blocks, and never
    # return the top of the heap to the system (-1 is SIZE_MAX).
    _host_memory_kept = all([mallopt(param, value) == 1 for param, value in
                             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))])
    return _host_memory_kept


# --- paths ------------------------------------------------------------------------------
is_remote, absolute = storage.is_remote, storage.absolute  # where they live: storage.py


# --- preemption -------------------------------------------------------------------------
# main's exit status when a signal stopped the run before its last update, after a
# checkpoint: EX_TEMPFAIL of sysexits.h ("try again later"). The same command resumes it.
# 0 means finished; any other status is an error that running again will not cure.
RESUMABLE_EXIT = 75


class Stopped(Exception):
    """A stage of a longer mode (demo, ablate, shapes, finetune) was stopped by a signal
    before its last update, after a checkpoint: the mode stops there too (main exits
    RESUMABLE_EXIT), rather than going on to evaluate or export a half-trained model."""

    def __init__(self, summary):
        super().__init__(f"stopped by {summary.get('stopped_by')} at update {summary.get('update')} of "
                         f"{summary.get('total_updates')}; run the same command to resume")
        self.summary = summary


def finish(summary):
    """`summary` of a finished training stage; raises Stopped when a signal cut it short."""
    if stopped_early(summary):
        raise Stopped(summary)
    return summary


def stopped_early(summary) -> bool:
    """Whether a run's summary says a signal stopped it before its last update.

    A signal that lands during the last update stops nothing: that run is finished."""
    if not isinstance(summary, dict) or summary.get("stopped_by") is None:
        return False
    return summary.get("update", 0) < summary.get("total_updates", 0)


@functools.lru_cache(maxsize=None)
def _flag_sharding():
    """Each device's copy of its process's flag, along one axis of every device."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("all"))


_max_flag = jax.jit(lambda flags: flags.max())


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

    def gather(self):
        """Every process's signal so far, combined on the devices, without waiting: a device
        value that `read` turns into the agreed answer. A pod or a SLURM job signals every
        process, but not at the same update: they must stop together, or the ones still
        stepping would wait forever for the ones saving. The train loop gathers at every
        update and reads a gather an update later (so the host never waits for the update it
        has just dispatched); a signal that lands after a gather counts at the next. None
        with one process, where the flag itself is the answer."""
        if jax.process_count() == 1:
            return None
        local = np.full((jax.local_device_count(),), self.signal or 0, np.int32)
        flags = jax.make_array_from_process_local_data(_flag_sharding(), local)
        return _max_flag(flags)

    def read(self, gathered) -> bool:
        """The answer of a `gather` (None: this process's flag); every process that reads
        the same gather gets the same answer."""
        if gathered is None:
            return self.signal is not None
        value = int(np.max(jax.device_get(gathered)))
        if value and self.signal is None:
            self.signal = value  # how the run stopped, on the processes not signalled
        return value != 0

    @property
    def name(self) -> Optional[str]:
        return None if self.signal is None else signal.Signals(self.signal).name


# --- one run per workdir ----------------------------------------------------------------
class WorkdirBusy(RuntimeError):
    """Another process runs in this workdir."""


class WorkdirLock:
    """`WORKDIR/lock` names the process that runs there (pid, host, start time).

    Taken with an exclusive create (`storage.create_exclusive`), so of two starts one
    wins: locally the record is written to a temporary file that is hard-linked into
    place, which fails when a lock is there; on a bucket one upload on GCS's precondition
    that no object is there (`ifGenerationMatch=0`). Either way the lock appears whole,
    never empty. A lock whose process is gone is taken over: on the same host when its pid
    no longer runs (a `kill -9`'s successor starts), on another host when it has not been
    refreshed for `stale_after_s` (while held, a thread refreshes it every `refresh_s`).
    A lock file with no readable record (empty: written by an older version, or on a
    filesystem without hard links, by a start killed between its create and its write;
    or another program's file) names no process to ask, so its age alone decides: it is
    taken over once it is `stale_after_s` old and refused before. Ages are the file's
    modification time (the object's update time on a bucket) against this host's `clock`.
    A takeover removes exactly the file it judged (`storage.remove_if`: on GCS a delete on
    the generation's precondition; locally a rename, with the narrow gap `remove_if`
    describes), so of two takers one wins. Taking a lock this process
    already holds (main takes the workdir's, then training takes it again) counts up and
    releases at the last `release`. Process 0 of a run holds it (`hold_workdir`).
    """

    _held: Dict[str, "WorkdirLock"] = {}  # path -> the lock this process holds there
    _registry = threading.Lock()
    clock = staticmethod(time.time)  # "now" for ages (tests give a lock another clock)

    def __init__(self, workdir: str, stale_after_s: float = 600.0, refresh_s: float = 60.0):
        self.path = epath.Path(absolute(workdir)) / "lock"  # absolute: the key of `of`
        self.stale_after_s, self.refresh_s = stale_after_s, refresh_s
        self._depth = 0
        self._stop = threading.Event()
        self._token = ""  # this holder's mark in its record (several locks of one process differ)
        self._refresher: Optional[threading.Thread] = None

    @classmethod
    def of(cls, workdir: str) -> "WorkdirLock":
        """The lock of `workdir`: the one this process holds there, or a new one."""
        key = os.fspath(epath.Path(absolute(workdir)) / "lock")
        with cls._registry:
            return cls._held.get(key) or cls(workdir)

    @staticmethod
    def _me() -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def _holder(self) -> Optional[dict]:
        """The lock's record; {} when it holds none that can be read (empty, half-written
        by another program, not JSON); None when there is no lock."""
        try:
            record = json.loads(storage.read_text(os.fspath(self.path)))
        except FileNotFoundError:
            return None
        except ValueError:  # empty or not JSON (UnicodeDecodeError is a ValueError)
            return {}
        return record if isinstance(record, dict) else {}

    def _gone(self, holder: dict, age: float) -> bool:
        """Whether the lock's process no longer runs, so the lock can be taken over."""
        if holder.get("host") == socket.gethostname() and "pid" in holder:
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:  # another user's live process
                return False
            except (ValueError, OverflowError):  # no pid of this host: its age says
                return age > self.stale_after_s
            return False
        return age > self.stale_after_s  # another host, or no record: not refreshed for too long

    def acquire(self) -> "WorkdirLock":
        if self._depth:
            self._depth += 1
            return self
        path = os.fspath(self.path)
        storage.makedirs(os.fspath(self.path.parent))
        self._token = os.urandom(16).hex()
        record = {**self._me(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": self._token}
        for _ in range(3):  # a stale lock removed between two starts: try again
            if storage.create_exclusive(path, json.dumps(record).encode()):
                self._depth = 1
                with self._registry:
                    self._held[path] = self
                self._stop.clear()
                self._refresher = threading.Thread(target=self._keep_fresh, name="workdir-lock", daemon=True)
                self._refresher.start()
                return self
            try:
                when, version = storage.stamp(path)  # before the read: a removal is of this version
            except FileNotFoundError:
                continue  # released or taken over meanwhile
            holder = self._holder()
            if holder is None:
                continue
            age = self.clock() - when
            if not self._gone(holder, age):
                if not holder:
                    raise WorkdirBusy(
                        f"{self.path.parent} is locked by {self.path}, which holds no readable record "
                        f"(a start killed while writing it?), last written {age:.0f} s ago; it is taken "
                        f"over once it is {self.stale_after_s:.0f} s old. If no run uses this workdir, "
                        f"delete {self.path}")
                raise WorkdirBusy(
                    f"{self.path.parent} is in use by process {holder.get('pid')} on host "
                    f"{holder.get('host')} (started {holder.get('started')}); two runs in one workdir "
                    "would overwrite each other's checkpoints and metrics. Wait for it to finish, "
                    "stop it, or use another --workdir. If that process is gone, delete "
                    f"{self.path}")
            storage.remove_if(path, version)  # its process is gone: take it over (unless replaced)
        raise WorkdirBusy(f"could not take {self.path}: other processes keep taking it")

    def _keep_fresh(self) -> None:
        """Mark the lock alive for a start on another host (`_gone` reads its age); stop,
        saying so, if it is no longer this holder's."""
        path = os.fspath(self.path)
        while not self._stop.wait(self.refresh_s):
            try:
                text = storage.read_text(path)
                try:
                    mine = json.loads(text).get("token") == self._token
                except (ValueError, AttributeError):
                    mine = False
                if not mine:
                    logging.warning("%s is no longer this run's (taken over as stale?); not refreshed", path)
                    return
                if is_remote(path):
                    storage.write_text(path, text)
                else:
                    os.utime(path)
            except OSError as e:  # a missing lock is recreated by nobody: say so once
                logging.warning("could not refresh %s: %s", path, e)
                return

    def release(self) -> None:
        if not self._depth:
            return
        self._depth -= 1
        if self._depth == 0:
            self._stop.set()
            if self._refresher is not None:  # no refresh after the removal (nor during it)
                self._refresher.join()
                self._refresher = None
            path = os.fspath(self.path)
            with self._registry:
                self._held.pop(path, None)
            try:  # remove the lock if it is still this holder's (not taken over meanwhile)
                version = storage.stamp(path)[1]
                if (self._holder() or {}).get("token") == self._token:
                    storage.remove_if(path, version)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


@contextlib.contextmanager
def hold_workdir(workdir: str):
    """The workdir's lock for this run, taken by process 0 (`WorkdirLock`); with several
    processes, all of them raise when process 0 could not take it."""
    lock = WorkdirLock.of(workdir)
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except Exception as e:  # noqa: BLE001 - the other processes must hear of any failure
            error = e
    if jax.process_count() > 1:
        refused = int(np.max(multihost_utils.process_allgather(np.int32(error is not None))))
        if refused and error is None:
            error = WorkdirBusy(f"{workdir} could not be taken for this run by process 0 (its log "
                                "names the reason)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        lock.release()
