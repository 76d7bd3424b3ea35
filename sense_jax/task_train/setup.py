"""Setup of a task run: the teacher (or the model to fine-tune), its head, the student, the
layout and the jitted steps, on the trainer's parts (:mod:`sense_jax.training`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from sense_jax.errors import ConfigError
from sense_jax.fingerprints import teacher_fingerprint, tokenizer_fingerprint
from sense_jax.loading import load_model
from sense_jax.models import check_input_length
from sense_jax.models.heads import abstract_head_params, head_logits, init_head_params
from sense_jax.provenance import check_provenance, provenance
from sense_jax.sense_dict import SenseDictionary
from sense_jax.students import check_sense_dict, dictionary_fingerprint, init_adaptor, split_pooler
from sense_jax.task_train.data import BATCH_KEYS, TaskData
from sense_jax.task_train.objectives import TASK_METRICS, make_task_eval, make_task_loss, task_denominators
from sense_jax.training.layout import layout_for
from sense_jax.training.setup import Setup, _student, _teacher_path
from sense_jax.training.step import make_step

# --- Setup ------------------------------------------------------------------------------------


def check_head(teacher, tpath: str, data: TaskData, *, finetune: bool) -> None:
    """A model's head against the task's data: its ``num_labels`` must be the data's (a model
    without a head is fine-tuned with a fresh one; distillation needs the teacher's).

    Raises:
      ConfigError: a head of another size, or (distillation) no head; the model named.
    """
    n_labels = data.vocabulary.num_labels
    have = int(getattr(teacher.config, "num_labels", 0) or 0)
    if teacher.head_params is not None and have != n_labels:
        raise ConfigError(f"model {tpath} has a classification head of {have} label{'s' * (have != 1)} "
                          f"but the {data.name} data has {n_labels} ({'regression' if data.vocabulary.regression else ', '.join(data.vocabulary.names)})")
    if teacher.head_params is None and not finetune:
        raise ConfigError(f"teacher {tpath} has no classification head: fine-tune it first "
                          "(sense-jax finetune), or convert a *ForSequenceClassification checkpoint")


def _head_and_dictionary(cfg: Any, teacher, tpath: str, data: TaskData, sense_dict):
    """The run's head (the teacher's, or a fresh one to fine-tune) and dictionary, checked against
    the data and the teacher: ``(head_cfg, head, sense_dict, fingerprint, embedding_fingerprint)``."""
    finetune = cfg.objective == "finetune"
    tcfg = teacher.config
    n_labels = data.vocabulary.num_labels
    check_head(teacher, tpath, data, finetune=finetune)
    head_cfg = dataclasses.replace(tcfg, num_labels=n_labels, add_pooler=False)
    head = (jax.device_get(teacher.head_params) if teacher.head_params is not None
            else init_head_params(head_cfg, cfg.seed))
    fp_v1 = teacher_fingerprint(teacher.params, tcfg.vocab_size)
    fp = teacher_fingerprint(teacher.params, tcfg.vocab_size, teacher.tokenizer) \
        if teacher.tokenizer is not None else fp_v1
    if sense_dict is None and cfg.senses:
        sense_dict = SenseDictionary.load(cfg.senses)
    if sense_dict is None and (cfg.objective == "skd" or cfg.sense_replace):
        raise ConfigError(f"config: senses (the sense dictionary directory) is required by "
                          f"{'objective=skd' if cfg.objective == 'skd' else 'sense_replace=true'}")
    if sense_dict is not None:
        check_sense_dict(sense_dict, tcfg, fingerprint=fp, teacher_path=tpath,
                           source=cfg.senses or "sense dictionary", embedding_fingerprint=fp_v1)
        check_provenance(sense_dict.meta.get("provenance"), f"sense dictionary {cfg.senses or ''}".strip())
    return head_cfg, head, sense_dict, fp, fp_v1


def _run_meta(cfg: Any, teacher, tpath: str, data: TaskData, scfg, head_cfg, sense_dict, fp: str,
              fp_v1: str) -> dict:
    """What a task run's checkpoints record beside the arrays (checked on resume and export)."""
    family, tcfg = teacher.family, teacher.config
    return {"config": dataclasses.asdict(cfg), "teacher_path": tpath, "family": family.name,
            "student_config": dataclasses.asdict(scfg), "teacher_config": dataclasses.asdict(tcfg),
            "teacher_hf_config": teacher.hf_config, "has_pooler": False,
            "head_config": dataclasses.asdict(head_cfg),
            "label_vocabulary": data.vocabulary.to_json(), "task": data.name, "metrics": list(data.metrics),
            "teacher_fingerprint": fp, "embedding_fingerprint": fp_v1,
            "tokenizer_fingerprint": (tokenizer_fingerprint(teacher.tokenizer)
                                      if teacher.tokenizer is not None else None),
            "dictionary_fingerprint": dictionary_fingerprint(sense_dict) if sense_dict is not None else None,
            "dictionary_shape": ({"vocab_size": sense_dict.vocab_size, "hidden_size": sense_dict.hidden_size,
                                  "senses": int(sense_dict.centres.shape[0]), "k_max": sense_dict.k_max}
                                 if sense_dict is not None else {}),
            "provenance": provenance()}


