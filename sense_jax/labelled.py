"""Labelled text for sequence classification and regression: one reader for GLUE-style data.

:func:`read_labelled` reads one split of a labelled data set from

- a TSV file with a header row (``.tsv``), read as GLUE's own loaders read it: tab-separated,
  ``csv.QUOTE_NONE`` (a ``"`` inside a sentence is text, never a field quote; see
  ``datasets``' ``glue.py`` and the GLUE baseline's ``_read_tsv(quotechar=None)``), UTF-8 with an
  optional byte-order mark (MRPC's files start with one). ``columns=`` names the columns of a
  header-less file (CoLA's train/dev);
- a CSV file with a header row (``.csv``), standard RFC 4180 quoting (a field may hold commas,
  quotes and newlines);
- JSON Lines (``.jsonl`` or ``.json``, one object per line, as ``Dataset.to_json`` writes);
- a directory written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` with
  ``split=``); a ``ClassLabel`` label column is read by its names, so its label vocabulary is the
  ``ClassLabel``'s. Needs the ``datasets`` package (a development dependency, imported lazily).

It returns :class:`LabelledData`: one or two lists of texts (``sentence1[,sentence2]``), the labels
as class ids (int32 [N]) or, for regression, float32 [N], and the :class:`LabelVocabulary` that maps
class ids to label names. The vocabulary is plain JSON (:meth:`LabelVocabulary.save` /
:meth:`LabelVocabulary.load`) so that it can be recorded beside a fine-tuned model and later data
can be read against it (``read_labelled(..., vocabulary=recorded)``): a label outside it is an error
naming the file and line.

Every malformed input raises :class:`~sense_jax.errors.DataError` with a one-line message naming
the file and line (``path:LINE``, 1-based physical line; for a saved dataset ``path[split] row I``,
0-based) and the field or label at fault. Nothing is written while reading.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from sense_jax.errors import ConfigError, DataError
from sense_jax.io_utils import read_json, write_json_atomic

__all__ = ["LabelVocabulary", "LabelledData", "read_labelled", "from_rows", "parse_text_fields", "label_key"]

VOCABULARY_FILE = "label_vocabulary.json"
_FORMAT_VERSION = 1
_SUFFIXES = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


def label_key(value: Any) -> str | None:
    """The spelling of a classification label used for vocabulary look-ups (None when absent).

    Strings are stripped; booleans become ``"True"``/``"False"`` (SuperGLUE's JSONL); integers and
    integral floats their decimal form (``1``, ``1.0`` and ``"1"`` are the same label).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if math.isfinite(value) and float(value).is_integer() else repr(float(value))
    return str(value).strip()


@dataclasses.dataclass(frozen=True)
class LabelVocabulary:
    """The label set of a task: class id ``i`` is ``names[i]``; or a regression target.

    Attributes:
      names: label names in class-id order (empty for regression). These are what a fine-tuned
        model's ``config.id2label`` records.
      regression: True for a real-valued target (STS-B); the head then has one output.
      aliases: ``(spelling, name)`` pairs: other spellings of a label in data files, e.g. GLUE's
        SST-2 files write ``0``/``1`` for ``negative``/``positive``. Each name is also its own spelling.

    Raises (on construction):
      ConfigError: a duplicate name, an alias to an unknown name, an alias that names two labels,
        or names given for a regression target.
    """

    names: tuple[str, ...] = ()
    regression: bool = False
    aliases: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "aliases", tuple((str(a), str(n)) for a, n in self.aliases))
        if self.regression and (self.names or self.aliases):
            raise ConfigError("a regression label vocabulary takes no label names")
        if len(set(self.names)) != len(self.names):
            dup = next(n for n in self.names if self.names.count(n) > 1)
            raise ConfigError(f"label vocabulary names {dup!r} twice")
        ids = {n: i for i, n in enumerate(self.names)}
        for a, n in self.aliases:
            if n not in ids:
                raise ConfigError(f"label alias {a!r} points to {n!r}, which is not a label name {list(self.names)}")
            if ids.setdefault(a, ids[n]) != ids[n]:
                raise ConfigError(f"label spelling {a!r} names two labels")
        object.__setattr__(self, "_ids", ids)

    @property
    def num_labels(self) -> int:
        """Outputs of the classification head: 1 for regression, else the number of names."""
        return 1 if self.regression else len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        """``{class id: name}``, as transformers' ``PretrainedConfig.id2label``."""
        return dict(enumerate(self.names)) if not self.regression else {0: "LABEL_0"}

    @property
    def label2id(self) -> dict[str, int]:
        """``{name: class id}``, as transformers' ``PretrainedConfig.label2id``."""
        return {n: i for i, n in self.id2label.items()}

    def class_id(self, value: Any) -> int | None:
        """The class id of a label value (a name or an alias, via :func:`label_key`); None if unknown."""
        return self._ids.get(label_key(value))

    def check_within(self, recorded: "LabelVocabulary", what: str = "data") -> None:
        """Raise unless every label of ``self`` is a label of ``recorded`` with the same class id.

        Raises:
          DataError: the kinds differ (regression vs classification) or a name is missing or moved.
        """
        if self.regression != recorded.regression:
            kind = lambda v: "regression" if v.regression else "classification"
            raise DataError(f"{what} is a {kind(self)} target but the recorded vocabulary is {kind(recorded)}")
        for i, n in enumerate(self.names):
            j = recorded.class_id(n)
            if j is None:
                raise DataError(f"{what}: label {n!r} is not in the recorded vocabulary {list(recorded.names)}")
            if j != i:
                raise DataError(f"{what}: label {n!r} has class id {i} but {j} in the recorded vocabulary")

    def to_json(self) -> dict:
        """A JSON-serialisable dict (see :meth:`from_json`)."""
        return {"format_version": _FORMAT_VERSION, "names": list(self.names), "regression": self.regression,
                "aliases": {a: n for a, n in self.aliases}}

    @classmethod
    def from_json(cls, obj: dict, source: str = "label vocabulary") -> "LabelVocabulary":
        """Inverse of :meth:`to_json`.

        Raises:
          ConfigError: a key is missing or of the wrong type (the message names ``source`` and the key).
        """
        if not isinstance(obj, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        if obj.get("format_version") != _FORMAT_VERSION:
            raise ConfigError(f"{source}: format_version {obj.get('format_version')!r} is not {_FORMAT_VERSION}")
        names, regression, aliases = obj.get("names"), obj.get("regression"), obj.get("aliases", {})
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{source}: key 'names' must be a list of strings")
        if not isinstance(regression, bool):
            raise ConfigError(f"{source}: key 'regression' must be true or false")
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            raise ConfigError(f"{source}: key 'aliases' must map strings to label names")
        try:
            return cls(tuple(names), regression, tuple(aliases.items()))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vocabulary as JSON, atomically (temporary file, then rename).

        ``path`` may be a directory (a model directory): the file is then ``path/label_vocabulary.json``.
        """
        path = Path(path)
        if path.is_dir():
            path = path / VOCABULARY_FILE
        write_json_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LabelVocabulary":
        """Read a vocabulary written by :meth:`save` (a file, or a directory holding ``label_vocabulary.json``).

        Raises:
          SenseJaxError: the file is missing or not JSON; ConfigError: a key is wrong.
        """
        path = Path(path)
        if path.is_dir():
            path = path / VOCABULARY_FILE
        return cls.from_json(read_json(path, "label vocabulary"), str(path))


@dataclasses.dataclass(frozen=True, eq=False)
class LabelledData:
    """One split of a labelled data set.

    Attributes:
      texts: one list of N strings (single-sentence tasks) or two (sentence pairs), in the order
        of ``text_fields``; pass them to a tokenizer as ``tokenizer(*texts)``.
      labels: class ids, int32 [N] in ``[0, vocabulary.num_labels)``; or float32 [N] for regression.
      vocabulary: the label vocabulary the class ids refer to.
      text_fields: the field names the texts were read from.
      source: the file or directory read (for messages and provenance).
    """

    texts: tuple[list[str], ...]
    labels: np.ndarray
    vocabulary: LabelVocabulary
    text_fields: tuple[str, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair data (two text lists)."""
        return len(self.texts) == 2

    def select(self, indices: Sequence[int] | np.ndarray) -> "LabelledData":
        """The examples at ``indices`` (int [M]), in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(self, texts=tuple([t[i] for i in idx] for t in self.texts),
                                   labels=self.labels[idx])


def parse_text_fields(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"sentence1,sentence2"`` (a CLI flag) or a sequence -> a tuple of 1 or 2 field names.

    Raises:
      ConfigError: no field, more than two, an empty or repeated name.
    """
    fields = tuple(f.strip() for f in spec.split(",")) if isinstance(spec, str) else tuple(spec)
    if not 1 <= len(fields) <= 2 or any(not f for f in fields) or len(set(fields)) != len(fields):
        raise ConfigError(f"text fields {spec!r}: give one or two distinct field names (sentence1[,sentence2])")
    return fields


# --- row sources: (where, row dict) per example --------------------------------------------------

def _check_columns(where: str, columns: Sequence[str], needed: Sequence[str]) -> None:
    for key in needed:
        if key not in columns:
            raise DataError(f"{where}: no column {key!r} (columns: {', '.join(map(str, columns))})")


def _delimited_rows(path: Path, delimiter: str, needed, columns) -> Iterator[tuple[str, dict]]:
    # newline="" lets csv see the raw line ends (a quoted CSV field may hold a newline).
    with open(path, encoding="utf-8-sig", newline="") as f:
        if delimiter == "\t":
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(f)
        try:
            if columns is None:
                columns = next(reader, None)
                if columns is None:
                    raise DataError(f"{path}: empty file (a header row is needed)")
                columns = [c.strip() for c in columns]
            _check_columns(str(path), columns, needed)
            first = reader.line_num + 1
            for cells in reader:
                if cells:  # a blank line holds no example
                    row = dict(zip(columns, cells))
                    row["__ncells__"] = len(cells)
                    yield f"{path}:{first}", row
                first = reader.line_num + 1
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: {e}") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object, found {type(row).__name__}")
                yield f"{path}:{n}", row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _dataset_rows(path: Path, split: str | None, needed, label_field) -> tuple[Iterator, list[str] | None]:
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise DataError(f"{path}: not a saved datasets directory (no dataset_dict.json or state.json)")
    try:
        import datasets  # optional: only saved datasets need it
    except ImportError:
        raise DataError(f"{path}: reading a saved dataset needs the 'datasets' package (pip install datasets)") from None
    obj = datasets.load_from_disk(str(path))
    where = str(path)
    if isinstance(obj, datasets.DatasetDict):
        if split is None and len(obj) == 1:
            split = next(iter(obj))
        if split not in obj:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(obj)})")
        obj, where = obj[split], f"{path}[{split}]"
    _check_columns(where, obj.column_names, needed)
    feature = obj.features[label_field]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    columns = obj.select_columns(list(dict.fromkeys(needed))).to_dict()

    def rows():
        for i in range(obj.num_rows):
            row = {k: v[i] for k, v in columns.items()}
            if names is not None:
                label = row[label_field]
                if label is None or not 0 <= label < len(names):
                    raise DataError(f"{where} row {i}: label {label!r} is not a class of {names} (a test split?)")
                row[label_field] = names[label]
            yield f"{where} row {i}", row
    return rows(), names


