"""Labelled examples for the trainer: tokenised sentence (pair) batches with their labels.

Fine-tuning and task distillation (``sense-jax finetune``, ``sense-jax distill --set task=...``)
feed the same trainer as SKD (:mod:`sense_jax.trainer`): its stream of micro-batches, addressed by
one integer, and its resume rules. :class:`ExampleStream` is that stream over labelled examples:
the same epoch order (``default_rng([seed, epoch]).permutation(N)``, the last micro-batch filled
from the epoch's first examples), the same length grouping, and two more arrays per micro-batch:
``labels`` [B] (int32 class ids, or float32 targets for regression) and ``weights`` [B] (float32,
1 for a real example; training batches are always full, evaluation batches mark padding rows 0).

Texts are tokenised as transformers' sequence-classification examples do: one sentence, or a
pair ``tokenizer(first, second)`` (``[CLS] a [SEP] b [SEP]`` with token_type_ids 0/1 for BERT),
truncated ``longest_first`` to ``max_length`` tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

from sense_jax.errors import SenseJaxError
from sense_jax.trainer import PassageStream

BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def tokenize_examples(tokenizer: Any, texts: Sequence[Sequence[str]], max_length: int,
                      batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Tokenise examples of one or two text fields into [batch_size or N, max_length] int32 arrays.

    Args:
      tokenizer: a transformers tokenizer.
      texts: one list of N strings (single sentences) or two (pairs: first and second texts).
      max_length: T, tokens per row (truncated ``longest_first``, padded to T).
      batch_size: rows of the result; extra rows repeat row 0 (real inputs, so that every
        family's forward stays finite) and are left out by the caller's ``weights``.

    Returns:
      ``input_ids``, ``attention_mask``, ``token_type_ids`` [B, T] int32 (token types all 0 when
      the tokenizer makes none).
    """
    n = len(texts[0])
    B = batch_size or n
    if not n:
        return {k: np.zeros((B, max_length), np.int32) for k in BATCH_KEYS}
    enc = tokenizer(*[list(t) for t in texts], truncation=True, max_length=max_length,
                    padding="max_length", return_tensors="np")
    out = {}
    for k in BATCH_KEYS:
        a = np.asarray(enc[k], np.int32) if k in enc else np.zeros((n, max_length), np.int32)
        full = np.repeat(a[:1], B, axis=0)
        full[:n] = a
        out[k] = full
    return out


def example_lengths(tokenizer: Any, texts: Sequence[Sequence[str]], max_length: int) -> np.ndarray:
    """Token count of every example after truncation [N] int64 (specials included)."""
    ids = tokenizer(*[list(t) for t in texts], truncation=True, max_length=max_length)["input_ids"]
    return np.array([len(x) for x in ids], np.int64)


class ExampleStream(PassageStream):
    """:class:`~sense_jax.trainer.PassageStream` over labelled examples.

    Args:
      texts: one or two lists of N strings (``LabelledData.texts``).
      labels: [N] int class ids or float regression targets.
      tokenizer, batch_size, max_length, seed, group_window: as PassageStream.

    Micro-batch ``j`` (:meth:`micro_batch`) holds, besides the token arrays, ``labels`` [B]
    (int32, or float32 for float labels) and ``weights`` [B] float32 (all 1).
    """

    def __init__(self, texts: Sequence[Sequence[str]], labels: np.ndarray, tokenizer: Any, batch_size: int,
                 max_length: int, seed: int, group_window: int = 0):
        if not texts or not len(texts[0]):
            raise SenseJaxError("no training examples")
        if any(len(t) != len(texts[0]) for t in texts) or len(labels) != len(texts[0]):
            raise SenseJaxError(f"text fields and labels differ in length "
                                f"({[len(t) for t in texts]} texts, {len(labels)} labels)")
        self.columns = [list(t) for t in texts]
        self.labels = np.asarray(labels)
        super().__init__(list(range(len(self.labels))), tokenizer, batch_size, max_length, seed, group_window)

    def texts(self, j: int) -> list[list[str]]:
        idx = self.indices(j)
        return [[c[i] for i in idx] for c in self.columns]

    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = example_lengths(self.tok, self.columns, self.T)
        return self._lengths

    def micro_batch(self, j: int, length: int | None = None, rows: slice | None = None) -> dict[str, np.ndarray]:
        idx = self.indices(j)
        if rows is not None:
            idx = idx[rows]
        out = tokenize_examples(self.tok, [[c[i] for i in idx] for c in self.columns], length or self.T,
                                batch_size=len(idx))
        out["labels"] = label_array(self.labels[idx])
        out["weights"] = np.ones(len(idx), np.float32)
        return out


def label_array(labels: np.ndarray) -> np.ndarray:
    """Labels as fed to the step: int32 class ids, or float32 regression targets."""
    labels = np.asarray(labels)
    return labels.astype(np.float32) if np.issubdtype(labels.dtype, np.floating) else labels.astype(np.int32)


