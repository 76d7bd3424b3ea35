"""Students of sense knowledge distillation (METHOD §3), their adaptor, and the checks that a
student, a teacher and a sense dictionary belong together.

Students share the teacher's tokenizer: (a) the first L layers of the teacher
(:func:`truncated_student`), (b) a fresh smaller config of the same family (:func:`fresh_student`),
or (c) a pretrained checkpoint of the same family with the same vocabulary
(:func:`check_same_vocab`). In the encoder setup the teacher's pooler is kept beside the student,
frozen, to run on the (sense-replaced) teacher-width states at inference. The losses:
:mod:`sense_jax.losses`; writing a student as a transformers directory: :mod:`sense_jax.hf_export`.

Einsum letters: S student width, D teacher width.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from sense_jax.errors import ConfigError, SenseJaxError
from sense_jax.sense_dict import SenseDictionary


def _identity_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)


class Adaptor(nn.Module):
    """Linear map from the student width S to the teacher width D: ``h @ kernel + bias``.

    Identity-initialised (zero bias) when S == D, so a truncated student starts as the teacher's
    own intermediate states; LeCun-normal otherwise. Input [B, T, S] -> output [B, T, D] float32.
    """

    features: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        same = h.shape[-1] == self.features
        init = _identity_init if same else nn.initializers.lecun_normal()
        return nn.Dense(self.features, param_dtype=jnp.float32, name="dense",
                        kernel_init=nn.with_logical_partitioning(init, (None, "embed")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        )(h.astype(jnp.float32))


def init_adaptor(student_width: int, teacher_width: int, seed: int = 0, *, boxed: bool = False) -> dict:
    """Adaptor params ``{"dense": {"kernel": [S, D], "bias": [D]}}`` (float32), seeded."""
    p = Adaptor(teacher_width).init(jax.random.PRNGKey(seed), jnp.zeros((1, 1, student_width)))["params"]
    return p if boxed else meta.unbox(p)


def apply_adaptor(params: dict, h: jax.Array) -> jax.Array:
    """``h`` [..., S] -> [..., D] float32 with adaptor ``params``."""
    k = params["dense"]["kernel"]
    return jnp.einsum("...S,SD->...D", h.astype(jnp.float32), k) + params["dense"]["bias"]


# --- Students ---------------------------------------------------------------------------------


def split_pooler(params: dict) -> tuple[dict, dict | None]:
    """(params without ``pooler``, the pooler subtree or None)."""
    rest = {k: v for k, v in params.items() if k != "pooler"}
    return rest, params.get("pooler")


def truncated_student(teacher_cfg: Any, teacher_params: dict, num_layers: int) -> tuple[Any, dict]:
    """Student (a): the teacher's embeddings and first ``num_layers`` layers (paper's decoder recipe).

    Returns:
      (cfg, params): ``cfg.replace(num_hidden_layers=L, add_pooler=False)`` and the teacher's
      params without ``layer_{i >= L}`` and without the pooler (the pooler stays with the
      teacher-width head, see :func:`split_pooler`). Arrays are shared, not copied.

    Raises:
      ConfigError: L < 1 or L > the teacher's layer count.
    """
    L = int(num_layers)
    if not 1 <= L <= teacher_cfg.num_hidden_layers:
        raise ConfigError(f"student_layers={L}: must be in [1, {teacher_cfg.num_hidden_layers}] "
                          "(the teacher's layer count) for a truncated student")
    params, _ = split_pooler(teacher_params)
    params = {k: v for k, v in params.items()
              if not (k.startswith("layer_") and int(k.split("_")[1]) >= L)}
    cfg = dataclasses.replace(teacher_cfg, num_hidden_layers=L, add_pooler=False)
    return cfg, params


def fresh_student(family: Any, teacher_cfg: Any, seed: int, *, num_layers: int | None = None,
                  hidden_size: int | None = None, num_attention_heads: int | None = None,
                  intermediate_size: int | None = None) -> tuple[Any, dict]:
    """Student (b): a randomly initialised smaller config of the teacher's family.

    Fields left None keep the teacher's value, except that ``intermediate_size`` defaults to
    4 x the new width when only the width changes. The vocabulary (and so the tokenizer),
    position table and activation are the teacher's.

    Returns:
      (cfg, params) with ``add_pooler=False``; params float32 numpy, deterministic in ``seed``
      (the family's initialisers, as :func:`sense_jax.convert.init_params`, compiled once).

    Raises:
      ConfigError: width not a multiple of the head count, or a non-positive size.
    """
    D = hidden_size or teacher_cfg.hidden_size
    N = num_attention_heads or (teacher_cfg.num_attention_heads if D % teacher_cfg.num_attention_heads == 0
                                else max(1, D // teacher_cfg.head_dim))
    L = num_layers or teacher_cfg.num_hidden_layers
    F = intermediate_size or (teacher_cfg.intermediate_size if D == teacher_cfg.hidden_size else 4 * D)
    if min(D, N, L, F) < 1:
        raise ConfigError(f"student sizes must be positive (layers={L}, hidden={D}, heads={N}, mlp={F})")
    if D % N:
        raise ConfigError(f"student_hidden_size={D} is not a multiple of student_heads={N}")
    cfg = dataclasses.replace(teacher_cfg, num_hidden_layers=L, hidden_size=D, num_attention_heads=N,
                              intermediate_size=F, add_pooler=False)
    return cfg, jax.device_get(_jitted_init(family, cfg)(jax.random.PRNGKey(seed)))


@functools.lru_cache(maxsize=8)
def _jitted_init(family: Any, cfg: Any):
    """``key -> params`` of ``cfg``, compiled once per config (eager init is slow for BERT)."""
    return jax.jit(family.init_fn(cfg))


def check_same_vocab(teacher: Any, student: Any, *, teacher_name: str = "teacher",
                     student_name: str = "student") -> None:
    """Refuse a student whose tokenizer differs from the teacher's.

    Args:
      teacher, student: :class:`~sense_jax.loading.Model` objects (config.vocab_size, tokenizer).

    Raises:
      ConfigError: vocabulary sizes differ, or token -> id maps differ (names the first token).
    """
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise ConfigError(f"{student_name} has vocab_size {sv} but {teacher_name} has {tv}: "
                          "SKD needs the student to share the teacher's tokenizer")
    if teacher.tokenizer is not None and student.tokenizer is not None:
        a, b = teacher.tokenizer.get_vocab(), student.tokenizer.get_vocab()
        if a != b:
            diff = sorted((set(a.items()) ^ set(b.items())), key=lambda kv: kv[1])[0]
            raise ConfigError(f"{student_name}'s tokenizer differs from {teacher_name}'s (first "
                              f"difference: token {diff[0]!r} id {diff[1]}): SKD needs the same tokenizer")


def dictionary_fingerprint(sense_dict: SenseDictionary) -> str:
    """A content id of a sense dictionary: sha256 (16 hex digits) of its offsets and centres
    (shape, dtype and bytes); counts and metadata are left out (they do not change training)."""
    h = hashlib.sha256()
    for a in (sense_dict.offsets, sense_dict.centres):
        a = np.asarray(jax.device_get(a))
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


def check_sense_dict(sense_dict: SenseDictionary, teacher_cfg: Any, *, fingerprint: str | None = None,
                     teacher_path: str | None = None, source: str = "sense dictionary",
                     embedding_fingerprint: str | None = None) -> None:
    """Refuse a dictionary that was not built from this teacher.

    Checks the width (``hidden_size``) and the vocabulary size, and, where the dictionary's meta
    records them: the hidden-state ``layer`` (SKD uses the teacher's last layer), the
    ``teacher_fingerprint`` (see :func:`sense_jax.fingerprints.teacher_fingerprint`), and otherwise the ``teacher`` path
    (by resolved path, when both exist on this machine).

    A version-2 fingerprint (``v2-...``: embedding matrix and tokenizer) is compared with
    ``fingerprint``; a version-1 one (older dictionaries: embedding matrix only) with
    ``embedding_fingerprint`` when given, and accepted with a warning (once) that its tokenizer
    could not be checked. Fingerprints of different versions are never compared with each other.

    Args:
      fingerprint: this teacher's :func:`~sense_jax.fingerprints.teacher_fingerprint` with its tokenizer (v2), or v1.
      embedding_fingerprint: this teacher's v1 fingerprint (without tokenizer), for old dictionaries.

    Raises:
      SenseJaxError: naming ``source`` and the field that differs.
    """
    meta = sense_dict.meta
    D, V = teacher_cfg.hidden_size, teacher_cfg.vocab_size
    if sense_dict.hidden_size != D:
        raise SenseJaxError(f"{source}: senses have width {sense_dict.hidden_size} but the teacher's "
                            f"hidden_size is {D}; it was built from another teacher")
    if sense_dict.vocab_size != V:
        raise SenseJaxError(f"{source}: covers a vocabulary of {sense_dict.vocab_size} tokens but the "
                            f"teacher's vocab_size is {V}; it was built from another teacher")
    layer = meta.get("layer")
    if layer is not None and int(layer) != teacher_cfg.num_hidden_layers:
        raise SenseJaxError(f"{source}: built from layer {layer} hidden states, but SKD compares the "
                            f"teacher's last layer ({teacher_cfg.num_hidden_layers}); rebuild it from the last layer")
    fp = meta.get("teacher_fingerprint")
    if fp is not None:
        versioned = str(fp).startswith("v")
        ours = [f for f in (fingerprint, embedding_fingerprint) if f is not None
                and str(f).startswith("v") == versioned]
        if ours and ours[0] != fp:
            what = "embedding matrix and tokenizer" if versioned else "embedding matrix"
            raise SenseJaxError(f"{source}: built from teacher {meta.get('teacher', '?')!r} (fingerprint "
                                f"{fp}, of its {what}) but this teacher's fingerprint is {ours[0]}: "
                                "another teacher or tokenizer; rebuild the dictionary from this teacher")
        if ours and not versioned:
            _warn_once(f"{source}: records a version-1 teacher fingerprint (embedding matrix only), which "
                       "matches; its tokenizer cannot be checked (rebuild it to record one)")
    if fp is None and teacher_path is not None and isinstance(meta.get("teacher"), str):
        a, b = meta["teacher"], str(teacher_path)
        if a != b and Path(a).exists() and os.path.realpath(a) != os.path.realpath(b):
            raise SenseJaxError(f"{source}: built from teacher {a!r}, not {b!r}")
