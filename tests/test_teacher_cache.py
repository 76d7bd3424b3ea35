"""The teacher cache (issue 15, item 1): the teacher's SKD targets and hidden states computed once,
reused, refused when anything they depend on differs, resumed after a kill, and the same training
figures with and without it."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import sense_jax
from sense_jax import teacher_cache as tc
from sense_jax.errors import SenseJaxError
from sense_jax.training import cache as train_cache
from skd_helpers import make_skd_inputs, permute_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sense_jax import trainer as T  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory, minilm_dir, sentences):
    return make_skd_inputs(tmp_path_factory.mktemp("cache"), minilm_dir, sentences, {"senses": 0, "senses2": 1})


def _cfg(assets, out, **kw):
    # 40 training passages, 3 steps of 2 x 8: the run sees its passages 1.2 times. max_length 8
    # (the smallest bucket): one program per step kind; no held-out split: no evaluation.
    base = dict(teacher=str(assets["teacher_dir"]), senses=str(assets["senses"]), train_data=str(assets["corpus"]),
                out_dir=str(out), progress=False, steps=3, batch_size=8, grad_accum=2, max_length=8,
                student_layers=1, warmup_steps=1, learning_rate=3e-3, save_every=3, eval_every=0,
                eval_batches=1, eval_fraction=0.0, plot=False, tensorboard=False)
    base.update(kw)
    return T.load_config(None, [f"{k}={v}" for k, v in base.items()])


def _flat(params) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))]


@pytest.fixture
def counted(monkeypatch):
    """Every (stage, k) the cache build passes (chunks computed), in order."""
    calls = []
    monkeypatch.setattr(tc, "FAULT_HOOK", lambda stage, k: calls.append((stage, k)))
    return calls


@pytest.mark.parametrize("objective,pack", [("skd", 0), ("mse", 0), ("skd", 24), ("mse", 24)])
def test_training_gives_the_same_figures_with_and_without_the_cache(assets, tmp_path, objective, pack, counted):
    # pack: rows of 24 tokens (passages of up to 8), 2 x 2 rows per step; the cache's per-passage
    # values are placed at each passage's offset in its row.
    w = {} if objective == "skd" else dict(skd_weight=0, mse_weight=1, senses="")
    if pack:
        w.update(pack_length=pack, batch_size=2)
    off = T.train(_cfg(assets, tmp_path / "off", teacher_cache="off", **w))
    on = T.train(_cfg(assets, tmp_path / "on", teacher_cache="on", **w))
    assert off.setup.cached == () and counted.count(("final", 0)) == 1
    assert on.setup.cached == (("targets",) if objective == "skd" else ("teacher_hidden",))
    # SKD: bitwise on CPU. The step runs the same student arithmetic with and without the cache
    # (the targets, an argmax, come out identical from the teacher's states however they were
    # batched). MSE: the cached states come from another program (the build's sorted batches of
    # 16 rows, not the step's micro-batches of 8; XLA's CPU matmuls round differently for another
    # row count), so they differ from the step's own by ~1e-6 absolute: the metrics agree within
    # rtol 1e-4 (states misaligned by one passage would move them by far more), the params within
    # 1e-3 absolute (AdamW's update lr * m / sqrt(v) is about +-lr = 3e-3 for any gradient near zero,
    # whatever its rounding; observed 9e-5 after 3 steps).
    if objective == "skd":
        tol_params, tol = dict(rtol=0, atol=0), dict(rtol=0, atol=0)
    else:
        tol_params, tol = dict(rtol=0, atol=1e-3), dict(rtol=1e-4, atol=0)
    for a, b in zip(_flat(off.state.params), _flat(on.state.params)):
        np.testing.assert_allclose(b, a, **tol_params)
    keys = ("loss", "skd", "accuracy", "tokens", "grad_norm") if objective == "skd" else ("loss", "mse", "grad_norm")
    assert len(off.history) == 3
    for ra, rb in zip(off.history, on.history):
        np.testing.assert_allclose([rb[k] for k in keys], [ra[k] for k in keys], **tol)
    if objective == "skd":  # no teacher states in the cached step: nothing to report an MSE from
        assert "mse" in off.history[0] and "mse" not in on.history[0]
    meta = tc.open_teacher_cache(tmp_path / "on" / "teacher_cache", {}, keys=()).meta
    assert (meta["targets"], meta["hidden"]) == ((True, False) if objective == "skd" else (False, True))


def test_built_once_and_reused_by_a_resumed_run(assets, tmp_path, counted):
    shared = tmp_path / "shared_cache"
    first = T.train(_cfg(assets, tmp_path / "a", teacher_cache=str(shared), save_every=1), stop_after=1)
    assert counted.count(("final", 0)) == 1 and first.setup.cached == ("targets",)
    logs = []
    T.train(_cfg(assets, tmp_path / "a", teacher_cache=str(shared)), log=logs.append)  # resume
    assert counted.count(("final", 0)) == 1  # never built again
    assert any("training reads the teacher's targets" in m for m in logs)
    # auto: one pass over the passages builds nothing (the build would cost what it saves).
    once = T.train(_cfg(assets, tmp_path / "c", steps=1, batch_size=8, grad_accum=5, save_every=1))
    assert once.setup.cached == () and not (tmp_path / "c" / "teacher_cache").exists()
    assert counted.count(("final", 0)) == 1


@pytest.fixture(scope="module")
def built(assets, tmp_path_factory):
    """A setup, its training passages and a cache built for them in chunks of 8 passages."""
    d = tmp_path_factory.mktemp("built")
    cfg = _cfg(assets, d / "run", teacher_cache="on", max_length=16, grad_accum=1)  # build batches of 8
    s = T.setup(cfg)
    passages = assets["sentences"][:30]
    train_cache.ensure_teacher_cache(s, passages, d / "whole", hidden=True, chunk_passages=8)
    return s, passages, d / "whole"


def test_cached_targets_are_the_teachers_argmax_and_rows_pad_like_the_stream(built):
    from sense_jax.losses import teacher_targets
    from sense_jax.sense_dict import gather_senses
    from sense_jax.training.data import tokenize

    s, passages, path = built
    cache = tc.open_teacher_cache(path, train_cache.run_identity(s, passages))
    assert cache.targets.dtype == np.int8 and cache.hidden.dtype == np.float32
    idx = np.array([3, 0, 17, 29])
    enc = tokenize(s.teacher.tokenizer, [passages[i] for i in idx], 16)
    h = s.teacher_module.apply({"params": s.frozen[0]}, enc["input_ids"], enc["attention_mask"],
                               enc["token_type_ids"])
    codebook, valid = gather_senses(s.sense_dict, enc["input_ids"])
    want = np.asarray(teacher_targets(codebook, valid, h, enc["attention_mask"]))
    got = cache.rows(idx, 16, enc["attention_mask"], ("targets", "teacher_hidden"))
    np.testing.assert_array_equal(got["targets"], want)
    assert (want >= 0).sum() > 20 and (want == -1).sum() > 5  # padding and [CLS]/[SEP] are -1
    mask = enc["attention_mask"].astype(bool)
    np.testing.assert_allclose(got["teacher_hidden"][mask], np.asarray(h)[mask], rtol=1e-5, atol=1e-5)
    assert not got["teacher_hidden"][~mask].any()
    with pytest.raises(SenseJaxError, match="passage 3 has .* tokens there but"):
        cache.rows(idx, 16, np.roll(enc["attention_mask"], 1, axis=0))


def _variants(s, passages, assets, tmp_path) -> dict:
    """For each identity key, the cache_identity arguments with that one input changed."""
    from sense_jax.sense_dict import SenseDictionary

    base = dict(teacher_params=s.teacher.params, teacher_config=s.teacher.config, compute_dtype="float32",
                tokenizer=s.teacher.tokenizer, passages=passages, max_length=16, sense_dict=s.sense_dict,
                metric="dot")
    params = jax.tree.map(np.asarray, jax.device_get(s.teacher.params))
    params["layer_1"]["output_dense"]["bias"] = params["layer_1"]["output_dense"]["bias"] + 1e-3
    permuted = sense_jax.load_model(permute_tokenizer(assets["teacher_dir"], tmp_path / "perm")).tokenizer
    changes = {
        "layer": dict(teacher_config=dataclasses.replace(s.teacher.config, num_hidden_layers=1)),
        "teacher_params": dict(teacher_params=params),  # not the embedding: every parameter counts
        "teacher_config": dict(teacher_config=dataclasses.replace(s.teacher.config, layer_norm_eps=1e-6)),
        "compute_dtype": dict(compute_dtype="bfloat16"),
        "tokenizer": dict(tokenizer=permuted),
        "passages": dict(passages=passages[1:] + passages[:1]),
        "max_length": dict(max_length=12),
        "dictionary": dict(sense_dict=SenseDictionary.load(assets["senses2"])),
        "metric": dict(metric="cos"),
    }
    return {k: {**base, **v} for k, v in changes.items()}


def test_refused_naming_each_key_that_differs(built, assets, tmp_path):
    s, passages, path = built
    variants = _variants(s, passages, assets, tmp_path)
    assert set(variants) == set(tc.IDENTITY_KEYS)
    for key, kwargs in variants.items():
        with pytest.raises(SenseJaxError, match=rf"teacher cache .* was built with {key}=.*, this run has {key}="):
            tc.open_teacher_cache(path, tc.cache_identity(**kwargs))
    # A reader of the hidden states alone (the MSE baseline) does not depend on the dictionary.
    tc.open_teacher_cache(path, tc.cache_identity(**variants["dictionary"]), tc.HIDDEN_KEYS)
    tc.open_teacher_cache(path, tc.cache_identity(**variants["metric"]), tc.HIDDEN_KEYS)


def test_a_run_with_another_dictionary_is_refused_by_name(assets, tmp_path):
    shared = tmp_path / "cache"
    T.train(_cfg(assets, tmp_path / "a", teacher_cache=str(shared), steps=1, save_every=1))
    with pytest.raises(SenseJaxError, match="was built with dictionary="):
        T.train(_cfg(assets, tmp_path / "b", teacher_cache=str(shared), steps=1, save_every=1,
                     senses=str(assets["senses2"])))
    assert not (tmp_path / "b" / "checkpoints" / "1").exists()


def _bytes(d: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


def test_a_build_killed_mid_way_resumes_to_the_same_bytes(built, tmp_path, monkeypatch):
    s, passages, whole = built

    class Killed(Exception):
        pass

    def kill_at(where):
        def hook(stage, k):
            calls.append((stage, k))
            if (stage, k) == where:
                raise Killed
        return hook

    out = tmp_path / "cache"
    calls = []
    monkeypatch.setattr(tc, "FAULT_HOOK", kill_at(("chunk", 1)))
    with pytest.raises(Killed):
        train_cache.ensure_teacher_cache(s, passages, out, hidden=True, chunk_passages=8)
    assert not out.exists() and (tmp_path / "cache.partial" / "progress.json").exists()
    with pytest.raises(SenseJaxError, match="not a complete teacher cache"):
        tc.open_teacher_cache(out, {})
    calls.clear()
    monkeypatch.setattr(tc, "FAULT_HOOK", kill_at(("final", 0)))  # killed again just before the rename
    with pytest.raises(Killed):
        train_cache.ensure_teacher_cache(s, passages, out, hidden=True, chunk_passages=8)
    assert calls == [("chunk", 2), ("chunk", 3), ("final", 0)]  # chunks 0-1 were not computed again
    calls.clear()
    monkeypatch.setattr(tc, "FAULT_HOOK", kill_at(None))
    train_cache.ensure_teacher_cache(s, passages, out, hidden=True, chunk_passages=8)
    assert calls == [("final", 0)] and not (tmp_path / "cache.partial").exists()
    assert _bytes(out) == _bytes(whole)
    # Another build's partial work (other settings) is discarded, not mixed in.
    calls.clear()
    monkeypatch.setattr(tc, "FAULT_HOOK", kill_at(("chunk", 0)))
    with pytest.raises(Killed):
        train_cache.ensure_teacher_cache(s, passages, tmp_path / "c2", hidden=False, chunk_passages=8)
    monkeypatch.setattr(tc, "FAULT_HOOK", None)
    train_cache.ensure_teacher_cache(s, passages, tmp_path / "c2", hidden=True, chunk_passages=8)
    assert _bytes(tmp_path / "c2") == _bytes(whole)


def test_hidden_states_over_the_budget_are_not_cached(built, tmp_path):
    s, passages, _ = built
    small = dataclasses.replace(s, cfg=dataclasses.replace(s.cfg, teacher_cache_max_bytes=1000))
    logs = []
    cache = train_cache.ensure_teacher_cache(small, passages, tmp_path / "c", hidden=True, log=logs.append)
    assert cache.hidden is None and cache.targets is not None
    assert any("teacher_cache_max_bytes=1000; not cached" in m for m in logs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_row_file_reads_and_writes_the_rows_numpy_sees(tmp_path, dtype):
    import ml_dtypes

    view = ml_dtypes.bfloat16 if dtype == "bfloat16" else None
    stored = np.uint16 if view else np.float32
    rng = np.random.default_rng(0)
    want = rng.normal(size=(11, 5)).astype(view or np.float32)
    np.save(tmp_path / "h.npy", np.zeros((11, 5), stored))
    f = tc.RowFile(tmp_path / "h.npy", writable=True)
    f.write(0, want[:4].view(stored))
    f.write(4, want[4:].view(stored))
    f.close()
    # numpy reads what was written; RowFile reads numpy's file back, any slice
    np.testing.assert_array_equal(np.load(tmp_path / "h.npy").view(want.dtype), want)
    r = tc.RowFile(tmp_path / "h.npy", view=view)
    assert r.shape == (11, 5) and r.dtype == want.dtype
    np.testing.assert_array_equal(r.read(3, 6), want[3:9])
    with pytest.raises(SenseJaxError, match=r"rows 9:13 are past its end"):
        r.read(9, 4)
    data = (tmp_path / "h.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-7])
    with pytest.raises(SenseJaxError, match=r"cut\.npy is truncated"):
        tc.RowFile(tmp_path / "cut.npy")
    np.save(tmp_path / "v.npy", np.zeros(4, np.float32))
    with pytest.raises(SenseJaxError, match=r"v\.npy: expected a 2-D C-order array"):
        tc.RowFile(tmp_path / "v.npy")
