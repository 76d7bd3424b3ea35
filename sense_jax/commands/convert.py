"""``sense-jax convert SRC OUT``: a transformers checkpoint -> a sense_jax model directory."""

from __future__ import annotations

import argparse

HELP = "convert a transformers checkpoint (directory or hub id) to a sense_jax model directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="transformers model directory (config.json + weights) or hub id")
    p.add_argument("out", help="output directory (Orbax params + config + tokenizer files)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from sense_jax.convert import convert
    from sense_jax.io_utils import read_json

    out = convert(args.src, args.out, overwrite=args.overwrite)
    meta = read_json(out / "sense_jax.json")
    print(f"converted {args.src} -> {out}: {meta['family']} ({meta['model_type']}), "
          f"{meta['param_count']:,} params"
          + (f", skipped {len(meta['skipped_tensors'])} buffer/head tensor(s)" if meta["skipped_tensors"] else ""))
    return 0
