"""Inputs longer than a model's positions are refused or truncated by name, never NaN (issue 11
item 3): the API (Model.hidden_states, Model.tokenize), the distill config, extraction and the
evaluation's text length; which families have a position table (BERT, RoBERTa, DeBERTa with
absolute positions) and which do not (DeBERTa-v3 relative positions, Llama's rotary positions,
both checked against transformers past max_position_embeddings)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sense_jax
from sense_jax.errors import ConfigError, SenseJaxError

sys.path.insert(0, str(Path(__file__).parent))
from conftest import save_tiny_hf_model  # noqa: E402

SMALL = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


def _torch_states(path, ids, mask):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()


def _ids(T, seed=0, low=3):
    ids = np.random.default_rng(seed).integers(low, SMALL["vocab_size"], (1, T)).astype(np.int32)
    return ids, np.ones_like(ids)


def test_bert_513_tokens_on_512_positions_is_refused_by_name(tmp_path):
    from transformers import BertConfig

    m = sense_jax.load_model(save_tiny_hf_model(tmp_path / "bert", BertConfig(**SMALL, max_position_embeddings=512)))
    assert m.max_input_length == 512
    ids, mask = _ids(512)
    h = np.asarray(m.hidden_states(ids, mask))  # the longest input: finite, as transformers
    np.testing.assert_allclose(h, _torch_states(m.path, ids, mask), atol=1e-4)
    ids, mask = _ids(513)
    with pytest.raises(SenseJaxError, match=r"input of 513 tokens exceeds the model's 512 positions "
                                            r"\(max_position_embeddings=512\)"):
        m.hidden_states(ids, mask)
    with pytest.raises(SenseJaxError, match="513 tokens exceeds"):
        m.all_hidden_states(ids, mask)
    with pytest.raises(SenseJaxError, match="max_length 600 tokens exceeds .* 512 positions"):
        m.tokenize(["a b"], max_length=600)


def test_roberta_positions_start_after_the_padding_offset(tmp_path):
    from transformers import RobertaConfig

    cfg = RobertaConfig(**SMALL, max_position_embeddings=514, pad_token_id=1, type_vocab_size=1)
    m = sense_jax.load_model(save_tiny_hf_model(tmp_path / "roberta", cfg))
    assert m.max_input_length == 512  # position ids 2..513
    ids, mask = _ids(512)
    np.testing.assert_allclose(np.asarray(m.hidden_states(ids, mask)), _torch_states(m.path, ids, mask), atol=1e-4)
    for T in (513, 514):
        ids, mask = _ids(T)
        with pytest.raises(SenseJaxError, match=rf"input of {T} tokens exceeds the model's 512 positions "
                                                r"\(max_position_embeddings=514 minus the padding offset 2"):
            m.hidden_states(ids, mask)


def test_deberta_absolute_positions_are_refused_relative_ones_run_past(tmp_path):
    """DeBERTa-v3 (relative positions, log buckets clipped to 2k slots) has no table to overflow:
    past max_position_embeddings it still matches transformers. With position_biased_input
    (DeBERTa-v2 style absolute positions) the table's length is the limit."""
    from transformers import DebertaV2Config

    base = dict(SMALL, max_position_embeddings=16, relative_attention=True, pos_att_type=["p2c", "c2p"],
                position_buckets=8, max_relative_positions=-1, share_att_key=True, norm_rel_ebd="layer_norm",
                type_vocab_size=0, layer_norm_eps=1e-7)
    v3 = sense_jax.load_model(save_tiny_hf_model(tmp_path / "v3", DebertaV2Config(**base, position_biased_input=False)))
    assert v3.max_input_length is None
    ids, mask = _ids(40)
    h = np.asarray(v3.hidden_states(ids, mask))
    assert np.isfinite(h).all()
    np.testing.assert_allclose(h, _torch_states(v3.path, ids, mask), atol=1e-4)
    v2 = sense_jax.load_model(save_tiny_hf_model(tmp_path / "v2", DebertaV2Config(**base, position_biased_input=True)))
    assert v2.max_input_length == 16
    ids, mask = _ids(16)
    np.testing.assert_allclose(np.asarray(v2.hidden_states(ids, mask)), _torch_states(v2.path, ids, mask), atol=1e-4)
    with pytest.raises(SenseJaxError, match=r"input of 17 tokens exceeds the model's 16 positions"):
        v2.hidden_states(*_ids(17))


