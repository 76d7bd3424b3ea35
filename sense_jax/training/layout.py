"""The run's mesh and every sharding (STYLE §6-7): params from their logical boxes, the optimizer
state from ``eval_shape(tx.init, boxed params)`` (its moments keep the boxes of the params they
follow, as in flax's lm1b ``setup_initial_state``), batches over the ``data`` axis."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import optax
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec as P

from sense_jax.students import init_adaptor
from sense_jax.errors import ConfigError
from sense_jax.sharding import DEFAULT_RULES, FSDP_RULES, make_mesh, params_sharding
from sense_jax.training.config import DistillConfig
from sense_jax.training.step import TrainState


@dataclasses.dataclass
class Layout:
    """Mesh, shardings and abstract shapes of one run (everything ``jit`` needs)."""

    mesh: Any
    state: Any            # TrainState of NamedSharding
    abstract_state: Any   # TrainState of ShapeDtypeStruct (with shardings)
    batch: NamedSharding  # [A, B, T]
    eval_batch: NamedSharding
    teacher: Any          # teacher params shardings
    replicated: NamedSharding


def boxed_params(family, student_cfg, teacher_cfg, has_pooler: bool) -> tuple[dict, dict]:
    """Abstract params with their logical-axis boxes: ``(trained, teacher)``, where ``trained``
    is ``{"student", "adaptor"}`` plus the teacher's ``"pooler"`` when ``has_pooler``."""
    teacher = family.abstract_params(teacher_cfg, boxed=True)
    trained = {"student": family.abstract_params(student_cfg, boxed=True),
               "adaptor": jax.eval_shape(lambda: init_adaptor(student_cfg.hidden_size, teacher_cfg.hidden_size,
                                                              boxed=True))}
    if has_pooler:
        trained["pooler"] = teacher["pooler"]
    return trained, teacher


def _drop_empty_boxes(tree: Any) -> Any:
    """``tree`` with the boxes that hold no array unwrapped: optax's ``masked`` puts a
    ``MaskedNode`` (an empty subtree) where a masked-out param was, inside that param's box."""
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda x: x if not is_box(x) or hasattr(x.value, "shape") else x.value, tree,
                        is_leaf=is_box)


def _mesh(cfg: DistillConfig, devices) -> Any:
    n = len(devices)
    data = cfg.mesh_data if cfg.mesh_data != -1 else n // cfg.mesh_model
    if data * cfg.mesh_model != n:
        raise ConfigError(f"config: mesh_data={cfg.mesh_data} x mesh_model={cfg.mesh_model} does not "
                          f"match {n} device(s)")
    if cfg.batch_size % data:
        raise ConfigError(f"config: batch_size={cfg.batch_size} is not a multiple of the data axis ({data})")
    return make_mesh((data, cfg.mesh_model), devices=devices)


def make_layout(cfg: DistillConfig, family, student_cfg, teacher_cfg, has_pooler: bool,
                tx: optax.GradientTransformation, devices=None) -> Layout:
    """Build the mesh and every sharding from the config's mesh shape and rules.

    The optimizer state's shardings come from its own abstract init on the *boxed* params: each
    moment ([S, D] mu / nu of a kernel) carries its param's logical names, everything else
    (optax's step ``count``, empty states) is replicated.

    Raises:
      ConfigError: the mesh does not fit the device count, or batch_size is not a multiple of
        the data axis.
    """
    boxed, teacher_boxed = boxed_params(family, student_cfg, teacher_cfg, has_pooler)
    return layout_for(cfg, boxed, teacher_boxed, tx, devices)


def layout_for(cfg: DistillConfig, boxed: dict, teacher_boxed: dict | None, tx: optax.GradientTransformation,
               devices=None) -> Layout:
    """:func:`make_layout` of any trained params: ``boxed`` is their abstract pytree with the
    logical-axis boxes still on (a task run's ``{"student", "head", "adaptor"}``,
    :mod:`sense_jax.task_train`), ``teacher_boxed`` the teacher's (or None).

    Raises:
      ConfigError: as :func:`make_layout`.
    """
    mesh = _mesh(cfg, list(devices if devices is not None else jax.devices()))
    rules = FSDP_RULES if cfg.fsdp else DEFAULT_RULES
    opt_boxed = _drop_empty_boxes(jax.eval_shape(tx.init, boxed))
    repl = NamedSharding(mesh, P())
    state_sh = TrainState(step=repl, params=params_sharding(boxed, mesh, rules),
                          opt_state=params_sharding(opt_boxed, mesh, rules), rng=repl)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=meta.unbox(boxed),
                          opt_state=meta.unbox(opt_boxed), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    return Layout(mesh=mesh, state=state_sh, abstract_state=abstract,
                  batch=NamedSharding(mesh, P(None, "data", None)), eval_batch=NamedSharding(mesh, P("data", None)),
                  teacher=None if teacher_boxed is None else params_sharding(teacher_boxed, mesh, rules),
                  replicated=repl)

