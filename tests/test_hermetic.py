"""The test suite and the benchmarks read nothing outside the repository, its virtualenv and a
temporary directory (issue 11 item 1): no file under tests/ or eval/ names an absolute system
path, and eval/derive_wordnet.py, the one script that needs the system's WordNet package, stops
with one line when the package is absent."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Absolute paths a fresh machine may lack or hold something else at; temporary directories come
# from tmp_path or tempfile, never from a literal path.
SYSTEM_PATH = re.compile(
    r"(?<![\w.~$-])/(?:usr|etc|home|opt|var|root|mnt|srv|media|proc|sys|work|tmp|Users|nix|snap|lib|bin)(?=/|\b)")
# The script that rebuilds sense_jax/data/wordnet from the Debian package wordnet-base.
ALLOWED = {"eval/derive_wordnet.py"}
# A line may opt out with this marker and a reason, for a read that describes the machine and has
# a fallback (a benchmark naming its CPU), never for an input the result depends on.
OPT_OUT = "# hermetic: ok"


def test_no_test_or_benchmark_names_a_system_path():
    found = []
    for folder in ("tests", "eval"):
        for path in sorted((ROOT / folder).rglob("*")):
            rel = path.relative_to(ROOT).as_posix()
            if not path.is_file() or rel in ALLOWED or "__pycache__" in rel:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for n, line in enumerate(text.splitlines(), 1):
                m = SYSTEM_PATH.search(line)
                if m and OPT_OUT not in line:
                    found.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not found, "absolute system paths in tests/benchmarks:\n" + "\n".join(found)


def test_pattern_catches_the_old_fixture():
    # Built from parts so that this file does not name the paths it forbids.
    for top, rest in (("usr", "share/wordnet/data.noun"), ("etc", "hosts"), ("home", "me/x"), ("opt", "x"),
                      ("var", "lib/x"), ("usr", "lib/x")):
        assert SYSTEM_PATH.search(f'WORDNET = Path("/{top}/{rest}")'), top
    assert not SYSTEM_PATH.search("sense_jax/data/wordnet/synsets.tsv.gz")
    assert not SYSTEM_PATH.search("rows / bucket/len")


def test_opt_outs_are_few_and_give_a_reason():
    marked = [(p.relative_to(ROOT).as_posix(), line) for folder in ("tests", "eval")
              for p in (ROOT / folder).rglob("*.py") if p.name != "test_hermetic.py"
              for line in p.read_text(encoding="utf-8").splitlines() if OPT_OUT in line]
    assert len(marked) <= 2, marked
    assert all(re.search(re.escape(OPT_OUT) + r" \(\w[^)]+\)", line) for _, line in marked), marked


def test_derive_wordnet_stops_with_one_line_without_the_system_package(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "eval.derive_wordnet", "--wordnet", str(tmp_path / "absent"),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "wordnet-base" in lines[0] and "absent" in lines[0], r.stderr
    assert not out.exists()
