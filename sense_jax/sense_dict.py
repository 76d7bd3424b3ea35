"""The sense dictionary (codebook): per-token sense embeddings, and nearest-sense look-up.

METHOD §1-2 (Wang et al. 2025, §3): token t has K_t sense embeddings C_t ∈ R^{K_t × D}
(k-means centres of its sampled hidden states). At inference each hidden state h of a token with
an entry is replaced by its nearest sense ``argmax_k score(C_t[k], h)``; tokens without an entry
keep h.

Storage is ragged: all centres in one [S, D] array, token t's senses at rows
``offsets[t]:offsets[t + 1]`` (zero rows for tokens without an entry). Scoring gathers a padded
[..., K_max, D] block per token (:func:`gather_senses`); padding slots score ``-inf`` and can
never be selected. :func:`nearest_sense` scores the gathered rows as they are (no zeroed copy)
and gathers the chosen row alone from the flat centres for the replaced state.

On disk: ``senses.safetensors`` (centres, offsets, counts, and scales for an int8 codebook) +
``meta.json``; no pickle. The layout is versioned (``meta["format_version"]``, see docs/senses.md,
"Sense dictionary format") and readable without JAX by :mod:`sense_jax.senses_numpy`.

No token has two equal senses: equal senses get equal SKD logits, so the student's
cross-entropy for that token could never fall below log 2. Every path that can produce them
(samples kept as senses, re-seeded clusters, merges, a cast to a narrower dtype) merges them
into the first, adding their counts (:meth:`SenseDictionary.deduplicated`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from sense_jax.errors import SenseJaxError
from sense_jax.io_utils import atomic_directory, check_replaceable, holds_only, read_json, write_json_atomic

TENSORS_FILE = "senses.safetensors"
META_FILE = "meta.json"


def is_dictionary_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a sense dictionary's files and nothing else
    (what ``--overwrite`` may replace)."""
    path = Path(path)
    return path.is_dir() and holds_only(path, (TENSORS_FILE, META_FILE), (TENSORS_FILE,))
FORMAT_VERSION = 1  # meta["format_version"]; dictionaries written before it are version 1 too
METRICS = ("dot", "cos", "l2")
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
STORAGE_DTYPES = (*DTYPES, "int8")  # int8: symmetric per-sense scales (:func:`quantize_int8`)
INT8_SCHEME = "symmetric per-sense (row) scale = max|c| / 127, centres = round(c / scale) in [-127, 127]"
# Meta keys describing the file itself (written by save, checked and dropped by load).
FILE_KEYS = ("format_version", "dtype", "hidden_size", "vocab_size", "n_senses_total", "quantization")
# Meta keys that must agree for two dictionaries (or a store and a dictionary) to be merged.
TEACHER_KEYS = ("teacher_fingerprint", "tokenizer_hash", "layer")


def quantize_int8(centres) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantisation of centres [S, D] (any float dtype).

    Returns ``(q [S, D] int8, scales [S] float32)`` with ``scales = max_d |c| / 127`` and
    ``q = round(c / scale)`` clipped to [-127, 127] (-128 unused, so the scheme is symmetric);
    ``q * scales[:, None]`` approximates c to within half a step, ``scale / 2``, per element.
    All-zero rows get scale 0. Per-row scales keep a sense of small norm as precise (relative to
    itself) as one of large norm; the same scheme as Model2Vec's int8 tables, with one scale
    per row.
    """
    c = np.asarray(centres, np.float32)
    scales = (np.max(np.abs(c), axis=-1, initial=0.0) / np.float32(127)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))
    q = np.clip(np.rint(c / safe[:, None]), -127, 127).astype(np.int8)
    return q, scales


def dequantize_int8(q, scales) -> np.ndarray:
    """float32 [S, D] values of an int8 codebook: ``q * scales[:, None]``."""
    return np.asarray(q, np.float32) * np.asarray(scales, np.float32)[:, None]


def duplicate_rows(values, offsets) -> np.ndarray:
    """For each row of values [S, D], the first row of the same token with equal values (the row
    itself when it has no earlier copy), [S] int64. Exact equality (+0.0 == -0.0): rows are
    grouped by (token, a 64-bit hash of their bits), one stable sort, and every group is then
    checked element by element (on a hash collision, an exact sort of the rows' bytes)."""
    v = np.ascontiguousarray(np.asarray(values, np.float32) + np.float32(0.0))  # -0.0 -> +0.0
    S = v.shape[0]
    if S == 0:
        return np.zeros(0, np.int64)
    token = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
    bits = v.view(np.uint32)
    mult = np.random.default_rng(0).integers(1, 1 << 63, v.shape[1], dtype=np.uint64) | np.uint64(1)
    h = np.concatenate([(bits[i:i + 8192].astype(np.uint64) * mult).sum(axis=1, dtype=np.uint64)
                        for i in range(0, S, 8192)])  # wraps mod 2^64
    order = np.lexsort((h, token))  # stable: within a group, rows in their original order
    t, hh = token[order], h[order]
    starts = np.r_[True, (t[1:] != t[:-1]) | (hh[1:] != hh[:-1])]
    owner = np.empty(S, np.int64)
    owner[order] = order[np.maximum.accumulate(np.where(starts, np.arange(S), 0))]
    if np.array_equal(v[owner], v):
        return owner
    rows = np.concatenate([token[:, None].view(np.uint8), v.view(np.uint8).reshape(S, -1)], axis=1)
    rows = np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1]))).ravel()
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)].astype(np.int64)


