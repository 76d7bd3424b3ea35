"""Derive sense_jax's compact WordNet 3.0 files from the Debian package wordnet-base.

Reads ``/usr/share/wordnet/data.{noun,verb,adj,adv}`` (the WordNet database files, format in
wndb(5WN)) and the lexicographer-file names from the package's lexnames(5WN) man page, and writes
to ``sense_jax/data/wordnet/``:

    synsets.tsv.gz   synset_id  pos  lexname  lemmas (|-joined)  definition
    examples.tsv.gz  synset_id  example      (the usage examples quoted in each gloss)
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
    (args.out / "LICENSE").write_text(COPYRIGHT.read_text(encoding="utf-8"), encoding="utf-8")
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"{len(synsets)} synsets, {len(examples)} usage examples -> {args.out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
