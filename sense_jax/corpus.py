"""Corpus readers: a stream of text passages from files, directories or a saved dataset.

Accepted inputs (``path``):

- a plain-text file: one passage per line;
- a JSONL file (``.jsonl`` / ``.ndjson``): one JSON object per line, the passage in ``text_field``;
- either of these gzipped (``.gz`` suffix, e.g. ``wiki.txt.gz``, ``wiki.jsonl.gz``);
- a directory of such files, read recursively in sorted relative-path order (hidden files skipped);
- a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (only when ``datasets`` is
  installed), its ``text_field`` column, splits of a ``DatasetDict`` in sorted name order.

Nothing in a corpus crashes a read: undecodable bytes are replaced (U+FFFD) and counted, empty
lines are skipped and counted, malformed JSONL lines (not JSON, no ``text_field`` string) are
skipped and counted. Passage indices used elsewhere (``sources`` in the store) count the passages
*yielded* here, i.e. after those skips.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
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
    undecodable_replaced: int = 0

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


def _open_binary(path: Path) -> IO[bytes]:
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rb")
        return open(path, "rb")
    except OSError as e:
        raise SenseJaxError(f"cannot read corpus file {path}: {e.strerror or e}") from None


def _is_jsonl(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.endswith(JSONL_SUFFIXES)


def _decode(raw: bytes, stats: CorpusStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.undecodable_replaced += 1
        return raw.decode("utf-8", errors="replace")


def _iter_file(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str]:
    jsonl = _is_jsonl(path)
    stats.files += 1
    with _open_binary(path) as f:
        try:
            for raw in f:  # splits on b"\n" only; "\r\n" is stripped below
                stats.lines += 1
                line = _decode(raw, stats)
                if jsonl:
                    if not line.strip():
                        stats.empty_skipped += 1
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        stats.malformed_skipped += 1
                        continue
                    text = obj.get(text_field) if isinstance(obj, dict) else None
                    if not isinstance(text, str):
                        stats.malformed_skipped += 1
                        continue
                    line = text
                text = line.strip()
                if not text:
                    stats.empty_skipped += 1
                    continue
                stats.passages += 1
                yield text
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise SenseJaxError(f"corpus file {path} is unreadable or truncated ({e})") from None


def _iter_dataset(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str]:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise SenseJaxError(f"{path} is a saved `datasets` dataset; install the `datasets` "
                            "package to read it") from None
    ds = datasets.load_from_disk(str(path))
    parts = [ds[k] for k in sorted(ds)] if isinstance(ds, datasets.DatasetDict) else [ds]
    for part in parts:
        if text_field not in part.column_names:
            raise SenseJaxError(f"dataset {path} has no column {text_field!r} "
                                f"(columns: {part.column_names})")
        stats.files += 1
        for text in part[text_field]:
            stats.lines += 1
            text = text.strip() if isinstance(text, str) else ""
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
      SenseJaxError: ``path`` is missing, a file cannot be read, a gzip file is truncated, or a
        saved dataset has no ``text_field`` column.
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
