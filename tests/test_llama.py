"""Llama / Mistral / Qwen2 decoders match transformers' PyTorch models; LoRA merge matches PEFT
(issue 7).

Tiny random checkpoints are written with transformers' own ``save_pretrained``; the reference
is the PyTorch model run on the same batch, with transformers' position ids for padded
batches (``cumsum(mask) - 1``, as ``generate`` computes them).
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
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, MistralConfig, Qwen2Config

import sense_jax
from sense_jax.convert import load_hf, params_to_hf, read_hf_state_dict
from sense_jax.errors import ConfigError, ConversionError
from sense_jax.pooling import pool
from conftest import save_random_model

V, D = 97, 64
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
               "original_max_position_embeddings": 64}


def _tiny(cls=LlamaConfig, **kw):
    base = dict(vocab_size=V, hidden_size=D, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                rms_norm_eps=1e-5, pad_token_id=0)
    base.update(kw)
    return cls(**base)


def _save(out: Path, config, model_cls=LlamaForCausalLM, seed=0) -> Path:
    return save_random_model(out, config, model_cls, seed=seed)


def _batch(T=12, seed=0):
    """Three rows: full, left-padded (4 pads), right-padded (3 pads)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, (3, T))
    mask = np.ones((3, T), np.int64)
    mask[1, :4] = 0
    mask[2, T - 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _positions(mask, offset=0):
    return np.where(mask > 0, np.cumsum(mask, 1) - 1 + offset, 0)


def _torch_forward(model_dir, ids, mask, positions, model_cls=LlamaForCausalLM, attention_mask=None):
    model = model_cls.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids),
                     attention_mask=torch.tensor(mask) if attention_mask is None else attention_mask,
                     position_ids=torch.tensor(np.where(mask > 0, positions, 1)),
                     output_hidden_states=True)


def _ours(converted, ids, mask, positions=None, **cfg_changes):
    cfg = converted.config.replace(**cfg_changes) if cfg_changes else converted.config
    module = converted.family.make_module(cfg)
    params = jax.tree.map(jnp.asarray, converted.params)
    last, states = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                output_all_hidden_states=True,
                                position_ids=None if positions is None else jnp.asarray(positions))
    return module, params, np.asarray(last), np.asarray(states)


def _max_err(a, b, mask):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[mask.astype(bool)].max())


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """GQA 8:2, untied LM head, llama3 rope scaling with a 64-token original context."""
    return _save(tmp_path_factory.mktemp("llama3"), _tiny(rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False))


@pytest.fixture(scope="module")
def llama3(llama3_dir):
    return load_hf(llama3_dir)[0]


@pytest.mark.parametrize("offset", [0, 5000])
def test_llama3_rope_gqa_untied_matches_transformers(llama3_dir, llama3, offset):
    """Every layer and the LM logits, padding on both sides, positions up to ~80x the
    original 64-token context when offset=5000."""
    ids, mask = _batch()
    pos = _positions(mask, offset)
    ref = _torch_forward(llama3_dir, ids, mask, pos)
    module, params, last, states = _ours(llama3, ids, mask, pos if offset else None)
    assert llama3.config.rope_type == "llama3" and llama3.config.lm_head
    assert len(states) == len(ref.hidden_states) == 4
    for layer, r in enumerate(ref.hidden_states):
        assert _max_err(states[layer], r.numpy(), mask) < 1e-4, f"layer {layer}"
    logits = module.apply({"params": params}, jnp.asarray(last), method="logits")
    assert _max_err(logits, ref.logits.numpy(), mask) < 1e-4


def test_rope_frequencies_match_transformers_bit_for_bit(llama3_dir, llama3):
    from sense_jax.models.llama import rope_inv_freq

    ref = LlamaForCausalLM.from_pretrained(str(llama3_dir)).model.rotary_emb.inv_freq.numpy()
    ours = rope_inv_freq(llama3.config)
    # All three llama3 regimes occur: kept, smoothed, divided by factor.
    default = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    ratio = ours / default
    assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, 1 / 8).any()
    assert ((ratio < 0.99) & (ratio > 0.13)).any()
    np.testing.assert_array_equal(ours, ref)
    # Llama-3.1-8B's real settings (head_dim 128, theta 5e5, 8192 original context).
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from sense_jax.models.llama import config_from_hf

    real = _tiny(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 rope_theta=500000.0, max_position_embeddings=131072,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](real)
    np.testing.assert_array_equal(rope_inv_freq(config_from_hf(real.to_dict())), ref.numpy())


