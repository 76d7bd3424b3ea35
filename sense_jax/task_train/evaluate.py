"""Evaluation of a classifier on a task's dev split(s), with and without sense replacement, and
tokens/s of the compiled forward; a classifier loaded outside training."""

from __future__ import annotations

import dataclasses
import functools
import time
import types
from pathlib import Path

import jax
import numpy as np

from sense_jax.errors import SenseJaxError
from sense_jax.fingerprints import teacher_fingerprint
from sense_jax.io_utils import read_json
from sense_jax.glue_metrics import compute_metrics
from sense_jax.labelled import LabelVocabulary
from sense_jax.loading import _load_tokenizer, load_model
from sense_jax.models import get_family
from sense_jax.models.heads import head_logits
from sense_jax.sense_dict import SenseDictionary
from sense_jax.sharding import process_rows
from sense_jax.students import check_sense_dict, split_pooler
from sense_jax.task_train.data import BATCH_KEYS, TaskData, eval_batches, metric_key, recorded_vocabulary
from sense_jax.task_train.export import BEST_DIR, HEAD_FILE, TASK_META_FILE, load_exported_student, restore_best
from sense_jax.task_train.objectives import make_task_eval

# --- Evaluation -------------------------------------------------------------------------------


def evaluate_split(s, params, data, *, batch_size: int | None = None, timing_pass: bool = False) -> dict:
    """Logits of the run's classifier on one split, without and with sense replacement.

    Args:
      timing_pass: time a second pass over the same device batches (every program then
        compiled); else only the batches whose shape an earlier batch had compiled are timed.

    Returns:
      ``{"logits": [N, C], "logits_senses": [N, C] or None (no dictionary), "tokens": real tokens,
      "seconds": forward time of the timed batches, "warm_tokens": their real tokens}`` (numpy /
      floats; multi-host: every process gets all).
    """


    cfg = s.cfg
    B = batch_size or cfg.batch_size
    rows = process_rows(s.layout.eval_batch, (B, cfg.max_length), 0)
    n = len(data)
    C = data.vocabulary.num_labels
    logits = np.zeros((n, C), np.float32)
    senses = np.zeros((n, C), np.float32)
    tokens = warm_tokens = 0.0
    seconds = 0.0
    seen: set[int] = set()
    kept = []
    for idx, b in eval_batches(s.teacher.tokenizer, data.texts, data.labels, B, cfg.max_length, cfg.pad_to_buckets):
        T = b["input_ids"].shape[1]
        dev = {}
        for k in BATCH_KEYS:
            part = b[k][rows]
            dev[k] = (jax.device_put(part, s.layout.eval_batch) if jax.process_count() == 1 else
                      jax.make_array_from_process_local_data(s.layout.eval_batch, part, (B, T)))
        t0 = time.perf_counter()
        out = jax.device_get(s.eval_step(params, dev))
        dt = time.perf_counter() - t0
        real = float(b["attention_mask"][:len(idx)].sum())
        tokens += real
        if T in seen:
            seconds += dt
            warm_tokens += real
        seen.add(T)
        logits[idx] = out["logits"][:len(idx)]
        senses[idx] = out["logits_senses"][:len(idx)]
        if timing_pass:
            kept.append((dev, real))
    if timing_pass:
        seconds = warm_tokens = 0.0
        for dev, real in kept:
            t0 = time.perf_counter()
            jax.block_until_ready(s.eval_step(params, dev))
            seconds += time.perf_counter() - t0
            warm_tokens += real
    return {"logits": logits, "logits_senses": senses if s.sense_dict is not None else None,
            "tokens": tokens, "seconds": seconds, "warm_tokens": warm_tokens}


def evaluate_task(s, params, data: TaskData, *, timing_pass: bool = False) -> dict:
    """The dev figures of a classifier: every task metric on every dev split, without and (with
    a dictionary) with sense replacement before the head (``senses_<metric>``), examples, and
    ``tokens_per_s`` of the forward (both variants, real tokens only; with ``timing_pass`` a
    second, compiled pass over every batch, else the batches of an already compiled shape, and
    no figure when there were none)."""

    regression = data.vocabulary.regression
    rec: dict[str, float] = {}
    tokens = seconds = 0.0
    for split, d in data.dev.items():
        out = evaluate_split(s, params, d, timing_pass=timing_pass)
        for variant, key in (("logits", ""), ("logits_senses", "senses_")):
            if out[variant] is None:
                continue
            for m, v in compute_metrics(data.metrics, out[variant], d.labels, regression=regression).items():
                rec[key + metric_key(m, split, len(data.dev))] = v
        tokens += out["warm_tokens"]
        seconds += out["seconds"]
    rec["examples"] = float(sum(len(d) for d in data.dev.values()))
    if seconds > 0:
        rec["tokens_per_s"] = tokens / seconds
    return rec


# --- Evaluating a classifier outside training -------------------------------------------------


