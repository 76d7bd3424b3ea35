"""The work directory of an extraction: what a killed run resumes from, and the fault hook.

``OUT.partial/`` beside the output holds ``job.json`` (the run's settings; another run's partial
work is discarded), ``counted/`` (the counting pass's result, :class:`Counted`), ``store/`` (the
store being filled) and ``progress.json`` (windows done, saved atomically after each window).
Only process 0 writes; what it finds is broadcast to the others.

Fault injection (tests only): :data:`FAULT_HOOK`, when set, is called at every named point of the
extraction with ``(stage, k)`` and may raise or end the process there; the points are
``("count", chunk)``, ``("counted", 0)``, ``("planned", 0)``, ``("step", step)``,
``("window", window)``, ``("final", 0)`` (store complete, not yet renamed) and ``("final", 1)``
(renamed, work directory not yet removed). ``tests/extract_worker.py --fail-at step:5`` kills a
run with ``os._exit``; ``tests/test_extract.py`` sets a raising hook with ``monkeypatch``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from sense_jax.errors import SenseJaxError
from sense_jax.io_utils import check_replaceable, holds_only, read_json, write_json_atomic
from sense_jax.multiprocess import broadcast_ints
from sense_jax.store import COMPLETE_MARKER, STORE_FILES

WORK_SUFFIX = ".partial"
# Keys of meta.json that identify what a store holds; a store at OUT that differs in any of
# them is another extraction and is never overwritten without ``overwrite``.
IDENTITY_KEYS = ("teacher", "teacher_config_hash", "compute_dtype", "tokenizer_hash", "layer", "dtype",
                 "n_per_token", "seed", "max_length", "text_field", "corpus_files_fingerprint",
                 # present (true) only in packed stores: their vectors differ at float rounding
                 "packed")

FAULT_HOOK: Callable[[str, int], None] | None = None
"""Tests only: called as ``FAULT_HOOK(stage, k)`` at each named point (see the module docstring)."""


def fail_point(stage: str, k: int = 0) -> None:
    """A named point where :data:`FAULT_HOOK` (when set) may fail the run."""
    if FAULT_HOOK is not None:
        FAULT_HOOK(stage, k)


@dataclasses.dataclass
class Job:
    """One extraction: its output, work directory, identity (``meta.json`` keys) and process."""

    out: Path
    work: Path
    identity: dict
    proc: int
    nproc: int


@dataclasses.dataclass
class Counted:
    """The counting pass's result: each token's occurrences and the kept sample (bottom-N)."""

    occurrences: np.ndarray  # [V] int64 occurrences of each token in the corpus
    tok: np.ndarray         # [S] int32 kept token, sorted (token, passage, position)
    passage: np.ndarray     # [S] int64
    position: np.ndarray    # [S] int32
    lengths: np.ndarray     # [n_passages] int32 token lengths after truncation
    stats: dict


# File name -> field. The occurrences keep their file name of older releases (counts.npy), so that
# a run interrupted before the change resumes.
_COUNTED_FILES = {"counts": "occurrences", "tok": "tok", "passage": "passage", "position": "position",
                  "lengths": "lengths"}


def save_counted(path: Path, c: Counted) -> None:
    """Save ``c`` as ``.npy`` arrays and ``stats.json`` in a new directory ``path`` (atomic rename)."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, field in _COUNTED_FILES.items():
        np.save(tmp / f"{name}.npy", getattr(c, field))
    write_json_atomic(tmp / "stats.json", c.stats)
    os.replace(tmp, path)


def load_counted(path: Path) -> Counted:
    """The :class:`Counted` saved by :func:`save_counted` at ``path``."""
    arrays = {field: np.load(path / f"{name}.npy", allow_pickle=False) for name, field in _COUNTED_FILES.items()}
    return Counted(stats=read_json(path / "stats.json"), **arrays)


def work_dir(out: Path) -> Path:
    """``OUT.partial`` beside ``out``."""
    return out.with_name(out.name + WORK_SUFFIX)


def is_store_dir(path: Path) -> bool:
    """True when directory ``path`` holds a store's data files and nothing but a store's files
    (what ``overwrite`` may replace: a user's directory, or a user's file beside a store, never)."""
    return holds_only(path, STORE_FILES, [f for f in STORE_FILES if f != COMPLETE_MARKER])


def check_existing(out: Path, identity: dict, overwrite: bool) -> bool:
    """True when ``out`` already is a complete store of this exact extraction (nothing to do)."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise SenseJaxError(f"{out} exists and is not a store directory; choose another output path")
    meta_path = out / "meta.json"
    if not (out / COMPLETE_MARKER).exists() or not meta_path.exists():
        if overwrite:  # a user's directory is never replaced, only a store's leftovers
            check_replaceable(out, is_store_dir, "an extraction store")
            return False
        raise SenseJaxError(f"{out} exists and is not a complete extraction store; choose another "
                            "output path or pass overwrite=True (--overwrite)")
    meta = read_json(meta_path, "store metadata")
    diff = [k for k in IDENTITY_KEYS if meta.get(k) != identity.get(k)]
    if not diff:
        return True
    if overwrite:  # files a user added beside the store's are never deleted with it
        check_replaceable(out, is_store_dir, "an extraction store")
        return False
    detail = ", ".join(f"{k}: stored {meta.get(k)!r} vs requested {identity.get(k)!r}"
                       for k in diff if k != "corpus_files_fingerprint")
    if "corpus_files_fingerprint" in diff:
        detail = (detail + ", " if detail else "") + "the corpus files differ (names, sizes or times)"
    raise SenseJaxError(f"{out} holds an extraction made with different settings ({detail}); "
                        "choose another output path or pass overwrite=True (--overwrite)")


def existing_is_done(out: Path, identity: dict, overwrite: bool, proc: int) -> bool:
    """:func:`check_existing` decided by process 0 and shared (hosts may see other file times)."""
    error, done = None, False
    if proc == 0:
        try:
            done = check_existing(out, identity, overwrite)
        except SenseJaxError as e:
            error = e
    (code,) = broadcast_ints([2 if error is not None else int(done)])
    if error is not None:
        raise error
    if code == 2:
        raise SenseJaxError(f"process 0 refused the output {out} (see its error message)")
    return bool(code)


def prepare_work_dir(job: Job, run_key: dict) -> bool:
    """Create or validate ``OUT.partial``; a partial run with other settings is discarded.
    Returns True when the work directory is new."""
    work = job.work
    if job.proc != 0:
        return False
    key_path = work / "job.json"
    if work.exists():
        try:
            same = read_json(key_path) == json.loads(json.dumps(run_key))
        except SenseJaxError:
            same = False
        if same:
            return False
        shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(parents=True)
        write_json_atomic(key_path, run_key)
    except OSError as e:
        raise SenseJaxError(f"cannot write the output {job.out}: {e.strerror or e} "
                            f"(while creating {work})") from None
    return True
