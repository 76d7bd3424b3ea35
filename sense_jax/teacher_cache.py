"""The teacher cache: the frozen teacher's per-token SKD targets (and, within a byte budget, its
hidden states) computed once for every training passage, reused by every epoch and every student.

The teacher is frozen and the training text fixed, so the teacher's part of the SKD loss, the
index y = argmax_k score(C_t[k], h_teacher) of each token's nearest sense (METHOD §3,
:func:`sense_jax.losses.teacher_targets`), is the same at every visit of a passage. Training
reads it from here and skips the teacher's forward (the same idea as TextBrewer's cached teacher
outputs). The MSE baseline reads the cached hidden states instead, when they fit
``teacher_cache_max_bytes``.

Layout of a cache directory (plain ``.npy`` files; S = the training
passages' tokens, each passage tokenised exactly as the training stream does:
``tokenizer(text, truncation=True, max_length=max_length)``, special tokens included)::

    offsets.npy   [N + 1] int64    passage i's tokens are rows offsets[i]:offsets[i + 1]
    targets.npy   [S] int8 | int16 the sense index y of each token (int8 when K_max <= 127),
                                   -1 for a token without a dictionary entry (absent for a
                                   cache built without a dictionary)
    hidden.npy    [S, D]           the teacher's last-layer hidden states in its compute dtype
                                   (float32; bfloat16 stored as its uint16 bit pattern); only
                                   when S x D x itemsize <= teacher_cache_max_bytes
    meta.json                      the identity (below), what is stored, dtypes, counts
    COMPLETE                       written last

Identity (:func:`cache_identity`, refused by key when it differs: :func:`open_teacher_cache`):
``teacher_params`` (sha256 of every teacher parameter), ``teacher_config`` (architecture),
``compute_dtype``, ``tokenizer`` (:func:`sense_jax.fingerprints.tokenizer_hash`), ``passages``
(sha256 of the training passages in order), ``max_length``, ``layer`` (the teacher layer whose
states are scored: its last), and for the targets ``dictionary``
(:func:`sense_jax.students.dictionary_fingerprint`) and ``metric``. A consumer of the hidden
states alone (the MSE baseline) checks every key but the last two.

Building (:func:`build_teacher_cache`) runs the teacher over the passages sorted by length, in
batches padded to a length bucket (few shapes, little padding), in chunks of passages; the work
directory ``PATH.partial/`` holds ``job.json`` (the build's settings; another build's partial
work is discarded), the arrays being filled and ``progress.json`` (chunks done, written after
each chunk's arrays are on disk).

Host memory: the hidden states (1 GB for the default run's 50,000 passages) are written and read
by rows with ``os.pwrite`` / ``os.pread`` (:class:`RowFile`), not through a memory map: every page
of a map that a run touches counts in the process's resident memory until it is unmapped, so one
epoch of the MSE baseline reading a mapped cache raised the pipeline's peak RSS by the whole
file (1.2 GiB vs 0.16 GiB before, measured on the default run's cache); read by rows, the file
stays in the operating system's page cache, shared and reclaimable. The small targets file stays
memory-mapped. A killed build resumes at its first
unfinished chunk and gives the same bytes as an uninterrupted one; the finished directory is
renamed to ``PATH``, so ``PATH`` exists only when complete.

Multi-host: every process runs the teacher on its rows of each build batch (as training
tokenises: :func:`~sense_jax.sharding.process_rows`), the outputs are replicated, and process 0
alone writes (the path must be on a filesystem all processes see, as the checkpoints are);
the others wait at a barrier and then open the finished cache.

Fault injection (tests only): :data:`FAULT_HOOK`, when set, is called as ``(stage, k)`` at
``("chunk", k)`` (chunk k computed, saved and recorded) and ``("final", 0)`` (complete, not yet
renamed); it may raise there to simulate a kill.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import ml_dtypes
import numpy as np
from numpy.lib.format import open_memmap

from sense_jax.batching import bucket_length
from sense_jax.errors import SenseJaxError
from sense_jax.fingerprints import config_hash, tokenizer_hash
from sense_jax.io_utils import RowFile, read_json, write_json_atomic
from sense_jax.multiprocess import barrier, broadcast_ints, process_info

CACHE_VERSION = 1
COMPLETE_MARKER = "COMPLETE"
WORK_SUFFIX = ".partial"
# The keys of the identity, in the order a refusal names them; HIDDEN_KEYS are what a consumer
# of the hidden states alone compares (their values do not depend on a dictionary).
IDENTITY_KEYS = ("layer", "teacher_params", "teacher_config", "compute_dtype", "tokenizer", "passages",
                 "max_length", "dictionary", "metric")
HIDDEN_KEYS = IDENTITY_KEYS[:-2]
DEFAULT_CHUNK_PASSAGES = 4096

FAULT_HOOK: Callable[[str, int], None] | None = None
"""Tests only: called as ``FAULT_HOOK(stage, k)`` at each named point (see the module docstring)."""


def _fail_point(stage: str, k: int = 0) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(stage, k)


def params_fingerprint(params: Any) -> str:
    """sha256 (16 hex digits) of every array of a parameter pytree: paths, shapes, dtypes, bytes."""
    import jax
    from flax import traverse_util

    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    h = hashlib.sha256()
    for k in sorted(flat):
        a = np.ascontiguousarray(np.asarray(flat[k]))
        h.update(f"{k}:{a.shape}:{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def passages_fingerprint(passages: Sequence[str]) -> str:
    """sha256 (16 hex digits) of the passages in order (each one's UTF-8 length and bytes)."""
    h = hashlib.sha256()
    for p in passages:
        b = p.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def cache_identity(*, teacher_params: Any, teacher_config: Any, compute_dtype: str, tokenizer: Any,
                   passages: Sequence[str], max_length: int, sense_dict: Any = None, metric: str = "dot"
                   ) -> dict:
    """What a cache's contents depend on (the module docstring's keys), JSON-ready.

    ``sense_dict`` None (the MSE baseline, no dictionary): ``dictionary`` and ``metric`` are None.
    """
    from sense_jax.students import dictionary_fingerprint

    layer = getattr(teacher_config, "num_hidden_layers", None)
    return {"teacher_params": params_fingerprint(teacher_params), "teacher_config": config_hash(teacher_config),
            "compute_dtype": str(compute_dtype), "layer": layer, "tokenizer": tokenizer_hash(tokenizer),
            "passages": passages_fingerprint(passages), "max_length": int(max_length),
            "dictionary": None if sense_dict is None else dictionary_fingerprint(sense_dict),
            "metric": None if sense_dict is None else metric}


@dataclasses.dataclass
class TeacherCache:
    """Read access to a complete teacher cache.

    Attributes:
      offsets: [N + 1] int64; passage i's tokens are rows ``offsets[i]:offsets[i + 1]``.
      targets: [S] int8/int16 sense indices (-1: no entry; a read-only memory map), or None
        (built without a dictionary).
      hidden: [S, D] teacher states in the teacher's compute dtype (bfloat16 via ml_dtypes), read
        by rows (:class:`RowFile`), or None (over the byte budget, or not asked for).
      meta: ``meta.json``.
    """

    path: Path
    offsets: np.ndarray
    targets: np.ndarray | None
    hidden: RowFile | None
    meta: dict

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each passage [N] int64."""
        return np.diff(self.offsets)

    def rows(self, passages: np.ndarray, length: int, attention_mask: np.ndarray | None = None,
             keys: Sequence[str] = ("targets",)) -> dict[str, np.ndarray]:
        """The cached values of the passages ``passages`` [b] int, padded to ``length`` tokens.

        Returns:
          ``"targets"`` [b, length] int32 (-1 at padding and tokens without an entry) and/or
          ``"teacher_hidden"`` [b, length, D] (stored dtype; zeros at padding), as ``keys`` asks.

        Raises:
          SenseJaxError: a passage longer than ``length``, or (given ``attention_mask`` [b, length])
            a row whose real tokens are not the cached passage's: the cache does not describe this
            tokenisation.
        """
        passages = np.asarray(passages, np.int64)
        start, n = self.offsets[passages], self.lengths[passages]
        if attention_mask is not None and not np.array_equal(np.asarray(attention_mask).sum(1), n):
            bad = int(np.flatnonzero(np.asarray(attention_mask).sum(1) != n)[0])
            raise SenseJaxError(f"teacher cache {self.path}: passage {int(passages[bad])} has {int(n[bad])} tokens "
                                f"there but {int(np.asarray(attention_mask)[bad].sum())} in the training batch; "
                                "rebuild it (delete the directory) or set teacher_cache=off")
        if len(n) and int(n.max()) > length:
            raise SenseJaxError(f"teacher cache {self.path}: a passage of {int(n.max())} tokens does not fit "
                                f"{length} positions")
        pos = np.arange(length)
        inside = pos[None, :] < n[:, None]                                   # [b, length]
        flat = np.where(inside, start[:, None] + pos[None, :], 0)
        out = {}
        if "targets" in keys:
            if self.targets is None:
                raise SenseJaxError(f"teacher cache {self.path} holds no SKD targets (built without a dictionary)")
            out["targets"] = np.where(inside, self.targets[flat], -1).astype(np.int32)
        if "teacher_hidden" in keys:
            if self.hidden is None:
                raise SenseJaxError(f"teacher cache {self.path} holds no hidden states")
            h = np.zeros((len(n), length, self.hidden.shape[1]), self.hidden.dtype)
            for i, (a, m) in enumerate(zip(start.tolist(), n.tolist())):
                h[i, :m] = self.hidden.read(a, m)
            out["teacher_hidden"] = h
        return out


def _load(path: Path, name: str) -> np.ndarray:
    try:
        return np.load(path / name, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise SenseJaxError(f"teacher cache file missing: {path / name}") from None
    except (ValueError, OSError) as e:
        raise SenseJaxError(f"teacher cache file {path / name} is unreadable or truncated ({e})") from None


def open_teacher_cache(path: str | os.PathLike, identity: dict, keys: Sequence[str] = IDENTITY_KEYS
                       ) -> TeacherCache:
    """Open the complete cache at ``path`` and check it was built for ``identity``.

    Args:
      identity: :func:`cache_identity` of the run that reads it.
      keys: the identity keys to compare: all for the SKD targets, :data:`HIDDEN_KEYS` for a
        reader of the hidden states alone.

    Raises:
      SenseJaxError: missing or incomplete (no ``COMPLETE``), unreadable, or built for something
        else: one line naming the first differing key, both values and the fix.
    """
    path = Path(path)
    if not (path / COMPLETE_MARKER).exists():
        raise SenseJaxError(f"{path} is not a complete teacher cache (no {COMPLETE_MARKER} marker)")
    meta = read_json(path / "meta.json", "teacher cache metadata")
    if meta.get("version") != CACHE_VERSION:
        raise SenseJaxError(f"{path / 'meta.json'}: teacher cache version {meta.get('version')!r}, this "
                            f"release reads {CACHE_VERSION}; delete the directory to rebuild it")
    stored = meta.get("identity", {})
    for k in keys:
        if stored.get(k) != identity.get(k):
            raise SenseJaxError(f"teacher cache {path} was built with {k}={stored.get(k)!r}, this run has "
                                f"{k}={identity.get(k)!r}; delete it to rebuild, set teacher_cache to another "
                                "path, or teacher_cache=off")
    offsets = np.asarray(_load(path, "offsets.npy"))
    targets = _load(path, "targets.npy") if meta.get("targets") else None
    hidden = None
    if meta.get("hidden"):
        bf16 = meta.get("hidden_dtype") == "bfloat16"
        hidden = RowFile(path / "hidden.npy", view=ml_dtypes.bfloat16 if bf16 else None)
    S = int(offsets[-1]) if len(offsets) else 0
    if offsets.ndim != 1 or len(offsets) != meta.get("passages", -1) + 1 or np.any(np.diff(offsets) < 0) \
            or (targets is not None and targets.shape != (S,)) or (hidden is not None and hidden.shape[0] != S):
        raise SenseJaxError(f"teacher cache {path}: its arrays disagree with meta.json ({S} tokens)")
    return TeacherCache(path, offsets, targets, hidden, meta)


def token_lengths(tokenizer: Any, passages: Sequence[str], max_length: int) -> np.ndarray:
    """Tokens of each passage [N] int64, as the training stream tokenises it
    (:meth:`sense_jax.training.data.PassageStream.lengths`)."""
    from sense_jax.training.data import PassageStream

    return PassageStream(passages, tokenizer, 1, max_length, 0).lengths().astype(np.int64)


def build_teacher_cache(path: str | os.PathLike, *, identity: dict, passages: Sequence[str], tokenizer: Any,
                        max_length: int, forward: Callable[[dict], dict], batch_size: int,
                        targets_dtype: str | None, hidden: tuple[int, str] | None,
                        rows: slice | None = None, chunk_passages: int = DEFAULT_CHUNK_PASSAGES,
                        lengths: np.ndarray | None = None, log: Callable[[str], None] = print) -> Path:
    """Compute the cache at ``path`` (resuming a killed build of the same settings), atomically.

    Args:
      identity: :func:`cache_identity` of what ``forward`` computes (recorded in ``meta.json``).
      passages / tokenizer / max_length: the training passages and how training tokenises them.
      forward: ``{"input_ids", "attention_mask", "token_type_ids"} [b, L] int32 -> {"targets":
        [batch_size, L] int, "hidden": [batch_size, L, D]}`` (numpy, all rows of the batch, each
        key only when asked for), where ``b`` is this process's ``rows`` of the batch.
      batch_size: passages per forward (a multiple of the mesh's data axis).
      targets_dtype: "int8" / "int16" to store targets, None for none.
      hidden: ``(D, dtype name)`` to store hidden states ("float32" / "bfloat16" / "float16"), or None.
      rows: this process's rows of each batch (default all).
      chunk_passages: passages per resumable chunk (rounded up to whole batches).
      lengths: :func:`token_lengths` of the passages, when the caller has them already.

    Returns:
      ``path``. Process 0 writes; every process returns after the cache is complete.

    Raises:
      SenseJaxError: ``path`` exists and is not a complete cache; it cannot be written.
    """
    from sense_jax.training.data import tokenize  # local: the training package imports this module

    path = Path(path)
    work = path.with_name(path.name + WORK_SUFFIX)
    proc0 = process_info()[0] == 0
    lengths = token_lengths(tokenizer, passages, max_length) if lengths is None else np.asarray(lengths, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    order = np.argsort(lengths, kind="stable")
    per_chunk = max(1, -(-chunk_passages // batch_size)) * batch_size
    n_chunks = -(-len(passages) // per_chunk)
    job = {"identity": identity, "batch_size": batch_size, "chunk_passages": per_chunk,
           "targets_dtype": targets_dtype, "hidden": list(hidden) if hidden else None, "version": CACHE_VERSION}
    done, error = 0, None
    if proc0:
        try:
            if path.exists():
                raise SenseJaxError(f"{path} exists and is not a complete teacher cache; delete it or choose "
                                    "another teacher_cache path")
            done = _prepare_work(work, job, offsets, targets_dtype, hidden)
        except SenseJaxError as e:
            error = e
    # Process 0's decision reaches the others, so that none waits forever for a failed start.
    (done,) = broadcast_ints([-1 if error is not None else done])
    if error is not None:
        raise error
    if done < 0:
        raise SenseJaxError(f"process 0 could not start the teacher cache {path} (see its error message)")
    if done:
        log(f"teacher cache {path}: resuming the build after chunk {done} of {n_chunks}")
    out_t = open_memmap(work / "targets.npy", mode="r+") if proc0 and targets_dtype else None
    out_h = RowFile(work / "hidden.npy", writable=True) if proc0 and hidden else None
    for c in range(done, n_chunks):
        chunk = order[c * per_chunk:(c + 1) * per_chunk]
        for b in range(0, len(chunk), batch_size):
            idx = chunk[b:b + batch_size]
            length = min(bucket_length(int(lengths[idx].max())), max_length)
            mine = idx if rows is None else idx[rows]
            enc = tokenize(tokenizer, [passages[i] for i in mine], length,
                           batch_size=batch_size if rows is None else rows.stop - rows.start)
            res = forward(enc)
            if not proc0:
                continue
            n = lengths[idx]
            inside = np.arange(length)[None, :] < n[:, None]
            dest = (offsets[idx][:, None] + np.arange(length)[None, :])[inside]
            if out_t is not None:
                out_t[dest] = np.asarray(res["targets"])[:len(idx)][inside]
            if out_h is not None:  # each passage's rows are contiguous: one write per passage
                h = np.asarray(res["hidden"])[:len(idx)]
                h = h.view(np.uint16) if hidden[1] == "bfloat16" else h
                for j, (a, m) in enumerate(zip(offsets[idx].tolist(), n.tolist())):
                    out_h.write(a, h[j, :m])
        if proc0:
            if out_t is not None:
                out_t.flush()
            if out_h is not None:
                out_h.sync()
            write_json_atomic(work / "progress.json", {"chunks_done": c + 1})
        _fail_point("chunk", c)
    if proc0:
        if out_h is not None:
            out_h.close()
        del out_t, out_h
        meta = {"version": CACHE_VERSION, "identity": identity, "passages": len(passages),
                "tokens": int(offsets[-1]), "targets": bool(targets_dtype), "targets_dtype": targets_dtype,
                "hidden": bool(hidden), "hidden_size": hidden[0] if hidden else None,
                "hidden_dtype": hidden[1] if hidden else None}
        write_json_atomic(work / "meta.json", meta)
        (work / COMPLETE_MARKER).write_text("ok\n")
        _fail_point("final", 0)
        (work / "job.json").unlink()
        (work / "progress.json").unlink(missing_ok=True)
        os.replace(work, path)
    barrier("sense_jax.teacher_cache.built")
    return path


def _prepare_work(work: Path, job: dict, offsets: np.ndarray, targets_dtype: str | None,
                  hidden: tuple[int, str] | None) -> int:
    """Create ``work`` (or keep a partial build of the same ``job``); return the chunks done."""
    job = json.loads(json.dumps(job))
    if work.exists():
        try:
            same = read_json(work / "job.json") == job
            done = int(read_json(work / "progress.json")["chunks_done"]) if same else 0
        except (SenseJaxError, KeyError, ValueError, TypeError):
            same, done = False, 0
        if same and (work / "offsets.npy").exists():
            return done
        shutil.rmtree(work, ignore_errors=True)
    tmp = work.with_name(work.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        np.save(tmp / "offsets.npy", offsets)
        S = int(offsets[-1])
        if targets_dtype:
            open_memmap(tmp / "targets.npy", mode="w+", dtype=np.dtype(targets_dtype), shape=(S,)).flush()
        if hidden:
            D, dt = hidden
            np_dt = np.uint16 if dt == "bfloat16" else np.dtype(dt)
            open_memmap(tmp / "hidden.npy", mode="w+", dtype=np_dt, shape=(S, int(D))).flush()
        write_json_atomic(tmp / "progress.json", {"chunks_done": 0})
        write_json_atomic(tmp / "job.json", job)
        os.replace(tmp, work)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SenseJaxError(f"cannot write the teacher cache {work}: {e.strerror or e}") from None
    return 0
