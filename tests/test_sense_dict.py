"""SenseDictionary (sense_jax.sense_dict): storage, persistence, merging and nearest-sense look-up
against a per-token numpy loop."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sense_jax.errors import SenseJaxError
from sense_jax.sense_dict import (META_FILE, TENSORS_FILE, SenseDictionary, gather_senses, nearest_sense,
                                  sense_scores)

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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("metric", ["dot", "cos", "l2"])
def test_chosen_row_equals_block_path(metric, dtype):
    """nearest_sense gathers only the chosen row for the replaced state; it equals, bit for bit,
    the block path: the whole padded [.., K, D] codebook (gather_senses, dequantised, zero at
    padding), its scores, and the chosen slot taken from it. Chunked (ragged last chunk) too."""
    sd = random_dict(3, n=[0, 3, 1, 5, 0, 2, 4, 0, 1, 5, 3, 7]).astype(dtype)
    assert sd.dtype == dtype and sd.k_max == 7
    rng = np.random.default_rng(4)
    ids = jnp.asarray(rng.integers(-2, V + 3, size=(3, 11)), jnp.int32)
    for h_dtype in (jnp.float32, jnp.bfloat16):
        hidden = jnp.asarray(rng.normal(size=(3, 11, D)), h_dtype)
        codebook, valid = gather_senses(sd, ids)
        k_ref = jnp.argmax(sense_scores(codebook, valid, hidden, metric), axis=-1)
        has_ref = valid[..., 0]
        chosen = jnp.take_along_axis(codebook, k_ref[..., None, None], axis=-2)[..., 0, :]
        replaced_ref = jnp.where(has_ref[..., None], chosen.astype(h_dtype), hidden)
        for chunk in (0, 8):
            k, replaced, has = nearest_sense(sd, ids, hidden, metric=metric, chunk=chunk)
            np.testing.assert_array_equal(np.asarray(k), np.where(np.asarray(has_ref), np.asarray(k_ref), -1))
            np.testing.assert_array_equal(np.asarray(has), np.asarray(has_ref))
            assert replaced.dtype == h_dtype
            np.testing.assert_array_equal(np.asarray(replaced, np.float32), np.asarray(replaced_ref, np.float32))


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
        random_dict(1).save(tmp_path / "d", dtype="int4", overwrite=True)
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


# --- issue 16: exact l2, int8, duplicate senses, merges that record their sources, the format ----

def test_l2_scores_never_positive_and_exact_match_scores_zero():
    """Vectors of norm 280 (MiniLM-like): the expanded form 2<c,h> - |c|^2 - |h|^2 gave up to
    +0.0078 here when h is one of the senses; -|c - h|^2 is 0 for the match, < 0 elsewhere."""
    from sense_jax.sense_dict import sense_scores

    rng = np.random.default_rng(0)
    c = rng.normal(size=(32, 4, 384)).astype(np.float32)
    c *= 280 / np.linalg.norm(c, axis=-1, keepdims=True)
    h = c[:, 1]
    s = np.asarray(sense_scores(jnp.asarray(c), jnp.ones((32, 4), bool), jnp.asarray(h), "l2"))
    np.testing.assert_array_equal(s[:, 1], 0.0)
    assert np.all(s[:, [0, 2, 3]] < 0)
    ref = -np.sum((c.astype(np.float64) - h[:, None].astype(np.float64)) ** 2, axis=-1)
    np.testing.assert_allclose(s, ref, rtol=1e-5)
    # The look-up picks the exact match.
    sd = SenseDictionary.from_arrays(c.reshape(-1, 384), np.arange(0, 129, 4))
    k, replaced, _ = nearest_sense(sd, jnp.arange(32, dtype=jnp.int32)[None], jnp.asarray(h)[None], metric="l2")
    np.testing.assert_array_equal(np.asarray(k), 1)
    np.testing.assert_array_equal(np.asarray(replaced)[0], h)


def test_quantize_int8_by_hand():
    from sense_jax.sense_dict import quantize_int8

    q, s = quantize_int8(np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [0.0, 0.3, -0.1]], np.float32))
    # scale = max|c| / 127; q = round(c / scale): 63.5 -> 64 (half to even), 31.75 -> 32.
    np.testing.assert_array_equal(s, np.float32([2 / 127, 0, 0.3 / 127]))
    np.testing.assert_array_equal(q, [[64, -127, 32], [0, 0, 0], [0, 127, -42]])
    assert q.dtype == np.int8 and s.dtype == np.float32


def test_int8_save_load_and_lookup(tmp_path):
    from sense_jax.sense_dict import dequantize_int8, quantize_int8

    sd = random_dict(3)
    sd.save(tmp_path / "f32")
    sd.save(tmp_path / "i8", dtype="int8")
    back = SenseDictionary.load(tmp_path / "i8")
    assert back.dtype == "int8" and back.scales is not None and back.scales.shape == (sd.centres.shape[0],)
    q, s = quantize_int8(np.asarray(sd.centres))
    np.testing.assert_array_equal(np.asarray(back.centres), q)
    np.testing.assert_array_equal(np.asarray(back.scales), s)
    # Within half a quantisation step of the f32 centres, element by element.
    err = np.abs(back.float_centres() - np.asarray(sd.centres))
    assert np.all(err <= s[:, None] / 2 + 1e-7)
    np.testing.assert_array_equal(back.token_senses(3), dequantize_int8(q, s)[4:9])
    meta = json.loads((tmp_path / "i8" / META_FILE).read_text())
    assert meta["dtype"] == "int8" and "per-sense" in meta["quantization"]
    size = lambda d: (tmp_path / d / TENSORS_FILE).stat().st_size
    assert size("i8") < size("f32") and back.nbytes() == q.size + 4 * s.size + 4 * (V + 1) + 4 * q.shape[0]
    # The look-up dequantises exactly as the float dictionary of the dequantised values scores.
    ref = SenseDictionary.from_arrays(dequantize_int8(q, s), np.asarray(sd.offsets))
    rng = np.random.default_rng(4)
    ids = jnp.asarray(rng.integers(0, V, (3, 7)), jnp.int32)
    hidden = jnp.asarray(rng.normal(size=(3, 7, D)).astype(np.float32))
    for metric in ("dot", "cos", "l2"):
        for u, v in zip(nearest_sense(back, ids, hidden, metric=metric), nearest_sense(ref, ids, hidden, metric=metric)):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # int8 -> int8 is byte-identical; int8 -> float32 gives the dequantised values.
    back.save(tmp_path / "i8b")
    assert (tmp_path / "i8b" / TENSORS_FILE).read_bytes() == (tmp_path / "i8" / TENSORS_FILE).read_bytes()
    np.testing.assert_array_equal(np.asarray(back.astype("float32").centres), dequantize_int8(q, s))


def test_duplicate_senses_are_merged_with_their_counts(tmp_path):
    a, b = np.ones(D, np.float32), np.arange(D, dtype=np.float32)
    # token 0: a, a, b (counts 1, 2, 3); token 1: b, -0.0 vs 0.0 copies; token 2: a (no duplicate)
    z, nz = np.zeros(D, np.float32), -np.zeros(D, np.float32)
    sd = SenseDictionary.from_arrays(np.stack([a, a, b, b, z, nz, a]), [0, 3, 6, 7], [1, 2, 3, 4, 5, 6, 7],
                                     {"stats": {"senses": 7}})
    assert sd.duplicate_senses() == 2
    d = sd.deduplicated()
    np.testing.assert_array_equal(np.asarray(d.n_senses), [2, 2, 1])
    np.testing.assert_array_equal(np.asarray(d.centres), np.stack([a, b, b, z, a]))
    np.testing.assert_array_equal(np.asarray(d.counts), [3, 3, 4, 11, 7])
    assert d.meta["stats"] == {"senses": 5, "duplicate_senses_merged": 2} and d.duplicate_senses() == 0
    # No duplicates: the very same object (so the same bytes on save).
    assert d.deduplicated() is d
    # A cast that makes two senses equal merges them: 1 and 1 + 2^-12 are one bfloat16.
    close = SenseDictionary.from_arrays(np.stack([a, a + np.float32(2 ** -12)]), [0, 2], [5, 6])
    assert close.duplicate_senses() == 0
    close.save(tmp_path / "bf16", dtype="bfloat16")
    back = SenseDictionary.load(tmp_path / "bf16")
    np.testing.assert_array_equal(np.asarray(back.n_senses), [1])
    np.testing.assert_array_equal(np.asarray(back.counts), [11])
    # A merge with an (older) dictionary holding duplicates keeps no duplicate.
    m = sd.merged(SenseDictionary.from_arrays(np.ones((1, D), np.float32), [0, 0, 0, 1]))
    assert m.duplicate_senses() == 0
    np.testing.assert_array_equal(np.asarray(m.n_senses), [2, 2, 1])


def test_merged_lists_every_source_and_refuses_another_teacher():
    def made(seed, n, **meta):
        base = {"teacher": "t", "teacher_fingerprint": "fpA", "tokenizer_hash": "tokA", "layer": 6,
                "store": f"store{seed}", "store_fingerprint": f"sf{seed}", "k_rule": {"k": 3}, "seed": seed,
                "stats": {"tokens": int(np.count_nonzero(n))}}
        base.update(meta)
        r = random_dict(seed, n=n)
        return SenseDictionary.from_arrays(r.centres, r.offsets, None, base)

    a = made(0, [2, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    b = made(1, [0, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    c = made(2, [0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0])
    m = a.merged(b).merged(c)
    src = m.meta["sources"]
    assert [s["store_fingerprint"] for s in src] == ["sf0", "sf1", "sf2"] == m.meta["merged_from"]
    assert [s["seed"] for s in src] == [0, 1, 2] and [s["tokens"] for s in src] == [3, 3, 1]
    assert all(s["k_rule"] == {"k": 3} and s["teacher_fingerprint"] == "fpA" for s in src)
    for key, value in [("teacher_fingerprint", "fpB"), ("tokenizer_hash", "tokB"), ("layer", 3)]:
        with pytest.raises(SenseJaxError, match=f"another teacher: {key}"):
            a.merged(made(1, [0, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 1], **{key: value}))


def test_format_version_written_and_newer_refused(tmp_path):
    random_dict().save(tmp_path / "d")
    meta_file = tmp_path / "d" / META_FILE
    meta = json.loads(meta_file.read_text())
    assert meta["format_version"] == 1
    assert "format_version" not in SenseDictionary.load(tmp_path / "d").meta
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "format_version"}))
    SenseDictionary.load(tmp_path / "d")  # written before versioning: version 1
    meta_file.write_text(json.dumps(dict(meta, format_version=2)))
    with pytest.raises(SenseJaxError, match="format_version 2 is newer than this sense_jax reads"):
        SenseDictionary.load(tmp_path / "d")


def test_numpy_loader_in_a_process_without_jax(tmp_path):
    """sense_jax/senses_numpy.py reads f32, bf16 and int8 dictionaries where jax, ml_dtypes,
    safetensors and sense_jax cannot be imported; its arrays equal SenseDictionary.to_numpy()
    and its look-up equals nearest_sense."""
    import subprocess
    import sys
    from pathlib import Path

    import sense_jax

    loader = Path(sense_jax.__file__).parent / "senses_numpy.py"
    sd = random_dict(5)
    rng = np.random.default_rng(6)
    ids = rng.integers(-1, V + 1, (4, 5))
    hidden = rng.normal(size=(4, 5, D)).astype(np.float32)
    np.savez(tmp_path / "q.npz", ids=ids, hidden=hidden)
    for dtype in ("float32", "bfloat16", "int8"):
        sd.save(tmp_path / dtype, dtype=dtype)
    code = f"""