def test_left_and_right_padding_give_the_same_states(llama3):
    ids, mask = _batch()
    n = int(mask[2].sum())
    left = np.zeros_like(ids[2:3])
    left[0, -n:] = ids[2, :n]
    lmask = np.zeros_like(mask[2:3])
    lmask[0, -n:] = 1
    _, _, a, _ = _ours(llama3, ids[2:3], mask[2:3])
    _, _, b, _ = _ours(llama3, left, lmask)
    assert np.abs(a[0, :n] - b[0, -n:]).max() < 1e-5


def test_bidirectional_matches_transformers_with_a_full_mask(llama3_dir, llama3):
    """causal=False: transformers given a 4-D additive mask that only hides padding."""
    ids, mask = _batch()
    pos = _positions(mask)
    keep = (mask[:, None, None, :] > 0)
    full = torch.tensor(np.where(keep, 0.0, np.finfo(np.float32).min), dtype=torch.float32)
    full = full.expand(3, 1, ids.shape[1], ids.shape[1]).contiguous()
    ref = _torch_forward(llama3_dir, ids, mask, pos, attention_mask=full)
    _, _, bi, _ = _ours(llama3, ids, mask, causal=False)
    _, _, causal, _ = _ours(llama3, ids, mask)
    assert _max_err(bi, ref.hidden_states[-1].numpy(), mask) < 1e-4
    # The first real token sees later tokens only bidirectionally.
    assert np.abs(bi[0, 0] - causal[0, 0]).max() > 1e-2


@pytest.mark.parametrize("kind", ["tied", "qwen2", "qwen2_window", "mistral_window", "llama_biases"])
def test_family_variants_match_transformers(tmp_path, kind):
    """Tied embeddings (LM head = E^T), Qwen2 (q/k/v biases), Mistral with a sliding window
    shorter than the sequence, Llama with attention and MLP biases."""
    T = 12
    if kind == "tied":  # with linear rope scaling
        cfg = _tiny(tie_word_embeddings=True, num_hidden_layers=2,
                    rope_scaling={"rope_type": "linear", "factor": 4.0})
    elif kind == "qwen2":
        cfg = _tiny(Qwen2Config, tie_word_embeddings=True, num_hidden_layers=2)
    elif kind == "qwen2_window":  # full attention in layer 0, a 5-token window in layer 1
        cfg = _tiny(Qwen2Config, num_hidden_layers=2, use_sliding_window=True, sliding_window=5,
                    max_window_layers=1, tie_word_embeddings=False)
        T = 16
    elif kind == "mistral_window":
        cfg = _tiny(MistralConfig, sliding_window=5, num_hidden_layers=2, tie_word_embeddings=False)
        T = 16
    else:
        cfg = _tiny(attention_bias=True, mlp_bias=True, num_hidden_layers=2, tie_word_embeddings=False)
    from transformers import AutoModelForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    cls = {"qwen2": Qwen2ForCausalLM, "qwen2_window": Qwen2ForCausalLM,
           "mistral_window": MistralForCausalLM}.get(kind, LlamaForCausalLM)
    model_dir = _save(tmp_path / kind, cfg, model_cls=cls)
    converted = load_hf(model_dir)[0]
    ids, mask = _batch(T)
    pos = _positions(mask)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(np.where(mask > 0, pos, 1)), output_hidden_states=True)
    module, params, last, _ = _ours(converted, ids, mask)
    assert _max_err(last, ref.hidden_states[-1].numpy(), mask) < 1e-4
    logits = module.apply({"params": params}, jnp.asarray(last), method="logits")
    assert _max_err(logits, ref.logits.numpy(), mask) < 1e-4
    names = set(read_hf_state_dict(model_dir)[0])
    if kind in ("tied", "qwen2"):
        assert "lm_head" not in converted.params
    if kind == "tied":
        assert converted.config.rope_type == "linear" and converted.config.rope_factor == 4.0
    if kind == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in names
        assert "o_proj" in converted.params["layer_0"]["self_attn"]
        assert "bias" not in converted.params["layer_0"]["self_attn"]["o_proj"]
    if kind == "qwen2_window":
        assert converted.config.sliding_windows == (None, 5)
        _, _, full, _ = _ours(converted, ids, mask, sliding_windows=())
        assert _max_err(full, last, mask) > 1e-3
    if kind == "mistral_window":
        assert converted.config.sliding_windows == (5, 5)
        _, _, full, _ = _ours(converted, ids, mask, sliding_windows=())
        assert _max_err(full, last, mask) > 1e-3  # the window mattered
        with pytest.raises(ConfigError, match="sliding_window=5"):
            _ours(converted, ids, mask, causal=False)


