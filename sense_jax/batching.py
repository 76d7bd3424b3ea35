"""Length bucketing: few distinct shapes (one compile each) and little padding.

Passages are sorted by token length and cut into batches; each batch is padded to the smallest
bucket length that holds its longest passage. Everything here is deterministic.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

DEFAULT_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket >= n (n itself, rounded up to a multiple of 64, beyond the last bucket)."""
    for b in buckets:
        if n <= b:
            return int(b)
    return int(-(-n // 64) * 64)


def pad_batch(seqs: Sequence[Sequence[int]], length: int, pad_id: int = 0,
              batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ragged id lists to ``[batch_size or len(seqs), length]``.

    Returns:
      input_ids [B, L] int32 (``pad_id`` at padding) and attention_mask [B, L] int32. Extra rows
      (when ``batch_size > len(seqs)``) are all padding with an all-zero mask.

    Raises:
      ValueError: a sequence is longer than ``length``.
    """
    B = batch_size or len(seqs)
    ids = np.full((B, length), pad_id, np.int32)
    mask = np.zeros((B, length), np.int32)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence {i} has {len(s)} tokens, longer than {length}")
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask


def length_bucketed_batches(lengths: Sequence[int], batch_size: int,
                            buckets: Sequence[int] = DEFAULT_BUCKETS) -> Iterator[tuple[np.ndarray, int]]:
    """Yield ``(indices, padded_length)`` batches over items sorted by length (stable).

    Every index appears exactly once; batches hold at most ``batch_size`` items.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, bucket_length(int(lengths[idx].max()), buckets)
