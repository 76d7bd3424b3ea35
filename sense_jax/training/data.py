"""The training data: corpus reading, the position-addressable passage stream, tokenising.

Everything here is host-side numpy; :func:`tokenize` is the one place that turns text into
[B, T] int32 arrays (the multi-host test counts what each process tokenises through it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from sense_jax.batching import bucket_length
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
            ids = self.tok(self.passages, truncation=True, max_length=self.T)["input_ids"]
            self._lengths = np.array([len(x) for x in ids])
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
