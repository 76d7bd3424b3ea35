"""``sense-jax inspect TOKEN --dict D --store S``: a token's senses, each with its nearest contexts."""

from __future__ import annotations

import argparse

from sense_jax.errors import SenseJaxError

HELP = "show a token's senses, each with the corpus contexts nearest to it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("token", help="a token of the teacher's vocabulary (e.g. bank), or #ID for a token id")
    p.add_argument("--dict", required=True, dest="sense_dict", help="sense dictionary directory")
    p.add_argument("--store", required=True, help="extraction store the dictionary was built from")
    p.add_argument("--corpus", help="corpus the store was extracted from (default: from the store's metadata)")
    p.add_argument("--teacher", help="teacher directory for the tokenizer (default: from the store's metadata)")
    p.add_argument("--contexts", type=int, default=3, help="contexts shown per sense")
    p.add_argument("--metric", choices=("dot", "cos", "l2"),
                   help="look-up metric (default: the dictionary's; l2 shows the k-means clusters themselves)")


def run(args: argparse.Namespace) -> int:
    # The library (JAX, models) is imported when the command runs: `sense-jax --help` imports every command module.
    from sense_jax.inspection import format_senses, token_senses

    if args.contexts < 0:
        raise SenseJaxError(f"--contexts must be >= 0, got {args.contexts}")
    report = token_senses(args.token, args.sense_dict, args.store, corpus=args.corpus,
                          teacher=args.teacher, contexts=args.contexts, metric=args.metric)
    print(format_senses(report))
    return 0
