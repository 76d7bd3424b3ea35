"""The SKD trainer's public names, in one place (the code lives in :mod:`sense_jax.training`,
one module per job; its package docstring gives the design, the outputs and the layout).

    from sense_jax import trainer
    result = trainer.train(trainer.load_config("run.yaml", ["steps=200"]))
    trainer.export_checkpoint(result.run_dir, "student-hf")
"""

from __future__ import annotations

from sense_jax.training.checkpoint import (
    check_resume, checkpoint_manager, open_checkpoints, read_meta, restore_latest, save_checkpoint)
from sense_jax.training.config import PRESETS, RESUMABLE_CHANGES, DistillConfig, load_config
from sense_jax.training.data import PackedStream, PassageStream, read_passages, split_held_out, tokenize
from sense_jax.training.export import export_checkpoint
from sense_jax.training.layout import Layout, layout_for, make_layout
from sense_jax.training.hooks import LoopHooks
from sense_jax.training.loop import TrainingDiverged, TrainResult, evaluate, run, skd_hooks, steps_for_epochs, train
from sense_jax.training.metrics import MetricsWriter, plot_curves
from sense_jax.training.setup import Setup, init_state, put_batch, setup
from sense_jax.training.step import (
    INPUT_EMBEDDINGS, TrainState, _student_forward, frozen_paths, make_eval_step, make_optimizer,
    make_schedule, make_step, make_train_step, merge_frozen, split_frozen)

_check_resume = check_resume  # the name tests and older callers use

__all__ = [
    "DistillConfig", "INPUT_EMBEDDINGS", "Layout", "LoopHooks", "MetricsWriter", "PRESETS", "PackedStream",
    "PassageStream",
    "RESUMABLE_CHANGES", "Setup", "TrainResult", "TrainState", "TrainingDiverged", "check_resume",
    "checkpoint_manager", "evaluate", "export_checkpoint", "frozen_paths", "init_state", "layout_for",
    "load_config", "make_eval_step", "make_layout", "make_optimizer", "make_schedule", "make_step",
    "make_train_step", "merge_frozen", "open_checkpoints", "plot_curves", "put_batch", "read_meta",
    "read_passages", "restore_latest", "run", "save_checkpoint", "setup", "skd_hooks", "split_frozen",
    "split_held_out", "steps_for_epochs", "tokenize", "train",
]
