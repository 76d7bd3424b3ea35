"""Export a trained student from its checkpoint to a transformers directory (``sense-jax export``).

The restore is the training's own (:func:`~sense_jax.training.checkpoint.restore_latest`:
newest step, else the previous), onto one local device. Its target is what the step's ``state``
item says it holds (Orbax's metadata: every array's path, shape and dtype), so the export needs
no run config, optimizer, teacher weights or dictionary; the student's and teacher's configs
come from the checkpoint's ``meta``, the tokenizer files from the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from sense_jax.hf_export import export_hf
from sense_jax.errors import SenseJaxError
from sense_jax.models import get_family
from sense_jax.provenance import check_provenance, provenance
from sense_jax.training.checkpoint import open_checkpoints, restore_latest


def _config_from_dict(family, saved: dict, hf_config: dict):
    base = family.config_from_hf(hf_config)
    names = {f.name for f in dataclasses.fields(base)}
    return dataclasses.replace(base, **{k: v for k, v in saved.items() if k in names})


def stored_abstract_state(step_dir: str | os.PathLike, device=None) -> Any:
    """The abstract tree (ShapeDtypeStruct leaves on ``device``, default the first local one) of
    the ``state`` item in ``step_dir``, from Orbax's metadata alone: nested dicts and lists, as
    stored (``params``, ``opt_state``, ``step``, ``rng``)."""
    tree = ocp.StandardCheckpointHandler().metadata(Path(step_dir).absolute() / "state").tree
    mesh = jax.sharding.Mesh([device or jax.devices()[0]], ("d",))
    sh = NamedSharding(mesh, P())
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sh), tree)


def _restore_newest(ck_dir: Path, step: int | None, log: Callable[[str], None]) -> tuple[dict, dict, int]:
    """``(params on the host, meta, step)`` of the newest restorable checkpoint (or ``step``)."""
    mngr = open_checkpoints(ck_dir)
    metas = {}

    def abstract(meta: dict, where: str):
        metas[int(Path(where).name)] = meta
        return stored_abstract_state(where)

    def check(meta: dict, where: str) -> None:  # a checkpoint of other library versions: a warning
        check_provenance(meta.get("provenance"), f"checkpoint {ck_dir / Path(where).name}")

    try:
        steps = sorted(mngr.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise SenseJaxError(f"{ck_dir}: no checkpoint for step {step} (have {sorted(steps)})")
            steps = [step]
        if not steps:
            raise SenseJaxError(f"{ck_dir}: holds no complete checkpoint")
        state, _, st = restore_latest(mngr, abstract, log=log, check=check, steps=steps, set_aside=False,
                                      name=ck_dir)
    finally:
        mngr.close()
    return jax.device_get(state["params"]), metas[st], st


def _json_or_empty(path: Path) -> dict:
    """The JSON object in ``path``; {} when it is absent or not a JSON object."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
                      overwrite: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Export a trained student (a run directory or its ``checkpoints/``) to a transformers directory.

    Uses the newest restorable checkpoint (or ``step``), onto the local default device; needs
    neither the teacher's weights nor the dictionary (the run directory holds the tokenizer files
    and the checkpoint the configs).

    Raises:
      SenseJaxError: no checkpoint, none restorable, ``ckpt`` is a transformers model directory
        (not a run), or ``out`` exists without ``overwrite``.
    """
    log = log or (lambda m: print(m, file=sys.stderr))
    ckpt = Path(ckpt)
    ck_dir = ckpt / "checkpoints" if (ckpt / "checkpoints").is_dir() else ckpt
    if not ck_dir.is_dir():
        raise SenseJaxError(f"checkpoint directory not found: {ckpt}")
    if ck_dir is ckpt and "model_type" in _json_or_empty(ckpt / "config.json"):
        raise SenseJaxError(f"{ckpt} is a transformers model directory, not a training run: "
                            "convert it first (sense-jax convert), or export a run directory")
    params, meta, st = _restore_newest(ck_dir, step, log)
    family = get_family(meta["student_config"]["model_type"])
    scfg = _config_from_dict(family, meta["student_config"], meta["teacher_hf_config"])
    tok_dir = ckpt / "tokenizer" if (ckpt / "tokenizer").is_dir() else ck_dir.parent / "tokenizer"
    if not tok_dir.is_dir():
        tok_dir = Path(meta["teacher_path"]) if Path(meta["teacher_path"]).is_dir() else None
    return export_hf(out, family, scfg, params["student"], meta["teacher_hf_config"],
                     tokenizer_dir=tok_dir, adaptor=params["adaptor"], pooler=params.get("pooler"),
                     extra_meta={"step": int(st), "teacher": meta["teacher_path"],
                                 "teacher_fingerprint": meta.get("teacher_fingerprint"),
                                 "provenance": provenance(), "trained_with": meta.get("provenance")},
                     overwrite=overwrite)
