"""WiC (Pilehvar & Camacho-Collados, NAACL 2019): does a word mean the same in two sentences?

Data: ``DIR/<split>/<split>.data.txt`` (or ``DIR/<split>.data.txt``), tab-separated
``lemma, POS (N|V), i1-i2, sentence1, sentence2`` (whitespace-tokenised sentences, ``i1``/``i2``
the 0-based word indices of the target), and ``<split>.gold.txt`` (``T`` or ``F`` per line).

Unsupervised protocol: a similarity of the two occurrences is thresholded at the value that
maximises accuracy on ``tune_split`` (default train); accuracy is reported on ``split`` (default
dev). Similarities: ``contextual`` (cosine of the hidden states), ``senses_<m>`` (cosine of the
nearest-sense vectors by metric m), ``same_sense_<m>`` (1 if every token of both occurrences
picks the same sense of the same token, else 0), ``avg_sim_c`` / ``max_sim_c`` (SCWS's
context-weighted sense similarities of the head token, :mod:`sense_jax.benchmarks.scws`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, roc_curve

from sense_jax.benchmarks import common as C
from sense_jax.benchmarks import scws

REFERENCE = {"random": 50.0, "ELMo": 57.7, "context2vec": 59.3, "BERT-large (supervised)": 65.5,
             "SenseBERT-large": 72.1, "LMMS (dev)": 68.2}


@dataclasses.dataclass
class WicPair:
    lemma: str
    pos: str
    a: C.Target
    b: C.Target
    label: bool | None


def split_files(data: str | Path, split: str) -> tuple[Path, Path]:
    d = Path(data)
    for base in (d / split, d):
        if (base / f"{split}.data.txt").is_file():
            return base / f"{split}.data.txt", base / f"{split}.gold.txt"
    raise C.data_error(d, None, f"no {split}.data.txt in it or in {d / split}")


def read_wic(data_file: str | Path, gold_file: str | Path | None = None) -> list[WicPair]:
    """Read a WiC ``*.data.txt`` (and its ``*.gold.txt`` where it exists).

    Raises:
      BenchmarkDataError: a line without 5 fields, a bad index pair, an index outside its
        sentence, a gold label other than T/F, or a gold file of another length (file and line).
    """
    pairs = []
    for n, line in enumerate(C.read_lines(data_file), 1):
        f = line.split("\t")
        if len(f) != 5:
            raise C.data_error(data_file, n, f"expected 5 tab-separated fields (lemma, POS, i1-i2, "
                                             f"sentence1, sentence2), found {len(f)}")
        lemma, pos, idx, s1, s2 = f
        try:
            i1, i2 = (int(x) for x in idx.split("-"))
        except ValueError:
            raise C.data_error(data_file, n, f"index field {idx!r} is not i1-i2") from None
        w1, w2 = s1.split(), s2.split()
        for i, w, which in ((i1, w1, "sentence1"), (i2, w2, "sentence2")):
            if not 0 <= i < len(w):
                raise C.data_error(data_file, n, f"target index {i} outside {which} of {len(w)} words")
        pairs.append(WicPair(lemma, pos, C.Target(w1, i1), C.Target(w2, i2), None))
    if not pairs:
        raise C.data_error(data_file, None, "no pairs")
    if gold_file is not None and Path(gold_file).exists():
        gold = C.read_lines(gold_file)
        if len(gold) != len(pairs):
            raise C.data_error(gold_file, None, f"{len(gold)} labels for {len(pairs)} pairs in {data_file}")
        for n, (g, p) in enumerate(zip(gold, pairs), 1):
            if g.strip() not in ("T", "F"):
                raise C.data_error(gold_file, n, f"label {g!r} is not T or F")
            p.label = g.strip() == "T"
    return pairs


def best_threshold(sim: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The threshold t maximising the accuracy of ``sim >= t`` on (sim, y), and that accuracy.

    Candidates are scikit-learn's ROC thresholds (every distinct score, plus one above all); the
    accuracy of each is ``(TPR * P + (1 - FPR) * N) / (P + N)``.
    """
    y = np.asarray(y, bool)
    P, N = int(y.sum()), int((~y).sum())
    if P == 0 or N == 0:
        return -np.inf if P else np.inf, 1.0
    fpr, tpr, thr = roc_curve(y, sim, drop_intermediate=False)
    acc = (tpr * P + (1 - fpr) * N) / (P + N)
    i = int(np.argmax(acc))
    return float(thr[i]), float(acc[i])


