"""``sense-jax pipeline``: the main job, convert -> extract -> cluster -> distill -> evaluate."""

from __future__ import annotations

import argparse
import dataclasses
import json

from sense_jax.errors import ConfigError

HELP = "run the whole method end to end (resumable): convert, extract, cluster, distill, evaluate"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="JSON or YAML file of PipelineConfig keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable); unknown keys are refused")
    p.add_argument("--out", help="output directory (default runs/pipeline)")
    p.add_argument("--stages", default=",".join(("convert", "corpus", "extract", "cluster", "distill", "evaluate")),
                   help="comma-separated subset of stages to run (each needs its predecessors' outputs); "
                        "add 'benchmarks' for the public benchmarks (--set evaldata=DIR)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    # The library (JAX, models) is imported when the command runs: `sense-jax --help` imports every command module.
    from sense_jax.pipeline import STAGES, Pipeline, load_pipeline_config

    cfg = load_pipeline_config(args.config, args.overrides, args.out)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ConfigError(f"--stages: unknown stage(s) {bad}; choose from {list(STAGES)}")
    report = Pipeline(cfg).run(stages)
    print(f"report: {report / 'report.md'} (and report.json, PNG plots) in {report}")
    return 0
