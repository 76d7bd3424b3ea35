"""Choose the p(sense | context) temperatures, never on the set they are used on (not a test).

    python -m eval.choose_temperature --model TEACHER --senses DICT [--wic ../shared/evaldata/wic]
    python -m eval.choose_temperature --model TEACHER --senses DICT --wsd [--n 500]

SCWS: for each temperature of the grid, the AvgSimC similarity of the two occurrences of every WiC
train pair is thresholded at its most accurate value on train; prints the train accuracy per
temperature and the best one (the value of ``sense_jax.benchmarks.scws.TEMPERATURE``).

WSD (``--wsd``): WordNet's own usage examples of polysemous lemmas (``--n`` drawn with seed 0),
each against gloss-only vectors of its lemma's synsets; prints the mean log-likelihood of the
example's synset per similarity and temperature, and the best temperature of each (the values of
``sense_jax.benchmarks.wsd.TEMPERATURES``). Reads no evaluation data.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def main(argv=None) -> int:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--senses", required=True)
    ap.add_argument("--wic", default=str(Path(os.environ.get("SENSE_JAX_EVALDATA")
                                              or root / ".." / "shared" / "evaldata") / "wic"))
    ap.add_argument("--wsd", action="store_true", help="choose the WSD temperatures on WordNet examples")
    ap.add_argument("--n", type=int, default=500, help="--wsd: held-out usage examples")
    args = ap.parse_args(argv)
    import numpy as np

    from sense_jax.benchmarks import common, wic

    if args.wsd:
        from sense_jax.benchmarks import wsd

        bm = common.load_bench_model(args.model)
        table = wsd.choose_temperatures(bm, common.load_senses(args.senses, bm), n=args.n)
        for name, ll in table.items():
            best = max(ll, key=ll.get)
            print(f"{name}: " + ", ".join(f"{t}: {v:.3f}" for t, v in ll.items()) + f"; best {best}", flush=True)
        return 0
    if not Path(args.wic).is_dir():
        print(f"skipped: {args.wic} is absent")
        return 0
    bm = common.load_bench_model(args.model)
    sd = common.load_senses(args.senses, bm)
    pairs = wic.read_wic(*wic.split_files(args.wic, "train"))
    y = np.array([p.label for p in pairs])
    best = None
    for tau in GRID:
        s = wic.similarities(bm, sd, pairs, temperature=tau)["avg_sim_c"]
        ok = ~np.isnan(s)
        _, acc = wic.best_threshold(s[ok], y[ok])
        print(f"temperature {tau}: WiC train accuracy {100 * acc:.2f}", flush=True)
        if best is None or acc > best[1]:
            best = (tau, acc)
    print(f"best temperature: {best[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
