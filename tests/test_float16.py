"""Compute dtypes (issue 17 item 5): float16 is supported (finite on padded rows, close to float32),
any other dtype than float32 / bfloat16 / float16 is refused by name."""

from __future__ import annotations

import numpy as np
import pytest

import sense_jax
from conftest import save_tiny_hf_model

TEXTS = ["The bank by the river bank flooded in spring.", "A bat.", ""]


def _compare(model, padding_side: str, atol: float):
    tok = model.tokenizer
    tok.padding_side = padding_side
    b = tok(TEXTS, padding="max_length", max_length=24, return_tensors="np")
    tt = b.get("token_type_ids")
    ref = np.asarray(model.hidden_states(b["input_ids"], b["attention_mask"], tt), np.float32)
    h = model.with_dtype("float16").hidden_states(b["input_ids"], b["attention_mask"], tt)
    assert h.dtype == np.float16
    h = np.asarray(h, np.float32)
    real = b["attention_mask"].astype(bool)
    assert np.isfinite(h).all()  # padded rows too
    assert np.abs(h - ref)[real].max() < atol


def test_float16_bert_is_finite_and_close_to_float32(minilm_dir):
    m = sense_jax.load_model(minilm_dir)  # real weights: activations up to ~6
    _compare(m, "right", atol=2e-2)
    assert sense_jax.load_model(minilm_dir, dtype="float16").config.dtype == "float16"
    with pytest.raises(sense_jax.ConfigError, match="compute dtype 'float64'"):
        m.with_dtype("float64")


def test_float16_llama_is_finite_and_close_to_float32(tmp_path, minilm_dir):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    m = sense_jax.load_model(save_tiny_hf_model(tmp_path / "llama", cfg, tokenizer_dir=minilm_dir))
    _compare(m, "left", atol=2e-2)


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp8", "half-precision"])
def test_other_compute_dtypes_are_refused_by_name(minilm_dir, dtype):
    with pytest.raises(sense_jax.ConfigError, match=f"compute dtype '{dtype}': choose one of float32, "
                                                    "bfloat16, float16"):
        sense_jax.load_model(minilm_dir, dtype=dtype)
