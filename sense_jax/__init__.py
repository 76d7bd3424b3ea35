"""sense_jax: multi-sense embeddings and sense knowledge distillation in JAX/Flax.

Reimplements Wang et al., "Multi-Sense Embeddings for Language Models and Knowledge
Distillation" (ACL Findings 2025). See README.md for the pipeline and the public API; stages live
in their modules (``sense_jax.extract``, ``sense_jax.kmeans``, ``sense_jax.trainer``,
``sense_jax.pipeline``), the most used names are re-exported here.
"""

# The persistent compilation cache (on by default for every job; sense_jax.compile_cache).
from sense_jax.compile_cache import disable_compile_cache, enable_compile_cache

# Models and conversion.
from sense_jax.errors import ConfigError, ConversionError, SenseJaxError
from sense_jax.loading import Model, load_model
from sense_jax.lora import merge_lora
from sense_jax.pooling import pool

# Extraction store (METHOD §1). The extraction itself: ``from sense_jax.extract import extract``
# (not re-exported, so that ``sense_jax.extract`` stays the module).
from sense_jax.store import Store, open_store, write_store

# Sense dictionary (METHOD §1-2): batched k-means and nearest-sense look-up.
from sense_jax.kmeans import KMeansResult, batched_kmeans
from sense_jax.sense_builder import build_sense_dictionary
from sense_jax.sense_dict import SenseDictionary, gather_senses, nearest_sense, sense_scores

# Sense knowledge distillation (METHOD §3): losses, students, export. The loop: sense_jax.trainer.
from sense_jax.distill import distill_losses, export_hf, fresh_student, skd_loss, truncated_student

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ConversionError", "KMeansResult", "Model", "SenseDictionary", "SenseJaxError",
    "Store", "batched_kmeans", "build_sense_dictionary", "disable_compile_cache", "distill_losses",
    "enable_compile_cache", "export_hf",
    "fresh_student", "gather_senses", "load_model", "merge_lora", "nearest_sense", "open_store",
    "pool", "sense_scores", "skd_loss", "truncated_student", "write_store",
]
