"""Fine-tuning and task distillation on the trainer (issue 13; METHOD §3-4), one job per module:

* :mod:`.data`        labelled examples as the trainer's stream (:class:`ExampleStream`), dev
                      batches, a task run's splits (:func:`load_task_data`), the label vocabulary;
* :mod:`.objectives`  the task loss and eval functions on the trainer's state (task, logit KD,
                      SKD, MSE; sense replacement before the head);
* :mod:`.setup`       the teacher / model to fine-tune, its head, the student, layout, jitted steps;
* :mod:`.export`      the best checkpoint and its export (a ``*ForSequenceClassification``
                      directory, or student + adaptor + head);
* :mod:`.evaluate`    dev metrics with and without senses, tokens/s; a classifier loaded from disk;
* :mod:`.hooks`       the loop's hooks: dev evaluation, early stopping, the best checkpoint.

Every public name is importable from ``sense_jax.task_train``.
"""

from __future__ import annotations

from sense_jax.task_train.data import (BATCH_KEYS, tokenize_examples, example_lengths,
                                       ExampleStream, label_array, eval_batches, TaskData,
                                       metric_key, load_task_data, recorded_vocabulary)
from sense_jax.task_train.objectives import (TASK_METRICS, task_denominators, student_states,
                                             replace_by_senses, make_task_loss, make_task_eval)
from sense_jax.task_train.setup import task_setup, check_head
from sense_jax.task_train.export import (BEST_DIR, best_manager, TASK_META_FILE, restore_best,
                                         classifier_state_dict, classifier_hf_config,
                                         export_task, HEAD_FILE, load_exported_student)
from sense_jax.task_train.evaluate import evaluate_split, evaluate_task, load_classifier
from sense_jax.task_train.hooks import task_hooks, prepare_task
