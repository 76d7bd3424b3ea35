"""Public sense benchmarks: readers on tiny fixtures in the real formats, metrics by hand, the CLI.

The benchmark data itself is never in the repository; the last tests read ../shared/evaldata
where it exists and skip otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sense_jax.benchmarks import coarsewsd20, common, scws, wic, wordsim
from sense_jax.errors import SenseJaxError
from sense_jax.sense_dict import SenseDictionary

from conftest import EVALDATA, need_evaldata


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, minilm_dir) -> Path:
    """A random 2-layer BERT (D = 32) with the real MiniLM tokenizer (transformers directory)."""
    from transformers import BertConfig

    from conftest import save_tiny_hf_model

    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return save_tiny_hf_model(tmp_path_factory.mktemp("tiny") / "model", cfg, tokenizer_dir=minilm_dir)


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> common.BenchModel:
    return common.load_bench_model(tiny_dir)


def tiny_dict(bm, out: Path, words=("bank", "bass", "plant", "car", "cat"), k=3, fingerprint=None) -> Path:
    """A dictionary with k random senses for each word's token (the fixtures' words)."""
    from sense_jax.fingerprints import teacher_fingerprint
    from sense_jax.sense_dict import SenseDictionary

    vocab = bm.tokenizer.get_vocab()
    V, D = int(bm.model.config.vocab_size), int(bm.model.config.hidden_size)
    n = np.zeros(V, np.int64)
    for w in words:
        n[vocab[w]] = k
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(int(n.sum()), D)).astype(np.float32)
    meta = {"teacher_fingerprint": fingerprint or teacher_fingerprint(bm.model.params, V), "layer": bm.layer}
    sd = SenseDictionary.from_arrays(centres, np.concatenate([[0], np.cumsum(n)]),
                                     rng.integers(1, 5, size=int(n.sum())), meta)
    return sd.save(out)


def write(path: Path, text: str, newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return path


# --- the shared word -> tokens rule ---------------------------------------------------------------

def test_word_tokens_from_offsets(minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    words = "The riverbanks sat by the river .".split()
    text, a, b = common.char_span(words, 1, 2)
    assert text[a:b] == "riverbanks"
    enc = tok(text, return_offsets_mapping=True)
    pos = common.token_positions(enc["offset_mapping"], a, b)
    assert tok.convert_ids_to_tokens([enc["input_ids"][p] for p in pos]) == ["river", "##bank", "##s"]
    text, a, b = common.char_span(words, 4, 6)  # a two-word target
    assert text[a:b] == "the river"
    pos = common.token_positions(tok(text, return_offsets_mapping=True)["offset_mapping"], a, b)
    assert len(pos) == 2


def test_contextual_vector_is_the_mean_of_the_words_tokens_in_pytorch(tiny, tiny_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    words = "The riverbanks sat by the river .".split()
    ws = common.encode_targets(tiny, [common.Target(words, 1), common.Target(words, 5)])
    got = common.contextual_vectors(ws)
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert tok.tokenize(" ".join(words))[1:4] == ["river", "##bank", "##s"]  # positions 2-4 after [CLS]
    with torch.no_grad():
        h = AutoModel.from_pretrained(str(tiny_dir)).eval()(**tok(" ".join(words), return_tensors="pt"))[0][0]
    np.testing.assert_allclose(got[0], h[2:5].mean(0).numpy(), atol=2e-5)
    np.testing.assert_allclose(got[1], h[8].numpy(), atol=2e-5)
    assert ws.ids[0].tolist() == tok.convert_tokens_to_ids(["river", "##bank", "##s"])


def test_truncated_target_is_not_covered(tiny):
    words = ["word"] * 80 + ["bank"]
    ws = common.encode_targets(tiny, [common.Target(words, 80), common.Target(words, 0)])
    assert ws.covered.tolist() == [False, True] and np.isnan(common.contextual_vectors(ws)[0]).all()


def test_packed_passages_match_each_sentence_alone_in_pytorch(tiny, tiny_dir, monkeypatch):
    """Several sentences share a packed row (segment ids); each target's states are those of its
    sentence read alone by transformers; a long one goes through the bucketed path."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    sents = ["The bank of the river .", "He plays bass guitar in a band .", "A plant grew ."]
    targets = [common.Target(s.split(), i) for s, i in zip(sents, (1, 2, 1))]
    monkeypatch.setattr(common, "ROW_LENGTH", 16)  # two rows; the 10-token sentence shares one
    monkeypatch.setattr(common, "ROW_TOKENS", 32)
    long = common.Target(("word " * 20 + "bank").split(), 20)  # 23 tokens: longer than a row
    tiny._cache.clear()
    ws = common.encode_targets(tiny, targets + [long])
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    model = AutoModel.from_pretrained(str(tiny_dir)).eval()
    for t, got in zip(targets + [long], common.contextual_vectors(ws)):
        enc = tok(" ".join(t.words), return_tensors="pt")
        with torch.no_grad():
            h = model(**enc)[0][0]
        pos = 1 + len(tok.tokenize(" ".join(t.words[:t.start])))
        np.testing.assert_allclose(got, h[pos].numpy(), atol=2e-5)


