"""Sense knowledge distillation (SKD) losses (METHOD §3, Wang et al. 2025).

For every token t that has an entry in the teacher's sense dictionary, with padded codebook
C_t ∈ R^{K × D} (K = K_max, padding slots invalid),

    z = C_t · A(h_student)        student logits [K]     (A: linear adaptor D_s -> D_t)
    y = argmax_k C_t · h_teacher  teacher's sense        (never a padding slot)
    loss = mean over valid tokens of CE(z, y);  accuracy = mean(argmax z == y)

Unlike the reference code, padding slots score -inf (a padding slot can never be the target or
the student's choice, even when every real logit is negative), and the loss is one vectorised
array program over [B, T, K] (no per-token Python loop). The students and the adaptor A:
:mod:`sense_jax.students`.

Einsum letters: B batch, T positions, K sense slots, D teacher width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sense_jax.sense_dict import SenseDictionary, gather_senses, sense_scores


def teacher_targets(codebook: jax.Array, valid: jax.Array, teacher: jax.Array, token_mask: jax.Array,
                    metric: str = "dot") -> jax.Array:
    """The teacher's SKD target per token: y = argmax_k score(C_t[k], h_teacher) (METHOD §3).

    The half of :func:`skd_loss` that reads the teacher; :mod:`sense_jax.teacher_cache` stores
    its output once so that training can skip the teacher's forward.

    Args:
      codebook: [B, T, K, D] padded sense embeddings (from :func:`gather_senses`).
      valid: [B, T, K] bool, False at padding slots and for tokens without an entry.
      teacher: [B, T, D] teacher hidden states (any float dtype; gradients are stopped).
      token_mask: [B, T] int/bool, 1 for real tokens (the attention mask).
      metric: "dot" (the paper's), "cos" or "l2" (:func:`sense_scores`).

    Returns:
      [B, T] int32: the index of the nearest sense (never a padding slot), -1 for tokens without
      an entry and for padding.
    """
    has_entry = valid[..., 0] & token_mask.astype(bool)
    t = sense_scores(codebook, valid, jax.lax.stop_gradient(teacher), metric)
    return jnp.where(has_entry, jnp.argmax(t, axis=-1), -1).astype(jnp.int32)


def skd_cross_entropy(codebook: jax.Array, valid: jax.Array, student: jax.Array, targets: jax.Array,
                      metric: str = "dot", denominator: jax.Array | None = None) -> dict[str, jax.Array]:
    """SKD cross-entropy of the student against given targets (the half of :func:`skd_loss` that
    reads the student; no teacher state needed).

    Args:
      codebook: [B, T, K, D]; valid: [B, T, K] bool (as :func:`teacher_targets`).
      student: [B, T, D] adapted student hidden states A(h_student) (any float dtype).
      targets: [B, T] int: the sense index y per token (:func:`teacher_targets`, or read from a
        teacher cache); a token counts when ``targets >= 0``.
      metric: sense score, as for the targets.
      denominator: float32 scalar, the number of tokens the sums are divided by; default this
        batch's counted tokens (at least 1). Gradient accumulation passes the whole step's, so
        that the micro-batches' terms add up to the step's token mean.

    Returns:
      dict of float32 scalars: ``skd`` (mean cross-entropy over counted tokens, 0 when none),
      ``accuracy`` (fraction of counted tokens with argmax z == y), ``tokens`` (counted tokens).
    """
    has_entry = targets >= 0                                              # [B, T]
    y = jnp.maximum(targets, 0).astype(jnp.int32)
    z = sense_scores(codebook, valid, student, metric)                    # [B, T, K], -inf pad
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


def skd_loss(codebook: jax.Array, valid: jax.Array, student: jax.Array, teacher: jax.Array,
             token_mask: jax.Array, metric: str = "dot", denominator: jax.Array | None = None
             ) -> dict[str, jax.Array]:
    """SKD cross-entropy over each token's senses (METHOD §3), vectorised and masked:
    :func:`skd_cross_entropy` of the student against :func:`teacher_targets` of the teacher.

    Args:
      codebook: [B, T, K, D] padded sense embeddings (from :func:`gather_senses`).
      valid: [B, T, K] bool, False at padding slots and for tokens without an entry.
      student: [B, T, D] adapted student hidden states A(h_student) (any float dtype).
      teacher: [B, T, D] teacher hidden states (gradients are stopped).
      token_mask: [B, T] int/bool, 1 for real tokens (the attention mask).
      metric: sense score, "dot" (the paper's), "cos" or "l2" (see :func:`sense_scores`).
      denominator: float32 scalar, the number of tokens the sums are divided by; default this
        batch's tokens with an entry (at least 1). Gradient accumulation passes the whole step's, so that
        the micro-batches' terms add up to the step's token mean.

    Returns:
      dict of float32 scalars: ``skd`` (mean cross-entropy over counted tokens, 0 when none),
      ``accuracy`` (fraction of counted tokens with argmax z == y), ``tokens`` (count of tokens
      with an entry and mask 1).
    """
    y = teacher_targets(codebook, valid, teacher, token_mask, metric)
    return skd_cross_entropy(codebook, valid, student, y, metric, denominator)


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
      skd_tokens, real_tokens: float32 scalars, the numbers of tokens with an entry and of real
        tokens that SKD (and accuracy) and MSE are averaged over; default this batch's. A step
        of several micro-batches passes the whole step's totals (see :func:`skd_loss`).

    Returns:
      dict of float32 scalars: ``loss``, ``skd``, ``mse``, ``accuracy``, ``tokens``.
    """
    codebook, valid = gather_senses(sense_dict, input_ids)
    out = skd_loss(codebook, valid, student, teacher, attention_mask, metric, skd_tokens)
    out["mse"] = hidden_mse_loss(student, teacher, attention_mask, real_tokens)
    out["loss"] = skd_weight * out["skd"] + mse_weight * out["mse"]
    return out
