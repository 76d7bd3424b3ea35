"""Run metrics: ``metrics.jsonl`` (+ TensorBoard when tensorboardX is installed) and ``curves.png``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax


class MetricsWriter:
    """metrics.jsonl (+ TensorBoard when tensorboardX is installed)."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        kept = []
        if resume_step is not None and self.path.exists():  # drop records past the restored step
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
        self.f = None
        if jax.process_index() == 0:  # one writer in a multi-host run
            with open(self.path, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in kept))
            self.f = open(self.path, "a", encoding="utf-8")
        self.records = [json.loads(line) for line in kept]
        self.tb = None
        if tensorboard and jax.process_index() == 0:
            try:
                from tensorboardX import SummaryWriter  # optional: no event files without it

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass

    def write(self, rec: dict) -> None:
        self.records.append(rec)
        if jax.process_index() == 0:
            self.f.write(json.dumps(rec, sort_keys=True) + "\n")
            self.f.flush()
            if self.tb is not None:
                for k, v in rec.items():
                    if k not in ("step", "kind") and isinstance(v, (int, float)):
                        self.tb.add_scalar(f"{rec.get('kind', 'train')}/{k}", v, rec["step"])

    def close(self):
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def plot_curves(records: list[dict], out: Path) -> Path | None:
    """Write ``out`` (PNG): training loss, sense accuracy (train and held-out) against the step
    (the accuracy panel stays empty for a run without a dictionary; a task run's panel shows
    its train and dev accuracy, and no dev points when its metrics have no ``accuracy``)."""
    try:
        import matplotlib  # optional and heavy: only the plot needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [r for r in records if r.get("kind") == "train"]
    # A task run's dev records hold the task's metrics (pearson, accuracy_matched, ...), which
    # need not include accuracy: only the records that have it are drawn.
    ev = [r for r in records if r.get("kind") == "eval" and "accuracy" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    axes[0].set_xlabel("step"), axes[0].set_ylabel("loss"), axes[0].legend()
    scored = [r for r in train if "accuracy" in r]
    axes[1].plot([r["step"] for r in scored], [r["accuracy"] for r in scored], label="train")
    if ev:
        axes[1].plot([r["step"] for r in ev], [r["accuracy"] for r in ev], "o-", label="held-out")
    axes[1].set_xlabel("step"), axes[1].set_ylabel("sense accuracy"), axes[1].legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out

