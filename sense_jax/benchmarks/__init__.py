"""Public sense benchmarks: SCWS, WiC, CoarseWSD-20, word similarity, WSD (Raganato et al.).

``sense-jax evaluate TASK --data PATH --model MODEL [--senses DICT] [--layer L] [--out FILE]``
and :func:`evaluate` in Python. One module per benchmark; :mod:`sense_jax.benchmarks.common`
holds the one rule that maps a word of a whitespace-tokenised sentence to its tokens and the
variants (``contextual``, ``senses_dot`` / ``senses_cos`` / ``senses_l2``, ``one_sense``,
``static``). The data is never shipped: every evaluator takes a path (see docs/benchmarks.md for the
sources; ``../shared/evaldata`` in this project's workspace).
"""

from __future__ import annotations

import importlib

from sense_jax.errors import SenseJaxError

TASKS = ("scws", "wic", "coarsewsd20", "wordsim", "wsd")


def evaluate(task: str, data, model, senses=None, layer: int | None = None, **options) -> dict:
    """Run one benchmark; returns the result dict (``task, data, model, senses, layer, coverage,
    variants, reference`` and task-specific keys).

    Args:
      task: one of :data:`TASKS`.
      data: the benchmark's file or folder (its module doc gives the layout).
      model: a model directory (converted, transformers or exported student), or a loaded
        :class:`~sense_jax.benchmarks.common.BenchModel`.
      senses: a sense dictionary directory built from that teacher (and layer), a
        :class:`~sense_jax.sense_dict.SenseDictionary` already loaded with
        :func:`~sense_jax.benchmarks.common.load_senses`, or None.
      layer: hidden-state index (None = last layer).
      options: task options (``split``, ``tune_split`` for wic; ``temperature`` for scws and wic;
        ``shots`` for coarsewsd20; ``batch_size``, ``window`` for all).

    Raises:
      SenseJaxError: unknown task, bad data (file and line named), a dictionary of another
        teacher or layer.
    """
    # Here, not at the top: `sense-jax --help` reads TASKS, and common imports JAX and the models.
    from sense_jax.benchmarks import common

    if task not in TASKS:
        raise SenseJaxError(f"unknown benchmark {task!r}; choose from {TASKS}")
    module = importlib.import_module(f"sense_jax.benchmarks.{task}")
    from sense_jax.sense_dict import SenseDictionary

    bm = model if isinstance(model, common.BenchModel) else common.load_bench_model(model, layer)
    if isinstance(senses, SenseDictionary):  # loaded (and checked) by the caller
        sd, senses = senses, senses.meta.get("path", "(loaded dictionary)")
    else:
        sd = common.load_senses(senses, bm) if senses is not None else None
    return module.evaluate(bm, data, sd, senses, **options)
