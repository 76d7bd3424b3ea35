"""The extraction store: per-token samples of teacher hidden states, on disk.

Layout of a store directory (every array a plain ``.npy``, memory-mapped on read; clustering
reads the vectors by rows instead, :meth:`Store.read_rows`)::

    vectors.npy   [S, D]  float32 | float16 | bfloat16 (stored as its uint16 bit pattern)
    offsets.npy   [V + 1] int64   token t's samples are rows offsets[t]:offsets[t + 1]
    counts.npy    [V]     int64   occurrences of token t in the corpus (not only the kept ones;
                                  ``Store.occurrences``: the file keeps its name of version 1)
    sources.npy   [S, 2]  int64   (passage index, token position) of each kept vector
    meta.json             teacher, layer, dtype, n_per_token, seed, corpus fingerprint, ...
    COMPLETE              written last; a store without it is incomplete and refused

Rows of one token are sorted by (passage index, token position), so the store's bytes depend
only on the corpus, the teacher and the seed.

Extraction writes a store in three moves (:class:`StoreWriter`): :meth:`StoreWriter.plan` writes
the index arrays and a zero-filled ``vectors.npy`` (into a temporary sibling, renamed into place);
the forward pass fills the vectors' rows in place through a memory map; :func:`complete_store`
writes ``meta.json`` and then the ``COMPLETE`` marker.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from numpy.lib.format import open_memmap

from sense_jax.errors import SenseJaxError
from sense_jax.io_utils import RowFile, atomic_directory, read_json, write_json_atomic

COMPLETE_MARKER = "COMPLETE"
# Every file of a store directory (what ``extract --overwrite`` may replace).
STORE_FILES = ("vectors.npy", "offsets.npy", "counts.npy", "sources.npy", "meta.json", COMPLETE_MARKER)
STORE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@dataclasses.dataclass
class Store:
    """Read access to a complete extraction store (arrays are read-only memory maps).

    Attributes:
      vectors: [S, D] samples in the stored dtype (bfloat16 via ml_dtypes).
      offsets: [V + 1] int64. occurrences: [V] int64 (``counts.npy``). sources: [S, 2] int64.
      meta: the store's metadata dict.
    """

    path: Path
    vectors: np.ndarray
    offsets: np.ndarray
    occurrences: np.ndarray
    sources: np.ndarray
    meta: dict
    _rows: RowFile | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def counts(self) -> np.ndarray:
        """The old name of :attr:`occurrences` (and still the file's: ``counts.npy``)."""
        return self.occurrences

    @property
    def vocab_size(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def hidden_size(self) -> int:
        return int(self.vectors.shape[1])

    def n_samples(self) -> np.ndarray:
        """Kept samples per token, [V] int64."""
        return np.diff(self.offsets)

    def token_ids(self) -> np.ndarray:
        """Ids of tokens with at least one kept sample, ascending."""
        return np.flatnonzero(self.n_samples() > 0)

    def token_vectors(self, token_id: int) -> np.ndarray:
        """Token ``token_id``'s samples [n_t, D] (a view into the memory map)."""
        return self.vectors[self.offsets[token_id]:self.offsets[token_id + 1]]

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of :attr:`vectors` as a new [stop - start, D] array, read with
        ``os.pread`` (:class:`sense_jax.io_utils.RowFile`) rather than through the memory map, so
        that a pass over the whole store (clustering) does not keep every page of it in the
        process's resident memory (the default run's store: 0.59 GB)."""
        if not isinstance(self.vectors, np.memmap):  # a Store built around in-memory arrays
            return np.array(self.vectors[start:stop])
        if self._rows is None:
            bf16 = self.meta.get("dtype") == "bfloat16"
            self._rows = RowFile(self.path / "vectors.npy", view=ml_dtypes.bfloat16 if bf16 else None)
        return self._rows.read(int(start), int(stop) - int(start))

    def token_sources(self, token_id: int) -> np.ndarray:
        """(passage index, position) [n_t, 2] of token ``token_id``'s samples."""
        return self.sources[self.offsets[token_id]:self.offsets[token_id + 1]]


def _load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise SenseJaxError(f"store file missing: {path}") from None
    except (ValueError, OSError) as e:
        raise SenseJaxError(f"store file {path} is unreadable or truncated ({e})") from None


def open_store(path: str | os.PathLike) -> Store:
    """Open a complete store for reading.

    Raises:
      SenseJaxError: the directory is missing, incomplete (no COMPLETE marker: an interrupted
        extraction), or its arrays are inconsistent (names the file).
    """
    path = Path(path)
    if not path.is_dir():
        raise SenseJaxError(f"store not found: {path}")
    if not (path / COMPLETE_MARKER).exists():
        raise SenseJaxError(f"{path} is not a complete store (no {COMPLETE_MARKER} marker; "
                            "re-run the extraction to finish it)")
    meta = read_json(path / "meta.json", "store metadata")
    dtype = meta.get("dtype", "float32")
    if dtype not in STORE_DTYPES:
        raise SenseJaxError(f"{path / 'meta.json'}: unknown dtype {dtype!r}")
    vectors = _load_npy(path / "vectors.npy")
    if dtype == "bfloat16":
        vectors = vectors.view(ml_dtypes.bfloat16)
    offsets = _load_npy(path / "offsets.npy", mmap=False)
    occurrences = _load_npy(path / "counts.npy", mmap=False)
    sources = _load_npy(path / "sources.npy")
    S = vectors.shape[0]
    if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != S or np.any(np.diff(offsets) < 0):
        raise SenseJaxError(f"{path / 'offsets.npy'} is inconsistent with vectors.npy ({S} rows)")
    if occurrences.shape != (offsets.shape[0] - 1,) or sources.shape != (S, 2):
        raise SenseJaxError(f"{path}: counts.npy / sources.npy shapes do not match offsets.npy")
    return Store(path, vectors, offsets, occurrences, sources, meta)


def write_store(out: str | os.PathLike, vectors: np.ndarray, offsets: np.ndarray,
                occurrences: np.ndarray, sources: np.ndarray, meta: dict[str, Any],
                *, overwrite: bool = False) -> Path:
    """Write a complete store from in-memory arrays, atomically (small stores, tests).

    ``occurrences`` [V]: each token's occurrences in the corpus (written as ``counts.npy``).
    ``meta["dtype"]`` selects the stored dtype (default float32). Extraction streams large
    stores into the same layout without holding them in RAM.
    """
    meta = dict(meta)
    dtype = meta.setdefault("dtype", "float32")
    if dtype not in STORE_DTYPES:
        raise SenseJaxError(f"unknown store dtype {dtype!r}; choose from {sorted(STORE_DTYPES)}")
    vectors = np.asarray(vectors).astype(STORE_DTYPES[dtype])
    if dtype == "bfloat16":
        vectors = vectors.view(np.uint16)
    meta.setdefault("hidden_size", int(vectors.shape[1]))
    meta.setdefault("vocab_size", int(len(offsets) - 1))
    with atomic_directory(out, overwrite=overwrite) as tmp:
        np.save(tmp / "vectors.npy", vectors)
        np.save(tmp / "offsets.npy", np.asarray(offsets, np.int64))
        np.save(tmp / "counts.npy", np.asarray(occurrences, np.int64))
        np.save(tmp / "sources.npy", np.asarray(sources, np.int64).reshape(-1, 2))
        write_json_atomic(tmp / "meta.json", meta)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
    return Path(out)


class StoreWriter:
    """Fills the ``vectors.npy`` of a planned store in place (a memory map opened ``r+``).

    Rows may be written in any order and more than once (a resumed extraction rewrites the rows
    of its unfinished window with the same values); :meth:`flush` makes them durable.
    """

    def __init__(self, path: str | os.PathLike, dtype: str):
        self.path = Path(path)
        self.dtype = dtype
        self.vectors = open_memmap(self.path / "vectors.npy", mode="r+")

    @staticmethod
    def plan(path: str | os.PathLike, offsets: np.ndarray, occurrences: np.ndarray, sources: np.ndarray,
             hidden_size: int, dtype: str) -> Path:
        """Create the store directory ``path`` with its index arrays and zero vectors.

        Args:
          offsets: [V + 1] int64. occurrences: [V] int64. sources: [S, 2] int64 (see the module
            docstring); ``vectors.npy`` gets [S, hidden_size] zeros of ``dtype`` (bfloat16 as
            uint16 bit patterns).

        Written into ``path.tmp-PID`` and renamed, so ``path`` exists only once it is whole.
        """
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "counts.npy", occurrences)
        np.save(tmp / "sources.npy", sources)
        np_dtype = np.uint16 if dtype == "bfloat16" else STORE_DTYPES[dtype]
        open_memmap(tmp / "vectors.npy", mode="w+", dtype=np_dtype,
                    shape=(len(sources), int(hidden_size))).flush()
        os.replace(tmp, path)
        return path

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Store ``values`` [n, D] (of the store's dtype) at ``rows`` [n] int."""
        self.vectors[rows] = values.view(np.uint16) if self.dtype == "bfloat16" else values

    def flush(self) -> None:
        self.vectors.flush()

    def close(self) -> None:
        self.vectors.flush()
        del self.vectors


def complete_store(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` and then the ``COMPLETE`` marker into a filled store directory."""
    path = Path(path)
    write_json_atomic(path / "meta.json", meta)
    (path / COMPLETE_MARKER).write_text("ok\n")
