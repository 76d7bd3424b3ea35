"""Errors that sense_jax raises for bad input.

Every error a user can cause by what they pass (a path, a file, a flag, a config key) is a
:class:`SenseJaxError` whose message names the file, token or key at fault. The CLI prints the
message and exits with status 2, without a traceback; library callers catch the class.
"""

from __future__ import annotations


class SenseJaxError(Exception):
    """Base class for user-facing errors (bad input, not bugs)."""


class ConversionError(SenseJaxError):
    """A checkpoint could not be read or does not match the model it claims to be."""


class ConfigError(SenseJaxError):
    """A configuration value or key is unknown, missing or out of range."""


class DataError(SenseJaxError):
    """A labelled-data file is malformed: a missing column or field, or a label that does not fit.

    The message names the file and line (or dataset row) and the field or label at fault.
    """
