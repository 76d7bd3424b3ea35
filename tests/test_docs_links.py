"""Every relative link of README.md and docs/*.md names a file that exists and, with `#anchor`,
a heading of that file (GitHub's slug rule), and every docs page is reachable from the README."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text without fenced blocks (whose `#` lines are comments, and whose brackets are code)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped but for '-' and '_', each
    space a '-' (github/cmark-gfm's anchor rule; '§', '×', '`', ':' and '/' are dropped)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", _prose(path.read_text(encoding="utf-8")), re.M):
        s = slug(m[1])
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def local_links(path: Path) -> list[str]:
    """Targets of the file's markdown links that are not URLs."""
    text = CODE_SPAN.sub("", _prose(path.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_slug_follows_github():
    assert slug("`sense-jax convert`: transformers -> sense_jax") == "sense-jax-convert-transformers---sense_jax"
    assert slug("Results of the default run (WordNet, 2 CPU cores)") == \
        "results-of-the-default-run-wordnet-2-cpu-cores"
    assert slug("Where a training step's time goes") == "where-a-training-steps-time-goes"
    assert slug("Evaluation suite (METHOD §5, `x.py`)") == "evaluation-suite-method-5-xpy"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in local_links(page):
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            where = f"{page.relative_to(ROOT)} -> {target}"
            if not dest.is_file():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no such heading")
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme():
    docs = sorted(p.name for p in PAGES[1:])
    assert docs, "docs/ holds no pages"
    linked = {Path(t.partition("#")[0]).name for t in local_links(ROOT / "README.md")
              if t.startswith("docs/")}
    assert not set(docs) - linked, f"docs pages the README never links: {set(docs) - linked}"
