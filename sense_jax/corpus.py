"""Corpus readers: a stream of text passages from files, directories or a saved dataset.

Accepted inputs (``path``):

- a plain-text file: one passage per line;
- a JSONL file (``.jsonl`` / ``.ndjson``): one JSON object per line, the passage in ``text_field``;
- either of these compressed (``.gz``, ``.bz2`` or ``.xz`` suffix, e.g. ``wiki.txt.gz``,
  ``wiki.jsonl.bz2``);
- a directory of such files, read recursively in sorted relative-path order (hidden files skipped);
- a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (only when ``datasets`` is
  installed), its ``text_field`` column, splits of a ``DatasetDict`` in sorted name order.

Text as real files hold it, decided once here and counted in :class:`CorpusStats`:

- Encoding: UTF-8; a byte-order mark at the start of a file is dropped (a UTF-8 one, or a UTF-16
  / UTF-32 one, which also selects that encoding), so the first JSONL record and the first
  passage come out intact; a U+FEFF starting any later line (files joined with ``cat``) is
  dropped too. Undecodable bytes are replaced by U+FFFD (``undecodable_replaced`` lines).
- Line ends: those of Python's universal newlines, ``\n``, ``\r\n`` and a lone ``\r`` (old
  Mac), each ending one line; ``\r\n`` and ``\r`` ends are counted (``crlf_line_endings``,
  ``cr_line_endings``). JSON escapes inside a JSONL record are the record's own text.
- U+2028 LINE SEPARATOR, U+2029 PARAGRAPH SEPARATOR and U+0085 NEXT LINE do not end a line
  (JSON allows them raw inside strings, and universal newlines do not split on them); inside a
  passage they become a space (``separators_replaced``), as tokenizers do not all treat them as
  whitespace. Then the passage is stripped of leading and trailing whitespace.
- Empty lines are skipped and counted; malformed JSONL lines (not JSON, no ``text_field``
  string) are skipped and counted.
- A file that cannot be read to its end (a corrupt or truncated compressed stream, an I/O
  error) stops the read with a :class:`SenseJaxError` naming the file, never a partial corpus.

Passage indices used elsewhere (``sources`` in the store) count the passages *yielded* here,
i.e. after those skips.
"""

from __future__ import annotations

import bz2
import codecs
import dataclasses
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import zlib
from pathlib import Path
from typing import IO, Iterator

from sense_jax.errors import SenseJaxError

JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclasses.dataclass
class CorpusStats:
    """Counters filled while reading (pass one to :func:`iter_passages`)."""

    files: int = 0
    lines: int = 0
    passages: int = 0
    empty_skipped: int = 0
    malformed_skipped: int = 0
    undecodable_replaced: int = 0  # lines (or dataset rows) with undecodable bytes -> U+FFFD
    bom_stripped: int = 0  # byte-order marks dropped (one per file that has one, or per line)
    crlf_line_endings: int = 0  # lines that ended in "\r\n" (Windows)
    cr_line_endings: int = 0  # lines that ended in a lone "\r" (old Mac)
    separators_replaced: int = 0  # U+2028 / U+2029 / U+0085 inside passages, made spaces

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in
                                 ("dataset_info.json", "state.json", "dataset_dict.json"))


