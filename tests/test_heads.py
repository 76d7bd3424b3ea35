"""Sequence classification heads (issue 13, item 1): every family's ``*ForSequenceClassification``
converted, run and exported back.

Every reference is transformers' PyTorch task model on the same tiny random checkpoint (weights
N(0, 0.2), biases included) or the real MiniLM with a fresh seeded head: logits of
``load_model(dir).logits`` within 1e-4, and the exported directory loaded by
``AutoModelForSequenceClassification`` giving the source's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,
                          BertForTokenClassification, BertModel, DebertaV2Config, DebertaV2ForSequenceClassification,
                          LlamaConfig, LlamaForSequenceClassification, MistralConfig, MistralForSequenceClassification,
                          Qwen2Config, Qwen2ForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)

from conftest import save_random_model
from sense_jax import cli
from sense_jax import convert as cv
from sense_jax.hf_export import export_model
from sense_jax import load_model
from sense_jax.errors import SenseJaxError

V = 61
T = 10
ENC = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0)
DEBERTA = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"],
               position_buckets=4, max_relative_positions=-1, share_att_key=True, norm_rel_ebd="layer_norm",
               position_biased_input=False, type_vocab_size=2, layer_norm_eps=1e-7, pooler_hidden_act="gelu")
REGRESSION = dict(num_labels=1, problem_type="regression")

# name -> (transformers class, config, pad id, whether the family has token types)
CASES = {
    "bert": (BertForSequenceClassification, BertConfig(**ENC, max_position_embeddings=24, num_labels=3), 0, True),
    "roberta": (RobertaForSequenceClassification,
                RobertaConfig(**ENC, max_position_embeddings=T + 4, pad_token_id=1, type_vocab_size=1,
                              **REGRESSION), 1, False),
    "deberta-v2": (DebertaV2ForSequenceClassification, DebertaV2Config(**DEBERTA, num_labels=3), 0, True),
    "llama": (LlamaForSequenceClassification, LlamaConfig(**DEC, num_labels=3), 0, False),
    "mistral": (MistralForSequenceClassification, MistralConfig(**DEC, num_labels=4), 0, False),
    "qwen2": (Qwen2ForSequenceClassification, Qwen2Config(**DEC, **REGRESSION), 0, False),
}


def _batch(pad: int, side: str = "right", seed: int = 0, types: bool = False):
    """Three rows: full, 3 pads, 6 pads (on ``side``); a second segment (types 1) in the first two."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, V, (3, T))
    mask = np.ones((3, T), np.int64)
    for row, n in ((1, 3), (2, 6)):
        mask[row, T - n:] = 0
    if side == "left":
        mask = mask[:, ::-1].copy()
    ids[mask == 0] = pad
    tt = np.zeros_like(ids)
    if types:
        tt[0, 6:] = 1
        tt[1, 4:T - 3] = 1
    return ids, mask, tt


def _reference(model_dir: Path, ids, mask, tt=None, positions=None) -> np.ndarray:
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    kw = {"token_type_ids": torch.tensor(tt)} if tt is not None else {}
    if positions is not None:
        kw["position_ids"] = torch.tensor(positions)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).logits.numpy()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    cls, config, pad, types = CASES[request.param]
    src = save_random_model(tmp_path_factory.mktemp(request.param) / "hf", config, cls, seed=1)
    return request.param, src, pad, types, config


def test_converted_head_matches_transformers_and_exports_back(tmp_path, case):
    """Padded batches (and sentence pairs where the family has token types) give transformers'
    logits after convert; the export loads in AutoModelForSequenceClassification with the same
    logits and the same tensors."""
    name, src, pad, types, config = case
    out = cv.convert(src, tmp_path / "sj")
    meta = json.loads((out / "sense_jax.json").read_text())
    assert meta["config"]["num_labels"] == config.num_labels and meta["skipped_tensors"] == []
    model = load_model(out)
    ids, mask, tt = _batch(pad, types=types)
    want = _reference(src, ids, mask, tt if types else None)
    got = np.asarray(model.logits(ids, mask, tt if types else None))
    assert got.dtype == np.float32 and got.shape == (3, config.num_labels)
    assert np.abs(got - want).max() < 1e-4, name
    assert model.hf_config.get("problem_type") == config.problem_type  # regression stays regression

    back = export_model(out, tmp_path / "hf_back")
    exported = json.loads((back / "config.json").read_text())
    assert exported["architectures"] == [CASES[name][0].__name__]
    assert exported["id2label"] == {str(k): v for k, v in config.id2label.items()}
    np.testing.assert_allclose(_reference(back, ids, mask, tt if types else None), want, atol=1e-6)
    state, exported_state = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    assert sorted(exported_state) == sorted(state)
    for k, v in state.items():
        np.testing.assert_array_equal(exported_state[k], v, err_msg=k)


