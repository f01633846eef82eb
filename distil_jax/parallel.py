"""Multi-host start-up, device mesh, logical-axis shardings and global batches.

`initialize_distributed` joins JAX's multi-controller runtime (one process per host or
per GPU) before anything touches a device. The mesh has axes ('data', 'fsdp', 'tensor')
over every process's devices. Parameters carry logical axis names (models/layers.py);
`config.mesh.rules` maps them to mesh axes. Batches are sharded over ('data', 'fsdp')
and reach the devices as global arrays built from each process's local rows.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


# --- multi-host start-up --------------------------------------------------------------
def distributed_problems(coordinator_address: Optional[str], num_processes: Optional[int],
                         process_id: Optional[int], timeout_s: int) -> List[str]:
    """What is wrong with the multi-host flags, each with its fix (empty when nothing is)."""
    problems = []
    explicit = coordinator_address is not None
    if not explicit and process_id is not None:
        problems.append("--process_id needs --coordinator_address=HOST:PORT (process 0's address) "
                        "and --num_processes")
    if explicit:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(f"--coordinator_address {coordinator_address!r} must be HOST:PORT, "
                            "e.g. 10.0.0.1:8476 (process 0's host and a free port)")
        if num_processes is None or process_id is None:
            problems.append("--coordinator_address needs --num_processes and --process_id "
                            "(or leave all three out to let JAX detect a TPU VM or SLURM job)")
    if num_processes is not None and num_processes < 1:
        problems.append(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and (process_id < 0 or (num_processes or 0) >= 1 and process_id >= num_processes):
        problems.append(f"--process_id must be in [0, --num_processes), got {process_id} "
                        f"of {num_processes}")
    if timeout_s <= 0:
        problems.append(f"--initialization_timeout must be positive seconds, got {timeout_s}")
    return problems


def _watchdog(seconds: int, what: str) -> threading.Event:
    """Exit with `what` if the returned event is not set within `seconds`.

    jax.distributed.initialize aborts from C++ on its own deadline (about twice the
    timeout it is given) with a message that blames a dead task; this says what happened.
    """
    done = threading.Event()

    def wait():
        if not done.wait(seconds):
            sys.stderr.write(f"error: {what}\n")
            sys.stderr.flush()
            os._exit(1)

    threading.Thread(target=wait, name="distributed-init-watchdog", daemon=True).start()
    return done


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, timeout_s: int = 300,
                           heartbeat_timeout_s: int = 100,
                           local_device_ids: Optional[Sequence[str]] = None) -> str:
    """Join JAX's distributed runtime; returns how ('flags', 'auto', or 'single').

    With explicit flags, every process connects to process 0's coordinator. With none,
    JAX detects a cluster (Cloud TPU VM, SLURM, Open MPI) or there is none and this
    stays one process. Must run before any JAX computation. On CPU the cross-process
    collectives are gloo's. A process that cannot join within `timeout_s` exits with an
    error naming the coordinator; a process silent for `heartbeat_timeout_s` once
    running makes the others stop.
    """
    problems = distributed_problems(coordinator_address, num_processes, process_id, timeout_s)
    if local_device_ids is not None and not all(str(i).isdigit() for i in local_device_ids):
        problems.append(f"--local_device_ids must be device numbers like 0,1,2,3, got {list(local_device_ids)}")
    if problems:
        raise ValueError("; ".join(problems))
    if coordinator_address is None and num_processes == 1:
        return "single"
    where = (f"process {process_id} of {num_processes} could not join the coordinator at "
             f"{coordinator_address}" if coordinator_address else "could not join the detected cluster")
    done = _watchdog(timeout_s, f"{where} within --initialization_timeout={timeout_s} s. Start every "
                                "process (process 0 runs the coordinator), check that HOST:PORT is "
                                "process 0's address and reachable, or raise the timeout")
    start = time.monotonic()
    try:
        # JAX's own deadline comes after ours, so that our message is the one seen.
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   local_device_ids=None if local_device_ids is None else
                                   [int(i) for i in local_device_ids],
                                   initialization_timeout=timeout_s + 30,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
    except ValueError as e:  # raised before connecting: no flags and no cluster detected
        if coordinator_address is not None:
            raise
        logging.info("no cluster environment detected (%s): one process", e)
        return "single"
    finally:
        done.set()
    # Read when the CPU backend starts (after this): collectives across processes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("joined the distributed runtime in %.1f s: process %d of %d, %d local of %d devices",
                 time.monotonic() - start, jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return "flags" if coordinator_address else "auto"


# --- mesh and shardings ---------------------------------------------------------------
def mesh_shape(shape: Sequence[int], num_devices: int) -> Tuple[int, ...]:
    """Fill the one -1 in `shape` so the product is `num_devices`."""
    known = math.prod(s for s in shape if s != -1)
    return tuple(num_devices // known if s == -1 else int(s) for s in shape)


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    full = mesh_shape(shape, len(devices))
    if math.prod(full) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} -> {full} does not use all {len(devices)} devices")
    # Auto axes: XLA's partitioner propagates shardings from the step's in/out shardings.
    return jax.make_mesh(full, MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _fit(spec: P, shape: Tuple[int, ...], mesh: Mesh, path: str) -> P:
    """Replicate any dimension its mesh axes do not divide (e.g. vocab 30522 over 4)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else (axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        if size > 1 and dim % size:
            logging.warning("%s: dimension %d is not divisible by mesh axes %s (%d); replicated",
                            path, dim, names, size)
            axes = None
        fitted.append(axes)
    return P(*fitted)


def logical_shardings(abstract: Any, logical_specs: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) from logical specs."""
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)

    def one(path, leaf, spec):
        name = jax.tree_util.keystr(path)
        return NamedSharding(mesh, _fit(spec if spec is not None else P(), leaf.shape, mesh, name))

    return jax.tree_util.tree_map_with_path(
        one, abstract, mesh_specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """A micro-batch [rows, seq]: rows over data x fsdp, the sequence dimension whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """An update's micro-batches [k, rows, seq]: the micro-batch axis whole, rows as
    `rows_sharding`."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def process_rows(mesh: Mesh, global_rows: int) -> np.ndarray:
    """The rows of each global micro-batch this process's devices hold, in order: what its
    loader reads. Any device order works: on a TPU slice, `jax.make_mesh`'s topology-aware
    order can give a process several separate runs of rows, and
    `make_array_from_process_local_data` takes them concatenated in this order."""
    slices = rows_sharding(mesh).addressable_devices_indices_map((global_rows,)).values()
    return np.array(sorted({r for s in slices for r in range(*s[0].indices(global_rows))}), np.int64)


def global_batch(local: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
    """Global [k, rows, seq] arrays from this process's rows of an update's micro-batches.

    With one process the local batch is the global batch; with several, each
    contributes its own slice and jax assembles the global array.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


# --- the update's per-device region ----------------------------------------------------------
# Inside `per_device` (step.py's micro-batch loop) each data-parallel group of devices holds
# its own rows of every micro-batch and its own partial gradients; what needs the whole
# micro-batch asks for it here: the sums behind every mean (a loss's denominator, a
# metric), and a row's global index (dropout keys). Outside, these are plain sums and 0.
_manual_axes: Tuple[str, ...] = ()


@contextlib.contextmanager
def _manual(axes: Tuple[str, ...]):
    global _manual_axes
    saved, _manual_axes = _manual_axes, axes
    try:
        yield
    finally:
        _manual_axes = saved


def batch_sum(x) -> jax.Array:
    """The sum of `x` over the whole micro-batch (every device's rows)."""
    total = jnp.sum(x)
    return jax.lax.psum(total, _manual_axes) if _manual_axes else total


def batch_psum(tree):
    """Per-device partial sums (gradients, metrics) summed over the micro-batch's devices."""
    return jax.lax.psum(tree, _manual_axes) if _manual_axes else tree


def row_offset(local_rows: int) -> jax.Array:
    """The global index of this device group's first row of the micro-batch (0 outside)."""
    if not _manual_axes:
        return jnp.zeros((), jnp.int32)
    return (jax.lax.axis_index(_manual_axes) * local_rows).astype(jnp.int32)


def per_device(fn, mesh: Mesh, in_specs, out_specs):
    """`fn` run once per data-parallel group of devices (`jax.shard_map`, manual over the
    'data' axis; 'fsdp' stays with XLA's partitioner), with `batch_sum`, `batch_psum` and
    `row_offset` reaching across the groups. With one group, or with a 'tensor' axis (XLA
    aborts partitioning the embedding gather of a partly manual program over it: "Check
    failed: partition_group_list..." in spmd_partitioner_util, jax 0.10.2), `fn` itself,
    left whole to the partitioner: the same values, the gradients reduced per micro-batch."""
    if mesh.shape["data"] == 1 or mesh.shape["tensor"] > 1:
        return fn

    def manual(*args):
        with _manual(("data",)):
            return fn(*args)
    return jax.shard_map(manual, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         axis_names={"data"}, check_vma=False)
