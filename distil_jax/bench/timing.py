"""What every benchmark record carries: wall-clock timing (the median of repeated calls,
interleaved rounds), the machine, memory peaks, and the one-line JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from typing import Callable, Dict, List, Tuple

import jax
import numpy as np


def median_seconds(fn: Callable[[], object], steps: int, warmup: int = 1) -> Tuple[float, List[float]]:
    """(median, all) wall times of `fn()` (which must block until its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def interleaved(timers: Dict[str, Callable[[], object]], steps: int, pause: float = 0.0) -> Dict[str, List[float]]:
    """Times of `steps` rounds, each running every timer once in turn, after a warm-up of
    each: a machine whose speed drifts during the run (a shared or throttled CPU) slows
    all of them alike, so their ratios hold where their absolute times do not. `pause`
    seconds between timers let the previous one's worker threads go idle (a thread pool
    spins a while after its work is done, taking cores from the next)."""
    for one in timers.values():
        one()
    times: Dict[str, List[float]] = {name: [] for name in timers}
    for _ in range(steps):
        for name, one in timers.items():
            time.sleep(pause)
            start = time.perf_counter()
            one()
            times[name].append(time.perf_counter() - start)
    return times


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def machine() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(), "jax": jax.__version__}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def device_peak_gb():
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30
