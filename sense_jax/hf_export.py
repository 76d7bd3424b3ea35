"""Writing models back as transformers directories: a converted model (with or without its
sequence classification head, :func:`export_model`) and a distilled student with its adaptor
(:func:`export_hf`); :func:`load_adaptor` reads the adaptor back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from sense_jax.convert import TOKENIZER_FILES, copy_tokenizer_files, params_to_hf
from sense_jax.errors import SenseJaxError
from sense_jax.io_utils import atomic_directory, check_replaceable, holds_only, write_json_atomic
from sense_jax.loading import load_model
from sense_jax.models.heads import head_type
from sense_jax.provenance import provenance


# What an export holds: float32 weights (the params are float32; narrowing them would lose the
# 1e-4 parity with sense_jax), and a config.json that says so. transformers 5 loads with
# dtype="auto", i.e. in the config's ``dtype`` (4.x: ``torch_dtype``); a teacher's "bfloat16" left
# there would load the float32 weights in bf16 (errors of 2.5e-2).
EXPORT_DTYPE = "float32"


def student_hf_config(teacher_hf_config: dict, student_cfg: Any) -> dict:
    """The student's transformers config.json: the teacher's, with the student's sizes, the base
    model's architecture and ``dtype`` / ``torch_dtype`` = "float32" (what the export holds)."""
    cfg = {k: v for k, v in teacher_hf_config.items() if not k.startswith("_")}
    cfg.update(student_cfg.to_hf())
    cfg["dtype"] = cfg["torch_dtype"] = EXPORT_DTYPE
    arch = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel",
            "camembert": "CamembertModel", "deberta-v2": "DebertaV2Model", "llama": "LlamaModel",
            "mistral": "MistralModel", "qwen2": "Qwen2Model"}.get(student_cfg.model_type)
    if arch:
        cfg["architectures"] = [arch]
    return cfg


HEAD_FILE = "head.safetensors"  # an exported task student's classification head
TASK_META_FILE = "sense_jax_task.json"  # an exported task model's record (task, metrics, run)
EXPORT_MARKER = "sense_jax_export.json"  # written by every export: what sense_jax may replace
# Everything an exported directory may hold: what ``overwrite`` may replace. The label
# vocabulary's name is sense_jax.labelled.VOCABULARY_FILE's (a higher layer; tests/test_convert.py
# checks that they agree).
EXPORT_FILES = ("config.json", "model.safetensors", "adaptor.safetensors", "adaptor.json", HEAD_FILE,
                "label_vocabulary.json", TASK_META_FILE, EXPORT_MARKER, *TOKENIZER_FILES)


def is_exported_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory that sense_jax exported and that holds nothing else: its
    files only, and one of sense_jax's own (:data:`EXPORT_MARKER`; ``adaptor.json`` or
    :data:`TASK_META_FILE` for exports of releases before the marker). A transformers
    ``save_pretrained`` directory (config.json + model.safetensors) is a user's model, not ours."""
    path = Path(path)
    return (path.is_dir() and holds_only(path, EXPORT_FILES, ("config.json", "model.safetensors"))
            and any((path / f).is_file() for f in (EXPORT_MARKER, "adaptor.json", TASK_META_FILE)))


