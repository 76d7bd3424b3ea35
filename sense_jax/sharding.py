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

from sense_jax.errors import SenseJaxError

# Logical axis -> mesh axis. None = replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", "data"),
    ("length", None),
    ("vocab", "model"),
    ("embed", None),
    ("embed_out", None),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("kv", None),
    ("mlp", "model"),
    ("norm", None),
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

    A dimension that the mesh axes assigned to it do not divide (a vocabulary of 30522 over a
    ``model`` axis of 4, 2 kv heads over 8 devices) is replicated instead, so any mesh works.
    """
    logical = nn.get_partition_spec(abstract_boxed_params)
    shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
    shapes = jax.tree.map(lambda x: tuple(x.value.shape) if isinstance(x, nn.Partitioned) else
                          tuple(getattr(x, "shape", np.shape(x))), abstract_boxed_params,
                          is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return jax.tree.map(lambda s, shape: _divisible(s, shape, mesh), shardings, shapes,
                        is_leaf=lambda x: isinstance(x, NamedSharding))


def _divisible(sharding: NamedSharding, shape: tuple, mesh: Mesh) -> NamedSharding:
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    fixed = []
    for dim, axes in zip(shape, spec):
        names = axes if isinstance(axes, tuple) else ((axes,) if axes else ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        fixed.append(axes if dim % size == 0 else None)
    return NamedSharding(mesh, P(*fixed))


def family_params_sharding(family: Any, cfg: Any, mesh: Mesh, rules=FSDP_RULES) -> Any:
    """NamedShardings for the params of ``family.make_module(cfg)`` (a pytree matching
    :func:`sense_jax.convert.abstract_params`), from the modules' logical annotations.

    With :data:`FSDP_RULES` an 8B-class decoder is split two ways: ``embed`` over ``data``
    (FSDP) and heads / kv heads / MLP width / vocabulary over ``model`` (tensor parallelism).
    """
    return params_sharding(family.abstract_params(cfg, boxed=True), mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, ...] batch: batch over the ``data`` axis, the rest replicated."""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...], axis: int = 0) -> slice:
    """The rows along ``axis`` of a ``global_shape`` array that this process's devices hold under
    ``sharding`` (all rows with one process). Extraction and training read and tokenise only
    these, and feed them with ``jax.make_array_from_process_local_data``.

    Raises:
      SenseJaxError: the process's rows are not one contiguous block (a mesh whose data axis
        interleaves processes; :func:`make_mesh` orders devices by process).
    """
    n = global_shape[axis]
    spans = {(i[axis].start or 0, n if i[axis].stop is None else i[axis].stop)
             for i in sharding.addressable_devices_indices_map(tuple(global_shape)).values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != hi - lo:
        raise SenseJaxError(f"process {jax.process_index()}: its devices hold rows {sorted(spans)} of "
                            "the batch, not one block; order the mesh's devices by process "
                            "(sense_jax.sharding.make_mesh)")
    return slice(lo, hi)
