"""What produced an artefact: library versions and devices, recorded in every artefact's metadata.

Checkpoints (``meta``), extraction stores and sense dictionaries (``meta.json``) and exports
(``adaptor.json``) hold ``"provenance": provenance()``. A checkpoint restored under another
*major* version of one of these libraries warns once per process, naming both versions
(:func:`check_provenance`): numerics and file formats may have changed, yet the artefact may well
still be right, so it is not refused.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from typing import Callable

import jax

import sense_jax

# Distribution names whose versions are recorded (pip names, as importlib.metadata knows them).
PACKAGES = ("sense_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy")

_warned: set[tuple[str, str, str]] = set()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        if dist == "sense_jax":  # run from a source tree without an install

            return sense_jax.__version__
        return None


def provenance() -> dict:
    """``{"versions": {package: version or None}, "device_kind": str, "device_count": int,
    "process_count": int, "platform": str}`` of this process (JSON-ready).

    Device count and kind are the global ones (all processes of a multi-host run).
    """
    devices = jax.devices()
    return {"versions": {p: _version(p) for p in PACKAGES},
            "device_kind": devices[0].device_kind, "device_count": len(devices),
            "process_count": jax.process_count(), "platform": devices[0].platform}


def _major(version: str) -> str:
    """The major version: the first component, or ``0.x`` for 0-major releases (semver: a 0.x
    minor bump may break, and jax, flax and optax are all 0.x)."""
    parts = version.split(".")
    return ".".join(parts[:2]) if parts[0] == "0" and len(parts) > 1 else parts[0]


def check_provenance(recorded: dict | None, what: str, *,
                     warn: Callable[[str], None] | None = None) -> list[str]:
    """Warn (once per process per package and version pair) where ``recorded``'s major version of
    a package differs from this process's.

    Args:
      recorded: an artefact's ``provenance`` dict (None or {} for artefacts that predate it).
      what: the artefact, for the message (e.g. the checkpoint directory).
      warn: where a message goes (default :func:`warnings.warn`).

    Returns:
      The messages of this call (also those already warned once, so callers can test).
    """
    if not recorded:
        return []
    now = provenance()["versions"]
    messages = []
    for pkg, then in (recorded.get("versions") or {}).items():
        current = now.get(pkg)
        if not then or not current or _major(str(then)) == _major(current):
            continue
        msg = f"{what} was written with {pkg} {then}, this process has {pkg} {current}"
        messages.append(msg)
        key = (pkg, str(then), current)
        if key not in _warned:
            _warned.add(key)
            (warn or (lambda m: warnings.warn(m, stacklevel=3)))(msg)
    return messages