def _fingerprints(encoder_params: dict, vocab_size: int, tokenizer) -> tuple[str | None, str]:
    """``(v2, v1)`` teacher fingerprints of a model's encoder (v2 needs its tokenizer), as the
    dictionary built from that model records them (:func:`sense_jax.students.check_sense_dict`)."""
    v1 = teacher_fingerprint(encoder_params, vocab_size)
    return (teacher_fingerprint(encoder_params, vocab_size, tokenizer) if tokenizer is not None else None), v1


@functools.lru_cache(maxsize=16)
def _jitted_eval(student_module, head_config, metric: str):
    """One jitted evaluator per (encoder, head config, metric): classifiers of one architecture
    (a task pipeline's students, each scored without and with senses) share its compiled programs
    instead of compiling each shape once per :func:`load_classifier` call. Linen modules and the
    family configs are frozen dataclasses, hashed by value."""
    cfg = types.SimpleNamespace(metric=metric)
    return jax.jit(make_task_eval(cfg, student_module, functools.partial(head_logits, head_config)))


def load_classifier(source: str | Path, *, senses: str | None = None, batch_size: int = 32,
                    max_length: int = 128, metric: str = "dot"):
    """A classifier ready for :func:`evaluate_task`: ``(evaluator, params)``; ``evaluator.vocabulary``
    is its recorded label vocabulary (a run's, or ``label_vocabulary.json`` beside a model), or None.

    ``source`` is a task run directory (its best checkpoint: a fine-tuned model, or a distilled
    student with its adaptor and the teacher's frozen head), a distilled student's export
    (``sense-jax export RUN OUT``: base model, ``adaptor.safetensors``, ``head.safetensors``) or a
    model directory with a sequence classification head (``sense-jax finetune``'s export, a
    transformers ``*ForSequenceClassification`` directory, or a ``sense-jax convert`` of one).

    Raises:
      SenseJaxError: neither a task run nor a model with a head; a dictionary of another model.
    """
    source = Path(source)
    vocabulary = recorded_vocabulary(source) if source.is_dir() else None
    if (source / BEST_DIR).is_dir():
        params, meta = restore_best(source)
        vocabulary = LabelVocabulary.from_json(meta["label_vocabulary"], f"{source / BEST_DIR} label_vocabulary")
        family = get_family(meta["family"])
        scfg, hcfg = meta["family_config"]["student"], meta["family_config"]["head"]
        tokenizer = _load_tokenizer(source / "tokenizer")
        width_cfg = hcfg
        if meta["config"].get("objective") == "finetune":  # the dictionary is the fine-tuned model's
            fingerprints = lambda: _fingerprints(params["student"], scfg.vocab_size, tokenizer)
        else:  # a student: the dictionary is its teacher's
            fingerprints = lambda: (meta.get("teacher_fingerprint"), meta.get("embedding_fingerprint"))
    elif (source / HEAD_FILE).is_file():  # an exported task student: base model + adaptor + head
        family, tokenizer, params, scfg, hcfg = load_exported_student(source)
        width_cfg = hcfg
        task_meta = read_json(source / TASK_META_FILE, "exported task metadata")
        fingerprints = lambda: (task_meta.get("teacher_fingerprint"), task_meta.get("embedding_fingerprint"))
    else:
        model = load_model(source)
        if model.head_params is None:
            raise SenseJaxError(f"{source}: neither a task run (no {BEST_DIR}/) nor a model with a sequence "
                                "classification head")
        family, tokenizer = model.family, model.tokenizer
        enc, _ = split_pooler(jax.device_get(model.params))
        params = {"student": enc, "head": jax.device_get(model.head_params)}
        scfg = dataclasses.replace(model.config, add_pooler=False, num_labels=0)
        hcfg = dataclasses.replace(model.config, add_pooler=False)
        width_cfg = model.config
        fingerprints = lambda: _fingerprints(params["student"], model.config.vocab_size, tokenizer)
    sense_dict = None
    if senses:
        sense_dict = SenseDictionary.load(senses)
        fp, fp_v1 = fingerprints()
        check_sense_dict(sense_dict, width_cfg, source=senses, fingerprint=fp, embedding_fingerprint=fp_v1)
    cfg = types.SimpleNamespace(batch_size=batch_size, max_length=max_length, pad_to_buckets=True, metric=metric)
    module = family.make_module(scfg)
    try:
        ev = _jitted_eval(module, hcfg, metric)
    except TypeError:  # a config holding an unhashable value: its own evaluator, as before
        ev = _jitted_eval.__wrapped__(module, hcfg, metric)
    frozen = {} if sense_dict is None else {"senses": sense_dict}
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    evaluator = types.SimpleNamespace(
        cfg=cfg, teacher=types.SimpleNamespace(tokenizer=tokenizer), sense_dict=sense_dict,
        layout=types.SimpleNamespace(eval_batch=one), eval_step=lambda p, b: ev(p, b, frozen),
        num_labels=hcfg.num_labels, vocabulary=vocabulary)
    return evaluator, jax.device_put(params, one)
