"""What every benchmark shares: the model under test, words in context, variants, output.

The one rule that turns "word ``w`` at word position ``i`` of a whitespace-tokenised sentence"
into vectors, applied the same way by every benchmark:

* The sentence is re-joined with single spaces and tokenised once with the model's fast
  tokenizer; the word's tokens are those whose character span (``offset_mapping``) overlaps the
  word's span (special tokens have empty spans and never match). A word that loses all its
  tokens (truncated away at the model's maximum length, or normalised to nothing) is skipped and
  counted in ``coverage``. With ``window`` W (an option, not the default) the word is read with
  at most W tokens of context on each side (:func:`crop_to_window`).
* ``contextual``: the mean of the model's hidden states over the word's tokens.
* ``senses_dot`` / ``senses_cos`` / ``senses_l2``: every token of the word is replaced by the
  nearest sense of that token under the metric (METHOD §2; tokens without a dictionary entry keep
  their hidden state), then averaged over the word's tokens: the same "replace, then pool" that
  the students are trained against.
* ``one_sense``: each token's single vector, the count-weighted mean of its senses. k-means
  centres are means of their clusters, so this equals the K = 1 dictionary's centre (the mean of
  every sample of the token) without a second dictionary; averaged over the word's tokens.
* ``static``: the mean of the input-embedding rows of the word's tokens.
* Per-word sense inventories (AvgSim, AvgSimC, MaxSimC in SCWS, the sense-to-class map in
  CoarseWSD-20): the senses of the word's *head token*, its first token. A word whose head token
  has no entry has one "sense": its vector in that context (counted as ``no_senses``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sense_jax.batching import length_bucketed_batches, packed_batches, pad_batch
from sense_jax.errors import SenseJaxError
from sense_jax.fingerprints import teacher_fingerprint
from sense_jax.hf_export import load_adaptor
from sense_jax.io_utils import read_json
from sense_jax.loading import load_model
from sense_jax.sense_dict import SenseDictionary, nearest_sense

METRICS = ("dot", "cos", "l2")


class BenchmarkDataError(SenseJaxError):
    """A benchmark file is missing, of the wrong format, or a line of it is malformed."""


def data_error(path, line_no: int | None, why: str) -> BenchmarkDataError:
    """The one-line error for bad benchmark data: ``file:line: why``."""
    where = f"{path}:{line_no}" if line_no is not None else str(path)
    return BenchmarkDataError(f"{where}: {why}")


def read_lines(path: str | os.PathLike) -> list[str]:
    """A text file's lines without line endings (LF or CRLF), UTF-8.

    Raises:
      BenchmarkDataError: the file is missing or not UTF-8 text.
    """
    p = Path(path)
    if not p.is_file():
        raise data_error(p, None, "file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise data_error(p, text_line_of(p.read_bytes(), e.start), "not UTF-8 text") from None
    return text.splitlines()


def text_line_of(data: bytes, byte_offset: int) -> int:
    return data[:byte_offset].count(b"\n") + 1


# --- the model under test ------------------------------------------------------------------------

@dataclasses.dataclass
class BenchModel:
    """A model read for benchmarks: hidden states of one layer, in the teacher's width.

    Attributes:
      model: the loaded :class:`sense_jax.loading.Model`.
      layer: hidden-state index as in transformers' ``hidden_states`` (0 = embeddings output,
        ``num_hidden_layers`` = last layer, the paper's choice).
      adaptor: exported students' linear adaptor (torch layout ``weight`` [D, S], ``bias`` [D]),
        applied to the last layer's states so that they live in the teacher's space; else None.
      embedding_fingerprint: the version-1 teacher fingerprint (embedding matrix only), to check
        dictionaries that predate the tokenizer-covering version 2; None for a student.
      fingerprint: the teacher fingerprint its states belong to (the model's own, or for an
        exported student the teacher's recorded in ``adaptor.json``).
    """

    model: Any
    layer: int
    adaptor: dict | None
    fingerprint: str | None
    path: str
    embedding_fingerprint: str | None = None

    def __post_init__(self):
        module, n_layers, layer = self.model.module, self.num_layers, self.layer
        w = None if self.adaptor is None else (jnp.asarray(self.adaptor["weight"], jnp.float32),
                                               jnp.asarray(self.adaptor["bias"], jnp.float32))

        @functools.partial(jax.jit)
        def states(params, ids, mask, segment_ids):
            kw = {} if segment_ids is None else {"segment_ids": segment_ids}
            if layer == n_layers:
                h = module.apply({"params": params}, ids, mask, **kw)
            else:
                h = module.apply({"params": params}, ids, mask, None, output_all_hidden_states=True, **kw)[1][layer]
            h = h.astype(jnp.float32)
            return h if w is None else h @ w[0].T + w[1]

        self._states = states
        # Target-word states by the targets' content: a second benchmark run of the same data
        # on the same model (another dictionary, another variant) skips the forward passes.
        self._cache: dict[str, WordStates] = {}

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def states(self, input_ids: np.ndarray, attention_mask: np.ndarray,
               segment_ids: np.ndarray | None = None) -> np.ndarray:
        """Hidden states [B, T, D] float32 of int32 [B, T] inputs (jitted, one compile per shape);
        ``segment_ids`` [B, T] int32 for packed rows (0 at padding, 1..S per passage)."""
        return np.asarray(self._states(self.model.params, input_ids, attention_mask, segment_ids))

    def embedding_matrix(self) -> np.ndarray:
        """The input-embedding matrix [V, D_model] float32 (the ``static`` variant's rows)."""
        V = int(self.model.config.vocab_size)
        flat = traverse_util.flatten_dict(self.model.params, sep="/")
        key = next((k for k in sorted(flat) if np.ndim(flat[k]) == 2 and np.shape(flat[k])[0] == V), None)
        if key is None:
            raise SenseJaxError(f"{self.path}: no [{V}, D] input-embedding parameter")
        return np.asarray(jax.device_get(flat[key]), np.float32)

    def max_tokens(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", 512) - getattr(cfg, "position_offset", 0))


def load_bench_model(path: str | os.PathLike, layer: int | None = None) -> BenchModel:
    """Load MODEL (a converted sense_jax directory, a transformers directory or an exported student).

    Args:
      layer: hidden-state index (0 = embeddings output .. L = last layer; negative counts from the
        end, -1 = last); None = last layer.

    Raises:
      SenseJaxError: unreadable model, no tokenizer, layer out of range, or ``layer`` other than the
        last for a student with an adaptor (the adaptor maps last-layer states only).
    """
    model = load_model(path)
    if model.tokenizer is None or not getattr(model.tokenizer, "is_fast", False):
        raise SenseJaxError(f"{path}: a fast tokenizer (offset mapping) is needed for benchmarks")
    n = int(model.config.num_hidden_layers)
    if layer is None:
        layer = n
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -n - 1 <= layer <= n:
        raise SenseJaxError(f"--layer {layer} out of range for a {n}-layer model (0..{n}, or -1..-{n + 1})")
    layer = int(layer) + n + 1 if layer < 0 else int(layer)
    adaptor, fp = None, None
    p = Path(path)
    if (p / "adaptor.safetensors").is_file():
        adaptor = load_adaptor(p)
        if layer != n:
            raise SenseJaxError(f"{path}: --layer {layer}: the student's adaptor maps last-layer states only")
        if (p / "adaptor.json").is_file():
            fp = read_json(p / "adaptor.json", "adaptor metadata").get("teacher_fingerprint")
    fp_v1 = None
    if adaptor is None:  # the same fingerprint extraction records (version 2 covers the tokenizer)
        fp_v1 = teacher_fingerprint(model.params, int(model.config.vocab_size))
        fp = teacher_fingerprint(model.params, int(model.config.vocab_size), model.tokenizer)
    return BenchModel(model=model, layer=layer, adaptor=adaptor, fingerprint=fp, path=str(path),
                      embedding_fingerprint=fp_v1)


def load_senses(path: str | os.PathLike, bm: BenchModel):
    """Load a sense dictionary and refuse one that was not built from ``bm``'s teacher and layer.

    Raises:
      SenseJaxError: naming the dictionary and the field that differs (width, vocabulary size,
        teacher fingerprint, layer).
    """
    sd = SenseDictionary.load(path)
    meta = sd.meta
    D = int(bm.adaptor["bias"].shape[0]) if bm.adaptor is not None else int(bm.model.config.hidden_size)
    V = int(bm.model.config.vocab_size)
    if sd.hidden_size != D:
        raise SenseJaxError(f"{path}: senses have width {sd.hidden_size} but {bm.path} gives states of "
                            f"width {D}; the dictionary was built from another teacher")
    if sd.vocab_size != V:
        raise SenseJaxError(f"{path}: covers {sd.vocab_size} tokens but {bm.path} has a vocabulary of {V}; "
                            "the dictionary was built from another teacher")
    fp = meta.get("teacher_fingerprint")
    # A dictionary records the version its extraction computed: compare like with like.
    ours = bm.fingerprint if str(fp).startswith("v") == str(bm.fingerprint).startswith("v") \
        else bm.embedding_fingerprint
    if fp and ours and fp != ours:
        raise SenseJaxError(f"{path}: built from teacher {meta.get('teacher', '?')!r} (fingerprint {fp}) but "
                            f"{bm.path} has teacher fingerprint {ours}; use that teacher's dictionary")
    # A student's adaptor maps its last layer into the teacher's space, whatever layer of the
    # teacher the dictionary was read from: only a teacher's own layer is compared.
    if bm.adaptor is None and meta.get("layer") is not None and int(meta["layer"]) != bm.layer:
        raise SenseJaxError(f"{path}: built from layer {meta['layer']} hidden states but --layer is "
                            f"{bm.layer}; build a dictionary from that layer (sense-jax extract --layer)")
    return sd


# --- words in context ----------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    """One word in context: ``words[start:end]`` of a whitespace-tokenised sentence."""

    words: Sequence[str]
    start: int
    end: int | None = None

    def __post_init__(self):
        if self.end is None:
            self.end = self.start + 1


@dataclasses.dataclass
class WordStates:
    """The tokens of each target word and their hidden states (ragged, one entry per target).

    Attributes:
      ids: per target, [n_i] int32 token ids of the word (empty where not covered).
      states: per target, [n_i, D] float32 hidden states of those tokens.
      covered: [N] bool, the word kept at least one token.
    """

    ids: list[np.ndarray]
    states: list[np.ndarray]
    covered: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index) -> "WordStates":
        index = list(index)
        return WordStates([self.ids[i] for i in index], [self.states[i] for i in index], self.covered[index])


def char_span(words: Sequence[str], start: int, end: int) -> tuple[str, int, int]:
    """``(" ".join(words), first char of words[start], end char of words[end - 1])``."""
    text = " ".join(words)
    a = sum(len(w) + 1 for w in words[:start])
    b = a + sum(len(w) + 1 for w in words[start:end]) - 1
    return text, a, b


def token_positions(offsets: Sequence[tuple[int, int]], a: int, b: int) -> list[int]:
    """Indices of the tokens whose character span overlaps [a, b) (empty spans never match)."""
    return [i for i, (s, e) in enumerate(offsets) if e > s and s < b and e > a]


ROW_LENGTH = 128  # packed row length (tokens): 2-5 % padding on every set here; attention < 6 % of the FLOPs
ROW_TOKENS = 2048  # tokens per packed forward batch (16 rows of 128)


def special_ends(offsets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """How many tokens at the start and at the end of an encoding are special (empty spans)."""
    n = len(offsets)
    pre = next((i for i, (s, e) in enumerate(offsets) if e > s), n)
    suf = next((i for i, (s, e) in enumerate(reversed(offsets)) if e > s), n)
    return pre, suf


def crop_to_window(ids: Sequence[int], offsets: Sequence[tuple[int, int]], pos: list[int], window: int,
                   limit: int) -> tuple[list[int], list[int]]:
    """The target's tokens ``pos`` with at most ``window`` tokens of context on each side (fewer
    where the sentence ends first, or where the whole would exceed ``limit`` tokens), between the
    encoding's own special tokens (``[CLS] ... [SEP]``). Returns the cropped ids and the target's
    positions in them (both empty when the word alone does not fit in ``limit``)."""
    pre, suf = special_ends(offsets)
    n = len(ids)
    room = limit - pre - suf - (pos[-1] + 1 - pos[0])
    if room < 0:
        return [], []
    w = min(window, room // 2)
    lo, hi = max(pre, pos[0] - w), min(n - suf, pos[-1] + 1 + w)
    return list(ids[:pre]) + list(ids[lo:hi]) + list(ids[n - suf:]), [p - lo + pre for p in pos]


def encode_targets(bm: BenchModel, targets: Sequence[Target], batch_size: int = 32,
                   max_length: int | None = None, window: int | None = None) -> WordStates:
    """Run the model over each target's sentence and keep the target word's tokens.

    Every distinct passage is run once: identical sentences (the same sentence with several
    targets, or the same target list asked again) share one forward. Passages of up to
    :data:`ROW_LENGTH` tokens are packed several to a row (:func:`sense_jax.batching.packed_batches`,
    ``segment_ids``: attention stays within a passage and positions restart, so each passage's
    states are those of the passage alone, within float rounding), :data:`ROW_TOKENS` tokens per
    batch: one compiled program for any mix of lengths and 2-5 % padding instead of 16-61 % with
    length buckets. Longer passages go in length-bucketed batches of ``batch_size``. A repeated
    call with the same targets returns the states it computed before (kept on ``bm``).

    Args:
      targets: words in context.
      max_length: tokens per sentence (default and cap: the model's maximum); a target cut off
        is not covered.
      window: None (default) reads the whole sentence. Else the passage is the target word's
        tokens with at most ``window`` tokens of context on each side (fewer where the sentence
        ends first) between the special tokens: fewer tokens to read (CoarseWSD-20's sentences
        hold ~39 tokens), different figures (see docs/benchmarks.md), and a target beyond the model's
        maximum length is still covered.

    Returns:
      :class:`WordStates` (one entry per target, in order).

    Raises:
      SenseJaxError: ``window`` < 0.
    """
    if window is not None and (isinstance(window, bool) or int(window) < 0):
        raise SenseJaxError(f"window must be a number of tokens >= 0, got {window!r}")
    key = hashlib.sha256(repr([(tuple(t.words), t.start, t.end) for t in targets]
                              + [max_length, window]).encode()).hexdigest()
    if key in bm._cache:
        return bm._cache[key]
    tok = bm.tokenizer
    spans = [char_span(t.words, t.start, t.end) for t in targets]
    texts = list(dict.fromkeys(s[0] for s in spans))
    index = {t: i for i, t in enumerate(texts)}
    limit = min(max_length or bm.max_tokens(), bm.max_tokens())
    if window is None:
        enc = tok(texts, truncation=True, max_length=limit, padding=False, return_offsets_mapping=True)
    else:  # cropped below, around the target: a word past the model's limit is still read
        enc = tok(texts, truncation=False, padding=False, return_offsets_mapping=True, verbose=False)
    passages: dict[tuple, int] = {}  # passage ids -> passage number
    need: list[list[tuple[int, list[int]]]] = []  # per passage: (target, its positions)
    covered = np.zeros(len(targets), bool)
    for j, (text, a, b) in enumerate(spans):
        e = index[text]
        ids, offsets = enc["input_ids"][e], enc["offset_mapping"][e]
        pos = token_positions(offsets, a, b)
        if pos and window is not None:
            ids, pos = crop_to_window(ids, offsets, pos, int(window), limit)
        if not pos:
            continue
        covered[j] = True
        p = passages.setdefault(tuple(ids), len(passages))
        if p == len(need):
            need.append([])
        need[p].append((j, pos))
    plist = list(passages)
    ids_out = [np.zeros(0, np.int32) for _ in targets]
    D = int(bm.adaptor["bias"].shape[0]) if bm.adaptor is not None else int(bm.model.config.hidden_size)
    states_out = [np.zeros((0, D), np.float32) for _ in targets]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def keep(p: int, ids_row: np.ndarray, h_row: np.ndarray, start: int) -> None:
        for j, pos in need[p]:
            at = [start + q for q in pos]
            ids_out[j] = np.asarray(ids_row[at], np.int32)
            states_out[j] = h_row[at]

    R = min(ROW_LENGTH, limit)
    lengths = np.array([len(x) for x in plist], np.int64)
    short = np.flatnonzero(lengths <= R)
    if len(short):
        for b in packed_batches([plist[p] for p in short], R, max(1, ROW_TOKENS // R), pad):
            h = bm.states(b.input_ids, b.attention_mask, b.segment_ids)
            for i, r, o in zip(b.items, b.row, b.offset):
                keep(int(short[i]), b.input_ids[r], h[r], int(o))
    long = np.flatnonzero(lengths > R)
    for idx, L in length_bucketed_batches(lengths[long], batch_size):
        rows_p = [int(long[i]) for i in idx]
        ids, mask = pad_batch([plist[p] for p in rows_p], L, pad, batch_size)
        h = bm.states(ids, mask)
        for r, p in enumerate(rows_p):
            keep(p, ids[r], h[r], 0)
    bm._cache[key] = WordStates(ids_out, states_out, covered)
    return bm._cache[key]


# --- variants ------------------------------------------------------------------------------------

def lookup(sense_dict, ids: np.ndarray, hidden: np.ndarray, metric: str,
           chunk: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest sense of each (token id, state) pair, in fixed-size chunks (one compile).

    Args:
      ids: [M] int token ids; hidden: [M, D] float32 states.

    Returns:
      sense index [M] int32 (-1 without entry), replaced [M, D] float32, has_entry [M] bool.
    """
    M = len(ids)
    D = hidden.shape[-1] if hidden.ndim == 2 else sense_dict.hidden_size
    k, rep, has = np.full(M, -1, np.int32), np.zeros((M, D), np.float32), np.zeros(M, bool)
    for a in range(0, M, chunk):
        n = min(chunk, M - a)
        pid = np.full((1, chunk), -1, np.int32)
        ph = np.zeros((1, chunk, D), np.float32)
        pid[0, :n], ph[0, :n] = ids[a:a + n], hidden[a:a + n]
        kk, rr, hh = nearest_sense(sense_dict, pid, ph, metric=metric)
        k[a:a + n], rep[a:a + n], has[a:a + n] = (np.asarray(kk[0, :n]), np.asarray(rr[0, :n], np.float32),
                                                 np.asarray(hh[0, :n]))
    return k, rep, has


def host_centres(sense_dict) -> tuple[np.ndarray, np.ndarray]:
    """The dictionary's centres [S, D] float32 and offsets [V + 1] int64 as numpy, in one copy:
    per-token slices of the device arrays cost a dispatch each."""
    return sense_dict.float_centres(), np.asarray(sense_dict.offsets, np.int64)


def one_sense_table(sense_dict) -> tuple[np.ndarray, np.ndarray]:
    """Each token's count-weighted mean of its senses, [V, D] float32, and has_entry [V] bool.

    Equal to the K = 1 dictionary's centre when the centres are k-means means (their counts
    weight them back to the mean of all samples); uniform weights where counts are all zero.
    Sums in float64 (a token's samples number in the thousands).
    """
    c, o = host_centres(sense_dict)
    w = np.asarray(sense_dict.counts, np.float64)
    n = np.diff(o)
    has = n > 0
    out = np.zeros((sense_dict.vocab_size, c.shape[1]), np.float32)
    if c.shape[0]:
        starts = o[:-1][has]
        tot = np.add.reduceat(w, starts)
        # Tokens whose counts are all zero weigh their senses equally.
        w = np.where(np.repeat(tot, n[has]) > 0, w, 1.0)
        sums = np.add.reduceat(c * w[:, None], starts, axis=0)
        out[has] = sums / np.add.reduceat(w, starts)[:, None]
    return out, has


def mean_rows(rows: list[np.ndarray], D: int) -> np.ndarray:
    """[N, D]: the mean of each ragged [n_i, D] block (NaN rows where n_i = 0)."""
    out = np.full((len(rows), D), np.nan, np.float32)
    for i, r in enumerate(rows):
        if len(r):
            out[i] = r.mean(0)
    return out


def contextual_vectors(ws: WordStates) -> np.ndarray:
    """[N, D] float32: mean hidden state over each word's tokens (NaN where not covered)."""
    D = next((s.shape[1] for s in ws.states if s.ndim == 2), 0)
    return mean_rows(ws.states, D)


def sense_vectors(ws: WordStates, sense_dict, metric: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """``senses_<metric>``: [N, D] mean of each word's tokens' nearest senses, and per word the
    [n_i] local sense indices (-1 for tokens without an entry)."""
    if not len(ws):
        return np.zeros((0, sense_dict.hidden_size), np.float32), []
    ids = np.concatenate(ws.ids) if len(ws) else np.zeros(0, np.int32)
    h = np.concatenate(ws.states) if len(ws) else np.zeros((0, sense_dict.hidden_size), np.float32)
    k, rep, _ = lookup(sense_dict, ids, h, metric)
    cut = np.cumsum([len(x) for x in ws.ids])[:-1]
    return mean_rows(np.split(rep, cut), sense_dict.hidden_size), np.split(k, cut)


def table_vectors(ws: WordStates, table: np.ndarray, has: np.ndarray | None = None,
                  fallback: bool = True) -> np.ndarray:
    """[N, D]: mean over each word's tokens of ``table[token]``; tokens with ``has`` False keep
    their hidden state when ``fallback``, else the word is not covered (NaN row)."""
    rows = []
    for ids, h in zip(ws.ids, ws.states):
        if has is None:
            rows.append(table[ids])
        elif fallback:
            rows.append(np.where(has[ids][:, None], table[ids], h))
        else:
            rows.append(table[ids] if has[ids].all() else np.zeros((0, table.shape[1]), np.float32))
    return mean_rows(rows, table.shape[1])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of [N, D] arrays, [N] float64 (NaN where a row is NaN)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num = (a * b).sum(-1)
    return num / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# --- output --------------------------------------------------------------------------------------

def result(task: str, data, bm: BenchModel, senses, coverage: dict, variants: dict,
           reference: dict, **extra) -> dict:
    """The benchmark result in the issue's JSON layout (plus task-specific ``extra`` keys)."""
    return {"task": task, "data": str(data), "model": bm.path, "senses": str(senses) if senses else None,
            "layer": bm.layer, "coverage": coverage, "variants": variants, "reference": reference, **extra}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 1.5 else f"{v:.4f}"
    return "" if v is None else str(v)


def render_markdown(res: dict) -> str:
    """One markdown table of ``res["variants"]`` (rows) by metric (columns), then coverage and the
    published reference figures."""
    variants = res["variants"]
    cols = list(dict.fromkeys(c for m in variants.values() for c in m))
    lines = [f"### {res['task']}: {res['model']}" + (f" + {res['senses']}" if res.get("senses") else "")
             + f" (layer {res['layer']})", "",
             "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in variants.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
    lines += ["", "coverage: " + json.dumps(res["coverage"], sort_keys=True)]
    if res.get("reference"):
        lines += ["", "published: " + "; ".join(f"{k} {v}" for k, v in res["reference"].items())]
    return "\n".join(lines) + "\n"
