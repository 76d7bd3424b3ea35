"""Multi-process helpers of extraction: gather, broadcast and barriers over ``jax.distributed``.

With one process every helper is a no-op that returns its input, so single-host code pays
nothing. With several, they wrap :mod:`jax.experimental.multihost_utils`; integers travel as
int32 words because JAX without x64 would narrow int64.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


def process_info() -> tuple[int, int]:
    """(this process's index, the number of processes)."""
    return jax.process_index(), jax.process_count()


def allgather_many(arrays: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    """Every process's ``arrays`` (any lengths along axis 0), as ``[process][array]``.

    All arrays travel packed in one int32 buffer (JAX without x64 would narrow int64), so a
    merge costs two collectives whatever the number of arrays.
    """
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


def broadcast_ints(values: Sequence[int]) -> list[int]:
    """Process 0's ``values`` (Python ints that fit int64) on every process: what process 0
    decided (a finished stage, an error) reaches the others, so no process waits forever."""
    if jax.process_count() == 1:
        return list(values)
    arr = np.asarray(values, np.int64).view(np.int32)
    return list(np.asarray(multihost_utils.broadcast_one_to_all(arr)).astype(np.int32).view(np.int64))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
