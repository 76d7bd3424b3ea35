"""CoarseWSD-20 (Loureiro et al., Computational Linguistics 2021): 20 ambiguous nouns.

Data: ``DIR/<word>/{train,test}.data.txt`` (``index<TAB>sentence``, lower-cased whitespace
tokens, 0-based index of the target word), ``{train,test}.gold.txt`` (one class id per line) and
``classes_map.txt`` (JSON class id -> sense name; 0 = most frequent). ``DIR`` may also be the
folder above (holding ``CoarseWSD-20/``).

Per word, test accuracy and macro-F1 (scikit-learn) of:

* ``<variant>_1nn``: the class whose centroid (mean vector of its train examples) has the highest
  cosine with the test example (the LMMS-style 1-nearest-neighbour protocol), for
  ``contextual`` and ``senses_<m>`` vectors;
* ``sense_map_<m>``: the dictionary's own senses of the head token, each mapped to the majority
  class of the train examples whose nearest sense (metric m) it is (senses no train example picks
  map to the most frequent class); a test example gets its nearest sense's class;
* ``mfs``: the most frequent train class.

then averaged over the words (``per_word`` holds each word's figures).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from sense_jax.benchmarks import common as C

REFERENCE = {"note": "Loureiro et al. 2021 report 1-NN with BERT-base/large; per-word tables in the paper"}


def word_dirs(data) -> list[Path]:
    d = Path(data)
    if (d / "CoarseWSD-20").is_dir():
        d = d / "CoarseWSD-20"
    dirs = sorted(p for p in d.iterdir() if (p / "train.data.txt").is_file()) if d.is_dir() else []
    if not dirs:
        raise C.data_error(d, None, "no <word>/train.data.txt under it (not a CoarseWSD-20 folder)")
    return dirs


def read_split(word_dir: Path, split: str) -> tuple[list[C.Target], list[int]]:
    """One word's split: targets and class ids.

    Raises:
      BenchmarkDataError: a line without 2 fields, a non-integer index or class, an index outside
        its sentence, a class not in classes_map.txt, or a gold file of another length.
    """
    data_file, gold_file = word_dir / f"{split}.data.txt", word_dir / f"{split}.gold.txt"
    classes_file = word_dir / "classes_map.txt"
    try:
        classes = {int(k) for k in json.loads(Path(classes_file).read_text(encoding="utf-8"))}
    except FileNotFoundError:
        raise C.data_error(classes_file, None, "file not found") from None
    except (ValueError, AttributeError) as e:
        raise C.data_error(classes_file, 1, f"not a JSON object of class ids ({e})") from None
    targets = []
    for n, line in enumerate(C.read_lines(data_file), 1):
        f = line.split("\t")
        if len(f) != 2:
            raise C.data_error(data_file, n, f"expected 2 tab-separated fields (index, sentence), found {len(f)}")
        try:
            i = int(f[0])
        except ValueError:
            raise C.data_error(data_file, n, f"index {f[0]!r} is not an integer") from None
        words = f[1].split()
        if not 0 <= i < len(words):
            raise C.data_error(data_file, n, f"target index {i} outside a sentence of {len(words)} words")
        targets.append(C.Target(words, i))
    gold = C.read_lines(gold_file)
    if len(gold) != len(targets):
        raise C.data_error(gold_file, None, f"{len(gold)} labels for {len(targets)} sentences in {data_file}")
    labels = []
    for n, g in enumerate(gold, 1):
        try:
            labels.append(int(g))
        except ValueError:
            raise C.data_error(gold_file, n, f"class {g!r} is not an integer") from None
        if labels[-1] not in classes:
            raise C.data_error(gold_file, n, f"class {labels[-1]} not in {classes_file}")
    return targets, labels


def nearest_centroid(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, tie: float = 1e-6) -> np.ndarray:
    """Class of the centroid (mean of each class's train vectors) with the highest cosine, [n_test].

    Cosines within ``tie`` of the best are ties, won by the class with the most train examples
    (then the smaller id): with one vector per word (K = 1) every centroid is the same vector up
    to rounding, and rounding must not pick the class.
    """
    ok = ~np.isnan(train).any(1)
    classes, freq = np.unique(y_train[ok], return_counts=True)
    cent = np.stack([train[ok & (y_train == c)].mean(0) for c in classes])
    sims = C.unit(np.nan_to_num(test)) @ C.unit(cent).T
    near = sims >= sims.max(1, keepdims=True) - tie
    return classes[np.argmax(np.where(near, freq[None, :], -1), 1)]


def sense_map_predict(k_train: np.ndarray, y_train: np.ndarray, k_test: np.ndarray, mfs: int) -> np.ndarray:
    """Map each sense index to the majority train class of its examples (ties: smallest class
    id; unused senses: ``mfs``), then predict each test example's sense's class."""
    mapping = {}
    for s in np.unique(k_train):
        c = Counter(y_train[k_train == s].tolist())
        mapping[int(s)] = min(c, key=lambda x: (-c[x], x))
    return np.array([mapping.get(int(s), mfs) for s in k_test])


def first_per_class(labels: list[int], shots: int) -> list[int]:
    """Indices of the first ``shots`` examples of each class, in file order."""
    seen: Counter = Counter()
    keep = []
    for i, y in enumerate(labels):
        if seen[y] < shots:
            seen[y] += 1
            keep.append(i)
    return keep


def evaluate(bm: C.BenchModel, data, sense_dict=None, senses_path=None, batch_size: int = 32,
             window: int | None = None, shots: int | None = None) -> dict:
    """Mean over words of test accuracy and macro-F1 (x 100) of every variant (see module doc).

    Args:
      window: context tokens read on each side of the target
        (:func:`sense_jax.benchmarks.common.encode_targets`; None = the whole sentence).
      shots: None (default) uses every train example; else only the first ``shots`` train
        examples of each class (file order), as in the paper's few-shot setting: the class
        centroids, the sense-to-class map and the most frequent class come from those alone.
        The test split is always read whole.

    Raises:
      SenseJaxError: ``shots`` < 1; bad data (file and line named).
    """
    if shots is not None and (isinstance(shots, bool) or int(shots) < 1):
        raise C.SenseJaxError(f"shots must be >= 1 train examples per class, got {shots!r}")
    per_word: dict[str, dict] = {}
    coverage = {"words": 0, "test": 0, "train": 0, "not_covered": 0}
    splits = {}
    for wd in word_dirs(data):
        (tr, y_tr), (te, y_te) = read_split(wd, "train"), read_split(wd, "test")
        if shots is not None:
            keep = first_per_class(y_tr, int(shots))
            tr, y_tr = [tr[i] for i in keep], [y_tr[i] for i in keep]
        splits[wd] = (tr, np.array(y_tr), te, np.array(y_te))
    # Every word's sentences in one call: one packing, full batches.
    ws_all = C.encode_targets(bm, [t for tr, _, te, _ in splits.values() for t in tr + te], batch_size,
                              window=window)
    start = 0
    for wd, (tr, y_tr, te, y_te) in splits.items():
        ws = ws_all.subset(range(start, start + len(tr) + len(te)))
        start += len(tr) + len(te)
        n = len(tr)
        coverage["words"] += 1
        coverage["train"] += n
        coverage["test"] += len(te)
        coverage["not_covered"] += int((~ws.covered).sum())
        mfs = Counter(y_tr.tolist()).most_common(1)[0][0]
        preds = {"mfs": np.full(len(te), mfs)}
        vecs = {"contextual": C.contextual_vectors(ws)}
        if sense_dict is not None:
            for m in C.METRICS:
                v, k = C.sense_vectors(ws, sense_dict, m)
                vecs[f"senses_{m}"] = v
                head = np.array([kk[0] if len(kk) else -1 for kk in k])  # head token's sense
                preds[f"sense_map_{m}"] = sense_map_predict(head[:n], y_tr, head[n:], mfs)
        for name, v in vecs.items():
            preds[f"{name}_1nn"] = nearest_centroid(v[:n], y_tr, v[n:])
        cov = ws.covered[n:]
        per_word[wd.name] = {name: {"accuracy": 100 * float(accuracy_score(y_te, np.where(cov, p, -1))),
                                    "macro_f1": 100 * float(f1_score(y_te, np.where(cov, p, -1), average="macro",
                                                                     labels=np.unique(y_te), zero_division=0))}
                             for name, p in preds.items()}
    names = list(next(iter(per_word.values())))
    order = [x for x in names if x.endswith("_1nn")] + [x for x in names if x.startswith("sense_map")] + ["mfs"]
    variants = {name: {met: float(np.mean([w[name][met] for w in per_word.values()]))
                       for met in ("accuracy", "macro_f1")} for name in order}
    return C.result("coarsewsd20", data, bm, senses_path, coverage, variants, REFERENCE, window=window, shots=shots,
                    per_word=per_word)
