"""Read a sense dictionary with numpy alone (no JAX, no safetensors package, no sense_jax).

This file imports nothing but the standard library and numpy, so it can be copied next to a
PyTorch (or any) project and used as is. It reads the directory layout documented in sense_jax's
docs/senses.md ("Sense dictionary format"), format versions up to :data:`FORMAT_VERSION`:
``meta.json`` and ``senses.safetensors``, whose layout (an 8-byte little-endian header
length, a JSON header of ``{name: {dtype, shape, data_offsets}}``, then the raw little-endian
tensors) is parsed here directly, so bfloat16 centres need no ml_dtypes either.

Usage::

    from senses_numpy import load, token_senses, nearest_sense
    d = load("runs/pipeline/senses")          # centres [S, D] float32, offsets [V + 1] int64, ...
    c = token_senses(d, 2924)                 # [K_t, D] senses of token 2924
    k, replaced = nearest_sense(d, ids, hidden)  # ids [...], hidden [..., D]; k = -1 without entry

(Inside an environment that has sense_jax, ``SenseDictionary.to_numpy()`` returns the same dict.)
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
TENSORS_FILE = "senses.safetensors"
META_FILE = "meta.json"
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "I8": np.dtype("i1"),
           "I32": np.dtype("<i4"), "I64": np.dtype("<i8")}


def _read_safetensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """{name: (safetensors dtype, array)}; ValueError naming the file when it is malformed."""
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: truncated (no header)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError(f"{path}: truncated (header of {n} bytes)")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise ValueError(f"{path}: unreadable header ({e})") from None
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        dt = _DTYPES.get(info.get("dtype"))
        if dt is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if not 0 <= begin <= end <= len(body) or end - begin != dt.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{path}: tensor {name!r} truncated or inconsistent")
        out[name] = (info["dtype"], np.frombuffer(body[begin:end], dt).reshape(shape).copy())
    return out


def load(path: str | os.PathLike, *, dequantize: bool = True) -> dict:
    """Read a sense dictionary directory.

    Args:
      path: directory holding ``meta.json`` and ``senses.safetensors``.
      dequantize: return float32 centres (int8 centres times their per-sense scales, bfloat16 /
        float16 upcast). False: centres as stored (int8 with ``scales``; bfloat16 as its raw
        uint16 bits, float16 as is).

    Returns:
      dict with ``centres`` [S, D], ``offsets`` [V + 1] int64 (token t's senses are rows
      ``offsets[t]:offsets[t + 1]``), ``counts`` [S] int64 (samples per sense), ``meta``
      (``meta.json``), and ``scales`` [S] float32 when stored int8 and not dequantised.

    Raises:
      ValueError: missing or malformed files, or a ``format_version`` newer than this reader's.
    """
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / META_FILE}: cannot read sense dictionary metadata ({e})") from None
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path / META_FILE}: format_version {version!r} is newer than this reader "
                         f"({FORMAT_VERSION}); use a newer senses_numpy.py")
    try:
        tensors = _read_safetensors(path / TENSORS_FILE)
    except OSError as e:
        raise ValueError(f"{path / TENSORS_FILE}: cannot read ({e})") from None
    missing = {"centres", "offsets", "counts"} - set(tensors)
    if missing:
        raise ValueError(f"{path / TENSORS_FILE}: missing tensors {sorted(missing)}")
    kind, centres = tensors["centres"]
    offsets = tensors["offsets"][1].astype(np.int64)
    counts = tensors["counts"][1].astype(np.int64)
    if centres.ndim != 2 or offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != centres.shape[0] \
            or np.any(np.diff(offsets) < 0) or counts.shape != (centres.shape[0],):
        raise ValueError(f"{path / TENSORS_FILE}: offsets/counts do not index centres {centres.shape}")
    out = {"offsets": offsets, "counts": counts, "meta": meta}
    scales = tensors["scales"][1].astype(np.float32) if "scales" in tensors else None
    if kind == "I8" and (scales is None or scales.shape != (centres.shape[0],)):
        raise ValueError(f"{path / TENSORS_FILE}: int8 centres without [S] scales")
    if not dequantize:
        out["centres"] = centres
        if scales is not None:
            out["scales"] = scales
        return out
    if kind == "I8":
        centres = centres.astype(np.float32) * scales[:, None]
    elif kind == "BF16":  # bfloat16 is the top half of a float32
        centres = (centres.astype(np.uint32) << 16).view(np.float32)
    out["centres"] = centres.astype(np.float32)
    return out


def token_senses(d: dict, token_id: int) -> np.ndarray:
    """Token ``token_id``'s senses [K_t, D] (K_t = 0 when it has no entry)."""
    o = d["offsets"]
    return d["centres"][o[token_id]:o[token_id + 1]]


def nearest_sense(d: dict, token_ids, hidden, metric: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each hidden state replaced by its token's nearest sense (float32 scores).

    Args:
      d: a dequantised dictionary from :func:`load`.
      token_ids: [...] int. hidden: [..., D] float.
      metric: "dot", "cos" or "l2" (-|c - h|^2); default the dictionary's ``meta["metric"]``.

    Returns:
      (sense index [...] int64, -1 where the token has no entry; replaced [..., D] float32,
      the hidden state itself where there is no entry).
    """
    metric = metric or d["meta"].get("metric", "dot")
    if metric not in ("dot", "cos", "l2"):
        raise ValueError(f"unknown metric {metric!r}; choose dot, cos or l2")
    ids = np.asarray(token_ids, np.int64).reshape(-1)
    h = np.asarray(hidden, np.float32).reshape(ids.size, -1)
    C, o = d["centres"], d["offsets"]
    V, S = o.shape[0] - 1, C.shape[0]
    k = np.full(ids.size, -1, np.int64)
    out = h.copy()
    n_t = np.diff(o)
    K = max(int(n_t.max(initial=0)), 1)
    for a in range(0, ids.size, 4096):  # a padded [chunk, K_max, D] codebook at a time
        t = ids[a:a + 4096]
        inside = (t >= 0) & (t < V)
        tt = np.where(inside, t, 0)
        n = np.where(inside, n_t[tt], 0)
        valid = np.arange(K)[None, :] < n[:, None]
        cb = C[np.clip(o[tt][:, None] + np.arange(K)[None, :], 0, max(S - 1, 0))]  # [c, K, D]
        x = h[a:a + 4096, None, :]
        if metric == "l2":
            s = -np.sum((cb - x) ** 2, axis=-1)
        else:
            s = np.sum(cb * x, axis=-1)
            if metric == "cos":
                s = s / np.maximum(np.linalg.norm(cb, axis=-1) * np.linalg.norm(x, axis=-1), 1e-12)
        best = np.argmax(np.where(valid, s, -np.inf), axis=-1)
        has = n > 0
        k[a:a + 4096] = np.where(has, best, -1)
        out[a:a + 4096][has] = cb[has, best[has]]
    return k.reshape(np.shape(token_ids)), out.reshape(np.shape(hidden))
