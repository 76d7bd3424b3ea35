"""Sense knowledge distillation (SKD): losses, students, adaptor, checks and HF export.

METHOD §3 (Wang et al. 2025, sense knowledge distillation): for every token t that has an
entry in the teacher's sense dictionary, with padded codebook C_t ∈ R^{K × D} (K = K_max, padding
slots invalid),

    z = C_t · A(h_student)        student logits [K]     (A: linear adaptor D_s -> D_t)
    y = argmax_k C_t · h_teacher  teacher's sense        (never a padding slot)
    loss = mean over valid tokens of CE(z, y);  accuracy = mean(argmax z == y)

Unlike the reference code, padding slots score -inf (a padding slot can never be the target or
the student's choice, even when every real logit is negative), and the loss is one vectorised
array program over [B, T, K] (no per-token Python loop).

Students share the teacher's tokenizer: (a) the first L layers of the teacher
(:func:`truncated_student`), (b) a fresh smaller config of the same family (:func:`fresh_student`),
or (c) a pretrained checkpoint of the same family with the same vocabulary
(:func:`check_same_vocab`). In the encoder setup the teacher's pooler is kept beside the student,
frozen, to run on the (sense-replaced) teacher-width states at inference.

Einsum letters: B batch, T positions, K sense slots, D teacher width, S student width.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sense_jax.errors import ConfigError, SenseJaxError
# the fingerprints' old home: kept importable from here
from sense_jax.fingerprints import FINGERPRINT_VERSION, teacher_fingerprint, tokenizer_fingerprint  # noqa: F401
from sense_jax.sense_dict import SenseDictionary, gather_senses, sense_scores

# --- Losses -----------------------------------------------------------------------------------


def skd_loss(codebook: jax.Array, valid: jax.Array, student: jax.Array, teacher: jax.Array,
             token_mask: jax.Array, metric: str = "dot", denominator: jax.Array | None = None
             ) -> dict[str, jax.Array]:
    """SKD cross-entropy over each token's senses (METHOD §3), vectorised and masked.

    Args:
      codebook: [B, T, K, D] padded sense embeddings (from :func:`gather_senses`).
      valid: [B, T, K] bool, False at padding slots and for tokens without an entry.
      student: [B, T, D] adapted student hidden states A(h_student) (any float dtype).
      teacher: [B, T, D] teacher hidden states (gradients are stopped).
      token_mask: [B, T] int/bool, 1 for real tokens (the attention mask).
      metric: sense score, "dot" (the paper's), "cos" or "l2" (see :func:`sense_scores`).
      denominator: float32 scalar, the token count the sums are divided by; default this batch's
        counted tokens (at least 1). Gradient accumulation passes the whole step's count, so that
        the micro-batches' terms add up to the step's token mean.

    Returns:
      dict of float32 scalars: ``skd`` (mean cross-entropy over counted tokens, 0 when none),
      ``accuracy`` (fraction of counted tokens with argmax z == y), ``tokens`` (count of tokens
      with an entry and mask 1).
    """
    has_entry = valid[..., 0] & token_mask.astype(bool)                  # [B, T]
    z = sense_scores(codebook, valid, student, metric)                    # [B, T, K], -inf pad
    t = sense_scores(codebook, valid, jax.lax.stop_gradient(teacher), metric)
    y = jnp.argmax(t, axis=-1)                                            # never a -inf slot
    # Rows without an entry are all -inf: give them finite zeros so neither the forward nor the
    # backward pass meets -inf - -inf; they are masked out of the mean anyway.
    z = jnp.where(has_entry[..., None], z, 0.0)
    logp = jax.nn.log_softmax(z, axis=-1)
    nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]       # [B, T]
    w = has_entry.astype(jnp.float32)
    n = w.sum()
    denom = jnp.maximum(n, 1.0) if denominator is None else denominator
    loss = jnp.sum(jnp.where(has_entry, nll, 0.0)) / denom
    agree = (jnp.argmax(z, axis=-1) == y).astype(jnp.float32)
    return {"skd": loss, "accuracy": jnp.sum(agree * w) / denom, "tokens": n}


def hidden_mse_loss(student: jax.Array, teacher: jax.Array, token_mask: jax.Array,
                    denominator: jax.Array | None = None) -> jax.Array:
    """Plain hidden-state distillation baseline: mean over real tokens of mean_D (A(h_s) - h_t)^2.

    Args:
      student: [B, T, D] adapted student states; teacher: [B, T, D] (gradients stopped);
      token_mask: [B, T] 1 for real tokens.
      denominator: the real-token count to divide by (default this batch's, at least 1); see
        :func:`skd_loss`.

    Returns:
      float32 scalar (0 when no token is real).
    """
    d = student.astype(jnp.float32) - jax.lax.stop_gradient(teacher).astype(jnp.float32)
    per_token = jnp.mean(d * d, axis=-1)
    w = token_mask.astype(jnp.float32)
    return jnp.sum(per_token * w) / (jnp.maximum(w.sum(), 1.0) if denominator is None else denominator)


def distill_losses(sense_dict: SenseDictionary, input_ids: jax.Array, attention_mask: jax.Array,
                   student: jax.Array, teacher: jax.Array, *, skd_weight: float = 1.0,
                   mse_weight: float = 0.0, metric: str = "dot", skd_tokens: jax.Array | None = None,
                   real_tokens: jax.Array | None = None) -> dict[str, jax.Array]:
    """The training objective: ``skd_weight * SKD + mse_weight * MSE``, with its parts.

    Args:
      sense_dict: the teacher's dictionary (V and D must match the teacher).
      input_ids, attention_mask: [B, T] int.
      student: [B, T, D] adapted student states; teacher: [B, T, D] teacher states.
      skd_tokens, real_tokens: float32 scalars, the counts of tokens with an entry and of real
        tokens that SKD (and accuracy) and MSE are averaged over; default this batch's. A step
        of several micro-batches passes the whole step's counts (see :func:`skd_loss`).

    Returns:
      dict of float32 scalars: ``loss``, ``skd``, ``mse``, ``accuracy``, ``tokens``.
    """
    codebook, valid = gather_senses(sense_dict, input_ids)
    out = skd_loss(codebook, valid, student, teacher, attention_mask, metric, skd_tokens)
    out["mse"] = hidden_mse_loss(student, teacher, attention_mask, real_tokens)
    out["loss"] = skd_weight * out["skd"] + mse_weight * out["mse"]
    return out


# --- Adaptor ----------------------------------------------------------------------------------


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
    from flax.core import meta

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
    import warnings

    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


def check_sense_dict(sense_dict: SenseDictionary, teacher_cfg: Any, *, fingerprint: str | None = None,
                     teacher_path: str | None = None, source: str = "sense dictionary",
                     embedding_fingerprint: str | None = None) -> None:
    """Refuse a dictionary that was not built from this teacher.

    Checks the width (``hidden_size``) and the vocabulary size, and, where the dictionary's meta
    records them: the hidden-state ``layer`` (SKD uses the teacher's last layer), the
    ``teacher_fingerprint`` (see :func:`teacher_fingerprint`), and otherwise the ``teacher`` path
    (by resolved path, when both exist on this machine).

    A version-2 fingerprint (``v2-...``: embedding matrix and tokenizer) is compared with
    ``fingerprint``; a version-1 one (older dictionaries: embedding matrix only) with
    ``embedding_fingerprint`` when given, and accepted with a warning (once) that its tokenizer
    could not be checked. Fingerprints of different versions are never compared with each other.

    Args:
      fingerprint: this teacher's :func:`teacher_fingerprint` with its tokenizer (v2), or v1.
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


# --- Export to transformers -------------------------------------------------------------------


# What an export holds: float32 weights (the params are float32; narrowing them would lose the
# 1e-4 parity with sense_jax), and a config.json that says so. transformers 5 loads with
# dtype="auto", i.e. in the config's ``dtype`` (4.x: ``torch_dtype``); a teacher's "bfloat16" left
# there would load the float32 weights in bf16 (errors of 2.5e-2).
EXPORT_DTYPE = "float32"


def student_hf_config(teacher_hf_config: dict, student_cfg: Any) -> dict:
    """The student's transformers config.json: the teacher's, with the student's sizes, the base
    model's architecture and ``dtype`` / ``torch_dtype`` = "float32" (what the export holds)."""
    cfg = {k: v for k, v in teacher_hf_config.items() if not k.startswith("_")}
    cfg.update(student_cfg.to_hf())
    cfg["dtype"] = cfg["torch_dtype"] = EXPORT_DTYPE
    arch = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel",
            "camembert": "CamembertModel", "deberta-v2": "DebertaV2Model", "llama": "LlamaModel",
            "mistral": "MistralModel", "qwen2": "Qwen2Model"}.get(student_cfg.model_type)
    if arch:
        cfg["architectures"] = [arch]
    return cfg


def export_hf(out: str | os.PathLike, family: Any, student_cfg: Any, student_params: dict,
              teacher_hf_config: dict, *, tokenizer_dir: str | os.PathLike | None = None,
              adaptor: dict | None = None, pooler: dict | None = None, extra_meta: dict | None = None,
              overwrite: bool = False) -> Path:
    """Write a student as a transformers model directory, atomically.

    Layout of ``out``: ``config.json`` (``dtype`` float32, ``architectures`` the base model, e.g.
    LlamaModel), ``model.safetensors`` (transformers' base-model names, float32, ``format=pt``;
    task heads such as a decoder's ``lm_head``, ``family.head_params``, are left out, so that
    ``AutoModel`` reports no unexpected keys), tokenizer files copied from ``tokenizer_dir``, and
    when given ``adaptor.safetensors`` (``weight`` [D, S] and ``bias`` [D] in torch.nn.Linear
    layout, plus the frozen teacher pooler as ``pooler.dense.weight`` / ``pooler.dense.bias``)
    with ``adaptor.json``. When the widths match the pooler is also written into
    model.safetensors, so AutoModel's pooler_output is the teacher's head (otherwise BertModel
    reports its pooler missing).

    Raises:
      SenseJaxError: ``out`` exists and not ``overwrite``; ConversionError: a parameter has no
        transformers name.
    """
    from safetensors.numpy import save_file

    from sense_jax.convert import copy_tokenizer_files, params_to_hf
    from sense_jax.io_utils import atomic_directory, write_json_atomic

    params = {k: v for k, v in student_params.items() if k not in family.head_params}
    cfg = student_cfg
    if pooler is not None and pooler["kernel"].shape[0] == student_cfg.hidden_size:
        params["pooler"] = pooler
        cfg = dataclasses.replace(student_cfg, add_pooler=True)
    state = params_to_hf(family, params)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(student_hf_config(teacher_hf_config, cfg), f, indent=2, sort_keys=True)
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), tmp)
        if adaptor is not None:
            k = np.asarray(jax.device_get(adaptor["dense"]["kernel"]), np.float32)
            tensors = {"weight": np.ascontiguousarray(k.T),
                       "bias": np.asarray(jax.device_get(adaptor["dense"]["bias"]), np.float32)}
            if pooler is not None:
                tensors["pooler.dense.weight"] = np.ascontiguousarray(
                    np.asarray(jax.device_get(pooler["kernel"]), np.float32).T)
                tensors["pooler.dense.bias"] = np.asarray(jax.device_get(pooler["bias"]), np.float32)
            save_file(tensors, str(tmp / "adaptor.safetensors"), metadata={"format": "pt"})
            write_json_atomic(tmp / "adaptor.json", {
                "in_features": int(k.shape[0]), "out_features": int(k.shape[1]),
                "layout": "torch.nn.Linear: y = x @ weight.T + bias",
                "pooler": "teacher's frozen BertPooler on teacher-width states" if pooler is not None else None,
                **(extra_meta or {})})
    return Path(out)


def load_adaptor(path: str | os.PathLike) -> dict:
    """Read ``adaptor.safetensors`` from an exported directory as numpy arrays (torch layout)."""
    from safetensors.numpy import load_file

    f = Path(path) / "adaptor.safetensors"
    if not f.is_file():
        raise SenseJaxError(f"adaptor file not found: {f}")
    return load_file(str(f))