def test_window_crops_the_context_around_the_target(tiny, tiny_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    # [CLS] a b c d e [SEP], target c (position 3): two tokens each side, then only what exists
    offsets = [(0, 0), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (0, 0)]
    ids = [101, 1, 2, 3, 4, 5, 102]
    assert common.crop_to_window(ids, offsets, [3], 2, 64) == ([101, 1, 2, 3, 4, 5, 102], [3])
    assert common.crop_to_window(ids, offsets, [3], 1, 64) == ([101, 2, 3, 4, 102], [2])
    assert common.crop_to_window(ids, offsets, [1], 1, 64) == ([101, 1, 2, 102], [1])
    assert common.crop_to_window(ids, offsets, [3], 5, 5) == ([101, 2, 3, 4, 102], [2])  # the limit
    assert common.crop_to_window(ids, offsets, [2, 3, 4], 0, 4) == ([], [])  # the word alone is too long
    # A target past the model's 64 positions is read (not lost) with a window, as transformers
    # reads "word word word bank" alone.
    words = ["word"] * 80 + ["bank"]
    ws = common.encode_targets(tiny, [common.Target(words, 80)], window=3)
    assert ws.covered.tolist() == [True]
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    with torch.no_grad():
        h = AutoModel.from_pretrained(str(tiny_dir)).eval()(**tok("word word word bank", return_tensors="pt"))[0][0]
    np.testing.assert_allclose(common.contextual_vectors(ws)[0], h[4].numpy(), atol=2e-5)
    with pytest.raises(SenseJaxError, match="window"):
        common.encode_targets(tiny, [common.Target(words, 80)], window=-1)


def test_one_sense_is_the_count_weighted_mean_of_senses():
    from sense_jax.sense_dict import SenseDictionary

    sd = SenseDictionary.from_arrays(np.array([[0, 0], [2, 2], [1, -1]], np.float32), [0, 2, 2, 3], [1, 3, 5])
    table, has = common.one_sense_table(sd)
    np.testing.assert_allclose(table, [[1.5, 1.5], [0, 0], [1, -1]])
    assert has.tolist() == [True, False, True]


def test_layer_and_dictionary_checks(tiny, tiny_dir, tmp_path):
    with pytest.raises(SenseJaxError, match="out of range"):
        common.load_bench_model(tiny_dir, layer=3)
    assert common.load_bench_model(tiny_dir, layer=-1).layer == 2
    other = tiny_dict(tiny, tmp_path / "other", fingerprint="0123456789abcdef")
    with pytest.raises(SenseJaxError, match="fingerprint 0123456789abcdef"):
        common.load_senses(other, tiny)
    mid = common.load_bench_model(tiny_dir, layer=1)
    with pytest.raises(SenseJaxError, match="layer 2 hidden states but --layer is 1"):
        common.load_senses(tiny_dict(tiny, tmp_path / "d"), mid)


def test_dictionaries_of_either_fingerprint_version_and_students_are_accepted(tiny, tmp_path):
    """A dictionary as extraction records it today (version-2 fingerprint, covering the
    tokenizer) is accepted for its own teacher; one of another teacher is refused; a student with
    an adaptor is scored with its teacher's dictionary whatever teacher layer that was read from."""
    import dataclasses

    from sense_jax.fingerprints import teacher_fingerprint

    V = int(tiny.model.config.vocab_size)
    v2 = teacher_fingerprint(tiny.model.params, V, tiny.tokenizer)
    assert v2.startswith("v2-") and tiny.fingerprint == v2
    common.load_senses(tiny_dict(tiny, tmp_path / "v2", fingerprint=v2), tiny)
    common.load_senses(tiny_dict(tiny, tmp_path / "v1"), tiny)  # version 1: the embedding matrix
    with pytest.raises(SenseJaxError, match="fingerprint v2-0123"):
        common.load_senses(tiny_dict(tiny, tmp_path / "v2x", fingerprint="v2-0123456789abcdef"), tiny)
    student = dataclasses.replace(tiny, adaptor={"weight": np.eye(32, dtype=np.float32),
                                                 "bias": np.zeros(32, np.float32)},
                                  fingerprint=v2, embedding_fingerprint=None)
    teacher_layer6 = SenseDictionary.load(tiny_dict(tiny, tmp_path / "l6", fingerprint=v2))
    teacher_layer6.meta["layer"] = 6
    common.load_senses(teacher_layer6.save(tmp_path / "l6b"), student)


# --- WiC -----------------------------------------------------------------------------------------

WIC_TRAIN = ("bank\tN\t4-1\tHe sat on the bank .\tThe bank was closed .\n"
             "bank\tN\t1-3\tThe bank lends money .\tShe robbed a bank yesterday .\n"
             "plant\tN\t1-1\tThe plant grew .\tThe plant closed .\n"
             "bass\tN\t0-2\tbass is a fish .\tHe plays bass .\n")
WIC_DEV = ("bass\tN\t2-1\tHe plays bass guitar .\tThe bass sings low .\n"
           "car\tN\t1-1\tThe car stopped .\tA car crashed .\n")


def wic_fixture(root: Path) -> Path:
    write(root / "train" / "train.data.txt", WIC_TRAIN)
    write(root / "train" / "train.gold.txt", "F\nT\nF\nF\n")
    write(root / "dev" / "dev.data.txt", WIC_DEV)
    write(root / "dev" / "dev.gold.txt", "F\nT\n")
    return root


def test_wic_threshold_by_hand():
    t, acc = wic.best_threshold(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, True, False, True]))
    assert t == 0.4 and acc == 1.0
    t, acc = wic.best_threshold(np.array([0.9, 0.2, 0.5]), np.array([False, True, True]))
    assert acc == pytest.approx(2 / 3)  # sim >= 0.2 says T, T, T: 2 of 3 right; nothing does better


