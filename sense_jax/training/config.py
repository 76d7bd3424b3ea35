"""The SKD run configuration (plain data): fields, presets, validation, loading (``--set``)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Sequence

from sense_jax.config import load_config as _resolve
from sense_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Run configuration (plain data). Every field can be set in the config file or by --set."""

    # Inputs.
    teacher: str = ""                # teacher model dir (transformers or converted); "" = demo MiniLM
    senses: str = ""                 # sense dictionary directory (SenseDictionary.save) of that teacher
                                     # (unused when skd_weight = 0: the MSE baseline needs none)
    train_data: str = ""             # corpus: text / JSONL / directory / .gz (sense_jax.corpus)
    eval_data: str = ""              # held-out corpus; "" = hold out eval_fraction of train_data
    text_field: str = "text"         # JSONL field holding the text
    eval_fraction: float = 0.05      # share of passages held out when eval_data is ""
    out_dir: str = "runs/distill"    # run directory (checkpoints, metrics, curves)
    # Student.
    student: str = "truncate"        # "truncate" (first L teacher layers), "fresh", or a model dir
    student_layers: int = 2          # L for truncate / fresh
    student_hidden_size: int = 0     # fresh: width (0 = teacher's)
    student_heads: int = 0           # fresh: attention heads (0 = teacher's, or width / teacher head dim)
    student_intermediate_size: int = 0  # fresh: MLP width (0 = teacher's, or 4 x width)
    # Objective.
    skd_weight: float = 1.0          # weight of the SKD cross-entropy
    mse_weight: float = 0.0          # weight of the hidden-state MSE baseline
    metric: str = "dot"              # sense score: dot (paper), cos, l2
    # Optimisation.
    seed: int = 0                    # student init, data order, RNG
    steps: int = 1000                # optimizer updates
    batch_size: int = 32             # passages per micro-batch (global, across devices); packed rows
                                     # with pack_length > 0
    grad_accum: int = 1              # micro-batches per update
    max_length: int = 128            # tokens per passage (truncated; the pad length's cap)
    pad_to_buckets: bool = True      # pad each step to the smallest length bucket that holds it
    group_by_length: int = 0         # sort passages by length in windows of this many micro-batches (0 = off)
    pack_length: int = 0             # > 0: pack several passages into rows of this many tokens (segment ids;
                                     # >= max_length; batch_size counts rows; one step shape, little padding;
                                     # pad_to_buckets is moot). 0: one passage per row (PassageStream)
    learning_rate: float = 5e-4      # peak learning rate
    warmup_steps: int = 100          # linear warmup from 0
    end_learning_rate: float = 0.0   # value at the end of the cosine decay
    weight_decay: float = 0.01       # AdamW decoupled decay (matrices only)
    b1: float = 0.9                  # Adam beta1
    b2: float = 0.999                # Adam beta2
    clip_norm: float = 1.0           # global gradient-norm clip (0 = off)
    compute_dtype: str = "float32"   # float32 or bfloat16 activations (params stay float32; no float16)
    teacher_cache: str = "auto"     # the teacher's SKD targets (and MSE states) computed once and reused
                                     # (sense_jax.teacher_cache): "off" (the teacher runs in every step),
                                     # "on" (built in out_dir/teacher_cache), "auto" (as "on" when the run
                                     # sees its passages more than once or the cache is there), or a path
    teacher_cache_max_bytes: int = 2 << 30  # cache the teacher's hidden states (for mse_weight > 0) only
                                     # when they take at most this many bytes; else the teacher runs
    freeze_embeddings: bool = False  # keep the student's input embeddings (word, position, type) as
                                     # initialised (a truncated student: the teacher's): no gradient,
                                     # no optimizer state (2/3 fewer AdamW bytes for a 2-layer MiniLM)
    # Parallelism.
    mesh_data: int = -1              # size of the "data" mesh axis (-1 = devices / mesh_model)
    mesh_model: int = 1              # size of the "model" mesh axis
    fsdp: bool = False               # shard params' embed axis over "data"
    # Bookkeeping.
    save_every: int = 100            # checkpoint every S steps (and at the end)
    keep_checkpoints: int = 3        # keep the last k checkpoints
    eval_every: int = 100            # held-out sense accuracy every E steps (0 = only at the end)
    eval_batches: int = 8            # max held-out batches per evaluation
    log_every: int = 1               # metrics.jsonl / progress bar every N steps
    progress: bool = True            # tqdm progress bar
    tensorboard: bool = True         # also write TensorBoard events when tensorboardX is installed
    plot: bool = True                # write curves.png at the end
    # Task (fine-tuning, task distillation; sense_jax/task_train.py). task = "" and task_data = "":
    # plain SKD on train_data, as above.
    task: str = ""                   # named task (sense_jax.tasks: cola, sst2, mrpc, qqp, stsb, mnli, qnli,
                                     # rte, wnli, wic, wordnet-lexfile) or "" (your data: text_fields, label_field)
    task_data: str = ""              # the task's data (sense_jax.tasks.load_split: a directory of train and
                                     # dev files, a saved DatasetDict; one train file with eval_data the dev file)
    text_fields: str = ""            # your data: "sentence1[,sentence2]"
    label_field: str = "label"       # your data: the label field
    task_regression: bool = False    # your data: real-valued labels (a one-output head, MSE)
    max_train_examples: int = 0      # a seeded sample of this many training examples (0 = all)
    max_eval_examples: int = 0       # the same for each dev split (0 = all)
    objective: str = "skd"           # with a task: skd, task_only, logit_kd, mse; finetune (sense-jax finetune)
    kd_temperature: float = 2.0      # logit_kd: softmax temperature T (Hinton et al. 2015)
    kd_alpha: float = 0.5            # logit_kd: weight of the soft loss (1 - kd_alpha on the task loss)
    sense_replace: bool = False      # the task loss reads the student's states after sense replacement
    patience: int = 0                # early stopping: dev evaluations without improvement (0 = off)

    def __post_init__(self):
        # Every config is checked, also one built directly (the pipeline, tests), not only a loaded one.
        _validate(self)


