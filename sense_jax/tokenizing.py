"""Tokenising passages for extraction: the token budget per passage and a fast batch encoder.

Both passes of :mod:`sense_jax.extract` (counting, forward) tokenise the corpus with the same
encoder, so a passage gets the same ids (and the same length) in each.
"""

from __future__ import annotations

import itertools

import numpy as np
from tokenizers import Tokenizer

from sense_jax.errors import SenseJaxError
from sense_jax.models import check_input_length, input_length_limit
from sense_jax.sampling import POSITION_BITS


def max_length_for(model, requested: int | None) -> int:
    """Tokens per passage: ``requested`` (refused past the teacher's position table), else the
    table's length (rotary: ``max_position_embeddings``), capped by the tokenizer's own limit."""
    cfg = model.config
    if requested is not None:
        check_input_length(requested, cfg, "max_length", f"teacher {model.path}'s",
                           fix="choose --max-length <= {limit}")
    limit = input_length_limit(cfg) or int(cfg.max_position_embeddings)
    tok_max = getattr(model.tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < limit:
        limit = tok_max
    if requested is not None:
        if requested < 2:
            raise SenseJaxError(f"max_length must be >= 2, got {requested}")
        limit = min(limit, int(requested))
    if limit >= 1 << POSITION_BITS:
        raise SenseJaxError(f"max_length {limit} exceeds the supported {1 << POSITION_BITS}")
    return limit


def make_encoder(tokenizer, max_length: int):
    """``encode(texts) -> (ids: list[list[int]], n_truncated)`` with special tokens, truncated to
    ``max_length``, unpadded: what ``tokenizer(texts, truncation=True, max_length=...)`` gives.

    For a fast tokenizer this runs a private copy of its Rust backend (2-3x less Python work
    than transformers' wrapper, and the caller's tokenizer state is left alone)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        def encode_slow(texts):
            enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False,
                            return_attention_mask=False, return_token_type_ids=False)
            full = tokenizer(texts, truncation=False, padding=False, return_attention_mask=False,
                             return_token_type_ids=False)["input_ids"]
            return enc["input_ids"], sum(len(a) > len(b) for a, b in zip(full, enc["input_ids"]))
        return encode_slow
    private = Tokenizer.from_str(backend.to_str())
    private.no_padding()
    private.enable_truncation(max_length, direction=getattr(tokenizer, "truncation_side", "right"))

    def encode(texts):
        encs = private.encode_batch(list(texts), add_special_tokens=True)
        return [e.ids for e in encs], sum(1 for e in encs if e.overflowing)
    return encode


def flatten(ids: list[list[int]], first_passage: int):
    """Token ids of consecutive passages (the first one ``first_passage``) as flat arrays:
    (token [n] int32, passage [n] int64, position [n] int32, lengths [n_passages] int32)."""
    lengths = np.fromiter((len(x) for x in ids), np.int32, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))
    passage = np.repeat(np.arange(first_passage, first_passage + len(ids), dtype=np.int64), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    position = (np.arange(len(flat)) - starts).astype(np.int32)
    return flat, passage, position, lengths
