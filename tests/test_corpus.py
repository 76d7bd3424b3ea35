"""Corpus readers (sense_jax.corpus) on what real text files contain (issue 11 item 2):
byte-order marks, Windows / old-Mac line ends, Unicode line separators, UTF-16, and damaged
compressed files, through the reader, the trainer's read_passages and ``sense-jax extract``."""

from __future__ import annotations

import bz2
import gzip
import lzma
import sys
from pathlib import Path

import pytest

from sense_jax.corpus import CorpusStats, iter_passages
from sense_jax.errors import SenseJaxError

sys.path.insert(0, str(Path(__file__).parent))
from extract_worker import make_tiny_teacher  # noqa: E402


def _read(path, field="text"):
    stats = CorpusStats()
    return list(iter_passages(path, field, stats)), stats


def test_utf8_bom_keeps_the_first_record_and_passage(tmp_path):
    js = tmp_path / "a.jsonl"
    js.write_bytes(b'\xef\xbb\xbf{"text": "first record"}\n{"text": "second record"}\n')
    passages, st = _read(js)
    assert passages == ["first record", "second record"]
    assert (st.malformed_skipped, st.bom_stripped) == (0, 1)
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"\xef\xbb\xbffirst passage\nsecond passage\n")
    passages, st = _read(txt)
    assert passages == ["first passage", "second passage"] and st.bom_stripped == 1
    # gzipped, and a mark at the start of a later line (two marked files joined with cat)
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(b'\xef\xbb\xbf{"text": "x"}\n\xef\xbb\xbf{"text": "y"}\n'))
    passages, st = _read(gz)
    assert passages == ["x", "y"] and st.bom_stripped == 2


def test_utf16_with_a_bom_is_decoded(tmp_path):
    for enc in ("utf-16-le", "utf-16-be"):
        f = tmp_path / f"{enc}.txt"
        bom = b"\xff\xfe" if enc.endswith("le") else b"\xfe\xff"
        f.write_bytes(bom + "caf\u00e9 one\r\nsecond\r\n".encode(enc))
        passages, st = _read(f)
        assert passages == ["caf\u00e9 one", "second"]
        assert (st.bom_stripped, st.crlf_line_endings, st.undecodable_replaced) == (1, 2, 0)


def test_old_mac_line_ends_give_three_passages(tmp_path):
    f = tmp_path / "mac.txt"
    f.write_bytes(b"first passage\rsecond passage\rthird passage\r")
    passages, st = _read(f)
    assert passages == ["first passage", "second passage", "third passage"]
    assert (st.lines, st.cr_line_endings, st.crlf_line_endings) == (3, 3, 0)
    # the same as Python's universal newlines, also through gzip and a chunk boundary
    big = b"".join(b"passage %d\r" % i for i in range(20000))
    g = tmp_path / "mac.txt.gz"
    g.write_bytes(gzip.compress(big))
    assert _read(g)[0] == big.decode().splitlines()


def test_line_ends_and_unicode_separators_decided_once(tmp_path):
    f = tmp_path / "mixed.txt"
    f.write_bytes("a\r\nb\nc\rd\u2028e\u2029f\u0085g\n\r\n\rbad \xff\n".encode("utf-8").replace(
        "\xff".encode(), b"\xff"))
    passages, st = _read(f)
    assert passages == ["a", "b", "c", "d e f g", "bad \ufffd"]
    assert (st.lines, st.crlf_line_endings, st.cr_line_endings, st.separators_replaced,
            st.empty_skipped, st.undecodable_replaced) == (7, 2, 2, 3, 2, 1)
    # a JSONL record may hold U+2028 raw (valid JSON): one record, one passage
    js = tmp_path / "sep.jsonl"
    js.write_text('{"text": "one\u2028two"}\r\n{"text": "three"}\r\n', encoding="utf-8", newline="")
    passages, st = _read(js)
    assert passages == ["one two", "three"] and (st.malformed_skipped, st.crlf_line_endings) == (0, 2)


def test_trainer_reads_the_same_passages(tmp_path):
    from sense_jax.trainer import read_passages

    f = tmp_path / "mac.txt"
    f.write_bytes(b"\xef\xbb\xbffirst passage\rsecond passage\rthird passage\r")
    assert read_passages(str(f)) == ["first passage", "second passage", "third passage"]


def _lines(n=2000) -> bytes:
    return b"".join(b"line %d of a corpus with a few words\n" % i for i in range(n))


def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize("name, data, kind", [
    ("flipped.txt.gz", _flip(gzip.compress(_lines(), mtime=0), 20), "zlib.error"),
    ("crc.txt.gz", _flip(gzip.compress(_lines(), mtime=0), -6), "BadGzipFile"),
    ("cut.txt.gz", gzip.compress(_lines(), mtime=0)[:-200], "EOFError"),
    ("header.jsonl.gz", b"\x1f\x8b\x08" + b"\x00" * 3, "EOFError"),
    ("flipped.txt.bz2", _flip(bz2.compress(_lines()), 200), "OSError"),
    ("flipped.txt.xz", _flip(lzma.compress(_lines()), 200), "LZMAError"),
])
def test_damaged_compressed_file_is_refused_by_name(tmp_path, name, data, kind):
    f = tmp_path / name
    f.write_bytes(data)
    with pytest.raises(SenseJaxError, match=rf"corpus file .*{name} is unreadable, corrupt or truncated \({kind}"):
        _read(f)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, minilm_dir):
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher") / "t", minilm_dir)


@pytest.mark.parametrize("damage", ["flipped", "cut"])
def test_extract_on_a_damaged_gz_exits_2_and_leaves_nothing(tmp_path, teacher, capsys, damage):
    from sense_jax.cli import main

    z = gzip.compress(_lines(), mtime=0)
    corpus = tmp_path / "corpus.txt.gz"
    corpus.write_bytes(_flip(z, 20) if damage == "flipped" else z[:-200])
    out = tmp_path / "store"
    assert main(["extract", str(teacher), str(corpus), str(out), "-n", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(corpus) in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt.gz"]


def test_jsonl_records_json_accepts_but_text_cannot_hold(tmp_path):
    """A 5,000-digit number and 100,000-deep nesting (ValueError / RecursionError from json) are
    malformed lines, not crashes; a lone surrogate escape (a cut emoji) becomes U+FFFD."""
    js = tmp_path / "odd.jsonl"
    js.write_text('{"text": "ok"}\n' + "1" * 5000 + "\n" + "[" * 100000 + "]" * 100000 + "\n"
                  + '{"text": "cut \\ud83d emoji"}\n', encoding="utf-8")
    passages, st = _read(js)
    assert passages == ["ok", "cut \ufffd emoji"]
    assert (st.malformed_skipped, st.undecodable_replaced) == (2, 1)


def test_distill_on_a_damaged_gz_exits_2_and_leaves_nothing(tmp_path, capsys):
    from sense_jax.cli import main

    corpus = tmp_path / "train.txt.gz"
    corpus.write_bytes(_flip(gzip.compress(_lines(), mtime=0), 20))
    out = tmp_path / "run"
    assert main(["distill", "--set", f"train_data={corpus}", "--set", f"out_dir={out}",
                 "--set", f"senses={tmp_path / 'senses'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(corpus) in err[0] and "zlib.error" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.txt.gz"]