def teacher_mismatch(a: dict, b: dict) -> str | None:
    """The first of :data:`TEACHER_KEYS` recorded in both metas with different values, as
    ``"key a != b"``; None when they agree (keys missing on either side are not compared)."""
    for key in TEACHER_KEYS:
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
            return f"{key} {a[key]} != {b[key]}"
    return None


def sources_of(meta: dict) -> list[dict]:
    """The sources of a dictionary: ``meta["sources"]``, or for a dictionary written before
    sources were recorded, one source made of its top-level keys."""
    if meta.get("sources"):
        return [dict(x) for x in meta["sources"]]
    return [source_record(meta)]


def source_record(meta: dict) -> dict:
    """One entry of ``meta["sources"]``: store, fingerprints, teacher, K rule, seed, token count."""
    stats = meta.get("stats") or {}
    return {"store": meta.get("store"), "store_fingerprint": meta.get("store_fingerprint"),
            "teacher": meta.get("teacher"), "teacher_fingerprint": meta.get("teacher_fingerprint"),
            "tokenizer_hash": meta.get("tokenizer_hash"), "k_rule": meta.get("k_rule"),
            "seed": meta.get("seed"), "tokens": stats.get("tokens")}


@struct.dataclass
class SenseDictionary:
    """A ragged codebook of sense embeddings, as a JAX pytree.

    Attributes:
      centres: [S, D] sense embeddings (f32, bf16, f16, or int8 with ``scales``), all tokens
        concatenated.
      offsets: [V + 1] int32; token t's senses are ``centres[offsets[t]:offsets[t + 1]]``.
      counts: [S] int32, samples assigned to each sense when it was built.
      scales: None, or [S] float32 for an int8 codebook: sense i is ``centres[i] * scales[i]``
        (:func:`quantize_int8`), dequantised inside the look-up (:func:`gather_senses`).
      k_max: static max senses of any token (width of the padded look-up).
      meta_json: static JSON string of metadata (teacher id, hidden_size, metric, k rule, seed,
        store fingerprint, sources, ...); read it through :attr:`meta`.
    """

    centres: jax.Array
    offsets: jax.Array
    counts: jax.Array
    scales: jax.Array | None = None
    k_max: int = struct.field(pytree_node=False, default=1)
    meta_json: str = struct.field(pytree_node=False, default="{}")

    @classmethod
    def from_arrays(cls, centres, offsets, counts=None, meta: dict | None = None,
                    scales=None) -> "SenseDictionary":
        """Build from numpy/jax arrays; validates offsets (monotonic, ending at S).

        Args:
          centres: [S, D] float (f32 / bf16 / f16 kept as given), or int8 with ``scales``.
          offsets: [V + 1] int, non-decreasing, ``offsets[0] == 0``, ``offsets[-1] == S``.
          counts: optional [S] int, samples per sense (zeros if omitted).
          meta: JSON-serialisable metadata.
          scales: [S] float32 per-sense scales, given exactly when centres are int8.

        Raises:
          SenseJaxError: inconsistent shapes, int8 centres without scales (or scales with float
            centres), NaN/inf centres or scales, or centres whose squared norm overflows float32
            (every score against them would too), naming the token id.
        """
        centres = np.asarray(centres)
        offsets = np.asarray(offsets, np.int64)
        S = centres.shape[0]
        if centres.ndim != 2 or offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 \
                or offsets[-1] != S or np.any(np.diff(offsets) < 0):
            raise SenseJaxError(f"sense dictionary: offsets [{offsets.size}] do not index centres {centres.shape}")
        if (centres.dtype == np.int8) != (scales is not None):
            raise SenseJaxError(f"sense dictionary: {centres.dtype} centres "
                                f"{'need' if centres.dtype == np.int8 else 'take no'} per-sense scales")
        if scales is not None:
            scales = np.asarray(scales, np.float32)
            if scales.shape != (S,):
                raise SenseJaxError(f"sense dictionary: scales {scales.shape} do not match {S} centres")
            values = dequantize_int8(centres, np.where(np.isfinite(scales), scales, np.nan))
        else:
            values = centres.astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            bad = np.flatnonzero(~np.isfinite(np.einsum("sd,sd->s", values, values)))
        if bad.size:
            token = int(np.searchsorted(offsets, bad[0], side="right") - 1)
            what = ("NaN or inf sense vectors" if not np.all(np.isfinite(values[bad[0]]))
                    else "sense vectors whose squared norm overflows float32")
            raise SenseJaxError(f"sense dictionary: token {token} has {what} "
                                f"({bad.size} bad row(s) in all)")
        counts = np.zeros(S, np.int32) if counts is None else np.asarray(counts, np.int32)
        if counts.shape != (S,):
            raise SenseJaxError(f"sense dictionary: counts {counts.shape} do not match {S} centres")
        n = np.diff(offsets)
        return cls(centres=jnp.asarray(centres), offsets=jnp.asarray(offsets, jnp.int32),
                   counts=jnp.asarray(counts), scales=None if scales is None else jnp.asarray(scales),
                   k_max=max(int(n.max(initial=0)), 1), meta_json=json.dumps(meta or {}, sort_keys=True))

    @property
    def meta(self) -> dict:
        return json.loads(self.meta_json)

    @property
    def vocab_size(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def hidden_size(self) -> int:
        return int(self.centres.shape[1])

    @property
    def n_senses(self) -> jax.Array:
        """Senses per token, [V] int32 (0 = no entry)."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def dtype(self) -> str:
        """Storage dtype of the centres: "float32", "bfloat16", "float16" or "int8"."""
        return str(self.centres.dtype)

    def nbytes(self) -> int:
        """Bytes of the arrays (centres + offsets + counts, + scales for int8)."""
        arrays = [self.centres, self.offsets, self.counts] + ([self.scales] if self.scales is not None else [])
        return int(sum(np.dtype(a.dtype).itemsize * a.size for a in arrays))

    def float_centres(self) -> np.ndarray:
        """All centres [S, D] as float32 numpy (dequantised for int8)."""
        if self.scales is not None:
            return dequantize_int8(np.asarray(self.centres), np.asarray(self.scales))
        return np.asarray(self.centres).astype(np.float32)

    def token_senses(self, token_id: int) -> np.ndarray:
        """Token ``token_id``'s centres [K_t, D] as numpy (storage dtype; float32 for int8)."""
        o = np.asarray(self.offsets)
        rows = slice(int(o[token_id]), int(o[token_id + 1]))
        if self.scales is not None:
            return dequantize_int8(np.asarray(self.centres[rows]), np.asarray(self.scales[rows]))
        return np.asarray(self.centres[rows])

    def to_numpy(self) -> dict[str, Any]:
        """The dictionary as plain numpy, as :func:`sense_jax.senses_numpy.load` returns it:
        ``centres`` [S, D] float32 (dequantised / upcast), ``offsets`` [V + 1] int64,
        ``counts`` [S] int64, ``meta`` dict (with the file keys of the current format)."""
        return {"centres": self.float_centres(), "offsets": np.asarray(self.offsets, np.int64),
                "counts": np.asarray(self.counts, np.int64), "meta": self._file_meta()}

    def _file_meta(self) -> dict:
        meta = dict(self.meta, format_version=FORMAT_VERSION, dtype=self.dtype,
                    hidden_size=self.hidden_size, vocab_size=self.vocab_size,
                    n_senses_total=int(self.centres.shape[0]))
        if self.scales is not None:
            meta["quantization"] = INT8_SCHEME
        return meta

    def duplicate_senses(self) -> int:
        """Number of senses equal to an earlier sense of the same token (0 for a clean dictionary)."""
        owner = duplicate_rows(self.float_centres(), np.asarray(self.offsets))
        return int(np.sum(owner != np.arange(owner.size)))

    def deduplicated(self) -> "SenseDictionary":
        """This dictionary with each token's equal senses merged into the first (counts added),
        ``self`` when there are none. ``meta["stats"]["duplicate_senses_merged"]`` adds the
        number removed and ``stats["senses"]`` is updated."""
        offsets = np.asarray(self.offsets, np.int64)
        owner = duplicate_rows(self.float_centres(), offsets)
        keep = owner == np.arange(owner.size)
        if keep.all():
            return self
        counts = np.zeros(owner.size, np.int64)
        np.add.at(counts, owner, np.asarray(self.counts, np.int64))
        token = np.repeat(np.arange(self.vocab_size), np.diff(offsets))
        n = np.bincount(token[keep], minlength=self.vocab_size)
        meta = self.meta
        stats = dict(meta.get("stats") or {})
        stats["duplicate_senses_merged"] = int(stats.get("duplicate_senses_merged", 0)) + int((~keep).sum())
        stats["senses"] = int(keep.sum())
        meta["stats"] = stats
        return SenseDictionary.from_arrays(
            np.asarray(self.centres)[keep], np.concatenate([[0], np.cumsum(n)]), counts[keep], meta,
            scales=None if self.scales is None else np.asarray(self.scales)[keep])

    def astype(self, dtype: str) -> "SenseDictionary":
        """This dictionary stored as ``dtype`` (one of :data:`STORAGE_DTYPES`; int8 is quantised
        by :func:`quantize_int8`), equal senses the cast creates merged (:meth:`deduplicated`).

        Raises:
          SenseJaxError: unknown dtype.
        """
        if dtype not in STORAGE_DTYPES:
            raise SenseJaxError(f"unknown dtype {dtype!r}; choose from {sorted(STORAGE_DTYPES)}")
        if dtype == self.dtype:
            return self
        if dtype == "int8":
            q, scales = quantize_int8(self.float_centres())
        else:
            src = self.float_centres() if self.scales is not None else np.asarray(self.centres)
            q, scales = src.astype(DTYPES[dtype]), None
        return SenseDictionary.from_arrays(q, self.offsets, self.counts, self.meta, scales=scales).deduplicated()

    # --- persistence --------------------------------------------------------------------------

    def save(self, out: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False) -> Path:
        """Write ``senses.safetensors`` + ``meta.json`` to directory ``out`` atomically, in the
        layout of format version :data:`FORMAT_VERSION` (docs/senses.md, "Sense dictionary format").

        Args:
          dtype: storage dtype of the centres ("float32", "bfloat16", "float16", "int8" with
            per-sense scales); default: as held. A cast that makes two senses of a token equal
            merges them (:meth:`astype`).

        Raises:
          SenseJaxError: unknown dtype; ``out`` exists and not ``overwrite``; ``out`` is something
            else than a sense dictionary or an empty directory (never replaced).
        """
        if overwrite:
            check_replaceable(out, is_dictionary_dir, "a sense dictionary")
        sd = self.astype(dtype) if dtype is not None else self
        tensors = {"centres": np.ascontiguousarray(np.asarray(sd.centres)),
                   "offsets": np.asarray(sd.offsets, np.int64),
                   "counts": np.asarray(sd.counts, np.int64)}
        if sd.scales is not None:
            tensors["scales"] = np.asarray(sd.scales, np.float32)
        with atomic_directory(out, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp / TENSORS_FILE))
            write_json_atomic(tmp / META_FILE, sd._file_meta())
        return Path(out)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SenseDictionary":
        """Read a dictionary directory written by :meth:`save` (int8 stays int8 with its scales).

        Raises:
          SenseJaxError: missing, truncated or inconsistent files (names the file), or a
            ``format_version`` newer than this sense_jax reads.
        """
        path = Path(path)
        if not path.is_dir():
            raise SenseJaxError(f"sense dictionary not found: {path}")
        meta = read_json(path / META_FILE, "sense dictionary metadata")
        version = meta.pop("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise SenseJaxError(f"{path / META_FILE}: format_version must be an integer >= 1, got {version!r}")
        if version > FORMAT_VERSION:
            raise SenseJaxError(f"{path / META_FILE}: format_version {version} is newer than this sense_jax "
                                f"reads ({FORMAT_VERSION}); upgrade sense_jax to load this dictionary")
        meta.pop("quantization", None)
        f = path / TENSORS_FILE
        try:
            with safe_open(str(f), framework="np") as st:
                names = ("centres", "offsets", "counts") + (("scales",) if "scales" in st.keys() else ())
                arrays = {k: st.get_tensor(k) for k in names}
        except FileNotFoundError:
            raise SenseJaxError(f"sense dictionary file missing: {f}") from None
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise SenseJaxError(f"{f}: unreadable, truncated or incomplete ({e})") from None
        c, o = arrays["centres"], arrays["offsets"]
        expected = {"hidden_size": c.shape[-1] if c.ndim == 2 else None, "vocab_size": o.shape[0] - 1,
                    "n_senses_total": c.shape[0], "dtype": str(c.dtype)}
        for key, value in expected.items():
            if key in meta and meta.pop(key) != value:
                raise SenseJaxError(f"{f}: {key} does not match {path / META_FILE} "
                                    "(files from different dictionaries?)")
        try:
            return cls.from_arrays(c, o, arrays["counts"], meta, scales=arrays.get("scales"))
        except SenseJaxError as e:
            raise SenseJaxError(f"{f}: {e}") from None

    def merged(self, update: "SenseDictionary") -> "SenseDictionary":
        """This dictionary with ``update``'s entries added (replacing this one's for those tokens).

        Tokens with an entry in ``update`` take ``update``'s senses; every other token keeps its
        own. Metadata is ``update``'s, with ``sources`` listing every source of both (store,
        store fingerprint, teacher, K rule, seed, token count; :func:`source_record`) and
        ``merged_from`` their store fingerprints. Equal senses within a token are merged
        (:meth:`deduplicated`). Two int8 dictionaries stay int8; otherwise int8 centres are
        dequantised and the float dtypes promoted.

        Raises:
          SenseJaxError: the two come from different teachers: another hidden size, vocabulary
            size, or recorded teacher fingerprint, tokenizer or layer (:data:`TEACHER_KEYS`).
        """
        if update.hidden_size != self.hidden_size:
            raise SenseJaxError(f"cannot add senses of width {update.hidden_size} to a dictionary of "
                                f"width {self.hidden_size} (a store from another teacher?)")
        if update.vocab_size != self.vocab_size:
            raise SenseJaxError(f"cannot add senses over a vocabulary of {update.vocab_size} tokens to a "
                                f"dictionary over {self.vocab_size} (a store from another teacher?)")
        mismatch = teacher_mismatch(self.meta, update.meta)
        if mismatch:
            raise SenseJaxError(f"cannot add senses from another teacher: {mismatch} (dictionary vs addition)")
        o_old, o_new = np.asarray(self.offsets), np.asarray(update.offsets)
        if self.scales is not None and update.scales is not None:
            c_old, c_new = np.asarray(self.centres), np.asarray(update.centres)
            s_old, s_new = np.asarray(self.scales), np.asarray(update.scales)
        else:
            c_old, c_new = (np.asarray(d.centres) if d.scales is None else d.float_centres() for d in (self, update))
            s_old = s_new = None
        k_old, k_new = np.asarray(self.counts), np.asarray(update.counts)
        dtype = np.result_type(c_old.dtype, c_new.dtype)
        # One row index per kept sense, from the old ([0, S_old)) or new ([S_old, ...)) rows.
        take_new = o_new[1:] > o_new[:-1]
        rows = [np.arange(o_new[t], o_new[t + 1]) + o_old[-1] if take_new[t] else np.arange(o_old[t], o_old[t + 1])
                for t in range(self.vocab_size)]
        n = np.where(take_new, np.diff(o_new), np.diff(o_old))
        rows = np.concatenate(rows + [np.zeros(0, np.int64)]).astype(np.int64)
        centres = np.concatenate([c_old.astype(dtype), c_new.astype(dtype)])[rows]
        counts = np.concatenate([k_old, k_new])[rows]
        scales = None if s_old is None else np.concatenate([s_old, s_new])[rows]
        meta = dict(update.meta)
        sources = sources_of(self.meta) + sources_of(update.meta)
        meta["sources"] = sources
        meta["merged_from"] = [x.get("store_fingerprint") for x in sources]
        return SenseDictionary.from_arrays(centres, np.concatenate([[0], np.cumsum(n)]), counts, meta,
                                           scales=scales).deduplicated()


def gather_senses(sense_dict: SenseDictionary, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The padded codebook of each token.

    Args:
      sense_dict: the dictionary.
      token_ids: [...] int token ids (ids outside [0, V) have no entry).

    Returns:
      codebook [..., K_max, D] (centres' dtype, float32 for int8; zeros at padding) and valid [..., K_max] bool
      (False at padding slots and for tokens without an entry).
    """
    V, K = sense_dict.vocab_size, sense_dict.k_max
    in_vocab = (token_ids >= 0) & (token_ids < V)
    t = jnp.where(in_vocab, token_ids, 0)
    start = sense_dict.offsets[t]
    n = jnp.where(in_vocab, sense_dict.offsets[t + 1] - start, 0)
    slots = jnp.arange(K, dtype=jnp.int32)
    valid = slots < n[..., None]
    rows = jnp.clip(start[..., None] + slots, 0, max(sense_dict.centres.shape[0] - 1, 0))
    codebook = sense_dict.centres[rows]
    if sense_dict.scales is not None:  # int8: dequantised here, only the gathered rows
        codebook = codebook.astype(jnp.float32) * sense_dict.scales[rows][..., None]
    codebook = jnp.where(valid[..., None], codebook, 0)
    return codebook, valid


def sense_scores(codebook: jax.Array, valid: jax.Array, hidden: jax.Array, metric: str = "dot") -> jax.Array:
    """Scores [..., K] of ``hidden`` [..., D] against ``codebook`` [..., K, D], in float32.

    ``dot``: <c, h>; ``cos``: <c, h> / (|c| |h|); ``l2``: -|c - h|^2, from the difference
    itself (the codebook is already materialised, so this costs what the expanded form
    ``2<c, h> - |c|^2 - |h|^2`` does, and is never positive: an exact match scores 0, where the
    expanded form gave up to +0.016 at norm ~280 from cancellation). Padding slots get -inf.
    """
    c = codebook.astype(jnp.float32)
    h = hidden.astype(jnp.float32)
    if metric == "l2":
        s = -jnp.sum(jnp.square(c - h[..., None, :]), axis=-1)
    else:
        s = jnp.einsum("...KD,...D->...K", c, h)
        if metric == "cos":
            norm = jnp.linalg.norm(c, axis=-1) * jnp.linalg.norm(h, axis=-1)[..., None]
            s = s / jnp.maximum(norm, 1e-12)
        elif metric != "dot":
            raise SenseJaxError(f"unknown metric {metric!r}; choose from {METRICS}")
    return jnp.where(valid, s, -jnp.inf)


def _nearest_flat(sense_dict, token_ids, hidden, metric):
    # Scores need every sense of the token, but nothing else needs the [..., K, D] block: no
    # zeroing of its padding slots (they hold other tokens' senses and score -inf), and the
    # replaced state is the one chosen row gathered from the flat centres (dequantised alone).
    # On CPU the block gather is most of the cost; this path is ~1.5-2x the block path of
    # gather_senses + take_along_axis, with the same scores and therefore the same results.
    V, K, S = sense_dict.vocab_size, sense_dict.k_max, sense_dict.centres.shape[0]
    in_vocab = (token_ids >= 0) & (token_ids < V)
    t = jnp.where(in_vocab, token_ids, 0)
    start = sense_dict.offsets[t]
    n = jnp.where(in_vocab, sense_dict.offsets[t + 1] - start, 0)
    slots = jnp.arange(K, dtype=jnp.int32)
    rows = jnp.clip(start[..., None] + slots, 0, max(S - 1, 0))
    block = _dequantized(sense_dict, rows)
    k = jnp.argmax(sense_scores(block, slots < n[..., None], hidden, metric), axis=-1).astype(jnp.int32)
    has_entry = n > 0
    chosen = _dequantized(sense_dict, jnp.clip(start + k, 0, max(S - 1, 0)))
    replaced = jnp.where(has_entry[..., None], chosen.astype(hidden.dtype), hidden)
    return jnp.where(has_entry, k, -1), replaced, has_entry


def _dequantized(sense_dict, rows):
    """centres[rows] [..., D]: the storage dtype, or float32 for int8 (as gather_senses)."""
    c = sense_dict.centres[rows]
    if sense_dict.scales is not None:
        c = c.astype(jnp.float32) * sense_dict.scales[rows][..., None]
    return c


def default_chunk(k_max: int, hidden_size: int, cache_bytes: int = 1 << 20) -> int:
    """Positions per look-up chunk: on CPU, enough that the gathered [chunk, K_max, D] f32
    codebook stays in cache (~1 MiB: 64 positions at K_max = 10, D = 384, measured ~1.2x faster
    than 128 there); elsewhere 0 (no chunking: one parallel gather)."""
    if jax.default_backend() != "cpu":
        return 0
    per = 4 * k_max * hidden_size
    return max(8, 1 << max(int(cache_bytes // per).bit_length() - 1, 0))


@jax.jit(static_argnames=("metric", "chunk"))
def nearest_sense(sense_dict: SenseDictionary, token_ids: jax.Array, hidden: jax.Array,
                  metric: str = "dot", chunk: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Replace each hidden state by its token's nearest sense (METHOD §2).

    Args:
      sense_dict: the dictionary (V, D must match the model's vocabulary and width).
      token_ids: [B, T] int32 (ids outside [0, V) have no entry).
      hidden: [B, T, D] hidden states (any float dtype).
      metric: "dot" (the paper's), "cos" or "l2". Scores are float32; padding slots score -inf
        and can never be selected.
      chunk: positions gathered at a time (``jax.lax.map`` over chunks); None: automatic
        (:func:`default_chunk`: cache-sized on CPU, where materialising the whole
        [B, T, K_max, D] codebook is ~20x slower, unchunked on accelerators); 0: unchunked.

    Returns:
      sense_index [B, T] int32: the local sense index k in [0, K_t), -1 where no entry;
      replaced [B, T, D] (hidden's dtype): C_t[k] where the token has an entry, else hidden;
      has_entry [B, T] bool.

    Raises:
      SenseJaxError: hidden's width differs from the dictionary's, or shapes disagree.
    """
    if hidden.shape[-1] != sense_dict.hidden_size or hidden.shape[:-1] != token_ids.shape:
        raise SenseJaxError(f"nearest_sense: hidden {hidden.shape} does not match token_ids "
                            f"{token_ids.shape} and the dictionary width {sense_dict.hidden_size}")
    if chunk is None:
        chunk = default_chunk(sense_dict.k_max, sense_dict.hidden_size)
    shape, D = token_ids.shape, hidden.shape[-1]
    M = int(np.prod(shape))
    if not chunk or M <= chunk:
        return _nearest_flat(sense_dict, token_ids, hidden, metric)
    pad = -M % chunk
    ids = jnp.pad(token_ids.reshape(-1), (0, pad), constant_values=-1).reshape(-1, chunk)
    hid = jnp.pad(hidden.reshape(-1, D), ((0, pad), (0, 0))).reshape(-1, chunk, D)
    k, replaced, has_entry = jax.lax.map(lambda a: _nearest_flat(sense_dict, a[0], a[1], metric), (ids, hid))
    return (k.reshape(-1)[:M].reshape(shape), replaced.reshape(-1, D)[:M].reshape(*shape, D),
            has_entry.reshape(-1)[:M].reshape(shape))