def test_llama_rotary_positions_run_past_max_position_embeddings(tmp_path):
    """Rotary positions are computed, not looked up: no refusal, finite states equal to
    transformers' past max_position_embeddings; tokenize still truncates to it by default."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**dict(SMALL, num_key_value_heads=1, max_position_embeddings=16, pad_token_id=0))
    m = sense_jax.load_model(save_tiny_hf_model(tmp_path / "llama", cfg))
    assert m.max_input_length is None
    ids, mask = _ids(24)
    h = np.asarray(m.hidden_states(ids, mask))
    assert np.isfinite(h).all()
    np.testing.assert_allclose(h, _torch_states(m.path, ids, mask), atol=1e-4)


@pytest.fixture(scope="module")
def short_teacher(tmp_path_factory, minilm_dir, sentences):
    """A tiny BERT with MiniLM's vocabulary and only 64 positions, its dictionary and a corpus."""
    from skd_helpers import make_sense_dict, make_teacher

    from sense_jax.fingerprints import teacher_fingerprint

    d = tmp_path_factory.mktemp("short")
    teacher = sense_jax.load_model(make_teacher(d / "teacher", minilm_dir, max_position_embeddings=64))
    make_sense_dict(teacher.tokenizer, sentences,
                    meta={"teacher_fingerprint": teacher_fingerprint(teacher.params, 30522)}).save(d / "senses")
    (d / "corpus.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return d, teacher


def test_distill_refuses_max_length_past_the_teachers_positions(short_teacher, tmp_path, capsys):
    from sense_jax import trainer as T
    from sense_jax.cli import main

    d, _ = short_teacher
    out = tmp_path / "run"
    sets = dict(teacher=d / "teacher", senses=d / "senses", train_data=d / "corpus.txt", out_dir=out,
                progress=False, steps=2, batch_size=4, max_length=128, student_layers=1, warmup_steps=1)
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    assert main(["distill", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config: max_length 128 tokens exceeds teacher" in err[0] \
        and "64 positions (max_position_embeddings=64); set max_length <= 64" in err[0], err
    assert not (out / "checkpoints").exists()
    with pytest.raises(ConfigError, match="max_length 65 tokens"):
        T.setup(T.load_config(None, [f"{k}={v}" for k, v in dict(sets, max_length=65).items()]))


def test_extract_refuses_max_length_past_the_teachers_positions(short_teacher, tmp_path):
    from sense_jax.extract import extract

    d, teacher = short_teacher
    with pytest.raises(SenseJaxError, match=r"max_length 128 tokens exceeds teacher .*'s 64 positions "
                                            r"\(max_position_embeddings=64\); choose --max-length <= 64"):
        extract(teacher, d / "corpus.txt", tmp_path / "store", n_per_token=2, max_length=128, progress=False)
    assert not (tmp_path / "store").exists() and not (tmp_path / "store.partial").exists()


def test_evaluation_length_follows_the_models_positions(short_teacher, minilm_dir):
    from sense_jax.evaluation import EVAL_MAX_LENGTH, eval_max_length

    _, teacher = short_teacher
    minilm = sense_jax.load_model(minilm_dir)
    assert EVAL_MAX_LENGTH == 128
    assert eval_max_length([minilm]) == 128  # the MiniLM report is unchanged
    assert eval_max_length([minilm, teacher]) == 64


def test_pipeline_refuses_max_length_right_after_convert(short_teacher, tmp_path):
    from sense_jax.pipeline import Pipeline, load_pipeline_config

    d, _ = short_teacher
    cfg = load_pipeline_config(None, [f"teacher={d / 'teacher'}", "max_length=128", "progress=false"],
                               out=str(tmp_path / "p"))
    for _ in range(2):  # converting, then with the teacher converted already
        with pytest.raises(ConfigError, match=r"config: max_length 128 tokens exceeds teacher .*'s 64 positions"):
            Pipeline(cfg, log=lambda m: None).run(stages=("convert", "corpus"))
    assert not (tmp_path / "p" / "corpus").exists()