def test_wic_reader_and_bad_lines(tmp_path):
    root = wic_fixture(tmp_path / "wic")
    pairs = wic.read_wic(*wic.split_files(root, "train"))
    assert len(pairs) == 4 and pairs[0].a.words[4] == "bank" and pairs[1].label is True
    bad = write(tmp_path / "x.data.txt", WIC_TRAIN + "bank\tN\t1-1\tonly four fields\n")
    with pytest.raises(SenseJaxError, match=r"x\.data\.txt:5: expected 5 tab-separated fields"):
        wic.read_wic(bad)
    bad = write(tmp_path / "y.data.txt", "bank\tN\t9-1\tThe bank .\tThe bank .\n")
    with pytest.raises(SenseJaxError, match=r"y\.data\.txt:1: target index 9 outside sentence1 of 3 words"):
        wic.read_wic(bad)
    with pytest.raises(SenseJaxError, match=r"e\.data\.txt: no pairs"):
        wic.read_wic(write(tmp_path / "e.data.txt", ""), write(tmp_path / "e.gold.txt", ""))
    write(tmp_path / "g.data.txt", WIC_DEV)
    with pytest.raises(SenseJaxError, match=r"g\.gold\.txt:2: label 'X'"):
        wic.read_wic(tmp_path / "g.data.txt", write(tmp_path / "g.gold.txt", "T\nX\n"))


def test_wic_accuracy_follows_the_tuned_threshold(tiny, tmp_path):
    from sklearn.metrics import accuracy_score

    root = wic_fixture(tmp_path / "wic")
    sd = common.load_senses(tiny_dict(tiny, tmp_path / "senses"), tiny)
    res = wic.evaluate(tiny, root, sd, "senses")
    assert set(res["variants"]) == {"contextual", "senses_dot", "senses_cos", "senses_l2",
                                    "same_sense_dot", "same_sense_cos", "same_sense_l2", "avg_sim_c", "max_sim_c"}
    dev = wic.read_wic(*wic.split_files(root, "dev"))
    sim = wic.similarities(tiny, sd, dev)
    for name, m in res["variants"].items():
        pred = sim[name] >= m["threshold"]
        assert m["accuracy"] == pytest.approx(100 * accuracy_score([p.label for p in dev], pred))
    assert res["coverage"] == {"pairs": 2, "covered": 2, "tune_pairs": 4}
    # avg_sim_c's temperature is WiC's to set too (SCWS's softmax), and recorded
    assert res["temperature"] == scws.TEMPERATURE
    hot = wic.similarities(tiny, sd, dev, temperature=100.0)
    assert not np.allclose(hot["avg_sim_c"], sim["avg_sim_c"])
    assert wic.evaluate(tiny, root, sd, "senses", temperature=100.0)["temperature"] == 100.0


