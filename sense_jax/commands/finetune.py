"""``sense-jax finetune MODEL DATA OUT``: fine-tune a model with a sequence classification head.

The same trainer as ``sense-jax distill`` (``sense_jax/trainer.py``; the task parts in
``sense_jax/task_train.py``): AdamW with warmup then cosine decay, the dev split evaluated every
``eval_every`` steps with the task's metric, early stopping after ``patience`` evaluations without
improvement, the best checkpoint kept (``OUT/best``), exact resume (run the same command again).
At the end the best checkpoint is exported to ``OUT/model``: a transformers directory that
``AutoModelForSequenceClassification`` loads, with ``id2label`` / ``label2id`` and
``label_vocabulary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from sense_jax.errors import ConfigError

HELP = "fine-tune a model with a classification head on labelled data (then: distill --set task=...)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory (transformers or converted; a head with the data's labels is kept)")
    p.add_argument("data", nargs="?", default="",
                   help="the task's data: a directory of train and dev files (TSV, CSV, JSONL) or a saved "
                        "DatasetDict; for --task, the task's directory (none for wordnet-lexfile)")
    p.add_argument("out", help="run directory (checkpoints, best/, metrics.jsonl; the export in OUT/model)")
    p.add_argument("--task", default="", help="named task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, "
                                              "wic, wordnet-lexfile (fields, labels and metrics from the task table)")
    p.add_argument("--text-fields", default="", help="your data: text field(s), sentence1[,sentence2]")
    p.add_argument("--label-field", default="label", help="your data: the label field (default label)")
    p.add_argument("--regression", action="store_true", help="your data: real-valued labels (one output, MSE)")
    p.add_argument("--config", metavar="FILE", help="run config (.json, .yaml or .yml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable), as sense-jax distill")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def config_from_args(args: argparse.Namespace):
    """The run config: the ``finetune`` preset, the file, the positional arguments and flags,
    then ``--set`` (which wins)."""
    from sense_jax import trainer  # the library when the command runs (see run)

    given = [f"teacher={args.model}", f"task_data={args.data}", f"out_dir={args.out}",
             f"task={args.task}", f"text_fields={args.text_fields}", f"label_field={args.label_field}",
             f"task_regression={str(args.regression).lower()}"]
    cfg = trainer.load_config(args.config, [*given, *args.overrides], preset="finetune")
    if cfg.objective != "finetune":
        raise ConfigError(f"config: objective={cfg.objective!r}: sense-jax finetune trains objective=finetune "
                          "(task distillation is sense-jax distill --set task=...)")
    if not cfg.task and not cfg.text_fields:
        raise ConfigError("give --task NAME, or --text-fields FIELD[,FIELD] (and --label-field) for your own data")
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True))
        return 0
    # The library (JAX, models) is imported when the command runs: `sense-jax --help` imports every command module.
    import jax

    from sense_jax import trainer
    from sense_jax.task_train import export_task

    result = trainer.train(cfg)
    if jax.process_index() != 0:
        return 0
    out = export_task(cfg.out_dir, Path(cfg.out_dir) / "model", overwrite=True)
    evals = [r for r in result.history if r.get("kind") == "eval"]
    best = json.loads((out / "sense_jax_task.json").read_text(encoding="utf-8"))["best"]
    msg = f"fine-tuned to step {int(result.state.step)} in {result.run_dir}"
    if evals:
        msg += f"; best dev {best['metric']} {best['value']:.4f} at step {best['step']}"
    print(msg + f"; exported to {out} (AutoModelForSequenceClassification)")
    return 0
