"""Subcommands of the ``sense-jax`` CLI (see :mod:`sense_jax.cli`)."""
