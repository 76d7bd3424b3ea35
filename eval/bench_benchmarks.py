"""Run and time every public sense benchmark on one model, after compilation (not a test).

    python -m eval.bench_benchmarks --model TEACHER --senses DICT [--senses DICT_K1 ...] \\
        [--evaldata ../shared/evaldata] [--scws ratings.txt] [--layer L] [--out DIR]

Compiles the model's forward for every bucket length the data needs first (a warm-up pass of
one batch per length), then times each benchmark with each dictionary. The forward passes of a
benchmark run once per model: a second dictionary on the same data reuses the target states
(:func:`sense_jax.benchmarks.common.encode_targets`), so its time is the look-ups and metrics
alone. Writes ``<task>[_<dict name>].json`` and a markdown summary to ``--out``. SCWS is not in
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


def warm_up(bm, batch_size: int) -> float:
    """Compile the forward for every bucket length; returns the seconds it took."""
    import numpy as np

    from sense_jax.batching import DEFAULT_BUCKETS

    t = time.perf_counter()
    for L in DEFAULT_BUCKETS:
        if L > bm.max_tokens():
            break
        ids = np.zeros((batch_size, L), np.int32)
        bm.states(ids, np.ones_like(ids))
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
    ap.add_argument("--out", default=str(ROOT / "runs" / "benchmarks"),
                    help="folder for the JSON results (default runs/benchmarks, git-ignored)")
    args = ap.parse_args(argv)

    from sense_jax.benchmarks import evaluate
    from sense_jax.benchmarks.common import load_bench_model, render_markdown
    from sense_jax.io_utils import write_json_atomic

    evaldata = Path(args.evaldata)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bm = load_bench_model(args.model, args.layer)
    print(f"compile: {warm_up(bm, args.batch_size):.1f} s for every bucket length", flush=True)
    summary = []
    for task in args.tasks.split(","):
        data = Path(args.scws) if task == "scws" and args.scws else evaldata / PATHS.get(task, task)
        if not data.exists():
            print(f"{task}: skipped, {data} is absent", flush=True)
            continue
        for senses in args.senses or [None]:
            t = time.perf_counter()
            res = evaluate(task, data, bm, senses, batch_size=args.batch_size)
            res["seconds"] = time.perf_counter() - t
            name = task + (f"_{Path(senses).name}" if senses else "")
            write_json_atomic(out / f"{name}.json", res)
            md = render_markdown(res) + f"\n{res['seconds']:.1f} s after compilation\n"
            summary.append(md)
            print(md, flush=True)
    (out / "summary.md").write_text("\n".join(summary), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
