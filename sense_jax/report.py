"""The pipeline's report: the seven variants built from a pipeline's outputs, their sizes and
inference speed, PCA plots of a few polysemous words, and :func:`write_report`, which evaluates
them with the WordNet suite (:mod:`sense_jax.evaluation`) and writes ``report.json``,
``report.md`` and the PNGs atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.decomposition import PCA

from sense_jax.corpus import iter_passages
from sense_jax.evaluation import (
    StatesFn, SuiteConfig, Variant, encode, eval_max_length, render_markdown, run_suite)
from sense_jax.hf_export import load_adaptor
from sense_jax.io_utils import atomic_directory, write_json_atomic
from sense_jax.loading import load_model
from sense_jax.sense_dict import SenseDictionary, nearest_sense
from sense_jax.store import open_store
from sense_jax.students import truncated_student


@functools.partial(jax.jit, static_argnums=0)
def _states(module, params, ids, mask, segment_ids, adaptor):
    h = module.apply({"params": params}, ids, mask, segment_ids=segment_ids).astype(jnp.float32)
    return h if adaptor is None else h @ adaptor[0].T + adaptor[1]


def _jit_states(module, params, adaptor: dict | None = None) -> StatesFn:
    """``(ids, mask, segment_ids) -> [B, T, D_teacher]`` (packed rows, :class:`sense_jax.evaluation.Variant`):
    a model, then optionally a torch-layout linear adaptor.

    One jitted function for every model, the module a static argument (Linen modules compare by
    their config): students of one architecture (the SKD and MSE students) share their compiled
    programs, one per padded shape, instead of compiling each shape once per student."""
    w = None if adaptor is None else (jnp.asarray(adaptor["weight"]), jnp.asarray(adaptor["bias"]))
    return lambda ids, mask, segment_ids: _states(module, params, ids, mask, segment_ids, w)


def build_variants(teacher_dir, senses_dir, senses_k1_dir, skd_dir=None, mse_dir=None,
                   student_layers: int = 2) -> tuple[dict[str, Variant], SenseDictionary, dict]:
    """The seven variants of the report from pipeline outputs; also returns the loaded models."""
    teacher = load_model(teacher_dir)
    sd, sd1 = SenseDictionary.load(senses_dir), SenseDictionary.load(senses_k1_dir)
    t_states = _jit_states(teacher.module, teacher.params)
    variants = {"teacher": Variant("teacher", t_states),
                "teacher_senses": Variant("teacher_senses", t_states, sd),
                "teacher_one_sense": Variant("teacher_one_sense", t_states, sd1)}
    models = {"teacher": teacher}
    if skd_dir is not None:
        skd = load_model(skd_dir)
        s_states = _jit_states(skd.module, skd.params, load_adaptor(skd_dir))
        variants["skd_student_senses"] = Variant("skd_student_senses", s_states, sd)
        variants["skd_student"] = Variant("skd_student", s_states)
        models["skd_student"] = skd
    if mse_dir is not None:
        mse = load_model(mse_dir)
        variants["mse_student"] = Variant("mse_student", _jit_states(mse.module, mse.params, load_adaptor(mse_dir)))
        models["mse_student"] = mse
    tcfg, tparams = truncated_student(dataclasses.replace(teacher.config, add_pooler=False),
                                      {k: v for k, v in teacher.params.items() if k != "pooler"}, student_layers)
    variants["truncated_student"] = Variant("truncated_student",
                                            _jit_states(teacher.family.make_module(tcfg), tparams))
    return variants, sd, models


def param_bytes(params) -> tuple[int, int]:
    """(parameter count, bytes) of a pytree."""
    leaves = jax.tree.leaves(params)
    return int(sum(x.size for x in leaves)), int(sum(x.size * x.dtype.itemsize for x in leaves))


def measure_speed(variants: dict[str, Variant], token_ids: list[list[int]], pad_id: int,
                  row_length: int, reps: int = 3) -> dict:
    """Inference tokens/s of each variant on the same passages, packed as the evaluation reads
    them (:func:`sense_jax.evaluation.encode`; compile excluded, median of ``reps``)."""
    n_tokens = sum(len(t) for t in token_ids)
    out = {}
    for name, v in variants.items():
        encode(v, token_ids, pad_id, row_length)  # compile
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            encode(v, token_ids, pad_id, row_length)
            times.append(time.perf_counter() - t)
        out[name] = {"tokens_per_s": n_tokens / statistics.median(times), "tokens": n_tokens}
    return out


def plot_token_senses(store, sense_dict: SenseDictionary, token_id: int, label: str, path) -> None:
    """A 2-D PCA projection of a token's sampled contexts, coloured by nearest sense (PNG)."""
    import matplotlib  # only the plots need it (heavy); the non-interactive backend, set before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(store.token_vectors(token_id), np.float32)
    ids = np.full((len(x), 1), token_id, np.int32)
    k = np.asarray(nearest_sense(sense_dict, ids, x[:, None, :])[0][:, 0])
    pca = PCA(n_components=2, random_state=0).fit(x)
    xy = pca.transform(x)
    c = pca.transform(sense_dict.token_senses(token_id).astype(np.float32))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(xy[:, 0], xy[:, 1], c=k, cmap="tab10", s=8, alpha=0.7)
    ax.scatter(c[:, 0], c[:, 1], c=np.arange(len(c)), cmap="tab10", marker="X", s=120, edgecolors="black")
    ax.set_title(f"{label!r}: {len(x)} contexts, {len(c)} senses (PCA)")
    ax.set_xticks([]); ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


