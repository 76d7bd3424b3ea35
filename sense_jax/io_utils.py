"""Atomic artefact writing: build in a temporary sibling, then rename into place.

A reader never sees a half-written artefact and a failed write never damages a complete one:
the output directory appears (or is replaced) only by ``os.replace`` once everything inside it
has been written.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

import numpy as np

from sense_jax.errors import ConfigError, SenseJaxError


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out`` that becomes ``out`` on success.

    Args:
      out: final directory path.
      overwrite: replace an existing ``out``; otherwise an existing ``out`` is an error.

    Raises:
      SenseJaxError: ``out`` exists and ``overwrite`` is False, or its parent is not writable.
      Any exception raised inside the block, KeyboardInterrupt included, propagates after the
      temporary directory is removed; ``out`` is then untouched.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise SenseJaxError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise SenseJaxError(f"cannot write under {out.parent}: {e.strerror or e}") from None
    done = False
    try:
        umask = os.umask(0)
        os.umask(umask)
        try:
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the artefact is as readable as mkdir's
        except OSError as e:
            raise SenseJaxError(f"cannot write under {out.parent}: {e.strerror or e}") from None
        yield tmp
        _readable_as_created(tmp, 0o666 & ~umask)
        replace_directory(tmp, out)
        done = True
    finally:
        if not done:
            discard_directory(tmp)


def _readable_as_created(root: Path, mode: int) -> None:
    """Give every file under ``root`` the ``mode`` of a file opened with ``open(..., "w")``:
    safetensors' ``save_file`` creates its files 0600 whatever the umask, and an artefact
    should be as shareable as any other file its user writes."""
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)


def discard_directory(tmp: Path) -> None:
    """Remove the temporary directory of a failed or interrupted write, now and again at exit.

    A KeyboardInterrupt in the main thread does not stop the writer threads the block started
    (Orbax's background commit of a checkpoint): they go on writing into ``tmp``, re-creating it
    after its removal (an interrupted ``convert`` left a 69 MB ``.OUT.tmp-*`` each time). Python
    joins such non-daemon threads before it runs the ``atexit`` functions, so removing ``tmp``
    again at exit removes what they wrote last.
    """
    shutil.rmtree(tmp, ignore_errors=True)
    atexit.register(shutil.rmtree, tmp, True)


def check_out_spares_sources(out: str | os.PathLike, *sources: str | os.PathLike) -> None:
    """Refuse an output directory that is one of the command's inputs or holds one: replacing it
    (``--overwrite``) would delete what is being read, and a failed write would leave neither.

    Raises:
      ConfigError: ``out`` is ``source`` or a directory above it (both named).
    """
    o = Path(out).resolve()
    for src in sources:
        s = Path(src).resolve()
        if s == o or o in s.parents:
            raise ConfigError(f"output {out} {'is' if s == o else 'holds'} the input {src}: choose another output directory")


def check_replaceable(out: str | os.PathLike, is_artefact: Callable[[Path], bool], what: str) -> None:
    """Refuse to replace (``--overwrite``) anything at ``out`` but an artefact of this command's
    kind or an empty directory: a user's file or directory there would be deleted.

    Args:
      is_artefact: True for a directory holding this kind of artefact (and nothing else).
      what: the artefact's name for the message ("a sense dictionary").

    Raises:
      ConfigError: ``out`` is a file, or a non-empty directory that ``is_artefact`` rejects (named).
    """
    p = Path(out)
    if not p.exists():
        return
    if p.is_dir() and (not any(p.iterdir()) or is_artefact(p)):
        return
    raise ConfigError(f"{out} exists and is not {what}: --overwrite replaces only {what} or an empty "
                      "directory; choose another output path")


def holds_only(path: Path, names: Collection[str], required: Collection[str]) -> bool:
    """True when directory ``path`` holds every name of ``required`` and nothing outside ``names``."""
    present = {e.name for e in path.iterdir()}
    return set(required) <= present <= set(names)


def replace_directory(src: Path, dst: Path) -> None:
    """Move complete directory ``src`` to ``dst``, replacing ``dst`` if it exists.

    The old ``dst`` is first renamed aside, so at every instant ``dst`` is either the old complete
    directory, absent for the moment between two renames, or the new one.
    """
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:  # an interrupt between the renames: the old one goes back
            if not dst.exists():
                os.replace(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` through a temporary file and a rename.

    Non-finite floats (a metric over no items) are written as ``null``: JSON has no NaN.

    Raises:
      SenseJaxError: ``path`` cannot be written (named); the temporary file is removed.
    """
    def finite(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: finite(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [finite(v) for v in o]
        return o

    obj = finite(obj)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a directory in the way, a missing parent: one line, no temporary file left
        tmp.unlink(missing_ok=True)
        raise SenseJaxError(f"cannot write {path}: {e.strerror or e}") from None


def check_output_file(path: str | os.PathLike, what: str = "--out") -> None:
    """Refuse, before any work, an output file path that cannot be written: a directory, or a
    parent directory that does not exist.

    Raises:
      ConfigError: naming ``what`` and the path.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {path}: is a directory; give a file path (e.g. {p / 'result.json'})")
    if not p.absolute().parent.is_dir():
        raise ConfigError(f"{what} {path}: its directory {p.absolute().parent} does not exist")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """Read a JSON object, raising :class:`SenseJaxError` naming ``path`` when missing or invalid."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise SenseJaxError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SenseJaxError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise SenseJaxError(f"{path} must hold a JSON object, found {type(obj).__name__}")
    return obj


class RowFile:
    """A [S, D] array of a ``.npy`` file, read and written by whole rows with ``os.pread`` /
    ``os.pwrite``, for files of many rows that a run reads once or in pieces (the teacher cache's
    hidden states, the extraction store's vectors). A memory map would count every page a run
    touched in the process's resident memory until it is unmapped (the default run's 1 GB teacher
    cache read through a map raised the peak RSS by 1.0 GiB); read by rows, the file stays in the
    operating system's page cache, shared and reclaimable, and only the rows asked for are copied.

    Attributes:
      shape: (S, D). dtype: the stored dtype, or ``view`` (bfloat16 over stored uint16 bits).

    Raises:
      SenseJaxError: the file is missing, is not a 2-D C-order ``.npy`` array, or is shorter
        than its header says (truncated).
    """

    def __init__(self, path: Path, view: np.dtype | None = None, writable: bool = False):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
                self._data_offset = f.tell()
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise SenseJaxError(f"file missing: {self.path}") from None
        except (ValueError, OSError) as e:
            raise SenseJaxError(f"{self.path} is unreadable ({e})") from None
        if len(shape) != 2 or fortran or dtype.hasobject:
            raise SenseJaxError(f"{self.path}: expected a 2-D C-order array, got "
                                f"{dtype} {shape}{' (Fortran order)' if fortran else ''}")
        self.shape, self._stored = tuple(int(x) for x in shape), np.dtype(dtype)
        self.dtype = np.dtype(view) if view is not None else self._stored
        self._row_bytes = self.shape[1] * self._stored.itemsize
        if size < self._data_offset + self.shape[0] * self._row_bytes:
            raise SenseJaxError(f"{self.path} is truncated ({size} bytes for "
                                f"{self.shape[0]} rows of {self._row_bytes} bytes)")
        self._fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)

    def read(self, start: int, n: int) -> np.ndarray:
        """Rows ``start:start + n`` as a new [n, D] array of :attr:`dtype`."""
        nbytes = n * self._row_bytes
        buf = os.pread(self._fd, nbytes, self._data_offset + start * self._row_bytes)
        if len(buf) != nbytes:
            raise SenseJaxError(f"{self.path}: rows {start}:{start + n} are past its end")
        return np.frombuffer(buf, self._stored).reshape(n, self.shape[1]).view(self.dtype)

    def write(self, start: int, rows: np.ndarray) -> None:
        """Store ``rows`` [n, D] (of :attr:`dtype`) at rows ``start:start + n``."""
        data = np.ascontiguousarray(rows, self.dtype).view(self._stored).tobytes()
        offset = self._data_offset + start * self._row_bytes
        while data:  # pwrite may write less than asked
            done = os.pwrite(self._fd, data, offset)
            data, offset = data[done:], offset + done

    def sync(self) -> None:
        """Wait until the written rows are on disk (before recording a chunk as done)."""
        os.fsync(self._fd)

    def close(self, _close=os.close) -> None:  # os.close bound early: __del__ may run at exit
        if getattr(self, "_fd", -1) >= 0:
            _close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()
