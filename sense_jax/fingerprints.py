"""Content ids of the things artefacts record: a teacher, its tokenizer, its config, a store.

They live with the model and store they describe, below every pipeline step: extraction
(step 1) records them in a store's ``meta.json``, clustering copies them into a dictionary's,
distillation (step 3) and the benchmarks check them. None of them reads a file.

- :func:`teacher_fingerprint` / :func:`tokenizer_fingerprint`: embedding matrix and vocabulary
  (``meta["teacher_fingerprint"]``; checkpoints also record ``tokenizer_fingerprint``).
- :func:`tokenizer_hash`: the tokenizer's whole serialised definition (a store's identity).
- :func:`config_hash`: the teacher's architecture (a store's identity).
- :func:`store_fingerprint`: a store's sample set (a dictionary's ``store_fingerprint``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from sense_jax.errors import SenseJaxError

FINGERPRINT_VERSION = 2  # "v2-<hex>": embedding matrix and tokenizer; older artefacts hold v1 (bare hex)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A content id of a tokenizer: sha256 (16 hex digits) of its vocabulary (token -> id, added
    tokens included) and its special tokens (map and ids).

    Two tokenizers with the same tokens under other ids (a permuted vocabulary) differ.
    """
    payload = json.dumps({"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0])),
                          "special": tokenizer.special_tokens_map,
                          "special_ids": sorted(int(i) for i in tokenizer.all_special_ids)},
                         sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def teacher_fingerprint(params: dict, vocab_size: int | None = None, tokenizer: Any = None) -> str:
    """A content id of a teacher: its token-embedding matrix and, given ``tokenizer``, its tokenizer.

    With ``tokenizer`` (version 2, what artefacts record): ``"v2-"`` + sha256 (16 hex digits) of
    the embedding id below and :func:`tokenizer_fingerprint`, so that the same weights with a
    permuted vocabulary (ids shuffled) get another id. Without it (version 1, what artefacts
    recorded before; kept to check them): sha256 (16 hex digits) of the float32 embedding matrix.

    The embedding matrix is the first 2-D parameter (in sorted path order) whose first dimension
    is ``vocab_size`` (any family); without ``vocab_size``, BERT's
    ``embeddings/word_embeddings/embedding``. The same weights and tokenizer files give the same
    id whether loaded from a transformers directory or a converted one, so a store or dictionary
    records which teacher built it (``meta["teacher_fingerprint"]``, see
    :func:`sense_jax.students.check_sense_dict`).

    Raises:
      SenseJaxError: no [vocab_size, D] parameter.
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    if vocab_size is None:
        key = "embeddings/word_embeddings/embedding"
    else:
        key = next((k for k in sorted(flat) if np.ndim(flat[k]) == 2 and np.shape(flat[k])[0] == vocab_size),
                   None)
        if key is None:
            raise SenseJaxError(f"no [{vocab_size}, D] token-embedding parameter to fingerprint")
    emb = np.asarray(jax.device_get(flat[key]), np.float32)
    h = hashlib.sha256(str(emb.shape).encode())
    h.update(np.ascontiguousarray(emb).tobytes())
    v1 = h.hexdigest()[:16]
    if tokenizer is None:
        return v1
    both = hashlib.sha256(f"{v1}:{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:16]
    return f"v{FINGERPRINT_VERSION}-{both}"


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's serialised definition (vocabulary, normaliser, special tokens),
    excluding mutable truncation/padding state."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {"vocab": sorted(tokenizer.get_vocab().items())}
    spec["all_special_ids"] = sorted(int(i) for i in tokenizer.all_special_ids)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def config_hash(config: Any) -> str:
    """sha256 of a model config (dataclass or dict) without its compute ``dtype``: the
    architecture a store's vectors came from (``meta["teacher_config_hash"]``)."""
    d = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    d.pop("dtype", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def store_fingerprint(store) -> str:
    """sha256 of the store's metadata and offsets/occurrences arrays (identifies the sample set cheaply).

    The metadata's ``provenance`` (library versions, devices) is left out: the same samples
    extracted on another machine or device count are the same store.
    """
    meta = {k: v for k, v in store.meta.items() if k != "provenance"}
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    h.update(np.ascontiguousarray(store.offsets, np.int64).tobytes())
    h.update(np.ascontiguousarray(store.occurrences, np.int64).tobytes())
    h.update(str(store.vectors.shape).encode())
    return h.hexdigest()
