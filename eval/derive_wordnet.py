"""Derive sense_jax's compact WordNet 3.0 files from the Debian package wordnet-base.

Reads ``/usr/share/wordnet/data.{noun,verb,adj,adv}`` (the WordNet database files, format in
wndb(5WN)) and the lexicographer-file names from the package's lexnames(5WN) man page, and writes
to ``sense_jax/data/wordnet/``:

    synsets.tsv.gz   synset_id  pos  lexname  lemmas (|-joined)  definition
    examples.tsv.gz  synset_id  example      (the usage examples quoted in each gloss)
    sensekeys.tsv.gz sense_key  synset_id  sense_number   (every sense of WordNet 3.0, as in
                     senseidx(5WN); the Debian package has no index.sense, so the keys are
                     rebuilt from data.* and the sense order from index.*; the WSD benchmark reads it)
    sensecounts.tsv.gz sense_key  tag_cnt   (how often each sense was tagged in WordNet's semantic
                     concordances, SemCor among them: cntlist.rev, cntlist(5WN); senses never tagged
                     are absent; the WSD benchmark's sense prior)
    LICENSE          WordNet 3.0's licence, which must accompany every copy

The output is deterministic (sorted rows, gzip mtime 0), so re-running it on the same package
reproduces the shipped files byte for byte.

    apt-get install wordnet-base && python -m eval.derive_wordnet
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
import sys
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
COPYRIGHT = Path("/usr/share/doc/wordnet-base/copyright")
OUT = Path(__file__).resolve().parents[1] / "sense_jax" / "data" / "wordnet"
POS_FILES = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}


def read_lexnames(man_page: Path = LEXNAMES_MAN) -> dict[int, str]:
    """Lexicographer file number -> name (``05 -> noun.animal``), from the lexnames(5WN) page."""
    text = gzip.decompress(man_page.read_bytes()).decode("utf-8", "replace")
    names = {int(m.group(1)): m.group(2) for m in re.finditer(r"^(\d\d)\s+(\w+\.\w+)", text, re.M)}
    if len(names) != 45:
        raise SystemExit(f"{man_page}: expected 45 lexicographer files, found {len(names)}")
    return names


def parse_data_line(line: str) -> tuple[str, str, int, list[str], str]:
    """One data.* line -> (offset, ss_type, lex_filenum, lemmas, gloss), see wndb(5WN)."""
    head, _, gloss = line.partition(" | ")
    f = head.split()
    offset, lex_filenum, ss_type, w_cnt = f[0], int(f[1]), f[2], int(f[3], 16)
    lemmas = [re.sub(r"\((a|p|ip)\)$", "", f[4 + 2 * i]) for i in range(w_cnt)]
    return offset, ss_type, lex_filenum, lemmas, gloss.strip()


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """A gloss -> (definition, usage examples); examples are the double-quoted parts."""
    examples = [e.strip() for e in re.findall(r'"([^"]+)"', gloss) if e.strip()]
    definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
    return definition, examples


SS_TYPE_NUMBER = {"n": 1, "v": 2, "a": 3, "r": 4, "s": 5}


def sense_key_rows(wordnet: Path) -> list[str]:
    """``sense_key<TAB>synset_id<TAB>sense_number`` rows for every sense (senseidx(5WN)).

    A key is ``lemma%ss_type:lex_filenum:lex_id:head_word:head_id``: lemma lower-cased, lex_id the
    word's hex digit in data.* as two decimal digits; for adjective satellites head_word/head_id
    are the first word (and its lex_id) of the head synset that the ``&`` pointer names. The
    sense number is the synset's rank in the lemma's line of index.<pos> (WordNet's frequency order).
    """
    synsets = {}  # (pos_file, offset) -> (ss_type, lex_filenum, [(lemma, lex_id)], head offset)
    for pos_file in POS_FILES:
        with open(wordnet / f"data.{pos_file}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                fields = line.partition(" | ")[0].split()
                offset, lexnum, ss_type, w_cnt = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
                words = [(re.sub(r"\((a|p|ip)\)$", "", fields[4 + 2 * i]).lower(), int(fields[5 + 2 * i], 16))
                         for i in range(w_cnt)]
                p = 4 + 2 * w_cnt
                head = None
                for j in range(int(fields[p])):
                    sym, off, pos = fields[p + 1 + 4 * j:p + 4 + 4 * j]
                    if sym == "&" and ss_type == "s" and pos == "a" and head is None:
                        head = off
                synsets[(pos_file, offset)] = (ss_type, lexnum, words, head)
    rank = {}
    for pos_file in POS_FILES:
        with open(wordnet / f"index.{pos_file}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                x = line.split()
                lemma, synset_cnt, p_cnt = x[0], int(x[2]), int(x[3])
                for n, off in enumerate(x[4 + p_cnt + 2:4 + p_cnt + 2 + synset_cnt], 1):
                    rank[(pos_file, lemma, off)] = n
    rows = []
    for (pos_file, offset), (ss_type, lexnum, words, head) in synsets.items():
        head_word = head_id = ""
        if ss_type == "s":
            h_word, h_id = synsets[("adj", head)][2][0]
            head_word, head_id = h_word, f"{h_id:02d}"
        for lemma, lex_id in words:
            key = f"{lemma}%{SS_TYPE_NUMBER[ss_type]}:{lexnum:02d}:{lex_id:02d}:{head_word}:{head_id}"
            rows.append(f"{key}\t{offset}-{ss_type}\t{rank[(pos_file, lemma, offset)]}\n")
    return sorted(set(rows))


def sense_count_rows(wordnet: Path, keys: set[str]) -> tuple[list[str], int]:
    """``sense_key<TAB>tag_cnt`` rows from cntlist.rev (``sense_key sense_number tag_cnt``), and
    how many of its lines were left out: the file also counts 1,992 keys of earlier WordNet
    versions that are not WordNet 3.0 sense keys (9,908 of its 258,691 tags).

    Raises:
      SystemExit: a line of another layout.
    """
    rows, stale = [], 0
    with open(wordnet / "cntlist.rev", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            x = line.split()
            if len(x) != 3 or not x[2].isdigit():
                raise SystemExit(f"{wordnet / 'cntlist.rev'}:{n}: expected 'sense_key sense_number tag_cnt'")
            if x[0] not in keys:
                stale += 1
            elif int(x[2]):
                rows.append(f"{x[0]}\t{int(x[2])}\n")
    return sorted(rows), stale


def _write_gz(path: Path, rows: list[str]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        gz.write("".join(rows).encode("utf-8"))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wordnet", type=Path, default=WORDNET)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    # Only this script reads the system package; without it, say so in one line and touch nothing.
    for needed in (args.wordnet / "data.noun", LEXNAMES_MAN, COPYRIGHT):
        if not needed.exists():
            print(f"{needed} not found: this script rebuilds sense_jax/data/wordnet from the Debian package "
                  f"wordnet-base (apt-get install wordnet-base); the shipped files need no rebuild", file=sys.stderr)
            raise SystemExit(2)
    lexnames = read_lexnames()
    synsets, examples = [], []
    for pos_file in POS_FILES:
        with open(args.wordnet / f"data.{pos_file}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):  # licence header
                    continue
                offset, ss_type, lexnum, lemmas, gloss = parse_data_line(line)
                definition, exs = split_gloss(gloss)
                sid = f"{offset}-{ss_type}"
                clean = lambda s: s.replace("\t", " ").replace("\n", " ")
                synsets.append(f"{sid}\t{ss_type}\t{lexnames[lexnum]}\t{'|'.join(lemmas)}\t{clean(definition)}\n")
                examples.extend(f"{sid}\t{clean(e)}\n" for e in exs)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_gz(args.out / "synsets.tsv.gz", sorted(synsets))
    _write_gz(args.out / "examples.tsv.gz", sorted(examples))
    keys = sense_key_rows(args.wordnet)
    _write_gz(args.out / "sensekeys.tsv.gz", keys)
    counts, stale = sense_count_rows(args.wordnet, {k.split("\t", 1)[0] for k in keys})
    _write_gz(args.out / "sensecounts.tsv.gz", counts)
    (args.out / "LICENSE").write_text(COPYRIGHT.read_text(encoding="utf-8"), encoding="utf-8")
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"{len(synsets)} synsets, {len(examples)} usage examples, {len(keys)} sense keys, {len(counts)} "
          f"tagged senses ({stale} cntlist keys not in WordNet 3.0 left out) -> {args.out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
