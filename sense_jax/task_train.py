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

import dataclasses
import functools
import json
import logging
import os
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file

from sense_jax.batching import bucket_length
from sense_jax.convert import copy_tokenizer_files, params_to_hf
from sense_jax.errors import ConfigError, SenseJaxError
from sense_jax.fingerprints import teacher_fingerprint, tokenizer_fingerprint
from sense_jax.glue_metrics import compute_metrics
from sense_jax.hf_export import export_hf
from sense_jax.io_utils import atomic_directory, write_json_atomic
from sense_jax.labelled import VOCABULARY_FILE, LabelVocabulary
from sense_jax.loading import _load_tokenizer, load_model
from sense_jax.losses import hidden_mse_loss, skd_loss
from sense_jax.models import check_input_length, get_family
from sense_jax.models.heads import abstract_head_params, head_logits, head_type, init_head_params
from sense_jax.provenance import check_provenance, provenance
from sense_jax.sense_dict import SenseDictionary, gather_senses, nearest_sense
from sense_jax.sharding import process_rows
from sense_jax.students import (apply_adaptor, check_sense_dict, dictionary_fingerprint, init_adaptor,
                                split_pooler)
from sense_jax.task_losses import EarlyStopping, task_objective
from sense_jax.tasks import get_task, load_split, load_task
from sense_jax.training.checkpoint import _short
from sense_jax.training.data import PassageStream
from sense_jax.training.export import _config_from_dict
from sense_jax.training.layout import layout_for
from sense_jax.training.hooks import LoopHooks
from sense_jax.training.setup import Setup, _student, _teacher_path
from sense_jax.training.step import make_step

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
    """:class:`~sense_jax.training.data.PassageStream` over labelled examples.

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


# --- Data of a task run -----------------------------------------------------------------------


@dataclasses.dataclass
class TaskData:
    """The labelled splits of a run.

    Attributes:
      name: the task's name (:mod:`sense_jax.tasks`), or "custom".
      train: the training split; dev: evaluation splits by name (MNLI: two), the first one
        watched by early stopping.
      vocabulary: the label vocabulary (class ids of ``labels``; regression or not).
      metrics: metric names (:mod:`sense_jax.glue_metrics`), the main one first.
    """

    name: str
    train: Any
    dev: dict
    vocabulary: Any
    metrics: tuple[str, ...]

    @property
    def main_metric(self) -> str:
        """The key of the figure early stopping watches in an evaluation record."""
        return metric_key(self.metrics[0], next(iter(self.dev)), len(self.dev))


def metric_key(metric: str, split: str, n_splits: int) -> str:
    """A metric's key in an evaluation record: its name, or ``name_matched`` etc. with several
    dev splits (as :func:`sense_jax.glue_metrics.split_metrics` names them)."""
    return metric if n_splits == 1 else f"{metric}_{split.removeprefix('dev_')}"


def _read_custom_split(cfg: Any, split: str, vocabulary):

    path = cfg.task_data
    if split != "train" and Path(path).is_file():
        if not cfg.eval_data:
            raise ConfigError(f"config: task_data={path} is one file; give its dev split as eval_data=FILE "
                              "(or make task_data a directory of train and dev files)")
        path = cfg.eval_data
    return load_split(path, split, text_fields=cfg.text_fields, label_field=cfg.label_field,
                      regression=cfg.task_regression, vocabulary=vocabulary)


def _sample(data, n: int, seed: int, salt: int):
    """A seeded sample of ``n`` examples of ``data`` (in their order), or all of it."""
    if not n or n >= len(data):
        return data
    idx = np.sort(np.random.default_rng([seed, salt]).permutation(len(data))[:n])
    return data.select(idx)


def load_task_data(cfg: Any, vocabulary=None, with_train: bool = True) -> TaskData:
    """Read the run's labelled splits: a named task (``cfg.task``, from ``cfg.task_data``) or
    the user's own data (``cfg.text_fields``, ``cfg.label_field``; :func:`sense_jax.tasks.load_split`:
    ``cfg.task_data`` a directory of ``train.*`` and ``dev.*`` / ``validation.*`` files (TSV, CSV,
    JSONL) or a saved DatasetDict, or one training file with ``cfg.eval_data`` the dev file).

    Args:
      vocabulary: a recorded label vocabulary (a fine-tuned teacher's) that the labels must
        fit; None: the task's own, or (custom data) the training split's labels, which the dev
        split must then fit.
      with_train: False reads the dev splits only (``train`` is then None); custom data then
        needs ``vocabulary``.

    Raises:
      ConfigError: unknown task (the known ones listed). DataError: a missing split, column or
        field, a label outside the vocabulary, string labels for a regression target (file and
        line named).
    """

    train = None
    if cfg.task:
        spec = get_task(cfg.task)
        data_dir = cfg.task_data or None
        if with_train:
            train = load_task(spec, data_dir, "train", vocabulary=vocabulary, seed=cfg.seed)
        dev = {split: load_task(spec, data_dir, split, vocabulary=vocabulary, seed=cfg.seed)
               for split in spec.dev_splits}
        name, metrics = spec.name, spec.metrics
    else:
        if with_train:
            train = _read_custom_split(cfg, "train", vocabulary)
        dev = {"dev": _read_custom_split(cfg, "dev", train.vocabulary if train is not None else vocabulary)}
        name = "custom"
    vocab = next(iter(dev.values())).vocabulary if train is None else train.vocabulary
    if not cfg.task:
        metrics = ("pearson", "spearman") if vocab.regression else ("accuracy", "macro_f1")
    if train is not None:
        train = _sample(train, cfg.max_train_examples, cfg.seed, 1 << 22)
    dev = {k: _sample(v, cfg.max_eval_examples, cfg.seed, (1 << 23) + i) for i, (k, v) in enumerate(dev.items())}
    return TaskData(name=name, train=train, dev=dev, vocabulary=vocab, metrics=tuple(metrics))


def recorded_vocabulary(model_dir: str | Path):
    """The label vocabulary recorded beside a fine-tuned model (``label_vocabulary.json``), or None."""

    f = Path(model_dir) / VOCABULARY_FILE
    return LabelVocabulary.load(f) if f.is_file() else None


# --- Setup ------------------------------------------------------------------------------------


def task_setup(cfg: Any, data: TaskData, *, sense_dict=None, devices=None):
    """Models, head, dictionary, shardings and jitted functions of a task run (a
    :class:`sense_jax.training.setup.Setup`).

    Fine-tuning (``objective="finetune"``): the student is the model itself (every layer, no
    adaptor) and its head trains: the model's own when it has one with ``num_labels`` outputs,
    else a fresh one (:func:`sense_jax.models.heads.init_head_params`, seeded). Task
    distillation (any other objective): the teacher must have a head with ``num_labels``
    outputs (fine-tune it first); the head is copied onto the student, behind the adaptor, and
    frozen (:func:`sense_jax.training.step.frozen_paths`). The dictionary (``cfg.senses``) is needed
    by ``skd`` and ``sense_replace``, and used, when given, for the dev figures with senses.

    Raises:
      ConfigError: a head whose ``num_labels`` differs from the data's, a teacher without a head
        for distillation, a missing dictionary, and :func:`sense_jax.training.setup.setup`'s checks.
    """


    finetune = cfg.objective == "finetune"
    tpath = _teacher_path(cfg)
    teacher = load_model(tpath, dtype=cfg.compute_dtype)
    tcfg, family = teacher.config, teacher.family
    check_input_length(cfg.max_length, tcfg, "config: max_length", f"teacher {tpath}'s", ConfigError,
                       "set max_length <= {limit}")
    n_labels = data.vocabulary.num_labels
    have = int(getattr(tcfg, "num_labels", 0) or 0)
    if teacher.head_params is not None and have != n_labels:
        raise ConfigError(f"model {tpath} has a classification head of {have} labels but the {data.name} data "
                          f"has {n_labels} ({'regression' if data.vocabulary.regression else ', '.join(data.vocabulary.names)})")
    if teacher.head_params is None and not finetune:
        raise ConfigError(f"teacher {tpath} has no classification head: fine-tune it first "
                          "(sense-jax finetune), or convert a *ForSequenceClassification checkpoint")
    head_cfg = dataclasses.replace(tcfg, num_labels=n_labels, add_pooler=False)
    head = (jax.device_get(teacher.head_params) if teacher.head_params is not None
            else init_head_params(head_cfg, cfg.seed))
    fp_v1 = teacher_fingerprint(teacher.params, tcfg.vocab_size)
    fp = teacher_fingerprint(teacher.params, tcfg.vocab_size, teacher.tokenizer) \
        if teacher.tokenizer is not None else fp_v1
    if sense_dict is None and cfg.senses:
        sense_dict = SenseDictionary.load(cfg.senses)
    if sense_dict is None and (cfg.objective == "skd" or cfg.sense_replace):
        raise ConfigError(f"config: senses (the sense dictionary directory) is required by "
                          f"{'objective=skd' if cfg.objective == 'skd' else 'sense_replace=true'}")
    if sense_dict is not None:
        check_sense_dict(sense_dict, tcfg, fingerprint=fp, teacher_path=tpath,
                           source=cfg.senses or "sense dictionary", embedding_fingerprint=fp_v1)
        check_provenance(sense_dict.meta.get("provenance"), f"sense dictionary {cfg.senses or ''}".strip())
    tparams, _ = split_pooler(jax.device_get(teacher.params))  # the head holds the pooler
    enc_cfg = dataclasses.replace(tcfg, add_pooler=False, num_labels=0)
    if finetune:
        scfg, sparams = dataclasses.replace(enc_cfg, dtype=cfg.compute_dtype), tparams
        params = {"student": sparams, "head": head}
    else:
        scfg, sparams = _student(cfg, teacher, tpath, tparams)
        params = {"student": sparams, "head": head,
                  "adaptor": init_adaptor(scfg.hidden_size, tcfg.hidden_size, seed=cfg.seed)}
    student_module = family.make_module(scfg)
    teacher_module = family.make_module(enc_cfg)
    head_fn = functools.partial(head_logits, dataclasses.replace(head_cfg, dtype=cfg.compute_dtype))
    raw = make_step(cfg, make_task_loss(cfg, student_module, teacher_module, head_fn), task_denominators,
                    TASK_METRICS)
    boxed = {"student": family.abstract_params(scfg, boxed=True), "head": abstract_head_params(head_cfg, boxed=True)}
    if "adaptor" in params:
        boxed["adaptor"] = jax.eval_shape(lambda: init_adaptor(scfg.hidden_size, tcfg.hidden_size, boxed=True))
    uses_teacher = cfg.objective in ("skd", "mse", "logit_kd")
    teacher_boxed = family.abstract_params(dataclasses.replace(enc_cfg, dtype=cfg.compute_dtype), boxed=True)
    layout = layout_for(cfg, boxed, teacher_boxed, raw.tx, devices)
    repl = lambda tree: jax.tree.map(lambda _: layout.replicated, tree)
    frozen, frozen_sh = {}, {}
    if uses_teacher:
        frozen["teacher"] = jax.device_put(tparams, layout.teacher)
        frozen_sh["teacher"] = layout.teacher
    if sense_dict is not None:
        frozen["senses"] = jax.device_put(sense_dict, repl(sense_dict))
        frozen_sh["senses"] = repl(sense_dict)
    if cfg.objective == "logit_kd":
        frozen["teacher_head"] = jax.device_put(head, repl(head))
        frozen_sh["teacher_head"] = repl(head)
    batch_sh = {k: layout.batch for k in (*BATCH_KEYS, "labels", "weights")}
    batch_sh = {k: (v if k in BATCH_KEYS else _cut(v, 2)) for k, v in batch_sh.items()}
    jitted = jax.jit(raw, in_shardings=(layout.state, batch_sh, frozen_sh),
                     out_shardings=(layout.state, layout.replicated), donate_argnums=0)
    eval_sh = {k: layout.eval_batch for k in BATCH_KEYS}
    ev = jax.jit(make_task_eval(cfg, student_module, head_fn),
                 in_shardings=(layout.state.params, eval_sh, frozen_sh), out_shardings=layout.replicated)
    meta = {"config": dataclasses.asdict(cfg), "teacher_path": tpath, "family": family.name,
            "student_config": dataclasses.asdict(scfg), "teacher_config": dataclasses.asdict(tcfg),
            "teacher_hf_config": teacher.hf_config, "has_pooler": False,
            "head_config": dataclasses.asdict(head_cfg),
            "label_vocabulary": data.vocabulary.to_json(), "task": data.name, "metrics": list(data.metrics),
            "teacher_fingerprint": fp, "embedding_fingerprint": fp_v1,
            "tokenizer_fingerprint": (tokenizer_fingerprint(teacher.tokenizer)
                                      if teacher.tokenizer is not None else None),
            "dictionary_fingerprint": dictionary_fingerprint(sense_dict) if sense_dict is not None else None,
            "dictionary_shape": ({"vocab_size": sense_dict.vocab_size, "hidden_size": sense_dict.hidden_size,
                                  "senses": int(sense_dict.centres.shape[0]), "k_max": sense_dict.k_max}
                                 if sense_dict is not None else {}),
            "provenance": provenance()}
    return Setup(cfg=cfg, teacher=teacher, family=family, student_cfg=scfg, student_module=student_module,
                   teacher_module=teacher_module, init_params=params, sense_dict=sense_dict, layout=layout,
                   frozen=frozen, train_step=lambda state, batch: jitted(state, batch, frozen),
                   raw_step=raw, eval_step=lambda params, batch: ev(params, batch, frozen), meta=meta)


def _cut(sharding, ndim: int):
    """``sharding`` with its PartitionSpec cut to ``ndim`` axes (labels [A, B] beside [A, B, T])."""

    return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[:ndim]))


# --- Evaluation -------------------------------------------------------------------------------


def evaluate_split(s, params, data, *, batch_size: int | None = None, timing_pass: bool = False) -> dict:
    """Logits of the run's classifier on one split, without and with sense replacement.

    Args:
      timing_pass: time a second pass over the same device batches (every program then
        compiled); else only the batches whose shape an earlier batch had compiled are timed.

    Returns:
      ``{"logits": [N, C], "logits_senses": [N, C] or None (no dictionary), "tokens": real tokens,
      "seconds": forward time of the timed batches, "warm_tokens": their real tokens}`` (numpy /
      floats; multi-host: every process gets all).
    """



    cfg = s.cfg
    B = batch_size or cfg.batch_size
    rows = process_rows(s.layout.eval_batch, (B, cfg.max_length), 0)
    n = len(data)
    C = data.vocabulary.num_labels
    logits = np.zeros((n, C), np.float32)
    senses = np.zeros((n, C), np.float32)
    tokens = warm_tokens = 0.0
    seconds = 0.0
    seen: set[int] = set()
    kept = []
    for idx, b in eval_batches(s.teacher.tokenizer, data.texts, data.labels, B, cfg.max_length, cfg.pad_to_buckets):
        T = b["input_ids"].shape[1]
        dev = {}
        for k in BATCH_KEYS:
            part = b[k][rows]
            dev[k] = (jax.device_put(part, s.layout.eval_batch) if jax.process_count() == 1 else
                      jax.make_array_from_process_local_data(s.layout.eval_batch, part, (B, T)))
        t0 = time.perf_counter()
        out = jax.device_get(s.eval_step(params, dev))
        dt = time.perf_counter() - t0
        real = float(b["attention_mask"][:len(idx)].sum())
        tokens += real
        if T in seen:
            seconds += dt
            warm_tokens += real
        seen.add(T)
        logits[idx] = out["logits"][:len(idx)]
        senses[idx] = out["logits_senses"][:len(idx)]
        if timing_pass:
            kept.append((dev, real))
    if timing_pass:
        seconds = warm_tokens = 0.0
        for dev, real in kept:
            t0 = time.perf_counter()
            jax.block_until_ready(s.eval_step(params, dev))
            seconds += time.perf_counter() - t0
            warm_tokens += real
    return {"logits": logits, "logits_senses": senses if s.sense_dict is not None else None,
            "tokens": tokens, "seconds": seconds, "warm_tokens": warm_tokens}


def evaluate_task(s, params, data: TaskData, *, timing_pass: bool = False) -> dict:
    """The dev figures of a classifier: every task metric on every dev split, without and (with
    a dictionary) with sense replacement before the head (``senses_<metric>``), examples, and
    ``tokens_per_s`` of the forward (both variants, real tokens only; with ``timing_pass`` a
    second, compiled pass over every batch, else the batches of an already compiled shape, and
    no figure when there were none)."""

    regression = data.vocabulary.regression
    rec: dict[str, float] = {}
    tokens = seconds = 0.0
    for split, d in data.dev.items():
        out = evaluate_split(s, params, d, timing_pass=timing_pass)
        for variant, key in (("logits", ""), ("logits_senses", "senses_")):
            if out[variant] is None:
                continue
            for m, v in compute_metrics(data.metrics, out[variant], d.labels, regression=regression).items():
                rec[key + metric_key(m, split, len(data.dev))] = v
        tokens += out["warm_tokens"]
        seconds += out["seconds"]
    rec["examples"] = float(sum(len(d) for d in data.dev.values()))
    if seconds > 0:
        rec["tokens_per_s"] = tokens / seconds
    return rec


# --- Hooks: dev evaluation, early stopping, the best checkpoint -------------------------------

BEST_DIR = "best"


def best_manager(run_dir: Path, create: bool = True):
    """The Orbax manager of ``run_dir/best``: the params of the best dev evaluation so far (one
    step kept), items ``params`` and ``meta`` (the run's meta plus ``best``: step, metric, value)."""

    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create, enable_async_checkpointing=False,
                                           read_only=not create, save_interval_steps=0)
    return ocp.CheckpointManager((Path(run_dir) / BEST_DIR).absolute(), options=options,
                                 item_names=("params", "meta"))


def task_hooks(s, data: TaskData, log: Callable[[str], None]):
    """The loop's hooks for a task run (:class:`sense_jax.training.hooks.LoopHooks`): dev evaluation
    every ``eval_every`` steps (and at the end) with the task's metrics; each new best dev
    figure (the main metric of the first dev split) saves the params to ``best/``; after
    ``patience`` evaluations without a new best the run stops; the early-stopping state goes into
    every checkpoint and comes back on resume."""


    es = EarlyStopping(patience=s.cfg.patience, mode="max")
    key = data.main_metric
    holder = {"mngr": None}

    def mngr():
        if holder["mngr"] is None:
            holder["mngr"] = best_manager(Path(s.cfg.out_dir))
        return holder["mngr"]

    def after_eval(step, rec, state):
        value = rec[key]
        if es.update(step, value):  # a NaN figure (a constant prediction's correlation) never improves
            m = mngr()
            if step not in m.all_steps():  # a resumed run reaching the same best again
                m.save(step, args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state.params),
                    meta=ocp.args.JsonSave({**s.meta, "best": {"step": int(step), "metric": key, "value": value}})),
                    force=True)
                m.wait_until_finished()

    def resume(saved):
        nonlocal es
        if "early_stopping" in saved:
            es = EarlyStopping.from_dict({**saved["early_stopping"], "patience": s.cfg.patience})

    def close():
        if holder["mngr"] is not None:
            holder["mngr"].wait_until_finished()
            holder["mngr"].close()

    def describe(rec):
        extra = f", with senses {rec['senses_' + key]:.4f}" if "senses_" + key in rec else ""
        best = f" (best {es.best:.4f} at step {es.best_step})" if es.best is not None else ""
        return f"dev {key} {rec[key]:.4f}{extra}{best}"

    return LoopHooks(evaluate=lambda params: evaluate_task(s, params, data), describe=describe,
                       after_eval=after_eval, stopped=lambda: es.should_stop,
                       checkpoint_data=lambda: {"early_stopping": es.to_dict()},
                       postfix=("loss", "task", "accuracy"),
                       desc="finetune" if s.cfg.objective == "finetune" else f"distill {s.cfg.objective}",
                       resume=resume, close=close)


