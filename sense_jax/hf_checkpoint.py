"""Reading a transformers checkpoint's files: ``config.json``, safetensors and PyTorch ``.bin``
weights, sharded or not (their ``*.index.json``). Used by conversion (:mod:`sense_jax.convert`)
and by the LoRA merge (:mod:`sense_jax.lora`), which reads an adapter's tensors the same way.

``.bin`` files are read with ``torch.load(weights_only=True)`` and only when torch is installed.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes  # noqa: F401  (lets safetensors' numpy backend return bf16 / fp8 arrays)
import numpy as np
from safetensors import SafetensorError, safe_open

from sense_jax.errors import ConversionError
from sense_jax.io_utils import read_json


def read_hf_config(model_dir: Path) -> dict:
    """transformers' ``config.json`` of ``model_dir`` as a dict (ConversionError if absent/invalid)."""
    try:
        return read_json(model_dir / "config.json", "config.json")
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(str(e)) from None


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of ``model_dir``, preferring safetensors; checks index files' shards."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.exists():
            weight_map = read_json(index, "index file").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (model_dir / f).is_file()]
            if missing:
                raise ConversionError(f"{index} lists shard(s) that are missing: {missing}")
            return [model_dir / f for f in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise ConversionError(
        f"{model_dir}: no weights found (expected model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)")


# safetensors dtypes numpy lacks (bf16: every Llama / Mistral / Qwen2 release). Importing
# ml_dtypes registers them with numpy; they are widened to float32 on read, as read_torch_bin does.
_WIDEN = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as numpy (bf16 / fp8 widened to float32).

    Raises:
      ConversionError: the file is truncated, corrupt or not safetensors (names it).
    """
    try:
        with safe_open(str(path), framework="np") as f:
            out = {}
            for k in f.keys():
                v = f.get_tensor(k)
                out[k] = v.astype(np.float32) if v.dtype.name in _WIDEN else v
            return out
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e}); "
                              "it may be truncated or corrupt") from None


def read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one PyTorch ``.bin`` file as numpy (bf16 widened to float32), read with
    ``torch.load(weights_only=True)``.

    Raises:
      ConversionError: torch is not installed, or the file cannot be read with weights_only.
    """
    try:
        import torch  # optional: only .bin checkpoints need it
    except ImportError:
        raise ConversionError(
            f"{path}: a PyTorch .bin checkpoint needs torch to read (pip install torch); "
            "or convert it to model.safetensors") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"{path}: could not be read as a PyTorch checkpoint with "
                              f"weights_only=True ({type(e).__name__}: {e})") from None
    out = {}
    for k, v in state.items():
        if v.dtype == torch.bfloat16:
            v = v.float()
        out[k] = v.numpy()
    return out


def read_hf_state_dict(model_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """All tensors of a checkpoint, and the file each came from.

    Returns:
      (state, file_of): name -> numpy array (dtype as stored), name -> source file.

    Raises:
      ConversionError: missing, corrupt or truncated files, shards missing from an index, or a
        .bin checkpoint without torch installed.
    """
    state: dict[str, np.ndarray] = {}
    file_of: dict[str, Path] = {}
    for path in weight_files(model_dir):
        tensors = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_bin(path)
        for k, v in tensors.items():
            state[k] = v
            file_of[k] = path
    return state, file_of