def _default_vocabulary(keys: Iterable[str]) -> LabelVocabulary:
    uniq = set(keys)
    try:
        ordered = sorted(uniq, key=int)  # 0..9, 10 and not "10" < "2"
    except ValueError:
        ordered = sorted(uniq)
    return LabelVocabulary(tuple(ordered))


def read_labelled(path: str | os.PathLike, text_fields: str | Sequence[str] = ("sentence1",),
                  label_field: str = "label", *, vocabulary: LabelVocabulary | None = None,
                  regression: bool = False, split: str | None = None,
                  columns: Sequence[str] | None = None) -> LabelledData:
    """Read one split of labelled text from a TSV, CSV or JSONL file or a saved ``datasets`` directory.

    Args:
      path: the file (format by suffix: ``.tsv``, ``.csv``, ``.jsonl``/``.json``) or a directory
        written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
      text_fields: one or two field names (``"sentence1,sentence2"`` or a sequence).
      label_field: the field holding the label.
      vocabulary: the recorded label vocabulary: class ids are taken from it, and a label outside
        it is an error. Its ``regression`` flag overrides ``regression``. None builds the vocabulary
        from the data (the sorted distinct labels, numerically when all are integers; a
        ``ClassLabel`` column's names in their order).
      regression: labels are real numbers (float32), not classes.
      split: for a saved ``DatasetDict``, the split to read (optional when it has only one).
      columns: column names of a header-less TSV/CSV file (GLUE's CoLA train/dev); None reads the
        header row.

    Returns:
      :class:`LabelledData` with texts (1 or 2 lists of N str), labels int32 [N] or float32 [N].

    Raises:
      DataError: the path is missing or of an unknown kind; a text or label column is absent (the
        message lists the columns); a text field or label is missing on a line, or a text is not a
        string (file and line named); a label is outside ``vocabulary``; a regression label is not a
        finite number; the data holds no example.
      ConfigError: ``text_fields`` is not one or two distinct names.
    """
    path = Path(path)
    fields = parse_text_fields(text_fields)
    needed = (*fields, label_field)
    if vocabulary is not None:
        regression = vocabulary.regression
    class_names = None
    if path.is_dir():
        rows, class_names = _dataset_rows(path, split, needed, label_field)
    elif not path.is_file():
        raise DataError(f"labelled data not found: {path}")
    elif path.suffix.lower() not in _SUFFIXES:
        raise DataError(f"{path}: unknown data format {path.suffix!r} (expected .tsv, .csv, .jsonl or a saved dataset directory)")
    else:
        kind = _SUFFIXES[path.suffix.lower()]
        rows = (_jsonl_rows(path) if kind == "jsonl"
                else _delimited_rows(path, "\t" if kind == "tsv" else ",", needed, columns))

    return from_rows(rows, fields, label_field, vocabulary=vocabulary, regression=regression,
                     source=str(path), class_names=class_names)


