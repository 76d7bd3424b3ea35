"""Meshes and logical-axis sharding rules.

Parameters and activations are annotated with logical axis names (``vocab``, ``embed``,
``heads``, ``mlp``, ``batch``, ``length``); one rules table maps them to mesh axes. The default
mesh is ``("data", "model")``: ``data`` for data parallelism (and FSDP of ``embed`` when
``fsdp=True``), ``model`` for tensor parallelism over heads and the MLP width.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Logical axis -> mesh axis. None = replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", "data"),
    ("length", None),
    ("vocab", "model"),
    ("embed", None),
    ("embed_out", None),
    ("heads", "model"),
    ("kv", None),
    ("mlp", "model"),
)
FSDP_RULES: tuple[tuple[str, Any], ...] = tuple(
    (name, "data") if name == "embed" else (name, axis) for name, axis in DEFAULT_RULES)


def make_mesh(shape: Sequence[int] | None = None, axis_names: Sequence[str] = ("data", "model"),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all, across processes) with ``shape``.

    ``shape`` defaults to ``(n_devices, 1)``: pure data parallelism.

    Raises:
      ValueError: the shape's product is not the device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = tuple(shape) if shape is not None else (len(devices),) + (1,) * (len(axis_names) - 1)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), tuple(axis_names))


def params_sharding(abstract_boxed_params: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for params from their logical annotations (``nn.with_logical_partitioning``).

    Args:
      abstract_boxed_params: ``jax.eval_shape(module.init, ...)["params"]`` *before* unboxing,
        so the ``nn.Partitioned`` boxes still carry their logical names.
    """
    logical = nn.get_partition_spec(abstract_boxed_params)
    return nn.logical_to_mesh_sharding(logical, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, ...] batch: batch over the ``data`` axis, the rest replicated."""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
