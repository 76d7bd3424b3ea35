"""``sense-jax export CKPT OUT``: a distilled student -> a transformers model directory."""

from __future__ import annotations

import argparse

HELP = "export a distilled student (run directory or checkpoints/) to a transformers model directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="run directory of sense-jax distill (or its checkpoints/ directory)")
    p.add_argument("out", help="output directory: config.json, model.safetensors, tokenizer, adaptor")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from sense_jax import trainer

    out = trainer.export_checkpoint(args.ckpt, args.out, step=args.step, overwrite=args.overwrite)
    print(f"exported {args.ckpt} -> {out} (transformers AutoModel directory + adaptor.safetensors)")
    return 0
