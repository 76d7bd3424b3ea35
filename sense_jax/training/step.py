"""The train state, the optimizer and the pure train / eval steps (METHOD §3, STYLE §8-9).

``make_train_step`` returns the pure ``step(state, batch, frozen) -> (state, metrics)``; the
teacher's params and the sense dictionary come in as the read-only ``frozen`` argument (never
closed over, never in the state). :mod:`sense_jax.training.setup` jits it once with shardings.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import struct

from sense_jax.losses import distill_losses, hidden_mse_loss, skd_cross_entropy, teacher_targets
from sense_jax.students import apply_adaptor
from sense_jax.sense_dict import gather_senses
from sense_jax.training.config import DistillConfig


@struct.dataclass
class TrainState:
    """Everything a resume needs besides the data position (all device arrays).

    Attributes:
      step: int32 scalar, optimizer updates done.
      params: ``{"student": BERT params, "adaptor": {"dense": {kernel [S, D], bias [D]}}}`` plus
        ``"pooler"`` ({kernel [D, D], bias [D]}, the teacher's, frozen) when the teacher has one.
      opt_state: the optax state.
      rng: uint32[2] base PRNG key; step s uses ``fold_in(rng, s)``.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def make_schedule(cfg: DistillConfig) -> optax.Schedule:
    """Learning rate at update s: linear warmup from 0 over ``warmup_steps``, then cosine decay
    to ``end_learning_rate`` at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.end_learning_rate)


# Top-level names of the input-embedding subtree in each family's params (BERT / DeBERTa
# "embeddings", Llama "embed_tokens"), frozen by ``freeze_embeddings``.
INPUT_EMBEDDINGS = ("embeddings", "embed_tokens")


def frozen_paths(cfg: DistillConfig, params: dict) -> tuple[tuple[str, ...], ...]:
    """Paths of the subtrees of ``params`` that training never changes.

    Always the teacher's pooler (``("pooler",)``, copied into the student for its head) and, in
    task distillation, the teacher's classification head (``("head",)``: pooler and classifier;
    fine-tuning trains its head); with ``freeze_embeddings`` also the student's input embeddings
    (``("student", "embeddings")``).
    """
    paths = [("pooler",)] if "pooler" in params else []
    if "head" in params and cfg.objective != "finetune":
        paths.append(("head",))
    if cfg.freeze_embeddings:
        paths += [("student", k) for k in INPUT_EMBEDDINGS if k in params["student"]]
    return tuple(paths)


def split_frozen(params: dict, paths) -> tuple[dict, dict]:
    """``(trainable, frozen)``: ``params`` with the subtrees at ``paths`` moved into ``frozen``
    (same nesting), so that gradients are taken, and carried through accumulation, only for
    what trains. :func:`merge_frozen` inverts it."""
    trainable, frozen = dict(params), {}
    for path in paths:
        src, dst = trainable, frozen
        for k in path[:-1]:
            src[k] = src = dict(src[k])
            dst = dst.setdefault(k, {})
        dst[path[-1]] = src.pop(path[-1])
    return trainable, frozen


def merge_frozen(trainable: dict, frozen: dict) -> dict:
    """The inverse of :func:`split_frozen` (nested dicts merged key by key)."""
    out = dict(trainable)
    for k, v in frozen.items():
        out[k] = merge_frozen(out[k], v) if k in out else v
    return out


def make_optimizer(cfg: DistillConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(:func:`make_schedule`); :func:`frozen_paths` get no update
    and no optimizer state (``params["pooler"]``; the input embeddings with
    ``freeze_embeddings``).

    Weight decay applies to matrices (ndim >= 2) only, not to biases or LayerNorm.
    """
    schedule = make_schedule(cfg)
    train = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),
    )
    def labels(p):
        trainable, frozen = split_frozen(p, frozen_paths(cfg, p))
        return merge_frozen(jax.tree.map(lambda _: "train", trainable),
                            jax.tree.map(lambda _: "frozen", frozen))

    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def _packing(batch: dict) -> dict:
    """The forwards' ``segment_ids`` keyword for a packed batch ([B, T] int32, 0 at padding:
    attention within segments, positions restarting per segment), none for an unpacked one."""
    return {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}


def _student_forward(student_module, params, batch):
    """Adapted student states A(h_student) [B, T, D] float32."""
    h = student_module.apply({"params": params["student"]}, batch["input_ids"], batch["attention_mask"],
                             batch["token_type_ids"], **_packing(batch))
    return apply_adaptor(params["adaptor"], h)


