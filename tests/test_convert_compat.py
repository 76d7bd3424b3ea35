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

from conftest import save_random_model, save_tiny_hf_model
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
    return save_random_model(out, config, model_cls, seed=seed)


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

def test_tied_config_with_a_distinct_stored_lm_head_follows_the_checkpoint_like_transformers(
        tmp_path, monkeypatch, capsys):
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
    from sense_jax import cli

    monkeypatch.setattr(cli, "COMMANDS", {"convert": "sense_jax.commands.convert"})
    out = tmp_path / "conv"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", cv.ConversionNote)  # the CLI prints it as a line instead
        assert cli.main(["convert", str(d), str(out)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "'lm_head.weight' apart from" in notes[0]
    meta = json.loads((out / "sense_jax.json").read_text())
    assert "lm_head.weight" in meta["notes"][0]
    # The directory says the same everywhere (load_model restores meta["config"]).
    assert meta["config"]["tie_word_embeddings"] is False and meta["config"]["lm_head"] is True
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False

    # The same tensor stored twice stays tied, silently (transformers ties it too).
    same = _rewrite(tied, tmp_path / "same", lambda s: {**s, "lm_head.weight": s["model.embed_tokens.weight"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", cv.ConversionNote)
        converted, _ = cv.load_hf(same)
    assert converted.config.tie_word_embeddings and "lm_head" not in converted.params
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(same)).eval()(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(_ours(converted, ids, logits=True) - ref).max() < 1e-4


# --- 5. LoRA adapters merge as PEFT merges them, or are refused by name --------------------------

def _peft_adapter(base_dir: Path, out: Path, model_cls, seed=0, **lora_kw):
    """A PEFT LoRA adapter on ``base_dir`` whose every trainable tensor (lora_A, lora_B, and the
    biases / modules_to_save copies the config makes trainable) is perturbed, as training would;
    returns (adapter_dir, PEFT's merge_and_unload model)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(model_cls.from_pretrained(str(base_dir)), LoraConfig(**lora_kw))
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(str(out))
    return out, model.merge_and_unload().eval()


def _assert_merged_like_peft(converted, merged, ids, logits=False):
    with torch.no_grad():
        out = merged(input_ids=torch.tensor(ids), output_hidden_states=True)
    ours = _ours(converted, ids)
    assert np.abs(ours - out.hidden_states[-1].numpy()).max() < 1e-4
    if logits:
        assert np.abs(_ours(converted, ids, logits=True) - out.logits.numpy()).max() < 1e-4
    sd = merged.state_dict()
    for name, flat in (("q_proj", converted.params["layer_1"]["self_attn"]["q_proj"]),
                       ("v_proj", converted.params["layer_1"]["self_attn"]["v_proj"])):
        np.testing.assert_allclose(flat["kernel"], sd[f"model.layers.1.self_attn.{name}.weight"].numpy().T,
                                   atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _save_causal(tmp_path_factory.mktemp("llama") / "llama", _llama_cfg())


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    return _save_causal(tmp_path_factory.mktemp("qwen2") / "qwen2", _llama_cfg(Qwen2Config),
                        model_cls=Qwen2ForCausalLM)


def test_alpha_and_rank_patterns_are_regexes_matched_as_peft_does(tmp_path, tiny_llama):
    """alpha_pattern {"q_proj|v_proj": 16} with r=4, lora_alpha=4: both modules get scale 16/4,
    as PEFT's get_pattern_key matches ``(.*\\.)?(q_proj|v_proj)$``; a rank pattern by layer."""
    adapter, merged = _peft_adapter(
        tiny_llama, tmp_path / "ad", LlamaForCausalLM, r=4, lora_alpha=4,
        target_modules=["q_proj", "v_proj"], alpha_pattern={"q_proj|v_proj": 16},
        rank_pattern={r"layers\.1\.self_attn\.(q|v)_proj": 2})
    converted, _ = cv.load_hf(tiny_llama, adapter=adapter)
    _assert_merged_like_peft(converted, merged, _ids())


@pytest.mark.parametrize("lora_kw", [dict(bias="all"), dict(bias="lora_only"),
                                     dict(bias="all", modules_to_save=["lm_head"])],
                         ids=["bias_all", "bias_lora_only", "bias_all_modules_to_save"])
def test_trained_biases_and_modules_to_save_are_merged_like_peft(tmp_path, tiny_qwen2, lora_kw):
    """bias="all" saves <module>.base_layer.bias for adapted layers (and k_proj.bias for the rest);
    modules_to_save saves the trained lm_head as lm_head.weight."""
    adapter, merged = _peft_adapter(tiny_qwen2, tmp_path / "ad", Qwen2ForCausalLM, r=2, lora_alpha=4,
                                    target_modules=["q_proj", "v_proj"], **lora_kw)
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(k.endswith("q_proj.base_layer.bias") for k in keys)
    converted, _ = cv.load_hf(tiny_qwen2, adapter=adapter)
    _assert_merged_like_peft(converted, merged, _ids(), logits=True)
    np.testing.assert_allclose(converted.params["layer_0"]["self_attn"]["q_proj"]["bias"],
                               merged.state_dict()["model.layers.0.self_attn.q_proj.bias"].numpy(), atol=0)


@pytest.fixture(scope="module")
def plain_adapter(tmp_path_factory, tiny_llama):
    return _peft_adapter(tiny_llama, tmp_path_factory.mktemp("plain") / "ad", LlamaForCausalLM, r=2,
                         target_modules=["q_proj", "v_proj"])[0]


def _edited(adapter: Path, dst: Path, **changes) -> Path:
    shutil.copytree(adapter, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, message", [
    (dict(init_lora_weights="pissa"), r"init_lora_weights=\"pissa\" is not supported: that init rewrites"),
    (dict(init_lora_weights="pissa_niter_4"), r"init_lora_weights=\"pissa_niter_4\""),
    (dict(init_lora_weights="olora"), r"init_lora_weights=\"olora\""),
    (dict(init_lora_weights="corda"), r"init_lora_weights=\"corda\""),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4}), r"init_lora_weights=\"loftq\""),
    (dict(use_dora=True), r"use_dora=true is not supported \(DoRA"),
    (dict(layer_replication=[[0, 2], [1, 2]]), r"layer_replication=\[\[0, 2\], \[1, 2\]\] is not supported"),
    (dict(lora_bias=True), r"lora_bias=true is not supported"),
    (dict(fan_in_fan_out=True), r"fan_in_fan_out=true is not supported"),
    (dict(target_parameters=["mlp.experts.down_proj"]), r"target_parameters=.* is not supported"),
    (dict(trainable_token_indices=[3, 4]), r"trainable_token_indices=\[3, 4\] is not supported"),
    (dict(some_future_field=2), r"some_future_field=2 is not supported \(a setting this merge does not know\)"),
    (dict(bias="everything"), r"bias=\"everything\" is not supported"),
])
def test_adapter_settings_not_implemented_are_refused_by_name(tmp_path, tiny_llama, plain_adapter,
                                                             changes, message):
    with pytest.raises(ConversionError, match=r"adapter_config\.json: " + message):
        cv.load_hf(tiny_llama, adapter=_edited(plain_adapter, tmp_path / "ad", **changes))


def test_pissa_adapter_is_refused_and_its_plain_lora_form_merges_like_peft(tmp_path, tiny_llama, plain_adapter):
    """PiSSA rewrites the base weights (W - s·B0 A0): its adapter does not apply to the stored
    base and is refused. The remedy the message names, PEFT's save_pretrained with
    path_initial_model_for_weight_conversion, gives a plain adapter (rank 2r) on the original
    base, which merges to PEFT's merge_and_unload of the PiSSA model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(str(tiny_llama)),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights="pissa"))
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter
    model.save_pretrained(str(tmp_path / "init"))
    model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "pissa"))
    model.save_pretrained(str(tmp_path / "plain"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    with pytest.raises(ConversionError, match="init_lora_weights=\"pissa\".*path_initial_model_for_weight_conversion"):
        cv.load_hf(tiny_llama, adapter=tmp_path / "pissa")
    converted, _ = cv.load_hf(tiny_llama, adapter=tmp_path / "plain")
    _assert_merged_like_peft(converted, model.merge_and_unload().eval(), _ids())
    # Unset unknown fields, descriptive fields and plain inits are accepted.
    ok = _edited(plain_adapter, tmp_path / "ok", init_lora_weights="gaussian", some_future_field=None,
                 task_type="CAUSAL_LM", lora_dropout=0.1, inference_mode=True)
    assert cv.load_hf(tiny_llama, adapter=ok)[0].adapters[0]["merged_modules"] == 4


# --- 6. Exports say what they contain ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_export_of_a_bf16_teachers_student_loads_in_float32_without_stray_keys(tmp_path, kind):
    """The teacher's config.json says dtype bfloat16; the export holds float32 weights and says
    float32, so AutoModel loads what sense_jax computes (1e-4); a decoder's lm_head is not written."""
    from sense_jax import distill as D

    if kind == "bert":
        f32 = save_tiny_hf_model(tmp_path / "f32", BertConfig(**BERT), seed=3)
        model = AutoModel.from_pretrained(str(f32))
    else:
        f32 = _save_causal(tmp_path / "f32", _llama_cfg(tie_word_embeddings=False))
        model = LlamaForCausalLM.from_pretrained(str(f32))
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    hf = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "bfloat16" in (hf.get("dtype"), hf.get("torch_dtype"))
    teacher, _ = cv.load_hf(tmp_path / "bf16")
    cfg, params = D.truncated_student(teacher.config, teacher.params, 1)
    assert (kind == "llama") == ("lm_head" in params)
    _, pooler = D.split_pooler(teacher.params)  # the teacher's pooler, as the trainer exports it
    out = D.export_hf(tmp_path / "student", teacher.family, cfg, params, teacher.hf_config, pooler=pooler)

    exported = json.loads((out / "config.json").read_text())
    assert exported["dtype"] == exported["torch_dtype"] == "float32"
    assert {str(v.dtype) for v in load_file(str(out / "model.safetensors")).values()} == {"float32"}
    loaded, info = AutoModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.dtype == torch.float32
    ids = _ids(vocab=BERT["vocab_size"] if kind == "bert" else V)
    with torch.no_grad():
        ref = loaded.eval()(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
    ours = np.asarray(teacher.family.make_module(cfg).apply(
        {"params": jax.tree.map(jnp.asarray, params)}, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32)))
    assert np.abs(ours - ref).max() < 1e-4


def test_adapter_with_trained_biases_on_an_old_named_base_merges_like_peft(tmp_path, tiny_bert):
    """PEFT names tensors as transformers does after renaming: a bias="all" adapter trained on a
    gamma/beta checkpoint stores LayerNorm.bias, which replaces the stored LayerNorm.beta."""
    from transformers import BertModel

    old = _rewrite(tiny_bert, tmp_path / "old", _gamma_beta)
    adapter, merged = _peft_adapter(old, tmp_path / "ad", BertModel, r=2, lora_alpha=4,
                                    target_modules=["query", "value"], bias="all")
    assert "base_model.model.encoder.layer.0.output.LayerNorm.bias" in load_file(
        str(adapter / "adapter_model.safetensors"))
    converted, _ = cv.load_hf(old, adapter=adapter)
    ids = _ids(vocab=BERT["vocab_size"])
    with torch.no_grad():
        ref = merged(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
    assert np.abs(_ours(converted, ids) - ref).max() < 1e-4


def test_task_head_saved_by_a_classification_adapter_is_skipped_and_reported(tmp_path, tiny_qwen2):
    """task_type SEQ_CLS adds modules_to_save=["classifier", "score"]: the trained score head is no
    parameter of ours (heads are skipped), the merged base model still equals PEFT's."""
    from transformers import Qwen2ForSequenceClassification

    adapter, merged = _peft_adapter(tiny_qwen2, tmp_path / "ad", Qwen2ForSequenceClassification, r=2,
                                    target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    assert "base_model.model.score.weight" in load_file(str(adapter / "adapter_model.safetensors"))
    converted, _ = cv.load_hf(tiny_qwen2, adapter=adapter)
    assert converted.adapters[0]["skipped_tensors"] == ["score.weight"]
    ids = _ids()
    with torch.no_grad():
        ref = merged.model(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
    assert np.abs(_ours(converted, ids) - ref).max() < 1e-4
