"""The WordNet evaluation suite (METHOD §5): WSI, WiC-style pairs, classification, retrieval.

Every model variant is seen through one interface, :class:`Variant`: a jitted function from
``(input_ids [B, T], attention_mask [B, T], segment_ids [B, T])`` to hidden states
[B, T, D_teacher] (students pass through their adaptor), and optionally a sense dictionary whose
nearest senses replace those states (METHOD §2). Texts are packed several to a row
(:func:`encode`): one compiled program per model. Metrics come from scikit-learn.

1. ``wsi``: usage examples (never in the dictionary's corpus) of lemmas that are one token of the
   teacher's vocabulary and have >= 2 synsets with examples containing that token. Sense id of an
   example = index of the nearest sense of the target token in the teacher's dictionary (for every
   variant: its own states are matched against the teacher's senses). Mean over lemmas of the
   adjusted Rand index and V-measure against synset labels, beside ``one_sense`` (every example one
   cluster) and ``random`` (uniform over the token's K_t senses, seeded).
2. ``wic``: pairs of examples of the same lemma; predict "same synset" by "same sense id";
   balanced accuracy.
3. ``classification``: mean-pooled states of definitions -> logistic regression -> lexicographer
   file (45 classes); fixed held-out split by synset id hash; accuracy and macro-F1.
4. ``retrieval``: a usage example against the definitions of all synsets of its lemma; cosine of
   mean-pooled states; recall@1 and MRR.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections import Counter, defaultdict
from typing import Callable

import jax
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score, adjusted_rand_score, balanced_accuracy_score, f1_score, v_measure_score)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from sense_jax import wordnet
from sense_jax.batching import packed_batches
from sense_jax.errors import SenseJaxError
from sense_jax.sense_dict import SenseDictionary, nearest_sense

StatesFn = Callable[[np.ndarray, np.ndarray, np.ndarray], jax.Array]
EVAL_MAX_LENGTH = 128  # tokens per evaluated text: WordNet examples and definitions fit
ROW_TOKENS = 2048  # tokens per packed forward call (16 rows of EVAL_MAX_LENGTH)


@dataclasses.dataclass
class Variant:
    """A model variant under evaluation.

    Attributes:
      name: report key, e.g. "teacher_senses".
      states: ``(input_ids, attention_mask, segment_ids) -> [B, T, D_teacher]``, the inputs
        [B, T] int32 packed rows (``segment_ids`` 1..S per text of a row, 0 at padding: attention
        within a text, positions restarting at each).
      sense_dict: if set, states of tokens with an entry are replaced by their nearest sense.
    """

    name: str
    states: StatesFn
    sense_dict: SenseDictionary | None = None


@dataclasses.dataclass
class Encoded:
    """Per-text token ids and final states (ragged lists of [n_i] and [n_i, D] arrays)."""

    ids: list[np.ndarray]
    states: list[np.ndarray]


def encode(variant: Variant, token_ids: list[list[int]], pad_id: int, row_length: int = EVAL_MAX_LENGTH,
           rows_per_batch: int | None = None) -> Encoded:
    """Run ``variant`` over tokenised texts; returns ragged arrays ([n_i] ids, [n_i, D] f32 states).

    The texts are packed several to a row of ``row_length`` tokens, ``rows_per_batch`` rows per
    call (default: :data:`ROW_TOKENS` tokens per call; :func:`sense_jax.batching.packed_batches`):
    one input shape, so one compiled program per model for any mix of lengths, and a few percent
    of padding instead of a length-bucketed batch's. Each text's states are its states alone
    within float rounding (the models' ``segment_ids``).

    Raises:
      ValueError: a text is empty or longer than ``row_length`` (truncate it first; the row
        length must fit the model's positions).
    """
    rows = rows_per_batch or max(1, ROW_TOKENS // row_length)
    lengths = [len(t) for t in token_ids]
    out_states: list[np.ndarray | None] = [None] * len(token_ids)
    for b in packed_batches(token_ids, row_length, rows, pad_id):
        h = np.asarray(variant.states(b.input_ids, b.attention_mask, b.segment_ids), np.float32)
        for i, states in b.states_of(h, lengths):
            out_states[i] = states
    enc = Encoded([np.asarray(t, np.int32) for t in token_ids], out_states)
    return apply_senses(enc, variant.sense_dict) if variant.sense_dict is not None else enc


def _nearest_fixed_shape(sense_dict: SenseDictionary, ids: np.ndarray, h: np.ndarray, metric: str,
                         chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest sense of each of M states, (sense index [M] int32, replaced [M, D] f32), looked up
    ``chunk`` rows at a time in one fixed shape ([1, chunk], zero-padded): one compiled program
    per dictionary shape and metric, whatever M is, instead of one per distinct M."""
    idx = np.empty(len(ids), np.int32)
    out = np.empty((len(ids), h.shape[1]), np.float32)
    for a in range(0, len(ids), chunk):
        n = min(chunk, len(ids) - a)
        pid = np.zeros((1, chunk), np.int32)
        ph = np.zeros((1, chunk, h.shape[1]), np.float32)
        pid[0, :n], ph[0, :n] = ids[a:a + n], h[a:a + n]
        k, replaced, _ = nearest_sense(sense_dict, pid, ph, metric=metric)
        # Sliced on the host: slicing the device arrays would compile a slice per distinct n.
        idx[a:a + n], out[a:a + n] = np.asarray(k)[0, :n], np.asarray(replaced)[0, :n]
    return idx, out


def apply_senses(enc: Encoded, sense_dict: SenseDictionary, chunk: int = 8192) -> Encoded:
    """Replace every state of a token with an entry by its nearest sense (METHOD §2), by the
    dictionary's metric (``meta["metric"]``, else the paper's "dot")."""
    metric = sense_dict.meta.get("metric", "dot")
    _, out = _nearest_fixed_shape(sense_dict, np.concatenate(enc.ids), np.concatenate(enc.states), metric, chunk)
    splits = np.cumsum([len(x) for x in enc.ids])[:-1]
    return Encoded(enc.ids, np.split(out, splits))


def mean_pool(enc: Encoded, special_ids: set[int]) -> np.ndarray:
    """Mean of the states of non-special tokens, [N, D] (all tokens if a text has only specials)."""
    rows = []
    for ids, h in zip(enc.ids, enc.states):
        keep = ~np.isin(ids, list(special_ids))
        rows.append(h[keep].mean(0) if keep.any() else h.mean(0))
    return np.stack(rows)


# --- data ------------------------------------------------------------------------------------

@dataclasses.dataclass
class WsiItem:
    lemma: str
    token_id: int
    texts: list[str]
    labels: list[str]        # synset ids
    positions: list[int]     # index of the target token in each tokenised text
    token_ids: list[list[int]]


def _trimmed_span(text: str, start: int, end: int) -> tuple[int, int]:
    """A token's character span without surrounding whitespace (byte-level BPE and SentencePiece
    offsets may include the space that marks a word start)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _single_token_at(offsets, text: str, start: int, end: int) -> int | None:
    """Index of the one token whose trimmed span is exactly ``text[start:end]``, None when the
    characters are split over several tokens, share one with neighbours, or were truncated."""
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if len(hits) != 1:
        return None
    a, b = offsets[hits[0]]
    return hits[0] if _trimmed_span(text, a, b) == (start, end) else None


def _word_start_pattern(lemma: str) -> re.Pattern:
    # the lemma's letters where a word starts (no letter directly before), case-insensitive; what
    # follows is free, so "coiling" counts when the tokenizer splits off "coil" as one token
    return re.compile(rf"(?<![^\W\d_]){re.escape(lemma)}", re.IGNORECASE)


def wsi_items(tokenizer, max_per_lemma: int = 40, max_lemmas: int | None = None,
              max_length: int = EVAL_MAX_LENGTH, min_synsets: int = 0) -> list[WsiItem]:
    """Lemmas that are one vocabulary token inside a sentence, with examples of >= 2 synsets.

    The lemma's token is the one it gets after a space inside a sentence (``"a bank"``), found by
    character offsets, so word-start marks are those of running text whatever the tokenizer
    (WordPiece ``bank``, byte-level BPE ``Ġbank``, SentencePiece ``▁bank``), not those of the word
    tokenised alone. In each usage example the lemma is located by characters (its letters at the
    start of a word, case-insensitive) and mapped to tokens with the tokenizer's offset mapping;
    the example is kept when such an occurrence is exactly one token with the lemma's id (the
    first one is the target). An inflected form counts when the tokenizer splits the lemma off as
    that token (WordPiece ``coiling`` -> ``coil ##ing``); for WordPiece this selects exactly the
    examples and positions of the first occurrence of the lemma's id. Examples where the word has another id (a capitalised form in a cased
    vocabulary, the text's first word without a space before it) are left out: sense ids are
    per token id.

    Args:
      tokenizer: a transformers *fast* tokenizer (offset mappings).
      max_per_lemma: examples kept per lemma (sorted by synset id, then text).
      max_lemmas: first lemmas in alphabetical order, None for all.
      max_length: examples are truncated to this many tokens (specials included).
      min_synsets: a lemma is kept only when at least this many of its synsets have >= 2 kept
        examples (applied before ``max_lemmas``; 0: no such condition).

    Raises:
      SenseJaxError: the tokenizer has no offset mapping (not a fast tokenizer).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise SenseJaxError(f"WSI items need a fast tokenizer (offset mappings); got {type(tokenizer).__name__}")
    synsets = {s.id: s for s in wordnet.load_synsets()}
    by_lemma: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for ex in wordnet.load_examples():
        for lemma in synsets[ex.synset_id].lemmas:
            if "_" not in lemma and lemma.isalpha():
                by_lemma[lemma.lower()].append((ex.synset_id, ex.text))
    lemmas = sorted(by_lemma)
    items = []
    # Lemmas in blocks, each block's example texts tokenised in one batched call (one call per
    # lemma cost seconds of per-call overhead over WordNet's ~8,600 lemmas); the blocks stop once
    # max_lemmas items are found, so a small suite tokenises only the first lemmas' examples.
    for start in range(0, len(lemmas), _WSI_LEMMA_BLOCK):
        items += _wsi_block(tokenizer, lemmas[start:start + _WSI_LEMMA_BLOCK], by_lemma, max_per_lemma,
                            max_length, min_synsets)
        if max_lemmas and len(items) >= max_lemmas:
            break
    return items[:max_lemmas] if max_lemmas else items


_WSI_LEMMA_BLOCK = 256


def _wsi_block(tokenizer, lemmas: list[str], by_lemma: dict, max_per_lemma: int, max_length: int,
               min_synsets: int) -> list[WsiItem]:
    """:func:`wsi_items` for ``lemmas`` (in order)."""
    carriers = [f"a {lemma}" for lemma in lemmas]  # the lemma after a space, as in running text
    enc = tokenizer(carriers, add_special_tokens=False, return_offsets_mapping=True)
    targets = {}  # lemma -> its token id, for lemmas that are one token
    for lemma, carrier, ids, offsets in zip(lemmas, carriers, enc["input_ids"], enc["offset_mapping"]):
        at = _single_token_at(offsets, carrier, 2, len(carrier))
        if at is not None:
            targets[lemma] = ids[at]
    if not targets:
        return []
    # Every distinct example text once (an example is shared by its synset's lemmas).
    texts = sorted({t for lemma in targets for _, t in by_lemma[lemma]})
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
    tokenised = dict(zip(texts, zip(encoded["input_ids"], encoded["offset_mapping"])))
    items = []
    for lemma, tid in targets.items():
        rows = sorted(set(by_lemma[lemma]))
        word = _word_start_pattern(lemma)
        kept = []
        for sid, text in rows:
            ex_ids, ex_offsets = tokenised[text]
            for m in word.finditer(text):
                p = _single_token_at(ex_offsets, text, m.start(), m.end())
                if p is not None and ex_ids[p] == tid:
                    kept.append((sid, text, list(ex_ids), p))
                    break
        if len({s for s, *_ in kept}) < 2:
            continue
        kept = kept[:max_per_lemma]
        labels = [s for s, *_ in kept]
        if len(set(labels)) < 2 or sum(c >= 2 for c in Counter(labels).values()) < min_synsets:
            continue
        items.append(WsiItem(lemma, tid, [t for _, t, _, _ in kept], labels,
                             [p for *_, p in kept], [ids for _, _, ids, _ in kept]))
    return items


def classification_split(n_train: int, n_test: int) -> tuple[list, list]:
    """(train, test) synsets for the lexicographer-file probe: a fixed hash split (20% test)."""
    train, test = [], []
    for s in wordnet.load_synsets():
        (test if wordnet.in_split(s.id, 0.2, "classification") else train).append(s)
    pick = lambda xs, n, salt: sorted(xs, key=lambda s: wordnet.in_split_key(s.id, salt))[:n]
    return pick(train, n_train, "train"), pick(test, n_test, "test")


# --- evaluations ------------------------------------------------------------------------------

def sense_ids_at_targets(queries: Encoded, sense_dict: SenseDictionary, items: list[WsiItem],
                         metric: str | None = None, chunk: int = 8192) -> list[np.ndarray]:
    """Per lemma, the nearest-sense index of the target token in each example, [n_examples].

    ``queries`` holds the raw states of every item's examples, in item order; ``metric``
    defaults to the dictionary's own (its ``meta["metric"]``, else the paper's "dot").
    """
    metric = metric or sense_dict.meta.get("metric", "dot")
    if not items:
        return []
    # Every lemma's targets in one look-up, in apply_senses' shape (each row carries its own token
    # id): the same compiled program as apply_senses for the dictionary's metric, not one per lemma.
    h = np.stack([queries.states[i][p] for i, p in enumerate(p for it in items for p in it.positions)])
    ids = np.concatenate([np.full(len(it.positions), it.token_id, np.int32) for it in items])
    idx, _ = _nearest_fixed_shape(sense_dict, ids, h, metric, chunk)
    return np.split(idx, np.cumsum([len(it.positions) for it in items])[:-1])


def wsi_scores(items: list[WsiItem], sense_ids: list[np.ndarray]) -> dict:
    """Mean ARI and V-measure over lemmas (scikit-learn)."""
    ari = [adjusted_rand_score(it.labels, s) for it, s in zip(items, sense_ids)]
    vm = [v_measure_score(it.labels, s) for it, s in zip(items, sense_ids)]
    return {"ari": float(np.mean(ari)), "v_measure": float(np.mean(vm)), "lemmas": len(items),
            "examples": int(sum(len(it.labels) for it in items))}


def wic_pairs(items: list[WsiItem], max_pairs_per_lemma: int = 30, seed: int = 0) -> list[tuple[int, int, int]]:
    """(lemma index, example i, example j) pairs, at most ``max_pairs_per_lemma`` per lemma, seeded."""
    rng = np.random.default_rng(seed)
    pairs = []
    for li, it in enumerate(items):
        all_pairs = list(itertools.combinations(range(len(it.labels)), 2))
        chosen = rng.permutation(len(all_pairs))[:max_pairs_per_lemma]
        pairs.extend((li, *all_pairs[c]) for c in sorted(chosen))
    return pairs


def wic_scores(items: list[WsiItem], sense_ids: list[np.ndarray], pairs) -> dict:
    """Balanced accuracy of "same sense id" as a predictor of "same synset"."""
    y = [items[l].labels[i] == items[l].labels[j] for l, i, j in pairs]
    p = [sense_ids[l][i] == sense_ids[l][j] for l, i, j in pairs]
    return {"balanced_accuracy": float(balanced_accuracy_score(y, p)), "pairs": len(pairs),
            "same_synset_fraction": float(np.mean(y))}


def classification_scores(train_x, train_y, test_x, test_y, seed: int = 0) -> dict:
    """Logistic-regression probe on standardised features: accuracy and macro-F1 (scikit-learn).

    The fit runs with one BLAS thread (threadpoolctl): its L-BFGS steps are small matrix
    products, and OpenBLAS's threads, spinning beside XLA's pool or other jobs, made the probe
    20x slower on the 2-core development machine (8,000 x 384 features, 45 classes: 7.4 s with
    the default threads vs 0.3 s with one, at load 4). Same figures either way."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.5, random_state=seed))
    with threadpool_limits(limits=1, user_api="blas"):
        clf.fit(train_x, train_y)
        pred = clf.predict(test_x)
    return {"accuracy": float(accuracy_score(test_y, pred)),
            "macro_f1": float(f1_score(test_y, pred, average="macro")),
            "train": len(train_y), "test": len(test_y)}


def retrieval_scores(query: np.ndarray, candidates: list[np.ndarray], gold: list[int]) -> dict:
    """Recall@1 and MRR of cosine ranking; ``candidates[i]`` is [C_i, D], ``gold[i]`` its answer."""
    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    r1, rr = [], []
    for q, c, g in zip(unit(query), candidates, gold):
        scores = unit(c) @ q
        rank = 1 + int((scores > scores[g]).sum())
        r1.append(rank == 1)
        rr.append(1.0 / rank)
    return {"recall_at_1": float(np.mean(r1)), "mrr": float(np.mean(rr)), "queries": len(gold)}


# --- the whole suite --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """Sizes of the evaluation sets (the defaults run in a few minutes on 2 CPU cores).

    Attributes:
      min_synsets: a WSI lemma needs at least this many synsets with >= 2 examples each, so its
        gold clustering is never all singletons (where ARI and V-measure of a random clustering
        with K_t = 10 clusters are biased upwards: scikit-learn scores two all-singleton
        clusterings as a perfect match).
      max_per_lemma: examples kept per lemma (sorted by synset id, then text).
      max_lemmas: WSI / WiC / retrieval lemmas (first in alphabetical order), None for all.
      wic_pairs_per_lemma: pairs sampled per lemma for WiC.
      n_train, n_test: definitions for the lexicographer-file probe.
      seed: random baseline and pair sampling.
      max_length: tokens per text (examples, definitions), truncated beyond; :func:`write_report`
        lowers it to the models' position limit (:func:`eval_max_length`).
    """

    min_synsets: int = 2
    max_per_lemma: int = 40
    max_lemmas: int | None = None
    wic_pairs_per_lemma: int = 30
    n_train: int = 8000
    n_test: int = 2000
    seed: int = 0
    max_length: int = EVAL_MAX_LENGTH


def eval_max_length(models, default: int = EVAL_MAX_LENGTH) -> int:
    """``default``, lowered to the fewest positions any of ``models`` (:class:`sense_jax.loading.Model`)
    holds, so that no evaluated text overflows a position table (which would give NaN states)."""
    limits = [m.max_input_length for m in models if m.max_input_length is not None]
    return min([default, *limits])


SENSE_VARIANTS_FOR_WSI = ("teacher_senses", "teacher_one_sense", "skd_student_senses", "mse_student",
                          "truncated_student")


def run_suite(variants: dict[str, Variant], teacher_dict: SenseDictionary, tokenizer,
              cfg: SuiteConfig = SuiteConfig(), log=print) -> dict:
    """Run the four evaluations for every variant; returns the report's evaluation blocks.

    WSI and WiC use sense ids: for ``teacher_senses`` / ``skd_student_senses`` / ``mse_student`` /
    ``truncated_student`` the nearest sense (in ``teacher_dict``, by its metric) of that model's
    state at the target token; ``teacher_senses_cos`` / ``teacher_senses_l2`` the same with the
    other look-up metrics; for ``teacher_one_sense`` the nearest sense in its own K=1
    dictionary; plus the ``one_sense`` and ``random`` baselines. Classification and retrieval run
    every variant.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    special = set(tokenizer.all_special_ids)
    items = wsi_items(tokenizer, cfg.max_per_lemma, cfg.max_lemmas, cfg.max_length, cfg.min_synsets)
    pairs = wic_pairs(items, cfg.wic_pairs_per_lemma, cfg.seed)
    log(f"evaluation: {len(items)} WSI lemmas, {sum(len(i.labels) for i in items)} examples, {len(pairs)} WiC pairs")
    report = {"wsi": {}, "wic": {}, "classification": {}, "retrieval": {}}

    train, test = classification_split(cfg.n_train, cfg.n_test)
    defs_train = tokenizer([s.definition for s in train], truncation=True, max_length=cfg.max_length)["input_ids"]
    defs_test = tokenizer([s.definition for s in test], truncation=True, max_length=cfg.max_length)["input_ids"]
    # Retrieval: each WSI example against the definitions of every synset of its lemma.
    synsets = {s.id: s for s in wordnet.load_synsets()}
    lemma_synsets = defaultdict(list)
    for s in wordnet.load_synsets():
        for lm in s.lemmas:
            lemma_synsets[lm.lower()].append(s.id)
    cand_ids = sorted({sid for it in items for sid in lemma_synsets[it.lemma]})
    cand_index = {sid: i for i, sid in enumerate(cand_ids)}
    cand_tok = tokenizer([synsets[s].definition for s in cand_ids], truncation=True, max_length=cfg.max_length)["input_ids"]
    queries = [ids for it in items for ids in it.token_ids]
    groups = [[cand_index[s] for s in lemma_synsets[it.lemma]] for it in items for _ in it.labels]
    gold = [lemma_synsets[it.lemma].index(lab) for it in items for lab in it.labels]

    # Raw states once per model: consecutive variants that share ``states`` differ only by the
    # dictionary. Only the current model's are kept (~0.5 GB of f32 states per MiniLM-sized
    # model at the default sizes; keeping every model's made the evaluation the pipeline's peak).
    raw: tuple[int, dict[str, Encoded]] | None = None
    sense_ids: dict[str, list[np.ndarray]] = {}
    for name, v in variants.items():
        if raw is None or raw[0] != id(v.states):
            plain = dataclasses.replace(v, sense_dict=None)
            raw = enc = None  # the previous model's states go before this one's are computed
            raw = (id(v.states), {k: encode(plain, toks, pad, cfg.max_length) for k, toks in
                                  (("train", defs_train), ("test", defs_test), ("queries", queries),
                                   ("candidates", cand_tok))})
        enc = raw[1]
        if name in SENSE_VARIANTS_FOR_WSI:
            d = v.sense_dict if name == "teacher_one_sense" else teacher_dict
            sense_ids[name] = sense_ids_at_targets(enc["queries"], d, items)
            if name == "teacher_senses":  # how much the look-up metric matters (METHOD §2 options)
                for metric in ("cos", "l2"):
                    sense_ids[f"teacher_senses_{metric}"] = sense_ids_at_targets(enc["queries"], d, items, metric)
        if v.sense_dict is not None:
            enc = {k: apply_senses(e, v.sense_dict) for k, e in enc.items()}
        pool = {k: mean_pool(e, special) for k, e in enc.items()}
        report["classification"][name] = classification_scores(
            pool["train"], [s.lexname for s in train], pool["test"], [s.lexname for s in test], cfg.seed)
        c = pool["candidates"]
        report["retrieval"][name] = retrieval_scores(pool["queries"], [c[g] for g in groups], gold)
        log(f"  {name}: classification acc {report['classification'][name]['accuracy']:.3f}, "
            f"retrieval R@1 {report['retrieval'][name]['recall_at_1']:.3f}")
    sense_ids["one_sense"] = [np.zeros(len(it.labels), np.int32) for it in items]
    rng = np.random.default_rng(cfg.seed)
    n_senses = np.asarray(teacher_dict.n_senses)
    sense_ids["random"] = [rng.integers(0, max(int(n_senses[it.token_id]), 1), len(it.labels)) for it in items]
    for name, ids in sense_ids.items():
        report["wsi"][name] = wsi_scores(items, ids)
        report["wic"][name] = wic_scores(items, ids, pairs)
    return report


_COLUMNS = {"wsi": ("ari", "v_measure"), "wic": ("balanced_accuracy",),
            "classification": ("accuracy", "macro_f1"), "retrieval": ("recall_at_1", "mrr")}


def render_markdown(report: dict) -> str:
    """report.json -> report.md: one table per evaluation, plus size and speed."""
    lines = ["# sense_jax report", ""]
    if "config" in report:
        lines += ["```", json_dumps(report["config"]), "```", ""]
    for block, cols in _COLUMNS.items():
        if block not in report:
            continue
        lines += [f"## {block}", "", "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, m in report[block].items():
            lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
        lines.append("")
    for block in ("size", "speed"):
        if block in report:
            rows = report[block]
            keys = sorted({k for r in rows.values() for k in r})
            lines += [f"## {block}", "", "| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            for name, r in rows.items():
                lines.append(f"| {name} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
            lines.append("")
    if report.get("plots"):
        lines += ["## plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    return "\n".join(lines)


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:,.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def json_dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