@contextlib.contextmanager
def export_directory(out: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """:func:`~sense_jax.io_utils.atomic_directory` for an export: with ``overwrite`` it replaces
    only an exported directory or an empty one (ConfigError naming anything else: a user's
    directory is never deleted), and it marks what it writes with :data:`EXPORT_MARKER` (the
    versions that wrote it)."""
    if overwrite:
        check_replaceable(out, is_exported_dir, "an exported model directory")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        yield tmp
        write_json_atomic(tmp / EXPORT_MARKER, {"written_by": "sense_jax export", "provenance": provenance()})


def export_hf(out: str | os.PathLike, family: Any, student_cfg: Any, student_params: dict,
              teacher_hf_config: dict, *, tokenizer_dir: str | os.PathLike | None = None,
              adaptor: dict | None = None, pooler: dict | None = None, extra_meta: dict | None = None,
              overwrite: bool = False) -> Path:
    """Write a student as a transformers model directory, atomically.

    Layout of ``out``: ``config.json`` (``dtype`` float32, ``architectures`` the base model, e.g.
    LlamaModel), ``model.safetensors`` (transformers' base-model names, float32, ``format=pt``;
    task heads such as a decoder's ``lm_head``, ``family.head_params``, are left out, so that
    ``AutoModel`` reports no unexpected keys), tokenizer files copied from ``tokenizer_dir``, and
    when given ``adaptor.safetensors`` (``weight`` [D, S] and ``bias`` [D] in torch.nn.Linear
    layout, plus the frozen teacher pooler as ``pooler.dense.weight`` / ``pooler.dense.bias``)
    with ``adaptor.json``. When the widths match the pooler is also written into
    model.safetensors, so AutoModel's pooler_output is the teacher's head (otherwise BertModel
    reports its pooler missing).

    Raises:
      SenseJaxError: ``out`` exists and not ``overwrite``; ConfigError: ``out`` is a file or a
        directory other than an exported model or an empty one; ConversionError: a parameter has
        no transformers name.
    """
    params = {k: v for k, v in student_params.items() if k not in family.head_params}
    cfg = student_cfg
    if pooler is not None and pooler["kernel"].shape[0] == student_cfg.hidden_size:
        params["pooler"] = pooler
        cfg = dataclasses.replace(student_cfg, add_pooler=True)
    state = params_to_hf(family, params)
    with export_directory(out, overwrite) as tmp:
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(student_hf_config(teacher_hf_config, cfg), f, indent=2, sort_keys=True)
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), tmp)
        if adaptor is not None:
            k = np.asarray(jax.device_get(adaptor["dense"]["kernel"]), np.float32)
            tensors = {"weight": np.ascontiguousarray(k.T),
                       "bias": np.asarray(jax.device_get(adaptor["dense"]["bias"]), np.float32)}
            if pooler is not None:
                tensors["pooler.dense.weight"] = np.ascontiguousarray(
                    np.asarray(jax.device_get(pooler["kernel"]), np.float32).T)
                tensors["pooler.dense.bias"] = np.asarray(jax.device_get(pooler["bias"]), np.float32)
            save_file(tensors, str(tmp / "adaptor.safetensors"), metadata={"format": "pt"})
            write_json_atomic(tmp / "adaptor.json", {
                "in_features": int(k.shape[0]), "out_features": int(k.shape[1]),
                "layout": "torch.nn.Linear: y = x @ weight.T + bias",
                "pooler": "teacher's frozen BertPooler on teacher-width states" if pooler is not None else None,
                **(extra_meta or {})})
    return Path(out)


def load_adaptor(path: str | os.PathLike) -> dict:
    """Read ``adaptor.safetensors`` from an exported directory as numpy arrays (torch layout)."""
    f = Path(path) / "adaptor.safetensors"
    if not f.is_file():
        raise SenseJaxError(f"adaptor file not found: {f}")
    return load_file(str(f))


def export_model(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a model directory (``sense-jax convert`` output, or a transformers directory) back
    as a transformers directory, atomically.

    A model with a sequence classification head (``cfg.num_labels`` > 0) is written as its
    ``*ForSequenceClassification`` class (:data:`sense_jax.models.heads.HEAD_TYPES`): the base
    model's tensors under the class's prefix (``bert.``, ``roberta.``, ``deberta.``, ``model.``),
    the head's beside them, names from the family's conversion table; ``config.json`` is the
    source's (``id2label`` / ``label2id`` / ``problem_type`` kept) with the architecture, float32
    ``dtype`` and, when the source's ``id2label`` does not have ``num_labels`` entries,
    transformers' default ``LABEL_i`` names. ``AutoModelForSequenceClassification`` loads it with
    the same logits. A model without a head is written as its base model
    (:func:`export_hf`).

    Raises:
      SenseJaxError: ``out`` exists and not ``overwrite``; ConfigError: ``out`` is a file or a
        directory other than an exported model or an empty one; see :func:`sense_jax.load_model`.
    """
    model = load_model(src)
    family, cfg = model.family, model.config
    tok_dir = model.path if any((model.path / f).is_file() for f in TOKENIZER_FILES) else None
    if model.head_params is None:
        return export_hf(out, family, cfg, jax.device_get(model.params), model.hf_config,
                         tokenizer_dir=tok_dir, overwrite=overwrite)
    ht = head_type(cfg)
    params = {k: v for k, v in jax.device_get(model.params).items() if k not in family.head_params}
    params.update(jax.device_get(model.head_params))
    state = {(n if n.startswith(ht.outside_base) else ht.base_prefix + n): np.ascontiguousarray(v)
             for n, v in params_to_hf(family, params).items()}
    hf_config = {k: v for k, v in model.hf_config.items() if not k.startswith("_")}
    hf_config.update(dataclasses.replace(cfg, dtype="float32").to_hf())
    hf_config.update(architectures=[ht.architecture], dtype="float32", torch_dtype="float32")
    id2label = hf_config.get("id2label")
    if not isinstance(id2label, dict) or len(id2label) != cfg.num_labels:
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        hf_config["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    with export_directory(out, overwrite) as tmp:
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tok_dir is not None:
            copy_tokenizer_files(tok_dir, tmp)
    return Path(out)
