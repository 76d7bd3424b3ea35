"""Checkpoints (STYLE §10; MaxText ``checkpointing.py``): the Orbax manager, save, the resume
check, and the one "newest, else the previous" restore used by training, resume and export.

A step directory ``<out_dir>/checkpoints/<step>/`` holds three named items: ``state`` (the
:class:`~sense_jax.training.step.TrainState`), ``data`` (the data position) and ``meta`` (what
the run was trained against). The teacher and the sense dictionary are never in it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from sense_jax.errors import ConfigError, SenseJaxError
from sense_jax.provenance import check_provenance
from sense_jax.training.config import _FIELDS, RESUMABLE_CHANGES
from sense_jax.training.step import TrainState

ITEMS = ("state", "data", "meta")


def checkpoint_manager(directory: str | os.PathLike, *, save_every: int, keep: int,
                       async_save: bool = True):
    """The run's Orbax CheckpointManager: named items, save every ``save_every`` steps, keep ``keep``.

    Items of step ``s`` (directory ``<dir>/<s>/``):
      ``state``: the :class:`TrainState` (params, optax state, step, rng), sharded arrays;
      ``data``:  JSON ``{"micro_batches": int, "step": int}``, the data position;
      ``meta``:  JSON: the run config, the student / teacher configs, the teacher's config.json,
                 whether the frozen pooler is present, the teacher, tokenizer and dictionary
                 fingerprints, the dictionary's shape, and the provenance (library versions,
                 devices: :mod:`sense_jax.provenance`).

    Resume order (:func:`restore_latest`, the same for training, resume and export): (1) read
    ``meta`` and check it against the current config, teacher, tokenizer and dictionary
    (:func:`check_resume`; a mismatch is refused by name, before any array is read, and no
    checkpoint is touched); (2) build the mesh and the abstract state with its shardings from
    the *current* devices (so 8 -> 1 device and back works) and compare the stored params' shapes with it; (3) restore ``state`` onto them;
    (4) restore ``data`` and move the stream there; (5) continue at ``step + 1``. Saves are
    asynchronous; :meth:`wait_until_finished` runs before exit. Only a step directory that cannot
    be read by itself (corrupt, truncated) is set aside and the previous one used; Orbax writes
    each step to a temporary directory renamed when complete, so partial saves are never listed.
    """
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=ITEMS)


def save_checkpoint(mngr, state: TrainState, micro_batches: int, meta: dict, extra: dict | None = None) -> bool:
    """Save step ``state.step`` asynchronously (the caller decides when); False if already saved.

    ``extra``: more JSON for the ``data`` item (a task run's early-stopping state)."""
    step = int(jax.device_get(state.step))
    if step in mngr.all_steps():
        return False
    return mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({**(extra or {}), "micro_batches": int(micro_batches), "step": step}),
        meta=ocp.args.JsonSave(meta)), force=True)


def read_meta(mngr, step: int) -> dict:
    """The ``meta`` item of checkpoint ``step`` (JSON)."""
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _short(e: BaseException, limit: int = 160) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _set_aside(mngr, step: int) -> None:
    """Rename an unreadable step ``<step>.unreadable-<time>`` (kept for inspection; the step can
    be saved anew)."""
    bad = Path(str(mngr.directory)) / str(step)
    if jax.process_index() == 0 and bad.is_dir():
        os.replace(bad, bad.with_name(f"{step}.unreadable-{int(time.time())}"))
    mngr.reload()


def _check_shapes(stored: dict, abstract_params: Any, where: str) -> None:
    """Refuse stored params whose paths or shapes differ from the current abstract params."""
    have = {k: tuple(getattr(v, "shape", ())) for k, v in traverse_util.flatten_dict(stored, sep="/").items()}
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract_params, sep="/").items()}
    for k in sorted(set(have) | set(want)):
        if have.get(k) != want.get(k):
            old = "no such parameter" if k not in have else f"shape {list(have[k])}"
            new = "no such parameter" if k not in want else f"shape {list(want[k])}"
            raise ConfigError(f"{where}: the checkpoint holds parameter {k} with {old}, the current "
                              f"configuration {new}; use another out_dir or the checkpoint's configuration")

