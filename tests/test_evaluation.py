"""The WordNet evaluation suite: metrics against hand-derived values, data selection, rendering."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections import Counter

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


def test_sense_ids_at_targets_equal_nearest_sense_per_lemma_in_one_compiled_shape():
    """Each lemma's target states, looked up alone, give the same sense ids as the batched look-up;
    lemmas of 2, 5 and 3 examples (and a chunk boundary inside a lemma) add no compiled program
    beyond apply_senses' one shape (the per-lemma look-up compiled one per example count)."""
    rng = np.random.default_rng(1)
    sd = SenseDictionary.from_arrays(rng.normal(size=(9, 4)).astype(np.float32), [0, 3, 5, 9],
                                     meta={"metric": "l2"})
    items, states = [], []
    for tid, n in ((0, 2), (2, 5), (1, 3)):
        positions = rng.integers(0, 3, n).tolist()
        items.append(ev.WsiItem(f"w{tid}", tid, ["t"] * n, list("ab" * n)[:n], positions, [[0]] * n))
        states += [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(n)]
    queries = ev.Encoded([np.zeros(3, np.int32)] * len(states), states)
    ev.apply_senses(queries, sd, chunk=4)  # apply_senses' own program (dictionary, metric, chunk)
    before = nearest_sense._cache_size()
    got = [ev.sense_ids_at_targets(queries, sd, items, metric, chunk=4) for metric in (None, "l2")]
    assert nearest_sense._cache_size() == before
    k = 0
    for i, it in enumerate(items):
        h = np.stack([states[k + j][p] for j, p in enumerate(it.positions)])
        k += len(it.positions)
        want = nearest_sense(sd, np.full((1, len(h)), it.token_id, np.int32), h[None], metric="l2")[0][0]
        for g in got:
            assert g[i].dtype == np.int32
            np.testing.assert_array_equal(g[i], np.asarray(want))
    assert ev.sense_ids_at_targets(queries, sd, [], chunk=4) == []


