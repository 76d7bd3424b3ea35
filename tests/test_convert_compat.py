"""Conversion compatibility with what transformers and PEFT accept (issue 11, items 4, 5, 6, 11).

Every reference value comes from transformers' or PEFT's PyTorch code on the same tiny random
checkpoint: the model transformers loads from the same directory, PEFT's ``merge_and_unload``,
``AutoModel.from_pretrained`` on an export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoModel, BertConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import save_tiny_hf_model
from sense_jax import convert as cv
from sense_jax.errors import ConversionError

BERT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=24, max_position_embeddings=20)
V = 61


def _llama_cfg(cls=LlamaConfig, **kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                rms_norm_eps=1e-5, pad_token_id=0)
    base.update(kw)
    return cls(**base)


def _save_causal(out: Path, config, model_cls=LlamaForCausalLM, seed=0) -> Path:
    """Random weights N(0, 0.2) (norm scales around 1), biases included, so each tensor matters."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def _ids(batch=2, T=9, vocab=V, seed=0):
    """Unpadded ids (transformers' default positions 0..T-1 are then ours too)."""
    return np.random.default_rng(seed).integers(1, vocab, (batch, T))


def _ours(converted, ids, mask=None, logits=False):
    mask = np.ones_like(ids) if mask is None else mask
    module = converted.family.make_module(converted.config)
    params = jax.tree.map(jnp.asarray, converted.params)
    h = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    if logits:
        return np.asarray(module.apply({"params": params}, h, method=module.logits))
    return np.asarray(h)


def _rewrite(src: Path, dst: Path, fn) -> Path:
    """Copy a model directory, its safetensors state rewritten by ``fn(state) -> state``."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    save_file(fn(state), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# --- 4. Names from older releases --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("bert") / "bert", BertConfig(**BERT), seed=3)


def _gamma_beta(state):
    out = {}
    for k, v in state.items():
        if "LayerNorm." in k:
            k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        out[k] = v
    return out


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_layernorm_gamma_beta_names_convert_like_transformers(tmp_path, tiny_bert, prefix):
    """TF-era BERT checkpoints name LayerNorm parameters gamma / beta (transformers' legacy
    renaming); with or without a task model's ``bert.`` prefix."""
    d = _rewrite(tiny_bert, tmp_path / "old", lambda s: {prefix + k: v for k, v in _gamma_beta(s).items()})
    assert any(k.endswith("LayerNorm.gamma") for k in load_file(str(d / "model.safetensors")))
    model, info = AutoModel.from_pretrained(str(d), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = _ids(vocab=BERT["vocab_size"])
    with torch.no_grad():
        ref = model.eval()(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
    converted, _ = cv.load_hf(d)
    ours = _ours(converted, ids)
    assert np.abs(ours - ref).max() < 1e-4


def test_both_old_and_new_name_of_one_parameter_is_refused(tmp_path, tiny_bert):
    def both(state):
        state = dict(state)
        state["embeddings.LayerNorm.gamma"] = state["embeddings.LayerNorm.weight"] + 1
        return state

    d = _rewrite(tiny_bert, tmp_path / "both", both)
    with pytest.raises(ConversionError, match=r"'embeddings\.LayerNorm\.(gamma|weight)' and tensor "
                                              r"'embeddings\.LayerNorm\.(gamma|weight)' both name"):
        cv.load_hf(d)


# --- 11. Configuration that contradicts the checkpoint -----------------------------------------

def test_tied_config_with_a_distinct_stored_lm_head_follows_the_checkpoint_like_transformers(tmp_path):
    """config.json: tie_word_embeddings=true, but lm_head.weight is stored and differs from the
    embedding. transformers keeps the stored head (untied, with a warning); so do we, saying so."""
    from transformers import AutoModelForCausalLM

    tied = _save_causal(tmp_path / "tied", _llama_cfg(tie_word_embeddings=True))
    assert "lm_head.weight" not in load_file(str(tied / "model.safetensors"))
    rng = np.random.default_rng(1)
    d = _rewrite(tied, tmp_path / "apart", lambda s: {
        **s, "lm_head.weight": rng.normal(0, 0.2, s["model.embed_tokens.weight"].shape).astype(np.float32)})
    ids = _ids()
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(d)).eval()(input_ids=torch.tensor(ids)).logits.numpy()
    with pytest.warns(cv.ConversionNote, match=r"tie_word_embeddings=true but the checkpoint stores "
                                               r"'lm_head\.weight' apart from 'model\.embed_tokens\.weight'"):
        converted, _ = cv.load_hf(d)
    assert not converted.config.tie_word_embeddings and converted.config.lm_head
    assert np.abs(_ours(converted, ids, logits=True) - ref).max() < 1e-4
    with pytest.warns(cv.ConversionNote):
        out = cv.convert(d, tmp_path / "conv")
    assert "lm_head.weight" in json.loads((out / "sense_jax.json").read_text())["notes"][0]

    # The same tensor stored twice stays tied, silently (transformers ties it too).
    same = _rewrite(tied, tmp_path / "same", lambda s: {**s, "lm_head.weight": s["model.embed_tokens.weight"]})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", cv.ConversionNote)
        converted, _ = cv.load_hf(same)
    assert converted.config.tie_word_embeddings and "lm_head" not in converted.params
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(same)).eval()(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(_ours(converted, ids, logits=True) - ref).max() < 1e-4
