"""Export of a task run's best checkpoint: a transformers ``*ForSequenceClassification``
directory (fine-tuning) or student + adaptor + head (task distillation)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from sense_jax.convert import _match, copy_tokenizer_files, params_to_hf
from sense_jax.errors import SenseJaxError
from sense_jax.hf_export import HEAD_FILE, TASK_META_FILE, export_directory, export_hf, load_adaptor
from sense_jax.io_utils import read_json, write_json_atomic
from sense_jax.labelled import VOCABULARY_FILE, LabelVocabulary
from sense_jax.loading import load_model
from sense_jax.models import get_family
from sense_jax.models.heads import abstract_head_params, head_type
from sense_jax.provenance import provenance
from sense_jax.students import init_adaptor, split_pooler
from sense_jax.training.checkpoint import _short
from sense_jax.training.export import _config_from_dict

# --- Export -----------------------------------------------------------------------------------

BEST_DIR = "best"


def best_manager(run_dir: Path, create: bool = True):
    """The Orbax manager of ``run_dir/best``: the params of the best dev evaluation so far (one
    step kept), items ``params`` and ``meta`` (the run's meta plus ``best``: step, metric, value)."""

    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create, enable_async_checkpointing=False,
                                           read_only=not create, save_interval_steps=0)
    return ocp.CheckpointManager((Path(run_dir) / BEST_DIR).absolute(), options=options,
                                 item_names=("params", "meta"))


def restore_best(run_dir: str | Path) -> tuple[dict, dict]:
    """``(params, meta)`` of a task run's best dev evaluation (``run_dir/best``), on the local
    default device; ``meta["best"]`` says step, metric and value.

    Raises:
      SenseJaxError: no ``best/`` (the run evaluated nothing yet) or it cannot be read.
    """


    run_dir = Path(run_dir)
    if not (run_dir / BEST_DIR).is_dir():
        raise SenseJaxError(f"{run_dir}: no {BEST_DIR}/ checkpoint (not a task run, or no dev evaluation yet)")
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns that a read-only manager is read-only
    try:
        mngr = best_manager(run_dir, create=False)
    finally:
        absl_logger.setLevel(level)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise SenseJaxError(f"{run_dir / BEST_DIR}: holds no complete checkpoint")
        step = max(steps)
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        family = get_family(meta["family"])
        scfg = _config_from_dict(family, meta["student_config"], meta["teacher_hf_config"])
        hcfg = _config_from_dict(family, meta["head_config"], meta["teacher_hf_config"])
        abstract = {"student": family.abstract_params(scfg), "head": abstract_head_params(hcfg)}
        if meta["config"].get("objective") != "finetune":
            tcfg = _config_from_dict(family, meta["teacher_config"], meta["teacher_hf_config"])
            abstract["adaptor"] = jax.eval_shape(lambda: init_adaptor(scfg.hidden_size, tcfg.hidden_size))
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
        try:
            params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))["params"]
        except Exception as e:
            raise SenseJaxError(f"{run_dir / BEST_DIR / str(step)}: cannot be restored ({_short(e)})") from None
    finally:
        mngr.close()
    meta["family_config"] = {"student": scfg, "head": hcfg}
    return jax.device_get(params), meta


def load_exported_student(path: str | Path) -> tuple[Any, Any, dict, Any, Any]:
    """An exported task student (:func:`export_task`: ``AutoModel`` + ``adaptor.safetensors`` +
    ``head.safetensors``) read back: ``(family, tokenizer, params, student_cfg, head_cfg)`` with
    ``params = {"student", "adaptor", "head"}`` as a task run's best checkpoint holds them
    (float32 numpy; the adaptor's torch layout transposed back, the head's names mapped by the
    family's conversion table).

    Raises:
      SenseJaxError / ConversionError: a file missing, a head tensor that is no head parameter,
        one missing, or a shape that differs (file and tensor named).
    """
    path = Path(path)
    meta = read_json(path / TASK_META_FILE, "exported task metadata")
    if "head_config" not in meta:
        raise SenseJaxError(f"{path / TASK_META_FILE}: no 'head_config' (exported by an older sense_jax); "
                            "evaluate its run directory, or export the run again")
    model = load_model(path)
    family = model.family
    enc, _ = split_pooler(jax.device_get(model.params))
    scfg = dataclasses.replace(model.config, add_pooler=False, num_labels=0)
    hcfg = _config_from_dict(family, meta["head_config"], model.hf_config)
    a = load_adaptor(path)
    adaptor = {"dense": {"kernel": np.ascontiguousarray(a["weight"].T), "bias": a["bias"]}}
    expected = traverse_util.flatten_dict(abstract_head_params(hcfg), sep="/")
    flat = {}
    for name, value in load_file(str(path / HEAD_FILE)).items():
        hit = _match(family.rules, name)
        if hit is None or hit[0] not in expected:
            raise SenseJaxError(f"{path / HEAD_FILE}: tensor {name!r} is no parameter of a {family.name} head")
        v = hit[1].to_flax(value)
        if tuple(v.shape) != tuple(expected[hit[0]].shape):
            raise SenseJaxError(f"{path / HEAD_FILE}: tensor {name!r} has shape {tuple(value.shape)}, "
                                f"not the head's (head_config in {TASK_META_FILE})")
        flat[hit[0]] = np.asarray(v, np.float32)
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise SenseJaxError(f"{path / HEAD_FILE}: lacks head parameter(s) {missing}")
    params = {"student": enc, "adaptor": adaptor, "head": traverse_util.unflatten_dict(flat, sep="/")}
    return family, model.tokenizer, params, scfg, hcfg


