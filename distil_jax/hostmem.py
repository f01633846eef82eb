"""Host memory for XLA on a CPU: keep freed memory instead of giving it back every step.

XLA:CPU allocates each execution's temporaries as one block (1.2 GiB for the BERT-base
train step at 8 x 128) with the C library's malloc. glibc serves a block that large with a
fresh `mmap` and unmaps it on free, so every step the kernel maps and zeroes the whole
block again, one 4 KiB page fault at a time: 350,000 faults and 0.7 s of system time per
step at those shapes, 12% of the CPU time. `keep_host_memory()` tells glibc to serve
large blocks from its heap (no mmap), never to trim that heap, and to use one arena
(otherwise a block allocated on XLA's executor thread comes from a thread arena, whose
heaps cannot hold it, and glibc falls back to mmap). After the first step the same
memory is reused: no faults, no zeroing. `python -m distil_jax.bench train --matmul`
measures it; BENCHMARKS.md has the numbers.

The cost: the process keeps its peak memory until it exits, as accelerator allocators
do. It is called by the command-line entry points (main, bench, ablate) before JAX
starts; a library user calls it or not. Set DISTIL_JAX_HOST_MALLOC=system to leave
malloc as it is. Where the C library has no `mallopt` (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
ENV = "DISTIL_JAX_HOST_MALLOC"
_KEPT = False


def kept() -> bool:
    """Whether `keep_host_memory()` took effect in this process."""
    return _KEPT


def keep_host_memory() -> bool:
    """Make glibc's malloc keep and reuse large freed blocks (see the module docstring).

    Call it before JAX starts its threads (before the first array is made). Returns
    whether the setting took effect; False where DISTIL_JAX_HOST_MALLOC=system, or
    where the C library is not glibc.
    """
    if os.environ.get(ENV, "keep") == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # All three are needed: one arena for every thread, no mmap for large blocks, and never
    # return the top of the heap to the system (-1 is SIZE_MAX).
    global _KEPT
    _KEPT = all([mallopt(param, value) == 1 for param, value in
                 ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))])
    return _KEPT
