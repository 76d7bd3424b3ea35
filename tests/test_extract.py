"""Teacher extraction (METHOD.md §1): exact uniform per-token sampling, the store, sharding across
devices and processes, resumption after kills, and bad input.

References: transformers' PyTorch BertModel (hidden states), the teacher's own tokenizer (counts),
brute-force bottom-k (sample), scipy's chi-square test (uniformity).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from sense_jax.errors import SenseJaxError
from sense_jax.store import open_store

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from extract_worker import make_corpus, make_tiny_teacher  # noqa: E402

from sense_jax import extract as ex  # noqa: E402

ARRAYS = ("vectors.npy", "offsets.npy", "counts.npy", "sources.npy", "meta.json", "COMPLETE")
RUN = dict(n_per_token=3, seed=0, batch_size=4, window_passages=16, chunk_passages=16, progress=False)


def _digest(store: Path) -> dict[str, str]:
    """sha256 of every file; meta.json without its ``provenance`` (which names the devices)."""
    import jax

    def content(f: str) -> bytes:
        if f != "meta.json":
            return (store / f).read_bytes()
        meta = json.loads((store / f).read_text())
        assert meta.pop("provenance")["versions"]["jax"] == jax.__version__
        return json.dumps(meta, sort_keys=True).encode()

    return {f: hashlib.sha256(content(f)).hexdigest() for f in ARRAYS}


def _worker(*args, env_extra=None, **popen):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, str(HERE / "extract_worker.py"), *map(str, args),
           "--n", "3", "--batch-size", "4", "--window", "16", "--chunk", "16"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- Fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_dir):
    from sense_jax import load_model

    d = make_tiny_teacher(tmp_path_factory.mktemp("tiny") / "teacher", minilm_dir)
    return d, load_model(d)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sentences):
    return make_corpus(sentences, tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def spawned(tiny, corpus, tmp_path_factory):
    """Subprocess runs started early, in the background (they need fresh processes for XLA_FLAGS
    and jax.distributed): 8 simulated devices; 2 processes x 2 devices over gloo; a run killed
    with os._exit in the middle of the forward pass."""
    root = tmp_path_factory.mktemp("spawned")
    port = _free_port()
    runs = {
        "dev8": (root / "d8" / "store", [_worker(tiny[0], corpus, root / "d8" / "store", "--devices", 8)]),
        "proc2": (root / "p2" / "store", [
            _worker(tiny[0], corpus, root / "p2" / "store", "--devices", 2, "--process-id", i,
                    "--num-processes", 2, "--port", port) for i in range(2)]),
        "killed": (root / "k" / "store", [_worker(tiny[0], corpus, root / "k" / "store", "--fail-at", "step:5")]),
    }
    yield runs
    for _, procs in runs.values():
        for p in procs:
            if p.poll() is None:
                p.kill()


def _wait(procs) -> list[tuple[int, str]]:
    logs = [p.communicate(timeout=300)[0] for p in procs]
    return [(p.returncode, log) for p, log in zip(procs, logs)]


@pytest.fixture(scope="module")
def store_a(tiny, corpus, spawned, tmp_path_factory):
    """The reference: tiny teacher, 1 device, one uninterrupted in-process run."""
    return ex.extract(tiny[1], corpus, tmp_path_factory.mktemp("a") / "store", **RUN)


def test_extraction_leaves_the_model_object_alone(tiny, store_a):
    # nothing cached on the caller's model (the tokenizer hash and the replicated params live in
    # explicit caches of sense_jax.extract / extract_forward)
    assert sorted(k for k in vars(tiny[1]) if k.startswith("_extract")) == []


# --- Sampling: exact bottom-k and uniformity -------------------------------------------------------

def test_bottom_k_streaming_equals_brute_force():
    rng = np.random.default_rng(0)
    n, V, k = 6000, 40, 7
    tok = (rng.zipf(1.6, n) % V).astype(np.int32)
    passage = np.repeat(np.arange(n // 20), 20)
    position = np.tile(np.arange(20), n // 20)
    keys = ex.occurrence_keys(5, passage, position)
    assert len(np.unique(keys)) == n  # distinct occurrences never tie
    expected = set()
    for t in range(V):
        idx = np.flatnonzero(tok == t)
        expected |= {(t, int(passage[i]), int(position[i])) for i in idx[np.argsort(keys[idx])[:k]]}
    for chunk in (1, 97, n):  # chunking and order must not matter
        s = ex.BottomK(V, k, seed=5, merge_every=64)
        order = rng.permutation(n)
        for i in range(0, n, chunk):
            j = order[i:i + chunk]
            s.add(tok[j], passage[j], position[j])
        t, p, q = s.result()
        assert set(zip(t.tolist(), p.tolist(), q.tolist())) == expected
        assert np.all(np.diff(np.lexsort((q, p, t))) == 1)  # sorted by (token, passage, position)
    assert not np.array_equal(ex.occurrence_keys(6, passage, position), keys)


def test_sample_is_uniform_over_subsets_chi_square():
    """All C(6, 2) = 15 subsets of a token's 6 occurrences are equally likely (exact uniformity
    without replacement, not only the marginals), over 3000 fixed seeds."""
    from scipy.stats import chisquare

    p = np.array([0, 3, 3, 17, 40, 41])
    q = np.array([5, 1, 9, 2, 0, 30])
    tok = np.zeros(6, np.int32)

    def bottom_k(seed):
        s = ex.BottomK(1, 2, seed)
        s.add(tok, p, q)
        return tuple(zip(*s.result()[1:]))

    counts: dict[tuple, int] = {}
    for seed in range(3000):
        chosen = bottom_k(seed)
        counts[chosen] = counts.get(chosen, 0) + 1
    subsets = list(itertools.combinations(zip(p.tolist(), q.tolist()), 2))
    observed = [counts.get(tuple(sorted(s)), 0) for s in subsets]
    assert sum(observed) == 3000 and len(counts) == 15
    assert chisquare(observed).pvalue > 1e-3
    # The same test rejects a biased sampler (the reference's "first N, then replace"):
    biased = [3000 if i == 0 else 0 for i in range(15)]
    assert chisquare(biased).pvalue < 1e-6


def test_kept_positions_of_a_frequent_token_are_uniform(tiny, sentences):
    """Over 400 seeds, each occurrence of "the" in the corpus is kept equally often (chi-square
    over the occurrences, i.e. over their passages and positions)."""
    from scipy.stats import chisquare

    tok = tiny[1].tokenizer  # MiniLM's tokenizer
    ids = tok(sentences)["input_ids"]
    the = tok.convert_tokens_to_ids("the")
    occ = [(p, i) for p, row in enumerate(ids) for i, t in enumerate(row) if t == the]
    M, k, seeds = len(occ), 5, 400
    assert M >= 20
    p = np.array([o[0] for o in occ])
    q = np.array([o[1] for o in occ])
    hits = np.zeros(M, np.int64)
    index = {o: j for j, o in enumerate(occ)}
    for seed in range(seeds):
        s = ex.BottomK(the + 1, k, seed)
        s.add(np.full(M, the, np.int32), p, q)
        _, kp, kq = s.result()
        assert len(kp) == k
        for o in zip(kp.tolist(), kq.tolist()):
            hits[index[o]] += 1
    assert hits.sum() == k * seeds
    assert chisquare(hits).pvalue > 1e-3
    # keeping the first k occurrences (as the reference code starts) is rejected
    first = np.zeros(M, np.int64)
    first[:k] = seeds
    assert chisquare(first).pvalue < 1e-6


# --- The store against independent references ----------------------------------------------------

def test_minilm_store_matches_tokenizer_counts_and_pytorch(minilm_dir, sentences, tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    corpus = tmp_path / "sentences.txt"
    corpus.write_text("\n".join(sentences) + "\n\n", encoding="utf-8")
    N = 2
    out = ex.extract(str(minilm_dir), corpus, tmp_path / "store", n_per_token=N, seed=3,
                     batch_size=8, progress=False)
    st = open_store(out)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    ids = tok(sentences, truncation=True, max_length=512)["input_ids"]
    special = set(tok.all_special_ids)
    counts = np.zeros(tok.vocab_size, np.int64)
    for row in ids:
        for t in row:
            if t not in special:
                counts[t] += 1
    np.testing.assert_array_equal(st.occurrences, counts)
    np.testing.assert_array_equal(st.n_samples(), np.minimum(counts, N))
    assert not set(st.token_ids().tolist()) & special
    # every kept row is an occurrence of its token, rows ordered by (passage, position)
    for t in st.token_ids():
        src = st.token_sources(t)
        assert all(ids[p][i] == t for p, i in src)
        assert np.all(np.diff(src[:, 0] * 10_000 + src[:, 1]) > 0)
    # the kept set is, per token, the N occurrences with the smallest seed-3 keys
    occ = np.array([(t, p, i) for p, row in enumerate(ids) for i, t in enumerate(row)
                    if t not in special])
    keys = ex.occurrence_keys(3, occ[:, 1], occ[:, 2])
    order = np.lexsort((keys, occ[:, 0]))
    first = np.r_[True, occ[order[1:], 0] != occ[order[:-1], 0]]
    rank = np.arange(len(order)) - np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    expected = {tuple(x) for x in occ[order[rank < N]].tolist()}
    stored = {(int(t), int(p), int(i)) for t in st.token_ids() for p, i in st.token_sources(t)}
    assert stored == expected
    meta = st.meta
    assert meta["n_per_token"] == N and meta["seed"] == 3 and meta["layer"] == 6
    assert meta["summary"]["passages"] == len(sentences)
    assert meta["summary"]["tokens_seen"] == counts.sum()
    assert meta["summary"]["distinct_tokens"] == (counts > 0).sum()
    assert meta["summary"]["tokens_at_cap"] == (counts >= N).sum()
    assert meta["summary"]["empty_skipped"] == 1
    # vectors = transformers' PyTorch last hidden states of each passage alone (no padding)
    model = AutoModel.from_pretrained(str(minilm_dir)).eval()
    passages = np.random.default_rng(0).choice(len(sentences), 12, replace=False)
    batch = tok([sentences[p] for p in passages], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state.numpy()
    rows = np.flatnonzero(np.isin(st.sources[:, 0], passages))
    assert len(rows) > 30
    for r in rows:
        p, i = st.sources[r]
        np.testing.assert_allclose(st.vectors[r], ref[list(passages).index(p), i], atol=3e-5, rtol=1e-4)


def test_dtypes_and_layer(tiny, corpus, store_a, tmp_path):
    import torch
    from transformers import AutoModel

    a = open_store(store_a)
    bf = open_store(ex.extract(tiny[1], corpus, tmp_path / "bf16", **dict(RUN, dtype="bfloat16")))
    assert bf.vectors.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bf.vectors.view(np.uint16),
                                  np.asarray(a.vectors).astype(ml_dtypes.bfloat16).view(np.uint16))
    np.testing.assert_array_equal(bf.sources, a.sources)  # the sample does not depend on dtype
    h1 = open_store(ex.extract(tiny[1], corpus, tmp_path / "l1", **dict(RUN, dtype="float16", layer=1)))
    assert h1.vectors.dtype == np.float16 and h1.meta["layer"] == 1
    texts = corpus.read_bytes().decode("utf-8", "replace").split("\n")
    texts = [t.strip() for t in texts if t.strip()]
    ref = AutoModel.from_pretrained(str(tiny[0])).eval()
    enc = tiny[1].tokenizer(texts, truncation=True, max_length=h1.meta["max_length"])["input_ids"]
    rows = np.arange(0, len(h1.vectors), 7)
    passages = sorted(set(h1.sources[rows, 0].tolist()))
    width = max(len(enc[p]) for p in passages)
    ids = torch.tensor([enc[p] + [0] * (width - len(enc[p])) for p in passages])
    mask = torch.tensor([[1] * len(enc[p]) + [0] * (width - len(enc[p])) for p in passages])
    with torch.no_grad():
        hs = ref(ids, attention_mask=mask, output_hidden_states=True).hidden_states[1].numpy()
    for r in rows:
        p, i = h1.sources[r]
        np.testing.assert_allclose(h1.vectors[r].astype(np.float32), hs[passages.index(p), i],
                                   atol=2e-3, rtol=2e-3)


# --- Same bytes on 8 devices and on 2 processes ---------------------------------------------------

def test_eight_devices_and_two_processes_write_identical_stores(spawned, store_a):
    ref = _digest(store_a)
    out8, procs8 = spawned["dev8"]
    ((rc, log),) = _wait(procs8)
    assert rc == 0 and "devices=8 processes=1" in log, log
    # the store paths differ, but meta.json names only the teacher and corpus paths
    assert _digest(out8) == ref
    out2, procs2 = spawned["proc2"]
    results = _wait(procs2)
    assert all(rc == 0 for rc, _ in results), results
    assert "devices=4 processes=2" in results[0][1]
    assert _digest(out2) == ref


# --- Resumption ----------------------------------------------------------------------------------

def test_killed_runs_resume_to_identical_store(tiny, corpus, store_a, spawned, tmp_path, monkeypatch):
    ref = _digest(store_a)
    # a real kill (os._exit: no cleanup, no flush) in the middle of the forward pass
    out, procs = spawned["killed"]
    ((rc, log),) = _wait(procs)
    assert rc == 86, log
    assert not out.exists() and (out.parent / "store.partial" / "progress.json").exists()
    assert json.loads((out.parent / "store.partial" / "progress.json").read_text())["windows_done"] > 0
    with pytest.raises(SenseJaxError, match="store not found"):
        open_store(out)
    assert _digest(ex.extract(tiny[1], corpus, out, **RUN)) == ref
    assert not (out.parent / "store.partial").exists()
    # failures at other points (in-process, through the fault hook), each followed by a plain re-run
    from sense_jax import extract_job

    for point in ("count:2", "counted:0", "planned:0", "window:3", "final:0", "final:1"):
        out = tmp_path / point.replace(":", "_") / "store"

        def fail(stage, k, point=point):
            if f"{stage}:{k}" == point:
                raise RuntimeError(f"injected failure at {point}")
        monkeypatch.setattr(extract_job, "FAULT_HOOK", fail)
        with pytest.raises(RuntimeError, match="injected"):
            ex.extract(tiny[1], corpus, out, **RUN)
        assert out.exists() == (point == "final:1")
        monkeypatch.setattr(extract_job, "FAULT_HOOK", None)
        assert _digest(ex.extract(tiny[1], corpus, out, **RUN)) == ref, point
        assert not (out.parent / "store.partial").exists()


# --- Corpus formats and bad input ----------------------------------------------------------------

def test_corpus_formats(tmp_path, tiny, corpus, store_a):
    from sense_jax.corpus import CorpusStats, iter_passages

    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_bytes(b"one\n\n two \r\nbad \xff\n")
    with gzip.open(d / "sub" / "b.jsonl.gz", "wt") as f:
        f.write('{"body": "three"}\nnot json\n{"text": "x"}\n{"body": ""}\n{"body": "four"}\n')
    (d / ".hidden").write_text("never\n")
    stats = CorpusStats()
    assert list(iter_passages(d, "body", stats)) == ["one", "two", "bad \ufffd",
                                                     "three", "four"]
    assert (stats.files, stats.passages, stats.empty_skipped, stats.malformed_skipped,
            stats.undecodable_replaced) == (2, 5, 2, 2, 1)
    # the same passages through JSONL give the same sample and vectors as plain text
    js = tmp_path / "corpus.jsonl"
    texts = [t.strip() for t in corpus.read_bytes().decode("utf-8", "replace").split("\n") if t.strip()]
    js.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    st = open_store(ex.extract(tiny[1], js, tmp_path / "js", **RUN))
    a = open_store(store_a)
    np.testing.assert_array_equal(st.sources, a.sources)
    np.testing.assert_array_equal(st.vectors, a.vectors)
    assert st.meta["corpus_fingerprint"] == a.meta["corpus_fingerprint"]
    assert a.meta["summary"]["undecodable_replaced"] == 1 and a.meta["summary"]["truncated"] > 0


def test_saved_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    from sense_jax.corpus import iter_passages

    datasets.Dataset.from_dict({"text": ["a b", "", "c"]}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_passages(tmp_path / "ds")) == ["a b", "c"]


def test_bad_input(tiny, corpus, store_a, tmp_path, minilm_dir):
    from sense_jax.cli import main

    model = tiny[1]
    with pytest.raises(SenseJaxError, match="N.*>= 1"):
        ex.extract(model, corpus, tmp_path / "s", **dict(RUN, n_per_token=0))
    with pytest.raises(SenseJaxError, match="corpus not found: .*missing.txt"):
        ex.extract(model, tmp_path / "missing.txt", tmp_path / "s", **RUN)
    with pytest.raises(SenseJaxError, match="layer 3 out of range for a 2-layer teacher"):
        ex.extract(model, corpus, tmp_path / "s", **dict(RUN, layer=3))
    with pytest.raises(SenseJaxError, match="unknown store dtype 'int8'"):
        ex.extract(model, corpus, tmp_path / "s", **dict(RUN, dtype="int8"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(SenseJaxError, match="empty.txt holds no passages"):
        ex.extract(model, empty, tmp_path / "s", **RUN)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SenseJaxError, match="cannot write the output"):
        ex.extract(model, corpus, blocker / "store", **RUN)
    # an existing store made with another seed or teacher is refused and left intact
    before = _digest(store_a)
    with pytest.raises(SenseJaxError, match="seed: stored 0 vs requested 1"):
        ex.extract(model, corpus, store_a, **dict(RUN, seed=1))
    other = make_tiny_teacher(tmp_path / "other", minilm_dir, seed=1)
    with pytest.raises(SenseJaxError, match="teacher: stored"):
        ex.extract(str(other), corpus, store_a, **RUN)
    assert _digest(store_a) == before and not Path(str(store_a) + ".partial").exists()
    assert ex.extract(model, corpus, store_a, **RUN) == store_a  # same settings: nothing to do
    # the CLI: one error line, exit status 2
    assert main(["extract", str(tiny[0]), str(corpus), str(store_a), "-n", "3",
                 "--seed", "1", "--no-progress"]) == 2
    # --overwrite replaces it atomically
    new = tmp_path / "copy"
    ex.extract(model, corpus, new, **RUN)
    ex.extract(model, corpus, new, **dict(RUN, seed=1), overwrite=True)
    assert open_store(new).meta["seed"] == 1
    assert not np.array_equal(open_store(new).sources, open_store(store_a).sources)


def test_cli_extract(tiny, corpus, store_a, tmp_path, capsys):
    from sense_jax.cli import main

    out = tmp_path / "cli"
    assert main(["extract", str(tiny[0]), str(corpus), str(out), "-n", "3", "--batch-size", "4",
                 "--window", "16", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "passages: 120" in text and "forward passes saved" in text
    # the CLI's counting chunk size differs: it changes nothing
    assert _digest(out) == _digest(store_a)


def test_packed_extraction_same_samples_close_vectors_at_most_two_programs(tiny, corpus, store_a, tmp_path, capsys,
                                                                          monkeypatch):
    """Issue 15 item 2: ``pack=True`` writes the same samples with vectors within float rounding
    of the unpacked store, compiles at most two forward programs where the unpacked run
    compiles one per length bucket, and records ``packed: true`` (a store of the other kind at
    the same path is refused)."""
    from sense_jax import extract_forward as ef
    from sense_jax.cli import main

    def traces(run):
        ef._FORWARD_CACHE.clear()  # a fresh jitted forward: every program it needs is traced
        n = len(ef.FORWARD_TRACES)
        out = run()
        return out, ef.FORWARD_TRACES[n:]

    packed, packed_traces = traces(lambda: ex.extract(tiny[1], corpus, tmp_path / "packed", pack=True, **RUN))
    plain, plain_traces = traces(lambda: ex.extract(tiny[1], corpus, tmp_path / "plain", **RUN))
    assert _digest(plain) == _digest(store_a)  # the default is unchanged
    assert all(p for p, _ in packed_traces) and not any(p for p, _ in plain_traces)
    assert 1 <= len(packed_traces) <= 2 < len(plain_traces), (packed_traces, plain_traces)
    a, b = open_store(store_a), open_store(packed)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.occurrences, b.occurrences)
    np.testing.assert_array_equal(a.sources, b.sources)
    assert np.abs(np.asarray(a.vectors) - np.asarray(b.vectors)).max() < 1e-5
    assert b.meta["packed"] is True and "packed" not in a.meta
    with pytest.raises(SenseJaxError, match="packed: stored None vs requested True"):
        ex.extract(tiny[1], corpus, store_a, pack=True, **RUN)
    # The CLI's --pack gives the packed store.
    out = tmp_path / "cli"
    assert main(["extract", str(tiny[0]), str(corpus), str(out), "-n", "3", "--batch-size", "4",
                 "--window", "16", "--no-progress", "--pack"]) == 0
    capsys.readouterr()
    assert _digest(out) == _digest(packed)
    # A packed run stopped after window 3 resumes to the same store.
    from sense_jax import extract_job

    def fail(stage, k):
        if (stage, k) == ("window", 3):
            raise RuntimeError("injected failure")
    monkeypatch.setattr(extract_job, "FAULT_HOOK", fail)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="injected"):
        ex.extract(tiny[1], corpus, out, pack=True, **RUN)
    monkeypatch.setattr(extract_job, "FAULT_HOOK", None)
    assert _digest(ex.extract(tiny[1], corpus, out, pack=True, **RUN)) == _digest(packed)


def _tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_spares_the_inputs_and_user_directories(tiny, corpus, tmp_path, capsys):
    """Fresh-user trial: ``extract TEACHER CORPUS OUT --overwrite`` deleted the corpus or the
    teacher when OUT held them, and wiped a user's directory at OUT (only a store may be replaced);
    ``--batch-size 0`` and ``--window 0`` named three settings. Now each is refused (exit 2, one
    line naming what is at fault) and nothing is touched."""
    from sense_jax.cli import main

    teacher = str(tiny[0])
    for d in ("o1", "o3.partial"):
        (tmp_path / d).mkdir()
        shutil.copy(corpus, tmp_path / d / "corpus.txt")
    shutil.copytree(teacher, tmp_path / "o2" / "teacher")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "keep.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine too")
    (tmp_path / "empty").mkdir()
    (tmp_path / "named").mkdir()  # a user's own files that happen to bear store file names
    (tmp_path / "named" / "meta.json").write_text('{"my": "notes"}')
    ex.extract(tiny[1], corpus, tmp_path / "done", **RUN)  # a complete store, with a user's file beside it
    (tmp_path / "done" / "NOTES.md").write_text("my analysis")
    before = _tree_bytes(tmp_path)
    o1 = tmp_path / "o1"
    for (t, c, out, *flags), msg in [
        ((teacher, o1 / "corpus.txt", o1), f"output {o1} holds the input {o1 / 'corpus.txt'}"),
        ((tmp_path / "o2" / "teacher", corpus, tmp_path / "o2"), "holds the input"),
        ((teacher, corpus, corpus), f"output {corpus} is the input {corpus}"),
        ((teacher, tmp_path / "o3.partial" / "corpus.txt", tmp_path / "o3"), "o3.partial holds the input"),
        ((teacher, corpus, tmp_path / "user"), f"{tmp_path / 'user'} exists and is not an extraction store"),
        ((teacher, corpus, tmp_path / "file.txt"), f"{tmp_path / 'file.txt'} exists and is not a store"),
        ((teacher, corpus, tmp_path / "named"), f"{tmp_path / 'named'} exists and is not an extraction store"),
        ((teacher, corpus, tmp_path / "done", "--seed", "1"), f"{tmp_path / 'done'} exists and is not an extraction store"),
        ((teacher, corpus, tmp_path / "new", "--batch-size", "0"), "--batch-size must be >= 1, got 0"),
        ((teacher, corpus, tmp_path / "new", "--window", "0"), "--window must be >= 1, got 0"),
    ]:
        capsys.readouterr()
        assert main(["extract", str(t), str(c), str(out), "--overwrite", "-n", "3", *flags, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
        assert _tree_bytes(tmp_path) == before and not (tmp_path / "new").exists()
    with pytest.raises(SenseJaxError, match="^window_passages must be >= 1, got 0$"):
        ex.extract(tiny[1], corpus, tmp_path / "new", **dict(RUN, window_passages=0))
    # an empty directory may be replaced
    ex.extract(tiny[1], corpus, tmp_path / "empty", **RUN, overwrite=True)
    assert (tmp_path / "empty" / "COMPLETE").exists()
