"""The task run's loop hooks: dev evaluation, early stopping, the best checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import orbax.checkpoint as ocp

from sense_jax.task_losses import EarlyStopping
from sense_jax.task_train.data import ExampleStream, TaskData, load_task_data, recorded_vocabulary
from sense_jax.task_train.evaluate import evaluate_task
from sense_jax.task_train.export import best_manager
from sense_jax.task_train.setup import task_setup
from sense_jax.training.hooks import LoopHooks
from sense_jax.training.setup import _teacher_path

# --- Hooks: dev evaluation, early stopping, the best checkpoint -------------------------------


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