# --- CoarseWSD-20 --------------------------------------------------------------------------------

def coarse_fixture(root: Path) -> Path:
    d = root / "CoarseWSD-20" / "bass"
    write(d / "classes_map.txt", '{"0": "bass_guitar", "1": "bass_fish"}')
    write(d / "train.data.txt", "2\the plays bass .\n0\tbass swim in lakes .\n1\tthe bass guitar\n")
    write(d / "train.gold.txt", "0\n1\n0\n")
    write(d / "test.data.txt", "1\ta bass riff\n3\twe caught a bass\n0\tbass solo\n")
    write(d / "test.gold.txt", "0\n1\n0\n")
    return root


def test_coarsewsd20_pieces_by_hand():
    train = np.array([[1.0, 0], [0.9, 0.1], [0, 1.0]])
    pred = coarsewsd20.nearest_centroid(train, np.array([0, 0, 1]), np.array([[0.2, 1.0], [1.0, 0.3]]))
    assert pred.tolist() == [1, 0]
    same = np.ones((4, 2)) + np.array([[0], [1e-9], [0], [-1e-9]])  # one vector, rounding apart
    assert coarsewsd20.nearest_centroid(same, np.array([0, 1, 1, 2]), np.ones((1, 2))).tolist() == [1]
    got = coarsewsd20.sense_map_predict(np.array([0, 0, 1, 2, 2]), np.array([1, 1, 0, 2, 0]),
                                        np.array([0, 1, 2, 3]), mfs=0)
    assert got.tolist() == [1, 0, 0, 0]  # sense 2 ties 2-0 -> smaller class; unseen sense 3 -> mfs


def test_coarsewsd20_mfs_row_by_hand(tiny, tmp_path):
    res = coarsewsd20.evaluate(tiny, coarse_fixture(tmp_path / "c"),
                               common.load_senses(tiny_dict(tiny, tmp_path / "s"), tiny), "s")
    # test gold 0, 1, 0; MFS predicts 0: accuracy 2/3; F1(0) = 0.8, F1(1) = 0 -> macro 0.4
    assert res["variants"]["mfs"] == pytest.approx({"accuracy": 200 / 3, "macro_f1": 40.0})
    assert {"contextual_1nn", "senses_dot_1nn", "sense_map_cos"} <= set(res["variants"])
    assert res["coverage"] == {"words": 1, "train": 3, "test": 3, "not_covered": 0}


def test_coarsewsd20_shots_keep_the_first_examples_of_each_class(tiny, tmp_path):
    assert coarsewsd20.first_per_class([0, 1, 0, 0, 2, 1], 2) == [0, 1, 2, 4, 5]
    res = coarsewsd20.evaluate(tiny, coarse_fixture(tmp_path / "c"), shots=1)
    # train classes 0, 1, 0 -> the first 0 and the first 1; the MFS tie goes to class 0
    assert res["coverage"]["train"] == 2 and res["shots"] == 1
    assert res["variants"]["mfs"]["accuracy"] == pytest.approx(200 / 3)
    with pytest.raises(SenseJaxError, match="shots"):
        coarsewsd20.evaluate(tiny, coarse_fixture(tmp_path / "c"), shots=0)


def test_coarsewsd20_bad_lines(tmp_path):
    root = coarse_fixture(tmp_path / "c")
    d = root / "CoarseWSD-20" / "bass"
    write(d / "test.data.txt", "1\ta bass riff\n7\twe caught a bass\n0\tbass solo\n")
    with pytest.raises(SenseJaxError, match=r"test\.data\.txt:2: target index 7 outside a sentence of 4 words"):
        coarsewsd20.read_split(d, "test")
    write(d / "test.data.txt", "1\ta bass riff\n3\twe caught a bass\n0\tbass solo\n")
    write(d / "test.gold.txt", "0\n5\n0\n")
    with pytest.raises(SenseJaxError, match=r"test\.gold\.txt:2: class 5 not in"):
        coarsewsd20.read_split(d, "test")


# --- word similarity -----------------------------------------------------------------------------

