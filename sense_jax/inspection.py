"""Reading a sense: a token's senses with the corpus contexts closest to each (``sense-jax inspect``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from sense_jax.corpus import iter_passages
from sense_jax.errors import SenseJaxError
from sense_jax.evaluation import _single_token_at
from sense_jax.fingerprints import store_fingerprint
from sense_jax.sense_dict import SenseDictionary, gather_senses, nearest_sense, sense_scores
from sense_jax.store import open_store


def _in_text_token_id(tokenizer, word: str) -> int | None:
    """The id ``word`` gets inside running text, after a space (``Ġbank`` in a byte-level BPE
    vocabulary, ``▁bank`` in SentencePiece, ``bank`` in WordPiece), located by character offsets;
    None when it is not one token there (or the tokenizer has no offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    carrier = f"a {word}"
    enc = tokenizer(carrier, add_special_tokens=False, return_offsets_mapping=True)
    at = _single_token_at(enc["offset_mapping"], carrier, 2, len(carrier))
    return None if at is None else int(enc["input_ids"][at])


def _token_id(tokenizer, token: str) -> int:
    """``#ID``; else the word as it appears inside text (vocabularies that mark word starts also
    hold the bare piece, e.g. ``bank`` beside ``Ġbank``, which only text-initial words take); else
    a vocabulary entry spelled exactly so (``##ing``, ``Ġbank``); else its one piece."""
    if token.startswith("#") and token[1:].isdigit():
        return int(token[1:])
    in_text = _in_text_token_id(tokenizer, token)
    if in_text is not None:
        return in_text
    vocab = tokenizer.get_vocab()
    if token in vocab:
        return vocab[token]
    pieces = tokenizer.tokenize(token)
    if len(pieces) == 1 and pieces[0] in vocab:
        return vocab[pieces[0]]
    raise SenseJaxError(f"{token!r} is not one token of the teacher's vocabulary (it splits into {pieces}); "
                        "pass one of those pieces, or #ID")


def token_senses(token: str, sense_dict_dir, store_dir, *, corpus=None, teacher=None, contexts: int = 3,
                 metric: str | None = None) -> dict:
    """The senses of ``token``: per sense, its sample count and the ``contexts`` nearest passages.

    Samples are assigned to senses by ``metric`` (default: the dictionary's ``meta["metric"]``,
    else the paper's "dot"); "l2" reproduces the k-means clusters the senses came from.

    Returns a dict with ``token``, ``token_id`` and ``senses``: a list of
    ``{"index", "assigned", "count", "contexts": [(score, passage text with the token in [[ ]])]}``
    (``assigned``: the token's samples nearest to the sense by ``metric``; ``count``: the
    dictionary's, the samples k-means assigned to it when it was built).

    Raises:
      SenseJaxError: the token is not one vocabulary token, has no entry, or the files are
        missing / from different teachers; ``corpus`` is not the one the store was extracted from
        (a sampled position holds another token).
    """
    store = open_store(store_dir)
    sd = SenseDictionary.load(sense_dict_dir)
    if sd.hidden_size != store.hidden_size or sd.vocab_size != store.vocab_size:
        raise SenseJaxError(f"{sense_dict_dir} (V={sd.vocab_size}, D={sd.hidden_size}) was not built from "
                            f"{store_dir} (V={store.vocab_size}, D={store.hidden_size})")
    recorded = sd.meta.get("store_fingerprint")
    if recorded is not None:
        if recorded != store_fingerprint(store):
            raise SenseJaxError(f"{sense_dict_dir} was built from another store ({sd.meta.get('store', '?')}), "
                                f"not {store_dir}")
    teacher = teacher or store.meta.get("teacher")
    if not teacher or not Path(teacher).is_dir():
        raise SenseJaxError(f"teacher directory {teacher!r} not found; pass --teacher")
    tok = AutoTokenizer.from_pretrained(str(teacher), local_files_only=True)
    tid = _token_id(tok, token)
    if not 0 <= tid < sd.vocab_size:
        raise SenseJaxError(f"token id {tid} is outside the vocabulary (0..{sd.vocab_size - 1})")
    if int(sd.n_senses[tid]) == 0:
        raise SenseJaxError(f"token {token!r} (id {tid}) has no entry in {sense_dict_dir}")
    x = np.asarray(store.token_vectors(tid), np.float32)
    src = np.asarray(store.token_sources(tid))
    ids = np.full((len(x), 1), tid, np.int32)
    codebook, valid = gather_senses(sd, ids)
    metric = metric or sd.meta.get("metric", "dot")
    scores = np.asarray(sense_scores(codebook, valid, x[:, None, :], metric))[:, 0]
    assign = np.asarray(nearest_sense(sd, ids, x[:, None, :], metric=metric)[0][:, 0])
    chosen = {}
    for k in range(int(sd.n_senses[tid])):
        members = np.flatnonzero(assign == k)
        best = members[np.argsort(-scores[members, k], kind="stable")][:contexts]
        chosen[k] = (len(members), [(float(scores[i, k]), int(src[i, 0]), int(src[i, 1])) for i in best])
    corpus = corpus or store.meta.get("corpus")
    wanted = {p for _, lst in chosen.values() for _, p, _ in lst}
    texts = {}
    if corpus and Path(corpus).exists():
        for i, text in enumerate(iter_passages(corpus, store.meta.get("text_field", "text"))):
            if i in wanted:
                texts[i] = text
            if len(texts) == len(wanted):
                break
    max_len = int(store.meta.get("max_length", 512))

    def mark(p: int, pos: int) -> str:
        if p not in texts:
            return f"(passage {p}, token {pos}; corpus not available)"
        enc = tok(texts[p], truncation=True, max_length=max_len, return_offsets_mapping=True)
        if pos >= len(enc["input_ids"]) or enc["input_ids"][pos] != tid:  # another corpus than the store's
            raise SenseJaxError(f"corpus {corpus}: passage {p} has no {token!r} at token {pos}, where the "
                                f"store {store_dir} sampled it: not the corpus the store was extracted from "
                                f"({store.meta.get('corpus', '?')})")
        a, b = enc["offset_mapping"][pos]
        return texts[p][:a] + "[[" + texts[p][a:b] + "]]" + texts[p][b:]

    start = int(np.asarray(sd.offsets)[tid])
    built = np.asarray(sd.counts)[start:start + int(sd.n_senses[tid])]
    senses = [{"index": k, "assigned": n, "count": int(built[k]),
               "contexts": [(s, mark(p, pos)) for s, p, pos in lst]} for k, (n, lst) in chosen.items()]
    return {"token": token, "token_id": tid, "samples": len(x), "occurrences": int(store.occurrences[tid]),
            "metric": metric, "senses": senses}


def format_senses(r: dict) -> str:
    """Plain-text rendering of :func:`token_senses`."""
    lines = [f"{r['token']!r} (id {r['token_id']}): {len(r['senses'])} senses from {r['samples']} sampled "
             f"of {r['occurrences']} occurrences (look-up: {r['metric']})"]
    for s in r["senses"]:
        lines.append(f"  sense {s['index']} ({s['assigned']} samples nearest by {r['metric']}; "
                     f"{s['count']} assigned when it was built)")
        for score, text in s["contexts"]:
            lines.append(f"    {score:8.2f}  {text}")
    return "\n".join(lines)
