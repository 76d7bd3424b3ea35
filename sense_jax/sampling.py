"""Sampling for extraction (METHOD.md §1): per-token bottom-N over 64-bit occurrence keys.

Every token occurrence, named by (passage index p, token position i), gets the 64-bit key
``k = mix(mix((p << 20 | i) ^ s1) ^ s2)`` where ``mix`` is the SplitMix64 finaliser (a bijection
on uint64; Steele, Lea and Flood 2014) and s1, s2 derive from the seed. Token t keeps the
min(count_t, N) occurrences with the smallest keys. Keys of distinct occurrences are distinct
(composition of bijections), so the selection is well defined; with keys behaving as i.i.d.
uniform draws, the bottom-N of any fixed set is a uniform sample without replacement. Because a
key depends only on the occurrence, the sample does not depend on batch size, order, devices or
processes, and the bottom-N of a union is the bottom-N of the parts' bottom-N (exact merging
across processes).

Pure numpy: no JAX, no I/O; :mod:`sense_jax.extract` feeds it.
"""

from __future__ import annotations

import numpy as np

SAMPLER = "bottom-k splitmix64 v1"
POSITION_BITS = 20  # token positions < 2**20 (1M tokens per passage)

_U64 = np.uint64
_M1, _M2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


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