def test_wordsim_readers_follow_each_layout(tmp_path):
    simlex = write(tmp_path / "SimLex-999.txt", "word1\tword2\tPOS\tSimLex999\tconc(w1)\n"
                   "old\tnew\tA\t1.58\t2.72\nsmart\tintelligent\tA\t9.2\t1.75\n", newline="\r\n")
    assert wordsim.read_pairs(simlex) == [("old", "new", 1.58), ("smart", "intelligent", 9.2)]
    simverb = write(tmp_path / "SimVerb-3500.txt", "w1  w2  pos score wn\ntake\tremove\tV\t6.81\tSYNONYMS\n")
    assert wordsim.read_pairs(simverb) == [("take", "remove", 6.81)]
    rg = write(tmp_path / "RG.txt", "cord\tsmile\t0.02\ncord\tsmile\t0.02\nrooster\tvoyage\t0.04\n")
    assert wordsim.read_pairs(rg) == [("cord", "smile", 0.02), ("rooster", "voyage", 0.04)]
    ws = write(tmp_path / "combined.csv", "Word 1,Word 2,Human (mean)\nmoney,cash,9.15\nlove,sex,6.77\n"
               "money,cash,9.08\n", newline="\r\n")
    assert len(wordsim.read_pairs(ws)) == 3  # a duplicate pair further down is kept
    men = write(tmp_path / "MEN_dataset_lemma_form_full", "word1 word2 score\nsun-n sunlight-n 50.000000\n")
    assert wordsim.read_pairs(men) == [("sun", "sunlight", 50.0)]
    bad = write(tmp_path / "bad.txt", "cord\tsmile\t0.02\nrooster\tvoyage\n")
    with pytest.raises(SenseJaxError, match=r"bad\.txt:2: expected 3 fields"):
        wordsim.read_pairs(bad)
    bad = write(tmp_path / "bad2.txt", "cord\tsmile\t0.02\nrooster\tvoyage\tlots\n")
    with pytest.raises(SenseJaxError, match=r"bad2\.txt:2: score 'lots'"):
        wordsim.read_pairs(bad)
    # A set is named alike whether its folder or its file is given; a missing path says so.
    assert list(wordsim.find_sets(rg)) == ["rg65"] and list(wordsim.find_sets(simlex)) == ["SimLex-999"]
    assert set(wordsim.find_sets(tmp_path)) == {"rg65"}
    with pytest.raises(SenseJaxError, match=r"nowhere: not found"):
        wordsim.find_sets(tmp_path / "nowhere")


def test_spearman_by_hand():
    # ranks (1, 2, 3) vs (1, 3, 2): rho = 1 - 6 * 2 / (3 * 8) = 0.5
    assert wordsim.spearman([0.1, 0.5, 0.9], [1.0, 3.0, 2.0]) == pytest.approx(50.0)


def test_wordsim_one_sense_and_static_by_hand(tiny, tmp_path):
    data = write(tmp_path / "tiny.txt", "bank\tplant\t3\nbass\tcar\t1\ncat\tbank\t2\nbank\tzebra\t4\n")
    sd_dir = tiny_dict(tiny, tmp_path / "s")
    sd = common.load_senses(sd_dir, tiny)
    res = wordsim.evaluate(tiny, data, sd, sd_dir)
    table, has = common.one_sense_table(sd)
    vocab = tiny.tokenizer.get_vocab()
    v = {w: table[vocab[w]] for w in ("bank", "plant", "bass", "car", "cat")}
    sims = [common.cosine(v[a][None], v[b][None])[0] for a, b in (("bank", "plant"), ("bass", "car"), ("cat", "bank"))]
    assert res["variants"]["one_sense"]["tiny"] == pytest.approx(wordsim.spearman(sims, [3, 1, 2]))
    assert res["coverage"]["tiny"] == {"pairs": 4, "one_sense": 3, "static": 4, "contextual": 4,
                                        "senses_dot": 4, "senses_cos": 4, "senses_l2": 4}
    emb = tiny.embedding_matrix()
    s = [common.cosine(emb[vocab[a]][None], emb[vocab[b]][None])[0]
         for a, b in (("bank", "plant"), ("bass", "car"), ("cat", "bank"), ("bank", "zebra"))]
    assert res["variants"]["static"]["tiny"] == pytest.approx(wordsim.spearman(s, [3, 1, 2, 4]))


# --- SCWS ----------------------------------------------------------------------------------------

def scws_line(i, w1, w2, c1, c2, mean):
    return "\t".join([str(i), w1, "n", w2, "n", c1, c2, str(mean)] + ["5.0"] * 10)


