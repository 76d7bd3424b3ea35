"""``sense-jax evaluate TASK --data PATH --model MODEL``: one public sense benchmark."""

from __future__ import annotations

import argparse
import math

from sense_jax.benchmarks import TASKS
from sense_jax.errors import SenseJaxError
from sense_jax.io_utils import check_output_file, write_json_atomic

HELP = "score a model (and a sense dictionary) on a public benchmark: scws, wic, coarsewsd20, wordsim, wsd"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=TASKS, help="benchmark")
    p.add_argument("--data", required=True,
                   help="the benchmark's file or folder (layout: see docs/benchmarks.md)")
    p.add_argument("--model", required=True,
                   help="converted sense_jax dir, transformers dir, or exported student (with adaptor)")
    p.add_argument("--senses", default=None, help="sense dictionary built from that teacher (and layer)")
    p.add_argument("--layer", type=int, default=None,
                   help="hidden-state index: 0 = embeddings .. L = last (default; -1 also means last)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the result as JSON")
    p.add_argument("--split", default="dev", help="wic: split to report (default dev)")
    p.add_argument("--tune-split", default="train", help="wic: split the threshold is chosen on (default train)")
    p.add_argument("--temperature", type=float, default=None,
                   help="scws, wic: softmax temperature of p(sense | context) over cosines (avg_sim_c) "
                        "(default: sense_jax.benchmarks.scws.TEMPERATURE)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="sentences per forward batch for sentences longer than a packed row (128 tokens)")
    p.add_argument("--window", type=int, default=None, metavar="W",
                   help="read only W tokens of context on each side of the target (default: the whole "
                        "sentence; faster, different figures: see docs/benchmarks.md)")
    p.add_argument("--lemma-names", action="store_true",
                   help="wsd: glosses also name each synset's other lemmas (LMMS-style sense texts)")
    p.add_argument("--shots", type=int, default=None, metavar="N",
                   help="coarsewsd20: only the first N train examples of each class (few-shot; default all)")


def run(args: argparse.Namespace) -> int:
    # The library (JAX, models) is imported when the command runs: `sense-jax --help` imports every command module.
    from sense_jax.benchmarks import evaluate
    from sense_jax.benchmarks.common import render_markdown

    if args.batch_size < 1:
        raise SenseJaxError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out:
        check_output_file(args.out)  # before the work, not after it
    options = {"batch_size": args.batch_size}
    if args.window is not None:
        if args.window < 0:
            raise SenseJaxError(f"--window must be >= 0 tokens, got {args.window}")
        options["window"] = args.window
    if args.lemma_names:
        if args.task != "wsd":
            raise SenseJaxError("--lemma-names is for wsd only")
        options["lemma_names"] = True
    if args.shots is not None:
        if args.task != "coarsewsd20" or args.shots < 1:
            raise SenseJaxError(f"--shots {args.shots}: a number >= 1, for coarsewsd20 only")
        options["shots"] = args.shots
    if args.task == "wic":
        options.update(split=args.split, tune_split=args.tune_split)
    if args.temperature is not None:  # the AvgSimC / MaxSimC softmax, which scws and wic report
        if args.task not in ("scws", "wic"):
            raise SenseJaxError(f"--temperature is for scws and wic only (their avg_sim_c), not {args.task}")
        if not math.isfinite(args.temperature) or args.temperature <= 0:
            raise SenseJaxError(f"--temperature must be a finite number > 0, got {args.temperature}")
        options["temperature"] = args.temperature
    res = evaluate(args.task, args.data, args.model, args.senses, args.layer, **options)
    if args.out:
        write_json_atomic(args.out, res)
    print(render_markdown(res), end="")
    return 0
