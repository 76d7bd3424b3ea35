"""``sense-jax cluster STORE OUT``: cluster an extraction store into a sense dictionary."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from sense_jax.errors import SenseJaxError

HELP = "cluster each token's stored hidden states into senses (k-means) -> a sense dictionary"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="extraction store directory (from `sense-jax extract`)")
    p.add_argument("out", help="output sense dictionary directory (senses.safetensors + meta.json)")
    p.add_argument("--k", type=int, default=10, help="senses per token (K_max with --adaptive); default 10")
    p.add_argument("--adaptive", choices=("bic",), default=None,
                   help="pick K_t <= K per token by X-means BIC (Pelleg & Moore 2000)")
    p.add_argument("--k-min", type=int, default=1, help="smallest K_t the adaptive rule may pick")
    p.add_argument("--seed", type=int, default=0, help="k-means++ seed (same seed -> same bytes)")
    p.add_argument("--max-iter", type=int, default=100, help="Lloyd iteration cap (default 100)")
    p.add_argument("--tol", type=float, default=1e-4, help="relative centre-shift tolerance (sklearn's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "int8"), default="float32",
                   help="storage dtype of the centres (int8: per-sense scales, 1/4 of float32)")
    p.add_argument("--metric", choices=("dot", "cos", "l2"), default="dot",
                   help="look-up metric recorded for nearest_sense (paper: dot)")
    p.add_argument("--spherical", action="store_true",
                   help="spherical (cosine) k-means: unit-length samples, centres = mean directions "
                        "(agrees with a cos look-up; default: Euclidean k-means, the paper's)")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="tokens per device per k-means chunk (default: sized to --memory-gb)")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="on a CPU-only machine, split the CPU into this many JAX devices and shard "
                        "tokens over them (default: one per core; 1 = a single device)")
    p.add_argument("--memory-gb", type=float, default=1.0, help="working-memory budget per chunk")
    p.add_argument("--add-to", metavar="DICT", default=None,
                   help="existing dictionary to add to: the store's tokens replace its entries; "
                        "refused when the store comes from another teacher, tokenizer or layer")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is a sense dictionary (or an empty directory); never the "
                        "store or another directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def use_cpu_devices(n: int | None) -> None:
    """One JAX CPU device per core (or ``n``) unless XLA_FLAGS already sets a count.

    The k-means programs run on about one core per device, so this is what lets tokens use
    every core. Only the CPU platform is affected (accelerators keep their devices).

    Raises:
      SenseJaxError: n < 1, or JAX's backends were initialised before the call.
    """
    import jax  # not at the top: `sense-jax --help` imports this module

    if n is not None and n < 1:
        raise SenseJaxError(f"--cpu-devices must be >= 1, got {n}")
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", n or os.cpu_count() or 1)
    except RuntimeError as e:  # backends already initialised in this process
        if n is not None:
            raise SenseJaxError(f"--cpu-devices {n}: {e}") from None


def run(args: argparse.Namespace) -> int:
    # The library (JAX, models) is imported when the command runs: `sense-jax --help` imports every command module.
    from sense_jax.sense_builder import ClusterSettings, build_with_settings
    from sense_jax.io_utils import check_out_spares_sources, check_replaceable
    from sense_jax.sense_dict import SenseDictionary, is_dictionary_dir
    from sense_jax.store import open_store

    import jax

    if not (math.isfinite(args.memory_gb) and args.memory_gb > 0):
        raise SenseJaxError(f"--memory-gb must be a finite number > 0, got {args.memory_gb}")
    if args.max_iter < 1:  # the library accepts 0 (k-means++ only); the command asks for Lloyd steps
        raise SenseJaxError(f"--max-iter must be >= 1, got {args.max_iter}")
    # every k-means setting checked here, once, by the same object the library uses
    settings = ClusterSettings(
        k=args.k, adaptive=args.adaptive, k_min=args.k_min, max_iter=args.max_iter, tol=args.tol,
        chunk_tokens=args.chunk_tokens, memory_budget=int(args.memory_gb * (1 << 30)), dtype=args.dtype,
        metric=args.metric, spherical=args.spherical, option_names=True)
    use_cpu_devices(args.cpu_devices)
    out = Path(args.out)
    # Replacing OUT deletes what it holds: never the store being read, nor (unless OUT is the
    # dictionary added to, read whole before the write) the dictionary added to.
    check_out_spares_sources(out, args.store)
    if args.add_to and Path(args.add_to).resolve() != out.resolve():
        check_out_spares_sources(out, args.add_to)
    if out.exists() and not args.overwrite:  # fail before the (long) clustering
        raise SenseJaxError(f"{out} already exists; pass --overwrite to replace it")
    check_replaceable(out, is_dictionary_dir, "a sense dictionary")
    store = open_store(args.store)
    base = SenseDictionary.load(args.add_to) if args.add_to else None
    sd = build_with_settings(store, settings, seed=args.seed, base=base, progress=not args.no_progress)
    sd.save(out, dtype=args.dtype, overwrite=args.overwrite)
    st = sd.meta["stats"]
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"clustered {st['tokens_clustered']:,} of {st['tokens']:,} tokens (K={args.k}"
          f"{', adaptive ' + args.adaptive if args.adaptive else ''}"
          f"{', spherical' if args.spherical else ''}) -> {out}: "
          f"{int(sd.centres.shape[0]):,} senses in all"
          f"{' (after adding to ' + args.add_to + ')' if base is not None else ''}, "
          f"mean inertia {st['mean_inertia']:.4g}, {sd.dtype}, {size:,} bytes; "
          f"{jax.local_device_count()} {jax.default_backend()} device(s)")
    return 0
