"""Named classification tasks as data: GLUE, WiC and the WordNet lexicographer-file task (issue 13).

Each :class:`TaskSpec` says where a task's splits live, which fields are its texts and label,
its label vocabulary, whether it is regression, and its metrics, so that a user with the task's
files needs only the task name and the directory:

    >>> from sense_jax.tasks import load_task
    >>> train = load_task("sst2", "glue_data/SST-2", "train")    # doctest: +SKIP
    >>> dev = load_task("sst2", "glue_data/SST-2", "dev")        # doctest: +SKIP
    >>> train.texts[0][:3], train.labels[:3], train.vocabulary.names     # doctest: +SKIP

GLUE (Wang et al., 2019): ``DIR`` is one task's folder of the GLUE distribution
(``download_glue_data.py``: ``train.tsv``, ``dev.tsv``; MNLI ``dev_matched.tsv`` and
``dev_mismatched.tsv``), read with GLUE's own column names (CoLA's header-less
``source, label, label_notes, sentence``; MRPC's ``#1 String``/``#2 String``/``Quality``; QQP's
``question1``/``question2``/``is_duplicate``; STS-B's ``score``; MNLI's ``gold_label``). ``DIR``
may instead hold ``train.jsonl``/``dev.jsonl`` (or ``.csv``) or be a ``DatasetDict`` saved from the
Hugging Face ``glue`` dataset; those use that dataset's field names (``premise``/``hypothesis``,
``sentence1``/``sentence2``, ``label``) and split names (``validation``, ``validation_matched``).
Class ids follow the ``glue`` dataset's ``ClassLabel`` order, and a label may be written as its
name or its class id.

WiC (Pilehvar & Camacho-Collados, 2019; SuperGLUE): a sentence-pair task. ``DIR`` is the official
package (``train/train.data.txt`` + ``train/train.gold.txt``, ``dev/...``) or SuperGLUE's
``train.jsonl``/``val.jsonl``. The target word is marked in both sentences with square brackets
around its occurrence (``You must [carry] your camping gear .``), so that a pair classifier sees
which word is asked about; brackets never occur in WiC's own text. Labels ``False``/``True``
(files: ``F``/``T``).

``wordnet-lexfile``: WordNet 3.0 synsets shipped in ``sense_jax/data/wordnet`` (no ``DIR``): the
text is a synset's definition (or, with ``source="example"``, each usage example) and the label its
lexicographer file (45 classes, ``adj.all`` ... ``verb.weather``, sorted). The train/dev split is by
synset (every text of a synset lands in the same split), by a seeded hash of the synset id.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator, Mapping

from sense_jax import wordnet
from sense_jax.errors import ConfigError, DataError
from sense_jax.labelled import LabelledData, LabelVocabulary, from_rows, read_labelled

__all__ = ["TaskSpec", "TASKS", "get_task", "load_task", "load_split", "read_wic", "read_wordnet_lexfile", "WIC_MARKERS"]

#: Brackets that mark WiC's target word in both sentences.
WIC_MARKERS = ("[", "]")


@dataclasses.dataclass(frozen=True, eq=False)
class TaskSpec:
    """One named task.

    Attributes:
      name: the task's name (``--task``).
      kind: ``"glue"`` (delimited files or a saved dataset), ``"wic"`` or ``"wordnet"``.
      text_fields: one or two text fields, in the task's files (GLUE: the TSV columns).
      label_field: the label field in the task's files.
      vocabulary: label names in class-id order (with the files' spellings as aliases), or regression.
      metrics: metric names (:mod:`sense_jax.glue_metrics`), the main one first.
      files: split name -> file name inside the data directory (GLUE TSVs).
      dev_splits: evaluation splits; the first is the one model selection watches.
      columns: column names of header-less files (CoLA), else None.
      hf_text_fields, hf_label_field: the Hugging Face ``glue`` dataset's field names, used for a
        saved dataset and for JSONL/CSV files.
      hf_splits: split name -> the ``glue`` dataset's split name.
    """

    name: str
    kind: str
    text_fields: tuple[str, ...]
    label_field: str
    vocabulary: LabelVocabulary
    metrics: tuple[str, ...]
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    dev_splits: tuple[str, ...] = ("dev",)
    columns: tuple[str, ...] | None = None
    hf_text_fields: tuple[str, ...] | None = None
    hf_label_field: str = "label"
    hf_splits: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def main_metric(self) -> str:
        """The metric model selection watches (on ``dev_splits[0]``)."""
        return self.metrics[0]

    @property
    def splits(self) -> tuple[str, ...]:
        """All split names the task knows (``train`` first)."""
        return ("train", *self.dev_splits)


def _classes(*names: str, spellings: tuple[str, ...] = ()) -> LabelVocabulary:
    """Names in the ``glue`` dataset's class order; every class also answers to its id ("0", "1", ...)
    and, if given, to its spelling in the GLUE files."""
    aliases = [(str(i), n) for i, n in enumerate(names)]
    aliases += [(s, n) for s, n in zip(spellings, names) if s != str(names.index(n))]
    return LabelVocabulary(names, aliases=tuple(aliases))


def _glue(name, text_fields, label_field, vocabulary, metrics, hf_text_fields=None, *, mnli=False, columns=None):
    if mnli:
        files = {"train": "train.tsv", "dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"}
        dev, hf = ("dev_matched", "dev_mismatched"), {"train": "train", "dev_matched": "validation_matched",
                                                      "dev_mismatched": "validation_mismatched"}
    else:
        files, dev, hf = {"train": "train.tsv", "dev": "dev.tsv"}, ("dev",), {"train": "train", "dev": "validation"}
    return TaskSpec(name, "glue", text_fields, label_field, vocabulary, metrics, files, dev, columns,
                    hf_text_fields or text_fields, "label", hf)


_REGRESSION = LabelVocabulary(regression=True)
_NLI2 = _classes("entailment", "not_entailment")

#: Every named task, by name.
TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    _glue("cola", ("sentence",), "label", _classes("unacceptable", "acceptable"),
          ("matthews_correlation", "accuracy"), columns=("source", "label", "label_notes", "sentence")),
    _glue("sst2", ("sentence",), "label", _classes("negative", "positive"), ("accuracy",)),
    _glue("mrpc", ("#1 String", "#2 String"), "Quality", _classes("not_equivalent", "equivalent"),
          ("f1", "accuracy"), ("sentence1", "sentence2")),
    _glue("qqp", ("question1", "question2"), "is_duplicate", _classes("not_duplicate", "duplicate"),
          ("f1", "accuracy")),
    _glue("stsb", ("sentence1", "sentence2"), "score", _REGRESSION, ("pearson", "spearman")),
    _glue("mnli", ("sentence1", "sentence2"), "gold_label", _classes("entailment", "neutral", "contradiction"),
          ("accuracy",), ("premise", "hypothesis"), mnli=True),
    _glue("qnli", ("question", "sentence"), "label", _NLI2, ("accuracy",)),
    _glue("rte", ("sentence1", "sentence2"), "label", _NLI2, ("accuracy",)),
    _glue("wnli", ("sentence1", "sentence2"), "label", _classes("not_entailment", "entailment"), ("accuracy",)),
    TaskSpec("wic", "wic", ("sentence1", "sentence2"), "label", _classes("False", "True", spellings=("F", "T")),
             ("accuracy",), hf_splits={"train": "train", "dev": "validation"}),
]}


def _lexnames() -> tuple[str, ...]:
    return tuple(sorted({s.lexname for s in wordnet.load_synsets()}))


_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "wordnet_lexfile": "wordnet-lexfile", "lexfile": "wordnet-lexfile"}


def get_task(task: "str | TaskSpec") -> TaskSpec:
    """The :class:`TaskSpec` of a task name (case-insensitive; ``SST-2``, ``STS-B`` also accepted).

    Raises:
      ConfigError: unknown task name (the message lists the known ones).
    """
    if isinstance(task, TaskSpec):
        return task
    key = _ALIASES.get(str(task).lower(), str(task).lower())
    if key == "wordnet-lexfile":
        if key not in TASKS:  # built on first use: the label list reads the shipped WordNet files
            TASKS[key] = TaskSpec(key, "wordnet", ("text",), "lexname", LabelVocabulary(_lexnames()),
                                  ("accuracy", "macro_f1"))
        return TASKS[key]
    if key not in TASKS:
        raise ConfigError(f"unknown task {task!r} (known: {', '.join(sorted({*TASKS, 'wordnet-lexfile'}))})")
    return TASKS[key]


def load_task(task: "str | TaskSpec", data_dir: str | os.PathLike | None = None, split: str = "train", *,
              vocabulary: LabelVocabulary | None = None, seed: int = 0, **options) -> LabelledData:
    """Read one split of a named task.

    Args:
      task: a task name (:data:`TASKS`, ``wordnet-lexfile``) or spec.
      data_dir: the task's directory (see the module docstring); unused by ``wordnet-lexfile``.
      split: ``"train"`` or one of ``get_task(task).dev_splits`` (``"dev"``; MNLI ``"dev_matched"``,
        ``"dev_mismatched"``).
      vocabulary: a recorded vocabulary to check the labels against (default: the task's own).
      seed: the split seed of ``wordnet-lexfile``.
      **options: passed to :func:`read_wic` (``markers``) or :func:`read_wordnet_lexfile`
        (``dev_fraction``, ``source``, ``max_examples``).

    Returns:
      :class:`LabelledData` whose vocabulary is the task's (class ids in the task's order).

    Raises:
      ConfigError: unknown task or split, an option the task does not take.
      DataError: the data directory or a split's file is missing or malformed (file and line named),
        or a label is outside the vocabulary.
    """
    spec = get_task(task)
    if split not in spec.splits:
        raise ConfigError(f"task {spec.name} has no split {split!r} (splits: {', '.join(spec.splits)})")
    recorded = vocabulary
    if recorded is not None:
        spec.vocabulary.check_within(recorded, f"task {spec.name}")
    vocab = recorded or spec.vocabulary
    allowed = {"wic": {"markers"}, "wordnet": {"dev_fraction", "source", "max_examples"}}.get(spec.kind, set())
    bad = sorted(set(options) - allowed)
    if bad:
        raise ConfigError(f"task {spec.name} takes no option {bad[0]!r}")
    if spec.kind == "wordnet":
        return read_wordnet_lexfile(split, seed=seed, vocabulary=vocab, **options)
    if data_dir is None:
        raise ConfigError(f"task {spec.name} needs its data directory (DATA for finetune / evaluate-task, "
                          "task_data=DIR for distill / pipeline)")
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise DataError(f"{data_dir} is a file: the task's data is the directory that holds it")
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir}")
    if spec.kind == "wic":
        return read_wic(data_dir, split, vocabulary=vocab, **options)
    if (data_dir / "dataset_dict.json").is_file():
        return read_labelled(data_dir, spec.hf_text_fields, spec.hf_label_field, vocabulary=vocab,
                             split=spec.hf_splits[split])
    tsv = data_dir / spec.files[split]
    if tsv.is_file():
        return read_labelled(tsv, spec.text_fields, spec.label_field, vocabulary=vocab, columns=spec.columns)
    for suffix in (".jsonl", ".json", ".csv"):
        for stem in dict.fromkeys((split, spec.hf_splits[split])):
            path = data_dir / f"{stem}{suffix}"
            if path.is_file():
                return read_labelled(path, spec.hf_text_fields, spec.hf_label_field, vocabulary=vocab)
    raise DataError(f"{data_dir}: no {spec.files[split]} (nor {split}.jsonl/.csv, nor a saved DatasetDict) for task {spec.name}")


def load_split(data: str | os.PathLike | None, split: str = "train", *, task: "str | TaskSpec | None" = None,
               text_fields: str | tuple[str, ...] = ("sentence1",), label_field: str = "label",
               regression: bool = False, vocabulary: LabelVocabulary | None = None, **options) -> LabelledData:
    """One split of a named task or of the user's own data: the one entry point for ``--task``/``--data``.

    With ``task``, this is :func:`load_task` (``text_fields``, ``label_field`` and ``regression``
    are the task's). Without, ``data`` is

    - a file (``.tsv``, ``.csv``, ``.jsonl``/``.json``): read whatever ``split`` says;
    - a saved ``datasets`` directory: its split ``split`` (``dev`` falls back to ``validation``);
    - a directory of split files: ``{split}.tsv``, ``.csv``, ``.jsonl`` or ``.json`` (``dev``
      falls back to ``validation.*``).

    Read ``train`` first and pass its vocabulary when reading ``dev`` (``vocabulary=train.vocabulary``)
    so that both use the same class ids; a dev label unseen in train is then an error.

    Raises:
      ConfigError, DataError: as :func:`load_task` / :func:`~sense_jax.labelled.read_labelled`;
      DataError also when no file of the split is found (the names looked for are listed).
    """
    if task is not None:
        return load_task(task, data, split, vocabulary=vocabulary, **options)
    if options:
        raise ConfigError(f"option {sorted(options)[0]!r} needs a task (--task)")
    if data is None:
        raise ConfigError("no data given (--data PATH or --task)")
    path = Path(data)
    kw = dict(vocabulary=vocabulary, regression=regression)
    if path.is_file():
        return read_labelled(path, text_fields, label_field, **kw)
    if not path.is_dir():
        raise DataError(f"labelled data not found: {path}")
    stems = (split, "validation") if split == "dev" else (split,)
    if (path / "dataset_dict.json").is_file():
        try:
            names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        except ValueError:
            names = []
        chosen = next((s for s in stems if s in names), split)
        return read_labelled(path, text_fields, label_field, split=chosen, **kw)
    if (path / "state.json").is_file():
        return read_labelled(path, text_fields, label_field, **kw)
    tried = [f"{stem}{suffix}" for stem in stems for suffix in (".tsv", ".csv", ".jsonl", ".json")]
    for stem in stems:
        found = [f"{stem}{suffix}" for suffix in (".tsv", ".csv", ".jsonl", ".json") if (path / f"{stem}{suffix}").is_file()]
        if len(found) > 1:  # which one the user meant is not ours to guess
            raise DataError(f"{path}: {' and '.join(found)} both hold the {split} split; keep one")
        if found:
            return read_labelled(path / found[0], text_fields, label_field, **kw)
    raise DataError(f"{path}: no {split} split ({', '.join(tried)}, or a saved dataset)")


# --- WiC ---------------------------------------------------------------------------------------

def _mark(tokens: list[str], index: int, markers) -> str:
    if markers is None:
        return " ".join(tokens)
    left, right = markers
    return " ".join(tokens[:index] + [f"{left}{tokens[index]}{right}"] + tokens[index + 1:])


def _wic_official_rows(data: Path, gold: Path, markers) -> Iterator[tuple[str, dict]]:
    # The benchmark's reader checks the five fields, the index pair and the gold file's length.
    # Imported here: the benchmarks are a layer above the data (tests/test_layers.py).
    from sense_jax.benchmarks import wic as wic_benchmark

    for n, p in enumerate(wic_benchmark.read_wic(data, gold), 1):
        label = None if p.label is None else ("T" if p.label else "F")
        yield f"{data}:{n}", {"word": p.lemma, "pos": p.pos, "sentence1": _mark(list(p.a.words), p.a.start, markers),
                              "sentence2": _mark(list(p.b.words), p.b.start, markers), "label": label}


def _wic_jsonl_rows(path: Path, markers) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            out = dict(row)
            for k, (a, b) in (("sentence1", ("start1", "end1")), ("sentence2", ("start2", "end2"))):
                text = row.get(k)
                if not isinstance(text, str):
                    continue  # from_rows reports the missing field
                start, end = row.get(a), row.get(b)
                if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(text)):
                    raise DataError(f"{where}: {a}/{b} = {start!r}/{end!r} is not a span of {k}")
                if markers is not None:
                    out[k] = f"{text[:start]}{markers[0]}{text[start:end]}{markers[1]}{text[end:]}"
            yield where, out


def read_wic(data_dir: str | os.PathLike, split: str = "train", *, markers: tuple[str, str] | None = WIC_MARKERS,
             vocabulary: LabelVocabulary | None = None) -> LabelledData:
    """Read a WiC split as a sentence-pair task (texts: sentence1, sentence2; labels False=0/True=1).

    Args:
      data_dir: the official WiC package (``{split}/{split}.data.txt`` and ``{split}.gold.txt``,
        or those two files directly in ``data_dir``), or SuperGLUE's WiC (``train.jsonl``,
        ``val.jsonl``: ``sentence1``, ``sentence2``, ``start1``/``end1``, ``start2``/``end2``
        character spans, ``label`` true/false).
      split: ``"train"`` or ``"dev"`` (SuperGLUE's ``val``).
      markers: (left, right) strings put around the target word's occurrence in each sentence;
        None leaves the sentences as they are. The official files are whitespace-tokenised and give
        the target's 0-based token index; the marked sentences are re-joined with single spaces.
      vocabulary: the label vocabulary (default the task's: ``False``, ``True``).

    Raises:
      DataError: the split's files are missing; a JSONL span is not inside its sentence.
      BenchmarkDataError (a SenseJaxError, from :mod:`sense_jax.benchmarks.wic`, which reads the
        official files): a line without 5 fields, malformed or out-of-range indices, a gold label
        other than T/F, a gold file of another length (file and line named).
    """
    spec = get_task("wic")
    data_dir = Path(data_dir)
    vocab = vocabulary or spec.vocabulary
    for base in (data_dir / split, data_dir):
        data, gold = base / f"{split}.data.txt", base / f"{split}.gold.txt"
        if data.is_file():
            if not gold.is_file():
                raise DataError(f"{data}: its labels {gold.name} are missing beside it")
            return from_rows(_wic_official_rows(data, gold, markers), spec.text_fields, "label",
                             vocabulary=vocab, source=str(data))
    jsonl = data_dir / f"{'val' if split == 'dev' else split}.jsonl"
    if jsonl.is_file():
        return from_rows(_wic_jsonl_rows(jsonl, markers), spec.text_fields, "label", vocabulary=vocab,
                         source=str(jsonl))
    raise DataError(f"{data_dir}: no WiC {split} split ({split}/{split}.data.txt + .gold.txt, or {jsonl.name})")


# --- WordNet lexicographer files -----------------------------------------------------------------

def read_wordnet_lexfile(split: str = "train", *, seed: int = 0, dev_fraction: float = 0.1,
                         source: str = "definition", max_examples: int | None = None,
                         vocabulary: LabelVocabulary | None = None) -> LabelledData:
    """The WordNet lexicographer-file task: a synset's definition (or usage example) -> its lexname.

    The data are the WordNet 3.0 files shipped in the package (:mod:`sense_jax.wordnet`; 117,659
    synsets, 48,339 usage examples, 45 lexicographer files). A synset is in ``dev`` when
    ``wordnet.in_split(synset_id, dev_fraction, salt=f"lexfile-{seed}")``: a hash, so the split is
    the same on every machine, disjoint by synset, and changes with ``seed``.

    Args:
      split: ``"train"`` or ``"dev"``.
      seed: the split's seed (also orders the ``max_examples`` subsample).
      dev_fraction: the share of synsets in ``dev``, in (0, 1).
      source: ``"definition"`` (one text per synset) or ``"example"`` (one per usage example).
      max_examples: keep this many texts of the split, a seeded hash subsample (then in synset
        order); None keeps all.
      vocabulary: default the 45 lexicographer-file names, sorted.

    Returns:
      :class:`LabelledData`, one text field ``text``; labels int32 class ids of the lexnames.

    Raises:
      ConfigError: unknown split or source, dev_fraction outside (0, 1), max_examples < 1.
    """
    if split not in ("train", "dev"):
        raise ConfigError(f"task wordnet-lexfile has no split {split!r} (splits: train, dev)")
    if source not in ("definition", "example"):
        raise ConfigError(f"wordnet-lexfile source {source!r} is not 'definition' or 'example'")
    if not 0.0 < dev_fraction < 1.0:
        raise ConfigError(f"wordnet-lexfile dev_fraction {dev_fraction} is not in (0, 1)")
    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"wordnet-lexfile max_examples {max_examples} is < 1")
    spec = get_task("wordnet-lexfile")
    synsets = {s.id: s for s in wordnet.load_synsets()
               if wordnet.in_split(s.id, dev_fraction, f"lexfile-{seed}") == (split == "dev")}
    if source == "definition":
        items = [(sid, s.definition, s.lexname) for sid, s in synsets.items()]
    else:
        items = [(e.synset_id, e.text, synsets[e.synset_id].lexname)
                 for e in wordnet.load_examples() if e.synset_id in synsets]
    keys = [f"{sid}|{text}" for sid, text, _ in items]
    order = range(len(items))
    if max_examples is not None and max_examples < len(items):
        order = sorted(sorted(order, key=lambda i: wordnet.in_split_key(keys[i], f"lexfile-pick-{seed}"))[:max_examples])
    rows = ((f"wordnet synset {items[i][0]}", {"text": items[i][1], "lexname": items[i][2]}) for i in order)
    return from_rows(rows, spec.text_fields, spec.label_field, vocabulary=vocabulary or spec.vocabulary,
                     source=f"wordnet-lexfile[{split}, seed={seed}, {source}]")