def from_rows(rows: Iterable[tuple[str, dict]], text_fields: str | Sequence[str], label_field: str = "label", *,
              vocabulary: LabelVocabulary | None = None, regression: bool = False, source: str = "",
              class_names: Sequence[str] | None = None) -> LabelledData:
    """Build :class:`LabelledData` from ``(where, row)`` pairs: the checks of :func:`read_labelled`.

    Readers of other layouts (WiC's two files, WordNet) yield their examples as dicts through this,
    so every source gets the same checks and messages.

    Args:
      rows: ``(where, row)``: ``where`` names the file and line for messages (``"path:LINE"``),
        ``row`` maps field names to values (None or absent = missing).
      text_fields, label_field, vocabulary, regression: as in :func:`read_labelled`.
      source: the data's path, for messages and :attr:`LabelledData.source`.
      class_names: the vocabulary to use when ``vocabulary`` is None (a ``ClassLabel``'s names);
        None builds it from the labels seen.

    Raises:
      DataError: as :func:`read_labelled`.
    """
    fields = parse_text_fields(text_fields)
    if vocabulary is not None:
        regression = vocabulary.regression
    texts: tuple[list[str], ...] = tuple([] for _ in fields)
    raw: list = []
    wheres: list[str] = []
    for where, row in rows:
        for j, f in enumerate(fields):
            value = row.get(f)
            if value is None:
                n = row.get("__ncells__")
                got = f" (the line has {n} fields)" if n is not None else ""
                raise DataError(f"{where}: text field {f!r} missing{got}")
            if not isinstance(value, str):
                raise DataError(f"{where}: text field {f!r} is {type(value).__name__}, not a string")
            texts[j].append(value)
        value = row.get(label_field)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: label field {label_field!r} missing")
        if regression:
            raw.append(_regression_label(where, value))
        else:
            raw.append(label_key(value))
            wheres.append(where)
    if not raw:
        raise DataError(f"{source}: no labelled example")

    if regression:
        vocab = vocabulary or LabelVocabulary(regression=True)
        labels = np.asarray(raw, dtype=np.float32)
    else:
        vocab = vocabulary or (LabelVocabulary(tuple(class_names)) if class_names is not None
                               else _default_vocabulary(raw))
        ids = np.empty(len(raw), dtype=np.int32)
        for i, key in enumerate(raw):
            c = vocab.class_id(key)
            if c is None:
                raise DataError(f"{wheres[i]}: label {key!r} is not in the label vocabulary {list(vocab.names)}")
            ids[i] = c
        labels = ids
    return LabelledData(texts, labels, vocab, fields, source)


def _regression_label(where: str, value: Any) -> float:
    if isinstance(value, bool):
        raise DataError(f"{where}: label {value!r} is not a number (regression task)")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {value!r} is not a number (regression task)") from None
    if not math.isfinite(x):
        raise DataError(f"{where}: label {value!r} is not a finite number (regression task)")
    return x