def similarities(bm: C.BenchModel, sense_dict, pairs: list[WicPair], batch_size: int = 32,
                 temperature: float | None = None, window: int | None = None) -> dict:
    """Per similarity name, [n] float64 similarities of each pair's two occurrences (NaN where an
    occurrence is not covered). ``avg_sim_c`` / ``max_sim_c``: SCWS's context-weighted sense
    similarities (:func:`sense_jax.benchmarks.scws.multi_prototype`) at ``temperature``
    (default :data:`sense_jax.benchmarks.scws.TEMPERATURE`); ``window``: see
    :func:`sense_jax.benchmarks.common.encode_targets`."""
    ws = C.encode_targets(bm, [p.a for p in pairs] + [p.b for p in pairs], batch_size, window=window)
    n = len(pairs)
    h = C.contextual_vectors(ws)
    out = {"contextual": C.cosine(h[:n], h[n:])}
    if sense_dict is not None:
        for m in C.METRICS:
            v, k = C.sense_vectors(ws, sense_dict, m)
            out[f"senses_{m}"] = C.cosine(v[:n], v[n:])
            same = [float(len(ws.ids[i]) > 0 and np.array_equal(ws.ids[i], ws.ids[n + i])
                          and np.array_equal(k[i], k[n + i]) and (k[i] >= 0).all()) for i in range(n)]
            out[f"same_sense_{m}"] = np.where(ws.covered[:n] & ws.covered[n:], same, np.nan)
        rows, _ = scws.pair_prototypes(ws, h, sense_dict, n, temperature or scws.TEMPERATURE)
        out["avg_sim_c"], out["max_sim_c"] = rows["avg_sim_c"], rows["max_sim_c"]
    return out


def evaluate(bm: C.BenchModel, data, sense_dict=None, senses_path=None, split: str = "dev",
             tune_split: str = "train", batch_size: int = 32, window: int | None = None,
             temperature: float = scws.TEMPERATURE) -> dict:
    """WiC accuracy (x 100) on ``split`` of every similarity, thresholded on ``tune_split``.

    Pairs with an uncovered occurrence count as wrong on the evaluated split (and are left out
    of tuning); ``coverage`` says how many. ``temperature``: of ``avg_sim_c`` / ``max_sim_c``'s
    p(sense | context) (SCWS's, :func:`sense_jax.benchmarks.scws.sense_probabilities`).

    Raises:
      BenchmarkDataError: missing or malformed files; a split without gold labels.
      SenseJaxError: ``temperature`` not > 0.
    """
    if not temperature > 0:
        raise C.SenseJaxError(f"temperature must be > 0, got {temperature}")
    sets = {}
    for name in dict.fromkeys((tune_split, split)):
        data_file, gold_file = split_files(data, name)
        pairs = read_wic(data_file, gold_file)
        if any(p.label is None for p in pairs):
            raise C.data_error(gold_file, None, f"gold labels of split {name} are missing")
        sets[name] = (pairs, similarities(bm, sense_dict, pairs, batch_size, temperature, window=window))
    tune_pairs, tune_sim = sets[tune_split]
    eval_pairs, eval_sim = sets[split]
    y_tune = np.array([p.label for p in tune_pairs])
    y = np.array([p.label for p in eval_pairs])
    variants = {}
    for name, s in eval_sim.items():
        ok = ~np.isnan(tune_sim[name])
        t, tune_acc = best_threshold(tune_sim[name][ok], y_tune[ok])
        pred = np.where(np.isnan(s), ~y, s >= t)  # an uncovered pair counts as wrong
        variants[name] = {"accuracy": 100 * float(accuracy_score(y, pred)), "threshold": t,
                          "tune_accuracy": 100 * tune_acc}
    cov = {"pairs": len(eval_pairs), "covered": int((~np.isnan(eval_sim["contextual"])).sum()),
           "tune_pairs": len(tune_pairs)}
    return C.result("wic", data, bm, senses_path, cov, variants, REFERENCE, split=split, tune_split=tune_split,
                    window=window, temperature=temperature)
