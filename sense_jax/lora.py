"""Merging a PEFT LoRA adapter into a transformers state dict before conversion.

An adapter directory (as written by PEFT's ``save_pretrained``) holds ``adapter_config.json``
and ``adapter_model.safetensors`` (or ``adapter_model.bin``). For every adapted linear layer
``W [out, in]`` it stores ``lora_A [r, in]`` and ``lora_B [out, r]``; the merged weight is

    W' = W + s · B A,   s = lora_alpha / r   (or lora_alpha / sqrt(r) with ``use_rslora``)

as PEFT's ``LoraLayer.merge`` / ``get_delta_weight`` computes it (peft/tuners/lora/layer.py),
with per-module ``rank_pattern`` / ``alpha_pattern`` overrides (regular expressions matched as
PEFT's ``get_pattern_key`` does). Trained biases (``bias="all"`` / ``"lora_only"``, saved as
``<module>.base_layer.bias`` or ``<module>.bias``) and ``modules_to_save`` tensors replace the base
tensors, as ``merge_and_unload`` leaves them. Every field of the adapter config is read: settings
this merge does not implement (DoRA, PiSSA-style inits that rewrite the base weights, layer
replication, lora_bias, ...) and unknown fields that are set are refused by name. LLM2Vec
checkpoints are a base model plus such adapters (the MNTP adapter, then optionally a supervised
one), merged in order.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from sense_jax.errors import ConversionError
from sense_jax.hf_checkpoint import read_safetensors, read_torch_bin
from sense_jax.io_utils import read_json

_LORA_KEY = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>A|B)(?:\.(?P<name>[^.]+))?\.weight$")
_UNSUPPORTED_KEYS = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

# Every field of PEFT's LoraConfig (peft 0.21.2, peft/tuners/lora/config.py) and what the merge does
# with it. A field not listed here is refused unless it holds an "unset" value (None, False, empty).
#
# Descriptive only, or it decides which modules were adapted (the saved tensors say that):
_CONFIG_NOTES = frozenset({
    "peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
    "auto_mapping", "megatron_core", "lora_dropout", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "qalora_group_size", "runtime_config",
    # Settings of an init method; the method itself is init_lora_weights, checked below.
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    # Ties adapters of tied layers; LoRA on embeddings is refused by tensor name, and a stored head
    # that differs from its tied source is caught after the merge (convert._untie_if_stored_apart).
    "ensure_weight_tying",
})
# Implemented here:
_CONFIG_IMPLEMENTED = frozenset({
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "init_lora_weights",
    "bias",             # trained biases are saved as <module>[.base_layer].bias and replace the base ones
    "modules_to_save",  # saved as <module>.weight etc.; they replace the base tensors, as merge_and_unload
})
# Not implemented: refused by name unless unset. Each changes what the merged model computes.
_CONFIG_REFUSED = {
    "use_dora": "DoRA (a learned magnitude per output)",
    "fan_in_fan_out": "Conv1D layers stored [in, out] (GPT-2 style)",
    "layer_replication": "layers stacked from copies of the base layers",
    "lora_bias": "a bias on lora_B",
    "target_parameters": "LoRA on bare nn.Parameters (MoE experts)",
    "trainable_token_indices": "trained rows of the embedding matrix",
    "use_qalora": "QALoRA's pooled inputs",
    "alora_invocation_tokens": "activated LoRA, which applies only after its invocation tokens and cannot be merged",
    "arrow_config": "Arrow routing between adapters",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA, which truncates the base weights' singular values",
    "monteclora_config": "MonteCLoRA's sampled adapters",
    "velora_config": "VeLoRA",
    "megatron_config": "Megatron parallel linear layers",
}
# init_lora_weights values after which W + s·BA on the original base weights is the adapted model.
# PiSSA / OLoRA / CorDA / LoftQ / LoRA-GA instead rewrite the base weights at init (W - s·B0 A0,
# or a quantised W), which the base checkpoint does not hold; PEFT's save_pretrained with
# path_initial_model_for_weight_conversion turns such an adapter into a plain one (and records
# init_lora_weights=true).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
_PEFT_DEFAULT_R = _PEFT_DEFAULT_ALPHA = 8  # LoraConfig's defaults of r and lora_alpha


def _unset(value) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, tuple, str)) and not value)


def _check_config(acfg: dict, where: str) -> None:
    """Refuse, by field name, every adapter setting the merge does not implement (see the tables)."""
    peft_type = str(acfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ConversionError(f"{where}: peft_type {peft_type!r} is not supported (only LORA)")
    for key, value in acfg.items():
        if key in _CONFIG_NOTES or key in _CONFIG_IMPLEMENTED or _unset(value):
            continue
        what = _CONFIG_REFUSED.get(key)
        raise ConversionError(f"{where}: {key}={json.dumps(value)} is not supported"
                              + (f" ({what})" if what else " (a setting this merge does not know)"))
    init = acfg.get("init_lora_weights", True)
    if not any(init is p or (isinstance(init, str) and init == p) for p in _PLAIN_INITS):
        raise ConversionError(
            f"{where}: init_lora_weights={json.dumps(init)} is not supported: that init rewrites the "
            "base weights (PiSSA / OLoRA / CorDA / LoftQ / LoRA-GA), so this adapter does not apply to "
            "the original base checkpoint; save it with PEFT's path_initial_model_for_weight_conversion "
            "(a plain LoRA adapter) or merge it with PEFT and convert the merged model")
    bias = acfg.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise ConversionError(f"{where}: bias={json.dumps(bias)} is not supported "
                              "(PEFT's values: none, all, lora_only)")


def _pattern_value(patterns: dict, module: str, default):
    r"""PEFT's ``get_pattern_key`` (peft/utils/other.py): the first key (a regular expression) such
    that ``re.match(rf"(.*\.)?({key})$", module)``; the group makes ``"q_proj|v_proj"`` one
    alternative that must end the name at a ``.`` boundary. No key matches: ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targets_module(target_modules: Any, module: str) -> bool:
    """PEFT's ``check_target_module_exists``: a regex string matched in full, or a list of
    names each matching the module's last component(s)."""
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _read_adapter_tensors(adapter_dir: Path) -> dict[str, np.ndarray]:
    st, bn = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if st.is_file():
        return read_safetensors(st)
    if bn.is_file():
        return read_torch_bin(bn)
    raise ConversionError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")


