"""Device mesh, logical-axis shardings and global batches.

The mesh has axes ('data', 'fsdp', 'tensor'). Parameters carry logical axis names
(models/layers.py); `config.mesh.rules` maps them to mesh axes. Batches are sharded
over ('data', 'fsdp') and reach the devices as global arrays built from each
process's local rows.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


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


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
    """Rows over data x fsdp, the sequence dimension whole; `stacked` batches carry a
    leading micro-batch axis [accumulation, rows, seq] that is not sharded."""
    return NamedSharding(mesh, P(None, BATCH_AXES) if stacked else P(BATCH_AXES))


def global_batch(local: Dict[str, np.ndarray], mesh: Mesh, stacked: bool = False) -> Dict[str, jax.Array]:
    """Global arrays from this process's rows of every global batch.

    With one process the local batch is the global batch; with several, each
    contributes its own slice and jax assembles the global array.
    """
    sharding = batch_sharding(mesh, stacked)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}