POLYSEMOUS = ("bank", "plant", "spring", "bat", "crane", "seal", "match", "bass", "pitch", "light")


def write_report(report_dir, *, teacher_dir, senses_dir, senses_k1_dir, store_dir, corpus,
                 skd_student=None, mse_student=None, curves: dict | None = None, student_layers: int = 2,
                 suite: SuiteConfig = SuiteConfig(), speed_sentences: int = 512, config: dict | None = None,
                 timings: dict | None = None, log=print) -> None:
    """Evaluate a pipeline's outputs and write report.json, report.md and PNGs atomically.

    Args:
      report_dir: the report directory (replaced as a whole).
      teacher_dir, senses_dir, senses_k1_dir, store_dir, corpus: the teacher, the K-sense and
        one-sense dictionaries, the extraction store and the corpus it was extracted from.
      skd_student, mse_student: exported students (transformers dirs + adaptor); one that is
        None or absent is left out of the report.
      curves: ``{"skd": path to curves.png, ...}``; those that exist are copied as ``curves_<run>.png``.
      student_layers: L of the truncated-student baseline.
      suite: the WordNet suite's settings (``max_length`` is replaced by the models' limit).
      speed_sentences: passages of ``corpus`` (chosen with ``suite.seed``) for tokens/s.
      config: the run's settings, copied into the report as they are.
      timings: seconds per stage, copied into the report.
    """
    skd, mse = (d if d is not None and Path(d).is_dir() else None for d in (skd_student, mse_student))
    variants, sd, models = build_variants(teacher_dir, senses_dir, senses_k1_dir, skd, mse, student_layers)
    tok = models["teacher"].tokenizer
    length = eval_max_length(models.values())
    report = run_suite(variants, sd, tok, dataclasses.replace(suite, max_length=length), log=log)
    store = open_store(store_dir)
    size = {}
    for name, m in models.items():
        n, b = param_bytes(m.params)
        size[name] = {"params": n, "bytes": b, "layers": m.config.num_hidden_layers}
    size["sense_dictionary"] = {"senses": int(sd.centres.shape[0]), "bytes": sd.nbytes(),
                                "tokens": int((np.asarray(sd.n_senses) > 0).sum())}
    size["store"] = {"vectors": int(store.vectors.shape[0]),
                     "bytes": int(sum(p.stat().st_size for p in Path(store.path).iterdir()))}
    report["size"] = size

    lines = list(iter_passages(corpus))  # the passages as extraction read them
    rng = np.random.default_rng(suite.seed)
    sample = [lines[i] for i in sorted(rng.choice(len(lines), min(speed_sentences, len(lines)), replace=False))]
    ids = tok(sample, truncation=True, max_length=length)["input_ids"]
    speed_variants = {k: v for k, v in variants.items()
                      if k in ("teacher", "teacher_senses", "skd_student", "skd_student_senses")}
    report["speed"] = measure_speed(speed_variants, ids, tok.pad_token_id or 0, length)
    report["config"] = dict(config or {})
    report["timings_s"] = dict(timings or {})

    with atomic_directory(report_dir, overwrite=True) as tmp:
        for run, path in (curves or {}).items():
            if Path(path).exists():
                shutil.copy2(path, tmp / f"curves_{run}.png")
        vocab = tok.get_vocab()
        n_samples = np.asarray(store.n_samples())
        words = [w for w in POLYSEMOUS if w in vocab and n_samples[vocab[w]] >= 30][:3]
        for w in words:
            plot_token_senses(store, sd, vocab[w], w, tmp / f"senses_{w}.png")
        report["plots"] = sorted(p.name for p in tmp.glob("*.png"))
        write_json_atomic(tmp / "report.json", report)
        (tmp / "report.md").write_text(render_markdown(report), encoding="utf-8")
