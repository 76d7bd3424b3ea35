"""sense_jax: multi-sense embeddings and sense knowledge distillation in JAX/Flax.

Reimplements Wang et al., "Multi-Sense Embeddings for Language Models and Knowledge
Distillation" (ACL Findings 2025). See README.md for the pipeline and the public API.
"""

from sense_jax.errors import ConfigError, ConversionError, SenseJaxError
from sense_jax.loading import Model, load_model

__version__ = "0.1.0"

__all__ = ["ConfigError", "ConversionError", "Model", "SenseJaxError", "load_model"]

# Sense dictionary (METHOD §1-2): batched k-means and nearest-sense look-up.
from sense_jax.kmeans import KMeansResult, batched_kmeans, build_sense_dictionary  # noqa: E402
from sense_jax.sense_dict import SenseDictionary, gather_senses, nearest_sense, sense_scores  # noqa: E402

__all__ += ["KMeansResult", "SenseDictionary", "batched_kmeans", "build_sense_dictionary",
            "gather_senses", "nearest_sense", "sense_scores"]

# Teacher extraction (METHOD §1): per-token uniform samples of hidden states, and the store.
from sense_jax.extract import extract  # noqa: E402
from sense_jax.store import Store, open_store, write_store  # noqa: E402

__all__ += ["Store", "extract", "open_store", "write_store"]

# Sense knowledge distillation (METHOD §3): losses, students, adaptor, export to transformers.
# The trainer itself is train/distill.py (``sense-jax distill``, ``sense-jax export``).
from sense_jax.distill import distill_losses, export_hf, fresh_student, skd_loss, truncated_student  # noqa: E402

__all__ += ["distill_losses", "export_hf", "fresh_student", "skd_loss", "truncated_student"]

# Model families beyond BERT (issue 7): LLM2Vec pooling modes, LoRA merge at conversion.
from sense_jax.lora import merge_lora  # noqa: E402
from sense_jax.pooling import pool  # noqa: E402

__all__ += ["merge_lora", "pool"]
