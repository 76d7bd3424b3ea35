"""The whole job, old against new: `sense-jax pipeline` at an old commit and at this checkout, on
the same settings, interleaved, with the time of every stage, the peak host memory and the
report's figures side by side (issue 15's goal: the default run in <= 50% of commit 8950cb9's
wall time, figures unchanged within noise).

    python -m eval.bench_pipeline                                 # the default run (long)
    python -m eval.bench_pipeline --set n_glosses=5000            # where compilation weighs more
    python -m eval.bench_pipeline --old 8950cb9 --rounds 2 --set n_glosses=2000 --set n_per_token=100

The old commit is checked out with `git worktree add --detach` into a temporary folder and run
with this checkout's virtualenv (its code first on PYTHONPATH); runs alternate old/new (round r
starts with the other one), so that a change of machine load falls on both. Every new run gets
an empty persistent compilation cache of its own (SENSE_JAX_COMPILE_CACHE), so the new code's
figure is a first run, compile included; the old commit has no such cache. Peak memory is the
child process's maximum resident set size (``os.wait4``'s ru_maxrss, KiB on Linux).

Prints one table per round (seconds per stage, new/old ratio) and the report figures that differ
by more than ``--rtol``. Needs git and the old commit in this repository's history.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"^\[(\w+)\] (\d+)s(?:$|, peak RSS so far)")  # older commits end at "s"
CLI = "import sys; from sense_jax.cli import main; sys.exit(main(sys.argv[1:]))"


def run_pipeline(code_dir: Path, out: Path, sets: list[str], cache_dir: Path) -> dict:
    """One `sense-jax pipeline --out OUT --set ...` with ``code_dir`` first on PYTHONPATH.

    Returns:
      ``{"wall": s, "stages": {name: s}, "max_rss_gib": GiB, "rc": exit status, "tail": last
      lines of the output}``.
    """
    env = dict(os.environ, PYTHONPATH=str(code_dir), SENSE_JAX_COMPILE_CACHE=str(cache_dir))
    cmd = [sys.executable, "-c", CLI, "pipeline", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    t = time.perf_counter()
    log = out.with_suffix(".log")
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=code_dir, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    stages = {m[1]: float(m[2]) for m in map(STAGE_LINE.match, lines) if m}
    return {"wall": wall, "stages": stages, "max_rss_gib": usage.ru_maxrss / 2**20,
            "rc": os.waitstatus_to_exitcode(status), "tail": lines[-5:]}


def flat_numbers(obj, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a JSON tree, keyed by its path (``a/b/0``)."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return {prefix: float(obj)} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}
    out = {}
    for k, v in items:
        out.update(flat_numbers(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def compare_reports(old: Path, new: Path, rtol: float) -> list[str]:
    """Lines ``key: old -> new`` for the report figures both runs wrote that differ by > rtol
    (timings and throughput left out: they are this benchmark's other half)."""
    try:
        a, b = (flat_numbers(json.loads((d / "report" / "report.json").read_text(encoding="utf-8"))) for d in (old, new))
    except (OSError, ValueError) as e:
        return [f"(no report to compare: {e})"]
    skip = re.compile(r"time|timings|tokens_per_s|seconds|_s$|wall", re.I)
    out = []
    for k in sorted(set(a) & set(b)):
        if skip.search(k):
            continue
        if abs(a[k] - b[k]) > rtol * max(abs(a[k]), abs(b[k]), 1e-12):
            out.append(f"  {k}: {a[k]:.4g} -> {b[k]:.4g}")
    only = len(set(a) ^ set(b))
    if only:
        out.append(f"  ({only} figures are in one report only)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="8950cb9", help="the commit to compare with (default 8950cb9)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a pipeline setting for both runs (repeatable)")
    ap.add_argument("--rounds", type=int, default=1, help="old/new pairs, alternating which runs first")
    ap.add_argument("--work", default="", help="folder for the runs (default: a temporary one, removed)")
    ap.add_argument("--rtol", type=float, default=0.02, help="report figures differing by more are listed")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_pipeline-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        old_dir = work / f"code-{args.old}"
        if not old_dir.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old_dir), args.old],
                           check=True)
        try:
            print(f"settings: {args.set or 'defaults'}; old = {args.old}, new = {ROOT} "
                  f"({subprocess.run(['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}); "
                  f"load average at start {os.getloadavg()[0]:.1f}")
            for r in range(args.rounds):
                order = [("old", old_dir), ("new", ROOT)]
                results = {}
                for name, code in (order if r % 2 == 0 else order[::-1]):
                    out = work / f"{name}-{r}"
                    res = run_pipeline(code, out, args.set, work / f"cache-{name}-{r}")
                    results[name] = res
                    print(f"round {r} {name}: rc {res['rc']}, {res['wall']:.0f} s, peak RSS "
                          f"{res['max_rss_gib']:.2f} GiB, load {os.getloadavg()[0]:.1f}", flush=True)
                    if res["rc"]:
                        print("\n".join(res["tail"]))
                old, new = results["old"], results["new"]
                print(f"\n| round {r} | old {args.old} (s) | new (s) | new/old |\n|---|---|---|---|")
                for stage in dict.fromkeys([*old["stages"], *new["stages"]]):
                    o, n = old["stages"].get(stage), new["stages"].get(stage)
                    ratio = f"{n / o:.2f}" if o and n is not None else "-"
                    print(f"| {stage} | {o if o is not None else '-'} | {n if n is not None else '-'} | {ratio} |")
                print(f"| whole run (wall) | {old['wall']:.0f} | {new['wall']:.0f} | {new['wall'] / old['wall']:.2f} |")
                print(f"| peak RSS (GiB) | {old['max_rss_gib']:.2f} | {new['max_rss_gib']:.2f} | |")
                diffs = compare_reports(work / f"old-{r}", work / f"new-{r}", args.rtol)
                print(f"\nreport figures differing by more than {args.rtol:g} (relative):")
                print("\n".join(diffs) if diffs else "  none")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_dir)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
