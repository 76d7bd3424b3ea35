"""The training loop of every run: inputs read, the one restore (or a fresh state), steps, held-out
evaluation, checkpoints, metrics. SKD feeds it passages (:func:`skd_hooks`); fine-tuning and task
distillation labelled examples, with dev evaluation and early stopping
(:func:`sense_jax.task_train.prepare_task`), through :class:`LoopHooks`. The parts it ties live
beside it in :mod:`sense_jax.training`."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
from tqdm.auto import tqdm

from sense_jax.compile_cache import enable_compile_cache
from sense_jax.convert import copy_tokenizer_files
from sense_jax.errors import ConfigError, SenseJaxError
from sense_jax.io_utils import check_out_spares_sources, write_json_atomic
from sense_jax.sharding import process_rows
from sense_jax.training.cache import use_teacher_cache
from sense_jax.training.checkpoint import check_resume, checkpoint_manager, restore_latest, save_checkpoint
from sense_jax.training.config import DistillConfig
from sense_jax.training.data import PackedStream, PassageStream, eval_batches, packed_eval_batches, run_passages
from sense_jax.training.hooks import LoopHooks
from sense_jax.training.metrics import MetricsWriter, plot_curves
from sense_jax.training.setup import Setup, init_state, put_batch, setup, teacher_tokenizer
from sense_jax.training.step import TrainState


class TrainingDiverged(SenseJaxError):
    """The loss or the gradient became NaN/inf; the message names the step and the last checkpoint."""


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the final state (on device), the run's setup, its directory,
    every metric record written (``kind`` "train" / "eval"), and the step it resumed from."""

    state: TrainState
    setup: Setup
    run_dir: Path
    history: list[dict]
    resumed_from: int | None


def evaluate(s: Setup, params, eval_passages: Sequence[str]) -> dict:
    """Held-out sense accuracy and SKD loss over at most ``eval_batches`` batches (the same
    passages packed with ``pack_length``: :func:`~sense_jax.training.data.packed_eval_batches`)."""
    cfg = s.cfg
    B, T = cfg.batch_size, cfg.pack_length or cfg.max_length
    rows = process_rows(s.layout.eval_batch, (B, T), 0)
    tot = {"skd_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    batches = (packed_eval_batches(s.teacher.tokenizer, eval_passages, B, cfg.max_length, T, cfg.eval_batches, rows)
               if cfg.pack_length else eval_batches(s.teacher.tokenizer, eval_passages, B, T, cfg.eval_batches, rows))
    for b in batches:
        dev = {k: (jax.device_put(v, s.layout.eval_batch) if jax.process_count() == 1 else
                   jax.make_array_from_process_local_data(s.layout.eval_batch, v, (B, T))) for k, v in b.items()}
        m = jax.device_get(s.eval_step(params, dev))
        for k in tot:
            tot[k] += float(m[k])
    n = max(tot["tokens"], 1.0)
    return {"accuracy": tot["correct"] / n, "skd": tot["skd_sum"] / n, "tokens": tot["tokens"]}


def steps_for_epochs(cfg: DistillConfig, epochs: float, tokenizer=None) -> int:
    """Optimizer updates that make ``epochs`` passes over the passages :func:`train` would train
    on with ``cfg`` (its corpus less the held-out share, exactly as :func:`train` splits it):
    ``max(1, ceil(epochs x passages / (batch_size x grad_accum)))``; ``cfg.steps`` is ignored.
    With ``pack_length`` the passages are counted as the packed rows of an epoch
    (:class:`~sense_jax.training.data.PackedStream`, tokenised with ``tokenizer``, by default
    the teacher's).

    Raises:
      SenseJaxError: packing, and the teacher has no tokenizer files (named)."""
    passages, _ = run_passages(dataclasses.replace(cfg, eval_data=""), None, [] if cfg.eval_data else None)
    n = len(passages)
    if cfg.pack_length:
        n = PackedStream(passages, tokenizer or teacher_tokenizer(cfg), cfg.batch_size, cfg.max_length,
                         cfg.pack_length, cfg.seed).rows_per_epoch
    return max(1, math.ceil(epochs * n / (cfg.batch_size * cfg.grad_accum)))


