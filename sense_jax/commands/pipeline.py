"""``sense-jax pipeline``: the main job, convert -> extract -> cluster -> distill -> evaluate.

With ``--set task=NAME`` (or ``task_data`` + ``text_fields``, in ``--set`` or the config file) it
runs the task recipe instead (:mod:`sense_jax.task_pipeline`): finetune the teacher -> corpus of
the task's texts -> extract -> cluster -> task-distil the students -> evaluate."""

from __future__ import annotations

import argparse
import dataclasses
import json

from sense_jax.config import read_config_file
from sense_jax.errors import ConfigError

HELP = "run the whole method end to end (resumable): convert, extract, cluster, distill, evaluate"

DEFAULT_STAGES = ("convert", "corpus", "extract", "cluster", "distill", "evaluate")
TASK_STAGES = ("finetune", "corpus", "extract", "cluster", "distill", "evaluate")
# Keys that make a run the task recipe (sense_jax.task_pipeline.TaskPipelineConfig).
TASK_KEYS = ("task", "task_data", "text_fields")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="JSON or YAML file of PipelineConfig keys "
                                                    "(TaskPipelineConfig keys with a task)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable); unknown keys are refused; task=NAME runs "
                        "the task recipe (finetune, extract, cluster, task distillation, evaluate)")
    p.add_argument("--out", help="output directory (default runs/pipeline; with a task runs/task)")
    p.add_argument("--stages", default=None,
                   help="comma-separated subset of stages to run (each needs its predecessors' outputs; "
                        f"default {','.join(DEFAULT_STAGES)}); add 'benchmarks' for the public benchmarks "
                        f"(--set evaldata=DIR). With a task: {','.join(TASK_STAGES)}")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    if _is_task_run(args):
        return _run_task(args)
    # The library (JAX, models) is imported when the command runs: `sense-jax --help` imports every command module.
    from sense_jax.pipeline import STAGES, Pipeline, load_pipeline_config

    cfg = load_pipeline_config(args.config, args.overrides, args.out)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    stages = parse_stages(args.stages, DEFAULT_STAGES)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ConfigError(f"--stages: unknown stage(s) {bad}; choose from {list(STAGES)}")
    report = Pipeline(cfg).run(stages)
    _say_where(report, "report.json, PNG plots")
    return 0


def parse_stages(text: str | None, default: tuple[str, ...]) -> list[str]:
    """``--stages a,b`` -> ["a", "b"]; absent -> ``default``.

    Raises:
      ConfigError: the list is given but names no stage (``--stages ""``, an empty shell
        variable): that would otherwise run every stage, for minutes to hours.
    """
    if text is None:
        return list(default)
    stages = [s.strip() for s in text.split(",") if s.strip()]
    if not stages:
        raise ConfigError(f"--stages {text!r} names no stage; leave the option out to run them all "
                          f"({','.join(default)})")
    return stages


def _say_where(report, also: str) -> None:
    """The last line of a run: where its report is, or that no stage has written one yet."""
    if (report / "report.md").exists():
        print(f"report: {report / 'report.md'} (and {also}) in {report}")
    else:
        print(f"done; no report yet in {report} (the evaluate stage has not run)")


def _is_task_run(args: argparse.Namespace) -> bool:
    """A task recipe: ``task`` / ``task_data`` / ``text_fields`` set by ``--set`` or in the file."""
    keys = {o.partition("=")[0].strip() for o in args.overrides}
    if args.config:
        keys |= set(read_config_file(args.config))
    return any(k in keys for k in TASK_KEYS)


def _run_task(args: argparse.Namespace) -> int:
    # The library is imported when the command runs (see run).
    from sense_jax.task_pipeline import TaskPipeline, load_task_pipeline_config

    cfg = load_task_pipeline_config(args.config, args.overrides, args.out)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    report = TaskPipeline(cfg).run(parse_stages(args.stages, TASK_STAGES))
    _say_where(report, "report.json")
    return 0
