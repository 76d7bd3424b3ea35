"""Run and time every public sense benchmark on one model, after compilation (not a test).

    python -m eval.bench_benchmarks --model TEACHER --senses DICT [--senses DICT_K1 ...] \\
        [--evaldata ../shared/evaldata] [--scws ratings.txt] [--layer L] [--window W] [--shots N] [--out DIR]

Compiles first what the benchmarks run (the packed-row forward, the bucketed forwards of
passages longer than a row, each dictionary's look-ups; :func:`warm_up`), then times each
benchmark with each dictionary. The forward passes of a
benchmark run once per model: a second dictionary on the same data reuses the target states
(:func:`sense_jax.benchmarks.common.encode_targets`), so its time is the look-ups and metrics
alone. Each result records its wall ``seconds``, the process's ``cpu_seconds`` (all threads: on a
shared machine, cpu_seconds / cores estimates the wall time on idle cores) and the load average.
``--window W`` reads W context tokens on each side of a target, ``--shots N`` N CoarseWSD-20
train examples per class (faster, different figures). Writes ``<task>[_<dict name>].json`` and a
markdown summary to ``--out``. SCWS is not in
shared/: pass its ``ratings.txt`` with ``--scws`` (else it is skipped with a message); without
the evaldata folder every task is skipped with a message.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = {"wic": "wic", "coarsewsd20": "coarsewsd20", "wordsim": "wordsim", "wsd": "wsd_raganato/semeval2007"}


def warm_up(bm, batch_size: int, dictionaries=()) -> float:
    """Compile what the benchmarks run: the forward of a packed row batch and of every bucket
    length above it (passages too long for a row), each dictionary's look-up for every metric,
    and import the task modules (scikit-learn, scipy). Returns the seconds it took."""
    import importlib

    import numpy as np

    from sense_jax.batching import DEFAULT_BUCKETS
    from sense_jax.benchmarks import TASKS
    from sense_jax.benchmarks.common import METRICS, ROW_LENGTH, ROW_TOKENS, lookup

    t = time.perf_counter()
    for task in TASKS:
        importlib.import_module(f"sense_jax.benchmarks.{task}")
    R = min(ROW_LENGTH, bm.max_tokens())
    ids = np.zeros((max(1, ROW_TOKENS // R), R), np.int32)
    bm.states(ids, np.ones_like(ids), np.ones_like(ids))
    for L in DEFAULT_BUCKETS:
        if L > bm.max_tokens():
            break
        if L > R:
            ids = np.zeros((batch_size, L), np.int32)
            bm.states(ids, np.ones_like(ids))
    for sd in dictionaries:
        for m in METRICS:
            lookup(sd, np.zeros(1, np.int32), np.zeros((1, sd.hidden_size), np.float32), m)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--senses", action="append", default=[], help="sense dictionary (repeatable)")
    ap.add_argument("--evaldata", default=os.environ.get("SENSE_JAX_EVALDATA") or str(ROOT / ".." / "shared" / "evaldata"))
    ap.add_argument("--scws", default=None, help="SCWS ratings.txt (not in shared/)")
    ap.add_argument("--tasks", default="scws,wic,coarsewsd20,wordsim,wsd")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--window", type=int, default=None,
                    help="context tokens read on each side of a target (default: whole sentences)")
    ap.add_argument("--shots", type=int, default=None, help="coarsewsd20: train examples per class (default all)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "benchmarks"),
                    help="folder for the JSON results (default runs/benchmarks, git-ignored)")
    args = ap.parse_args(argv)

    from sense_jax.benchmarks import evaluate
    from sense_jax.benchmarks.common import load_bench_model, load_senses, render_markdown
    from sense_jax.io_utils import write_json_atomic

    evaldata = Path(args.evaldata)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bm = load_bench_model(args.model, args.layer)
    dicts = {p: load_senses(p, bm) for p in args.senses}
    print(f"compile: {warm_up(bm, args.batch_size, dicts.values()):.1f} s (forward shapes, look-ups, imports)",
          flush=True)
    options = {"batch_size": args.batch_size}
    if args.window is not None:
        options["window"] = args.window
    summary = []
    for task in args.tasks.split(","):
        data = Path(args.scws) if task == "scws" and args.scws else evaldata / PATHS.get(task, task)
        if not data.exists():
            print(f"{task}: skipped, {data} is absent", flush=True)
            continue
        for senses in args.senses or [None]:
            extra = {"shots": args.shots} if task == "coarsewsd20" and args.shots else {}
            t, cpu = time.perf_counter(), time.process_time()
            res = evaluate(task, data, bm, dicts.get(senses), **options, **extra)
            res["seconds"] = time.perf_counter() - t
            # CPU seconds of every thread of this process: on a shared machine the wall time
            # measures the other jobs too; cpu_seconds / cores is the wall time on idle cores.
            res["cpu_seconds"] = time.process_time() - cpu
            res["senses"] = senses
            res["load"] = os.getloadavg()
            name = task + (f"_{Path(senses).name}" if senses else "")
            write_json_atomic(out / f"{name}.json", res)
            md = render_markdown(res) + (f"\n{res['seconds']:.1f} s after compilation, {res['cpu_seconds']:.1f} "
                                         f"CPU s (load average {res['load'][0]:.1f} at the end)\n")
            summary.append(md)
            print(md, flush=True)
    (out / "summary.md").write_text("\n".join(summary), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