def train(cfg: DistillConfig, *, passages: Sequence[str] | None = None,
          eval_passages: Sequence[str] | None = None, sense_dict=None, stop_after: int | None = None,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) SKD training as configured.

    Args:
      cfg: the run config (:func:`load_config`).
      passages / eval_passages: in-memory corpora (tests); else read from ``cfg.train_data`` /
        ``cfg.eval_data`` (or ``eval_fraction`` held out, chosen with ``seed``).
      sense_dict: an in-memory dictionary instead of ``cfg.senses``.
      stop_after: return after this step as if the process were killed there (no final save;
        pending async saves are still finished). For resume tests.

    Returns:
      :class:`TrainResult` (final state on device, metric records).

    Raises:
      TrainingDiverged: a NaN/inf loss or gradient at step s; checkpoints up to the last good
        step are kept, nothing is saved after it.
      ConfigError / SenseJaxError: bad input, named.
    """
    enable_compile_cache()
    log = log or (lambda m: print(m, file=sys.stderr))
    if cfg.task or cfg.task_data:  # fine-tuning or task distillation: labelled examples
        from sense_jax.task_train import prepare_task  # local: only task runs need labels, tasks, heads

        s, stream, hooks = prepare_task(cfg, sense_dict=sense_dict, log=log)
        return run(s, stream, hooks, stop_after=stop_after, log=log)
    passages, eval_passages = run_passages(cfg, passages, eval_passages)
    s = setup(cfg, sense_dict=sense_dict)
    stream = make_stream(cfg, passages, s.teacher.tokenizer)
    hooks = skd_hooks(s, eval_passages)
    hooks.prepare = lambda s, stream: use_teacher_cache(s, stream, passages, log)
    return run(s, stream, hooks, stop_after=stop_after, log=log)


def make_stream(cfg: DistillConfig, passages: Sequence[str], tokenizer) -> PassageStream | PackedStream:
    """The run's training stream: packed rows with ``pack_length`` > 0, else one passage per row
    (length-grouped with ``group_by_length``)."""
    if cfg.pack_length:
        return PackedStream(passages, tokenizer, cfg.batch_size, cfg.max_length, cfg.pack_length, cfg.seed)
    return PassageStream(passages, tokenizer, cfg.batch_size, cfg.max_length, cfg.seed, cfg.group_by_length)


def skd_hooks(s: Setup, eval_passages: Sequence[str]) -> LoopHooks:
    """SKD's hooks: held-out sense accuracy on ``eval_passages`` (no evaluation when they are
    empty, or without a dictionary, the MSE baseline: nothing to score)."""
    return LoopHooks(
        evaluate=(lambda params: evaluate(s, params, eval_passages)) if eval_passages and s.eval_step else None,
        describe=lambda e: f"held-out sense accuracy {e['accuracy']:.4f} ({int(e['tokens'])} tokens)")


def run(s: Setup, stream: PassageStream, hooks: LoopHooks, *, stop_after: int | None = None,
        log: Callable[[str], None] = print) -> TrainResult:
    """Open (or resume) the run directory of ``s`` and train ``stream``'s batches: what every kind
    of run shares (checkpoint manager, the resume check and restore, tokenizer and config files,
    the loop). ``hooks`` (:class:`LoopHooks`) adds evaluation, early stopping and the data a
    checkpoint carries besides the data position."""
    cfg, run_dir = s.cfg, Path(s.cfg.out_dir)
    if s.teacher.tokenizer is None:
        raise SenseJaxError(f"teacher {s.meta['teacher_path']}: no tokenizer files")
    check_run_dir(run_dir)
    # The run writes checkpoints, config.json and tokenizer/ into out_dir: never into an input.
    check_out_spares_sources(run_dir, *(p for p in (
        s.meta["teacher_path"], cfg.teacher, cfg.senses, cfg.train_data, cfg.eval_data, cfg.task_data,
        "" if cfg.student in ("truncate", "fresh") else cfg.student) if p))
    # Inputs are valid: only now does the run directory appear.
    mngr = checkpoint_manager(run_dir / "checkpoints", save_every=cfg.save_every, keep=cfg.keep_checkpoints)
    try:
        restored = restore_latest(mngr, s.layout.abstract_state, log=log,
                                  check=lambda saved, where: check_resume(saved, s.meta, where))
        if jax.process_index() == 0:  # after the resume check: a refused run changes nothing
            (run_dir / "tokenizer").mkdir(parents=True, exist_ok=True)
            copy_tokenizer_files(Path(s.meta["teacher_path"]), run_dir / "tokenizer")
            write_json_atomic(run_dir / "config.json", dataclasses.asdict(cfg))
        if restored is None:
            state, micro, start = init_state(s), 0, 0
        else:
            state, data, start = restored
            micro = int(data["micro_batches"])
            hooks.resume(data)
            log(f"resuming from step {start} ({run_dir / 'checkpoints' / str(start)})")
        if hooks.prepare is not None and start < (cfg.steps if stop_after is None else min(stop_after, cfg.steps)):
            s, stream = hooks.prepare(s, stream)
        return _loop(s, state, micro, start, stream, mngr, run_dir, stop_after, log,
                     None if restored is None else start, hooks)
    finally:
        mngr.wait_until_finished()
        mngr.close()
        hooks.close()


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that holds another artefact's ``config.json`` (a model directory
    given as ``out_dir``): the run would replace it with the run config, and the model could no
    longer be loaded. A run's own ``config.json`` (a killed or finished run: resume) passes.

    Raises:
      ConfigError: ``run_dir/config.json`` exists and is not a run config (named).
    """
    f = run_dir / "config.json"
    if not f.is_file():
        return
    try:
        saved = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        saved = None
    if not (isinstance(saved, dict) and {"out_dir", "steps", "teacher"} <= saved.keys()):
        raise ConfigError(f"{f} is not a run's config (is {run_dir} a model directory?): "
                          "out_dir must be a new or an earlier run's directory")


