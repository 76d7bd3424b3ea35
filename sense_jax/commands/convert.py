"""``sense-jax convert SRC OUT``: a transformers checkpoint -> a sense_jax model directory."""

from __future__ import annotations

import argparse
import warnings

from sense_jax.io_utils import read_json

HELP = "convert a transformers checkpoint (directory or hub id) to a sense_jax model directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="transformers model directory (config.json + weights) or hub id")
    p.add_argument("out", help="output directory (Orbax params + config + tokenizer files)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--adapter", action="append", metavar="DIR",
                   help="PEFT LoRA adapter directory merged into the weights (repeat to merge several "
                        "in order, e.g. LLM2Vec's MNTP then supervised adapter)")
    p.add_argument("--bidirectional", action="store_true",
                   help="decoders (llama/mistral/qwen2): drop the causal mask, as LLM2Vec runs them")
    p.add_argument("--pooling", choices=("mean", "weighted_mean", "last_token", "first_token"),
                   help="decoders: sentence pooling mode recorded in the config (LLM2Vec: mean)")


def run(args: argparse.Namespace) -> int:
    # The library (JAX, models) is imported when the command runs: `sense-jax --help` imports every command module.
    from sense_jax.convert import ConversionNote, convert
    from sense_jax.io_utils import check_out_spares_sources

    check_out_spares_sources(args.out, args.src, *(args.adapter or []))
    overrides = {}
    if args.bidirectional:
        overrides["causal"] = False
    if args.pooling:
        overrides["pooling"] = args.pooling
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionNote)  # printed below as one line each
        out = convert(args.src, args.out, overwrite=args.overwrite, adapter=args.adapter,
                      config_overrides=overrides or None)
    meta = read_json(out / "sense_jax.json")
    print(f"converted {args.src} -> {out}: {meta['family']} ({meta['model_type']}), "
          f"{meta['param_count']:,} params"
          + (f", sequence classification head ({meta['config']['num_labels']} labels)"
             if (meta["config"].get("num_labels") or 0) > 0 else "")
          + (f", skipped {len(meta['skipped_tensors'])} buffer/head tensor(s)" if meta["skipped_tensors"] else "")
          + "".join(f", merged adapter {a['adapter']} ({a['merged_modules']} modules)"
                    for a in meta.get("merged_adapters") or []))
    for note in meta.get("notes") or []:
        print(f"note: {note}")
    return 0
