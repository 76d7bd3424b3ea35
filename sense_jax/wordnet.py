"""WordNet 3.0 as real text with real sense labels (derived files shipped in the package).

``sense_jax/data/wordnet/`` holds compact files derived from the Debian package wordnet-base by
``eval/derive_wordnet.py`` (WordNet 3.0 Copyright 2006 by Princeton University; licence in the
same folder): 117,659 synsets with their lexicographer file, lemmas and definition, and 48,339
usage examples, and the 206,949 sense keys (``bank%1:17:01::``) with their
synset and sense number. They serve as the default corpus (definitions, "glosses") and as evaluation data
(METHOD §5: usage examples with synset labels, lexicographer files as classes).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
from functools import lru_cache
from pathlib import Path

from sense_jax.errors import SenseJaxError

DATA_DIR = Path(__file__).resolve().parent / "data" / "wordnet"


@dataclasses.dataclass(frozen=True)
class Synset:
    """One synset: id ``"<offset>-<pos>"``, pos (n, v, a, s, r), lexname (one of 45), lemmas, definition."""

    id: str
    pos: str
    lexname: str
    lemmas: tuple[str, ...]
    definition: str


@dataclasses.dataclass(frozen=True)
class Example:
    """A usage example of a synset."""

    synset_id: str
    text: str


def _rows(name: str, data_dir: Path | None):
    path = Path(data_dir or DATA_DIR) / name
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n").split("\t")


@lru_cache(maxsize=2)
def load_synsets(data_dir: Path | None = None) -> tuple[Synset, ...]:
    """All synsets, sorted by id."""
    return tuple(Synset(i, p, lx, tuple(lm.split("|")), d) for i, p, lx, lm, d in _rows("synsets.tsv.gz", data_dir))


@lru_cache(maxsize=2)
def load_examples(data_dir: Path | None = None) -> tuple[Example, ...]:
    """All usage examples, sorted by (synset id, text)."""
    return tuple(Example(s, t) for s, t in _rows("examples.tsv.gz", data_dir))


def glosses(pos: str | None = None) -> list[str]:
    """Glosses rebuilt from the shipped files: ``definition; "example"; ...`` per synset, in synset-id order.

    This is the text of the gloss field of WordNet's ``data.*`` files (examples in sorted order),
    so benchmarks and tests get real WordNet text that is identical on every machine without the
    system package.

    Args:
      pos: keep only synsets of this part of speech (``"n"``, ``"v"``, ``"a"``, ``"s"``, ``"r"``);
        None keeps all.
    """
    examples: dict[str, list[str]] = {}
    for e in load_examples():
        examples.setdefault(e.synset_id, []).append(e.text)
    return ["; ".join([s.definition] + [f'"{t}"' for t in examples.get(s.id, ())])
            for s in load_synsets() if pos is None or s.pos == pos]


def in_split_key(key: str, salt: str = "sense_jax") -> float:
    """A deterministic pseudo-random number in [0, 1) for ``key`` (sha256 of salt and key)."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big") / 2**64


def in_split(key: str, fraction: float, salt: str = "sense_jax") -> bool:
    """Deterministic split membership: True for about ``fraction`` of keys."""
    return in_split_key(key, salt) < fraction


def write_gloss_corpus(out: str | Path, max_glosses: int | None = None,
                       heldout: tuple[str | Path, int] | None = None) -> Path:
    """Write definitions as a plain-text corpus, one per line (sorted by synset id), atomically.

    Args:
      max_glosses: keep only the first ``max_glosses`` after a deterministic shuffle by hash.
      heldout: ``(path, n)``: also write the next ``n`` definitions of that order (disjoint from
        the corpus) to ``path``.

    Raises:
      SenseJaxError: more definitions asked for than WordNet has.
    """
    synsets = sorted(load_synsets(), key=lambda s: hashlib.sha256(s.id.encode()).digest())
    n = len(synsets) if max_glosses is None else max_glosses
    n_held = heldout[1] if heldout else 0
    if n + n_held > len(synsets):
        raise SenseJaxError(f"asked for {n} + {n_held} definitions; WordNet 3.0 has {len(synsets)}")
    parts = [(out, synsets[:n])] + ([(heldout[0], synsets[n:n + n_held])] if heldout else [])
    for path, chosen in parts:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(s.definition + "\n" for s in sorted(chosen, key=lambda s: s.id)), encoding="utf-8")
        tmp.replace(path)
    return Path(out)


@lru_cache(maxsize=2)
def load_sense_keys(data_dir: Path | None = None) -> dict[str, tuple[str, int]]:
    """WordNet 3.0 sense key -> (synset id, sense number), for all 206,949 senses.

    Keys as in senseidx(5WN) (``bank%1:17:01::``); the sense number is the synset's rank among the
    lemma's synsets of that part of speech (1 = first, WordNet's most frequent sense).
    """
    return {k: (s, int(n)) for k, s, n in _rows("sensekeys.tsv.gz", data_dir)}