def _loop(s: Setup, state, micro, start, stream, mngr, run_dir, stop_after, log, resumed_from,
          hooks: LoopHooks):
    cfg = s.cfg
    metrics_out = MetricsWriter(run_dir, resumed_from, cfg.tensorboard)
    rows = process_rows(s.layout.batch, (cfg.grad_accum, cfg.batch_size, cfg.pack_length or cfg.max_length), 1)
    last_saved = resumed_from
    end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    if hooks.stopped():  # a run that stopped early, started again
        end = start
    bar = None
    if cfg.progress and jax.process_index() == 0:
        bar = tqdm(total=cfg.steps, initial=start, desc=hooks.desc, dynamic_ncols=True)

    def finish_step(step: int, m_dev, t0: float) -> None:
        m = {k: float(v) for k, v in jax.device_get(m_dev).items()}
        if not m.pop("finite") or not math.isfinite(m["loss"]):
            where = (f"the last good checkpoint is step {last_saved} in {run_dir / 'checkpoints'}"
                     if last_saved is not None else "no checkpoint was saved")
            raise TrainingDiverged(f"loss is {m['loss']} (grad norm {m['grad_norm']}) at step {step}; "
                                   f"training stopped, {where}")
        dt = max(time.perf_counter() - t0, 1e-9)
        rec = {"kind": "train", "step": step, **m, "tokens_per_s": m["real_tokens"] / dt}
        if step % cfg.log_every == 0 or step == end:
            metrics_out.write(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(**{k: f"{m[k]:.4f}" for k in hooks.postfix if k in m},
                            tok_s=f"{rec['tokens_per_s']:.0f}")

    try:
        pending = None  # (step, metrics) of the step whose metrics are not yet read: one step lag
        for step in range(start + 1, end + 1):
            t0 = time.perf_counter()
            batch = put_batch(s, stream.step_batches(micro, cfg.grad_accum, cfg.pad_to_buckets, rows))
            state, m_dev = s.train_step(state, batch)
            micro += cfg.grad_accum
            if pending is not None:
                finish_step(*pending)
            pending = (step, m_dev, t0)
            due_save = step % cfg.save_every == 0 or (step == cfg.steps)
            due_eval = hooks.evaluate is not None and (cfg.eval_every and step % cfg.eval_every == 0
                                                       or step == cfg.steps)
            if due_save or due_eval:  # never save or evaluate a state whose loss is unchecked
                finish_step(*pending)
                pending = None
            stop = False
            if due_eval:
                rec = {"kind": "eval", "step": step, **hooks.evaluate(state.params)}
                metrics_out.write(rec)
                if hooks.after_eval is not None:
                    hooks.after_eval(step, rec, state)
                log(f"step {step}: {hooks.describe(rec)}")
                stop = hooks.stopped()
                if stop:
                    log(f"step {step}: stopping early (no dev improvement in {cfg.patience} evaluations)")
            if (due_save or stop) and save_checkpoint(mngr, state, micro, s.meta, hooks.checkpoint_data()):
                last_saved = step
            if stop:
                break
        if pending is not None:
            finish_step(*pending)
    finally:
        if bar is not None:
            bar.close()
        metrics_out.close()
    if cfg.plot and jax.process_index() == 0 and stop_after is None:
        plot_curves(metrics_out.records, run_dir / "curves.png")
    return TrainResult(state=state, setup=s, run_dir=run_dir, history=metrics_out.records,
                       resumed_from=resumed_from)