# A tiny run for a laptop / CI: python -m train.distill --preset runlocal --set senses=... ...
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "runlocal": dict(steps=20, batch_size=4, max_length=32, warmup_steps=2, learning_rate=1e-3,
                     save_every=10, keep_checkpoints=2, eval_every=10, eval_batches=2,
                     student_layers=2, out_dir="runs/distill-local"),
    # sense-jax finetune: BERT's fine-tuning recipe (Devlin et al. 2019, A.3: lr 2e-5..5e-5, batch
    # 32, warmup), evaluated on dev every 100 steps, early stopping after 5 evaluations.
    "finetune": dict(objective="finetune", learning_rate=5e-5, batch_size=32, steps=1000, warmup_steps=100,
                     max_length=128, eval_every=100, save_every=100, patience=5, out_dir="runs/finetune"),
}

# Fields that may change between a run and its resume (everything else must match).
# Sharding choices may change too: a checkpoint restores onto any mesh.
RESUMABLE_CHANGES = {"out_dir", "save_every", "keep_checkpoints", "eval_every", "eval_batches",
                     "log_every", "progress", "tensorboard", "plot", "steps", "train_data",
                     "eval_data", "fsdp", "mesh_data", "mesh_model", "patience", "task_data",
                     "max_eval_examples", "teacher_cache", "teacher_cache_max_bytes"}
_FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}