def _resolve_base_name(module_weight: str, state: dict, family) -> str | None:
    """The state-dict key of ``module_weight`` allowing for a task model's prefix (``model.``)
    and for an older release's name of it (``LayerNorm.beta`` for PEFT's ``LayerNorm.bias``:
    PEFT names tensors as transformers does after its legacy renaming)."""
    candidates = [module_weight]
    for prefix in (family.base_prefixes if family is not None else ()):
        candidates.append(prefix + module_weight)
        if module_weight.startswith(prefix):
            candidates.append(module_weight[len(prefix):])
    for c in candidates:
        if c in state:
            return c
    if family is not None and family.renames:
        renamed = {family.rename(k): k for k in state}
        for c in candidates:
            if c in renamed:
                return renamed[c]
    return None


def _split_adapter_tensors(adapter_dir: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The adapter's tensors as (module -> {"A": lora_A, "B": lora_B}, other tensors by base name).

    Raises:
      ConversionError: a tensor of an unsupported kind (LoRA on embeddings, DoRA, a lora_B
        bias), or no lora_A / lora_B tensor at all.
    """
    pairs: dict[str, dict[str, np.ndarray]] = {}
    extra: dict[str, np.ndarray] = {}
    for key, value in _read_adapter_tensors(adapter_dir).items():
        name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        if any(u in name for u in _UNSUPPORTED_KEYS):
            raise ConversionError(f"{adapter_dir}: tensor {key!r} is not supported "
                                  "(LoRA on embeddings / DoRA)")
        m = _LORA_KEY.match(name)
        if m:
            pairs.setdefault(m.group("mod"), {})[m.group("ab")] = value
        elif ".lora_" in name:
            raise ConversionError(f"{adapter_dir}: tensor {key!r} is not supported (only lora_A / "
                                  "lora_B weights; a lora_B bias needs lora_bias)")
        else:
            # Trained biases (bias="all" / "lora_only") and modules_to_save replace the base
            # tensors. PEFT saves the bias of an adapted layer under its wrapped base layer:
            # <module>.base_layer.bias is the base model's <module>.bias.
            extra[name.replace(".base_layer.", ".")] = value
    if not pairs:
        raise ConversionError(f"{adapter_dir}: adapter weights hold no lora_A/lora_B tensors")
    return pairs, extra


def _replace_tensors(merged: dict, extra: dict[str, np.ndarray], state: dict, family, adapter_dir: Path,
                     mismatch: str) -> list[str]:
    """Put the adapter's trained biases and ``modules_to_save`` tensors in place of the base ones
    (in ``merged``), as ``merge_and_unload`` leaves them; returns the task-head tensors skipped.

    Raises:
      ConversionError: a tensor without a counterpart in the base checkpoint, or of another shape.
    """
    ignored = [re.compile(p) for p in (family.ignored if family is not None else ())]
    skipped = []
    for name, value in extra.items():
        base = _resolve_base_name(name, state, family)
        if base is None and any(p.search(_strip(name, family)) for p in ignored):
            skipped.append(name)  # a task head (modules_to_save of a SEQ_CLS adapter): not converted
            continue
        if base is None or tuple(state[base].shape) != tuple(value.shape):
            raise ConversionError(f"{adapter_dir}: tensor {name!r} "
                                  + ("has no counterpart in the base checkpoint" if base is None else
                                     f"has shape {tuple(value.shape)}, base {tuple(state[base].shape)}")
                                  + mismatch)
        merged[base] = value.astype(np.float32)
    return skipped


def merge_lora(state: dict[str, np.ndarray], adapter_dir: str | os.PathLike,
               family) -> tuple[dict[str, np.ndarray], dict]:
    """Fold a PEFT LoRA adapter into a transformers state dict.

    Args:
      state: transformers name -> array (the base checkpoint; not modified).
      adapter_dir: directory with ``adapter_config.json`` and the adapter weights.
      family: the base model's :class:`~sense_jax.models.ModelFamily` (for its name prefixes).

    Returns:
      (merged_state, info): a new dict with the adapted weights replaced by float32
      ``W + s · B @ A`` (other tensors shared, not copied), and a JSON-able summary.

    Raises:
      ConversionError: missing/invalid files; a non-LoRA or unsupported adapter (a config field
        of ``_CONFIG_REFUSED`` or an unknown one that is set, an init that rewrites the base
        weights, LoRA on embeddings); an adapter whose base model does not match: a target
        module or tensor the base checkpoint lacks, or a shape that differs (names the tensor,
        both shapes and the adapter's ``base_model_name_or_path``).
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ConversionError(f"adapter directory not found: {adapter_dir}")
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter directory)")
    acfg = read_json(cfg_path, "adapter_config.json")
    where = f"{cfg_path}"
    _check_config(acfg, where)
    try:
        r_default = int(acfg.get("r", _PEFT_DEFAULT_R))
        alpha_default = float(acfg.get("lora_alpha", _PEFT_DEFAULT_ALPHA))
    except (TypeError, ValueError):
        raise ConversionError(f"{where}: invalid 'r' / 'lora_alpha'") from None
    rslora = bool(acfg.get("use_rslora", False))
    targets = acfg.get("target_modules")
    base_id = acfg.get("base_model_name_or_path")
    mismatch = (f" (the adapter was trained on {base_id!r}; its base model does not match this "
                "checkpoint)" if base_id else " (the adapter's base model does not match this checkpoint)")

    pairs, extra = _split_adapter_tensors(adapter_dir)

    merged = dict(state)
    modules = []
    for mod, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ConversionError(f"{adapter_dir}: module {mod!r} has lora_{'A' if 'A' in ab else 'B'} "
                                  f"but not lora_{'B' if 'A' in ab else 'A'}")
        base = _resolve_base_name(mod + ".weight", state, family)
        if base is None:
            raise ConversionError(f"{adapter_dir}: adapter targets module {mod!r}, which the base "
                                  f"checkpoint lacks{mismatch}")
        if not _targets_module(targets, mod):
            raise ConversionError(f"{adapter_dir}: module {mod!r} has LoRA weights but is not in "
                                  f"target_modules {targets}")
        A, B, W = ab["A"], ab["B"], state[base]
        r = int(_pattern_value(acfg.get("rank_pattern"), mod, r_default))
        alpha = float(_pattern_value(acfg.get("alpha_pattern"), mod, alpha_default))
        if A.ndim != 2 or B.ndim != 2 or W.ndim != 2 or A.shape[0] != r or B.shape[1] != r \
                or (B.shape[0], A.shape[1]) != tuple(W.shape):
            raise ConversionError(
                f"{adapter_dir}: module {mod!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                f"(r={r}) do not fit base weight {base!r} of shape {tuple(W.shape)}{mismatch}")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        delta = B.astype(np.float32) @ A.astype(np.float32)
        merged[base] = (W.astype(np.float32) + np.float32(scale) * delta).astype(np.float32)
        modules.append(base)
    # Every listed target name must exist in the base model.
    if isinstance(targets, list):
        names = [n[:-len(".weight")] for n in state if n.endswith(".weight")]
        absent = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if absent:
            raise ConversionError(f"{where}: target_modules {absent} name no module of the base "
                                  f"checkpoint{mismatch}")
    skipped = _replace_tensors(merged, extra, state, family, adapter_dir, mismatch)
    return merged, {"adapter": str(adapter_dir), "base_model_name_or_path": base_id, "r": r_default,
                    "lora_alpha": alpha_default, "use_rslora": rslora, "merged_modules": len(modules),
                    "replaced_tensors": sorted(set(extra) - set(skipped)), "skipped_tensors": sorted(skipped)}


def _strip(name: str, family) -> str:
    for prefix in (family.base_prefixes if family is not None else ()):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name
