"""The WordNet evaluation suite: metrics against hand-derived values, data selection, rendering."""

from __future__ import annotations

import numpy as np
import pytest

from sense_jax import evaluation as ev
from sense_jax import wordnet
from sense_jax.sense_dict import SenseDictionary, nearest_sense


def test_shipped_wordnet_files_are_complete():
    synsets = wordnet.load_synsets()
    examples = wordnet.load_examples()
    assert len(synsets) == 117_659 and len(examples) == 48_339  # WordNet 3.0
    assert len({s.lexname for s in synsets}) == 45
    bank = [s for s in synsets if "bank" in s.lemmas]
    assert len(bank) >= 10 and any("river" in s.definition or "slope" in s.definition for s in bank)
    ids = {s.id for s in synsets}
    assert all(e.synset_id in ids for e in examples[:2000])


def test_retrieval_scores_by_hand():
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    cands = [np.array([[0.9, 0.1], [0.1, 0.9], [1.0, 0.5]]),  # gold 0 ranks 1st (cos .994 vs .894)
             np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])]  # gold 1 ranks 2nd behind [0, 1]
    r = ev.retrieval_scores(q, cands, [0, 1])
    assert r["recall_at_1"] == 0.5
    assert r["mrr"] == pytest.approx((1 + 1 / 2) / 2)


def test_wsi_and_wic_scores_by_hand():
    item = ev.WsiItem("bank", 5, ["a", "b", "c", "d"], ["s1", "s1", "s2", "s2"], [1, 1, 1, 1], [[0]] * 4)
    perfect = ev.wsi_scores([item], [np.array([3, 3, 0, 0])])
    assert perfect["ari"] == pytest.approx(1.0) and perfect["v_measure"] == pytest.approx(1.0)
    one = ev.wsi_scores([item], [np.zeros(4, int)])
    assert one["ari"] == pytest.approx(0.0) and one["v_measure"] == pytest.approx(0.0)
    pairs = [(0, 0, 1), (0, 0, 2), (0, 2, 3), (0, 1, 3)]  # same, diff, same, diff
    wic = ev.wic_scores([item], [np.array([0, 0, 0, 1])], pairs)
    # predictions: same, same, diff, diff -> TPR 1/2, TNR 1/2
    assert wic["balanced_accuracy"] == pytest.approx(0.5) and wic["same_synset_fraction"] == 0.5


def test_wic_pairs_are_seeded_and_bounded():
    items = [ev.WsiItem("x", 1, ["t"] * 9, ["a"] * 9, [0] * 9, [[0]] * 9)]
    a, b = ev.wic_pairs(items, 5, seed=1), ev.wic_pairs(items, 5, seed=1)
    assert a == b and len(a) == 5 and ev.wic_pairs(items, 5, seed=2) != a
    assert all(i < j for _, i, j in a)


def test_apply_senses_equals_nearest_sense():
    rng = np.random.default_rng(0)
    sd = SenseDictionary.from_arrays(rng.normal(size=(7, 4)).astype(np.float32), [0, 3, 3, 7])
    ids = [np.array([0, 1, 2]), np.array([2, 0])]
    states = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(2, 4)).astype(np.float32)]
    got = ev.apply_senses(ev.Encoded(ids, states), sd, chunk=4)
    for n, (i, h) in enumerate(zip(ids, states)):
        want = np.asarray(nearest_sense(sd, i[None].astype(np.int32), h[None])[1][0])
        np.testing.assert_array_equal(got.states[n], want)


def test_wsi_items_select_single_token_lemmas_with_two_synsets(minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    items = ev.wsi_items(tok, max_per_lemma=40)
    assert len(items) > 1000
    for it in items[:200]:
        assert len(set(it.labels)) >= 2
        assert tok.tokenize(it.lemma) == [tok.convert_ids_to_tokens(it.token_id)]
        for ids, p in zip(it.token_ids, it.positions):
            assert ids[p] == it.token_id
    assert all(wordnet.load_examples()) and "bank" in {it.lemma for it in items}


def test_classification_split_is_disjoint_and_fixed():
    tr, te = ev.classification_split(500, 200)
    tr2, te2 = ev.classification_split(500, 200)
    assert [s.id for s in tr] == [s.id for s in tr2] and [s.id for s in te] == [s.id for s in te2]
    assert not {s.id for s in tr} & {s.id for s in te}
    assert len({s.lexname for s in tr}) > 30


def test_render_markdown_has_one_table_per_block():
    rep = {"wsi": {"teacher_senses": {"ari": 0.5, "v_measure": 0.25}},
           "classification": {"teacher": {"accuracy": 0.75, "macro_f1": 0.5}},
           "size": {"teacher": {"params": 22713216, "bytes": 90852864}}}
    md = ev.render_markdown(rep)
    assert "## wsi" in md and "| teacher_senses | 0.5000 | 0.2500 |" in md
    assert "| teacher | 0.7500 | 0.5000 |" in md and "22,713,216" in md
