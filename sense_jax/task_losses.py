"""Task objectives for fine-tuning and task distillation, as pure ``jnp`` functions.

Every loss here is a *sum over examples divided by a denominator*: by default the number of
counted examples in the batch, but a step of several micro-batches passes the count of the whole
step (as the SKD losses do, :mod:`sense_jax.distill`), so that the micro-batches' terms add up to
the step's mean. ``weights`` [B] (float, 1 for a real example, 0 for a padding row of a short
last batch) leave rows out of every sum and count.

Einsum letters / shapes: B examples, C labels (``num_labels``; 1 = regression).

Sources: cross-entropy with integer labels and mean squared error as transformers'
``*ForSequenceClassification`` (``problem_type`` single_label_classification / regression);
logit distillation as Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network"
(2015), §2: the soft cross-entropy between the teacher's and the student's softmax at
temperature T, multiplied by T² so that its gradients keep their size as T changes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp


def _weights_and_denominator(batch: int, weights, denominator):
    w = jnp.ones((batch,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    n = w.sum()
    return w, n, (jnp.maximum(n, 1.0) if denominator is None else denominator)


def classification_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None,
                        denominator: jax.Array | None = None) -> dict[str, jax.Array]:
    """Cross-entropy of integer labels under softmax(logits), with accuracy beside it.

    Args:
      logits: [B, C] float (any float dtype; computed in float32), C >= 2.
      labels: [B] int, in [0, C) for counted rows (other rows must have weight 0; their value is
        clipped into range so that nothing reads out of bounds).
      weights: [B] float, 1 for counted rows, 0 for padding rows; default all ones.
      denominator: float32 scalar to divide the sums by; default this batch's counted rows (>= 1).

    Returns:
      dict of float32 scalars: ``task`` (summed -log p(label) / denominator), ``accuracy``
      (summed [argmax logits == label] / denominator), ``examples`` (counted rows).
    """
    z = logits.astype(jnp.float32)
    w, n, denom = _weights_and_denominator(z.shape[0], weights, denominator)
    y = jnp.clip(labels.astype(jnp.int32), 0, z.shape[-1] - 1)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), y[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(z, axis=-1) == y).astype(jnp.float32)
    return {"task": jnp.sum(nll * w) / denom, "accuracy": jnp.sum(correct * w) / denom, "examples": n}


def regression_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None,
                    denominator: jax.Array | None = None) -> dict[str, jax.Array]:
    """Mean squared error of a one-output head (num_labels = 1, e.g. STS-B).

    Args:
      logits: [B, 1] or [B] float predictions.
      labels: [B] float targets.
      weights / denominator: as :func:`classification_loss`.

    Returns:
      dict of float32 scalars: ``task`` (summed squared error / denominator), ``accuracy``
      (always 0: no classes), ``examples``.
    """
    p = logits.astype(jnp.float32).reshape(logits.shape[0])
    w, n, denom = _weights_and_denominator(p.shape[0], weights, denominator)
    d = p - labels.astype(jnp.float32)
    return {"task": jnp.sum(d * d * w) / denom, "accuracy": jnp.zeros((), jnp.float32), "examples": n}


def task_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None,
              denominator: jax.Array | None = None) -> dict[str, jax.Array]:
    """:func:`regression_loss` when ``logits`` has one column, else :func:`classification_loss`
    (the choice is static: it depends on the shape only)."""
    fn = regression_loss if logits.shape[-1] == 1 else classification_loss
    return fn(logits, labels, weights, denominator)


def logit_kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0,
                  weights: jax.Array | None = None, denominator: jax.Array | None = None) -> jax.Array:
    """Hinton et al. (2015) logit distillation: T² · H(softmax(t / T), softmax(s / T)).

    The soft cross-entropy ``-sum_c p_t(c) log p_s(c)`` differs from KL(p_t || p_s) by the
    teacher's entropy, a constant for the student, so both give the same gradient; its minimum
    is that entropy, not 0. With one output (regression) the soft targets are the teacher's
    predictions and the loss is the squared difference (T plays no part).

    Args:
      student_logits, teacher_logits: [B, C] float (teacher's gradients are stopped).
      temperature: T > 0 (Python float; static).
      weights / denominator: as :func:`classification_loss`.

    Returns:
      float32 scalar.
    """
    s = student_logits.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
    w, _, denom = _weights_and_denominator(s.shape[0], weights, denominator)
    if s.shape[-1] == 1:
        d = (s - t)[:, 0]
        return jnp.sum(d * d * w) / denom
    T = float(temperature)
    soft = -jnp.sum(jax.nn.softmax(t / T, axis=-1) * jax.nn.log_softmax(s / T, axis=-1), axis=-1)
    return (T * T) * jnp.sum(soft * w) / denom


OBJECTIVES = ("skd", "task_only", "logit_kd", "mse")


def task_objective(objective: str, student_logits: jax.Array, labels: jax.Array, *,
                   teacher_logits: jax.Array | None = None, skd: jax.Array | None = None,
                   mse: jax.Array | None = None, skd_weight: float = 1.0, mse_weight: float = 1.0,
                   kd_temperature: float = 1.0, kd_alpha: float = 0.5,
                   weights: jax.Array | None = None, denominator: jax.Array | None = None
                   ) -> dict[str, jax.Array]:
    """The loss of one task-distillation objective, with its parts (float32 scalars).

    * ``task_only``: the task loss on the student's logits (no teacher);
    * ``skd``: task + ``skd_weight`` × SKD (METHOD §3; ``skd`` is the token-mean SKD
      cross-entropy, computed by the caller);
    * ``logit_kd``: ``kd_alpha`` × :func:`logit_kd_loss` + (1 − ``kd_alpha``) × task (Hinton);
    * ``mse``: task + ``mse_weight`` × hidden-state MSE (``mse``, computed by the caller).

    Returns:
      ``loss``, ``task``, ``accuracy``, ``examples``, ``kd`` (0 unless logit_kd).

    Raises:
      ValueError: unknown objective, or a part it needs is None (a programming error: the
        config is validated before this runs).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {OBJECTIVES}")
    out = task_loss(student_logits, labels, weights, denominator)
    out["kd"] = jnp.zeros((), jnp.float32)
    if objective == "task_only":
        out["loss"] = out["task"]
    elif objective == "skd":
        if skd is None:
            raise ValueError("objective skd needs the SKD loss")
        out["loss"] = out["task"] + skd_weight * skd
    elif objective == "mse":
        if mse is None:
            raise ValueError("objective mse needs the hidden-state MSE")
        out["loss"] = out["task"] + mse_weight * mse
    else:
        if teacher_logits is None:
            raise ValueError("objective logit_kd needs the teacher's logits")
        out["kd"] = logit_kd_loss(student_logits, teacher_logits, kd_temperature, weights, denominator)
        out["loss"] = kd_alpha * out["kd"] + (1.0 - kd_alpha) * out["task"]
    return out


# --- Early stopping ---------------------------------------------------------------------------


@dataclasses.dataclass
class EarlyStopping:
    """Early stopping on a dev metric: stop after ``patience`` evaluations without improvement.

    Plain data so that it goes into a checkpoint as JSON (:meth:`to_dict` / :meth:`from_dict`)
    and a resumed run stops where an uninterrupted one would.

    Attributes:
      patience: evaluations without improvement before stopping (0 = never stop early).
      mode: "max" (accuracy, F1, correlations: every GLUE metric) or "min" (a loss).
      min_delta: an improvement must exceed the best value by more than this.
      best: the best value so far (None before the first evaluation).
      best_step: the step of ``best``.
      bad_evals: evaluations since the last improvement.
    """

    patience: int = 0
    mode: str = "max"
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', not {self.mode!r}")

    def update(self, step: int, value: float) -> bool:
        """Record the evaluation at ``step``; True when it is a new best (keep its checkpoint).

        A NaN value never improves (and counts as a bad evaluation).
        """
        v = float(value)
        sign = 1.0 if self.mode == "max" else -1.0
        better = not math.isnan(v) and (self.best is None or sign * (v - self.best) > self.min_delta)
        if better:
            self.best, self.best_step, self.bad_evals = v, int(step), 0
        else:
            self.bad_evals += 1
        return better

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` evaluations in a row brought no improvement."""
        return self.patience > 0 and self.bad_evals >= self.patience

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EarlyStopping":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})