def prepare_task(cfg: Any, *, sense_dict=None, log: Callable[[str], None] = print):
    """Everything :func:`sense_jax.training.loop.run` needs for a task run: ``(setup, stream, hooks)``.

    The label vocabulary recorded beside the teacher (a fine-tuned model's
    ``label_vocabulary.json``) is the one the data must fit."""

    vocab = recorded_vocabulary(_teacher_path(cfg))
    data = load_task_data(cfg, vocabulary=vocab)
    s = task_setup(cfg, data, sense_dict=sense_dict)
    stream = ExampleStream(data.train.texts, data.train.labels, s.teacher.tokenizer, cfg.batch_size,
                           cfg.max_length, cfg.seed, cfg.group_by_length)
    return s, stream, task_hooks(s, data, log)


# --- Export -----------------------------------------------------------------------------------

TASK_META_FILE = "sense_jax_task.json"


def restore_best(run_dir: str | Path) -> tuple[dict, dict]:
    """``(params, meta)`` of a task run's best dev evaluation (``run_dir/best``), on the local
    default device; ``meta["best"]`` says step, metric and value.

    Raises:
      SenseJaxError: no ``best/`` (the run evaluated nothing yet) or it cannot be read.
    """



    run_dir = Path(run_dir)
    if not (run_dir / BEST_DIR).is_dir():
        raise SenseJaxError(f"{run_dir}: no {BEST_DIR}/ checkpoint (not a task run, or no dev evaluation yet)")
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns that a read-only manager is read-only
    try:
        mngr = best_manager(run_dir, create=False)
    finally:
        absl_logger.setLevel(level)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise SenseJaxError(f"{run_dir / BEST_DIR}: holds no complete checkpoint")
        step = max(steps)
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        family = get_family(meta["family"])
        scfg = _config_from_dict(family, meta["student_config"], meta["teacher_hf_config"])
        hcfg = _config_from_dict(family, meta["head_config"], meta["teacher_hf_config"])
        abstract = {"student": family.abstract_params(scfg), "head": abstract_head_params(hcfg)}
        if meta["config"].get("objective") != "finetune":
            tcfg = _config_from_dict(family, meta["teacher_config"], meta["teacher_hf_config"])
            abstract["adaptor"] = jax.eval_shape(lambda: init_adaptor(scfg.hidden_size, tcfg.hidden_size))
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
        try:
            params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"]
        except Exception as e:
            raise SenseJaxError(f"{run_dir / BEST_DIR / str(step)}: cannot be restored ({_short(e)})") from None
    finally:
        mngr.close()
    meta["family_config"] = {"student": scfg, "head": hcfg}
    return jax.device_get(params), meta