def test_encoder_states_are_unchanged_by_the_head(case):
    """``hidden_states`` of a model with a head is the encoder's, as before heads existed: the
    same params (the pooler shared with the head, not copied) and the same output."""
    name, src, pad, types, _ = case
    model = load_model(src)
    assert set(model.head_params) & {"classifier", "score"}
    assert not set(model.params) & {"classifier", "score"}
    if "pooler" in model.head_params:
        assert model.head_params["pooler"]["kernel"] is model.params["pooler"]["kernel"]
    ids, mask, tt = _batch(pad, types=types)
    base = AutoModelForSequenceClassification.from_pretrained(str(src)).eval().base_model
    with torch.no_grad():
        want = base(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    got = np.asarray(model.hidden_states(ids, mask))
    assert np.abs(got - want)[mask.astype(bool)].max() < 1e-4


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_decoder_head_reads_the_last_non_pad_token_as_transformers(tmp_path, name):
    """Left padding (positions from the mask given to transformers too) reads each row's last real
    token; a real token equal to pad_token_id at a row's end is treated as padding, as
    transformers' rule (rightmost id != pad_token_id) does, not as the attention mask says."""
    cls, config, pad, _ = CASES[name]
    src = save_random_model(tmp_path / "hf", config, cls, seed=2)
    model = load_model(src)
    ids, mask, _ = _batch(pad, side="left")
    positions = np.where(mask > 0, np.cumsum(mask, 1) - 1, 1)
    np.testing.assert_allclose(np.asarray(model.logits(ids, mask)), _reference(src, ids, mask, positions=positions),
                               atol=1e-4)
    ids, mask, _ = _batch(pad)
    ids[0, -1] = pad  # a real token (mask 1) with the pad id
    want = _reference(src, ids, mask)
    np.testing.assert_allclose(np.asarray(model.logits(ids, mask)), want, atol=1e-4)
    moved = ids.copy()
    moved[0, -1] = 5
    assert np.abs(np.asarray(model.logits(moved, mask))[0] - want[0]).max() > 1e-3  # row 0 really moved


def test_decoder_without_pad_token_id_classifies_one_row_and_refuses_a_batch(tmp_path):
    cls, config, _, _ = CASES["llama"]
    src = save_random_model(tmp_path / "hf", LlamaConfig(**{**DEC, "pad_token_id": None}, num_labels=2), cls)
    model = load_model(src)
    ids, mask, _ = _batch(0)
    np.testing.assert_allclose(np.asarray(model.logits(ids[:1], mask[:1])), _reference(src, ids[:1], mask[:1]),
                               atol=1e-4)
    with pytest.raises(SenseJaxError, match=r"hf: a batch of 3 rows needs pad_token_id in config\.json"):
        model.logits(ids, mask)


def test_model_without_a_head_refuses_logits_by_directory_and_exports_as_its_base_model(tmp_path):
    src = save_random_model(tmp_path / "base", BertConfig(**ENC), BertModel)
    model = load_model(src)
    assert model.head_params is None
    with pytest.raises(SenseJaxError, match=r"base: no sequence classification head \(architectures BertModel\)"):
        model.logits(np.ones((1, 4), np.int32), np.ones((1, 4), np.int32))
    back = export_model(src, tmp_path / "back")  # exported as the base model it is
    assert json.loads((back / "config.json").read_text())["architectures"] == ["BertModel"]
    state, exported = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(exported) == sorted(k for k in state if not k.endswith("position_ids"))
    for k, v in exported.items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_token_classification_head_is_no_sequence_head_and_stays_skipped(tmp_path):
    """BertForTokenClassification stores ``classifier.weight`` too (applied to every token): only a
    ``*ForSequenceClassification`` architecture makes it a sequence head."""
    src = save_random_model(tmp_path / "tok", BertConfig(**ENC, num_labels=5), BertForTokenClassification)
    converted, _ = cv.load_hf(src)
    assert converted.config.num_labels == 0
    assert sorted(converted.skipped) == ["classifier.bias", "classifier.weight"]


def test_head_with_the_wrong_width_is_refused_by_tensor(tmp_path):
    cls, config, _, _ = CASES["bert"]
    src = save_random_model(tmp_path / "hf", config, cls)
    cfg = json.loads((src / "config.json").read_text())
    cfg["id2label"] = {"0": "a", "1": "b"}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SenseJaxError, match=r"tensor 'classifier\.(weight' has shape \(3, 16\), expected \(2, 16\)"
                                            r"|bias' has shape \(3,\), expected \(2,\))"):
        cv.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_minilm_with_a_fresh_head_round_trips_through_the_cli(tmp_path, minilm_dir, sentences, capsys):
    """The real MiniLM with a fresh seeded 3-way head: ``sense-jax convert`` keeps the head, the
    logits on real sentence pairs (padded, token types) equal transformers', ``sense-jax export``
    gives a directory AutoModelForSequenceClassification loads with the same logits."""
    torch.manual_seed(0)
    hf = BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=3).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    tok.save_pretrained(str(tmp_path / "hf"))
    batch = tok(sentences[:4], sentences[4:8], padding=True, return_tensors="np")
    with torch.no_grad():
        want = hf(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()

    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "sj")]) == 0
    assert "sequence classification head (3 labels)" in capsys.readouterr().out
    model = load_model(tmp_path / "sj")
    got = np.asarray(model.logits(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))
    assert np.abs(got - want).max() < 1e-4
    assert cli.main(["export", str(tmp_path / "sj"), str(tmp_path / "back")]) == 0
    assert "load with AutoModelForSequenceClassification" in capsys.readouterr().out
    np.testing.assert_allclose(_reference(tmp_path / "back", batch["input_ids"], batch["attention_mask"],
                                          batch["token_type_ids"]), want, atol=1e-5)


