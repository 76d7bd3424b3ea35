"""sense_jax: multi-sense embeddings and sense knowledge distillation in JAX/Flax.

Reimplements Wang et al., "Multi-Sense Embeddings for Language Models and Knowledge
Distillation" (ACL Findings 2025). See README.md for the pipeline and the public API.
"""

from sense_jax.errors import ConfigError, ConversionError, SenseJaxError
from sense_jax.loading import Model, load_model

__version__ = "0.1.0"

__all__ = ["ConfigError", "ConversionError", "Model", "SenseJaxError", "load_model"]