def classifier_state_dict(family, cfg: Any, encoder_params: dict, head_params: dict) -> dict[str, np.ndarray]:
    """transformers' ``*ForSequenceClassification`` state dict of an encoder and its head: the
    base model's tensors under the class's prefix (``bert.``), the head's beside them
    (:data:`sense_jax.models.heads.HEAD_TYPES`), names from the family's conversion table."""

    ht = head_type(cfg)
    params = {k: v for k, v in encoder_params.items() if k not in family.head_params}
    params.update(head_params)
    return {(n if n.startswith(ht.outside_base) else ht.base_prefix + n): np.ascontiguousarray(v)
            for n, v in params_to_hf(family, params).items()}


def classifier_hf_config(teacher_hf_config: dict, cfg: Any, vocabulary) -> dict:
    """config.json of an exported classifier: the teacher's, with ``cfg``'s sizes, the
    ``*ForSequenceClassification`` architecture, float32, the label vocabulary as ``id2label`` /
    ``label2id`` and ``problem_type`` (regression or single-label classification)."""

    out = {k: v for k, v in teacher_hf_config.items() if not k.startswith("_")}
    out.update(dataclasses.replace(cfg, dtype="float32").to_hf())
    names = vocabulary.id2label
    out.update(architectures=[head_type(cfg).architecture], dtype="float32", torch_dtype="float32",
               num_labels=vocabulary.num_labels, id2label={str(i): n for i, n in names.items()},
               label2id={n: i for i, n in names.items()},
               problem_type="regression" if vocabulary.regression else "single_label_classification")
    return out