def test_scws_reader_and_bad_lines(tmp_path):
    f = write(tmp_path / "ratings.txt", scws_line(1, "bank", "plant", "the <b> bank </b> of a river",
                                                  "a power <b>plant</b> here", 6.5) + "\n", newline="\r\n")
    (p,) = scws.read_scws(f)
    assert p.a.words == ["the", "bank", "of", "a", "river"] and (p.a.start, p.a.end) == (1, 2)
    assert p.b.words[p.b.start] == "plant" and p.score == 6.5
    bad = write(tmp_path / "bad.txt", scws_line(1, "a", "b", "no marker", "<b> b </b>", 1) + "\n")
    with pytest.raises(SenseJaxError, match=r"bad\.txt:1: context1 must mark its target"):
        scws.read_scws(bad)
    bad = write(tmp_path / "bad2.txt", "1\tbank\tn\n")
    with pytest.raises(SenseJaxError, match=r"bad2\.txt:1: expected 18 tab-separated fields"):
        scws.read_scws(bad)


def test_avgsimc_and_maxsimc_against_direct_numpy():
    rng = np.random.default_rng(3)
    s1, s2, c1, c2 = rng.normal(size=(3, 5)), rng.normal(size=(4, 5)), rng.normal(size=5), rng.normal(size=5)
    tau = 0.3
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    p1 = np.exp([cos(c1, s) / tau for s in s1]); p1 /= p1.sum()
    p2 = np.exp([cos(c2, s) / tau for s in s2]); p2 /= p2.sum()
    avgc = sum(p1[i] * p2[j] * cos(s1[i], s2[j]) for i in range(3) for j in range(4))
    got = scws.multi_prototype(c1, s1, c2, s2, tau)
    assert got["avg_sim_c"] == pytest.approx(avgc)
    assert got["max_sim_c"] == pytest.approx(cos(s1[np.argmax(p1)], s2[np.argmax(p2)]))
    assert got["avg_sim"] == pytest.approx(np.mean([cos(a, b) for a in s1 for b in s2]))


def test_scws_end_to_end(tiny, tmp_path):
    lines = [scws_line(1, "bank", "plant", "the <b> bank </b> of a river", "a power <b> plant </b> here", 6.5),
             scws_line(2, "bass", "car", "he plays <b> bass </b> well", "the <b> car </b> broke", 1.0),
             scws_line(3, "cat", "bank", "a <b> cat </b> sat", "the <b> bank </b> lends", 2.0),
             scws_line(4, "zebra", "car", "a <b> zebra </b> ran", "my <b> car </b> ran", 3.0)]
    data = write(tmp_path / "ratings.txt", "\n".join(lines) + "\n")
    sd_dir = tiny_dict(tiny, tmp_path / "s")
    sd = common.load_senses(sd_dir, tiny)
    res = scws.evaluate(tiny, data, sd, sd_dir, temperature=0.5)
    assert res["coverage"] == {"pairs": 4, "covered": 4, "no_senses": 1}  # zebra has no entry
    pairs = scws.read_scws(data)
    ws = common.encode_targets(tiny, [p.a for p in pairs] + [p.b for p in pairs])
    ctx = common.contextual_vectors(ws)
    vocab = tiny.tokenizer.get_vocab()
    want = []
    for i, p in enumerate(pairs):
        w1, w2 = p.a.words[p.a.start], p.b.words[p.b.start]
        s1 = sd.token_senses(vocab[w1]) if w1 != "zebra" else ctx[i][None]
        want.append(scws.multi_prototype(ctx[i], s1, ctx[4 + i], sd.token_senses(vocab[w2]), 0.5)["avg_sim_c"])
    assert res["variants"]["avg_sim_c"]["spearman"] == pytest.approx(wordsim.spearman(want, [6.5, 1, 2, 3]))
    assert list(res["variants"])[:4] == ["global_sim", "avg_sim", "avg_sim_c", "max_sim_c"]


# --- the command line ----------------------------------------------------------------------------

