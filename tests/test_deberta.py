"""The Flax DeBERTa-v2/v3 encoder matches transformers' PyTorch DebertaV2Model (issue 7).

Sequences are longer than the position-bucket size so the log-bucket branch of
``make_log_bucket_position`` runs; padding on the right (DeBERTa's tokenizer side).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, DebertaV2Model

from sense_jax.convert import load_hf, params_to_hf, read_hf_state_dict
from sense_jax.errors import ConversionError
from sense_jax.models.deberta_v2 import config_from_hf, relative_position_index

V = 97
V3 = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
          max_position_embeddings=128, relative_attention=True, pos_att_type=["p2c", "c2p"],
          position_buckets=8, max_relative_positions=-1, share_att_key=True, norm_rel_ebd="layer_norm",
          position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7)
# DeBERTa-v2 xlarge style: separate position projections, absolute positions too, token types,
# a narrower embedding projected up, the convolution after layer 0, no LayerNorm on P.
V2_CONV = {**V3, "share_att_key": False, "position_biased_input": True, "type_vocab_size": 2,
           "embedding_size": 24, "norm_rel_ebd": "none", "conv_kernel_size": 3, "conv_groups": 2,
           "pos_att_type": "p2c|c2p"}


def _save(out, cfg_kwargs, cls=DebertaV2Model, seed=0):
    torch.manual_seed(seed)
    model = cls(DebertaV2Config(**cfg_kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "LayerNorm.weight" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(str(out), safe_serialization=True)
    return out, model


def _batch(T=40, seed=0, types=False):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, (3, T))
    mask = np.ones((3, T), np.int64)
    mask[1, 25:] = 0
    mask[2, 9:] = 0
    ids[mask == 0] = 0
    tt = rng.integers(0, 2, (3, T)) if types else np.zeros((3, T), np.int64)
    return ids, mask, tt


def _ours(converted, ids, mask, tt, **changes):
    cfg = converted.config.replace(**changes) if changes else converted.config
    module = converted.family.make_module(cfg)
    params = jax.tree.map(jnp.asarray, converted.params)
    last, states = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tt),
                                output_all_hidden_states=True)
    return module, params, np.asarray(last), np.asarray(states)


def _err(a, b, mask):
    return float(np.abs(np.asarray(a, np.float32) - b)[mask.astype(bool)].max())


@pytest.mark.parametrize("variant", ["v3", "v2_conv"])
def test_every_layer_matches_transformers(tmp_path, variant):
    kw = V3 if variant == "v3" else V2_CONV
    model_dir, model = _save(tmp_path / variant, kw)
    converted = load_hf(model_dir)[0]
    ids, mask, tt = _batch(types=variant == "v2_conv")
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(tt), output_hidden_states=True)
    _, _, last, states = _ours(converted, ids, mask, tt)
    assert ids.shape[1] > 2 * kw["position_buckets"]  # the log-bucket branch runs
    assert len(states) == len(ref.hidden_states) == 4
    for layer, r in enumerate(ref.hidden_states):
        assert _err(states[layer], r.numpy(), mask) < 1e-4, f"layer {layer}"
    if variant == "v2_conv":
        assert "conv" in converted.params and "pos_key_proj" in converted.params["layer_0"]["attention"]
        _, _, no_conv, _ = _ours(converted, ids, mask, tt, conv_kernel_size=0)
        assert _err(no_conv, last, mask) > 1e-2  # the convolution mattered
    # Both relative terms matter.
    for only in (("c2p",), ("p2c",)):
        _, _, partial, _ = _ours(converted, ids, mask, tt, pos_att_type=only)
        assert _err(partial, last, mask) > 1e-2


@pytest.mark.parametrize("buckets,max_rel", [(16, 64), (256, 512), (-1, 20)])
def test_relative_slots_match_transformers(buckets, max_rel):
    """Log buckets (v3: 256 over 512), and plain clipping without buckets (v2 base)."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    cfg = config_from_hf({**V3, "model_type": "deberta-v2", "position_buckets": buckets,
                          "max_relative_positions": max_rel, "max_position_embeddings": 600})
    T = 600
    x = torch.zeros(1, T, 4)
    rel = build_relative_position(x, x, bucket_size=buckets, max_position=max_rel)[0].numpy()
    span = buckets if buckets > 0 else max_rel
    np.testing.assert_array_equal(relative_position_index(T, cfg), np.clip(rel + span, 0, 2 * span - 1))
    if buckets > 0:
        assert len(np.unique(np.abs(rel))) > buckets // 2 + 1  # beyond the linear zone


def test_task_model_pooler_converts_and_matches(tmp_path):
    kw = {**V3, "num_labels": 3, "pooler_hidden_act": "gelu"}
    model_dir, model = _save(tmp_path / "cls", kw, cls=DebertaV2ForSequenceClassification)
    converted = load_hf(model_dir)[0]
    assert converted.config.add_pooler
    # The classifier is converted with it (the head itself: tests/test_heads.py).
    assert converted.config.num_labels == 3 and converted.skipped == []
    ids, mask, tt = _batch()
    with torch.no_grad():
        h = model.deberta(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        pooled = model.pooler(h).numpy()
    module, params, last, _ = _ours(converted, ids, mask, tt)
    ours = module.apply({"params": params}, jnp.asarray(last), method="pooled_output")
    assert np.abs(np.asarray(ours) - pooled).max() < 1e-4
    assert config_from_hf(converted.config.to_hf()) == converted.config.replace(num_labels=0)
    back = params_to_hf(converted.family, converted.params)
    state, _ = read_hf_state_dict(model_dir)
    for k, v in back.items():
        np.testing.assert_array_equal(v, state.get("deberta." + k, state.get(k)))


def test_unsupported_variants_are_refused_by_name():
    base = {**V3, "model_type": "deberta-v2"}
    with pytest.raises(ConversionError, match=r"attention variant.*\['p2p'\]"):
        config_from_hf({**base, "pos_att_type": ["c2p", "p2p"]})
    with pytest.raises(ConversionError, match="norm_rel_ebd"):
        config_from_hf({**base, "norm_rel_ebd": "batch_norm"})
    with pytest.raises(ConversionError, match="conv_act 'mish'"):
        config_from_hf({**base, "conv_kernel_size": 3, "conv_act": "mish"})


# Measured on the v3 config above (3 layers, D=32, T=40, random N(0, 0.2) weights): max
# |bf16 - f32| at real tokens 0.038, per-token cosine >= 0.99987. Bounds with headroom:
BF16_MAX_ABS = 0.15
BF16_MIN_COSINE = 0.999


def test_bf16_within_documented_tolerance(tmp_path):
    model_dir, _ = _save(tmp_path / "bf", V3)
    converted = load_hf(model_dir)[0]
    ids, mask, tt = _batch()
    _, _, f32, _ = _ours(converted, ids, mask, tt)
    _, _, bf16, _ = _ours(converted, ids, mask, tt, dtype="bfloat16")
    real = mask.astype(bool)
    a, b = bf16.astype(np.float32)[real], f32[real]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    print(f"deberta bf16 vs f32: max abs {np.abs(a - b).max():.4f}, min cos {cos.min():.6f}")
    assert np.abs(a - b).max() < BF16_MAX_ABS and cos.min() > BF16_MIN_COSINE
