"""Wall-clock timing for the benchmarks: the median of repeated calls, and interleaved rounds."""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Tuple

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
