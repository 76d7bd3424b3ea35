"""Sense knowledge distillation's old module, kept importable: the SKD losses live in
:mod:`sense_jax.losses`, the students, adaptor and dictionary checks in :mod:`sense_jax.students`,
the transformers export in :mod:`sense_jax.hf_export`, the fingerprints in
:mod:`sense_jax.fingerprints`.
"""

from __future__ import annotations

from sense_jax.fingerprints import FINGERPRINT_VERSION, teacher_fingerprint, tokenizer_fingerprint
from sense_jax.hf_export import EXPORT_DTYPE, export_hf, load_adaptor, student_hf_config
from sense_jax.losses import distill_losses, hidden_mse_loss, skd_loss
from sense_jax.students import (
    Adaptor, apply_adaptor, check_same_vocab, check_sense_dict, dictionary_fingerprint, fresh_student,
    init_adaptor, split_pooler, truncated_student)

__all__ = [
    "Adaptor", "EXPORT_DTYPE", "FINGERPRINT_VERSION", "apply_adaptor", "check_same_vocab",
    "check_sense_dict", "dictionary_fingerprint", "distill_losses", "export_hf", "fresh_student",
    "hidden_mse_loss", "init_adaptor", "load_adaptor", "skd_loss", "split_pooler", "student_hf_config",
    "teacher_fingerprint", "tokenizer_fingerprint", "truncated_student",
]
