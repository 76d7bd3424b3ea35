"""The persistent compilation cache: on by default, per user, movable and off by option/env."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sense_jax.compile_cache import (ENV, default_cache_dir, disable_compile_cache, enable_compile_cache,
                                     resolve_cache_dir)
from sense_jax.store import write_store

# A `sense-jax` command in a fresh process, counting JAX's persistent-cache hits and misses.
CHILD = """
import sys
import jax.monitoring as m
events = []
m.register_event_listener(lambda e, **kw: events.append(e))
from sense_jax.cli import main
rc = main(sys.argv[1:])
print("HITS", events.count("/jax/compilation_cache/cache_hits"),
      "MISSES", events.count("/jax/compilation_cache/cache_misses"))
sys.exit(rc)
"""


def test_cache_directory_follows_option_env_jax_and_xdg(monkeypatch, tmp_path):
    """Order: explicit path > SENSE_JAX_COMPILE_CACHE (a path, or off) > JAX's own setting >
    $XDG_CACHE_HOME/sense_jax/jax (absolute only) > ~/.cache/sense_jax/jax."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "sense_jax" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec ignores relative paths
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "sense_jax" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "sense_jax" / "jax"

    saved = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.delenv(ENV)
        assert resolve_cache_dir() == tmp_path / "xdg" / "sense_jax" / "jax"
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jaxdir"))
        assert resolve_cache_dir() == tmp_path / "jaxdir"
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)
    monkeypatch.setenv(ENV, str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    for off in ("0", "off", "False", "no", "none", ""):
        monkeypatch.setenv(ENV, off)
        assert resolve_cache_dir() is None, off


def test_suite_never_uses_the_home_cache():
    """tests/conftest.py points every job of the suite at a temporary directory."""
    where = resolve_cache_dir()
    assert where is not None and not where.is_relative_to(Path.home() / ".cache")


def test_enable_moves_and_disable_stops_the_cache(tmp_path):
    """In one process: programs go to the enabled directory, also after JAX has compiled and
    after the directory moves; once disabled, nothing more is written."""
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
             os.environ[ENV])
    try:
        x = jnp.arange(7.0)
        jax.jit(lambda v: v + 1)(x).block_until_ready()  # JAX has compiled before the call
        for name, fn in (("a", lambda v: v * 3 - 1), ("b", lambda v: jnp.sin(v) * 5)):
            assert enable_compile_cache(tmp_path / name) == (tmp_path / name).resolve()
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # tiny programs too
            jax.jit(fn)(x).block_until_ready()
            assert any((tmp_path / name).iterdir()), name
        written = set((tmp_path / "b").iterdir())
        disable_compile_cache()
        jax.jit(lambda v: jnp.cos(v) + 2)(x).block_until_ready()
        os.environ[ENV] = "0"  # the environment turns it off too, whatever the caller asks
        assert enable_compile_cache() is None
        jax.jit(lambda v: jnp.tan(v) + 2)(x).block_until_ready()
        assert set((tmp_path / "b").iterdir()) == written
    finally:
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
        os.environ[ENV] = saved[2]


def _store(path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = np.array([0, 20, 2])  # one clustered token: one bucket, few programs
    vec = rng.normal(size=(int(n.sum()), 8)).astype(np.float32)
    return write_store(path, vec, np.concatenate([[0], np.cumsum(n)]), n, np.zeros((vec.shape[0], 2)),
                       {"teacher": "synthetic"})


def _cluster(store: Path, out: Path, env: dict, *extra: str) -> tuple[int, int]:
    proc = subprocess.run([sys.executable, "-c", CHILD, "cluster", str(store), str(out), "--k", "2",
                           "--cpu-devices", "1", "--no-progress", *extra],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    return int(words[words.index("HITS") + 1]), int(words[words.index("MISSES") + 1])


def test_cluster_second_run_reads_the_per_user_cache(tmp_path):
    """A fresh process with no option and no env writes the per-user cache under $HOME; the
    second run reads every program the first wrote from it, and writes the same bytes."""
    store = _store(tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "XDG_CACHE_HOME", "JAX_COMPILATION_CACHE_DIR")}
    env.update(HOME=str(tmp_path / "home"), JAX_PLATFORMS="cpu")
    cache = tmp_path / "home" / ".cache" / "sense_jax" / "jax"
    hits, misses = _cluster(store, tmp_path / "d1", env)
    assert hits == 0 and misses > 0 and any(cache.iterdir())
    entries = set(cache.iterdir())
    hits, _ = _cluster(store, tmp_path / "d2", env)
    assert hits >= len(entries) > 0
    assert (tmp_path / "d1" / "senses.safetensors").read_bytes() == (tmp_path / "d2" / "senses.safetensors").read_bytes()


def test_no_compile_cache_option_turns_it_off(tmp_path):
    """--no-compile-cache: nothing read or written, not even to a directory JAX was given."""
    store = _store(tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "XDG_CACHE_HOME")}
    env.update(HOME=str(tmp_path / "home"), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"))
    assert _cluster(store, tmp_path / "d1", env, "--no-compile-cache") == (0, 0)
    assert not (tmp_path / "home").exists() and not (tmp_path / "jax").exists()