def _teacher_forward(teacher_module, teacher_params, batch):
    """The teacher's last hidden states [B, T, D] (its compute dtype), no gradient."""
    return jax.lax.stop_gradient(teacher_module.apply(
        {"params": teacher_params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
        **_packing(batch)))


def _step_denominators(sense_dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """``(tokens with a dictionary entry, real tokens)`` of a whole step's [A, B, T] batch, each
    at least 1 (float32): the denominators of SKD / accuracy and of MSE. Without a dictionary
    the first is the second (unused)."""
    real = batch["attention_mask"].astype(bool)
    real_count = jnp.maximum(real.sum(), 1).astype(jnp.float32)
    if sense_dict is None:
        return real_count, real_count
    _, valid = gather_senses(sense_dict, batch["input_ids"])  # the codebook gather is dead code
    return jnp.maximum((valid[..., 0] & real).sum(), 1).astype(jnp.float32), real_count


def make_step(cfg: DistillConfig, loss_fn: Callable, denominators_fn: Callable,
              metric_keys: Sequence[str]) -> Callable:
    """A pure training step ``step(state, batch, frozen) -> (state, metrics)`` around ``loss_fn``.

    The trainer's one update rule, whatever the objective (SKD: :func:`make_train_step`; the task
    objectives of :mod:`sense_jax.task_train`): gradients only for what trains (the
    :func:`frozen_paths` subtrees are closed over, so no gradient is built or carried for them,
    e.g. no [V, D] one with ``freeze_embeddings``; they get zero "gradients" only for the
    optimizer's tree structure, folded away by XLA); a ``lax.scan`` over the A micro-batches
    summing their gradients; one optimizer update (:func:`make_optimizer`). A non-finite loss or
    gradient leaves the state unchanged (``finite`` = 0) and the host stops.

    Args:
      cfg: the run config.
      loss_fn: ``(params, micro_batch, frozen, key, denominators) -> (loss, metrics)`` for one
        micro-batch; ``metrics`` holds float32 scalars under ``metric_keys``, summed over the
        micro-batches. Each term divides by the *whole step's* ``denominators``, so the step's
        loss and gradient are those of one batch of A·B rows, however they fall into
        micro-batches (averaging each micro-batch's own mean would weight a row of a short
        micro-batch more).
      denominators_fn: ``(batch [A, ...], frozen) -> denominators`` (float32 scalars, e.g. the
        step's token totals).
      metric_keys: the keys of ``metrics`` to sum (``loss`` among them).

    Returns:
      ``step`` (not jitted; ``step.traces`` counts its tracings, tests assert one; ``step.tx`` is
      the optimizer; ``step.loss_fn`` and ``step.denominators_fn`` are the arguments, for tests
      that differentiate one micro-batch). Its metrics: ``metric_keys`` plus ``grad_norm``, ``lr``, ``finite`` (1.0 if
      the update was applied), ``real_tokens`` (mask sum).
    """
    tx, schedule = make_optimizer(cfg), make_schedule(cfg)

    def micro_loss(trainable, fixed, mb, frozen, key, denominators):
        return loss_fn(merge_frozen(trainable, fixed), mb, frozen, key, denominators)

    def step(state: TrainState, batch: dict, frozen) -> tuple[TrainState, dict]:
        step.traces += 1
        key = jax.random.fold_in(state.rng, state.step)
        denominators = denominators_fn(batch, frozen)
        trainable, fixed = split_frozen(state.params, frozen_paths(cfg, state.params))

        def micro(carry, xs):
            g_acc, m_acc = carry
            mb, i = xs
            (_, m), g = jax.value_and_grad(micro_loss, has_aux=True)(
                trainable, fixed, mb, frozen, jax.random.fold_in(key, i), denominators)
            return (jax.tree.map(jnp.add, g_acc, g), {k: m_acc[k] + m[k] for k in m_acc}), None

        zeros_g = jax.tree.map(jnp.zeros_like, trainable)
        zeros_m = {k: jnp.zeros((), jnp.float32) for k in metric_keys}
        (grads, metrics), _ = jax.lax.scan(micro, (zeros_g, zeros_m),
                                           (batch, jnp.arange(batch["input_ids"].shape[0])))
        grads = merge_frozen(grads, jax.tree.map(jnp.zeros_like, fixed))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(gnorm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(step=state.step + finite.astype(state.step.dtype),
                               params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state), rng=state.rng)
        metrics.update(grad_norm=gnorm, lr=schedule(state.step), finite=finite.astype(jnp.float32),
                       real_tokens=batch["attention_mask"].sum().astype(jnp.float32))
        return new_state, metrics

    step.traces = 0
    step.tx = tx
    step.loss_fn, step.denominators_fn = loss_fn, denominators_fn
    return step


CACHED_KEYS = ("targets", "teacher_hidden")  # what a batch may carry from the teacher cache


def make_train_step(cfg: DistillConfig, student_module, teacher_module, cached: Sequence[str] = ()) -> Callable:
    """The pure SKD step ``step(state, batch, frozen) -> (state, metrics)`` (:func:`make_step`;
    not yet jitted).

    Args:
      cached: what every batch carries from the teacher cache (:mod:`sense_jax.teacher_cache`),
        a subset of :data:`CACHED_KEYS`: ``"targets"`` (the SKD targets, so the step skips the
        teacher's forward when nothing else needs its states) and/or ``"teacher_hidden"`` (its
        states, for the MSE term). Empty: the teacher runs inside the step, as the targets and
        states are computed alike either way (same figures, :func:`sense_jax.losses.skd_loss`).

    Args (of the returned function):
      state: :class:`TrainState`.
      batch: dict of [A, B, T] int32 (A = grad_accum micro-batches): input_ids, attention_mask,
        token_type_ids, for packed rows (``pack_length``) ``segment_ids`` (0 at padding, 1..S per
        passage; the student's and teacher's attention stays within a segment and positions
        restart; ``attention_mask`` is ``segment_ids > 0``, so every token count below is the
        same as for the passages unpacked), and as ``cached`` says ``targets`` [A, B, T] int32 (-1: not counted) and
        ``teacher_hidden`` [A, B, T, D] (the teacher's dtype).
      frozen: ``(teacher_params, sense_dict)``, read-only; ``sense_dict`` is None when
        ``skd_weight`` is 0 (the MSE baseline: no dictionary is gathered or scored).

    Each micro-batch divides its per-token sums by the token totals of the whole step (tokens
    with an entry for SKD and accuracy, real tokens for MSE: :func:`_step_denominators`).

    Metrics (float32 scalars): loss, skd, mse, accuracy (sense agreement; token means over the
    step), tokens (with an entry), real_tokens (mask sum), grad_norm, lr, finite (1.0 if the
    update was applied). Without a dictionary: loss, mse, real_tokens, grad_norm, lr, finite.
    With cached targets and no teacher states (``mse_weight`` 0): no mse.
    """
    cached = tuple(cached)
    unknown = set(cached) - set(CACHED_KEYS)
    if unknown:
        raise ValueError(f"cached: unknown keys {sorted(unknown)}; choose from {CACHED_KEYS}")
    # The teacher's states are needed for the MSE term (reported as a metric even at weight 0)
    # and for targets not read from the cache; the cached states, when present, stand in.
    states = "teacher_hidden" in cached or "targets" not in cached or cfg.skd_weight == 0 or cfg.mse_weight > 0

    def loss_fn(params, mb, frozen, key, denominators):
        del key  # no dropout in the student; threaded for stochastic extensions
        teacher_params, sense_dict = frozen
        teacher = None
        if "teacher_hidden" in cached:
            teacher = mb["teacher_hidden"]
        elif states:
            teacher = _teacher_forward(teacher_module, teacher_params, mb)
        student = _student_forward(student_module, params, mb)
        if sense_dict is None:  # the MSE baseline (skd_weight = 0)
            mse = hidden_mse_loss(student, teacher, mb["attention_mask"], denominators[1])
            return cfg.mse_weight * mse, {"loss": cfg.mse_weight * mse, "mse": mse}
        # One path with and without the cache: the targets come from the batch or from the
        # teacher's states (sense_jax.losses.skd_loss's two halves), so both programs differentiate
        # the same student terms. An MSE at weight 0 is a metric only: no gradient is built for it.
        codebook, valid = gather_senses(sense_dict, mb["input_ids"])
        targets = mb["targets"] if "targets" in cached else teacher_targets(
            codebook, valid, teacher, mb["attention_mask"], cfg.metric)
        m = skd_cross_entropy(codebook, valid, student, targets, cfg.metric, denominators[0])
        m["loss"] = cfg.skd_weight * m["skd"]
        if teacher is not None:
            scored = student if cfg.mse_weight else jax.lax.stop_gradient(student)
            m["mse"] = hidden_mse_loss(scored, teacher, mb["attention_mask"], denominators[1])
            if cfg.mse_weight:
                m["loss"] = m["loss"] + cfg.mse_weight * m["mse"]
        return m["loss"], m

    # The setup passes no dictionary exactly when skd_weight is 0 (setup._load_checked).
    if cfg.skd_weight == 0:
        names = ("loss", "mse")
    else:
        names = ("loss", "skd") + (("mse",) if states else ()) + ("accuracy", "tokens")
    return make_step(cfg, loss_fn, lambda batch, frozen: _step_denominators(frozen[1], batch), names)


def make_eval_step(cfg: DistillConfig, student_module, teacher_module) -> Callable:
    """``eval(params, batch [B, T], frozen) -> {"skd_sum", "correct", "tokens"}`` (sums, float32).

    A batch with ``segment_ids`` (packed rows) is run packed, as in :func:`make_train_step`."""
    def ev(params, batch, frozen):
        teacher_params, sense_dict = frozen
        teacher = _teacher_forward(teacher_module, teacher_params, batch)
        student = _student_forward(student_module, params, batch)
        m = distill_losses(sense_dict, batch["input_ids"], batch["attention_mask"], student, teacher,
                           metric=cfg.metric)
        return {"skd_sum": m["skd"] * m["tokens"], "correct": m["accuracy"] * m["tokens"],
                "tokens": m["tokens"]}

    return ev

