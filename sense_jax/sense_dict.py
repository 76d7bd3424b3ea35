"""The sense dictionary (codebook): per-token sense embeddings, and nearest-sense look-up.

METHOD §1-2 (Wang et al. 2025, §3): token t has K_t sense embeddings C_t ∈ R^{K_t × D}
(k-means centres of its sampled hidden states). At inference each hidden state h of a token with
an entry is replaced by its nearest sense ``argmax_k score(C_t[k], h)``; tokens without an entry
keep h.

Storage is ragged: all centres in one [S, D] array, token t's senses at rows
``offsets[t]:offsets[t + 1]`` (zero rows for tokens without an entry). Look-ups gather a padded
[..., K_max, D] block per token; padding slots score ``-inf`` and can never be selected.

On disk: ``senses.safetensors`` (centres, offsets, counts) + ``meta.json``; no pickle.
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

from sense_jax.errors import SenseJaxError
from sense_jax.io_utils import atomic_directory, read_json, write_json_atomic

TENSORS_FILE = "senses.safetensors"
META_FILE = "meta.json"
METRICS = ("dot", "cos", "l2")
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@struct.dataclass
class SenseDictionary:
    """A ragged codebook of sense embeddings, as a JAX pytree.

    Attributes:
      centres: [S, D] sense embeddings (f32, bf16 or f16), all tokens concatenated.
      offsets: [V + 1] int32; token t's senses are ``centres[offsets[t]:offsets[t + 1]]``.
      counts: [S] int32, samples assigned to each sense when it was built.
      k_max: static max senses of any token (width of the padded look-up).
      meta_json: static JSON string of metadata (teacher id, hidden_size, metric, k rule, seed,
        store fingerprint, ...); read it through :attr:`meta`.
    """

    centres: jax.Array
    offsets: jax.Array
    counts: jax.Array
    k_max: int = struct.field(pytree_node=False, default=1)
    meta_json: str = struct.field(pytree_node=False, default="{}")

    @classmethod
    def from_arrays(cls, centres, offsets, counts=None, meta: dict | None = None) -> "SenseDictionary":
        """Build from numpy/jax arrays; validates offsets (monotonic, ending at S).

        Args:
          centres: [S, D] float (f32 / bf16 / f16 kept as given).
          offsets: [V + 1] int, non-decreasing, ``offsets[0] == 0``, ``offsets[-1] == S``.
          counts: optional [S] int, samples per sense (zeros if omitted).
          meta: JSON-serialisable metadata.

        Raises:
          SenseJaxError: inconsistent shapes, or NaN/inf centres (naming the token id).
        """
        centres = np.asarray(centres)
        offsets = np.asarray(offsets, np.int64)
        S = centres.shape[0]
        if centres.ndim != 2 or offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 \
                or offsets[-1] != S or np.any(np.diff(offsets) < 0):
            raise SenseJaxError(f"sense dictionary: offsets [{offsets.size}] do not index centres {centres.shape}")
        bad = np.flatnonzero(~np.all(np.isfinite(centres.astype(np.float32)), axis=-1))
        if bad.size:
            token = int(np.searchsorted(offsets, bad[0], side="right") - 1)
            raise SenseJaxError(f"sense dictionary: token {token} has NaN or inf sense vectors "
                                f"({bad.size} bad row(s) in all)")
        counts = np.zeros(S, np.int32) if counts is None else np.asarray(counts, np.int32)
        if counts.shape != (S,):
            raise SenseJaxError(f"sense dictionary: counts {counts.shape} do not match {S} centres")
        n = np.diff(offsets)
        return cls(centres=jnp.asarray(centres), offsets=jnp.asarray(offsets, jnp.int32),
                   counts=jnp.asarray(counts), k_max=max(int(n.max(initial=0)), 1),
                   meta_json=json.dumps(meta or {}, sort_keys=True))

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

    def nbytes(self) -> int:
        """Bytes of the arrays (centres + offsets + counts)."""
        return int(sum(np.dtype(a.dtype).itemsize * a.size for a in (self.centres, self.offsets, self.counts)))

    def token_senses(self, token_id: int) -> np.ndarray:
        """Token ``token_id``'s centres [K_t, D] as numpy."""
        o = np.asarray(self.offsets)
        return np.asarray(self.centres[o[token_id]:o[token_id + 1]])

    # --- persistence --------------------------------------------------------------------------

    def save(self, out: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False) -> Path:
        """Write ``senses.safetensors`` + ``meta.json`` to directory ``out`` atomically.

        Args:
          dtype: storage dtype of the centres ("float32", "bfloat16", "float16"); default: as held.
        """
        from safetensors.numpy import save_file

        centres = np.asarray(self.centres)
        if dtype is not None:
            if dtype not in DTYPES:
                raise SenseJaxError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
            centres = centres.astype(DTYPES[dtype])
        meta = dict(self.meta, dtype=str(centres.dtype), hidden_size=self.hidden_size,
                    vocab_size=self.vocab_size, n_senses_total=int(centres.shape[0]))
        with atomic_directory(out, overwrite=overwrite) as tmp:
            save_file({"centres": np.ascontiguousarray(centres),
                       "offsets": np.asarray(self.offsets, np.int64),
                       "counts": np.asarray(self.counts, np.int64)}, str(tmp / TENSORS_FILE))
            write_json_atomic(tmp / META_FILE, meta)
        return Path(out)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SenseDictionary":
        """Read a dictionary directory written by :meth:`save`.

        Raises:
          SenseJaxError: missing, truncated or inconsistent files (names the file).
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_dir():
            raise SenseJaxError(f"sense dictionary not found: {path}")
        meta = read_json(path / META_FILE, "sense dictionary metadata")
        f = path / TENSORS_FILE
        try:
            with safe_open(str(f), framework="np") as st:
                arrays = {k: st.get_tensor(k) for k in ("centres", "offsets", "counts")}
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
            return cls.from_arrays(c, o, arrays["counts"], meta)
        except SenseJaxError as e:
            raise SenseJaxError(f"{f}: {e}") from None

    def merged(self, update: "SenseDictionary") -> "SenseDictionary":
        """This dictionary with ``update``'s entries added (replacing this one's for those tokens).

        Tokens with an entry in ``update`` take ``update``'s senses; every other token keeps its
        own. Metadata is ``update``'s, with ``merged_from`` listing both store fingerprints.

        Raises:
          SenseJaxError: the two have a different hidden size (teacher width) or vocabulary size.
        """
        if update.hidden_size != self.hidden_size:
            raise SenseJaxError(f"cannot add senses of width {update.hidden_size} to a dictionary of "
                                f"width {self.hidden_size} (a store from another teacher?)")
        if update.vocab_size != self.vocab_size:
            raise SenseJaxError(f"cannot add senses over a vocabulary of {update.vocab_size} tokens to a "
                                f"dictionary over {self.vocab_size} (a store from another teacher?)")
        o_old, o_new = np.asarray(self.offsets), np.asarray(update.offsets)
        c_old, c_new = np.asarray(self.centres), np.asarray(update.centres)
        k_old, k_new = np.asarray(self.counts), np.asarray(update.counts)
        dtype = np.result_type(c_old.dtype, c_new.dtype)
        centres, counts, n = [np.zeros((0, self.hidden_size), dtype)], [np.zeros(0, np.int64)], []
        for t in range(self.vocab_size):
            o, c, k = (o_new, c_new, k_new) if o_new[t + 1] > o_new[t] else (o_old, c_old, k_old)
            centres.append(c[o[t]:o[t + 1]].astype(dtype))
            counts.append(k[o[t]:o[t + 1]])
            n.append(o[t + 1] - o[t])
        offsets = np.concatenate([[0], np.cumsum(n, dtype=np.int64)])
        centres, counts = np.concatenate(centres), np.concatenate(counts)
        meta = dict(update.meta)
        meta["merged_from"] = [self.meta.get("store_fingerprint"), update.meta.get("store_fingerprint")]
        return SenseDictionary.from_arrays(centres, offsets, counts, meta)


def gather_senses(sense_dict: SenseDictionary, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The padded codebook of each token.

    Args:
      sense_dict: the dictionary.
      token_ids: [...] int token ids (ids outside [0, V) have no entry).

    Returns:
      codebook [..., K_max, D] (centres' dtype; zeros at padding) and valid [..., K_max] bool
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
    codebook = jnp.where(valid[..., None], sense_dict.centres[rows], 0)
    return codebook, valid


def sense_scores(codebook: jax.Array, valid: jax.Array, hidden: jax.Array, metric: str = "dot") -> jax.Array:
    """Scores [..., K] of ``hidden`` [..., D] against ``codebook`` [..., K, D], in float32.

    ``dot``: <c, h>; ``cos``: <c, h> / (|c| |h|); ``l2``: -|c - h|^2. Padding slots get -inf.
    """
    c = codebook.astype(jnp.float32)
    h = hidden.astype(jnp.float32)
    s = jnp.einsum("...KD,...D->...K", c, h)
    if metric == "cos":
        norm = jnp.linalg.norm(c, axis=-1) * jnp.linalg.norm(h, axis=-1)[..., None]
        s = s / jnp.maximum(norm, 1e-12)
    elif metric == "l2":
        s = 2 * s - jnp.sum(c * c, axis=-1) - jnp.sum(h * h, axis=-1)[..., None]
    elif metric != "dot":
        raise SenseJaxError(f"unknown metric {metric!r}; choose from {METRICS}")
    return jnp.where(valid, s, -jnp.inf)


def _nearest_flat(sense_dict, token_ids, hidden, metric):
    codebook, valid = gather_senses(sense_dict, token_ids)
    has_entry = valid[..., 0]
    k = jnp.argmax(sense_scores(codebook, valid, hidden, metric), axis=-1).astype(jnp.int32)
    chosen = jnp.take_along_axis(codebook, k[..., None, None], axis=-2)[..., 0, :]
    replaced = jnp.where(has_entry[..., None], chosen.astype(hidden.dtype), hidden)
    return jnp.where(has_entry, k, -1), replaced, has_entry


def default_chunk(k_max: int, hidden_size: int, cache_bytes: int = 2 << 20) -> int:
    """Positions per look-up chunk: on CPU, enough that the gathered [chunk, K_max, D] f32
    codebook stays in cache (~2 MiB); elsewhere 0 (no chunking: one parallel gather)."""
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