def corpus_files(path: str | os.PathLike) -> list[Path]:
    """The files a corpus path stands for, in reading order.

    Raises:
      SenseJaxError: ``path`` does not exist, or is a directory with no readable file.
    """
    path = Path(path)
    if not path.exists():
        raise SenseJaxError(f"corpus not found: {path}")
    if path.is_file():
        return [path]
    if _is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = sorted((p for p in path.rglob("*") if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise SenseJaxError(f"corpus directory {path} holds no files")
    return files


# Compressed files are recognised by their last suffix.
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# What a damaged file raises while it is read: gzip/bz2/lzma stream errors (a flipped byte:
# zlib.error, BadGzipFile; a cut file: EOFError) and I/O errors.
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)
# Byte-order marks -> the codec that reads the file (it consumes the mark). UTF-32 first: its
# little-endian mark starts with UTF-16's.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# Line breaks in Unicode that are not line ends in Python's universal newlines.
_UNICODE_SEPARATORS = re.compile("[\u2028\u2029\u0085]")
# Undecodable bytes are decoded to U+DC00 + byte (like "surrogateescape", for every byte value
# and codec), which valid text never decodes to; each line is then checked and the marks replaced.
_MARK_ERRORS = "sense_jax.mark_undecodable"
_MARKED = re.compile("[\udc00-\udcff]+")
_SURROGATES = re.compile("[\ud800-\udfff]")


def _mark_undecodable(e: UnicodeDecodeError) -> tuple[str, int]:
    return "".join(chr(0xDC00 + b) for b in e.object[e.start:e.end]), e.end


codecs.register_error(_MARK_ERRORS, _mark_undecodable)


def _unreadable(path: Path, e: BaseException) -> SenseJaxError:
    return SenseJaxError(f"corpus file {path} is unreadable, corrupt or truncated "
                         f"({'zlib.error' if isinstance(e, zlib.error) else type(e).__name__}: "
                         f"{getattr(e, 'strerror', None) or e})")


def _opener(path: Path):
    return _OPENERS.get(path.suffix, open)


def _open_text(path: Path, stats: CorpusStats) -> IO[str]:
    """Open a corpus file as text: encoding from its byte-order mark (UTF-8 without one), line
    ends kept as they are (``newline=""``) so that they can be counted."""
    raw = None
    try:
        raw = _opener(path)(path, "rb")
        head = raw.read(4)
        raw.seek(0)
    except _READ_ERRORS as e:
        if raw is not None:
            raw.close()
        raise _unreadable(path, e) from None
    encoding = next((enc for bom, enc in _BOMS if head.startswith(bom)), "utf-8")
    if encoding != "utf-8":
        stats.bom_stripped += 1
    return io.TextIOWrapper(raw, encoding=encoding, errors=_MARK_ERRORS, newline="")


def _is_jsonl(path: Path) -> bool:
    name = path.name[:-len(path.suffix)] if path.suffix in _OPENERS else path.name
    return name.endswith(JSONL_SUFFIXES)


def _clean_line(line: str, stats: CorpusStats) -> str:
    """A line without its line end, undecodable bytes replaced by U+FFFD, a leading U+FEFF dropped."""
    if line.endswith("\r\n"):
        stats.crlf_line_endings += 1
        line = line[:-2]
    elif line.endswith("\r"):
        stats.cr_line_endings += 1
        line = line[:-1]
    elif line.endswith("\n"):
        line = line[:-1]
    if _MARKED.search(line):
        stats.undecodable_replaced += 1
        line = _MARKED.sub(lambda m: "\ufffd" * len(m.group()), line)
    if line.startswith("\ufeff"):  # a byte-order mark inside a file (files joined with cat)
        stats.bom_stripped += 1
        line = line[1:]
    return line


def _passage(text: str, stats: CorpusStats) -> str:
    """Lone surrogates (JSON ``"\\ud800"`` escapes, e.g. a cut emoji; no UTF-8 text holds them and
    tokenizers refuse them) become U+FFFD, Unicode line/paragraph separators become spaces (both
    counted), then strip."""
    text, n = _SURROGATES.subn("\ufffd", text)
    if n:
        stats.undecodable_replaced += 1
    text, n = _UNICODE_SEPARATORS.subn(" ", text)
    stats.separators_replaced += n
    return text.strip()


def _iter_file(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str]:
    jsonl = _is_jsonl(path)
    stats.files += 1
    try:
        with _open_text(path, stats) as f:
            for raw in f:
                stats.lines += 1
                line = _clean_line(raw, stats)
                if jsonl:
                    if not line.strip():
                        stats.empty_skipped += 1
                        continue
                    try:
                        obj = json.loads(line)
                    except (ValueError, RecursionError):  # not JSON, a >4300-digit number, deep nesting
                        stats.malformed_skipped += 1
                        continue
                    text = obj.get(text_field) if isinstance(obj, dict) else None
                    if not isinstance(text, str):
                        stats.malformed_skipped += 1
                        continue
                    line = text
                text = _passage(line, stats)
                if not text:
                    stats.empty_skipped += 1
                    continue
                stats.passages += 1
                yield text
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from None


def _iter_dataset(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str]:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise SenseJaxError(f"{path} is a saved `datasets` dataset; install the `datasets` "
                            "package to read it") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:  # missing or damaged arrow/json files
        raise SenseJaxError(f"cannot read the saved dataset {path} ({type(e).__name__}: {e})") from None
    parts = [ds[k] for k in sorted(ds)] if isinstance(ds, datasets.DatasetDict) else [ds]
    for part in parts:
        if text_field not in part.column_names:
            raise SenseJaxError(f"dataset {path} has no column {text_field!r} "
                                f"(columns: {part.column_names})")
        stats.files += 1
        for text in part[text_field]:
            stats.lines += 1
            text = _passage(text, stats) if isinstance(text, str) else ""
            if not text:
                stats.empty_skipped += 1
                continue
            stats.passages += 1
            yield text


def iter_passages(path: str | os.PathLike, text_field: str = "text",
                  stats: CorpusStats | None = None) -> Iterator[str]:
    """Yield the corpus's non-empty passages (stripped ``str``) in a fixed, documented order.

    Args:
      path: file, directory or saved dataset (see the module docstring).
      text_field: JSONL key / dataset column holding the text.
      stats: optional :class:`CorpusStats` updated as passages are read.

    Raises:
      SenseJaxError: ``path`` is missing, a file cannot be read to its end (I/O error, corrupt
        or truncated compressed stream), or a saved dataset has no ``text_field`` column.
    """
    stats = stats if stats is not None else CorpusStats()
    path = Path(path)
    if _is_saved_dataset(path):
        yield from _iter_dataset(path, text_field, stats)
        return
    for f in corpus_files(path):
        yield from _iter_file(f, text_field, stats)


def quick_fingerprint(path: str | os.PathLike, text_field: str = "text") -> str:
    """A cheap identity of a corpus path: file names, sizes and modification times (sha256 hex).

    Used to tell whether a half-finished extraction belongs to the same corpus; the store's
    ``corpus_fingerprint`` is the hash of the passages' text (see ``PassageHasher``).
    """
    path = Path(path)
    h = hashlib.sha256(f"field={text_field}\n".encode())
    for f in corpus_files(path):
        st = f.stat()
        rel = f.relative_to(path).as_posix() if f != path else f.name
        h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class PassageHasher:
    """sha256 of the passage stream (each passage's UTF-8 bytes then ``\\n``): the content
    fingerprint stored in an extraction's metadata, independent of file layout and compression."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, text: str) -> None:
        self._h.update(text.encode("utf-8", errors="surrogatepass"))
        self._h.update(b"\n")

    def hexdigest(self) -> str:
        return self._h.hexdigest()
