"""sense_jax: multi-sense embeddings and sense knowledge distillation in JAX/Flax.

Reimplements Wang et al., "Multi-Sense Embeddings for Language Models and Knowledge
Distillation" (ACL Findings 2025). See README.md for the pipeline and the public API; stages live
in their modules (``sense_jax.extract``, ``sense_jax.sense_builder``, ``sense_jax.trainer``,
``sense_jax.pipeline``), the most used names are re-exported here.

The names are resolved on first use (PEP 562 module ``__getattr__``), so that ``import sense_jax``
and ``sense-jax --help`` import neither JAX nor transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_API = {
    # The persistent compilation cache (on by default for every job; sense_jax.compile_cache).
    "disable_compile_cache": "sense_jax.compile_cache",
    "enable_compile_cache": "sense_jax.compile_cache",
    # Models and conversion.
    "ConfigError": "sense_jax.errors",
    "ConversionError": "sense_jax.errors",
    "SenseJaxError": "sense_jax.errors",
    "Model": "sense_jax.loading",
    "load_model": "sense_jax.loading",
    "merge_lora": "sense_jax.lora",
    "pool": "sense_jax.pooling",
    # Extraction store (METHOD §1). The extraction itself: ``from sense_jax.extract import extract``
    # (not re-exported, so that ``sense_jax.extract`` stays the module).
    "Store": "sense_jax.store",
    "open_store": "sense_jax.store",
    "write_store": "sense_jax.store",
    # Sense dictionary (METHOD §1-2): batched k-means and nearest-sense look-up.
    "KMeansResult": "sense_jax.kmeans",
    "batched_kmeans": "sense_jax.kmeans",
    "build_sense_dictionary": "sense_jax.sense_builder",
    "SenseDictionary": "sense_jax.sense_dict",
    "gather_senses": "sense_jax.sense_dict",
    "nearest_sense": "sense_jax.sense_dict",
    "sense_scores": "sense_jax.sense_dict",
    # Sense knowledge distillation (METHOD §3): losses, students, export. The loop: sense_jax.trainer.
    "distill_losses": "sense_jax.losses",
    "skd_loss": "sense_jax.losses",
    "fresh_student": "sense_jax.students",
    "truncated_student": "sense_jax.students",
    "export_hf": "sense_jax.hf_export",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
