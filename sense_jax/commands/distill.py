"""``sense-jax distill``: train a student by sense knowledge distillation (METHOD §3).

The trainer lives in :mod:`sense_jax.training` (see its docstring for the design, outputs and
modules). ``python -m train.distill ARGS`` is :func:`main`, the same command.
Multi-host: the same command on every host with ``--distributed`` (see ``_distributed``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

from sense_jax.commands import _distributed

HELP = "train a smaller student to pick the teacher's senses (sense knowledge distillation)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="run config (.json, .yaml or .yml)")
    p.add_argument("--preset", default="default", help="base config: default or runlocal (a tiny run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable); unknown keys are refused")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _distributed.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    # The library (JAX, models) is imported when the command runs: `sense-jax --help` imports every command module.
    from sense_jax import trainer

    cfg = trainer.load_config(args.config, args.overrides, preset=args.preset)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True))
        return 0
    _distributed.initialize(args)
    result = trainer.train(cfg)
    import jax

    if jax.process_index() != 0:
        return 0
    evals = [r for r in result.history if r.get("kind") == "eval"]
    last = [r for r in result.history if r.get("kind") == "train"]
    msg = f"trained to step {int(result.state.step)} in {result.run_dir}"
    if cfg.task or cfg.task_data:  # a task run: the task loss and the dev figures
        if last:
            msg += f": loss {last[-1]['loss']:.4f}, task loss {last[-1]['task']:.4f}"
        if evals:
            figures = {k: v for k, v in evals[-1].items() if k not in ("kind", "step", "examples", "tokens_per_s")}
            msg += ", dev " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items())
        print(msg + f"; best checkpoint in {result.run_dir / 'best'} (sense-jax export to write it out)")
        return 0
    if last:
        msg += f": loss {last[-1]['loss']:.4f}"
        if "accuracy" in last[-1]:
            msg += f", sense accuracy {last[-1]['accuracy']:.4f}"
    if evals:
        msg += f", held-out sense accuracy {evals[-1]['accuracy']:.4f}"
    print(msg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.distill ARGS`` = ``sense-jax distill ARGS``."""
    from sense_jax.cli import main as cli_main  # the CLI imports this module: not at the top

    return cli_main(["distill", *(argv if argv is not None else sys.argv[1:])])
