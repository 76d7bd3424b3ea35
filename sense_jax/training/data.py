"""The training data: corpus reading, the position-addressable passage stream, tokenising.

Everything here is host-side numpy; :func:`tokenize` is the one place that turns text into
[B, T] int32 arrays (the multi-host test counts what each process tokenises through it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from sense_jax.batching import bucket_length, pack_passages
from sense_jax.corpus import iter_passages
from sense_jax.errors import ConfigError, SenseJaxError


def read_passages(path: str, text_field: str = "text") -> list[str]:
    """All passages of a corpus (text lines, JSONL, directory, compressed) via ``sense_jax.corpus``,
    which decides byte-order marks, line ends and damaged files (see its docstring)."""
    if not Path(path).exists():
        raise SenseJaxError(f"corpus not found: {path}")
    passages = list(iter_passages(path, text_field=text_field))
    if not passages:
        raise SenseJaxError(f"corpus {path} holds no passages")
    return passages


class PassageStream:
    """A deterministic, position-addressable stream of tokenised micro-batches.

    Epoch e visits the N passages in the order ``default_rng([seed, e]).permutation(N)`` in
    ``M = ceil(N / B)`` micro-batches; the last one is filled up with the epoch's first passages,
    so every passage is seen at least once per epoch and shapes stay fixed. Micro-batch j is
    micro-batch ``j % M`` of epoch ``j // M``: the data position is one integer (micro-batches
    consumed) and resuming skips nothing.

    With ``group_window = W > 0`` (length grouping, as transformers' ``group_by_length``), each
    window of W consecutive micro-batches of an epoch holds the same passages, but sorted by token
    length before being cut into micro-batches, whose order inside the window is then shuffled
    (seeded). Padding drops several-fold; what an epoch sees is unchanged.
    """

    def __init__(self, passages: Sequence[str], tokenizer: Any, batch_size: int, max_length: int,
                 seed: int, group_window: int = 0):
        if not passages:
            raise SenseJaxError("no training passages")
        self.passages, self.tok = list(passages), tokenizer
        self.B, self.T, self.seed, self.W = batch_size, max_length, seed, group_window
        self.per_epoch = -(-len(self.passages) // batch_size)  # M
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._lengths: np.ndarray | None = None
        self._window: tuple[tuple[int, int], np.ndarray] | None = None

    def _perm(self, epoch: int) -> np.ndarray:
        """The epoch's visiting order, padded to M·B by wrapping around."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.passages))
            self._perm_cache = (epoch, np.resize(order, self.per_epoch * self.B))
        return self._perm_cache[1]

    def indices(self, j: int) -> np.ndarray:
        """Passage indices of micro-batch ``j`` [B]."""
        B, W = self.B, self.W
        epoch, r = divmod(j, self.per_epoch)
        order = self._perm(epoch)
        if not W:
            return order[r * B:(r + 1) * B]
        w, r_in = divmod(r, W)
        if self._window is None or self._window[0] != (epoch, w):
            items = order[w * W * B:(w + 1) * W * B]
            batches = items[np.argsort(self.lengths()[items], kind="stable")].reshape(-1, B)
            shuffle = np.random.default_rng([self.seed, epoch, 1 << 21, w]).permutation(len(batches))
            self._window = ((epoch, w), batches[shuffle])
        return self._window[1][r_in]

    def micro_batch(self, j: int, length: int | None = None, rows: slice | None = None
                    ) -> dict[str, np.ndarray]:
        """Micro-batch ``j``: ``input_ids``, ``attention_mask``, ``token_type_ids`` [B, T] int32.

        ``T`` is ``length`` if given, else ``max_length``. With ``rows`` only those rows of the
        micro-batch are tokenised and returned ([rows, T]: a process's part, see
        :func:`process_rows`).
        """
        texts = self.texts(j)
        return tokenize(self.tok, texts if rows is None else texts[rows], length or self.T)

    def texts(self, j: int) -> list[str]:
        return [self.passages[i] for i in self.indices(j)]

    def lengths(self) -> np.ndarray:
        """Token length of every passage after truncation [N] (tokenised once, on first use)."""
        if self._lengths is None:
            self._lengths = truncated_lengths(self.tok, self.passages, self.T)
        return self._lengths

    def step_batches(self, j: int, n: int, buckets: bool, rows: slice | None = None
                     ) -> list[dict[str, np.ndarray]]:
        """Micro-batches ``j .. j + n - 1`` padded to one length: the smallest bucket of
        :data:`sense_jax.batching.DEFAULT_BUCKETS` holding their longest passage (capped at
        ``max_length``) when ``buckets``, else ``max_length``. Few shapes, one compile each.

        With ``rows`` (multi-host: this process's rows) only those rows are tokenised; the pad
        length is still the whole micro-batches' (from the cached :meth:`lengths`), so that every
        process pads alike."""
        length = self.T
        if buckets:
            longest = max(int(self.lengths()[self.indices(m)].max()) for m in range(j, j + n))
            length = min(bucket_length(longest), self.T)
        return [self.micro_batch(m, length, rows) for m in range(j, j + n)]


def truncated_lengths(tokenizer: Any, passages: Sequence[str], max_length: int) -> np.ndarray:
    """Tokens of each passage after truncation to ``max_length``, special tokens included [N] int64
    (as :func:`tokenize` makes them)."""
    ids = tokenizer(list(passages), truncation=True, max_length=max_length)["input_ids"]
    return np.array([len(x) for x in ids], np.int64)


class PackedStream:
    """A deterministic, position-addressable stream of packed micro-batches (``pack_length`` > 0).

    Several passages share a row of ``L = pack_length`` tokens, each a contiguous run with its
    own segment id (1, 2, ... from the row's start; 0 = padding), as T5X / MaxText pack; the
    models mask attention within segments and restart positions (``segment_ids`` in
    :mod:`sense_jax.models`). Every micro-batch is [B, L] whatever its passages' lengths: one
    train-step program per run, and padding only at the rows' ends.

    The rows: the N passages (truncated to ``max_length``) are packed first-fit decreasing
    (:func:`sense_jax.batching.pack_passages`) once, which fixes R rows of "slots" (a slot is a
    length, a row and an offset; FFD's slots depend only on the sorted lengths). Epoch e gives
    the slots of each length to the passages of that length in the epoch's order
    ``default_rng([seed, e]).permutation(N)`` (PassageStream's), and visits the R rows in the
    order ``default_rng([seed, e, 2**22]).permutation(R)``, cut into ``M = ceil(R / B)``
    micro-batches of B rows; the last is filled up with the epoch's first rows. So every epoch
    has the same R (``per_epoch`` is fixed: the data position is one integer, micro-batches
    consumed, as for PassageStream, and resuming skips nothing), sees every passage exactly
    once (plus the fill), and mixes passages of equal length across rows from epoch to epoch.
    A row's passages do not affect each other (attention stays within a segment), so what a
    passage contributes to the loss is the same as unpacked; which passages share a step is
    what changes.

    ``batch_size`` counts rows. Multi-host: ``rows`` (this process's rows of a micro-batch,
    :func:`~sense_jax.sharding.process_rows`) selects the passages that this process tokenises.
    """

    def __init__(self, passages: Sequence[str], tokenizer: Any, batch_size: int, max_length: int,
                 pack_length: int, seed: int):
        if not passages:
            raise SenseJaxError("no training passages")
        if pack_length < max_length:
            raise ConfigError(f"config: pack_length={pack_length}: must be >= max_length={max_length}")
        self.passages, self.tok = list(passages), tokenizer
        self.B, self.T, self.L, self.seed = batch_size, max_length, pack_length, seed
        self._lengths: np.ndarray | None = None
        self._slots: tuple[np.ndarray, np.ndarray, int] | None = None
        self._epoch: tuple[int, tuple] | None = None

    def lengths(self) -> np.ndarray:
        """Token length of every passage after truncation [N] (tokenised once, on first use)."""
        if self._lengths is None:
            self._lengths = truncated_lengths(self.tok, self.passages, self.T)
        return self._lengths

    def _plan(self) -> tuple[np.ndarray, np.ndarray, int]:
        """``(row, offset, R)`` of FFD's k-th placed slot [N], once per stream."""
        if self._slots is None:
            lengths = self.lengths()
            pk = pack_passages(lengths, self.L)
            placed = np.argsort(-lengths, kind="stable")  # the order pack_passages placed them
            self._slots = (pk.row[placed], pk.offset[placed], pk.n_rows)
        return self._slots

    @property
    def rows_per_epoch(self) -> int:
        """R, packed rows per epoch (the same every epoch)."""
        return self._plan()[2]

    @property
    def per_epoch(self) -> int:
        """M = ceil(R / B), micro-batches per epoch."""
        return -(-self.rows_per_epoch // self.B)

    @property
    def padding_fraction(self) -> float:
        """Padding positions over all positions of an epoch's R rows."""
        return float(1.0 - self.lengths().sum() / (self.rows_per_epoch * self.L))

    def _epoch_rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(passage, offset, starts)`` of an epoch: passages sorted by (row's place in the epoch,
        offset); the epoch's q-th row holds ``passage[starts[q]:starts[q + 1]]``."""
        if self._epoch is None or self._epoch[0] != epoch:
            lengths = self.lengths()
            row, offset, R = self._plan()
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.passages))
            holder = order[np.argsort(-lengths[order], kind="stable")]  # slot k's passage this epoch
            place = np.empty(R, np.int64)
            place[np.random.default_rng([self.seed, epoch, 1 << 22]).permutation(R)] = np.arange(R)
            by = np.lexsort((offset, place[row]))
            starts = np.searchsorted(place[row][by], np.arange(R + 1))
            self._epoch = (epoch, (holder[by], offset[by], starts))
        return self._epoch[1]

    def layout(self, j: int, rows: slice | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Micro-batch ``j``'s passages: ``(passage indices, row, offset)`` [n] int64, rows in
        ``0 .. B - 1`` (with ``rows``: only those rows', numbered from ``rows.start``), each
        row's passages by offset."""
        epoch, r = divmod(j, self.per_epoch)
        passage, offset, starts = self._epoch_rows(epoch)
        R = self.rows_per_epoch
        lo, hi = (0, self.B) if rows is None else (rows.start, rows.stop)
        parts = [(passage[starts[q]:starts[q + 1]], offset[starts[q]:starts[q + 1]], i - lo)
                 for i, q in ((i, (r * self.B + i) % R) for i in range(lo, hi))]
        if not parts:
            return (np.zeros(0, np.int64),) * 3
        return (np.concatenate([p for p, _, _ in parts]),
                np.concatenate([np.full(len(p), i, np.int64) for p, _, i in parts]),
                np.concatenate([o for _, o, _ in parts]))

    def indices(self, j: int) -> np.ndarray:
        """Passage indices of micro-batch ``j`` [n], row by row."""
        return self.layout(j)[0]

    def micro_batch(self, j: int, rows: slice | None = None) -> dict[str, np.ndarray]:
        """Micro-batch ``j`` as [B, L] int32 arrays (:func:`packed_rows`; with ``rows`` only those
        rows, [rows, L]: a process's part)."""
        passage, row, offset = self.layout(j, rows)
        n_rows = self.B if rows is None else rows.stop - rows.start
        return packed_rows(self.tok, [self.passages[i] for i in passage], row, offset, n_rows, self.L, self.T)

    def step_batches(self, j: int, n: int, buckets: bool = False, rows: slice | None = None
                     ) -> list[dict[str, np.ndarray]]:
        """Micro-batches ``j .. j + n - 1`` ([B, L] each; ``buckets`` is moot: one shape)."""
        del buckets
        return [self.micro_batch(m, rows) for m in range(j, j + n)]


def place_in_rows(values: np.ndarray, lengths: np.ndarray, row: np.ndarray, offset: np.ndarray,
                  shape: tuple[int, int], fill) -> np.ndarray:
    """Packed rows from per-passage arrays: passage i's first ``lengths[i]`` positions of
    ``values[i]`` ([n, T, ...]) go to row ``row[i]`` at ``offset[i]`` of a ``shape`` = (rows, L)
    array (``fill`` elsewhere). Returns [rows, L, ...] of ``values``' dtype."""
    out = np.full(tuple(shape) + values.shape[2:], fill, values.dtype)
    inside = np.arange(values.shape[1])[None, :] < lengths[:, None]                  # [n, T]
    out[np.broadcast_to(row[:, None], inside.shape)[inside],
        (offset[:, None] + np.arange(values.shape[1])[None, :])[inside]] = values[inside]
    return out


def packed_rows(tokenizer: Any, texts: Sequence[str], row: np.ndarray, offset: np.ndarray, n_rows: int,
                pack_length: int, max_length: int) -> dict[str, np.ndarray]:
    """Packed rows of ``texts``: text i (tokenised by :func:`tokenize`, truncated to ``max_length``)
    at row ``row[i]``, positions ``offset[i] ..``.

    Returns:
      ``input_ids`` (the tokenizer's pad id at padding), ``attention_mask`` (1 at real tokens),
      ``token_type_ids``, ``segment_ids`` (1, 2, ... per row in offset order, 0 at padding):
      [n_rows, pack_length] int32.

    Raises:
      SenseJaxError: a passage overruns its row or the next passage (its tokenisation disagrees
        with the lengths the rows were planned with).
    """
    row, offset = np.asarray(row, np.int64), np.asarray(offset, np.int64)
    enc = tokenize(tokenizer, texts, max_length)
    n = enc["attention_mask"].sum(1).astype(np.int64)
    order = np.lexsort((offset, row))
    end = offset + n
    overrun = end > pack_length
    overrun[order[:-1]] |= (row[order[:-1]] == row[order[1:]]) & (end[order[:-1]] > offset[order[1:]])
    if overrun.any():
        i = int(np.flatnonzero(overrun)[0])
        raise SenseJaxError(f"passage {texts[i][:40]!r}: {int(n[i])} tokens overrun its place in a packed "
                            f"row of {pack_length} (offset {int(offset[i])}); the tokenizer changed its lengths")
    segment = np.zeros(len(row), np.int32)
    first = np.r_[True, row[order][1:] != row[order][:-1]] if len(row) else np.zeros(0, bool)
    run_start = np.maximum.accumulate(np.where(first, np.arange(len(row)), 0)) if len(row) else first
    segment[order] = np.arange(len(row)) - run_start + 1
    shape = (n_rows, pack_length)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    out = {"input_ids": place_in_rows(enc["input_ids"], n, row, offset, shape, pad),
           "token_type_ids": place_in_rows(enc["token_type_ids"], n, row, offset, shape, 0)}
    seg = np.broadcast_to(segment[:, None], enc["input_ids"].shape).astype(np.int32)
    out["segment_ids"] = place_in_rows(seg, n, row, offset, shape, 0)
    out["attention_mask"] = (out["segment_ids"] > 0).astype(np.int32)
    return out


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int | None = None) -> dict:
    """Pad/truncate ``texts`` to [batch_size or len(texts), max_length] int32 arrays (extra rows empty)."""
    B = batch_size or len(texts)
    if not texts:  # a process whose rows of a short last batch are all empty
        return {k: np.zeros((B, max_length), np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length",
                    return_tensors="np")
    out = {}
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        a = np.asarray(enc[k], np.int32) if k in enc else np.zeros((len(texts), max_length), np.int32)
        full = np.zeros((B, max_length), np.int32)
        full[:len(texts)] = a
        out[k] = full
    return out



def eval_batches(tokenizer: Any, passages: Sequence[str], batch_size: int, max_length: int, n_batches: int,
                 rows: slice) -> Iterator[dict[str, np.ndarray]]:
    """This process's ``rows`` of the first ``n_batches`` held-out batches of ``batch_size``
    passages, each padded to [rows, max_length] (:func:`tokenize`)."""
    B = batch_size
    for i in range(0, min(len(passages), B * n_batches), B):
        yield tokenize(tokenizer, list(passages[i:i + B])[rows], max_length, batch_size=rows.stop - rows.start)


def packed_eval_batches(tokenizer: Any, passages: Sequence[str], batch_size: int, max_length: int,
                        pack_length: int, n_batches: int, rows: slice) -> Iterator[dict[str, np.ndarray]]:
    """:func:`eval_batches` packed: the same held-out passages (the first ``batch_size x
    n_batches``), packed first-fit decreasing into rows of ``pack_length``
    (:func:`~sense_jax.batching.pack_passages`), in batches of ``batch_size`` rows (the last
    filled up with empty rows); this process's ``rows`` of each, [rows, pack_length]
    (:func:`packed_rows`)."""
    passages = list(passages[:batch_size * n_batches])
    if not passages:
        return
    pk = pack_passages(truncated_lengths(tokenizer, passages, max_length), pack_length)
    lo, hi = rows.start, rows.stop
    for first in range(0, pk.n_rows, batch_size):
        mine = np.flatnonzero((pk.row >= first + lo) & (pk.row < first + hi))
        yield packed_rows(tokenizer, [passages[i] for i in mine], pk.row[mine] - first - lo, pk.offset[mine],
                          hi - lo, pack_length, max_length)


def split_held_out(passages: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train, held_out)``: ``int(N * fraction)`` passages chosen with ``seed`` held out (in
    corpus order), the rest kept for training in corpus order."""
    passages = list(passages)
    n_eval = int(len(passages) * fraction)
    if not n_eval:
        return passages, []
    order = np.random.default_rng([seed, 1 << 20]).permutation(len(passages))
    held = set(order[:n_eval].tolist())
    return [p for i, p in enumerate(passages) if i not in held], [passages[i] for i in sorted(held)]


def run_passages(cfg: Any, passages: Sequence[str] | None = None,
                 eval_passages: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` passages of a run (a ``DistillConfig``): given, or read from the
    config's corpora, with ``eval_fraction`` held out (:func:`split_held_out`) when there is no
    ``eval_data``. The training loop, ``steps_for_epochs`` and the teacher cache all split alike.

    Raises:
      ConfigError: no ``train_data`` and no passages given. SenseJaxError: a corpus is missing
        or empty (named).
    """
    if passages is None:
        if not cfg.train_data:
            raise ConfigError("config: train_data is required")
        passages = read_passages(cfg.train_data, cfg.text_field)
    passages = list(passages)
    if eval_passages is None:
        if cfg.eval_data:
            eval_passages = read_passages(cfg.eval_data, cfg.text_field)
        else:
            passages, eval_passages = split_held_out(passages, cfg.eval_fraction, cfg.seed)
    return passages, eval_passages