def export_task(run_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Export a task run's best checkpoint (``run_dir/best``) as a transformers directory.

    A fine-tuned model (``sense-jax finetune``) becomes its ``*ForSequenceClassification``
    (``config.json`` with ``id2label`` / ``label2id`` / ``problem_type``, ``model.safetensors``,
    tokenizer files) that ``AutoModelForSequenceClassification`` loads with the same logits, and
    ``label_vocabulary.json`` (the vocabulary, with the data's other spellings of each label) that
    later runs read the data against. A task-distilled student becomes the student's base model
    (:func:`sense_jax.distill.export_hf`: ``AutoModel``) with ``adaptor.safetensors`` and
    ``head.safetensors`` (the teacher's frozen head, transformers' names, on adapted states), and
    the same ``label_vocabulary.json``. Both hold ``sense_jax_task.json`` (task, metrics, best
    step and dev figure, provenance).

    Raises:
      SenseJaxError: no best checkpoint, or ``out`` exists without ``overwrite``.
    """



    run_dir = Path(run_dir)
    params, meta = restore_best(run_dir)
    family = get_family(meta["family"])
    scfg, hcfg = meta["family_config"]["student"], meta["family_config"]["head"]
    vocab = LabelVocabulary.from_json(meta["label_vocabulary"], f"{run_dir / BEST_DIR} label_vocabulary")
    tok_dir = run_dir / "tokenizer" if (run_dir / "tokenizer").is_dir() else None
    info = {"task": meta.get("task"), "metrics": meta.get("metrics"), "objective": meta["config"].get("objective"),
            "best": meta["best"], "teacher": meta["teacher_path"], "run": str(run_dir.absolute()),
            "provenance": provenance(), "trained_with": meta.get("provenance")}
    if meta["config"].get("objective") == "finetune":
        state = classifier_state_dict(family, hcfg, params["student"], params["head"])
        with atomic_directory(out, overwrite=overwrite) as tmp:
            with open(tmp / "config.json", "w", encoding="utf-8") as f:
                json.dump(classifier_hf_config(meta["teacher_hf_config"], hcfg, vocab), f, indent=2, sort_keys=True)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if tok_dir is not None:
                copy_tokenizer_files(tok_dir, tmp)
            vocab.save(tmp / VOCABULARY_FILE)
            write_json_atomic(tmp / TASK_META_FILE, info)
        return Path(out)

    head = dict(params["head"])
    with atomic_directory(out, overwrite=overwrite) as tmp:
        student = export_hf(tmp / "student", family, scfg, params["student"], meta["teacher_hf_config"],
                            tokenizer_dir=tok_dir, adaptor=params["adaptor"], pooler=head.get("pooler"),
                            extra_meta={"task": info})
        for f in student.iterdir():
            os.replace(f, tmp / f.name)
        student.rmdir()
        save_file({k: np.ascontiguousarray(v) for k, v in params_to_hf(family, head).items()},
                  str(tmp / "head.safetensors"), metadata={"format": "pt"})
        vocab.save(tmp / VOCABULARY_FILE)
        write_json_atomic(tmp / TASK_META_FILE, info)
    return Path(out)


# --- Evaluating a classifier outside training -------------------------------------------------


def load_classifier(source: str | Path, *, senses: str | None = None, batch_size: int = 32,
                    max_length: int = 128, metric: str = "dot"):
    """A classifier ready for :func:`evaluate_task`: ``(evaluator, params)``; ``evaluator.vocabulary``
    is its recorded label vocabulary (a run's, or ``label_vocabulary.json`` beside a model), or None.

    ``source`` is a task run directory (its best checkpoint: a fine-tuned model, or a distilled
    student with its adaptor and the teacher's frozen head) or a model directory with a
    sequence classification head (``sense-jax finetune``'s export, a transformers
    ``*ForSequenceClassification`` directory, or a ``sense-jax convert`` of one).

    Raises:
      SenseJaxError: neither a task run nor a model with a head; a dictionary of another model.
    """




    source = Path(source)
    vocabulary = recorded_vocabulary(source) if source.is_dir() else None
    if (source / BEST_DIR).is_dir():
        params, meta = restore_best(source)
        vocabulary = LabelVocabulary.from_json(meta["label_vocabulary"], f"{source / BEST_DIR} label_vocabulary")
        family = get_family(meta["family"])
        scfg, hcfg = meta["family_config"]["student"], meta["family_config"]["head"]
        tokenizer = _load_tokenizer(source / "tokenizer")
        width_cfg = hcfg
    else:
        model = load_model(source)
        if model.head_params is None:
            raise SenseJaxError(f"{source}: neither a task run (no {BEST_DIR}/) nor a model with a sequence "
                                "classification head")
        family, tokenizer = model.family, model.tokenizer
        enc, _ = split_pooler(jax.device_get(model.params))
        params = {"student": enc, "head": jax.device_get(model.head_params)}
        scfg = dataclasses.replace(model.config, add_pooler=False, num_labels=0)
        hcfg = dataclasses.replace(model.config, add_pooler=False)
        width_cfg = model.config
    sense_dict = None
    if senses:
        sense_dict = SenseDictionary.load(senses)
        check_sense_dict(sense_dict, width_cfg, source=senses)
    cfg = types.SimpleNamespace(batch_size=batch_size, max_length=max_length, pad_to_buckets=True, metric=metric)
    ev = jax.jit(make_task_eval(cfg, family.make_module(scfg), functools.partial(head_logits, hcfg)))
    frozen = {} if sense_dict is None else {"senses": sense_dict}
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    evaluator = types.SimpleNamespace(
        cfg=cfg, teacher=types.SimpleNamespace(tokenizer=tokenizer), sense_dict=sense_dict,
        layout=types.SimpleNamespace(eval_batch=one), eval_step=lambda p, b: ev(p, b, frozen),
        num_labels=hcfg.num_labels, vocabulary=vocabulary)
    return evaluator, jax.device_put(params, one)
