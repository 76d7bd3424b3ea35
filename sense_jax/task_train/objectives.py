"""Task objectives on the trainer's state: the loss and eval functions of fine-tuning and task
distillation (METHOD §3-4), built from :mod:`sense_jax.task_losses`."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sense_jax.losses import hidden_mse_loss, skd_loss
from sense_jax.sense_dict import gather_senses, nearest_sense
from sense_jax.students import apply_adaptor
from sense_jax.task_losses import task_objective

# --- Task objectives on the trainer's state ---------------------------------------------------
# A task run's params: {"student": encoder params, "head": the classifier head's params (the
# teacher's, copied and frozen, when distilling; trained when fine-tuning), "adaptor": the linear
# map to the teacher width (distillation only)}. Its read-only inputs (``frozen``):
# {"teacher": teacher encoder params or None, "senses": SenseDictionary or None,
#  "teacher_head": the teacher's head params or None}.

TASK_METRICS = ("loss", "task", "accuracy", "kd", "skd", "sense_accuracy", "mse", "examples", "tokens")


def task_denominators(batch: dict, frozen: dict) -> dict:
    """The denominators of one step [A, B, ...]: examples (weight 1), tokens with a sense entry
    (SKD), real tokens (MSE); each at least 1 (float32)."""

    real = batch["attention_mask"].astype(bool)
    out = {"examples": jnp.maximum(batch["weights"].sum(), 1.0).astype(jnp.float32),
           "real_tokens": jnp.maximum(real.sum(), 1).astype(jnp.float32),
           "skd_tokens": jnp.ones((), jnp.float32)}
    if frozen.get("senses") is not None:
        _, valid = gather_senses(frozen["senses"], batch["input_ids"])
        out["skd_tokens"] = jnp.maximum((valid[..., 0] & real).sum(), 1).astype(jnp.float32)
    return out


def student_states(student_module, params: dict, batch: dict):
    """The student's states at the head's width [B, T, D] float32: ``A(h_student)`` with an
    adaptor, else the encoder's own last hidden states."""

    h = student_module.apply({"params": params["student"]}, batch["input_ids"], batch["attention_mask"],
                             batch["token_type_ids"])
    return apply_adaptor(params["adaptor"], h) if "adaptor" in params else h.astype(jnp.float32)


def replace_by_senses(sense_dict, input_ids, states, metric: str):
    """METHOD §2 before the head: each state with a dictionary entry becomes its nearest sense
    (chosen by the state itself); the others are kept. The centres are constants, so a task
    loss on the result trains the student only through tokens without an entry (the [CLS]
    token a BERT pooler reads among them), as the reference recipe does."""

    return nearest_sense(sense_dict, input_ids, states, metric=metric)[1]


def make_task_loss(cfg: Any, student_module, teacher_module, head_fn: Callable) -> Callable:
    """``loss_fn(params, micro_batch, frozen, key, denominators) -> (loss, metrics)`` of a task run
    (for :func:`sense_jax.training.step.make_step`).

    Args:
      cfg: run config: ``objective`` (:data:`sense_jax.task_losses.OBJECTIVES`), ``skd_weight``,
        ``mse_weight``, ``kd_temperature``, ``kd_alpha``, ``sense_replace``, ``metric``.
      student_module / teacher_module: the encoders (Flax modules, no head).
      head_fn: ``(head_params, hidden [B, T, D], attention_mask [B, T], input_ids [B, T]) ->
        logits [B, C]`` float32, the family's pure classification head
        (:func:`sense_jax.models.heads.head_logits` bound to the teacher's config).

    The student's logits are ``head_fn(params["head"], states)`` on its adapted states,
    optionally after sense replacement (``sense_replace``; :func:`replace_by_senses`). The
    teacher's encoder runs only for the objectives that use it (skd, mse, logit_kd; never for
    task_only or fine-tuning), under ``stop_gradient``; the teacher's logits (logit_kd) come
    from its own head (``frozen["teacher_head"]``) on its own states.

    Metrics (sums over the step's micro-batches, each divided by the step's denominators): loss, task,
    accuracy (task accuracy; 0 for regression), kd, skd, sense_accuracy, mse, examples, tokens.
    """

    objective = "task_only" if cfg.objective == "finetune" else cfg.objective  # fine-tuning: the task alone
    uses_teacher = objective in ("skd", "mse", "logit_kd")

    def loss_fn(params, mb, frozen, key, denominators):
        del key  # no dropout: threaded for stochastic extensions
        senses = frozen.get("senses")
        states = student_states(student_module, params, mb)
        head_in = replace_by_senses(senses, mb["input_ids"], states, cfg.metric) if cfg.sense_replace else states
        logits = head_fn(params["head"], head_in, mb["attention_mask"], mb["input_ids"])
        zero = jnp.zeros((), jnp.float32)
        parts = {"skd": zero, "sense_accuracy": zero, "mse": zero, "tokens": zero}
        teacher_logits = None
        if uses_teacher:
            t = jax.lax.stop_gradient(teacher_module.apply(
                {"params": frozen["teacher"]}, mb["input_ids"], mb["attention_mask"], mb["token_type_ids"]))
            if objective == "skd":
                codebook, valid = gather_senses(senses, mb["input_ids"])
                s = skd_loss(codebook, valid, states, t, mb["attention_mask"], cfg.metric, denominators["skd_tokens"])
                parts.update(skd=s["skd"], sense_accuracy=s["accuracy"], tokens=s["tokens"])
            elif objective == "mse":
                parts["mse"] = hidden_mse_loss(states, t, mb["attention_mask"], denominators["real_tokens"])
            else:
                teacher_logits = head_fn(frozen["teacher_head"], t, mb["attention_mask"], mb["input_ids"])
        out = task_objective(objective, logits, mb["labels"], teacher_logits=teacher_logits,
                             skd=parts["skd"], mse=parts["mse"], skd_weight=cfg.skd_weight,
                             mse_weight=cfg.mse_weight, kd_temperature=cfg.kd_temperature,
                             kd_alpha=cfg.kd_alpha, weights=mb["weights"], denominator=denominators["examples"])
        out.update(parts)
        # ``examples`` and ``tokens`` are not divided: their sums are the step's totals.
        return out["loss"], {k: out[k] for k in TASK_METRICS}

    return loss_fn


def make_task_eval(cfg: Any, student_module, head_fn: Callable) -> Callable:
    """``eval(params, batch [B, T], frozen) -> {"logits": [B, C], "logits_senses": [B, C]}``
    (float32): the head on the student's states, and on them after sense replacement when a
    dictionary is given (else a copy of ``logits``)."""

    def ev(params, batch, frozen):
        states = student_states(student_module, params, batch)
        logits = head_fn(params["head"], states, batch["attention_mask"], batch["input_ids"])
        senses = frozen.get("senses")
        if senses is None:
            return {"logits": logits, "logits_senses": logits}
        replaced = replace_by_senses(senses, batch["input_ids"], states, cfg.metric)
        return {"logits": logits,
                "logits_senses": head_fn(params["head"], replaced, batch["attention_mask"], batch["input_ids"])}

    return ev
