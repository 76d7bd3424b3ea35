"""Batched k-means (sense_jax.kmeans) against scikit-learn, on planted clusters and on real
all-MiniLM-L6-v2 hidden states of WordNet glosses; masks, determinism, bad input, the driver and
the ``sense-jax cluster`` command."""

from __future__ import annotations

import collections
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.metrics import adjusted_rand_score

from sense_jax.cli import main
from sense_jax.errors import SenseJaxError
from sense_jax.kmeans import batched_kmeans, kmeans_detailed, map_batch_size
from sense_jax.sense_builder import bucket_size, build_sense_dictionary
from sense_jax.sense_dict import SenseDictionary
from sense_jax.store import open_store, write_store

T_, N_, D_, K_ = 4, 64, 8, 5  # one shape for the synthetic tests: one compile shared by them all


def planted(rng, T, N, D, K, *, sep=12.0, n_min=None):
    """T tokens, each with n_t <= N points from K well-separated spherical clusters of unequal size."""
    x = rng.normal(size=(T, N, D)).astype(np.float32) * 50  # garbage at padding
    mask = np.zeros((T, N), bool)
    labels = []
    for t in range(T):
        n = int(rng.integers(n_min or N // 2, N + 1))
        centres = rng.normal(size=(K, D)) * sep
        weights = rng.dirichlet(np.full(K, 2.0)) * 0.7 + 0.3 / K
        lab = rng.choice(K, size=n, p=weights)
        x[t, :n] = centres[lab] + rng.normal(size=(n, D))
        mask[t, :n] = True
        labels.append(lab)
    return x, mask, labels


@pytest.fixture(scope="module")
def real_tokens(minilm_dir):
    """Real last-layer MiniLM hidden states of frequent tokens: x [T, N, 384] f32, mask, ids.

    Texts: 400 WordNet noun glosses spread evenly over the synsets the package ships
    (sense_jax/data/wordnet), the same on every machine.
    """
    import sense_jax
    from sense_jax.batching import pad_batch
    from sense_jax.wordnet import glosses

    nouns = glosses("n")
    texts, min_count = nouns[::len(nouns) // 400][:400], 24
    model = sense_jax.load_model(minilm_dir)
    ids = model.tokenize(texts, max_length=64)["input_ids"]
    special = set(model.tokenizer.all_special_ids)
    samples = collections.defaultdict(list)
    for i in range(0, len(ids), 100):
        batch = ids[i:i + 100]
        x, m = pad_batch(batch, 64, batch_size=100)
        h = np.asarray(model.hidden_states(x, m))
        for b, seq in enumerate(batch):
            for p, tok in enumerate(seq):
                if tok not in special:
                    samples[tok].append(h[b, p])
    toks = sorted(t for t, v in samples.items() if len(v) >= min_count)
    N = 128
    x = np.zeros((len(toks), N, h.shape[-1]), np.float32)
    mask = np.zeros((len(toks), N), bool)
    for i, t in enumerate(toks):
        v = np.stack(samples[t][:N])
        x[i, :len(v)], mask[i, :len(v)] = v, True
    assert len(toks) >= 12
    return x, mask, toks


# --- quality ---------------------------------------------------------------------------------

def test_planted_clusters_adjusted_rand_index():
    x, mask, labels = planted(np.random.default_rng(0), T=T_, N=N_, D=D_, K=K_)
    r = batched_kmeans(x, mask, K_, key=jax.random.key(0))
    a = np.asarray(r.assignments)
    for t in range(T_):
        n = int(mask[t].sum())
        assert adjusted_rand_score(labels[t], a[t, :n]) >= 0.95
        assert np.all(a[t, n:] == -1)
    np.testing.assert_array_equal(r.n_senses, K_)
    assert r.centres.shape == (T_, K_, D_) and r.centres.dtype == np.float32


def test_bfloat16_input_clusters_in_float32():
    x, mask, _ = planted(np.random.default_rng(0), T=T_, N=N_, D=D_, K=K_)
    xb = x.astype(ml_dtypes.bfloat16)
    a = batched_kmeans(xb, mask, K_, key=jax.random.key(0))
    b = batched_kmeans(xb.astype(np.float32), mask, K_, key=jax.random.key(0))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert a.centres.dtype == np.float32


def test_same_init_converges_like_sklearn(real_tokens):
    """Started from the same centres, our Lloyd iterations end where scikit-learn's do."""
    x, mask, _ = real_tokens
    T, K = len(x), 10
    init = np.zeros((T, K, x.shape[-1]), np.float32)
    refs = []
    for t in range(T):
        pts = x[t, mask[t]]
        init[t], _ = kmeans_plusplus(pts, K, random_state=t)
        refs.append(KMeans(K, init=init[t], n_init=1, max_iter=100, tol=1e-4).fit(pts))
    r = batched_kmeans(x, mask, K, key=jax.random.key(0), init=init)
    # On the host: slicing the device arrays per token compiled a slice per distinct n.
    assignments, inertia, centres = np.asarray(r.assignments), np.asarray(r.inertia), np.asarray(r.centres)
    for t in range(T):
        n = int(mask[t].sum())
        assert adjusted_rand_score(refs[t].labels_, assignments[t, :n]) == 1.0
        np.testing.assert_allclose(float(inertia[t]), refs[t].inertia_, rtol=1e-4)
        # Same partition -> same centres (up to the order of senses).
        ours = centres[t][assignments[t, :n]]
        np.testing.assert_allclose(ours, refs[t].cluster_centers_[refs[t].labels_], atol=1e-4)


def test_mean_inertia_within_one_percent_of_sklearn(real_tokens):
    """k-means++ then Lloyd from scratch, K=10, per token, on real MiniLM vectors.

    One k-means++ run's inertia varies by a few % with the seed on ~100-point tokens, so both
    sides are averaged over 8 seeds x all tokens (sklearn: one KMeans per token and seed).
    """
    x, mask, toks = real_tokens
    K, S, T = 10, 8, len(toks)
    r = batched_kmeans(np.tile(x, (S, 1, 1)), np.tile(mask, (S, 1)), K, key=jax.random.key(0))
    ours, c, a = np.asarray(r.inertia), np.asarray(r.centres), np.asarray(r.assignments)
    # Independent recomputation of our inertia from our own centres and assignments.
    recomputed = [np.sum((x[i % T, mask[i % T]] - c[i][a[i, mask[i % T]]]) ** 2) for i in range(S * T)]
    np.testing.assert_allclose(ours, recomputed, rtol=1e-4)
    ref = np.array([KMeans(K, init="k-means++", n_init=1, max_iter=100, tol=1e-4, random_state=1000 * s + t)
                    .fit(x[t, mask[t]]).inertia_ for s in range(S) for t in range(T)])
    rel = ours.mean() / ref.mean() - 1
    assert rel <= 0.01, f"mean inertia {ours.mean():.2f} vs sklearn {ref.mean():.2f} ({rel:+.2%})"
    assert rel >= -0.05  # both are local optima of the same objective


def test_map_and_vmap_loops_cluster_alike(real_tokens):
    """The CPU loop (tokens one after another, lax.map) and the accelerator loop (lockstep,
    vmap) run the same arithmetic per token: same partitions, same centres and inertia up to
    float rounding, on real vectors and on edge cases (few samples, empty rows, duplicates)."""
    x, mask, _ = real_tokens
    rng = np.random.default_rng(6)
    edge = np.zeros((4, x.shape[1], x.shape[2]), np.float32)
    emask = np.zeros((4, x.shape[1]), bool)
    edge[0, :5], emask[0, :5] = rng.normal(size=(5, x.shape[2])), True  # n <= K: kept
    edge[2, :40], emask[2, :40] = np.repeat(rng.normal(size=(4, x.shape[2])), 10, 0), True  # duplicates
    x, mask = np.concatenate([x, edge]), np.concatenate([mask, emask])  # row T + 1: empty
    a = jax.device_get(kmeans_detailed(x, mask, 10, key=jax.random.key(3), loop="map"))
    b = jax.device_get(kmeans_detailed(x, mask, 10, key=jax.random.key(3), loop="vmap"))
    np.testing.assert_array_equal(a["n_senses"], b["n_senses"])
    np.testing.assert_array_equal(a["counts"], b["counts"])
    for t in range(len(x)):
        n = int(mask[t].sum())
        assert adjusted_rand_score(a["assignments"][t, :n], b["assignments"][t, :n]) == 1.0 or n == 0
    np.testing.assert_allclose(a["centres"], b["centres"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a["inertia"], b["inertia"], rtol=1e-4, atol=1e-4)
    assert list(a["n_senses"][-4:]) == [5, 0, 4, 0]
    with pytest.raises(SenseJaxError, match="loop"):
        batched_kmeans(x[:2], mask[:2], 3, key=jax.random.key(0), loop="pmap")


def test_map_batch_size_groups_small_tokens_only():
    assert [map_batch_size(n, 384) for n in (16, 64, 96, 128, 184, 1024)] == [4, 4, 2, 2, 1, 1]
    assert map_batch_size(24, 4096) == 1  # wide models: one token at a time


def test_adaptive_bic_recovers_planted_number_of_clusters():
    rng = np.random.default_rng(3)
    true_k = [1, 2, 3, 5]
    x = np.zeros((T_, N_, D_), np.float32)
    mask = np.ones((T_, N_), bool)
    for t, kt in enumerate(true_k):
        centres = rng.normal(size=(kt, D_)) * 10
        x[t] = centres[np.arange(N_) % kt] + rng.normal(size=(N_, D_))
    r = batched_kmeans(x, mask, K_, key=jax.random.key(0), adaptive="bic")
    np.testing.assert_array_equal(r.n_senses, true_k)
    c = np.asarray(r.centres)
    for t, kt in enumerate(true_k):
        assert np.all(c[t, kt:] == 0)  # padding centres are zero


# --- edge cases ------------------------------------------------------------------------------

def test_masked_points_never_leak():
    rng = np.random.default_rng(1)
    x, mask, _ = planted(rng, T=T_, N=N_, D=D_, K=3)
    results = []
    for garbage in (0.0, 1e6, np.nan, np.inf):
        xg = np.where(mask[..., None], x, np.float32(garbage))
        results.append(jax.device_get(kmeans_detailed(xg, mask, K_, key=jax.random.key(5))))
    for other in results[1:]:
        for name in results[0]:
            np.testing.assert_array_equal(results[0][name], other[name], err_msg=name)


def test_deterministic_given_seed():
    x, mask, _ = planted(np.random.default_rng(2), T=T_, N=N_, D=D_, K=8, sep=1.0)
    a = jax.device_get(batched_kmeans(x, mask, K_, key=jax.random.key(7)))
    b = jax.device_get(batched_kmeans(x, mask, K_, key=jax.random.key(7)))
    c = jax.device_get(batched_kmeans(x, mask, K_, key=jax.random.key(8)))
    for u, v in zip(a, b):
        assert u.tobytes() == v.tobytes()
    assert a.centres.tobytes() != c.centres.tobytes()  # the seed is actually used


def test_few_samples_keep_their_samples():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(T_, N_, D_)).astype(np.float32)
    mask = np.zeros((T_, N_), bool)
    mask[0, [1, 4, 6]] = True  # 3 samples, K=5
    mask[1, 10:15] = True      # exactly K
    mask[3, :6] = True         # K + 1: clustered
    r = batched_kmeans(x, mask, K_, key=jax.random.key(0))
    np.testing.assert_array_equal(r.n_senses, [3, 5, 0, 5])
    np.testing.assert_array_equal(r.centres[0, :3], x[0, [1, 4, 6]])
    np.testing.assert_array_equal(r.centres[0, 3:], 0)
    np.testing.assert_array_equal(r.centres[1], x[1, 10:15])
    np.testing.assert_array_equal(r.assignments[0, :8], [-1, 0, -1, -1, 1, -1, 2, -1])
    np.testing.assert_array_equal(r.assignments[1, 10:15], np.arange(5))
    np.testing.assert_array_equal(r.assignments[2], -1)
    np.testing.assert_array_equal(r.inertia[:3], 0)
    assert float(r.inertia[3]) > 0


def test_duplicate_points_give_distinct_senses():
    rng = np.random.default_rng(5)
    distinct = rng.normal(size=(3, D_)).astype(np.float32)
    x = np.broadcast_to(distinct[np.arange(N_) % 3], (T_, N_, D_)).copy()
    r = batched_kmeans(x, np.ones((T_, N_), bool), K_, key=jax.random.key(0))
    np.testing.assert_array_equal(r.n_senses, 3)
    got = np.asarray(r.centres[0, :3])
    np.testing.assert_allclose(got[np.lexsort(got.T)], distinct[np.lexsort(distinct.T)], atol=1e-6)
    assert float(r.inertia[0]) < 1e-6 and np.all(np.isfinite(np.asarray(r.centres)))


def test_empty_cluster_is_reseeded_from_farthest_point():
    x, mask, labels = planted(np.random.default_rng(6), T=T_, N=N_, D=D_, K=K_, n_min=N_)
    # Start 4 centres on 4 planted clusters and 1 far from every point: it is empty at once.
    init = np.stack([np.stack([x[t][labels[t] == j][0] for j in range(K_ - 1)] + [np.full(D_, 1e4)])
                     for t in range(T_)]).astype(np.float32)
    r = batched_kmeans(x, mask, K_, key=jax.random.key(0), init=init)
    np.testing.assert_array_equal(r.n_senses, K_)
    for t in range(T_):
        assert adjusted_rand_score(labels[t], np.asarray(r.assignments[t])) >= 0.95


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_k_below_one_refused(k):
    with pytest.raises(SenseJaxError, match="k must be an integer >= 1"):
        batched_kmeans(np.zeros((1, 4, 2), np.float32), np.ones((1, 4), bool), k, key=jax.random.key(0))


@pytest.mark.parametrize("key", [0, "split3", "raw3"])
def test_bad_key_refused(key):
    """A bare int, or per-token keys that do not match T, get a clear error (T = 5 here)."""
    if key == "split3":
        key = jax.random.split(jax.random.key(0), 3)
    elif key == "raw3":
        key = np.zeros((3, 2), np.uint32)
    with pytest.raises(SenseJaxError, match=r"key must be one PRNG key .* \[T=5\] per-token keys"):
        batched_kmeans(np.zeros((5, 20, 2), np.float32), np.ones((5, 20), bool), 3, key=key)


def test_nan_refused_naming_the_row():
    x = np.ones((3, 8, 2), np.float32)
    x[2, 5, 1] = np.inf
    with pytest.raises(SenseJaxError, match="token row 2"):
        batched_kmeans(x, np.ones((3, 8), bool), 2, key=jax.random.key(0))
    with pytest.raises(SenseJaxError, match="adaptive"):
        batched_kmeans(x, np.ones((3, 8), bool), 2, key=jax.random.key(0), adaptive="mcl")


# --- the driver and the command ----------------------------------------------------------------
# One store shape and K for all driver tests, so they share compiled programs.
K_DRIVER, SEED = 3, 11


def zipf_store(path, *, V=24, D=12, seed=0, nan_token=None, empty=(0, 5), edit=None, meta=None, counts=None):
    """A store with Zipfian sample counts (55 down to 3; or ``counts`` [V]), 3 planted senses per
    token. ``edit(vectors, offsets)`` may change the vectors in place; ``meta`` adds store metadata."""
    rng = np.random.default_rng(seed)
    n = (120 / np.arange(1, V + 1) ** 1.1).astype(np.int64) if counts is None else np.array(counts, np.int64)
    V = len(n)
    n[list(empty)] = 0  # tokens without samples
    offsets = np.concatenate([[0], np.cumsum(n)])
    centres = rng.normal(size=(V, 3, D)) * 6
    tok = np.repeat(np.arange(V), n)
    vec = (centres[tok, rng.integers(0, 3, tok.size)] + rng.normal(size=(tok.size, D))).astype(np.float32)
    if nan_token is not None:
        vec[offsets[nan_token] + 1, 3] = np.nan
    if edit is not None:
        edit(vec, offsets)
    write_store(path, vec, offsets, n, np.zeros((tok.size, 2)), {"teacher": "synthetic", **(meta or {})})
    return open_store(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    store = zipf_store(tmp_path_factory.mktemp("kmeans") / "store")
    return store, build_sense_dictionary(store, K_DRIVER, seed=SEED, progress=False)


def test_build_matches_direct_kmeans_and_keeps_small_tokens(built):
    store, sd = built
    K = K_DRIVER
    n = store.n_samples()
    np.testing.assert_array_equal(np.asarray(sd.n_senses), np.minimum(n, K))
    assert sd.meta["stats"]["tokens"] == int((n > 0).sum())
    assert sd.meta["stats"]["tokens_clustered"] == int((n > K).sum())
    assert sd.meta["store_fingerprint"] and sd.meta["teacher"] == "synthetic"
    counts, offs = np.asarray(sd.counts), np.asarray(sd.offsets)
    for t in np.flatnonzero(n > 0):
        assert counts[offs[t]:offs[t + 1]].sum() == n[t]  # every sample counted once
        if n[t] <= K:
            np.testing.assert_array_equal(sd.token_senses(t), store.token_vectors(t))
    # A clustered token's senses are what batched_kmeans gives with the token's own key,
    # whatever chunk the driver put it in.
    t = int(np.argmax(n))
    N = bucket_size(int(n[t]), minimum=16)
    x = np.zeros((1, N, store.hidden_size), np.float32)
    x[0, :n[t]] = store.token_vectors(t)
    key = jax.random.fold_in(jax.random.key(SEED), t)[None]
    r = batched_kmeans(x, np.arange(N)[None] < n[t], K, key=key)
    np.testing.assert_allclose(sd.token_senses(t), np.asarray(r.centres[0]), rtol=1e-5, atol=1e-5)


def test_dictionary_bytes_do_not_depend_on_device_count_or_chunking(tmp_path):
    """Tokens sharded over 2 simulated CPU devices (a fresh process) or cut into 1-token chunks
    give the same dictionary, byte for byte, as one device with default chunks. (Sample counts
    of one padding bucket, 17-24: one k-means program per setting, so the test pays for three
    compilations, not three per bucket.)"""
    import subprocess
    import sys

    store = zipf_store(tmp_path / "store", counts=[24, 17, 0, 21, 3, 19, 23, 18, 22, 20, 2, 24], empty=())
    assert len({bucket_size(int(n)) for n in store.n_samples() if n > K_DRIVER}) == 1
    build_sense_dictionary(store, K_DRIVER, seed=SEED, progress=False).save(tmp_path / "one")
    build_sense_dictionary(store, K_DRIVER, seed=SEED, progress=False, chunk_tokens=1).save(tmp_path / "small")
    code = ("import jax; jax.config.update('jax_num_cpu_devices', 2); assert len(jax.devices()) == 2; "
            "from sense_jax.sense_builder import build_sense_dictionary as b; from sense_jax.store import open_store; "
            f"b(open_store({str(store.path)!r}), {K_DRIVER}, seed={SEED}, progress=False).save({str(tmp_path / 'two')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    ref = (tmp_path / "one" / "senses.safetensors").read_bytes()
    for other in ("two", "small"):
        assert (tmp_path / other / "senses.safetensors").read_bytes() == ref, other


def test_bucket_sizes_bound_padding():
    sizes = [bucket_size(n) for n in range(1, 1001)]
    assert all(s >= n for n, s in enumerate(sizes, 1))
    assert max(s / n for n, s in enumerate(sizes, 1) if n > 16) < 2.0
    assert sorted(set(sizes)) == [16, 32, 64, 128, 256, 512, 1024]


def test_zipfian_store_needs_at_most_seven_bucket_programs():
    """Compiling dominates a first build (one k-means program per (chunk, bucket) shape): a
    store with every sample count from 11 to 1000 is planned into 7 shapes (13 with the
    half-octave buckets before), on 1 and 2 devices, whatever the chunk size."""
    from sense_jax.sense_builder import ClusterSettings, Partition, plan_chunks

    n = np.concatenate([[0, 3], np.arange(11, 1001), np.full(40, 1000)]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(n)])
    part = Partition(offsets, n, np.flatnonzero(n > 0), np.flatnonzero(n > 10), {})
    for n_dev in (1, 2):
        for chunk_tokens in (None, 8):
            chunks = plan_chunks(part, n_dev, 384, ClusterSettings(k=10, loop="map", chunk_tokens=chunk_tokens))
            assert len({(N, T) for N, _, T in chunks}) == 7
            assert sorted(np.concatenate([ids for _, ids, _ in chunks])) == list(part.big)


def test_driver_program_without_the_few_samples_branch_clusters_alike():
    """The driver's chunks hold tokens with more than K samples and empty padding slots, so its
    program leaves out the few-samples branch (``clustered_only``): same clustering bit for bit
    on the clustered tokens, 0 senses on an empty slot."""
    from sense_jax.kmeans import _batched, _uniforms

    x, mask, _ = planted(np.random.default_rng(9), T=T_, N=N_, D=D_, K=3)
    mask[2] = False  # a padding slot
    u = _uniforms(jax.random.split(jax.random.key(3), T_), k=K_, adaptive=None, k_min=1)
    args = (x, mask, u, np.zeros((T_, 1, 1), np.float32), np.int32(100), np.float32(1e-4))
    st = dict(k=K_, adaptive=None, k_min=1, has_init=False, loop="map")
    full = jax.device_get(_batched(*args, **st))
    lean = jax.device_get(_batched(*args, **st, clustered_only=True))
    real = [0, 1, 3]
    assert (mask[real].sum(axis=1) > K_).all()
    for name in ("centres", "n_senses", "assignments", "inertia", "counts", "n_iter"):
        np.testing.assert_array_equal(lean[name][real], full[name][real], err_msg=name)
    assert lean["n_senses"][2] == 0 and lean["inertia"][2] == 0 and (lean["assignments"][2] == -1).all()


def test_build_refuses_nan_naming_token_id(tmp_path):
    store = zipf_store(tmp_path / "store", nan_token=2)  # clustered token (n=55 > K)
    with pytest.raises(SenseJaxError, match="token 2 has NaN"):
        build_sense_dictionary(store, K_DRIVER, progress=False)
    store = zipf_store(tmp_path / "store2", nan_token=20)  # a token with <= K samples
    with pytest.raises(SenseJaxError, match="token 20 has NaN"):
        build_sense_dictionary(store, K_DRIVER, progress=False)


def test_build_settings_are_checked_once_before_any_work(tmp_path):
    # The library now refuses what batched_kmeans and the cluster command refuse, through the one
    # ClusterSettings object the command also builds (messages name parameters, or flags there).
    from sense_jax.sense_builder import ClusterSettings

    missing = tmp_path / "no-store"  # settings are checked before the store is opened
    for kw, msg in [(dict(tol=-1.0), "^tol must be a finite number >= 0"), (dict(tol=float("nan")), "^tol must be"),
                    (dict(max_iter=-1), "^max_iter must be an integer >= 0"), (dict(chunk_tokens=0), "^chunk_tokens"),
                    (dict(memory_budget=0), "^memory_budget"), (dict(metric="hamming"), "unknown metric")]:
        with pytest.raises(SenseJaxError, match=msg):
            build_sense_dictionary(missing, K_DRIVER, progress=False, **kw)
    with pytest.raises(SenseJaxError, match="^--tol must be a finite number >= 0, got -1"):
        ClusterSettings(k=2, tol=-1.0, option_names=True)
    assert ClusterSettings(k=np.int64(3)).k == 3 and type(ClusterSettings(k=np.int64(3)).k) is int


def test_cluster_command(built, tmp_path, capsys):
    store, sd_ref = built
    out = tmp_path / "dict"
    argv = [str(store.path), str(out), "--k", str(K_DRIVER), "--dtype", "bfloat16",
            "--seed", str(SEED), "--no-progress"]
    assert main(["cluster", *argv]) == 0
    summary = capsys.readouterr().out
    for word in ("clustered", "senses", "mean inertia", "bytes", "cpu device"):
        assert word in summary
    sd = SenseDictionary.load(out)
    assert str(sd.centres.dtype) == "bfloat16" and sd.meta["k_rule"]["k"] == K_DRIVER
    np.testing.assert_array_equal(np.asarray(sd.centres),
                                  np.asarray(sd_ref.centres).astype(ml_dtypes.bfloat16))
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    # Same seed, same bytes.
    argv[1] = str(tmp_path / "again")
    assert main(["cluster", *argv]) == 0
    assert {f.name: f.read_bytes() for f in (tmp_path / "again").iterdir()} == before

    # Bad input: exit 2, one line, OUT untouched.
    zipf_store(tmp_path / "nan", nan_token=4)
    zipf_store(tmp_path / "wide", D=20)
    for args, msg in [
        ([str(store.path), str(out)], "already exists"),
        # --k as above: the NaN is found after the bucket programs are compiled (K=10 compiled 5 more)
        ([str(tmp_path / "nan"), str(out), "--overwrite", "--k", str(K_DRIVER)], "token 4 has NaN"),
        ([str(store.path), str(out), "--k", "0", "--overwrite"], "k must be"),
        ([str(tmp_path / "wide"), str(out), "--overwrite", "--add-to", str(out)], "width 20"),
        ([str(tmp_path / "missing"), str(out), "--overwrite"], "store not found"),
        ([str(store.path), str(out), "--overwrite", "--cpu-devices", "0"], "--cpu-devices must be >= 1"),
        ([str(store.path), str(out), "--overwrite", "--memory-gb", "nan"], "--memory-gb must be"),
        ([str(store.path), str(out), "--overwrite", "--memory-gb", "0"], "--memory-gb must be"),
        ([str(store.path), str(out), "--overwrite", "--max-iter", "0"], "--max-iter must be >= 1"),
        ([str(store.path), str(out), "--overwrite", "--tol", "-1"], "--tol must be"),
        # This process's JAX already runs: asking for devices explicitly is refused, not ignored.
        ([str(store.path), str(out), "--overwrite", "--cpu-devices", "2"], "before backends are initialized"),
    ]:
        capsys.readouterr()
        assert main(["cluster", *args, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
        assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_add_to_existing_dictionary(built):
    store, sd = built
    V, D = store.vocab_size, store.hidden_size
    # A base dictionary with senses for tokens 0 (absent from the store) and 1 (present).
    n = np.zeros(V, np.int64)
    n[[0, 1]] = [2, 4]
    base = SenseDictionary.from_arrays(np.arange(6 * D, dtype=np.float32).reshape(6, D),
                                       np.concatenate([[0], np.cumsum(n)]))
    merged = build_sense_dictionary(store, K_DRIVER, seed=SEED, base=base, progress=False)
    np.testing.assert_array_equal(merged.token_senses(0), base.token_senses(0))
    for t in range(1, V):
        np.testing.assert_array_equal(merged.token_senses(t), sd.token_senses(t))
    other = SenseDictionary.from_arrays(np.zeros((1, D + 1), np.float32), np.r_[0, np.ones(V, int)])
    with pytest.raises(SenseJaxError, match="another teacher"):
        build_sense_dictionary(store, K_DRIVER, base=other, progress=False)


# --- issue 16 (duplicate senses, int8, merges) and issue 11 item 10 (overflow) ----------------

def test_duplicate_samples_become_one_sense_with_their_count():
    """Issue 16.1: three samples of which two are identical, K = 4: two senses (not three),
    the duplicate's count added; the same when the token is padded past K (the lax.cond branch)."""
    x = np.array([[[1, 1, 1, 1], [1, 1, 1, 1], [0, 5, 0, 0]]], np.float32)
    r = kmeans_detailed(x, np.ones((1, 3), bool), 4, key=jax.random.key(0))
    np.testing.assert_array_equal(r["n_senses"], [2])
    np.testing.assert_array_equal(r["centres"][0], [[1, 1, 1, 1], [0, 5, 0, 0], [0] * 4, [0] * 4])
    np.testing.assert_array_equal(r["counts"], [[2, 1, 0, 0]])
    np.testing.assert_array_equal(r["assignments"], [[0, 0, 1]])
    x2 = np.full((2, 8, 4), np.nan, np.float32)  # NaN at padding: must not matter
    mask = np.zeros((2, 8), bool)
    x2[0, :3], mask[0, :3] = x[0], True
    x2[1, [0, 2, 5]], mask[1, [0, 2, 5]] = [[0, 5, 0, 0], [1, 1, 1, 1], [0, 5, 0, 0]], True
    r = kmeans_detailed(x2, mask, 4, key=jax.random.key(0))
    np.testing.assert_array_equal(r["n_senses"], [2, 2])
    np.testing.assert_array_equal(r["counts"], [[2, 1, 0, 0], [2, 1, 0, 0]])
    np.testing.assert_array_equal(r["centres"][1, :2], [[0, 5, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(r["assignments"][1], [0, -1, 1, -1, -1, 0, -1, -1])
    np.testing.assert_array_equal(r["inertia"], 0)


def _duplicates(vec, offsets):
    vec[offsets[22] + 1] = vec[offsets[22]]                    # 3 samples (<= K): a, a, b
    vec[offsets[23]:offsets[23] + 3] = vec[offsets[23]]        # 3 samples: a, a, a
    vec[offsets[17] + 1] = vec[offsets[17]]                    # 4 samples (> K, clustered): a, a, b, b
    vec[offsets[17] + 3] = vec[offsets[17] + 2]


def test_build_has_no_duplicate_senses(tmp_path):
    store = zipf_store(tmp_path / "store", edit=_duplicates)
    sd = build_sense_dictionary(store, K_DRIVER, seed=SEED, progress=False)
    assert sd.duplicate_senses() == 0
    n = np.asarray(sd.n_senses)
    assert (n[22], n[23], n[17]) == (2, 1, 2)
    counts, offs = np.asarray(sd.counts), np.asarray(sd.offsets)
    np.testing.assert_array_equal(counts[offs[22]:offs[23]], [2, 1])
    np.testing.assert_array_equal(counts[offs[23]:offs[24]], [3])
    np.testing.assert_array_equal(sorted(counts[offs[17]:offs[18]]), [2, 2])
    np.testing.assert_array_equal(sd.token_senses(22), store.token_vectors(22)[1:])
    for t in np.flatnonzero(store.n_samples()):
        assert counts[offs[t]:offs[t + 1]].sum() == store.n_samples()[t]  # every sample still counted
    # 22 and 23 kept 3 samples each (merged 1 + 2); token 17's fourth cluster was empty anyway.
    assert sd.meta["stats"]["duplicate_senses_merged"] == 3 and sd.meta["stats"]["senses"] == int(n.sum())


@pytest.mark.parametrize("token", [2, 22])  # a clustered token (35 samples), one with <= K (3)
def test_vectors_whose_square_overflows_are_refused(tmp_path, token):
    """Issue 11.10: one sample of magnitude 1e20 (finite, but its f32 square is inf) was lost
    with inertia inf and no error; now refused naming the token, like NaN."""
    def big(vec, offsets):
        vec[offsets[token] + 1] = 1e20
    store = zipf_store(tmp_path / "store", edit=big)
    with pytest.raises(SenseJaxError, match=f"token {token} has vectors whose squared norm overflows float32 "
                                            r"\(\|x\| above ~1.8e19\) \(sample 1 of"):
        build_sense_dictionary(store, K_DRIVER, progress=False)
    x = np.ones((2, 6, 3), np.float32)
    x[1, 2] = [1e20, 0, 0]
    with pytest.raises(SenseJaxError, match="token row 1 of the batch has vectors whose squared norm overflows"):
        batched_kmeans(x, np.ones((2, 6), bool), 2, key=jax.random.key(0))
    x[1, 2] = 1e19  # |x|^2 = 3e38 < f32 max: accepted
    assert np.isfinite(np.asarray(batched_kmeans(x, np.ones((2, 6), bool), 2, key=jax.random.key(0)).inertia[0]))


def test_add_to_refuses_another_teacher_and_lists_every_source(tmp_path, capsys):
    """Issue 11.8(b) / 16.4: a store from teacher B is not merged into teacher A's dictionary;
    a merge of stores of one teacher lists every source."""
    teacher = {"teacher_fingerprint": "aaaa", "tokenizer_hash": "tok1", "layer": 6}
    zipf_store(tmp_path / "a", meta=teacher)
    zipf_store(tmp_path / "a2", seed=1, meta=teacher, empty=(0, 1, 2, 3))
    zipf_store(tmp_path / "b", meta=dict(teacher, teacher_fingerprint="bbbb"))
    zipf_store(tmp_path / "t", meta=dict(teacher, tokenizer_hash="tok2"))
    common = ["--k", str(K_DRIVER), "--no-progress"]
    assert main(["cluster", str(tmp_path / "a"), str(tmp_path / "A"), "--seed", "4", *common]) == 0
    for store, msg in [("b", "teacher_fingerprint aaaa != bbbb"), ("t", "tokenizer_hash tok1 != tok2")]:
        capsys.readouterr()
        assert main(["cluster", str(tmp_path / store), str(tmp_path / "M"), "--add-to", str(tmp_path / "A"),
                     *common]) == 2
        err = capsys.readouterr().err.strip()
        assert "another teacher" in err and msg in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "M").exists()
    assert main(["cluster", str(tmp_path / "a2"), str(tmp_path / "M"), "--add-to", str(tmp_path / "A"),
                 "--seed", "9", *common]) == 0
    m = SenseDictionary.load(tmp_path / "M")
    a, a2 = open_store(tmp_path / "a"), open_store(tmp_path / "a2")
    from sense_jax.fingerprints import store_fingerprint
    src = m.meta["sources"]
    assert [s["store_fingerprint"] for s in src] == [store_fingerprint(a), store_fingerprint(a2)]
    assert [s["seed"] for s in src] == [4, 9] and [s["tokens"] for s in src] == [22, 20]
    assert all(s["k_rule"]["k"] == K_DRIVER and s["teacher_fingerprint"] == "aaaa" for s in src)
    assert m.meta["merged_from"] == [s["store_fingerprint"] for s in src]
    assert m.meta["tokenizer_hash"] == "tok1" and m.duplicate_senses() == 0
    # Added as int8 to a float32 dictionary: the whole merged dictionary is int8.
    assert main(["cluster", str(tmp_path / "a2"), str(tmp_path / "M8"), "--add-to", str(tmp_path / "A"),
                 "--seed", "9", "--dtype", "int8", *common]) == 0
    m8 = SenseDictionary.load(tmp_path / "M8")
    assert m8.dtype == "int8" and len(m8.meta["sources"]) == 2
    np.testing.assert_array_equal(np.asarray(m8.offsets), np.asarray(m.offsets))


def test_cluster_int8(built, tmp_path):
    """Issue 16.3: ``cluster --dtype int8``: int8 centres with per-sense scales, each element
    within half a step of the float32 dictionary's, 3 bytes saved per element."""
    store, sd_ref = built
    argv = [str(store.path), "--k", str(K_DRIVER), "--seed", str(SEED), "--no-progress"]
    assert main(["cluster", argv[0], str(tmp_path / "i8"), *argv[1:], "--dtype", "int8"]) == 0
    sd = SenseDictionary.load(tmp_path / "i8")
    assert sd.dtype == "int8" and sd.meta["stats"]["duplicate_senses_merged"] == 0
    np.testing.assert_array_equal(np.asarray(sd.offsets), np.asarray(sd_ref.offsets))
    scale = np.asarray(sd.scales)
    np.testing.assert_allclose(scale, np.abs(np.asarray(sd_ref.centres)).max(axis=1) / 127, rtol=1e-6)
    assert np.all(np.abs(sd.float_centres() - np.asarray(sd_ref.centres)) <= scale[:, None] / 2 + 1e-6)
    sd_ref.save(tmp_path / "f32")
    size = lambda d: (tmp_path / d / "senses.safetensors").stat().st_size
    S, D = sd.centres.shape
    # 3 bytes saved per element, 4 spent per sense on its scale (header sizes differ a little).
    assert abs((size("f32") - size("i8")) - (3 * S * D - 4 * S)) < 100


def _tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cluster_overwrite_never_deletes_the_store_or_a_user_directory(tmp_path, capsys):
    """Fresh-user trial: ``cluster STORE STORE --overwrite`` exited 0 and replaced the store by the
    dictionary; ``cluster DIR/st2 DIR --overwrite`` deleted st2 with DIR; a user's directory or
    file at OUT was replaced. Now each is refused (exit 2, one line naming OUT), before clustering,
    and nothing is touched."""
    zipf_store(tmp_path / "st")
    zipf_store(tmp_path / "d" / "st2")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "keep.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine too")
    V = open_store(tmp_path / "st").vocab_size
    SenseDictionary.from_arrays(np.ones((V, 8), np.float32), np.arange(V + 1)).save(tmp_path / "o" / "A")
    before = _tree_bytes(tmp_path)
    st, st2 = str(tmp_path / "st"), str(tmp_path / "d" / "st2")
    for args, msg in [
        ([st, st], f"output {st} is the input {st}"),
        ([st2, str(tmp_path / "d")], f"output {tmp_path / 'd'} holds the input {st2}"),
        ([st, str(tmp_path / "o"), "--add-to", str(tmp_path / "o" / "A")], "holds the input"),
        ([st, str(tmp_path / "user")], f"{tmp_path / 'user'} exists and is not a sense dictionary"),
        ([st, str(tmp_path / "file.txt")], f"{tmp_path / 'file.txt'} exists and is not a sense dictionary"),
    ]:
        capsys.readouterr()
        assert main(["cluster", *args, "--overwrite", "--k", "2", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
        assert _tree_bytes(tmp_path) == before
    with pytest.raises(SenseJaxError, match="is not a sense dictionary"):  # the library call too
        SenseDictionary.load(tmp_path / "o" / "A").save(tmp_path / "user", overwrite=True)
    assert _tree_bytes(tmp_path) == before
