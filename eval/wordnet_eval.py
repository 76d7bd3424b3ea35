"""Run the WordNet evaluation suite (sense_jax.evaluation) on given artefacts.

The pipeline's ``evaluate`` stage runs the same suite on its own outputs; this script evaluates
any teacher / dictionaries / exported students:

    python -m eval.wordnet_eval --teacher runs/pipeline/teacher --senses runs/pipeline/senses \
        --senses-k1 runs/pipeline/senses_k1 [--skd runs/pipeline/skd_student] \
        [--mse runs/pipeline/mse_student] [--student-layers 2] [--max-lemmas 200] --out report.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--senses", required=True)
    ap.add_argument("--senses-k1", required=True)
    ap.add_argument("--skd")
    ap.add_argument("--mse")
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--max-lemmas", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the report as JSON here (and .md beside it)")
    args = ap.parse_args(argv)

    from sense_jax import evaluation as ev
    from sense_jax import report
    from sense_jax.io_utils import write_json_atomic

    variants, sd, models = report.build_variants(args.teacher, args.senses, args.senses_k1, args.skd, args.mse,
                                             args.student_layers)
    report = ev.run_suite(variants, sd, models["teacher"].tokenizer,
                          ev.SuiteConfig(max_lemmas=args.max_lemmas or None, n_train=args.n_train,
                                         n_test=args.n_test, seed=args.seed))
    md = ev.render_markdown(report)
    if args.out:
        write_json_atomic(args.out, report)
        args.out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)
    return report


if __name__ == "__main__":
    main()