def task_setup(cfg: Any, data: TaskData, *, sense_dict=None, devices=None):
    """Models, head, dictionary, shardings and jitted functions of a task run (a
    :class:`sense_jax.training.setup.Setup`).

    Fine-tuning (``objective="finetune"``): the student is the model itself (every layer, no
    adaptor) and its head trains: the model's own when it has one with ``num_labels`` outputs,
    else a fresh one (:func:`sense_jax.models.heads.init_head_params`, seeded). Task
    distillation (any other objective): the teacher must have a head with ``num_labels``
    outputs (fine-tune it first); the head is copied onto the student, behind the adaptor, and
    frozen (:func:`sense_jax.training.step.frozen_paths`). The dictionary (``cfg.senses``) is needed
    by ``skd`` and ``sense_replace``, and used, when given, for the dev figures with senses.

    Raises:
      ConfigError: a head whose ``num_labels`` differs from the data's, a teacher without a head
        for distillation, a missing dictionary, and :func:`sense_jax.training.setup.setup`'s checks.
    """

    finetune = cfg.objective == "finetune"
    tpath = _teacher_path(cfg)
    teacher = load_model(tpath, dtype=cfg.compute_dtype)
    tcfg, family = teacher.config, teacher.family
    check_input_length(cfg.max_length, tcfg, "config: max_length", f"teacher {tpath}'s", ConfigError,
                       "set max_length <= {limit}")
    head_cfg, head, sense_dict, fp, fp_v1 = _head_and_dictionary(cfg, teacher, tpath, data, sense_dict)
    tparams, _ = split_pooler(jax.device_get(teacher.params))  # the head holds the pooler
    enc_cfg = dataclasses.replace(tcfg, add_pooler=False, num_labels=0)
    if finetune:
        scfg, sparams = dataclasses.replace(enc_cfg, dtype=cfg.compute_dtype), tparams
        params = {"student": sparams, "head": head}
    else:
        scfg, sparams = _student(cfg, teacher, tpath, tparams)
        params = {"student": sparams, "head": head,
                  "adaptor": init_adaptor(scfg.hidden_size, tcfg.hidden_size, seed=cfg.seed)}
    student_module = family.make_module(scfg)
    teacher_module = family.make_module(enc_cfg)
    head_fn = functools.partial(head_logits, dataclasses.replace(head_cfg, dtype=cfg.compute_dtype))
    raw = make_step(cfg, make_task_loss(cfg, student_module, teacher_module, head_fn), task_denominators,
                    TASK_METRICS)
    boxed = {"student": family.abstract_params(scfg, boxed=True), "head": abstract_head_params(head_cfg, boxed=True)}
    if "adaptor" in params:
        boxed["adaptor"] = jax.eval_shape(lambda: init_adaptor(scfg.hidden_size, tcfg.hidden_size, boxed=True))
    uses_teacher = cfg.objective in ("skd", "mse", "logit_kd")
    teacher_boxed = family.abstract_params(dataclasses.replace(enc_cfg, dtype=cfg.compute_dtype), boxed=True)
    layout = layout_for(cfg, boxed, teacher_boxed, raw.tx, devices)
    repl = lambda tree: jax.tree.map(lambda _: layout.replicated, tree)
    frozen, frozen_sh = {}, {}
    if uses_teacher:
        frozen["teacher"] = jax.device_put(tparams, layout.teacher)
        frozen_sh["teacher"] = layout.teacher
    if sense_dict is not None:
        frozen["senses"] = jax.device_put(sense_dict, repl(sense_dict))
        frozen_sh["senses"] = repl(sense_dict)
    if cfg.objective == "logit_kd":
        frozen["teacher_head"] = jax.device_put(head, repl(head))
        frozen_sh["teacher_head"] = repl(head)
    batch_sh = {k: layout.batch for k in (*BATCH_KEYS, "labels", "weights")}
    batch_sh = {k: (v if k in BATCH_KEYS else _cut(v, 2)) for k, v in batch_sh.items()}
    jitted = jax.jit(raw, in_shardings=(layout.state, batch_sh, frozen_sh),
                     out_shardings=(layout.state, layout.replicated), donate_argnums=0)
    eval_sh = {k: layout.eval_batch for k in BATCH_KEYS}
    ev = jax.jit(make_task_eval(cfg, student_module, head_fn),
                 in_shardings=(layout.state.params, eval_sh, frozen_sh), out_shardings=layout.replicated)
    meta = _run_meta(cfg, teacher, tpath, data, scfg, head_cfg, sense_dict, fp, fp_v1)
    return Setup(cfg=cfg, teacher=teacher, family=family, student_cfg=scfg, student_module=student_module,
                   teacher_module=teacher_module, init_params=params, sense_dict=sense_dict, layout=layout,
                   frozen=frozen, train_step=lambda state, batch: jitted(state, batch, frozen),
                   raw_step=raw, eval_step=lambda params, batch: ev(params, batch, frozen), meta=meta)


def _cut(sharding, ndim: int):
    """``sharding`` with its PartitionSpec cut to ``ndim`` axes (labels [A, B] beside [A, B, T])."""

    return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[:ndim]))
