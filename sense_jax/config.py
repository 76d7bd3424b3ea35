"""Run configuration as data: a frozen dataclass, a file (JSON/YAML), ``key=value`` overrides.

Every run config in sense_jax (``DistillConfig``, ``PipelineConfig``) is a frozen dataclass of
scalars; :func:`load_config` resolves ``preset -> file -> overrides`` and refuses unknown keys
(naming them, with the closest known key) and values of the wrong type.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from sense_jax.errors import ConfigError

C = TypeVar("C")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def check_known(cls, keys, where: str) -> None:
    """Raise ConfigError naming every key of ``keys`` that ``cls`` lacks."""
    fields = _fields(cls)
    bad = [k for k in keys if k not in fields]
    if bad:
        hints = []
        for k in bad:
            close = difflib.get_close_matches(k, fields, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{where}: unknown config key(s) {', '.join(hints)}")


def coerce(cls, key: str, value: Any, where: str) -> Any:
    """Check/convert ``value`` to the type of field ``key`` of ``cls``; strings are parsed.

    Raises:
      ConfigError: ``value`` is not of the field's type, or is a non-finite float (inf, nan:
        no float setting of sense_jax takes one).
    """
    typ = _fields(cls)[key].type
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if typ == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if typ == "int":
            if isinstance(value, bool):
                raise ValueError
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError
            f = float(value)
            if not math.isfinite(f):  # inf / nan pass every range check (nan fails them misleadingly)
                raise ConfigError(f"{where}: {key}={value!r} must be a finite number")
            return f
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ValueError
        return str(value)
    except (ValueError, TypeError, OverflowError):
        raise ConfigError(f"{where}: {key}={value!r} is not a valid {typ}") from None


def read_config_file(path: str | os.PathLike) -> dict:
    """A mapping from a ``.json`` / ``.yaml`` / ``.yml`` file (ConfigError naming the file)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config file {p}: {e.strerror or e}") from None
    yaml_file = p.suffix in (".yaml", ".yml")
    try:
        if yaml_file:
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:
        raise ConfigError(f"config file {p} is not valid {'YAML' if yaml_file else 'JSON'} "
                          f"({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of config keys")
    return data


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> C:
    """Resolve ``cls(**(base | file | overrides))``.

    Args:
      cls: a dataclass whose fields are str / int / float / bool.
      path: optional JSON or YAML file with a mapping of keys.
      overrides: ``"key=value"`` strings (the CLI's ``--set``), applied last.
      base: starting values (a preset).

    Raises:
      ConfigError: unknown key, malformed override, wrong type, unreadable file.
    """
    values: dict[str, Any] = dict(base or {})
    if path is not None:
        data = read_config_file(path)
        check_known(cls, data, f"config file {path}")
        values.update({k: coerce(cls, k, v, f"config file {path}") for k, v in data.items()})
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        check_known(cls, [key], "--set")
        values[key] = coerce(cls, key, value.strip(), "--set")
    return cls(**values)