def test_export_round_trip_is_exact(tmp_path, llama3_dir, llama3):
    """params_to_hf + cfg.to_hf() give a directory transformers loads and runs identically."""
    from safetensors.numpy import save_file

    from sense_jax.models.llama import config_from_hf

    state, _ = read_hf_state_dict(llama3_dir)
    back = params_to_hf(llama3.family, llama3.params)
    assert set(back) == {k[len("model."):] if k.startswith("model.") else k for k in state}
    for k, v in back.items():
        np.testing.assert_array_equal(v, state.get("model." + k, state.get(k)))
    assert config_from_hf(llama3.config.to_hf()) == llama3.config
    for cfg in (_tiny(Qwen2Config, use_sliding_window=True, sliding_window=4, max_window_layers=1),
                _tiny(MistralConfig, sliding_window=7)):
        ours = config_from_hf(cfg.to_dict())
        assert config_from_hf(ours.to_hf()) == ours and ours.sliding_windows
    out = tmp_path / "exported"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**llama3.config.to_hf(), "architectures": ["LlamaForCausalLM"]}))
    save_file({("" if k.startswith("lm_head") else "model.") + k: v for k, v in back.items()},
              str(out / "model.safetensors"))
    ids, mask = _batch()
    pos = _positions(mask)
    a = _torch_forward(out, ids, mask, pos).logits.numpy()
    b = _torch_forward(llama3_dir, ids, mask, pos).logits.numpy()
    np.testing.assert_array_equal(a, b)