def classifier_state_dict(family, cfg: Any, encoder_params: dict, head_params: dict) -> dict[str, np.ndarray]:
    """transformers' ``*ForSequenceClassification`` state dict of an encoder and its head: the
    base model's tensors under the class's prefix (``bert.``), the head's beside them
    (:data:`sense_jax.models.heads.HEAD_TYPES`), names from the family's conversion table."""

    ht = head_type(cfg)
    params = {k: v for k, v in encoder_params.items() if k not in family.head_params}
    params.update(head_params)
    return {(n if n.startswith(ht.outside_base) else ht.base_prefix + n): np.ascontiguousarray(v)
            for n, v in params_to_hf(family, params).items()}


def classifier_hf_config(teacher_hf_config: dict, cfg: Any, vocabulary) -> dict:
    """config.json of an exported classifier: the teacher's, with ``cfg``'s sizes, the
    ``*ForSequenceClassification`` architecture, float32, the label vocabulary as ``id2label`` /
    ``label2id`` and ``problem_type`` (regression or single-label classification)."""

    out = {k: v for k, v in teacher_hf_config.items() if not k.startswith("_")}
    out.update(dataclasses.replace(cfg, dtype="float32").to_hf())
    names = vocabulary.id2label
    out.update(architectures=[head_type(cfg).architecture], dtype="float32", torch_dtype="float32",
               num_labels=vocabulary.num_labels, id2label={str(i): n for i, n in names.items()},
               label2id={n: i for i, n in names.items()},
               problem_type="regression" if vocabulary.regression else "single_label_classification")
    return out


def export_task(run_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Export a task run's best checkpoint (``run_dir/best``) as a transformers directory.

    A fine-tuned model (``sense-jax finetune``) becomes its ``*ForSequenceClassification``
    (``config.json`` with ``id2label`` / ``label2id`` / ``problem_type``, ``model.safetensors``,
    tokenizer files) that ``AutoModelForSequenceClassification`` loads with the same logits, and
    ``label_vocabulary.json`` (the vocabulary, with the data's other spellings of each label) that
    later runs read the data against. A task-distilled student becomes the student's base model
    (:func:`sense_jax.distill.export_hf`: ``AutoModel``) with ``adaptor.safetensors`` and
    ``head.safetensors`` (the teacher's frozen head, transformers' names, on adapted states), and
    the same ``label_vocabulary.json``. Both hold ``sense_jax_task.json`` (task, metrics, best
    step and dev figure, provenance).

    Raises:
      SenseJaxError: no best checkpoint, or ``out`` exists without ``overwrite``.
    """


    run_dir = Path(run_dir)
    params, meta = restore_best(run_dir)
    family = get_family(meta["family"])
    scfg, hcfg = meta["family_config"]["student"], meta["family_config"]["head"]
    vocab = LabelVocabulary.from_json(meta["label_vocabulary"], f"{run_dir / BEST_DIR} label_vocabulary")
    tok_dir = run_dir / "tokenizer" if (run_dir / "tokenizer").is_dir() else None
    info = {"task": meta.get("task"), "metrics": meta.get("metrics"), "objective": meta["config"].get("objective"),
            "best": meta["best"], "teacher": meta["teacher_path"], "run": str(run_dir.absolute()),
            "provenance": provenance(), "trained_with": meta.get("provenance")}
    if meta["config"].get("objective") == "finetune":
        state = classifier_state_dict(family, hcfg, params["student"], params["head"])
        with export_directory(out, overwrite) as tmp:
            with open(tmp / "config.json", "w", encoding="utf-8") as f:
                json.dump(classifier_hf_config(meta["teacher_hf_config"], hcfg, vocab), f, indent=2, sort_keys=True)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            if tok_dir is not None:
                copy_tokenizer_files(tok_dir, tmp)
            vocab.save(tmp / VOCABULARY_FILE)
            write_json_atomic(tmp / TASK_META_FILE, info)
        return Path(out)

    head = dict(params["head"])
    # what a reader of head.safetensors needs besides the student's own config.json
    info["head_config"] = dataclasses.asdict(hcfg)
    # the teacher whose dictionary the student's senses come from (checked by evaluate-task --senses)
    info.update(teacher_fingerprint=meta.get("teacher_fingerprint"), embedding_fingerprint=meta.get("embedding_fingerprint"))
    with export_directory(out, overwrite) as tmp:
        student = export_hf(tmp / "student", family, scfg, params["student"], meta["teacher_hf_config"],
                            tokenizer_dir=tok_dir, adaptor=params["adaptor"], pooler=head.get("pooler"),
                            extra_meta={"task": info})
        for f in student.iterdir():
            os.replace(f, tmp / f.name)
        student.rmdir()
        save_file({k: np.ascontiguousarray(v) for k, v in params_to_hf(family, head).items()},
                  str(tmp / HEAD_FILE), metadata={"format": "pt"})
        vocab.save(tmp / VOCABULARY_FILE)
        write_json_atomic(tmp / TASK_META_FILE, info)
    return Path(out)
