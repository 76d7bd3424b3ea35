"""What a kind of run adds to the one training loop (:func:`sense_jax.training.loop.run`): its
evaluation, early stopping and the data its checkpoints carry. SKD's hooks are
:func:`sense_jax.training.loop.skd_hooks`; a task run's :func:`sense_jax.task_train.task_hooks`.
A module of its own so that a kind of run defines its hooks without importing the loop."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass
class LoopHooks:
    """What a kind of run adds to the one training loop (:func:`run`).

    Attributes:
      evaluate: ``params -> dict`` of held-out figures (an ``eval`` record of metrics.jsonl), or
        None (no held-out data). SKD: sense accuracy; a task: the dev metrics (sense_jax.task_train).
      describe: an eval record -> the line logged after each evaluation.
      after_eval: ``(step, record, state) -> None`` after each evaluation (a task keeps its best
        checkpoint and counts evaluations without improvement here).
      stopped: ``() -> bool``: stop now (early stopping); checked before the first step and after
        each evaluation; the step is then saved, so that a restarted run stops at once too.
      checkpoint_data: ``() -> dict`` saved in each checkpoint's ``data`` item beside the data
        position (a task: the early-stopping state).
      resume: receives a restored checkpoint's ``data`` item before the loop starts.
      close: called when the run ends, however it ends.
      prepare: ``(setup, stream) -> (setup, stream)`` after the resume check and restore, before
        the first step (not when no step is left): SKD swaps in the teacher cache's step and
        stream here (:func:`sense_jax.training.cache.use_teacher_cache`), so that a refused
        resume builds nothing.
      postfix: metrics shown on the progress bar; desc: its label.
    """

    evaluate: Callable[[Any], dict] | None = None
    describe: Callable[[dict], str] = lambda rec: ""
    after_eval: Callable[[int, dict, Any], None] | None = None
    stopped: Callable[[], bool] = lambda: False
    checkpoint_data: Callable[[], dict] = dict
    resume: Callable[[dict], None] = lambda data: None
    close: Callable[[], None] = lambda: None
    prepare: Callable[[Any, Any], tuple] | None = None
    postfix: tuple[str, ...] = ("loss", "accuracy")
    desc: str = "distill"
