"""Extraction's sampling keys and streaming bottom-N (sense_jax.sampling), numpy only: no model,
no corpus, no devices.

References: SplitMix64's published first output for seed 0 (Vigna, splitmix64.c), the key
formula written out with Python integers, and a brute-force sort of every token's occurrences.
"""

from __future__ import annotations

import numpy as np

from sense_jax.sampling import POSITION_BITS, BottomK, _mix64, occurrence_keys

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def _mix_int(x: int) -> int:
    """SplitMix64's finaliser on a Python int (arbitrary precision, masked to 64 bits)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def _key_int(seed: int, passage: int, position: int) -> int:
    s1 = _mix_int((seed * GOLDEN + GOLDEN) & MASK)
    s2 = _mix_int((seed * GOLDEN + 2 * GOLDEN) & MASK)
    return _mix_int(_mix_int(((passage << POSITION_BITS) | position) ^ s1) ^ s2)


def test_mix64_is_splitmix64():
    # splitmix64.c seeded with 0: state becomes GOLDEN, and its first output is 0xE220A8397B1DCDAF
    assert int(_mix64(np.array([GOLDEN], np.uint64))[0]) == 0xE220A8397B1DCDAF
    xs = [0, 1, 2, 12345, GOLDEN, MASK]
    assert [int(v) for v in _mix64(np.array(xs, np.uint64))] == [_mix_int(x) for x in xs]


def test_occurrence_keys_match_the_formula_by_hand():
    passage = np.array([0, 0, 1, 7, 123456], np.int64)
    position = np.array([0, 5, 0, 3, (1 << POSITION_BITS) - 1], np.int32)
    for seed in (0, 3, 2**40 + 1):
        keys = occurrence_keys(seed, passage, position)
        assert keys.dtype == np.uint64
        assert [int(k) for k in keys] == [_key_int(seed, int(p), int(i)) for p, i in zip(passage, position)]


def test_bottom_k_equals_a_brute_force_sort_in_any_chunking():
    # 3 tokens over 6 passages of 5 positions; token 2 occurs fewer times than k
    rng = np.random.default_rng(1)
    passage = np.repeat(np.arange(6), 5)
    position = np.tile(np.arange(5), 6)
    tok = rng.choice([0, 0, 0, 1, 1], size=30).astype(np.int32)
    tok[[4, 17]] = 2
    k, seed = 4, 9
    expected = []
    for t in range(3):
        occ = [(int(p), int(i)) for p, i, tt in zip(passage, position, tok) if tt == t]
        kept = sorted(occ, key=lambda o: _key_int(seed, *o))[:k]
        expected += [(t, p, i) for p, i in sorted(kept)]
    for chunk in (1, 4, 30):
        order = rng.permutation(30)
        s = BottomK(3, k, seed, merge_every=2)
        for lo in range(0, 30, chunk):
            idx = order[lo:lo + chunk]
            s.add(tok[idx], passage[idx], position[idx])
        got_tok, got_p, got_i = s.result()
        assert got_tok.dtype == np.int32 and got_p.dtype == np.int64 and got_i.dtype == np.int32
        assert list(zip(got_tok.tolist(), got_p.tolist(), got_i.tolist())) == expected
    assert sum(t == 2 for t, _, _ in expected) == 2  # min(count, k)
