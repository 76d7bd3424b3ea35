"""The ``sense-jax`` command line.

Each subcommand lives in ``sense_jax/commands/<name>.py`` and provides ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; heavy imports happen inside ``run`` so that
``sense-jax --help`` stays fast. Bad input (:class:`~sense_jax.errors.SenseJaxError`) prints one
``error:`` line and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sense-jax",
        description="Multi-sense embeddings and sense knowledge distillation in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sense_jax.errors import SenseJaxError

    try:
        return int(args._run(args) or 0)
    except SenseJaxError as e:
        print(f"sense-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sense-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
