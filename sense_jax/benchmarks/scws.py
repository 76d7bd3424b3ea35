"""SCWS, Stanford Contextual Word Similarity (Huang et al., ACL 2012): 2,003 word pairs in context.

Data: one pair per line, 18 tab-separated fields ``id, word1, POS1, word2, POS2, context1,
context2, mean, r1 .. r10``; each context marks its target ``<b> word </b>``. Metric: Spearman's
rho (x 100, scipy) of a similarity against the mean human rating, on pairs whose two targets are
covered. Similarities (the standard multi-prototype set, Reisinger & Mooney 2010, Huang et al.
2012, Neelakantan et al. 2014), with S_w the senses of word w's head token and
``p(i | c) = softmax_i(cos(c, S_w[i]) / temperature)`` for the target's contextual vector c:

* ``global_sim``: cosine of one vector per word (``one_sense``: each token's mean sense);
* ``avg_sim``: mean cosine over all sense pairs, ``1/(K1 K2) sum_ij cos(S1_i, S2_j)``;
* ``avg_sim_c``: ``sum_ij p(i | c1) p(j | c2) cos(S1_i, S2_j)``;
* ``max_sim_c``: ``cos(S1_a, S2_b)`` for ``a = argmax p(. | c1)``, ``b = argmax p(. | c2)``;
* ``contextual``: ``cos(c1, c2)``; ``senses_<m>``: cosine of the nearest-sense vectors;
  ``static``: cosine of the input-embedding vectors.

A word whose head token has no senses has one: its contextual vector (``no_senses`` counts them).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from sense_jax.benchmarks import common as C
from sense_jax.benchmarks.wordsim import spearman

# p(sense | context) temperature over cosines. Chosen on WiC train (never on SCWS) with the default
# MiniLM teacher and dictionary by eval/choose_temperature.py: the AvgSimC similarity thresholded
# on WiC train was most accurate there at 0.01 of {0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1} (57.3%,
# falling to 53-55% from 0.05 up); lower values approach MaxSimC (57.5%).
TEMPERATURE = 0.01
REFERENCE = {"Huang et al. 2012 AvgSimC": 65.7, "MSSG (Neelakantan et al. 2014) AvgSimC": 69.3}


@dataclasses.dataclass
class ScwsPair:
    id: str
    a: C.Target
    b: C.Target
    score: float


def _marked(context: str, path, n: int, which: str) -> C.Target:
    words = re.sub(r"(</?b>)", r" \1 ", context).split()
    if words.count("<b>") != 1 or words.count("</b>") != 1:
        raise C.data_error(path, n, f"{which} must mark its target once as <b> word </b>")
    i, j = words.index("<b>"), words.index("</b>")
    if j <= i + 1:
        raise C.data_error(path, n, f"{which}: empty or misordered <b> ... </b> target")
    return C.Target(words[:i] + words[i + 1:j] + words[j + 1:], i, j - 1)


def read_scws(path: str | Path) -> list[ScwsPair]:
    """Read ``ratings.txt`` (LF or CRLF).

    Raises:
      BenchmarkDataError: a line without 18 fields, a context without exactly one ``<b> w </b>``
        target, or a mean rating that is not a number (file and line).
    """
    pairs = []
    for n, line in enumerate(C.read_lines(path), 1):
        if not line.strip():
            continue
        f = line.split("\t")
        if len(f) != 18:
            raise C.data_error(path, n, f"expected 18 tab-separated fields (id, word1, POS1, word2, POS2, "
                                        f"context1, context2, mean, r1..r10), found {len(f)}")
        try:
            score = float(f[7])
        except ValueError:
            raise C.data_error(path, n, f"mean rating {f[7]!r} is not a number") from None
        pairs.append(ScwsPair(f[0], _marked(f[5], path, n, "context1"), _marked(f[6], path, n, "context2"), score))
    if not pairs:
        raise C.data_error(path, None, "no pairs")
    return pairs


def sense_probabilities(c: np.ndarray, senses: np.ndarray, temperature: float) -> np.ndarray:
    """p(i | c) = softmax_i(cos(c, senses[i]) / temperature), [K] float64; c [D], senses [K, D]."""
    z = C.unit(senses) @ C.unit(c) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


def multi_prototype(c1, s1, c2, s2, temperature: float) -> dict[str, float]:
    """AvgSim, AvgSimC and MaxSimC of one pair (c: [D] contextual vectors, s: [K, D] senses)."""
    cos = C.unit(s1) @ C.unit(s2).T
    p1, p2 = sense_probabilities(c1, s1, temperature), sense_probabilities(c2, s2, temperature)
    return {"avg_sim": float(cos.mean()), "avg_sim_c": float(p1 @ cos @ p2),
            "max_sim_c": float(cos[np.argmax(p1), np.argmax(p2)])}


def pair_prototypes(ws: C.WordStates, ctx: np.ndarray, sense_dict, n: int,
                    temperature: float) -> tuple[dict[str, np.ndarray], int]:
    """AvgSim, AvgSimC, MaxSimC [n] of targets i and n + i of ``ws`` (NaN where one is not
    covered), and how many targets had no senses (their contextual vector stands in)."""
    rows = {k: np.full(n, np.nan) for k in ("avg_sim", "avg_sim_c", "max_sim_c")}
    no_senses = 0
    # One host copy of the centres: slicing the device array per target costs a dispatch each.
    centres, offsets = C.host_centres(sense_dict)

    def senses_of(i):
        nonlocal no_senses
        t = int(ws.ids[i][0])
        s = centres[offsets[t]:offsets[t + 1]]
        if not len(s):
            no_senses += 1
            return ctx[i][None]
        return s

    for i in range(n):
        if ws.covered[i] and ws.covered[n + i]:
            r = multi_prototype(ctx[i], senses_of(i), ctx[n + i], senses_of(n + i), temperature)
            for k, v in r.items():
                rows[k][i] = v
    return rows, no_senses


def evaluate(bm: C.BenchModel, data, sense_dict=None, senses_path=None, temperature: float = TEMPERATURE,
             batch_size: int = 32, window: int | None = None) -> dict:
    """Spearman x 100 of every similarity (see the module doc) against the mean rating."""
    if not temperature > 0:
        raise C.SenseJaxError(f"temperature must be > 0, got {temperature}")
    pairs = read_scws(data)
    n = len(pairs)
    ws = C.encode_targets(bm, [p.a for p in pairs] + [p.b for p in pairs], batch_size, window=window)
    ctx = C.contextual_vectors(ws)
    sims: dict[str, np.ndarray] = {}
    no_senses = 0
    if sense_dict is not None:
        table, has = C.one_sense_table(sense_dict)
        g = C.table_vectors(ws, table, has)
        sims["global_sim"] = C.cosine(g[:n], g[n:])
        rows, no_senses = pair_prototypes(ws, ctx, sense_dict, n, temperature)
        sims.update(rows)
    sims["contextual"] = C.cosine(ctx[:n], ctx[n:])
    if sense_dict is not None:
        for m in C.METRICS:
            v = C.sense_vectors(ws, sense_dict, m)[0]
            sims[f"senses_{m}"] = C.cosine(v[:n], v[n:])
    emb = bm.embedding_matrix()
    st = C.table_vectors(ws, emb)
    sims["static"] = C.cosine(st[:n], st[n:])
    gold = np.array([p.score for p in pairs])
    variants = {}
    for name, s in sims.items():
        ok = ~np.isnan(s)
        variants[name] = {"spearman": spearman(s[ok], gold[ok]), "pairs": int(ok.sum())}
    cov = {"pairs": n, "covered": int((ws.covered[:n] & ws.covered[n:]).sum()), "no_senses": no_senses}
    return C.result("scws", data, bm, senses_path, cov, variants, REFERENCE, temperature=temperature,
                    window=window)
