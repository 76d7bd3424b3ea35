"""``sense-jax export SRC OUT``: a distilled student, or a converted model, -> a transformers model directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = ("export a distilled student (run directory or checkpoints/) or a converted model directory "
        "to a transformers model directory")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="run directory of sense-jax distill (or its checkpoints/ directory), a task run "
                                "(sense-jax finetune / distill with a task: its best checkpoint), or a "
                                "sense-jax convert directory (a sequence classification head is kept)")
    p.add_argument("out", help="output directory: config.json, model.safetensors, tokenizer, adaptor")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    # The library (JAX, models) is imported when the command runs: `sense-jax --help` imports every command module.
    from sense_jax import trainer
    from sense_jax.convert import METADATA_FILE
    from sense_jax.hf_export import export_model
    from sense_jax.io_utils import check_out_spares_sources

    check_out_spares_sources(args.out, args.ckpt)
    if (Path(args.ckpt) / METADATA_FILE).is_file():  # a converted model, not a run directory
        out = export_model(args.ckpt, args.out, overwrite=args.overwrite)
        arch = json.loads((Path(out) / "config.json").read_text(encoding="utf-8")).get("architectures") or ["?"]
        loader = "AutoModelForSequenceClassification" if arch[0].endswith("ForSequenceClassification") else "AutoModel"
        print(f"exported {args.ckpt} -> {out} (transformers {arch[0]}; load with {loader})")
        return 0
    if (Path(args.ckpt) / "best").is_dir():  # a task run (sense-jax finetune, or distill with a task)
        from sense_jax.errors import ConfigError
        from sense_jax.task_train import export_task

        if args.step is not None:
            raise ConfigError(f"{args.ckpt}: a task run exports its best checkpoint (best/); --step is not taken")
        out = export_task(args.ckpt, args.out, overwrite=args.overwrite)
        kind = ("AutoModel + adaptor.safetensors + head.safetensors" if (out / "head.safetensors").exists()
                else "AutoModelForSequenceClassification")
        print(f"exported the best checkpoint of {args.ckpt} -> {out} ({kind})")
        return 0
    out = trainer.export_checkpoint(args.ckpt, args.out, step=args.step, overwrite=args.overwrite)
    print(f"exported {args.ckpt} -> {out} (transformers AutoModel directory + adaptor.safetensors)")
    return 0
