"""`runtime.keep_host_memory`: after it, a jitted step with a large temporary buffer reuses
its memory (no page faults per call); without it, glibc maps and faults the buffer anew on
every call. Each case runs in a fresh process, since malloc's settings are process-wide."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys
    import jax, jax.numpy as jnp
    from distil_jax import main, runtime  # everything main imports, JAX included: still in time
    took = runtime.keep_host_memory()
    # A [3072, 3072] float32 intermediate (36 MiB: above the most glibc ever serves from its
    # heap by default) every call
    f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T), axis=0))
    x = jnp.ones((3072, 3072), jnp.float32) * 1e-3
    for _ in range(2):
        f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        f(x).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    print(took, int(faults))
""")


def _faults_per_call(setting: str):
    env = {**os.environ, "DISTIL_JAX_HOST_MALLOC": setting, "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    took, faults = out.stdout.split()[-2:]
    return took == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_keeping_host_memory_removes_the_page_faults_of_every_step():
    took, kept = _faults_per_call("keep")
    untouched, system = _faults_per_call("system")
    assert took and not untouched
    pages = 36 * 2**20 // 4096  # one [3072, 3072] float32 buffer in 4 KiB pages
    assert system > pages, system  # without: at least one large buffer faulted in anew per call
    assert kept < pages // 16, kept  # with: (nearly) none