def open_checkpoints(directory: str | os.PathLike):
    """A read-only CheckpointManager over an existing ``checkpoints/`` directory (export)."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns that a read-only manager is read-only
    try:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=ITEMS)
    finally:
        absl_logger.setLevel(level)


def restore_latest(mngr, abstract_state: TrainState | Callable[[dict, str], Any], *,
                   log: Callable[[str], None] = print, check: Callable[[dict, str], None] | None = None,
                   steps: Sequence[int] | None = None, set_aside: bool = True, name: Any = None
                   ) -> tuple[TrainState, dict, int] | None:
    """Restore the newest complete checkpoint onto ``abstract_state``'s shardings.

    For each step, newest first: (1) read its ``meta`` and call ``check(meta, step_dir)``, which
    raises to refuse the checkpoint (a config, teacher or dictionary mismatch:
    :func:`check_resume`); (2) compare the stored params' paths and shapes with
    ``abstract_state``'s, from the checkpoint's metadata; (3) restore the arrays. A refusal in
    (1) or (2) propagates and leaves every checkpoint as it is: it says that the current
    configuration does not fit them, not that they are bad. Only a step that cannot be read by
    itself (unreadable meta or metadata, corrupt or truncated array files) is renamed
    ``<step>.unreadable-<time>`` (so that later saves of that step can happen; not with
    ``set_aside=False``, for a read-only manager) and the previous step is tried.

    Args:
      abstract_state: the TrainState of ShapeDtypeStruct (with shardings) to restore onto, or
        ``(meta, step_dir) -> that`` when it depends on the checkpoint (export: the tree the
        step's metadata describes, as nested dicts); a step it fails on counts as unreadable.
      steps: the steps to try (default: all the manager lists).
      name: how messages name the directory (default ``mngr.directory``).

    Returns:
      ``(state, data, step)``, or None when the directory holds no checkpoint.

    Raises:
      ConfigError: the checkpoint does not fit the current configuration (from ``check`` or the
        shape comparison), nothing renamed.
      SenseJaxError: checkpoints exist but none can be read (names the directory and the errors).
    """
    name = Path(str(mngr.directory)) if name is None else Path(name)
    steps = sorted(mngr.all_steps() if steps is None else steps, reverse=True)
    errors = []
    for s in steps:
        where = str(Path(str(mngr.directory)) / str(s))
        try:
            meta = read_meta(mngr, s)
            abstract = abstract_state(meta, where) if callable(abstract_state) else abstract_state
        except Exception as e:  # unreadable by itself: fall back to the previous step
            meta, error = None, e
        if meta is not None:
            if check is not None:
                check(meta, where)
            try:
                stored = ocp.StandardCheckpointHandler().metadata(Path(where) / "state").tree["params"]
            except Exception:  # unreadable metadata: the restore below tells whether the step is bad
                stored = None
            if stored is not None:
                _check_shapes(stored, abstract.params if isinstance(abstract, TrainState) else abstract["params"],
                              where)
            try:
                out = mngr.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
                return out["state"], dict(out["data"]), s
            except Exception as e:  # corrupt or truncated array files
                error = e
        msg = _short(error)
        errors.append(f"step {s}: {msg}")
        log(f"checkpoint {name / str(s)} cannot be restored ({msg}); trying the previous one")
        if set_aside:
            _set_aside(mngr, s)
    if steps:
        raise SenseJaxError(f"{name}: no checkpoint could be restored ({'; '.join(errors)})")
    return None


def check_resume(saved: dict, current: dict, where: str) -> None:
    """Refuse to resume from a checkpoint trained against something else; reads no array.

    Compared, in this order (``saved`` is the checkpoint's ``meta``, ``current`` this run's
    :attr:`~sense_jax.training.setup.Setup.meta`): the model family; the teacher's config (sizes, vocabulary, ...); the
    tokenizer fingerprint; the teacher fingerprint (embedding matrix and tokenizer; embedding
    only for checkpoints that predate it); the dictionary's shape and fingerprint; the run config
    (except :data:`RESUMABLE_CHANGES`; the ``teacher`` and ``senses`` *paths* may change when the
    checkpoint records the fingerprints of what they hold); the student's config; the frozen
    pooler. Then a restore under other major library versions warns once (provenance).

    Raises:
      ConfigError: one line naming the checkpoint, the first key that differs and both values.
    """
    current = json.loads(json.dumps(current))  # tuples -> lists, as stored

    def refuse(what: str, old: Any, new: Any, fix: str) -> None:
        raise ConfigError(f"{where}: the checkpoint was trained with {what}={old}, now {what}={new}; "
                          f"use another out_dir or {fix}")

    if saved.get("family", current["family"]) != current["family"]:
        refuse("a teacher of family", saved["family"], current["family"], "the checkpoint's teacher")
    for k, v in (saved.get("teacher_config") or {}).items():
        if k != "dtype" and v != current["teacher_config"].get(k):  # dtype: compute_dtype's business
            refuse(f"teacher {k}", v, current["teacher_config"].get(k), "the checkpoint's teacher")
    fp_old = saved.get("teacher_fingerprint")
    if saved.get("tokenizer_fingerprint") not in (None, current["tokenizer_fingerprint"]):
        refuse("the teacher's tokenizer fingerprint", saved["tokenizer_fingerprint"],
               current["tokenizer_fingerprint"], "the checkpoint's teacher (its vocabulary or token ids differ)")
    if fp_old is not None:
        new = current["teacher_fingerprint"] if str(fp_old).startswith("v") else current["embedding_fingerprint"]
        if fp_old != new:
            refuse("teacher fingerprint", fp_old, new, "the checkpoint's teacher (other weights or tokenizer)")
    # A run without a dictionary (the MSE baseline) does not depend on one: nothing to compare.
    uses_dict = current["dictionary_shape"] is not None
    for k, v in ((saved.get("dictionary_shape") or {}) if uses_dict else {}).items():
        if v != current["dictionary_shape"].get(k):
            refuse(f"sense dictionary {k}", v, current["dictionary_shape"].get(k), "the checkpoint's senses")
    if uses_dict and saved.get("dictionary_fingerprint") not in (None, current["dictionary_fingerprint"]):
        refuse("sense dictionary fingerprint", saved["dictionary_fingerprint"], current["dictionary_fingerprint"],
               "the checkpoint's senses")
    checked = set()
    if saved.get("tokenizer_fingerprint") and str(fp_old).startswith("v"):
        checked.add("teacher")
    if saved.get("dictionary_fingerprint") or not uses_dict:
        checked.add("senses")
    old = saved.get("config", {})
    for k, v in current["config"].items():
        if k in RESUMABLE_CHANGES or k in checked or (k not in old and k not in _FIELDS):
            continue
        # A key added after the checkpoint was written was, for that run, at its default.
        was = old[k] if k in old else _FIELDS[k].default
        if was != v:
            raise ConfigError(f"{where}: the checkpoint was trained with {k}={was!r}, now {k}={v!r}; "
                              "use another out_dir or the same value")
    for k, v in (saved.get("student_config") or {}).items():
        if k != "dtype" and v != current["student_config"].get(k):
            refuse(f"student {k}", v, current["student_config"].get(k), "the checkpoint's student")
    if saved.get("label_vocabulary") not in (None, current.get("label_vocabulary")):
        old_v, new_v = saved["label_vocabulary"], current.get("label_vocabulary") or {}
        refuse("labels", old_v.get("names") or "regression", new_v.get("names") or "regression", "the same data")
    if saved.get("has_pooler", current["has_pooler"]) != current["has_pooler"]:
        refuse("a teacher pooler", saved["has_pooler"], current["has_pooler"], "the checkpoint's teacher")
    check_provenance(saved.get("provenance"), f"checkpoint {where}")