def test_sharded_load_places_the_head_and_gives_the_same_logits(tmp_path):
    """``load_model(sharding=...)`` takes the encoder's shardings (as extraction builds them); the
    head, which they do not name, is replicated over the same mesh. Its logical axes are known to
    the rules table (``params_sharding`` of the boxed head works)."""
    from sense_jax.models.heads import abstract_head_params
    from sense_jax.sharding import family_params_sharding, make_mesh, params_sharding

    cls, config, pad, _ = CASES["deberta-v2"]
    out = cv.convert(save_random_model(tmp_path / "hf", config, cls), tmp_path / "sj")
    plain = load_model(out)
    mesh = make_mesh()
    sharded = load_model(out, sharding=family_params_sharding(plain.family, plain.config, mesh))
    assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(sharded.head_params))
    assert set(params_sharding(abstract_head_params(plain.config, boxed=True), mesh)) == {"pooler", "classifier"}
    ids, mask, tt = _batch(pad, types=True)
    np.testing.assert_array_equal(np.asarray(sharded.logits(ids, mask, tt)), np.asarray(plain.logits(ids, mask, tt)))


def test_head_logits_is_a_pure_function_of_any_states(case):
    """``head_logits`` on states that no encoder produced (a student's adapted states, METHOD §3)
    equals transformers' head modules on the same states; the decoders read rows' last real tokens
    at T-1, T-4, T-7 (right padding: 0, 3, 6 pads)."""
    from sense_jax.models.heads import abstract_head_params, head_logits, init_head_params

    name, src, pad, _, config = case
    model, hf = load_model(src), AutoModelForSequenceClassification.from_pretrained(str(src)).eval()
    ids, mask, _ = _batch(pad)
    states = np.random.default_rng(5).normal(size=(3, T, config.hidden_size)).astype(np.float32)
    got = np.asarray(head_logits(model.config, model.head_params, states, mask, ids))
    h = torch.tensor(states)
    with torch.no_grad():
        if name == "bert":
            want = hf.classifier(hf.bert.pooler(h))
        elif name == "deberta-v2":
            want = hf.classifier(hf.pooler(h))
        elif name == "roberta":
            want = hf.classifier(h)
        else:
            want = hf.score(h[torch.arange(3), torch.tensor([T - 1, T - 4, T - 7])])
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    fresh = init_head_params(model.config, seed=3)
    assert jax.tree.map(np.shape, fresh) == jax.tree.map(lambda a: a.shape, abstract_head_params(model.config))
    assert jax.tree.all(jax.tree.map(np.array_equal, fresh, init_head_params(model.config, seed=3)))