def test_cli_end_to_end_and_bad_input(tiny, tiny_dir, tmp_path, capsys):
    from sense_jax.cli import main

    data = write(tmp_path / "tiny.txt", "bank\tplant\t3\nbass\tcar\t1\ncat\tbank\t2\n")
    sd_dir = tiny_dict(tiny, tmp_path / "s")
    out = tmp_path / "res.json"
    assert main(["evaluate", "wordsim", "--data", str(data), "--model", str(tiny_dir), "--senses", str(sd_dir),
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"task", "data", "model", "senses", "layer", "coverage", "variants", "reference"} <= set(res)
    assert res["layer"] == 2 and "| one_sense |" in capsys.readouterr().out
    write(tmp_path / "bad.txt", "bank\tplant\t3\nbass\tcar\n")
    assert main(["evaluate", "wordsim", "--data", str(tmp_path / "bad.txt"), "--model", str(tiny_dir)]) == 2
    assert "bad.txt:2: expected 3 fields" in capsys.readouterr().err
    other = tiny_dict(tiny, tmp_path / "o", fingerprint="ffffffffffffffff")
    assert main(["evaluate", "wordsim", "--data", str(data), "--model", str(tiny_dir), "--senses", str(other)]) == 2
    assert "fingerprint ffffffffffffffff" in capsys.readouterr().err
    assert main(["evaluate", "wordsim", "--data", str(data), "--model", str(tiny_dir), "--shots", "2"]) == 2
    assert "--shots 2: a number >= 1, for coarsewsd20 only" in capsys.readouterr().err
    assert main(["evaluate", "wordsim", "--data", str(data), "--model", str(tiny_dir), "--window", "-1"]) == 2
    assert "--window must be >= 0" in capsys.readouterr().err
    # --temperature was accepted and ignored by every task but scws (wic's avg_sim_c uses it too)
    assert main(["evaluate", "wordsim", "--data", str(data), "--model", str(tiny_dir), "--temperature", "0.1"]) == 2
    assert "--temperature is for scws and wic only (their avg_sim_c), not wordsim" in capsys.readouterr().err
    for bad in ("0", "-1", "nan", "inf"):
        assert main(["evaluate", "wic", "--data", str(data), "--model", str(tiny_dir), "--temperature", bad]) == 2
        assert f"--temperature must be a finite number > 0, got {float(bad)}" in capsys.readouterr().err


# --- the shared copies (where present) -----------------------------------------------------------

def test_shared_readers_count_the_published_sizes():
    need_evaldata()
    assert len(wic.read_wic(*wic.split_files(EVALDATA / "wic", "train"))) == 5428
    assert len(wic.read_wic(*wic.split_files(EVALDATA / "wic", "dev"))) == 638
    sizes = {n: len(wordsim.read_pairs(p)) for n, p in wordsim.find_sets(EVALDATA / "wordsim").items()}
    assert sizes == {"simlex999": 999, "simverb3500": 3500, "men": 3000, "ws353": 353, "rg65": 65, "mc30": 30}
    dirs = coarsewsd20.word_dirs(EVALDATA / "coarsewsd20")
    assert len(dirs) == 20
    assert sum(len(coarsewsd20.read_split(d, "test")[1]) for d in dirs) == 10196


# --- WSD (Raganato et al. 2017) ------------------------------------------------------------------

WSD_XML = """<?xml version="1.0" encoding="UTF-8" ?>
<corpus lang="en" source="tiny">
<text id="d000">
<sentence id="d000.s000">
<wf lemma="we" pos="PRON">We</wf>
<instance id="d000.s000.t000" lemma="sit" pos="VERB">sat</instance>
<wf lemma="on" pos="ADP">on</wf>
<wf lemma="the" pos="DET">the</wf>
<instance id="d000.s000.t001" lemma="bank" pos="NOUN">bank</instance>
<wf lemma="of" pos="ADP">of</wf>
<wf lemma="the" pos="DET">the</wf>
<instance id="d000.s000.t002" lemma="river" pos="NOUN">river</instance>
</sentence>
</text>
</corpus>
"""


def test_sense_keys_and_candidates_follow_wordnet():
    from sense_jax.benchmarks import wsd
    from sense_jax.wordnet import load_sense_keys

    keys = load_sense_keys()
    assert len(keys) == 206_949  # WordNet 3.0's index.sense
    assert keys["bank%1:17:01::"] == ("09213565-n", 1)  # sloping land: bank's first noun sense
    assert keys["emergent%5:00:00:nascent:00"] == ("00003553-s", 2)  # a satellite names its head
    assert wsd.candidates("bank", "NOUN")[:2] == ["09213565-n", "08420278-n"]
    assert len(wsd.candidates("bank", "NOUN")) == 10 and wsd.candidates("bank", "ADV") == []


def test_sense_prior_from_wordnet_tag_counts_by_hand():
    from sense_jax.benchmarks import wsd

    # cntlist: plant%1:06:01:: (sense 1, 03956922-n) 63 tags, plant%1:03:00:: (sense 2) 37, senses
    # 3 and 4 never tagged -> add-one: (64, 38, 1, 1) / 104
    c = wsd.candidates("plant", "NOUN")
    assert c == ["03956922-n", "00017222-n", "10438470-n", "05906080-n"]
    np.testing.assert_allclose(wsd.sense_prior("plant", c), np.array([64, 38, 1, 1]) / 104)
    np.testing.assert_allclose(wsd.sense_prior("Plant", c[::-1]), np.array([1, 1, 38, 64]) / 104)
    np.testing.assert_allclose(wsd.sense_prior("crane", wsd.candidates("crane", "NOUN")), np.full(5, 0.2))
    # pitcher: 15 tags for sense 1 (10435988-n), 2 for sense 2, 1 for sense 3, none for 4 and 5
    np.testing.assert_allclose(wsd.sense_prior("pitcher", wsd.candidates("pitcher", "NOUN")),
                               np.array([16, 3, 2, 1, 1]) / 23)


def test_bayes_posterior_against_direct_numpy():
    from sense_jax.benchmarks import wsd

    cos, prior, tau = np.array([0.5, 0.4, 0.1]), np.array([0.2, 0.7, 0.1]), 0.1
    like = np.exp(cos / tau) / np.exp(cos / tau).sum()  # the model's p(sense | context)
    want = like * prior / (like * prior).sum()
    np.testing.assert_allclose(wsd.posterior(cos, prior, tau), want)
    assert np.argmax(cos) == 0 and np.argmax(want) == 1  # the prior overturns a close call
    assert np.argmax(wsd.posterior(cos, prior, 0.01)) == 0  # ... not a clear one


def test_sense_texts_with_lemma_names():
    from sense_jax.benchmarks import wsd

    car = wsd.candidates("car", "NOUN")[0]  # car, auto, automobile, machine, motorcar
    plain, named = wsd.sense_texts(car, "car")[0], wsd.sense_texts(car, "car", lemma_names=True)[0]
    assert plain.words[:2] == ["car", ":"] and (plain.start, plain.end) == (0, 1)
    assert named.words[:10] == ["car", ",", "auto", ",", "automobile", ",", "machine", ",", "motorcar", ":"]
    assert named.words[10:] == plain.words[2:] and (named.start, named.end) == (0, 1)
    two = wsd.sense_texts(wsd.candidates("motor_vehicle", "NOUN")[0], "motor_vehicle", lemma_names=True)[0]
    assert two.words[:5] == ["motor", "vehicle", ",", "automotive", "vehicle"] and two.end == 2


def test_wsd_f1_by_hand():
    from sense_jax.benchmarks import wsd

    r = wsd.f1(3, 4, 5)  # P 3/4, R 3/5
    assert r["f1"] == pytest.approx(100 * 2 * 0.75 * 0.6 / 1.35) and r["precision"] == 75.0


def test_wsd_reader_bad_keys_and_first_sense(tiny, tmp_path):
    from sense_jax.benchmarks import wsd

    d = tmp_path / "tiny"
    write(d / "tiny.data.xml", WSD_XML)
    write(d / "tiny.gold.key.txt", "d000.s000.t000 sit%2:35:00::\nd000.s000.t001 bank%1:17:01::\n"
                                   "d000.s000.t002 river%1:17:00::\n")
    inst = wsd.read_xml(d / "tiny.data.xml")
    assert [i.target.words[i.target.start] for i in inst] == ["sat", "bank", "river"]
    res = wsd.evaluate(tiny, d)
    # first senses: sit%2:35:00:: is sit's first verb sense, bank%1:17:01:: and river%1:17:00:: too
    assert res["variants"]["first_sense"]["f1"] == pytest.approx(100.0)
    assert res["coverage"]["instances"] == 3
    assert set(res["variants"]) == {"contextual", "sentence", "contextual+sentence", "first_sense", "prior",
                                    "contextual+prior", "sentence+prior", "contextual+sentence+prior"}
    assert res["variants"]["prior"]["f1"] == pytest.approx(100.0)  # the most tagged senses here
    write(d / "tiny.gold.key.txt", "d000.s000.t000 sit%2:35:00::\nd000.s000.t001 bank%9:99:99::\n")
    with pytest.raises(SenseJaxError, match=r"tiny\.gold\.key\.txt:2: sense key 'bank%9:99:99::' is not in"):
        wsd.read_gold(d / "tiny.gold.key.txt", inst)
    write(d / "bad.data.xml", "<corpus><text>\n<sentence>\n</corpus>")
    with pytest.raises(SenseJaxError, match=r"bad\.data\.xml:3: not well-formed XML"):
        wsd.read_xml(d / "bad.data.xml")
