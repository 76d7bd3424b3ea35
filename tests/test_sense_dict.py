"""SenseDictionary (sense_jax.sense_dict): storage, persistence, merging and nearest-sense look-up
against a per-token numpy loop."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sense_jax.errors import SenseJaxError
from sense_jax.sense_dict import META_FILE, TENSORS_FILE, SenseDictionary, gather_senses, nearest_sense

V, D = 12, 6


def random_dict(seed=0, *, n=None, dtype=np.float32):
    rng = np.random.default_rng(seed)
    n = np.array([0, 3, 1, 5, 0, 2, 4, 0, 1, 5, 3, 2]) if n is None else np.asarray(n)
    offsets = np.concatenate([[0], np.cumsum(n)])
    centres = rng.normal(size=(offsets[-1], D)).astype(dtype)
    counts = rng.integers(1, 50, offsets[-1])
    return SenseDictionary.from_arrays(centres, offsets, counts, {"teacher": "t", "seed": seed})


def reference_nearest(sd, ids, hidden, metric):
    """Per-token Python loop: what the reference implementation does, slowly."""
    C = np.asarray(sd.centres, np.float32)
    o = np.asarray(sd.offsets)
    idx = np.full(ids.shape, -1)
    out = hidden.copy()
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            tok = ids[b, t]
            if not 0 <= tok < sd.vocab_size or o[tok + 1] == o[tok]:
                continue
            c, h = C[o[tok]:o[tok + 1]], hidden[b, t]
            if metric == "dot":
                s = c @ h
            elif metric == "cos":
                s = c @ h / (np.linalg.norm(c, axis=1) * np.linalg.norm(h))
            else:
                s = -np.sum((c - h) ** 2, axis=1)
            idx[b, t] = int(np.argmax(s))
            out[b, t] = c[idx[b, t]]
    return idx, out


@pytest.mark.parametrize("metric", ["dot", "cos", "l2"])
def test_nearest_sense_matches_per_token_loop(metric):
    sd = random_dict()
    rng = np.random.default_rng(1)
    ids = rng.integers(-2, V + 3, size=(4, 9))  # includes ids without entry and out of range
    hidden = rng.normal(size=(4, 9, D)).astype(np.float32)
    k, replaced, has = nearest_sense(sd, jnp.asarray(ids, jnp.int32), jnp.asarray(hidden), metric=metric)
    ref_k, ref_out = reference_nearest(sd, ids, hidden, metric)
    np.testing.assert_array_equal(np.asarray(k), ref_k)
    np.testing.assert_allclose(np.asarray(replaced), ref_out, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(has), ref_k >= 0)
    # Chunked look-up (lax.map over position chunks, with a ragged last chunk) == unchunked.
    for chunk in (0, 8):
        other = nearest_sense(sd, jnp.asarray(ids, jnp.int32), jnp.asarray(hidden), metric=metric, chunk=chunk)
        for u, v in zip(other, (k, replaced, has)):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # Tokens without an entry keep their hidden state exactly.
    np.testing.assert_array_equal(np.asarray(replaced)[ref_k < 0], hidden[ref_k < 0])


def test_padding_never_wins_when_all_real_scores_are_negative():
    # Every sense points away from h, so every real dot score is negative; a padding slot scored
    # 0 (the reference's bug) would win.
    n = np.array([1, 2, 3, 10])
    offsets = np.concatenate([[0], np.cumsum(n)])
    rng = np.random.default_rng(2)
    h = np.abs(rng.normal(size=(1, 4, D))).astype(np.float32) + 0.1
    centres = -np.abs(rng.normal(size=(offsets[-1], D))).astype(np.float32)
    sd = SenseDictionary.from_arrays(centres, offsets)
    assert sd.k_max == 10
    ids = np.arange(4)[None]
    for metric in ("dot", "cos"):
        k, replaced, has = nearest_sense(sd, jnp.asarray(ids, jnp.int32), jnp.asarray(h), metric=metric)
        assert np.all(np.asarray(k) < n) and np.all(np.asarray(k) >= 0) and np.all(np.asarray(has))
        ref_k, ref_out = reference_nearest(sd, ids, h, metric)
        np.testing.assert_array_equal(np.asarray(k), ref_k)
        np.testing.assert_allclose(np.asarray(replaced), ref_out)


def test_gather_senses_pads_with_invalid_slots():
    sd = random_dict()
    codebook, valid = gather_senses(sd, jnp.asarray([[1, 4, 13, -1]], jnp.int32))
    np.testing.assert_array_equal(np.asarray(valid).sum(-1), [[3, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(codebook[0, 0, :3]), sd.token_senses(1))
    assert np.all(np.asarray(codebook)[~np.asarray(valid)] == 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_save_load_roundtrip(tmp_path, dtype):
    sd = random_dict()
    sd.save(tmp_path / "d", dtype=dtype)
    back = SenseDictionary.load(tmp_path / "d")
    assert str(back.centres.dtype) == dtype
    expect = np.asarray(sd.centres).astype({"float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
                                            "float16": np.float16}[dtype])
    np.testing.assert_array_equal(np.asarray(back.centres), expect)
    np.testing.assert_array_equal(np.asarray(back.offsets), np.asarray(sd.offsets))
    np.testing.assert_array_equal(np.asarray(back.counts), np.asarray(sd.counts))
    assert back.meta == sd.meta and back.k_max == sd.k_max
    meta = json.loads((tmp_path / "d" / META_FILE).read_text())
    assert meta["hidden_size"] == D and meta["vocab_size"] == V and meta["dtype"] == dtype
    if dtype == "float32":  # same dictionary, same bytes
        back.save(tmp_path / "e")
        assert (tmp_path / "e" / TENSORS_FILE).read_bytes() == (tmp_path / "d" / TENSORS_FILE).read_bytes()


def test_truncated_or_mismatched_file_refused(tmp_path):
    random_dict().save(tmp_path / "d")
    f = tmp_path / "d" / TENSORS_FILE
    data = f.read_bytes()
    for cut in (len(data) - 7, 40, 3):
        f.write_bytes(data[:cut])
        with pytest.raises(SenseJaxError, match=TENSORS_FILE):
            SenseDictionary.load(tmp_path / "d")
    f.write_bytes(data)
    meta_file = tmp_path / "d" / META_FILE
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(meta, hidden_size=D + 1)))
    with pytest.raises(SenseJaxError, match="hidden_size"):
        SenseDictionary.load(tmp_path / "d")
    meta_file.write_text("{not json")
    with pytest.raises(SenseJaxError, match=META_FILE):
        SenseDictionary.load(tmp_path / "d")
    with pytest.raises(SenseJaxError, match="not found"):
        SenseDictionary.load(tmp_path / "nope")


def test_save_never_overwrites_silently(tmp_path):
    random_dict(0).save(tmp_path / "d")
    before = (tmp_path / "d" / TENSORS_FILE).read_bytes()
    with pytest.raises(SenseJaxError, match="already exists"):
        random_dict(1).save(tmp_path / "d")
    with pytest.raises(SenseJaxError, match="unknown dtype"):
        random_dict(1).save(tmp_path / "d", dtype="int8", overwrite=True)
    assert (tmp_path / "d" / TENSORS_FILE).read_bytes() == before
    random_dict(1).save(tmp_path / "d", overwrite=True)
    assert (tmp_path / "d" / TENSORS_FILE).read_bytes() != before


def test_nan_or_inf_refused_naming_the_token():
    n = np.array([2, 0, 3, 1])
    centres = np.ones((6, D), np.float32)
    centres[3, 2] = np.inf  # row 3 belongs to token 2 (rows 2..4)
    with pytest.raises(SenseJaxError, match="token 2 has NaN or inf"):
        SenseDictionary.from_arrays(centres, np.concatenate([[0], np.cumsum(n)]))
    with pytest.raises(SenseJaxError, match="offsets"):
        SenseDictionary.from_arrays(np.ones((6, D)), [0, 2, 1, 6])


def test_merged_replaces_and_keeps_entries():
    a = random_dict(0, n=[2, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    b = random_dict(1, n=[0, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    m = a.merged(b)
    np.testing.assert_array_equal(np.asarray(m.n_senses), [2, 3, 4, 1] + [0] * 7 + [1])
    for t, src in [(0, a), (1, b), (2, b), (3, a), (11, b)]:
        np.testing.assert_array_equal(m.token_senses(t), src.token_senses(t))
    o = np.asarray(m.offsets)
    np.testing.assert_array_equal(np.asarray(m.counts)[o[1]:o[2]], np.asarray(b.counts)[0:3])
    wide = SenseDictionary.from_arrays(np.zeros((1, D + 2), np.float32), np.r_[0, np.ones(V, int)])
    with pytest.raises(SenseJaxError, match="width"):
        a.merged(wide)


def test_nearest_sense_refuses_wrong_width():
    sd = random_dict()
    with pytest.raises(SenseJaxError, match="width"):
        nearest_sense(sd, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2, D + 1)))
