"""The ``sense-jax`` command line.

Each subcommand lives in ``sense_jax/commands/<name>.py`` and provides ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; heavy imports happen inside ``run`` so that
``sense-jax --help`` stays fast. Bad input (:class:`~sense_jax.errors.SenseJaxError`) prints one
``error:`` line and exits with status 2, without a traceback.

Every subcommand takes ``--compile-cache DIR`` / ``--no-compile-cache``: JAX's persistent
compilation cache is on by default (:mod:`sense_jax.compile_cache`), set here once, before the
command runs, and passed on through ``SENSE_JAX_COMPILE_CACHE`` to the library calls and the
processes the command starts.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sense_jax.errors import SenseJaxError

# Subcommand name -> module. Later stages add one line each.
COMMANDS = {
    "convert": "sense_jax.commands.convert",
    "extract": "sense_jax.commands.extract",
    "distill": "sense_jax.commands.distill",
    "export": "sense_jax.commands.export",
    "cluster": "sense_jax.commands.cluster",
    "pipeline": "sense_jax.commands.pipeline",
    "inspect": "sense_jax.commands.inspect",
    "evaluate": "sense_jax.commands.evaluate",
    "finetune": "sense_jax.commands.finetune",
    "evaluate-task": "sense_jax.commands.evaluate_task",
}


def add_compile_cache_arguments(p: argparse.ArgumentParser) -> None:
    """``--compile-cache DIR`` and ``--no-compile-cache``, shared by every subcommand."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile-cache", metavar="DIR", default=None,
                   help="persistent XLA compilation cache directory (default: $SENSE_JAX_COMPILE_CACHE, "
                        "else $XDG_CACHE_HOME/sense_jax/jax or ~/.cache/sense_jax/jax): "
                        "later runs read their compiled programs instead of compiling")
    g.add_argument("--no-compile-cache", action="store_true",
                   help="neither read nor write the compilation cache (same as SENSE_JAX_COMPILE_CACHE=0)")


def setup_compile_cache(args: argparse.Namespace) -> None:
    """Apply the compile-cache options for this process and whatever it starts (through
    ``SENSE_JAX_COMPILE_CACHE``, which the library's own calls read)."""
    from sense_jax.compile_cache import ENV, enable_compile_cache  # imports JAX: not for --help

    if getattr(args, "no_compile_cache", False):
        os.environ[ENV] = "0"
    elif getattr(args, "compile_cache", None):
        os.environ[ENV] = os.path.abspath(os.path.expanduser(args.compile_cache))
    where = enable_compile_cache()
    if where is not None:
        os.environ[ENV] = str(where)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sense-jax",
        description="Multi-sense embeddings and sense knowledge distillation in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        add_compile_cache_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        setup_compile_cache(args)
        return int(args._run(args) or 0)
    except SenseJaxError as e:
        print(f"sense-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sense-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
