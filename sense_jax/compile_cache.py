"""The persistent XLA compilation cache, on by default for every job.

Compiling dominates first runs on small inputs (the k-means programs, one per sample-count
bucket; the training step, one per length bucket; the extraction forward), so every
``sense-jax`` command and the Python entry points that run a job (:class:`~sense_jax.pipeline.Pipeline`,
:func:`sense_jax.trainer.train`, :func:`sense_jax.extract.extract`,
:func:`sense_jax.sense_builder.build_sense_dictionary`) call :func:`enable_compile_cache`, and a second
run of anything reads its programs from disk instead of compiling them (JAX's persistent
compilation cache, ``jax_compilation_cache_dir``).

Where the cache lives, first match wins:

1. the ``path`` given to :func:`enable_compile_cache` (``sense-jax ... --compile-cache DIR``);
2. the environment variable ``SENSE_JAX_COMPILE_CACHE``: a directory, or one of ``0``, ``off``,
   ``false``, ``no``, ``none`` (or empty) to turn the cache off (``--no-compile-cache`` sets it
   to ``0`` for the command and anything it starts);
3. a directory JAX was already told about (``JAX_COMPILATION_CACHE_DIR``, or
   ``jax.config.update("jax_compilation_cache_dir", ...)`` by the caller);
4. the per-user cache directory of the XDG Base Directory convention:
   ``$XDG_CACHE_HOME/sense_jax/jax``, else ``~/.cache/sense_jax/jax``.

The cache is trusted code (JAX's warning: whoever can write to it can run code in your process),
so it is per-user and created with mode 0700. It is never pruned (JAX's
``jax_compilation_cache_max_size`` can bound it); deleting the directory is always safe.
Programs that compile in under :data:`MIN_COMPILE_SECS` are not written (reading a cache entry
costs a few milliseconds, about what compiling them does) unless
``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise. The test suite points the cache at a
temporary directory (``tests/conftest.py``), so tests never write to the user's home.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "SENSE_JAX_COMPILE_CACHE"
OFF = ("", "0", "off", "false", "no", "none")
MIN_COMPILE_SECS = 0.1  # jax's default (1 s) would skip most k-means bucket programs (~0.3-1 s)


def default_cache_dir() -> Path:
    """The per-user cache directory: ``$XDG_CACHE_HOME/sense_jax/jax`` when XDG_CACHE_HOME is an
    absolute path (the XDG spec ignores relative ones), else ``~/.cache/sense_jax/jax``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "sense_jax" / "jax"


def resolve_cache_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The directory :func:`enable_compile_cache` would use (the order in the module docstring),
    or None when ``SENSE_JAX_COMPILE_CACHE`` turns the cache off. Reads the environment and
    JAX's config; changes nothing."""
    if path is not None:
        return Path(path).expanduser()
    if ENV in os.environ:
        value = os.environ[ENV].strip()
        return None if value.lower() in OFF else Path(value).expanduser()

    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    return default_cache_dir()


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn JAX's persistent compilation cache on for this process; idempotent.

    Args:
      path: cache directory; None: ``SENSE_JAX_COMPILE_CACHE``, JAX's own setting, or the
        per-user directory (module docstring).

    Returns:
      The directory used, or None when the environment turns the cache off (then the cache is
      off for the process, JAX's own setting included: :func:`disable_compile_cache`).

    Takes effect for every program compiled afterwards, also when called after JAX has
    compiled (a cache already opened elsewhere is closed and this one opened). A directory that
    cannot be created is not an error: JAX then warns and compiles as without a cache.
    """
    where = resolve_cache_dir(path)
    if where is None:
        disable_compile_cache()
        return None
    try:
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        pass  # JAX warns on first use and falls back to compiling
    where = where.resolve()
    _reset_open_cache(str(where))
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_enable_compilation_cache", True)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's choice wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    return where


def disable_compile_cache() -> None:
    """Turn the persistent compilation cache off for this process (later programs are compiled,
    not read or written), whatever JAX's own setting."""
    _reset_open_cache(None)
    jax.config.update("jax_enable_compilation_cache", False)


def _reset_open_cache(where: str | None) -> None:
    # JAX decides once per process, at the first compile, whether the cache is on, and opens its
    # directory once; moving the directory or turning the cache back on afterwards needs that
    # state cleared (jax._src: there is no public API for it).
    try:
        from jax._src import compilation_cache as cc  # private, may move: imported where it is guarded

        if where is None:  # turning it off: forget that the cache was found on
            stale = cc._cache_checked and cc._cache_used
        else:  # moving it, or turning it back on
            stale = (cc._cache_initialized and jax.config.jax_compilation_cache_dir != where) \
                or (cc._cache_checked and not cc._cache_used)
        if stale:
            cc.reset_cache()
    except (ImportError, AttributeError):
        pass
