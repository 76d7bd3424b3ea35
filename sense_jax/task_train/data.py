"""Labelled examples for the trainer and the data of a task run (the splits, seeded samples,
the recorded label vocabulary).

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
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from sense_jax.batching import bucket_length
from sense_jax.errors import ConfigError, SenseJaxError
from sense_jax.labelled import VOCABULARY_FILE, LabelVocabulary
from sense_jax.tasks import get_task, load_split, load_task
from sense_jax.training.data import PassageStream

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
    if cfg.task and (cfg.text_fields or cfg.task_regression):  # a named task has its own fields and target
        raise ConfigError(f"config: task={cfg.task!r} and {'text_fields' if cfg.text_fields else 'task_regression'}"
                          " are alternatives: a named task brings its fields, labels and metrics; give one")
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
