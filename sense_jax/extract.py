"""Step 1 of the method: teacher hidden states for a per-token uniform sample of a corpus.

METHOD.md §1 (Wang et al. 2025, §3.1): run a teacher over a corpus and keep, for every token id,
a uniform random sample of at most N (paper: 1000) of its contextual embeddings. The reference
code keeps the first N occurrences and then replaces old ones with count-dependent probabilities,
which is not uniform; here the sample is exactly uniform and a pure function of the corpus, the
tokenizer and the seed.

Sampling (bottom-k). Every token occurrence, named by (passage index p, token position i), gets
the 64-bit key ``k = mix(mix((p << 20 | i) ^ s1) ^ s2)`` where ``mix`` is the SplitMix64
finaliser (a bijection on uint64) and s1, s2 derive from the seed. Token t keeps the
min(count_t, N) occurrences with the smallest keys. Keys of distinct occurrences are distinct
(composition of bijections), so the selection is well defined; with keys behaving as i.i.d.
uniform draws, the bottom-N of any fixed set is a uniform sample without replacement. Because a
key depends only on the occurrence, the sample does not depend on batch size, order, devices or
processes, and the bottom-N of a union is the bottom-N of the parts' bottom-N (exact merging
across processes).

Pipeline.
  1. Counting pass: tokenise (teacher's fast tokenizer, truncated to the model's length), count
     occurrences per token, keep a streaming bottom-N; no teacher forward. Special tokens are
     excluded with ``tokenizer.all_special_ids``. Processes split the chunks of passages and merge
     counts and candidates with ``process_allgather``.
  2. Plan: rows of the store are the kept occurrences sorted by (token, passage, position); only
     passages holding a kept occurrence are forwarded (the rest are skipped and counted).
  3. Forward pass: windows of consecutive passages; inside a window, passages are sorted by
     length and cut into micro-batches of ``batch_size`` rows (one per device per step, so
     each device always computes the same [batch_size, T] shapes whatever the device count,
     which makes the bytes identical on 1 or 8 devices). A step feeds ``batch_size × n_data``
     rows, each process its own slice (``jax.make_array_from_process_local_data``); padding
     rows have an all-zero mask. The jitted forward gathers the kept positions of each row and
     returns them replicated; process 0 writes them into a memory-mapped ``vectors.npy``.
  4. Finish: ``meta.json`` and ``COMPLETE`` are written, then the store directory is renamed
     into place (a reader never sees a half-written store).

Resuming: work lives in ``OUT.partial/`` beside the output (counting results, the store being
filled, ``progress.json`` saved atomically after each window). Re-running the same command
after a kill at any point continues from the last finished window and writes the same bytes.
In multi-process runs ``OUT`` must be on a filesystem shared by all processes; only process 0
writes.

Determinism. The sample (offsets, counts, sources) depends only on the corpus, tokenizer, N and
seed. The vectors' last bits also depend on each row's padded length, hence on ``batch_size``
and ``window_passages`` (kept in ``OUT.partial/job.json``, so a resumed run uses the same), but
not on the number of devices or processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sense_jax.batching import DEFAULT_BUCKETS, length_bucketed_batches
from sense_jax.corpus import CorpusStats, PassageHasher, corpus_files, iter_passages, quick_fingerprint
from sense_jax.distill import teacher_fingerprint
from sense_jax.provenance import provenance
from sense_jax.errors import SenseJaxError
from sense_jax.io_utils import read_json, replace_directory, write_json_atomic
from sense_jax.sharding import batch_sharding, process_rows
from sense_jax.store import COMPLETE_MARKER, STORE_DTYPES

FORMAT_VERSION = 1
SAMPLER = "bottom-k splitmix64 v1"
WORK_SUFFIX = ".partial"
POSITION_BITS = 20  # token positions < 2**20 (1M tokens per passage)
DEFAULT_N = 1000
# Keys of meta.json that identify what a store holds; a store at OUT that differs in any of
# them is another extraction and is never overwritten without ``overwrite``.
IDENTITY_KEYS = ("teacher", "teacher_config_hash", "compute_dtype", "tokenizer_hash", "layer", "dtype",
                 "n_per_token", "seed", "max_length", "text_field", "corpus_files_fingerprint")

_U64 = np.uint64
_M1, _M2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


# --- Sampling keys and the streaming bottom-k -------------------------------------------------

def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014), a bijection on uint64; vectorised."""
    x = x.astype(_U64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> _U64(30)
        x *= _M1
        x ^= x >> _U64(27)
        x *= _M2
        x ^= x >> _U64(31)
    return x


def _seed_words(seed: int) -> tuple[np.uint64, np.uint64]:
    s = np.array([(seed * _GOLDEN + _GOLDEN) & _MASK64, (seed * _GOLDEN + 2 * _GOLDEN) & _MASK64], _U64)
    w = _mix64(s)
    return w[0], w[1]


def occurrence_keys(seed: int, passage: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Sampling keys [n] uint64 of occurrences (passage [n] int, position [n] int).

    A pure function of (seed, passage, position); distinct occurrences get distinct keys.
    """
    s1, s2 = _seed_words(seed)
    x = (np.asarray(passage).astype(_U64) << _U64(POSITION_BITS)) | np.asarray(position).astype(_U64)
    return _mix64(_mix64(x ^ s1) ^ s2)


class BottomK:
    """Streaming per-token bottom-k over occurrence keys: an exactly uniform sample of size
    min(count_t, k) for every token t (see the module docstring).

    Feed ``add(token [n], passage [n], position [n])`` in any order and any chunking; ``result``
    is the same. Memory: at most about ``2 · V · k`` kept candidates.
    """

    def __init__(self, vocab_size: int, k: int, seed: int, merge_every: int = 1 << 20):
        self.V, self.k, self.seed = int(vocab_size), int(k), int(seed)
        self.merge_every = int(merge_every)
        self.full = np.zeros(self.V, bool)          # token already has k candidates
        self.thresh = np.zeros(self.V, _U64)        # its k-th smallest key so far
        self._kept = self._empty()
        self._buf: list[tuple[np.ndarray, ...]] = []
        self._buf_n = 0

    @staticmethod
    def _empty():
        return (np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, _U64))

    def add(self, token: np.ndarray, passage: np.ndarray, position: np.ndarray) -> None:
        token = np.asarray(token, np.int32)
        key = occurrence_keys(self.seed, passage, position)
        sel = ~self.full[token] | (key < self.thresh[token])
        if not sel.all():
            token, passage, position, key = token[sel], passage[sel], position[sel], key[sel]
        if len(token):
            self._buf.append((token, np.asarray(passage, np.int64), np.asarray(position, np.int32), key))
            self._buf_n += len(token)
            if self._buf_n > max(self.merge_every, 2 * len(self._kept[0])):
                self._merge()

    def _merge(self) -> None:
        if not self._buf:
            return
        tok, p, pos, key = (np.concatenate(c) for c in zip(self._kept, *self._buf))
        self._buf, self._buf_n = [], 0
        order = np.lexsort((key, tok))
        tok, p, pos, key = tok[order], p[order], pos[order], key[order]
        idx = np.arange(len(tok))
        start = np.maximum.accumulate(np.where(np.r_[True, tok[1:] != tok[:-1]], idx, 0))
        rank = idx - start
        keep = rank < self.k
        last = rank == self.k - 1
        self.full[tok[last]] = True
        self.thresh[tok[last]] = key[last]
        self._kept = (tok[keep], p[keep], pos[keep], key[keep])

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Kept (token [S] int32, passage [S] int64, position [S] int32), sorted by
        (token, passage, position)."""
        self._merge()
        tok, p, pos, _ = self._kept
        order = np.lexsort((pos, p, tok))
        return tok[order], p[order], pos[order]


# --- Multi-process helpers ----------------------------------------------------------------------

def _process_info() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def _allgather_many(arrays: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    """Every process's ``arrays`` (any lengths along axis 0), as ``[process][array]``.

    All arrays travel packed in one int32 buffer (JAX without x64 would narrow int64), so a
    merge costs two collectives whatever the number of arrays.
    """
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return [list(arrays)]
    words = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        if a.dtype.itemsize % 4:
            raise ValueError(f"cannot gather dtype {a.dtype}")
        words.append(a.reshape(-1).view(np.int32))
    buf = np.concatenate([np.array([len(w) for w in words], np.int32)] + words)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(buf)], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.int32)
    padded[:len(buf)] = buf
    everything = np.asarray(multihost_utils.process_allgather(padded))  # [P, max size]
    result = []
    for row in everything:
        off, parts = len(arrays), []
        for a, n in zip(arrays, row[:len(arrays)]):
            w = np.ascontiguousarray(row[off:off + int(n)])
            off += int(n)
            parts.append(w.view(np.asarray(a).dtype).reshape((-1,) + np.asarray(a).shape[1:]))
        result.append(parts)
    return result


def _broadcast(values: Sequence[int]) -> list[int]:
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return list(values)
    arr = np.asarray(values, np.int64).view(np.int32)
    return list(np.asarray(multihost_utils.broadcast_one_to_all(arr)).astype(np.int32).view(np.int64))


def _barrier(name: str) -> None:
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# --- Failure injection for the resumption tests --------------------------------------------------

def _fail_point(stage: str, k: int = 0) -> None:
    """Die at a named point when ``SENSE_JAX_EXTRACT_FAIL_AT=stage:k`` is set (tests only).

    ``SENSE_JAX_EXTRACT_FAIL_MODE=exit`` (default) ends the process with ``os._exit(86)`` (a kill:
    no cleanup, no flush); ``raise`` raises RuntimeError.
    """
    spec = os.environ.get("SENSE_JAX_EXTRACT_FAIL_AT")
    if not spec or spec != f"{stage}:{k}":
        return
    if os.environ.get("SENSE_JAX_EXTRACT_FAIL_MODE", "exit") == "raise":
        raise RuntimeError(f"injected failure at {spec}")
    sys.stderr.flush()
    os._exit(86)


# --- Teacher and tokenizer identity -------------------------------------------------------------

def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's serialised definition (vocabulary, normaliser, special tokens),
    excluding mutable truncation/padding state."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    spec["all_special_ids"] = sorted(int(i) for i in tokenizer.all_special_ids)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _config_hash(config: Any) -> str:
    d = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    d.pop("dtype", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _max_length(model, requested: int | None) -> int:
    """Tokens per passage: ``requested`` (refused past the teacher's position table), else the
    table's length (rotary: ``max_position_embeddings``), capped by the tokenizer's own limit."""
    from sense_jax.models import check_input_length, input_length_limit

    cfg = model.config
    if requested is not None:
        check_input_length(requested, cfg, "max_length", f"teacher {model.path}'s",
                           fix="choose --max-length <= {limit}")
    limit = input_length_limit(cfg) or int(cfg.max_position_embeddings)
    tok_max = getattr(model.tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < limit:
        limit = tok_max
    if requested is not None:
        if requested < 2:
            raise SenseJaxError(f"max_length must be >= 2, got {requested}")
        limit = min(limit, int(requested))
    if limit >= 1 << POSITION_BITS:
        raise SenseJaxError(f"max_length {limit} exceeds the supported {1 << POSITION_BITS}")
    return limit


def _make_encoder(tokenizer, max_length: int):
    """``encode(texts) -> (ids: list[list[int]], n_truncated)`` with special tokens, truncated to
    ``max_length``, unpadded: what ``tokenizer(texts, truncation=True, max_length=...)`` gives.

    For a fast tokenizer this runs a private copy of its Rust backend (2-3x less Python work
    than transformers' wrapper, and the caller's tokenizer state is left alone)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        def encode_slow(texts):
            enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False,
                            return_attention_mask=False, return_token_type_ids=False)
            full = tokenizer(texts, truncation=False, padding=False, return_attention_mask=False,
                             return_token_type_ids=False)["input_ids"]
            return enc["input_ids"], sum(len(a) > len(b) for a, b in zip(full, enc["input_ids"]))
        return encode_slow
    from tokenizers import Tokenizer

    private = Tokenizer.from_str(backend.to_str())
    private.no_padding()
    private.enable_truncation(max_length, direction=getattr(tokenizer, "truncation_side", "right"))

    def encode(texts):
        encs = private.encode_batch(list(texts), add_special_tokens=True)
        return [e.ids for e in encs], sum(1 for e in encs if e.overflowing)
    return encode


def _flatten(ids: list[list[int]], first_passage: int):
    lengths = np.fromiter((len(x) for x in ids), np.int32, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))
    passage = np.repeat(np.arange(first_passage, first_passage + len(ids), dtype=np.int64), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    position = (np.arange(len(flat)) - starts).astype(np.int32)
    return flat, passage, position, lengths


# --- Pass 1: counting and sampling ----------------------------------------------------------------

@dataclasses.dataclass
class _Counted:
    counts: np.ndarray      # [V] int64
    tok: np.ndarray         # [S] int32 kept token, sorted (token, passage, position)
    passage: np.ndarray     # [S] int64
    position: np.ndarray    # [S] int32
    lengths: np.ndarray     # [n_passages] int32 token lengths after truncation
    stats: dict


def _count_pass(corpus, text_field, tokenizer, max_length, special_ids, V, n, seed,
                chunk_passages, progress) -> _Counted:
    from tqdm.auto import tqdm

    encode = _make_encoder(tokenizer, max_length)

    proc, nproc = _process_info()
    stats = CorpusStats()
    hasher = PassageHasher()
    sampler = BottomK(V, n, seed)
    counts = np.zeros(V, np.int64)
    special = np.asarray(sorted(special_ids), np.int32)
    local_lengths: list[tuple[int, np.ndarray]] = []
    truncated = 0
    bar = tqdm(desc="counting", unit=" passages", disable=not progress or proc != 0,
               dynamic_ncols=True, mininterval=1.0)
    chunk_idx = 0

    def flush(texts, first):
        nonlocal truncated
        ids, tr = encode(texts)
        truncated += tr
        flat, passage, position, lengths = _flatten(ids, first)
        local_lengths.append((first, lengths))
        keep = ~np.isin(flat, special)
        if (flat[keep] >= V).any():
            raise SenseJaxError(f"tokenizer produced id {int(flat[keep].max())} >= the model's "
                                f"vocab_size {V}")
        counts[:] += np.bincount(flat[keep], minlength=V)
        sampler.add(flat[keep], passage[keep], position[keep])

    texts: list[str] = []
    first = 0
    for i, text in enumerate(iter_passages(corpus, text_field, stats)):
        hasher.update(text)
        if not texts:
            first = i
        texts.append(text)
        if len(texts) == chunk_passages:
            if chunk_idx % nproc == proc:
                flush(texts, first)
            _fail_point("count", chunk_idx)
            chunk_idx += 1
            bar.update(len(texts))
            texts = []
    if texts:
        if chunk_idx % nproc == proc:
            flush(texts, first)
        bar.update(len(texts))
    bar.close()
    n_passages = stats.passages
    tok, passage, position = sampler.result()
    lengths = np.zeros(n_passages, np.int32)
    for first, ls in local_lengths:
        lengths[first:first + len(ls)] = ls
    if nproc > 1:  # merge counts, lengths and candidates (bottom-k of the union of bottom-ks)
        parts = _allgather_many([counts, lengths, np.array([truncated], np.int64), tok, passage, position])
        counts = np.sum([p[0] for p in parts], axis=0)
        lengths = np.max([p[1] for p in parts], axis=0).astype(np.int32)
        truncated = int(sum(int(p[2][0]) for p in parts))
        merged = BottomK(V, n, seed)
        for p in parts:
            merged.add(p[3], p[4], p[5])
        tok, passage, position = merged.result()
    out_stats = stats.as_dict()
    out_stats["truncated"] = int(truncated)
    out_stats["fingerprint"] = hasher.hexdigest()
    return _Counted(counts, tok, passage, position, lengths, out_stats)


def _save_counted(path: Path, c: _Counted) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("counts", "tok", "passage", "position", "lengths"):
        np.save(tmp / f"{name}.npy", getattr(c, name))
    write_json_atomic(tmp / "stats.json", c.stats)
    os.replace(tmp, path)


def _load_counted(path: Path) -> _Counted:
    arrays = {name: np.load(path / f"{name}.npy", allow_pickle=False)
              for name in ("counts", "tok", "passage", "position", "lengths")}
    return _Counted(stats=read_json(path / "stats.json"), **arrays)


# --- Pass 2: the forward plan ---------------------------------------------------------------------

@dataclasses.dataclass
class _Step:
    length: int                    # padded length T
    micro: list[np.ndarray]        # per micro-batch, global passage ids (<= batch_size each)


def _plan_window(needed: np.ndarray, lengths: np.ndarray, batch_size: int, n_data: int) -> list[_Step]:
    """Steps for one window: micro-batches are cut from the window's needed passages sorted by
    length (independent of the device count); a step holds ``n_data`` micro-batches of equal T."""
    micro = [(needed[idx], T) for idx, T in
             length_bucketed_batches(lengths[needed], batch_size, DEFAULT_BUCKETS)]
    steps: list[_Step] = []
    for T, group in itertools.groupby(micro, key=lambda m: m[1]):
        group = [g[0] for g in group]
        for s in range(0, len(group), n_data):
            steps.append(_Step(int(T), group[s:s + n_data]))
    return steps


def _gather_indices(rows: np.ndarray, T: int, kp: np.ndarray, by_passage: np.ndarray,
                    positions: np.ndarray):
    """Where a step's kept occurrences are and where they go.

    Args:
      rows: [R] global passage id of each batch row (-1 for padding rows).
      kp: [S] passage of each kept occurrence in ``by_passage`` order (sorted by passage,
        position); ``by_passage`` [S] maps that order to store rows; ``positions`` [S] by store row.

    Returns:
      gpos [R, K] int32 positions to gather per row (K = T, or T/4 for buckets of >= 128 tokens
      when every row keeps at most T/4: two compiles at most per bucket, less to copy off the
      devices); ri, ki [n] the (row, slot) of each kept occurrence of the step; src [n] its store row.
    """
    real = rows >= 0
    a = np.searchsorted(kp, rows[real], "left")
    b = np.searchsorted(kp, rows[real], "right")
    nk = np.zeros(len(rows), np.int64)
    nk[real] = b - a
    K = T // 4 if T >= 128 and int(nk.max()) <= T // 4 else T
    ri = np.repeat(np.arange(len(rows)), nk)
    ki = np.arange(int(nk.sum())) - np.repeat(np.cumsum(nk) - nk, nk)
    src = (np.concatenate([by_passage[x:y] for x, y in zip(a, b)]) if len(a)
           else np.zeros(0, np.int64))
    gpos = np.zeros((len(rows), K), np.int32)
    gpos[ri, ki] = positions[src]
    return gpos, ri, ki, src


# --- Work directory -------------------------------------------------------------------------------

def _work_dir(out: Path) -> Path:
    return out.with_name(out.name + WORK_SUFFIX)


def _check_existing(out: Path, identity: dict, overwrite: bool) -> bool:
    """True when ``out`` already is a complete store of this exact extraction (nothing to do)."""
    if not out.exists():
        return False
    if not out.is_dir():
        if overwrite:
            return False
        raise SenseJaxError(f"{out} exists and is not a store directory; choose another output path")
    meta_path = out / "meta.json"
    if not (out / COMPLETE_MARKER).exists() or not meta_path.exists():
        if overwrite:
            return False
        raise SenseJaxError(f"{out} exists and is not a complete extraction store; choose another "
                            "output path or pass overwrite=True (--overwrite)")
    meta = read_json(meta_path, "store metadata")
    diff = [k for k in IDENTITY_KEYS if meta.get(k) != identity.get(k)]
    if not diff:
        return True
    if overwrite:
        return False
    detail = ", ".join(f"{k}: stored {meta.get(k)!r} vs requested {identity.get(k)!r}"
                       for k in diff if k != "corpus_files_fingerprint")
    if "corpus_files_fingerprint" in diff:
        detail = (detail + ", " if detail else "") + "the corpus files differ (names, sizes or times)"
    raise SenseJaxError(f"{out} holds an extraction made with different settings ({detail}); "
                        "choose another output path or pass overwrite=True (--overwrite)")


def _existing_is_done(out: Path, identity: dict, overwrite: bool, proc: int) -> bool:
    """:func:`_check_existing` decided by process 0 and shared (hosts may see other file times)."""
    error, done = None, False
    if proc == 0:
        try:
            done = _check_existing(out, identity, overwrite)
        except SenseJaxError as e:
            error = e
    (code,) = _broadcast([2 if error is not None else int(done)])
    if error is not None:
        raise error
    if code == 2:
        raise SenseJaxError(f"process 0 refused the output {out} (see its error message)")
    return bool(code)


# --- The extraction -------------------------------------------------------------------------------

@dataclasses.dataclass
class _Job:
    out: Path
    work: Path
    identity: dict
    proc: int
    nproc: int


def extract(model_or_path: Any, corpus_path: str | os.PathLike, out: str | os.PathLike, *,
            n_per_token: int = DEFAULT_N, seed: int = 0, batch_size: int = 32,
            dtype: str = "float32", layer: int = -1, mesh: Any = None, text_field: str = "text",
            max_length: int | None = None, window_passages: int = 8192,
            chunk_passages: int = 2048, compute_dtype: str | None = None,
            overwrite: bool = False, progress: bool = True) -> Path:
    """Extract a per-token uniform sample of teacher hidden states into a store at ``out``.

    Args:
      model_or_path: a :class:`sense_jax.Model` or a model directory for :func:`load_model`.
      corpus_path: text / JSONL / .gz file, directory of them, or saved ``datasets`` dataset
        (see :mod:`sense_jax.corpus`).
      out: store directory (layout in :mod:`sense_jax.store`); work in progress lives in
        ``out + ".partial"`` beside it.
      n_per_token: N, the sample size cap per token id (>= 1); token t keeps min(count_t, N).
      seed: sampling seed (any int); same seed, corpus and tokenizer -> same sample.
      batch_size: passages per device per step (the global batch is ``batch_size × n_data``);
        results are identical for any device count at the same ``batch_size``.
      dtype: stored vector dtype, "float32", "bfloat16" or "float16" (the cast happens on
        device; the compute dtype is the model's, e.g. ``load_model(path, dtype="bfloat16")``).
      layer: hidden-state index as in transformers' ``hidden_states`` (0 = embeddings output,
        L = last layer); negative counts from the end (-1 = last layer, the paper's choice).
      mesh: a ``jax.sharding.Mesh`` with a ``data`` axis (default: all devices,
        :func:`sense_jax.sharding.make_mesh`).
      text_field: JSONL key / dataset column of the text.
      max_length: truncate passages to this many tokens (default and cap: the model's maximum).
      window_passages: passages per resumption unit (progress is saved after each window).
      chunk_passages: passages per tokenisation call in the counting pass.
      compute_dtype: the teacher's compute dtype ("float32" or "bfloat16"); default: the
        model's own (float32 when loading from a path). Part of the store's identity.
      overwrite: replace a complete store at ``out`` made with other settings.
      progress: show tqdm progress bars (tokens/s and ETA) on process 0.

    Returns:
      ``out`` as a Path. The summary (passages, tokens seen, distinct tokens, tokens at the cap,
      passages truncated or skipped, fraction of forwards skipped) is in ``meta.json["summary"]``.

    Raises:
      SenseJaxError: N < 1, unknown dtype or layer, missing corpus, empty corpus, output not
        writable, or an existing store at ``out`` made with another teacher / seed / settings.
        An existing complete store is never modified unless ``overwrite``.
    """
    import jax

    from sense_jax.compile_cache import enable_compile_cache
    from sense_jax.loading import Model, load_model
    from sense_jax.sharding import make_mesh

    enable_compile_cache()

    if isinstance(n_per_token, bool) or not isinstance(n_per_token, (int, np.integer)) or n_per_token < 1:
        raise SenseJaxError(f"n_per_token (N) must be an integer >= 1, got {n_per_token!r}")
    if dtype not in STORE_DTYPES:
        raise SenseJaxError(f"unknown store dtype {dtype!r}; choose from {sorted(STORE_DTYPES)}")
    if batch_size < 1 or window_passages < 1 or chunk_passages < 1:
        raise SenseJaxError("batch_size, window_passages and chunk_passages must be >= 1")
    out = Path(out).absolute()
    corpus_files(corpus_path)  # raises on a missing corpus before any model loading

    if compute_dtype not in (None, "float32", "bfloat16"):
        raise SenseJaxError(f"unknown compute dtype {compute_dtype!r}; choose float32 or bfloat16")
    if isinstance(model_or_path, Model):
        model = model_or_path
        if compute_dtype is not None and compute_dtype != str(getattr(model.config, "dtype", "")):
            model = model.with_dtype(compute_dtype)
    else:
        model = load_model(model_or_path, dtype=compute_dtype or "float32")
    # a local directory is named by its absolute path; anything else (a hub id) as given
    teacher = str(model.path.absolute()) if Path(model.path).exists() else str(model.path)
    if model.tokenizer is None:
        raise SenseJaxError(f"{teacher}: the teacher has no tokenizer files")
    n_layers = int(getattr(model.config, "num_hidden_layers"))
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise SenseJaxError(f"layer must be an integer, got {layer!r}")
    layer_index = layer + n_layers + 1 if layer < 0 else layer
    if not 0 <= layer_index <= n_layers:
        raise SenseJaxError(f"layer {layer} out of range for a {n_layers}-layer teacher "
                            f"(0..{n_layers}, or -1..-{n_layers + 1})")
    cached = model.__dict__.get("_extract_tokenizer_hash")
    if cached is None or cached[0] is not model.tokenizer:  # hashing a 30k vocabulary: ~0.5 s
        cached = (model.tokenizer, tokenizer_hash(model.tokenizer))
        model.__dict__["_extract_tokenizer_hash"] = cached
    tok_hash = cached[1]
    L = _max_length(model, max_length)
    identity = {
        "teacher": teacher, "teacher_config_hash": _config_hash(model.config),
        "compute_dtype": str(getattr(model.config, "dtype", "float32")),
        "tokenizer_hash": tok_hash, "layer": layer_index, "dtype": dtype,
        "n_per_token": int(n_per_token), "seed": int(seed), "max_length": L,
        "text_field": text_field, "corpus_files_fingerprint": quick_fingerprint(corpus_path, text_field),
    }
    proc, nproc = _process_info()
    if _existing_is_done(out, identity, overwrite, proc):
        if proc == 0 and _work_dir(out).exists():  # killed after the final rename
            shutil.rmtree(_work_dir(out), ignore_errors=True)
        return out
    mesh = mesh if mesh is not None else make_mesh()
    if "data" not in mesh.axis_names:
        raise SenseJaxError(f"mesh axes {mesh.axis_names} have no 'data' axis")
    job = _Job(out, _work_dir(out), identity, proc, nproc)
    run_key = dict(identity, batch_size=int(batch_size), window_passages=int(window_passages),
                   format_version=FORMAT_VERSION)
    error = None
    try:
        fresh = _prepare_work_dir(job, run_key)
    except SenseJaxError as e:
        error, fresh = e, False
    (failed,) = _broadcast([int(error is not None)])  # process 0 decides; nobody waits forever
    if error is not None:
        raise error
    if failed:
        raise SenseJaxError(f"process 0 could not create the work directory {job.work}")

    special_ids = sorted({int(i) for i in model.tokenizer.all_special_ids})
    V = int(model.config.vocab_size)
    try:
        counted = _counting_stage(job, corpus_path, text_field, model.tokenizer, L, special_ids, V,
                                  int(n_per_token), int(seed), chunk_passages, progress)
    except SenseJaxError:
        if fresh and proc == 0:
            shutil.rmtree(job.work, ignore_errors=True)
        raise
    store_dir = _forward_stage(job, model, mesh, counted, corpus_path, text_field, L, layer_index,
                               n_layers, dtype, int(batch_size), int(window_passages), progress)
    summary = _summary(counted, int(n_per_token))
    meta = dict(identity, format_version=FORMAT_VERSION, sampler=SAMPLER, corpus=str(corpus_path),
                corpus_fingerprint=counted.stats["fingerprint"], num_layers=n_layers,
                hidden_size=int(model.config.hidden_size), vocab_size=V,
                special_ids=special_ids, summary=summary,
                teacher_fingerprint=teacher_fingerprint(model.params, V, model.tokenizer),
                provenance=provenance())
    if proc == 0:
        _finish(job, store_dir, meta, overwrite)
    _barrier("sense_jax.extract.done")
    return out


def _prepare_work_dir(job: _Job, run_key: dict) -> bool:
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


def _counting_stage(job: _Job, corpus, text_field, tokenizer, L, special_ids, V, n, seed,
                    chunk_passages, progress) -> _Counted:
    path = job.work / "counted"
    (done,) = _broadcast([int(path.is_dir()) if job.proc == 0 else 0])
    if done:
        return _load_counted(path)
    counted = _count_pass(corpus, text_field, tokenizer, L, special_ids, V, n, seed,
                          chunk_passages, progress)
    s = counted.stats
    if s["passages"] == 0:
        raise SenseJaxError(f"corpus {corpus} holds no passages ({s['lines']} line(s): "
                            f"{s['empty_skipped']} empty, {s['malformed_skipped']} malformed "
                            f"JSONL / missing {text_field!r})")
    if len(counted.tok) == 0:
        raise SenseJaxError(f"corpus {corpus} holds no non-special tokens")
    if job.proc == 0:
        _save_counted(path, counted)
    _fail_point("counted", 0)
    _barrier("sense_jax.extract.counted")
    return counted


def _make_forward(model, mesh, layer_index: int, n_layers: int, dtype: str):
    import jax
    import jax.numpy as jnp

    from sense_jax.sharding import batch_sharding, replicated

    cache = model.__dict__.setdefault("_extract_forward_cache", {})
    key = (mesh, layer_index, dtype, id(model.params))
    if key in cache:
        return cache[key]
    out_dtype = jnp.dtype(STORE_DTYPES[dtype])
    module = model.module

    def forward(params, input_ids, attention_mask, gather_pos):
        """[B, T] ids, mask; [B, K] positions -> [B, K, D] hidden states at those positions."""
        if layer_index == n_layers:
            h = module.apply({"params": params}, input_ids, attention_mask)
        else:
            _, states = module.apply({"params": params}, input_ids, attention_mask,
                                     output_all_hidden_states=True)
            h = states[layer_index]
        g = jnp.take_along_axis(h, gather_pos[:, :, None], axis=1)
        return g.astype(out_dtype)

    bs = batch_sharding(mesh)
    rep = replicated(mesh)
    fn = jax.jit(forward, in_shardings=(rep, bs, bs, bs), out_shardings=rep)

    def put(x):  # params as global replicated arrays (works across processes)
        if isinstance(x, jax.Array) and x.sharding == rep:
            return x
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, rep, lambda idx: host[idx])

    params = jax.tree.map(put, model.params)
    cache.clear()  # one entry: the replicated params copy is the memory that matters
    cache[key] = (fn, params)
    return fn, params


def _forward_stage(job: _Job, model, mesh, c: _Counted, corpus, text_field, L, layer_index,
                   n_layers, dtype, batch_size, window, progress):
    import jax
    from numpy.lib.format import open_memmap
    from tqdm.auto import tqdm

    from sense_jax.sharding import batch_sharding

    S = len(c.tok)
    D = int(model.config.hidden_size)
    V = len(c.counts)
    store_dir = job.work / "store"
    np_dtype = np.uint16 if dtype == "bfloat16" else STORE_DTYPES[dtype]
    (planned,) = _broadcast([int(store_dir.is_dir()) if job.proc == 0 else 0])
    if job.proc == 0 and not planned:
        tmp = job.work / f"store.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        offsets = np.zeros(V + 1, np.int64)
        offsets[1:] = np.cumsum(np.bincount(c.tok, minlength=V))
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "counts.npy", c.counts.astype(np.int64))
        np.save(tmp / "sources.npy", np.stack([c.passage, c.position.astype(np.int64)], axis=1))
        open_memmap(tmp / "vectors.npy", mode="w+", dtype=np_dtype, shape=(S, D)).flush()
        os.replace(tmp, store_dir)
        _fail_point("planned", 0)
    _barrier("sense_jax.extract.planned")
    progress_file = job.work / "progress.json"  # absent if killed right after the plan
    (windows_done,) = _broadcast([read_json(progress_file)["windows_done"]
                                  if job.proc == 0 and progress_file.exists() else 0])
    vectors = open_memmap(store_dir / "vectors.npy", mode="r+") if job.proc == 0 else None

    # Kept occurrences grouped by passage: rows[order] sorted by (passage, position).
    by_passage = np.lexsort((c.position, c.passage))
    kp = c.passage[by_passage]
    needed_all = np.unique(kp)
    n_passages = len(c.lengths)
    n_windows = -(-n_passages // window)
    n_data = int(mesh.shape["data"])
    rows_global = n_data * batch_size
    fn, params = _make_forward(model, mesh, layer_index, n_layers, dtype)
    bs = batch_sharding(mesh)
    total_tokens = int(c.lengths[needed_all].sum())
    done_tokens = int(c.lengths[needed_all[needed_all < windows_done * window]].sum())
    bar = tqdm(total=total_tokens, initial=done_tokens, desc="teacher forward", unit="tok",
               unit_scale=True, disable=not progress or job.proc != 0, dynamic_ncols=True,
               mininterval=1.0)
    encode = _make_encoder(model.tokenizer, L)
    pad_id = model.tokenizer.pad_token_id
    pad_id = int(pad_id if pad_id is not None else getattr(model.config, "pad_token_id", 0) or 0)
    hasher = PassageHasher()
    pending = None  # (device output, row_index, k_index, store_rows, tokens) of the last step
    step_counter = 0

    def drain():
        nonlocal pending
        if pending is None:
            return
        dev_out, ri, ki, dst, ntok = pending
        pending = None
        host = np.asarray(jax.device_get(dev_out))
        if vectors is not None and len(dst):
            vals = host[ri, ki]
            vectors[dst] = vals.view(np.uint16) if dtype == "bfloat16" else vals
        bar.update(ntok)

    passages = iter_passages(corpus, text_field)
    pid = 0
    for w in range(n_windows):
        lo, hi = w * window, min((w + 1) * window, n_passages)
        needed = needed_all[(needed_all >= lo) & (needed_all < hi)]
        steps = _plan_window(needed, c.lengths, batch_size, n_data) if w >= windows_done else []
        # Which passages this process tokenises: its rows of every step.
        mine: set[int] = set()
        local_ranges = {}
        for st in steps:
            mine_rows = process_rows(batch_sharding(mesh), (rows_global, st.length))
            rlo, rhi = mine_rows.start, mine_rows.stop
            local_ranges[id(st)] = (rlo, rhi)
            for m in range(rlo // batch_size, -(-rhi // batch_size)):
                if m < len(st.micro):
                    mine.update(int(x) for x in st.micro[m])
        texts: dict[int, str] = {}
        while pid < hi:
            text = next(passages, None)
            if text is None:
                raise SenseJaxError(f"corpus {corpus} changed during extraction (fewer passages)")
            hasher.update(text)
            if pid in mine:
                texts[pid] = text
            pid += 1
        if not steps:
            continue
        order = sorted(texts)
        ids_list, _ = encode([texts[p] for p in order]) if order else ([], 0)
        ids_of = dict(zip(order, ids_list))
        for st in steps:
            T = st.length
            rows = np.full(rows_global, -1, np.int64)
            flat_rows = np.concatenate(st.micro)
            for m, mb in enumerate(st.micro):
                rows[m * batch_size:m * batch_size + len(mb)] = mb
            gpos, ri, ki, src = _gather_indices(rows, T, kp, by_passage, c.position)
            K = gpos.shape[1]
            rlo, rhi = local_ranges[id(st)]
            ids = np.full((rhi - rlo, T), pad_id, np.int32)
            mask = np.zeros((rhi - rlo, T), np.int32)
            for r in range(rlo, rhi):
                p = int(rows[r])
                if p < 0:
                    continue
                seq = ids_of[p]
                if len(seq) != c.lengths[p]:
                    raise SenseJaxError(f"corpus {corpus} changed during extraction "
                                        f"(passage {p} tokenises differently)")
                ids[r - rlo, :len(seq)] = seq
                mask[r - rlo, :len(seq)] = 1
            g_ids = jax.make_array_from_process_local_data(bs, ids, (rows_global, T))
            g_mask = jax.make_array_from_process_local_data(bs, mask, (rows_global, T))
            g_pos = jax.make_array_from_process_local_data(bs, gpos[rlo:rhi], (rows_global, K))
            dev_out = fn(params, g_ids, g_mask, g_pos)
            drain()  # overlap: write the previous step while this one runs
            pending = (dev_out, ri, ki, src, int(c.lengths[flat_rows].sum()))
            _fail_point("step", step_counter)
            step_counter += 1
        drain()
        if vectors is not None:
            vectors.flush()
            write_json_atomic(job.work / "progress.json", {"windows_done": w + 1})
        _barrier(f"sense_jax.extract.window{w}")
        _fail_point("window", w)
    drain()
    bar.close()
    for text in passages:
        hasher.update(text)
    if vectors is not None:
        vectors.flush()
        del vectors
    if hasher.hexdigest() != c.stats["fingerprint"]:
        _barrier("sense_jax.extract.changed")
        if job.proc == 0:
            shutil.rmtree(job.work, ignore_errors=True)
        raise SenseJaxError(f"corpus {corpus} changed during extraction; re-run to start over")
    return store_dir


def _summary(c: _Counted, n: int) -> dict:
    """The run's figures. ``tokens_seen`` counts non-special token occurrences (what is sampled);
    ``tokens_forwarded`` counts every token, specials included, of the forwarded passages."""
    s = c.stats
    needed = len(np.unique(c.passage))
    return {
        "passages": int(s["passages"]),
        "lines": int(s["lines"]),
        "files": int(s["files"]),
        "empty_skipped": int(s["empty_skipped"]),
        "malformed_skipped": int(s["malformed_skipped"]),
        "undecodable_replaced": int(s["undecodable_replaced"]),
        # what the reader changed (sense_jax.corpus); absent in counts saved by older releases
        **{k: int(s.get(k, 0)) for k in ("bom_stripped", "crlf_line_endings", "cr_line_endings",
                                         "separators_replaced")},
        "truncated": int(s["truncated"]),
        "tokens_seen": int(c.counts.sum()),
        "distinct_tokens": int((c.counts > 0).sum()),
        "tokens_at_cap": int((c.counts >= n).sum()),
        "samples": int(len(c.tok)),
        "passages_forwarded": int(needed),
        "passages_skipped": int(s["passages"] - needed),
        "forward_skipped_fraction": float(1.0 - needed / max(1, s["passages"])),
        "tokens_forwarded": int(c.lengths[np.unique(c.passage)].sum()),
    }


def _finish(job: _Job, store_dir: Path, meta: dict, overwrite: bool) -> None:
    write_json_atomic(store_dir / "meta.json", meta)
    (store_dir / COMPLETE_MARKER).write_text("ok\n")
    _fail_point("final", 0)
    out = job.out
    if out.exists() and not overwrite:  # checked at the start; someone wrote it meanwhile
        raise SenseJaxError(f"{out} appeared during the extraction; the result is kept in {store_dir}")
    replace_directory(store_dir, out)
    _fail_point("final", 1)
    shutil.rmtree(job.work, ignore_errors=True)


def summary_lines(meta: dict) -> list[str]:
    """Human-readable summary of a store's ``meta.json`` (used by the CLI)."""
    s = meta.get("summary", {})
    return [
        f"passages: {s.get('passages', 0):,} ({s.get('empty_skipped', 0):,} empty and "
        f"{s.get('malformed_skipped', 0):,} malformed lines skipped, "
        f"{s.get('undecodable_replaced', 0):,} with undecodable bytes replaced, "
        f"{s.get('truncated', 0):,} truncated to {meta.get('max_length')} tokens)",
        f"tokens seen: {s.get('tokens_seen', 0):,}; distinct tokens: {s.get('distinct_tokens', 0):,}; "
        f"at the cap N={meta.get('n_per_token')}: {s.get('tokens_at_cap', 0):,}",
        f"samples kept: {s.get('samples', 0):,}; passages forwarded: {s.get('passages_forwarded', 0):,}, "
        f"skipped: {s.get('passages_skipped', 0):,} "
        f"({100 * s.get('forward_skipped_fraction', 0.0):.1f}% of forward passes saved)",
    ]