import importlib.util, sys
for name in ("jax", "jaxlib", "ml_dtypes", "safetensors", "sense_jax", "flax", "torch"):
    sys.modules[name] = None  # any import of these now fails
try:
    import jax
    raise SystemExit("jax importable")
except ImportError:
    pass
spec = importlib.util.spec_from_file_location("senses_numpy", {str(loader)!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
import numpy as np
q = np.load({str(tmp_path / "q.npz")!r})
for dtype in ("float32", "bfloat16", "int8"):
    d = mod.load({str(tmp_path)!r} + "/" + dtype)
    out = {{k: d[k] for k in ("centres", "offsets", "counts")}}
    for metric in ("dot", "cos", "l2"):
        out["k_" + metric], out["r_" + metric] = mod.nearest_sense(d, q["ids"], q["hidden"], metric)
    raw = mod.load({str(tmp_path)!r} + "/" + dtype, dequantize=False)
    out["raw_dtype"] = np.array(str(raw["centres"].dtype))
    np.savez({str(tmp_path)!r} + "/out_" + dtype + ".npz", **out)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    for dtype in ("float32", "bfloat16", "int8"):
        got = np.load(tmp_path / f"out_{dtype}.npz")
        ref = SenseDictionary.load(tmp_path / dtype)
        want = ref.to_numpy()
        for key in ("centres", "offsets", "counts"):
            np.testing.assert_array_equal(got[key], want[key])
            assert got[key].dtype == want[key].dtype
        assert str(got["raw_dtype"]) == {"float32": "float32", "bfloat16": "uint16", "int8": "int8"}[dtype]
        assert want["meta"]["format_version"] == 1 and want["meta"]["dtype"] == dtype
        for metric in ("dot", "cos", "l2"):
            k, replaced, _ = nearest_sense(ref, jnp.asarray(ids, jnp.int32), jnp.asarray(hidden), metric=metric)
            np.testing.assert_array_equal(got["k_" + metric], np.asarray(k))
            np.testing.assert_allclose(got["r_" + metric], np.asarray(replaced), rtol=1e-6)