def test_bf16_checkpoint_is_read_and_widened(tmp_path):
    """Released Llama / Mistral / Qwen2 weights are bf16 safetensors, which numpy cannot hold."""
    cfg = _tiny(num_hidden_layers=1, tie_word_embeddings=True)
    f32_dir = _save(tmp_path / "f32", cfg)
    model = LlamaForCausalLM.from_pretrained(str(f32_dir)).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "bf16"), safe_serialization=True)
    converted = load_hf(tmp_path / "bf16")[0]
    want = model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
    got = converted.params["layer_0"]["self_attn"]["q_proj"]["kernel"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_bare_llama_model_without_lm_head(tmp_path):
    model_dir = _save(tmp_path / "bare", _tiny(num_hidden_layers=1, tie_word_embeddings=False), LlamaModel)
    converted = load_hf(model_dir)[0]
    assert not converted.config.lm_head and "lm_head" not in converted.params
    ids, mask = _batch()
    ref = _torch_forward(model_dir, ids, mask, _positions(mask), model_cls=LlamaModel)
    _, _, last, _ = _ours(converted, ids, mask)
    assert _max_err(last, ref.last_hidden_state.numpy(), mask) < 1e-4


def test_lm_head_can_be_dropped_at_conversion(llama3_dir):
    """An encoder needs no LM head (525M parameters for Llama 3): ``lm_head=False`` skips it."""
    converted = load_hf(llama3_dir, config_overrides={"lm_head": False})[0]
    assert "lm_head" not in converted.params and "lm_head.weight" in converted.skipped


# Measured (3 layers, D=64, random N(0, 0.2) weights, hidden states up to |h| = 3.6): max
# |bf16 - f32| at real tokens 0.173, mean 0.017, per-token cosine >= 0.9984. Bounds with headroom:
BF16_MAX_ABS = 0.5
BF16_MIN_COSINE = 0.995


def test_bf16_compute_within_documented_tolerance(llama3):
    ids, mask = _batch()
    _, _, f32, _ = _ours(llama3, ids, mask)
    _, _, bf16, _ = _ours(llama3, ids, mask, dtype="bfloat16")
    real = mask.astype(bool)
    err = np.abs(bf16.astype(np.float32) - f32)[real]
    a, b = bf16.astype(np.float32)[real], f32[real]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    print(f"bf16 vs f32: max abs {err.max():.4f}, mean {err.mean():.5f}, min cos {cos.min():.6f}, "
          f"max |h| {np.abs(b).max():.2f}")
    assert bf16.dtype == jnp.bfloat16
    assert err.max() < BF16_MAX_ABS and cos.min() > BF16_MIN_COSINE


# --- Pooling ----------------------------------------------------------------------------------

def test_pooling_modes_match_numpy_and_ignore_padding_side():
    rng = np.random.default_rng(1)
    h = rng.normal(size=(2, 6, 4)).astype(np.float32)
    n = 4
    right = np.array([[1, 1, 1, 1, 0, 0]] * 2)
    left = np.array([[0, 0, 1, 1, 1, 1]] * 2)
    hl = np.concatenate([h[:, 4:], h[:, :4]], axis=1)  # the same 4 tokens, left-padded
    real = h[:, :n]
    w = np.arange(1, n + 1) / np.arange(1, n + 1).sum()
    expected = {"mean": real.mean(1), "weighted_mean": (real * w[None, :, None]).sum(1),
                "last_token": real[:, -1], "first_token": real[:, 0], "eos_token": real[:, -1]}
    for mode, want in expected.items():
        np.testing.assert_allclose(np.asarray(pool(h, right, mode)), want, atol=1e-6, err_msg=mode)
        np.testing.assert_allclose(np.asarray(pool(hl, left, mode)), want, atol=1e-6, err_msg=mode)
    skip = np.array([[0, 1, 1, 1, 1, 1]] * 2)  # LLM2Vec's embed_mask: skip an instruction token
    np.testing.assert_allclose(np.asarray(pool(h, right, "mean", skip)), h[:, 1:4].mean(1), atol=1e-6)
    with pytest.raises(ConfigError, match="max_pool"):
        pool(h, right, "max_pool")


# --- LoRA -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, llama3_dir):
    """A PEFT LoRA adapter (random A and B) on the llama3 checkpoint, and PEFT's merged model."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("adapter")
    base = LlamaForCausalLM.from_pretrained(str(llama3_dir)).eval()
    lcfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={"down_proj": 2}, init_lora_weights=False)
    model = get_peft_model(base, lcfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(str(out))
    merged = model.merge_and_unload().eval()
    return out, merged


def test_lora_merge_matches_peft(llama3_dir, peft_adapter):
    adapter_dir, merged = peft_adapter
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    converted = load_hf(llama3_dir, adapter=adapter_dir)[0]
    plain = load_hf(llama3_dir)[0]
    info = converted.adapters[0]
    assert info["merged_modules"] == 3 * 3 and info["lora_alpha"] == 12
    ids, mask = _batch()
    with torch.no_grad():
        ref = merged(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(np.where(mask > 0, _positions(mask), 1)),
                     output_hidden_states=True)
    _, _, ours, _ = _ours(converted, ids, mask)
    _, _, base, _ = _ours(plain, ids, mask)
    assert _max_err(ours, ref.hidden_states[-1].numpy(), mask) < 1e-4
    assert _max_err(base, ours, mask) > 1e-2  # the adapter changed the model
    loaded = sense_jax.load_model(llama3_dir, adapter=adapter_dir)
    assert _max_err(loaded.hidden_states(ids, mask), ref.hidden_states[-1].numpy(), mask) < 1e-4
    sd = merged.state_dict()
    np.testing.assert_allclose(converted.params["layer_1"]["mlp"]["down_proj"]["kernel"],
                               sd["model.layers.1.mlp.down_proj.weight"].numpy().T, atol=1e-6)


def test_rslora_scale_and_numpy_reference(tmp_path, llama3_dir, peft_adapter):
    """use_rslora: W + alpha / sqrt(r) · B A, checked against numpy on one module."""
    adapter_dir, _ = peft_adapter
    rs = tmp_path / "rs"
    shutil.copytree(adapter_dir, rs)
    cfg = json.loads((rs / "adapter_config.json").read_text())
    cfg.update(use_rslora=True, rank_pattern={})
    (rs / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.numpy import load_file, save_file

    t = load_file(str(rs / "adapter_model.safetensors"))
    for i in range(3):  # re-pad down_proj's rank to r=4 now that rank_pattern is gone
        key = f"base_model.model.model.layers.{i}.mlp.down_proj.lora_{{}}.weight"
        A, B = t[key.format("A")], t[key.format("B")]
        t[key.format("A")] = np.concatenate([A, np.ones((2, A.shape[1]), np.float32)])
        t[key.format("B")] = np.concatenate([B, np.zeros((B.shape[0], 2), np.float32)], axis=1)
    save_file(t, str(rs / "adapter_model.safetensors"))
    converted = load_hf(llama3_dir, adapter=rs)[0]
    state, _ = read_hf_state_dict(llama3_dir)
    qa = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    qb = t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    want = state["model.layers.0.self_attn.q_proj.weight"] + 12 / np.sqrt(4) * (qb @ qa)
    np.testing.assert_allclose(converted.params["layer_0"]["self_attn"]["q_proj"]["kernel"], want.T, atol=1e-5)


def test_adapter_for_another_base_model_is_refused(tmp_path, llama3_dir, peft_adapter):
    from sense_jax.lora import merge_lora

    adapter_dir, _ = peft_adapter
    wider = _save(tmp_path / "wider", _tiny(hidden_size=32, head_dim=8, num_hidden_layers=3))
    with pytest.raises(ConversionError, match=r"lora_A .* do not fit base weight .* shape \(32, 96\).*does not match"):
        load_hf(wider, adapter=adapter_dir)
    shallow = _save(tmp_path / "shallow", _tiny(num_hidden_layers=1))
    with pytest.raises(ConversionError, match=r"layers\.1\..*which the base checkpoint lacks"):
        load_hf(shallow, adapter=adapter_dir)
    names = tmp_path / "names"
    shutil.copytree(adapter_dir, names)
    cfg = json.loads((names / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj", "down_proj", "query_key_value"]
    (names / "adapter_config.json").write_text(json.dumps(cfg))
    state, _ = read_hf_state_dict(llama3_dir)
    with pytest.raises(ConversionError, match=r"\['query_key_value'\] name no module"):
        merge_lora(state, names, sense_jax.models.get_family("llama"))
    with pytest.raises(ConversionError, match="no adapter_config.json"):
        load_hf(llama3_dir, adapter=tmp_path)


# --- Bad input, CLI, load_model ----------------------------------------------------------------

def test_unsupported_settings_are_refused_by_name(tmp_path):
    from sense_jax.models.llama import config_from_hf

    hf = _tiny().to_dict()
    with pytest.raises(ConversionError, match="unsupported rope_scaling type 'yarn'"):
        config_from_hf({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConversionError, match="'dynamic'"):
        config_from_hf({**hf, "rope_parameters": {"type": "dynamic", "factor": 2.0, "rope_theta": 1e4}})
    q = _tiny(Qwen2Config).to_dict()
    q["layer_types"] = ["full_attention", "chunked_attention", "full_attention"]
    with pytest.raises(ConversionError, match="unsupported attention variant.*chunked_attention"):
        config_from_hf(q)
    with pytest.raises(ConversionError, match="attn_logit_softcapping"):
        config_from_hf({**hf, "attn_logit_softcapping": 50.0})


def test_missing_shard_listed_in_index_is_named(tmp_path, llama3_dir):
    d = tmp_path / "sharded"
    shutil.copytree(llama3_dir, d)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in read_hf_state_dict(llama3_dir)[0]}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConversionError, match="model-00002-of-00002.safetensors"):
        load_hf(d)


def test_cli_convert_with_adapter_and_bidirectional_then_load(tmp_path, monkeypatch, llama3_dir,
                                                              peft_adapter, capsys):
    from sense_jax import cli

    monkeypatch.setattr(cli, "COMMANDS", {"convert": "sense_jax.commands.convert"})
    adapter_dir, merged = peft_adapter
    out = tmp_path / "conv"
    assert cli.main(["convert", str(llama3_dir), str(out), "--adapter", str(adapter_dir),
                     "--bidirectional", "--pooling", "mean"]) == 0
    assert "merged adapter" in capsys.readouterr().out
    model = sense_jax.load_model(out)
    assert model.config.causal is False and model.family.name == "llama"
    ids, mask = _batch()
    ref = load_hf(llama3_dir, adapter=adapter_dir, config_overrides={"causal": False})[0]
    _, _, want, _ = _ours(ref, ids, mask)
    np.testing.assert_allclose(np.asarray(model.hidden_states(ids, mask)), want, atol=1e-5)
    # Bad adapter: one line, exit 2.
    assert cli.main(["convert", str(llama3_dir), str(tmp_path / "bad"), "--adapter", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no adapter_config.json" in err and "Traceback" not in err and not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="causel"):
        sense_jax.load_model(llama3_dir, config_overrides={"causel": False})
