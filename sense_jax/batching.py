"""Length bucketing: few distinct shapes (one compile each) and little padding.

Passages are sorted by token length and cut into batches; each batch is padded to the smallest
bucket length that holds its longest passage. Or (:func:`pack_passages`) several passages share
a row of one fixed length, told apart by segment ids. Everything here is deterministic.
"""

from __future__ import annotations

import dataclasses
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


# --- Sequence packing -------------------------------------------------------------------------
# Several passages per row, each a contiguous run with its own segment id (1..S; 0 = padding), as
# T5X / MaxText pack; the models mask attention within segments and restart positions (see
# ``segment_ids`` in :mod:`sense_jax.models`). One row length means one program for any mix of
# passage lengths, and little padding.


@dataclasses.dataclass(frozen=True)
class Packing:
    """Where :func:`pack_passages` put each passage.

    Attributes:
      row_length: T, tokens per row.
      lengths: [N] int64, the passage lengths packed.
      row: [N] int64, the row of passage i.
      offset: [N] int64, its first position in the row (it fills ``offset .. offset + len - 1``).
      segment: [N] int32, its segment id in the row (1 = first placed there).
      row_tokens: [R] int64, real tokens per row (``T - row_tokens`` is the row's padding).
    """

    row_length: int
    lengths: np.ndarray
    row: np.ndarray
    offset: np.ndarray
    segment: np.ndarray
    row_tokens: np.ndarray

    @property
    def n_rows(self) -> int:
        return len(self.row_tokens)

    @property
    def segment_ids(self) -> np.ndarray:
        """[R, T] int32: the segment id of every position, 0 at padding."""
        out = np.zeros((self.n_rows, self.row_length), np.int32)
        lengths = self.lengths
        for i in range(len(self.row)):
            out[self.row[i], self.offset[i]:self.offset[i] + lengths[i]] = self.segment[i]
        return out

    @property
    def padding_fraction(self) -> float:
        """Padding positions over all positions of the rows."""
        total = self.n_rows * self.row_length
        return float(1.0 - self.row_tokens.sum() / total) if total else 0.0


def pack_passages(lengths: Sequence[int], row_length: int) -> Packing:
    """Pack passages of ``lengths`` tokens into rows of ``row_length`` tokens, first-fit decreasing.

    Passages are taken longest first (ties: lower index first, a stable sort) and each goes to
    the first row (in creation order) with room for it, after the passages already there; a new
    row is opened when none has room. Deterministic: a pure function of ``lengths`` and
    ``row_length``. First-fit decreasing uses at most 11/9 · OPT + 6/9 rows (Dósa 2007).

    Args:
      lengths: [N] passage lengths in tokens, each in ``1 .. row_length``.
      row_length: T, tokens per row.

    Returns:
      a :class:`Packing` (per passage: row, offset, segment id; per row: tokens used).

    Raises:
      ValueError: a length is < 1 or > ``row_length``.
    """
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    T = int(row_length)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > T):
        bad = int(np.flatnonzero((lengths < 1) | (lengths > T))[0])
        raise ValueError(f"passage {bad} has {int(lengths[bad])} tokens; rows hold 1..{T}")
    N = len(lengths)
    row = np.zeros(N, np.int64)
    offset = np.zeros(N, np.int64)
    segment = np.zeros(N, np.int32)
    fill = np.zeros(max(N, 1), np.int64)   # tokens used per row (first n_rows entries live)
    count = np.zeros(max(N, 1), np.int32)  # passages per row
    n_rows = 0
    for i in np.argsort(-lengths, kind="stable"):
        n = lengths[i]
        fits = np.flatnonzero(fill[:n_rows] + n <= T)
        r = int(fits[0]) if len(fits) else n_rows
        n_rows = max(n_rows, r + 1)
        row[i], offset[i] = r, fill[r]
        count[r] += 1
        segment[i] = count[r]
        fill[r] += n
    return Packing(T, lengths, row, offset, segment, fill[:n_rows].copy())


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """One batch of packed rows (:func:`packed_batches`).

    Attributes:
      input_ids: [R, T] int32, the passages' ids at their offsets, ``pad_id`` elsewhere.
      segment_ids: [R, T] int32, 1..S per passage of a row, 0 at padding (rows past the last
        passage are all padding: every batch has the same shape).
      items: [n] int64, the passages of this batch (indices into the ``seqs`` given).
      row: [n] int64, the row of each, within this batch.
      offset: [n] int64, its first position in that row.
    """

    input_ids: np.ndarray
    segment_ids: np.ndarray
    items: np.ndarray
    row: np.ndarray
    offset: np.ndarray

    @property
    def attention_mask(self) -> np.ndarray:
        """[R, T] int32: 1 at a passage's tokens, 0 at padding."""
        return (self.segment_ids > 0).astype(np.int32)

    def states_of(self, h: np.ndarray, lengths: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
        """``(passage, its states [n_i, ...])`` for every passage of the batch, from the model's
        output ``h`` [R, T, ...] on this batch; ``lengths`` are all passages' lengths."""
        for i, r, o in zip(self.items, self.row, self.offset):
            yield int(i), h[r, o:o + lengths[i]]


def packed_batches(seqs: Sequence[Sequence[int]], row_length: int, rows_per_batch: int,
                   pad_id: int = 0) -> Iterator[PackedBatch]:
    """Token id sequences packed several to a row (:func:`pack_passages`) in batches of a fixed
    shape [rows_per_batch, row_length]: one compiled program for any mix of lengths.

    Rows are taken in :func:`pack_passages`' order, ``rows_per_batch`` at a time; the last batch
    is filled with empty rows. A model run on ``input_ids`` with ``segment_ids`` (attention within
    a passage, positions restarting at each) gives each passage the states it has alone, within
    float rounding (tests/test_packing.py).

    Args:
      seqs: N sequences of 1..``row_length`` token ids.
      row_length: T, tokens per row.
      rows_per_batch: R, rows per batch.
      pad_id: the id at padding positions.

    Raises:
      ValueError: a sequence is empty or longer than ``row_length``.
    """
    lengths = np.array([len(s) for s in seqs], np.int64)
    if not len(lengths):
        return
    pk = pack_passages(lengths, row_length)
    seg = pk.segment_ids
    by_row = np.argsort(pk.row, kind="stable")
    starts = np.searchsorted(pk.row[by_row], np.arange(0, pk.n_rows + rows_per_batch, rows_per_batch))
    for b, r0 in enumerate(range(0, pk.n_rows, rows_per_batch)):
        items = by_row[starts[b]:starts[b + 1]]
        ids = np.full((rows_per_batch, row_length), pad_id, np.int32)
        segment_ids = np.zeros((rows_per_batch, row_length), np.int32)
        n = min(rows_per_batch, pk.n_rows - r0)
        segment_ids[:n] = seg[r0:r0 + n]
        row, offset = pk.row[items] - r0, pk.offset[items]
        for i, r, o in zip(items, row, offset):
            ids[r, o:o + lengths[i]] = seqs[i]
        yield PackedBatch(ids, segment_ids, items, row, offset)
