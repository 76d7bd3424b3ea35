"""Shared builders for the distillation tests: a tiny BERT teacher and tiny sense dictionaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import save_tiny_hf_model

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64)


_MADE: dict[tuple, Path] = {}  # teachers already written in this process (copied, not rebuilt)


def make_teacher(out: Path, minilm_dir: Path, seed: int = 0, **changes) -> Path:
    """A randomly initialised tiny BERT (MiniLM's tokenizer, vocab 30522, D=32, 2 layers)."""
    import shutil

    from transformers import BertConfig

    key = (seed, tuple(sorted(changes.items())))
    if not out.exists():
        if key in _MADE and _MADE[key].exists():
            shutil.copytree(_MADE[key], out)
        else:
            save_tiny_hf_model(out, BertConfig(**{**TINY, **changes}), seed=seed, tokenizer_dir=minilm_dir)
            _MADE[key] = out
    return out


def make_sense_dict(tokenizer, sentences, hidden_size: int = 32, seed: int = 0, extra: int = 200,
                    meta: dict | None = None):
    """Random centres (seeded): every non-special token of ``sentences`` gets 1-4 senses, plus
    ``extra`` random other tokens; special tokens get none. Built with SenseDictionary.from_arrays."""
    from sense_jax.sense_dict import SenseDictionary

    rng = np.random.default_rng(seed)
    V = tokenizer.vocab_size
    n = np.zeros(V, np.int64)
    special = set(tokenizer.all_special_ids)
    for s in sentences:
        for t in tokenizer(s)["input_ids"]:
            if t not in special:
                n[t] = 1 + t % 4
    others = rng.choice(np.arange(1000, V), extra, replace=False)
    n[others] = rng.integers(1, 5, extra)
    off = np.concatenate([[0], np.cumsum(n)])
    centres = rng.normal(size=(int(off[-1]), hidden_size)).astype(np.float32)
    return SenseDictionary.from_arrays(centres, off, meta=meta)


def make_skd_inputs(d: Path, minilm_dir: Path, sentences, dictionaries: dict[str, int] | None = None) -> dict:
    """What a tiny SKD run reads, written under ``d``: the teacher (:func:`make_teacher`, at
    ``d/teacher``), one sense dictionary per ``{name: seed}`` (default ``{"senses": 0}``, at
    ``d/name``, each recording the teacher's fingerprint as a real one does) and the corpus
    ``d/corpus.txt`` (``sentences``, one per line).

    Returns ``{"dir", "teacher" (the loaded model), "teacher_dir", "corpus", "sentences"}`` plus
    each dictionary's path under its name."""
    import sense_jax
    from sense_jax.fingerprints import teacher_fingerprint

    teacher = sense_jax.load_model(make_teacher(d / "teacher", minilm_dir))
    fp = teacher_fingerprint(teacher.params, TINY["vocab_size"], teacher.tokenizer)
    out = {"dir": d, "teacher": teacher, "teacher_dir": d / "teacher", "corpus": d / "corpus.txt",
           "sentences": sentences}
    for name, seed in (dictionaries or {"senses": 0}).items():
        make_sense_dict(teacher.tokenizer, sentences, seed=seed, meta={"teacher_fingerprint": fp}).save(d / name)
        out[name] = d / name
    out["corpus"].write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return out


def permute_tokenizer(teacher_dir: Path, out: Path, first: int = 1000) -> Path:
    """A copy of ``teacher_dir`` (same weights) whose tokenizer gives the tokens with ids
    ``first..V-1`` the reversed ids (``tokenizer.json`` and ``vocab.txt`` rewritten alike)."""
    import json
    import shutil

    shutil.copytree(teacher_dir, out)
    tj = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    last = max(vocab.values())
    tj["model"]["vocab"] = {t: (first + last - i if i >= first else i) for t, i in vocab.items()}
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    by_id = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in by_id), encoding="utf-8")
    return out
