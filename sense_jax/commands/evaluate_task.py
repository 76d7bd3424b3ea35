"""``sense-jax evaluate-task SOURCE [DATA]``: a classifier's dev figures, with and without senses.

SOURCE is a task run (``sense-jax finetune`` / ``sense-jax distill --set task=...``: its best
checkpoint) or a model directory with a classification head. The task's metrics on its dev
split(s), the same after sense replacement before the head (METHOD §2) when ``--senses`` is
given, and the forward's tokens/s (``sense_jax.task_train.evaluate_task``).
"""

from __future__ import annotations

import argparse
import json
import types

from sense_jax.errors import ConfigError
from sense_jax.io_utils import check_output_file, write_json_atomic

HELP = "score a classifier (task run or model with a head) on a task's dev split, with and without senses"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="task run directory (best checkpoint) or a model directory with a head")
    p.add_argument("data", nargs="?", default="", help="the task's data (as sense-jax finetune)")
    p.add_argument("--task", default="", help="named task (as sense-jax finetune)")
    p.add_argument("--text-fields", default="", help="your data: text field(s), sentence1[,sentence2]")
    p.add_argument("--label-field", default="label", help="your data: the label field")
    p.add_argument("--regression", action="store_true", help="your data: real-valued labels")
    p.add_argument("--senses", default=None, help="sense dictionary of the head's model (the teacher)")
    p.add_argument("--metric", default="dot", choices=("dot", "cos", "l2"), help="sense look-up (default dot)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward batch")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (truncated)")
    p.add_argument("--max-examples", type=int, default=0, help="a seeded sample of each dev split (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sample and wordnet-lexfile split seed")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the figures as JSON")


def run(args: argparse.Namespace) -> int:
    # The library (JAX, models) is imported when the command runs: `sense-jax --help` imports every command module.
    from sense_jax.task_train import evaluate_task, load_classifier, load_task_data

    if args.batch_size < 1 or args.max_length < 2:
        raise ConfigError("--batch-size must be >= 1 and --max-length >= 2")
    if not args.task and not args.text_fields:
        raise ConfigError("give --task NAME, or --text-fields FIELD[,FIELD] (and --label-field) for your own data")
    if args.out:
        check_output_file(args.out)  # before the work, not after it
    evaluator, params = load_classifier(args.source, senses=args.senses, batch_size=args.batch_size,
                                        max_length=args.max_length, metric=args.metric)
    spec = types.SimpleNamespace(task=args.task, task_data=args.data, text_fields=args.text_fields,
                                 label_field=args.label_field, task_regression=args.regression, eval_data="",
                                 seed=args.seed, max_train_examples=0, max_eval_examples=args.max_examples)
    data = load_task_data(spec, vocabulary=evaluator.vocabulary, with_train=evaluator.vocabulary is None)
    if data.vocabulary.num_labels != evaluator.num_labels:
        raise ConfigError(f"{args.source}: the head has {evaluator.num_labels} outputs but the data "
                          f"{data.vocabulary.num_labels} labels")
    rec = evaluate_task(evaluator, params, data, timing_pass=True)
    rec = {"source": str(args.source), "task": data.name, "senses": args.senses, **rec}
    if args.out:
        write_json_atomic(args.out, rec)
    print(json.dumps(rec, indent=2))
    return 0
