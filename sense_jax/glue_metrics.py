"""GLUE's metrics, computed by scikit-learn and scipy (issue 13, item 5).

| task | metrics (main first) |
|---|---|
| cola | matthews_correlation, accuracy |
| sst2, qnli, rte, wnli, wic | accuracy |
| mnli | accuracy, on dev_matched and dev_mismatched (:func:`split_metrics` names them ``accuracy_matched`` / ``accuracy_mismatched``) |
| mrpc, qqp | f1 (of the positive class 1, "equivalent"/"duplicate"), accuracy |
| stsb | pearson, spearman |
| wordnet-lexfile | accuracy, macro_f1 |

These are the metrics of the GLUE paper (Wang et al., 2019, Table 1) and of transformers'
``run_glue.py`` example (which reads them from the ``evaluate`` package's ``glue`` metric: sklearn's
``matthews_corrcoef`` / ``f1_score``, scipy's ``pearsonr`` / ``spearmanr``). Values are fractions
in [0, 1] (correlations in [-1, 1]), not percentages.
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping

import numpy as np
import scipy.stats
import sklearn.metrics

from sense_jax.tasks import get_task

__all__ = ["METRICS", "compute_metrics", "task_metrics", "split_metrics", "main_metric"]


def _accuracy(p, y):
    return float(sklearn.metrics.accuracy_score(y, p))


def _f1(p, y):
    return float(sklearn.metrics.f1_score(y, p, pos_label=1, average="binary", zero_division=0.0))


def _macro_f1(p, y):
    return float(sklearn.metrics.f1_score(y, p, average="macro", zero_division=0.0))


def _matthews(p, y):
    return float(sklearn.metrics.matthews_corrcoef(y, p))


def _pearson(p, y):
    with warnings.catch_warnings():  # constant input: NaN, reported as such
        warnings.simplefilter("ignore")
        return float(scipy.stats.pearsonr(p, y)[0])


def _spearman(p, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(scipy.stats.spearmanr(p, y)[0])


#: name -> (function(predictions, labels) -> float, regression metric?)
METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], bool]] = {
    "accuracy": (_accuracy, False),
    "f1": (_f1, False),
    "macro_f1": (_macro_f1, False),
    "matthews_correlation": (_matthews, False),
    "pearson": (_pearson, True),
    "spearman": (_spearman, True),
}


def _as_predictions(predictions, regression: bool) -> np.ndarray:
    p = np.asarray(predictions)
    if regression:
        if p.ndim == 2 and p.shape[1] == 1:
            p = p[:, 0]
        return p.astype(np.float64)
    if p.ndim == 2:  # logits [N, C] -> class ids
        p = p.argmax(axis=-1)
    return p.astype(np.int64)


def compute_metrics(names, predictions, labels, *, regression: bool = False) -> dict[str, float]:
    """Named metrics of predictions against gold labels.

    Args:
      names: metric names, keys of :data:`METRICS`.
      predictions: class ids int [N] or logits float [N, C] (argmax taken); for regression float
        [N] or [N, 1].
      labels: gold class ids int [N], or float [N] for regression.
      regression: the target is real-valued (STS-B).

    Returns:
      ``{name: value}`` (python floats; NaN for a correlation of constant input).

    Raises:
      ValueError: an unknown metric name, a classification metric asked of a regression target
        (or vice versa), or predictions and labels of different lengths.
    """
    p = _as_predictions(predictions, regression)
    y = np.asarray(labels).astype(np.float64 if regression else np.int64)
    if p.ndim != 1 or y.ndim != 1 or len(p) != len(y):
        raise ValueError(f"predictions {np.shape(predictions)} and labels {np.shape(labels)} do not match")
    out = {}
    for name in names:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r} (known: {', '.join(METRICS)})")
        fn, for_regression = METRICS[name]
        if for_regression != regression:
            raise ValueError(f"metric {name!r} is for {'regression' if for_regression else 'classification'}")
        out[name] = fn(p, y)
    return out


def task_metrics(task, predictions, labels) -> dict[str, float]:
    """The task's metrics (see the module table) of predictions on one split.

    Args:
      task: a task name (``"sst2"``) or :class:`~sense_jax.tasks.TaskSpec`.
      predictions, labels: as :func:`compute_metrics`.

    Raises:
      ConfigError: unknown task name.
    """
    spec = get_task(task)
    return compute_metrics(spec.metrics, predictions, labels, regression=spec.vocabulary.regression)


def split_metrics(task, by_split: Mapping[str, tuple]) -> dict[str, float]:
    """Metrics on several evaluation splits, named as GLUE reports them.

    For a task with one dev split the keys are the metric names; for MNLI each key carries the
    split: ``{"dev_matched": (p, y), "dev_mismatched": (p, y)}`` ->
    ``{"accuracy_matched": ..., "accuracy_mismatched": ...}``.

    Args:
      by_split: split name -> (predictions, labels).
    """
    spec = get_task(task)
    out = {}
    for split, (p, y) in by_split.items():
        m = task_metrics(spec, p, y)
        if len(by_split) == 1 and len(spec.dev_splits) == 1:
            out.update(m)
        else:
            suffix = split.removeprefix("dev_")
            out.update({f"{k}_{suffix}": v for k, v in m.items()})
    return out


def main_metric(task) -> str:
    """The metric that model selection (early stopping) watches, on ``get_task(task).dev_splits[0]``."""
    return get_task(task).main_metric