def eval_batches(tokenizer: Any, texts: Sequence[Sequence[str]], labels: np.ndarray, batch_size: int,
                 max_length: int, buckets: bool = True) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Every example once, in batches of exactly ``batch_size`` rows: ``(indices, batch)``.

    Examples are sorted by length (stable) so that each batch is padded to the smallest length
    bucket holding it (:mod:`sense_jax.batching`; capped at ``max_length``) when ``buckets``;
    ``indices`` [n <= B] say which examples the first n rows are (scatter predictions back with
    them). The last batch's extra rows repeat a real example with weight 0.
    """
    from sense_jax.batching import bucket_length

    lengths = example_lengths(tokenizer, texts, max_length)
    order = np.argsort(lengths, kind="stable")
    labels = label_array(labels)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        T = min(bucket_length(int(lengths[idx].max())), max_length) if buckets else max_length
        b = tokenize_examples(tokenizer, [[c[i] for i in idx] for c in texts], T, batch_size=batch_size)
        b["labels"] = np.zeros(batch_size, labels.dtype)
        b["labels"][:len(idx)] = labels[idx]
        b["weights"] = np.zeros(batch_size, np.float32)
        b["weights"][:len(idx)] = 1.0
        yield idx, b


# --- The step ---------------------------------------------------------------------------------


def make_step(cfg: Any, loss_fn: Callable, count_fn: Callable, metric_keys: Sequence[str]) -> Callable:
    """A pure training step ``step(state, batch, frozen) -> (state, metrics)`` around ``loss_fn``.

    The trainer's one update rule, whatever the objective: gradients only for what trains
    (:func:`~sense_jax.trainer.frozen_paths` subtrees are closed over), a ``lax.scan`` over the
    A micro-batches of ``batch`` summing their gradients, one optimizer update
    (:func:`~sense_jax.trainer.make_optimizer`), and a non-finite loss or gradient leaving the
    state unchanged (``finite`` = 0; the host stops).

    Args:
      cfg: the run config (optimizer fields, ``freeze_embeddings``).
      loss_fn: ``(params, micro_batch, frozen, key, counts) -> (loss, metrics)`` for one
        micro-batch; ``metrics`` holds float32 scalars under ``metric_keys`` that are summed
        over the micro-batches (so each term divides by the *step's* ``counts``).
      count_fn: ``(batch [A, ...], frozen) -> counts`` (a pytree of float32 scalars): the
        denominators of the whole step.
      metric_keys: the keys of ``metrics`` to sum (``loss`` among them).

    Returns:
      ``step`` (not jitted; ``step.traces`` counts its tracings, ``step.tx`` is the optimizer).
      Its metrics: ``metric_keys`` plus ``grad_norm``, ``lr``, ``finite``, ``real_tokens``.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from sense_jax.trainer import TrainState, frozen_paths, make_optimizer, make_schedule, merge_frozen, split_frozen

    tx, schedule = make_optimizer(cfg), make_schedule(cfg)

    def micro_loss(trainable, fixed, mb, frozen, key, counts):
        return loss_fn(merge_frozen(trainable, fixed), mb, frozen, key, counts)

    def step(state, batch: dict, frozen) -> tuple[Any, dict]:
        step.traces += 1
        key = jax.random.fold_in(state.rng, state.step)
        counts = count_fn(batch, frozen)
        trainable, fixed = split_frozen(state.params, frozen_paths(cfg, state.params))

        def micro(carry, xs):
            g_acc, m_acc = carry
            mb, i = xs
            (_, m), g = jax.value_and_grad(micro_loss, has_aux=True)(
                trainable, fixed, mb, frozen, jax.random.fold_in(key, i), counts)
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
    return step


# --- Task objectives on the trainer's state ---------------------------------------------------
# A task run's params: {"student": encoder params, "head": the classifier head's params (the
# teacher's, copied and frozen, when distilling; trained when fine-tuning), "adaptor": the linear
# map to the teacher width (distillation only)}. Its read-only inputs (``frozen``):
# {"teacher": teacher encoder params or None, "senses": SenseDictionary or None,
#  "teacher_head": the teacher's head params or None}.

TASK_METRICS = ("loss", "task", "accuracy", "kd", "skd", "sense_accuracy", "mse", "examples", "tokens")


def task_counts(batch: dict, frozen: dict) -> dict:
    """Denominators of one step [A, B, ...]: counted examples, tokens with a sense entry (SKD), real
    tokens (MSE); each at least 1."""
    import jax.numpy as jnp

    from sense_jax.sense_dict import gather_senses

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
    import jax.numpy as jnp

    from sense_jax.distill import apply_adaptor

    h = student_module.apply({"params": params["student"]}, batch["input_ids"], batch["attention_mask"],
                             batch["token_type_ids"])
    return apply_adaptor(params["adaptor"], h) if "adaptor" in params else h.astype(jnp.float32)


def replace_by_senses(sense_dict, input_ids, states, metric: str):
    """METHOD §2 before the head: each state with a dictionary entry becomes its nearest sense
    (chosen by the state itself); the others are kept. The centres are constants, so a task
    loss on the result trains the student only through tokens without an entry (the [CLS]
    token a BERT pooler reads among them), as the reference recipe does."""
    from sense_jax.sense_dict import nearest_sense

    return nearest_sense(sense_dict, input_ids, states, metric=metric)[1]


def make_task_loss(cfg: Any, student_module, teacher_module, head_fn: Callable) -> Callable:
    """``loss_fn(params, micro_batch, frozen, key, counts) -> (loss, metrics)`` of a task run.

    Args:
      cfg: run config: ``objective`` (:data:`sense_jax.task_losses.OBJECTIVES`), ``skd_weight``,
        ``mse_weight``, ``kd_temperature``, ``kd_alpha``, ``sense_replace``, ``metric``.
      student_module / teacher_module: the encoders (Flax modules, no head).
      head_fn: ``(head_params, hidden [B, T, D], attention_mask [B, T]) -> logits [B, C]`` float32,
        the family's pure classification head.

    The student's logits are ``head_fn(params["head"], states)`` on its adapted states,
    optionally after sense replacement (``sense_replace``; :func:`replace_by_senses`). The
    teacher's encoder runs only for the objectives that use it (skd, mse, logit_kd; never for
    task_only or fine-tuning), under ``stop_gradient``; the teacher's logits (logit_kd) come
    from its own head (``frozen["teacher_head"]``) on its own states.

    Metrics (sums over the step's micro-batches, each divided by the step's counts): loss, task,
    accuracy (task accuracy; 0 for regression), kd, skd, sense_accuracy, mse, examples, tokens.
    """
    import jax
    import jax.numpy as jnp

    from sense_jax.distill import hidden_mse_loss, skd_loss
    from sense_jax.sense_dict import gather_senses
    from sense_jax.task_losses import task_objective

    objective = cfg.objective
    uses_teacher = objective in ("skd", "mse", "logit_kd")

    def loss_fn(params, mb, frozen, key, counts):
        del key  # no dropout: threaded for stochastic extensions
        senses = frozen.get("senses")
        states = student_states(student_module, params, mb)
        head_in = replace_by_senses(senses, mb["input_ids"], states, cfg.metric) if cfg.sense_replace else states
        logits = head_fn(params["head"], head_in, mb["attention_mask"])
        zero = jnp.zeros((), jnp.float32)
        parts = {"skd": zero, "sense_accuracy": zero, "mse": zero, "tokens": zero}
        teacher_logits = None
        if uses_teacher:
            t = jax.lax.stop_gradient(teacher_module.apply(
                {"params": frozen["teacher"]}, mb["input_ids"], mb["attention_mask"], mb["token_type_ids"]))
            if objective == "skd":
                codebook, valid = gather_senses(senses, mb["input_ids"])
                s = skd_loss(codebook, valid, states, t, mb["attention_mask"], cfg.metric, counts["skd_tokens"])
                parts.update(skd=s["skd"], sense_accuracy=s["accuracy"], tokens=s["tokens"])
            elif objective == "mse":
                parts["mse"] = hidden_mse_loss(states, t, mb["attention_mask"], counts["real_tokens"])
            else:
                teacher_logits = head_fn(frozen["teacher_head"], t, mb["attention_mask"])
        out = task_objective(objective, logits, mb["labels"], teacher_logits=teacher_logits,
                             skd=parts["skd"], mse=parts["mse"], skd_weight=cfg.skd_weight,
                             mse_weight=cfg.mse_weight, kd_temperature=cfg.kd_temperature,
                             kd_alpha=cfg.kd_alpha, weights=mb["weights"], denominator=counts["examples"])
        out.update(parts)
        # ``examples`` and ``tokens`` are counts (not divided): their sums are the step's counts.
        return out["loss"], {k: out[k] for k in TASK_METRICS}

    return loss_fn


def make_task_eval(cfg: Any, student_module, head_fn: Callable) -> Callable:
    """``eval(params, batch [B, T], frozen) -> {"logits": [B, C], "logits_senses": [B, C]}``
    (float32): the head on the student's states, and on them after sense replacement when a
    dictionary is given (else a copy of ``logits``)."""

    def ev(params, batch, frozen):
        states = student_states(student_module, params, batch)
        logits = head_fn(params["head"], states, batch["attention_mask"])
        senses = frozen.get("senses")
        if senses is None:
            return {"logits": logits, "logits_senses": logits}
        replaced = replace_by_senses(senses, batch["input_ids"], states, cfg.metric)
        return {"logits": logits, "logits_senses": head_fn(params["head"], replaced, batch["attention_mask"])}

    return ev