def test_wsi_items_select_single_token_lemmas_with_two_synsets(minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    items = ev.wsi_items(tok, max_per_lemma=40)
    # The selection of the WordPiece rule (first occurrence of the lemma's id), unchanged since
    # items were located by character offsets: same lemmas, examples and target positions.
    rows = [[it.lemma, it.token_id, it.texts, it.labels, it.positions, it.token_ids] for it in items]
    assert (len(items), sum(len(it.texts) for it in items)) == (3663, 18231)
    assert hashlib.sha256(json.dumps(rows).encode()).hexdigest() == \
        "48563156348a40fda8a85cc33a02ecd64a739741e8bb36f7201a3aa7b227ddad"
    for it in items[:200]:
        assert len(set(it.labels)) >= 2
        assert tok.tokenize(it.lemma) == [tok.convert_ids_to_tokens(it.token_id)]
        for ids, p in zip(it.token_ids, it.positions):
            assert ids[p] == it.token_id
    assert all(wordnet.load_examples()) and "bank" in {it.lemma for it in items}
    # min_synsets and max_lemmas (which stop early, after the first blocks of lemmas) select the
    # same items as filtering and cutting the whole list (the 40th is lemma 1,644: seven blocks of 256).
    two = [it for it in items if sum(c >= 2 for c in Counter(it.labels).values()) >= 2]
    for n, m, want in ((40, 2, two[:40]), (12, 0, items[:12])):
        got = ev.wsi_items(tok, max_per_lemma=40, max_lemmas=n, min_synsets=m)
        assert [dataclasses.astuple(x) for x in got] == [dataclasses.astuple(x) for x in want]


def _byte_level_bpe(texts, add_prefix_space=False):
    """A byte-level BPE tokenizer (GPT-2/RoBERTa style: a word start is the Ġ of its leading
    space), trained offline on ``texts`` until every word is one token; a transformers fast
    tokenizer with offsets that include the leading space (no trimming)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=2000, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>")


BANK_EXAMPLES = {  # the shipped usage examples with " bank" inside a sentence, target = word index
    "00169305-n": [("the plane went into a steep bank", 6)],
    "02039431-v": [("the pilot had to bank the aircraft", 4)],
    "02343392-v": [("Where do you bank in this town?", 3)],
    "02787772-n": [("the bank is on the corner of Nassau and Witherspoon", 1)],
    "04139859-n": [("the coin bank was empty", 2)],
    "08420278-n": [("he cashed a check at the bank", 6), ("that bank holds the mortgage on my home", 1)],
    "08462066-n": [("he operated a bank of switches", 3)],
    "09213434-n": [("a huge bank of earth", 2)],
    "09213565-n": [("he sat on the bank of the river and watched the currents", 4),
                   ("they pulled the canoe up on the bank", 7)],
    "13356402-n": [("he tried to break the bank at Monte Carlo", 5)],
}


def test_wsi_items_find_lemmas_of_a_byte_level_bpe_tokenizer():
    """``bank`` alone is the token ``bank``; inside a sentence it is ``Ġbank``. The item holds the
    in-sentence token and every example where the word is that token (12, two synsets with two
    examples each), located by character offsets; the three examples that start with "bank"
    (token ``bank``, no space before) are not mixed in."""
    synsets = {s.id for s in wordnet.load_synsets() if "bank" in s.lemmas}
    texts = [e.text for e in wordnet.load_examples() if e.synset_id in synsets]
    tok = _byte_level_bpe(texts + ["the river bank", "a bank"])
    assert tok.tokenize("bank") == ["bank"] and tok.tokenize("the bank") == ["the", "Ġbank"]
    items = {it.lemma: it for it in ev.wsi_items(tok, max_per_lemma=40)}
    it = items["bank"]
    assert it.token_id == tok.convert_tokens_to_ids("Ġbank")
    want = sorted((sid, text, p) for sid, rows in BANK_EXAMPLES.items() for text, p in rows)
    assert list(zip(it.labels, it.texts, it.positions)) == want
    for ids, p in zip(it.token_ids, it.positions):
        assert ids[p] == it.token_id
    assert sum(c >= 2 for c in Counter(it.labels).values()) == 2


def test_inspect_looks_a_word_up_as_it_appears_in_text(minilm_dir):
    """``sense-jax inspect bank``: the in-sentence token (``Ġbank``) of a byte-level BPE
    vocabulary, not the text-initial piece ``bank``; WordPiece lookups are unchanged."""
    from transformers import AutoTokenizer

    from sense_jax.inspection import _token_id

    synsets = {s.id for s in wordnet.load_synsets() if "bank" in s.lemmas}
    tok = _byte_level_bpe([e.text for e in wordnet.load_examples() if e.synset_id in synsets])
    assert "bank" in tok.get_vocab()
    assert _token_id(tok, "bank") == tok.convert_tokens_to_ids("Ġbank")
    assert _token_id(tok, "Ġbank") == tok.convert_tokens_to_ids("Ġbank")
    assert _token_id(tok, f"#{tok.convert_tokens_to_ids('bank')}") == tok.convert_tokens_to_ids("bank")
    bert = AutoTokenizer.from_pretrained(str(minilm_dir))
    vocab = bert.get_vocab()
    for word, piece in (("bank", "bank"), ("Bank", "bank"), ("##ing", "##ing"), ("[CLS]", "[CLS]")):
        assert _token_id(bert, word) == vocab[piece], word


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


def test_inspect_refuses_a_negative_context_count(tmp_path, capsys):
    from sense_jax.cli import main

    assert main(["inspect", "bank", "--dict", str(tmp_path / "d"), "--store", str(tmp_path / "s"),
                 "--contexts", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--contexts must be >= 0, got -1" in err and len(err.splitlines()) == 1


@contextlib.contextmanager
def jaxpr_traces():
    """The functions JAX traces inside the block (a list of events that grows as they happen):
    empty when every call reused a compiled program."""
    import jax.monitoring

    traces = []

    def listen(event, secs, **kw):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield traces
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_report_states_of_two_models_of_one_architecture_share_one_program():
    """The report's states function (report._jit_states) of a second model with the same
    architecture (the SKD and MSE students) runs without tracing again, and gives its own
    model's states (module.apply), adaptor applied; each used to trace and compile anew."""
    import jax

    from sense_jax.models import get_family
    from sense_jax.models.bert import BertConfig
    from sense_jax.report import _jit_states

    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16, add_pooler=False)
    family = get_family("bert")
    shapes = jax.eval_shape(family.init_fn(cfg), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    models = []
    for _ in range(2):  # two students: separately built modules of one config, their own weights
        params = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32), shapes)
        adaptor = {"weight": rng.normal(size=(12, 8)).astype(np.float32), "bias": rng.normal(size=12).astype(np.float32)}
        models.append((family.make_module(cfg), params, adaptor))
    ids = rng.integers(1, 50, (2, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    seg = mask.copy()
    first = np.asarray(_jit_states(*models[0])(ids, mask, seg))
    with jaxpr_traces() as traces:
        second = np.asarray(_jit_states(*models[1])(ids, mask, seg))
    assert traces == []
    for (module, params, adaptor), got in zip(models, (first, second)):
        want = np.asarray(module.apply({"params": params}, ids, mask)) @ adaptor["weight"].T + adaptor["bias"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(first, second)


def test_encode_packs_texts_and_gives_each_its_states_alone_in_one_program():
    """``encode`` packs texts of any lengths into rows of one shape: every text gets the states
    the model gives it alone (within 1e-5), and a second call with other lengths compiles nothing."""
    import jax

    from sense_jax.models import get_family
    from sense_jax.models.bert import BertConfig
    from sense_jax.report import _jit_states

    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=40, add_pooler=False)
    family = get_family("bert")
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32),
                          jax.eval_shape(family.init_fn(cfg), jax.random.PRNGKey(0)))
    module = family.make_module(cfg)
    variant = ev.Variant("m", _jit_states(module, params))
    texts = [list(rng.integers(1, 50, n)) for n in (5, 1, 30, 12, 7, 40, 3)]
    enc = ev.encode(variant, texts, pad_id=0, row_length=40, rows_per_batch=2)
    for t, ids, h in zip(texts, enc.ids, enc.states):
        x = np.asarray(t, np.int32)[None]
        want = np.asarray(module.apply({"params": params}, x, np.ones_like(x)))[0]
        np.testing.assert_array_equal(ids, t)
        np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-5)
    with jaxpr_traces() as traces:
        ev.encode(variant, [list(rng.integers(1, 50, n)) for n in (2, 33, 9)], pad_id=0, row_length=40,
                  rows_per_batch=2)
    assert traces == []
