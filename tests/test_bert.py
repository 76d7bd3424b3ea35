"""The Flax BERT-family encoder matches transformers' PyTorch models (issue 2, parity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, BertConfig, RobertaConfig

import sense_jax
from conftest import save_tiny_hf_model


def _torch_states(model_dir, batch, **kw):
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        out = model(**{k: torch.tensor(v) for k, v in batch.items()}, **kw)
    return out


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return sense_jax.load_model(minilm_dir)


@pytest.fixture(scope="module")
def minilm_batch(minilm, sentences):
    assert len(sentences) >= 32
    return dict(minilm.tokenizer(sentences, padding=True, return_tensors="np"))


@pytest.fixture(scope="module")
def minilm_torch(minilm_dir, minilm_batch):
    return _torch_states(minilm_dir, minilm_batch, output_hidden_states=True)


def test_minilm_last_hidden_states_match_transformers(minilm, minilm_batch, minilm_torch):
    b = minilm_batch
    lengths = b["attention_mask"].sum(1)
    assert lengths.min() < 8 and lengths.max() > 40  # varied lengths, real padding
    ours = np.asarray(minilm.hidden_states(b["input_ids"], b["attention_mask"], b["token_type_ids"]))
    ref = minilm_torch.last_hidden_state.numpy()
    real = b["attention_mask"].astype(bool)
    assert ours.shape == ref.shape == (len(lengths), b["input_ids"].shape[1], 384)
    assert np.abs(ours - ref)[real].max() < 1e-4


def test_minilm_every_layer_and_pooler_match(minilm, minilm_batch, minilm_torch):
    b = minilm_batch
    states = np.asarray(minilm.all_hidden_states(b["input_ids"], b["attention_mask"]))
    real = b["attention_mask"].astype(bool)
    assert states.shape[0] == 7
    for layer, ref in enumerate(minilm_torch.hidden_states):
        assert np.abs(states[layer] - ref.numpy())[real].max() < 1e-4, f"layer {layer}"
    pooled = minilm.module.apply({"params": minilm.params}, states[-1], method="pooled_output")
    assert np.abs(np.asarray(pooled) - minilm_torch.pooler_output.numpy()).max() < 1e-4


def test_token_type_ids_default_to_zeros(minilm, minilm_batch):
    b = minilm_batch
    a = minilm.hidden_states(b["input_ids"][:4], b["attention_mask"][:4])
    z = minilm.hidden_states(b["input_ids"][:4], b["attention_mask"][:4], np.zeros_like(b["input_ids"][:4]))
    o = minilm.hidden_states(b["input_ids"][:4], b["attention_mask"][:4], np.ones_like(b["input_ids"][:4]))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(z))
    assert np.abs(np.asarray(a) - np.asarray(o)).max() > 1e-3  # the segment embedding is used


def test_padding_does_not_change_real_positions(minilm, sentences):
    one = dict(minilm.tokenizer(sentences[:1], return_tensors="np"))
    padded = dict(minilm.tokenizer(sentences[:1], padding="max_length", max_length=64, return_tensors="np"))
    n = one["input_ids"].shape[1]
    a = np.asarray(minilm.hidden_states(one["input_ids"], one["attention_mask"]))
    b = np.asarray(minilm.hidden_states(padded["input_ids"], padded["attention_mask"]))
    assert np.abs(a[0] - b[0, :n]).max() < 1e-5


# Measured on this checkpoint and batch (docs/performance.md): max |bf16 - f32| = 0.036, mean
# 0.0027, on hidden states of mean magnitude 0.32; per-token cosine >= 0.99987. Bounds with
# ~3x headroom:
BF16_MAX_ABS = 0.1
BF16_MIN_COSINE = 0.999


def test_bfloat16_compute_within_documented_tolerance(minilm, minilm_batch):
    b = minilm_batch
    real = b["attention_mask"].astype(bool)
    f32 = np.asarray(minilm.hidden_states(b["input_ids"], b["attention_mask"]))
    bf16_model = minilm.with_dtype("bfloat16")
    bf16 = bf16_model.hidden_states(b["input_ids"], b["attention_mask"])
    assert bf16.dtype == np.dtype("bfloat16")
    assert bf16_model.params["embeddings"]["word_embeddings"]["embedding"].dtype == np.float32
    bf16 = np.asarray(bf16, np.float32)
    err = np.abs(bf16 - f32)[real]
    cos = (bf16 * f32).sum(-1) / np.linalg.norm(bf16, axis=-1) / np.linalg.norm(f32, axis=-1)
    assert 0 < err.max() < BF16_MAX_ABS
    assert cos[real].min() > BF16_MIN_COSINE


@pytest.mark.parametrize("act", ["gelu_new", "relu", "gelu_pytorch_tanh"])
def test_tiny_bert_activation_variants_match(tmp_path, act):
    cfg = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=40, hidden_act=act,
                     layer_norm_eps=1e-7, type_vocab_size=3)
    d = save_tiny_hf_model(tmp_path / act, cfg, seed=1)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 101, (3, 17)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    ids[1, 9:] = 0
    tt = rng.integers(0, 3, ids.shape).astype(np.int32)
    m = sense_jax.load_model(d)
    assert m.config.hidden_act == act and m.config.layer_norm_eps == 1e-7
    ours = np.asarray(m.hidden_states(ids, mask, tt))
    ref = _torch_states(d, {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}).last_hidden_state.numpy()
    assert np.abs(ours - ref)[mask.astype(bool)].max() < 1e-4


def test_tiny_roberta_position_ids_start_after_padding_idx(tmp_path):
    cfg = RobertaConfig(vocab_size=90, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=36, pad_token_id=1,
                        type_vocab_size=1)
    d = save_tiny_hf_model(tmp_path / "roberta", cfg, seed=2)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 90, (4, 30)).astype(np.int32)
    mask = np.ones_like(ids)
    for row, n in enumerate([30, 21, 5, 12]):
        ids[row, n:] = 1
        mask[row, n:] = 0
    m = sense_jax.load_model(d)
    assert m.config.position_offset == 2  # padding_idx + 1
    ours = np.asarray(m.hidden_states(ids, mask))
    ref = _torch_states(d, {"input_ids": ids, "attention_mask": mask}).last_hidden_state.numpy()
    assert np.abs(ours - ref)[mask.astype(bool)].max() < 1e-4
    # Without the offset the first real token would sit at position 0: a visible difference.
    shifted = m.with_dtype("float32")
    shifted.config = shifted.config.replace(position_offset=0)
    wrong = np.asarray(shifted.family.make_module(shifted.config).apply(
        {"params": m.params}, ids, mask))
    assert np.abs(wrong - ref)[mask.astype(bool)].max() > 1e-2
