"""``sense-jax extract MODEL CORPUS OUT``: per-token uniform samples of teacher hidden states."""

from __future__ import annotations

import argparse

from sense_jax.commands import _distributed
from sense_jax.io_utils import read_json

HELP = "sample teacher hidden states per token id over a corpus into an extraction store"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="teacher: a sense_jax model directory or a transformers directory")
    p.add_argument("corpus", help="text file (one passage per line), JSONL, .gz, a directory of "
                                  "them, or a saved `datasets` dataset")
    p.add_argument("out", help="output store directory (work in progress: OUT.partial/)")
    p.add_argument("-n", "--n-per-token", type=int, default=1000,
                   help="sample size cap N per token id (default 1000, the paper's)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="passages per device per step (default 32); keep it fixed across "
                        "resumptions and device counts for identical bytes")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="stored vector dtype (default float32)")
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="teacher compute dtype (default float32)")
    p.add_argument("--layer", type=int, default=-1,
                   help="hidden-state index (0 = embeddings, -1 = last layer; default -1)")
    p.add_argument("--text-field", default="text", help="JSONL key / dataset column (default text)")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate passages to this many tokens (default: the model's maximum)")
    p.add_argument("--window", type=int, default=8192,
                   help="passages per resumption unit (default 8192)")
    p.add_argument("--pack", action="store_true",
                   help="pack several passages per row (at most two compiled programs, less padding; "
                        "vectors equal the unpacked run's within float rounding, and the store "
                        "records packed: true)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a complete store at OUT made with other settings (only an "
                        "extraction store or an empty directory; never one holding the corpus or teacher)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _distributed.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    # The library (JAX, models) is imported when the command runs: `sense-jax --help` imports every command module.
    import jax

    from sense_jax.errors import ConfigError

    for flag, value in (("--batch-size", args.batch_size), ("--window", args.window)):
        if value < 1:  # the library names its arguments; the user typed flags
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    _distributed.initialize(args)

    from sense_jax.extract import extract, summary_lines

    out = extract(args.model, args.corpus, args.out, n_per_token=args.n_per_token, seed=args.seed,
                  batch_size=args.batch_size, dtype=args.dtype, layer=args.layer,
                  compute_dtype=args.compute_dtype,
                  text_field=args.text_field, max_length=args.max_length,
                  window_passages=args.window, overwrite=args.overwrite,
                  progress=not args.no_progress, pack=args.pack)
    if jax.process_index() == 0:
        meta = read_json(out / "meta.json")
        print(f"extracted {args.corpus} with {args.model} -> {out}")
        for line in summary_lines(meta):
            print("  " + line)
    return 0