def _validate(cfg: DistillConfig) -> DistillConfig:
    """Raise ConfigError naming the first field out of range (one line, the key and its value)."""
    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ConfigError(f"config: {key}={getattr(cfg, key)!r}: {what}")

    for k, f in _FIELDS.items():  # before the range checks: nan fails them with a misleading reason
        if f.type in (float, "float"):
            need(math.isfinite(getattr(cfg, k)), k, "must be a finite number")
    for k in ("steps", "batch_size", "grad_accum", "max_length", "save_every", "keep_checkpoints",
              "eval_batches", "log_every", "student_layers", "mesh_model"):
        need(getattr(cfg, k) >= 1, k, "must be >= 1")
    for k in ("warmup_steps", "eval_every", "student_hidden_size", "student_heads",
              "student_intermediate_size", "clip_norm", "weight_decay", "skd_weight", "mse_weight",
              "learning_rate", "end_learning_rate", "group_by_length", "teacher_cache_max_bytes",
              "pack_length"):
        need(getattr(cfg, k) >= 0, k, "must be >= 0")
    if not cfg.task and not cfg.task_data:
        need(cfg.skd_weight + cfg.mse_weight > 0, "skd_weight", "skd_weight + mse_weight must be > 0")
        need(cfg.objective == "skd", "objective", "an objective other than skd needs a task (task=NAME or task_data=DIR)")
    else:
        from sense_jax.task_losses import OBJECTIVES  # local: task_losses imports JAX, this module must not

        need(cfg.objective in (*OBJECTIVES, "finetune"), "objective",
             f"choose {', '.join(OBJECTIVES)} (or finetune, which sense-jax finetune sets)")
        need(cfg.kd_temperature > 0, "kd_temperature", "must be > 0")
        need(cfg.objective != "mse" or cfg.mse_weight > 0, "mse_weight",
             "objective=mse needs mse_weight > 0 (the weight of the hidden-state MSE beside the task loss)")
        need(0.0 <= cfg.kd_alpha <= 1.0, "kd_alpha", "must be in [0, 1]")
        need(bool(cfg.task) or bool(cfg.text_fields), "text_fields",
             "your own task data needs text_fields (sentence1[,sentence2]) and label_field")
    if cfg.pack_length:
        need(cfg.pack_length >= cfg.max_length, "pack_length", f"must be 0 or >= max_length={cfg.max_length}")
        need(not cfg.group_by_length, "group_by_length",
             "length grouping is for unpacked batches; set it to 0 with pack_length > 0")
        need(not (cfg.task or cfg.task_data), "pack_length",
             "packing is for SKD on passages; a task run's examples are not packed (set pack_length=0)")
    for k in ("patience", "max_train_examples", "max_eval_examples"):
        need(getattr(cfg, k) >= 0, k, "must be >= 0")
    need(0.0 <= cfg.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)")
    need(cfg.metric in ("dot", "cos", "l2"), "metric", "choose dot, cos or l2")
    need(bool(cfg.teacher_cache.strip()), "teacher_cache", "choose auto, on, off or a directory path")
    need(cfg.compute_dtype in ("float32", "bfloat16"), "compute_dtype",
         "choose float32 or bfloat16 (float16 training would need loss scaling)")
    need(cfg.mesh_data == -1 or cfg.mesh_data >= 1, "mesh_data", "must be -1 or >= 1")
    need(cfg.student in ("truncate", "fresh") or Path(cfg.student).is_dir(), "student",
         "choose 'truncate', 'fresh' or an existing model directory")
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                preset: str = "default") -> DistillConfig:
    """Resolve a run config: preset, then the file (JSON or YAML), then ``key=value`` overrides.

    Args:
      path: a ``.json`` / ``.yaml`` / ``.yml`` file holding a mapping of config keys, or None.
      overrides: ``"key=value"`` strings (the CLI's ``--set``), applied last.
      preset: "default", "runlocal" (a tiny run) or "finetune" (sense-jax finetune).

    Raises:
      ConfigError: unknown preset, unknown key (named, with the closest known key), a value of
        the wrong type or out of range (:meth:`DistillConfig.__post_init__`), or an unreadable file.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return _resolve(DistillConfig, path, overrides, base=PRESETS[preset])
