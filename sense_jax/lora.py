"""Merging a PEFT LoRA adapter into a transformers state dict before conversion.

An adapter directory (as written by PEFT's ``save_pretrained``) holds ``adapter_config.json``
and ``adapter_model.safetensors`` (or ``adapter_model.bin``). For every adapted linear layer
``W [out, in]`` it stores ``lora_A [r, in]`` and ``lora_B [out, r]``; the merged weight is

    W' = W + s · B A,   s = lora_alpha / r   (or lora_alpha / sqrt(r) with ``use_rslora``)

as PEFT's ``LoraLayer.merge`` / ``get_delta_weight`` computes it (peft/tuners/lora/layer.py),
with per-module ``rank_pattern`` / ``alpha_pattern`` overrides. LLM2Vec checkpoints are a base
model plus such adapters (the MNTP adapter, then optionally a supervised one), merged in order.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from sense_jax.errors import ConversionError
from sense_jax.io_utils import read_json

_LORA_KEY = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>A|B)(?:\.(?P<name>[^.]+))?\.weight$")
_UNSUPPORTED_KEYS = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key applies when ``module`` ends with it at a ``.`` boundary."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
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
    from sense_jax.convert import _read_safetensors, _read_torch_bin

    st, bn = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if st.is_file():
        return _read_safetensors(st)
    if bn.is_file():
        return _read_torch_bin(bn)
    raise ConversionError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")


def _resolve_base_name(module_weight: str, state: dict, family) -> str | None:
    """The state-dict key of ``module_weight`` allowing for a task model's prefix (``model.``)."""
    candidates = [module_weight]
    for prefix in (family.base_prefixes if family is not None else ()):
        candidates.append(prefix + module_weight)
        if module_weight.startswith(prefix):
            candidates.append(module_weight[len(prefix):])
    for c in candidates:
        if c in state:
            return c
    return None


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
      ConversionError: missing/invalid files; a non-LoRA or unsupported adapter (DoRA, LoRA on
        embeddings, fan_in_fan_out); an adapter whose base model does not match: a target
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
    peft_type = str(acfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ConversionError(f"{where}: peft_type {peft_type!r} is not supported (only LORA)")
    if acfg.get("use_dora"):
        raise ConversionError(f"{where}: use_dora=true (DoRA) is not supported")
    if acfg.get("fan_in_fan_out"):
        raise ConversionError(f"{where}: fan_in_fan_out=true (Conv1D layers) is not supported")
    try:
        r_default, alpha_default = int(acfg["r"]), float(acfg.get("lora_alpha", acfg["r"]))
    except (KeyError, TypeError, ValueError):
        raise ConversionError(f"{where}: missing or invalid 'r' / 'lora_alpha'") from None
    rslora = bool(acfg.get("use_rslora", False))
    targets = acfg.get("target_modules")
    base_id = acfg.get("base_model_name_or_path")
    mismatch = (f" (the adapter was trained on {base_id!r}; its base model does not match this "
                "checkpoint)" if base_id else " (the adapter's base model does not match this checkpoint)")

    tensors = _read_adapter_tensors(adapter_dir)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    extra: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        if any(u in name for u in _UNSUPPORTED_KEYS):
            raise ConversionError(f"{adapter_dir}: tensor {key!r} is not supported "
                                  "(LoRA on embeddings / DoRA)")
        m = _LORA_KEY.match(name)
        if m:
            pairs.setdefault(m.group("mod"), {})[m.group("ab")] = value
        else:
            extra[name] = value  # trained biases or modules_to_save: replace the base tensor
    if not pairs:
        raise ConversionError(f"{adapter_dir}: adapter weights hold no lora_A/lora_B tensors")

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
    for name, value in extra.items():
        base = _resolve_base_name(name, state, family)
        if base is None or tuple(state[base].shape) != tuple(value.shape):
            raise ConversionError(f"{adapter_dir}: tensor {name!r} "
                                  + ("has no counterpart in the base checkpoint" if base is None else
                                     f"has shape {tuple(value.shape)}, base {tuple(state[base].shape)}")
                                  + mismatch)
        merged[base] = value.astype(np.float32)
    return merged, {"adapter": str(adapter_dir), "base_model_name_or_path": base_id, "r": r_default,
                    "lora_alpha": alpha_default, "use_rslora": rslora, "merged_modules": len(modules),
                    "replaced_tensors": sorted(extra)}
