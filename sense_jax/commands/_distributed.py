"""The multi-host options shared by the commands that run on a mesh (``extract``, ``distill``).

Run the same command on every host, adding ``--distributed`` (a cluster that
``jax.distributed.initialize`` detects: Cloud TPU, SLURM, Open MPI, ...) or the explicit
``--coordinator HOST:PORT --num-processes P --process-id I``.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``multi-host`` option group to ``p``."""
    g = p.add_argument_group("multi-host (one command per process)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (auto-detected cluster, or the flags below)")
    g.add_argument("--coordinator", default=None, help="coordinator address HOST:PORT (process 0's host)")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def initialize(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` with the given options, before anything touches a device;
    nothing without ``--distributed`` / ``--coordinator``."""
    if not (args.distributed or args.coordinator):
        return
    import jax  # not at the top: `sense-jax --help` imports this module

    kw = {k: v for k, v in (("coordinator_address", args.coordinator),
                            ("num_processes", args.num_processes),
                            ("process_id", args.process_id)) if v is not None}
    jax.distributed.initialize(**kw)
