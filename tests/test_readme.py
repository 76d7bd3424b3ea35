"""The README's command-line synopsis names every subcommand and every option the parser has."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from sense_jax import cli

README = Path(__file__).resolve().parents[1] / "README.md"
EVERY_COMMAND = {"--help", "--compile-cache", "--no-compile-cache"}  # the synopsis's last line


def _synopsis() -> dict[str, str]:
    """{command: its synopsis text (first line and continuation lines)} from the README's
    "## Command line" code block."""
    text = README.read_text(encoding="utf-8")
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    out: dict[str, str] = {}
    command = None
    for line in block.splitlines():
        m = re.match(r"sense-jax (\S+)", line)
        if m:
            command = m[1]
            out[command] = line
        elif line.startswith(" ") and command:
            out[command] += " " + line.strip()
        elif line.strip():
            command = None
    return out


def test_readme_synopsis_lists_every_command_and_option():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    synopsis = _synopsis()
    assert set(synopsis) == set(sub.choices), "commands in the README vs the parser"
    missing = []
    for name, sp in sub.choices.items():
        for action in sp._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt not in EVERY_COMMAND and \
                        not re.search(rf"{re.escape(opt)}(?![\w-])", synopsis[name]):
                    missing.append(f"{name} {opt}")
    assert not missing, f"options missing from the README's synopsis: {missing}"
    assert "--compile-cache DIR | --no-compile-cache" in README.read_text(encoding="utf-8")


def test_readme_presets_are_the_trainers():
    from sense_jax import trainer

    presets = re.search(r"--preset ([\w|]+)\]", _synopsis()["distill"])[1].split("|")
    assert sorted(presets) == sorted(trainer.PRESETS)
