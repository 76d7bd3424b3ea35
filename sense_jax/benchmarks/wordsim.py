"""Word similarity: SimLex-999, SimVerb-3500, MEN, WordSim-353, RG-65, MC-30.

Spearman's rho (x 100, scipy) between the cosine of one vector per word and the human score, on
the pairs where both words are covered (coverage per set and variant). Variants: ``one_sense``
(each token's single sense, see :mod:`sense_jax.benchmarks.common`; a word with a token without
an entry is not covered), ``static`` (input-embedding rows; a word with an unknown token is not
covered), ``contextual`` (the word read alone: ``[CLS] w [SEP]``) and ``senses_<m>`` (the nearest
sense of the word read alone).

Readers follow each file's own layout (:func:`read_pairs`): tab-, comma- or space-separated; the
score is the first numeric column from the third on (SimLex and SimVerb have POS in the third);
a header is allowed on line 1 only; a file whose first data line is repeated on the next (the
SimVerb splits, RG, MC) drops the repeat; other duplicate pairs (WordSim-353's two money-cash
ratings) are kept, as in the published figures; MEN's lemma form (``sun-n``) loses its POS tag.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from sense_jax.benchmarks import common as C

DEFAULT_SETS = {"simlex999": "SimLex-999/SimLex-999.txt", "simverb3500": "SimLex-3500/SimVerb-3500.txt",
                "men": "MEN/MEN_dataset_natural_form_full", "ws353": "wordsim353/combined.csv",
                "rg65": "RG.txt", "mc30": "MC.txt"}
REFERENCE = {"all-MiniLM-L6-v2 (Model2Vec's word-similarity average)": 49.9,
             "Model2Vec potion-base-32M (average)": 55.2}


def _float(x: str) -> float | None:
    try:
        v = float(x)
    except ValueError:
        return None
    return v if np.isfinite(v) else None


def read_pairs(path: str | Path) -> list[tuple[str, str, float]]:
    """``(word1, word2, score)`` rows of a word-similarity file (see the module doc for the rules).

    Raises:
      BenchmarkDataError: an empty file, a line with another number of fields than the first, a
        line without a numeric score (other than a line-1 header), naming file and line.
    """
    path = Path(path)
    lines = C.read_lines(path)
    sep = "\t" if any("\t" in x for x in lines[:3]) else ("," if path.suffix == ".csv" else None)
    rows, width, score_col = [], None, None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        f = [x.strip() for x in (line.split(sep) if sep else line.split())]
        if score_col is None:
            score_col = next((i for i in range(2, len(f)) if _float(f[i]) is not None), None)
            if score_col is None:
                if n == 1 and not rows:  # header
                    continue
                raise C.data_error(path, n, f"no numeric score from the third field on in {line!r}")
            width = len(f)
        if len(f) != width:
            raise C.data_error(path, n, f"expected {width} fields like the first data line, found {len(f)}")
        score = _float(f[score_col])
        if score is None:
            raise C.data_error(path, n, f"score {f[score_col]!r} is not a number")
        w1, w2 = f[0], f[1]
        if "lemma" in path.name:
            w1, w2 = (re.sub(r"-[a-z]$", "", w) for w in (w1, w2))
        rows.append((w1, w2, score))
    if not rows:
        raise C.data_error(path, None, "no word pairs")
    if len(rows) > 1 and rows[0] == rows[1]:
        rows = rows[1:]
    return rows


def find_sets(data) -> dict[str, Path]:
    """Set name -> file: ``data`` is one file, or a folder laid out like shared/evaldata/wordsim."""
    d = Path(data)
    if d.is_file():  # named as in a folder when it is one of the known files
        known = next((name for name, rel in DEFAULT_SETS.items() if d.as_posix().endswith(rel)), None)
        return {known or d.stem: d}
    if not d.exists():
        raise C.data_error(d, None, "not found")
    sets = {name: d / rel for name, rel in DEFAULT_SETS.items() if (d / rel).is_file()}
    if not sets:
        raise C.data_error(d, None, f"none of the word-similarity files {sorted(DEFAULT_SETS.values())} in it")
    return sets


def word_vectors(bm: C.BenchModel, sense_dict, words: list[str], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per variant, [n_words, D] vectors (NaN rows where the word is not covered)."""
    ws = C.encode_targets(bm, [C.Target(w.split(), 0, len(w.split())) for w in words], batch_size)
    out = {}
    if sense_dict is not None:
        table, has = C.one_sense_table(sense_dict)
        out["one_sense"] = C.table_vectors(ws, table, has, fallback=False)
    emb = bm.embedding_matrix()
    unk = bm.tokenizer.unk_token_id
    known = np.ones(emb.shape[0], bool)
    if unk is not None:
        known[unk] = False
    out["static"] = C.table_vectors(ws, emb, known, fallback=False)
    out["contextual"] = C.contextual_vectors(ws)
    if sense_dict is not None:
        for m in C.METRICS:
            out[f"senses_{m}"] = C.sense_vectors(ws, sense_dict, m)[0]
    return out


def spearman(x, y) -> float:
    """Spearman's rho x 100 (scipy); NaN with fewer than 2 pairs."""
    if len(x) < 2:
        return float("nan")
    return 100 * float(spearmanr(x, y).statistic)


def evaluate(bm: C.BenchModel, data, sense_dict=None, senses_path=None, batch_size: int = 64,
             window: int | None = None) -> dict:
    """Spearman x 100 per set and variant, plus their ``average`` over the sets (``window`` is
    accepted for a uniform interface and changes nothing: every word is read alone)."""
    sets = {name: read_pairs(p) for name, p in find_sets(data).items()}
    words = sorted({w for rows in sets.values() for a, b, _ in rows for w in (a, b)})
    index = {w: i for i, w in enumerate(words)}
    vecs = word_vectors(bm, sense_dict, words, batch_size)
    variants, coverage = {}, {}
    for name, v in vecs.items():
        variants[name] = {}
        for s, rows in sets.items():
            a = v[[index[x] for x, _, _ in rows]]
            b = v[[index[y] for _, y, _ in rows]]
            gold = np.array([g for *_, g in rows])
            sim = C.cosine(a, b)
            ok = ~np.isnan(sim)
            variants[name][s] = spearman(sim[ok], gold[ok])
            coverage.setdefault(s, {"pairs": len(rows)})[name] = int(ok.sum())
        variants[name]["average"] = float(np.mean([variants[name][s] for s in sets]))
    return C.result("wordsim", data, bm, senses_path, coverage, variants, REFERENCE,
                    sets={s: str(p) for s, p in find_sets(data).items()})
