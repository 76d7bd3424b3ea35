"""All-words WSD in the framework of Raganato, Camacho-Collados & Navigli (EACL 2017).

Data: ``<set>.data.xml`` (``<corpus><text><sentence>`` of ``<wf>`` tokens and ``<instance id
lemma pos>`` targets) and ``<set>.gold.key.txt`` (``instance_id key [key ...]``, WordNet 3.0
sense keys; any listed key is correct). ``DATA`` is the folder holding both, or the XML file.

Knowledge-based, from WordNet alone (the package's WordNet 3.0 files): every candidate synset of
an instance's lemma and part of speech gets a vector, the mean over its texts of the lemma's
vector in that text, where the texts are ``"<lemma> : <definition>"`` and the synset's usage
examples that contain the lemma as a word; the instance gets the nearest candidate by cosine
(``contextual`` states, or ``senses_<m>`` nearest-sense vectors on both sides); ``sentence``
compares the mean over the whole sentence with the mean over the whole sense text (mean
pooling, the sentence encoder's own use), ``contextual+sentence`` adds the two cosines. ``first_sense``
answers each instance with its lemma's first WordNet sense (the most frequent). ``<similarity>+prior``
combines each similarity's p(sense | context) with WordNet's sense-tag counts (:func:`posterior`,
:func:`sense_prior`; temperatures chosen on WordNet's usage examples, :data:`TEMPERATURES`);
``prior`` is the most tagged sense alone. Metric: F1 of
precision (correct / answered) and recall (correct / instances), x 100; instances whose lemma has
no synset of that part of speech get no answer (``coverage``).
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from sense_jax import wordnet
from sense_jax.benchmarks import common as C
from sense_jax.wordnet import load_sense_keys

POS_TYPES = {"NOUN": ("n",), "VERB": ("v",), "ADJ": ("a", "s"), "ADV": ("r",)}
SS_TYPE = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "s"}
REFERENCE = {"MFS (ALL)": 65.2, "UKB (ALL)": 67.3, "LMMS (ALL)": "73.8-75.4",
             "note": "semeval2007 is usually the development set; ALL = the five sets together"}


@dataclasses.dataclass
class Instance:
    id: str
    lemma: str
    pos: str
    target: C.Target


def find_files(data) -> tuple[Path, Path]:
    d = Path(data)
    if d.is_file():
        xml = d
    else:
        found = sorted(d.glob("*.data.xml")) if d.is_dir() else []
        if len(found) != 1:
            raise C.data_error(d, None, f"expected one *.data.xml in it, found {len(found)}")
        xml = found[0]
    return xml, xml.with_name(xml.name.replace(".data.xml", ".gold.key.txt"))


def read_xml(path: str | Path) -> list[Instance]:
    """Every ``<instance>`` with its sentence as whitespace words (tokens split on spaces).

    Raises:
      BenchmarkDataError: not XML of the framework's layout (file and line), an instance without
        id, lemma or pos, or a pos outside NOUN/VERB/ADJ/ADV.
    """
    path = Path(path)
    if not path.is_file():
        raise C.data_error(path, None, "file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise C.data_error(path, e.position[0], f"not well-formed XML ({e})") from None
    if root.tag != "corpus":
        raise C.data_error(path, 1, f"root element <{root.tag}>, expected <corpus>")
    out = []
    for sent in root.iter("sentence"):
        words, spans = [], []
        for tok in sent:
            w = (tok.text or "").split()
            spans.append((tok, len(words), len(words) + len(w)))
            words.extend(w)
        for tok, a, b in spans:
            if tok.tag != "instance":
                continue
            iid, lemma, pos = tok.get("id"), tok.get("lemma"), tok.get("pos")
            if not (iid and lemma and pos) or a == b:
                raise C.data_error(path, None, f"instance {iid!r} lacks id, lemma, pos or text")
            if pos not in POS_TYPES:
                raise C.data_error(path, None, f"instance {iid}: pos {pos!r} not in {sorted(POS_TYPES)}")
            out.append(Instance(iid, lemma, pos, C.Target(words, a, b)))
    if not out:
        raise C.data_error(path, None, "no <instance> elements")
    return out


def read_gold(path: str | Path, instances: list[Instance]) -> dict[str, set[str]]:
    """Instance id -> gold synset ids.

    Raises:
      BenchmarkDataError: a line without a key, an id not in the XML, or a sense key not in
        WordNet 3.0 (file, line and key).
    """
    keys = load_sense_keys()
    ids = {i.id for i in instances}
    gold = {}
    for n, line in enumerate(C.read_lines(path), 1):
        f = line.split()
        if not f:
            continue
        if len(f) < 2:
            raise C.data_error(path, n, "expected an instance id and at least one sense key")
        if f[0] not in ids:
            raise C.data_error(path, n, f"instance {f[0]!r} is not in the XML")
        for k in f[1:]:
            if k not in keys:
                raise C.data_error(path, n, f"sense key {k!r} is not in WordNet 3.0")
        gold[f[0]] = {keys[k][0] for k in f[1:]}
    missing = ids - set(gold)
    if missing:
        raise C.data_error(path, None, f"{len(missing)} instances without gold keys (e.g. {sorted(missing)[0]})")
    return gold


def candidates(lemma: str, pos: str) -> list[str]:
    """Synset ids of ``lemma`` in ``pos`` (NOUN/VERB/ADJ/ADV), in WordNet sense order."""
    index = _candidate_index()
    rows = [r for t in POS_TYPES[pos] for r in index.get((lemma.lower().replace(" ", "_"), t), ())]
    return [s for _, s in sorted(set(rows))]


_INDEX: dict | None = None


def _candidate_index() -> dict:
    global _INDEX
    if _INDEX is None:
        index: dict = {}
        for key, (sid, n) in load_sense_keys().items():
            lemma, _, rest = key.partition("%")
            index.setdefault((lemma, SS_TYPE[rest[0]]), []).append((n, sid))
        _INDEX = index
    return _INDEX


def sense_texts(sid: str, lemma: str, lemma_names: bool = False) -> list[C.Target]:
    """The texts of a candidate synset with the lemma's word span in each (see the module doc).

    With ``lemma_names`` the gloss also names the synset's other lemmas, as knowledge-based sense
    embeddings do (LMMS, Loureiro & Jorge 2019; ARES): ``"<lemma> , <other> , <other> : <definition>"``.
    """
    examples = _examples()
    lw = lemma.replace("_", " ").split()
    others = [x.replace("_", " ") for x in _SYN[sid].lemmas if x.lower() != lemma.lower()] if lemma_names else []
    names = (" , ".join([""] + others)).split()
    out = [C.Target(lw + names + [":"] + _SYN[sid].definition.split(), 0, len(lw))]
    for ex in examples.get(sid, ()):
        words = ex.split()
        low = [w.lower().strip(".,;:!?'\"()") for w in words]
        for i in range(len(words) - len(lw) + 1):
            if low[i:i + len(lw)] == [w.lower() for w in lw]:
                out.append(C.Target(words, i, i + len(lw)))
                break
    return out


_SYN: dict | None = None
_EX: dict | None = None


def _examples() -> dict:
    global _EX, _SYN
    if _EX is None:
        _SYN = {s.id: s for s in wordnet.load_synsets()}
        ex: dict = {}
        for e in wordnet.load_examples():
            ex.setdefault(e.synset_id, []).append(e.text)
        _EX = ex
    return _EX


def f1(correct: int, answered: int, total: int) -> dict:
    """Precision, recall and F1 (x 100) as the framework's scorer computes them."""
    p = correct / answered if answered else 0.0
    r = correct / total if total else 0.0
    return {"f1": 100 * (2 * p * r / (p + r) if p + r else 0.0), "precision": 100 * p, "recall": 100 * r}


_COUNTS: dict | None = None


def sense_counts() -> dict[tuple[str, str], int]:
    """(lemma, synset id) -> how often that sense was tagged in WordNet's semantic concordances
    (SemCor among them; ``cntlist.rev``, shipped as ``data/wordnet/sensecounts.tsv.gz`` by
    ``eval/derive_wordnet.py``); senses never tagged are absent (count 0)."""
    global _COUNTS
    if _COUNTS is None:
        keys = load_sense_keys()
        _COUNTS = {(k.partition("%")[0], keys[k][0]): int(n) for k, n in wordnet._rows("sensecounts.tsv.gz", None)}
    return _COUNTS


def sense_prior(lemma: str, synsets: list[str]) -> np.ndarray:
    """p(sense) over a lemma's candidate synsets, [K] float64: tag counts with add-one smoothing,
    ``(n_s + 1) / (sum_k n_k + K)`` (a lemma never tagged gets the uniform prior)."""
    counts = sense_counts()
    key = lemma.lower().replace(" ", "_")
    n = np.array([counts.get((key, s), 0) for s in synsets], np.float64)
    return (n + 1) / (n.sum() + len(n))


def posterior(cos: np.ndarray, prior: np.ndarray, temperature: float) -> np.ndarray:
    """Bayes' rule over a lemma's K candidates, [K] float64: the model's p(sense | context) =
    softmax(cos / temperature) read as a likelihood (it is the posterior under a uniform prior),
    times ``prior``, renormalised: ``softmax(cos / temperature + log prior)``."""
    z = np.asarray(cos, np.float64) / temperature + np.log(np.asarray(prior, np.float64))
    z = np.exp(z - z.max())
    return z / z.sum()


# p(sense | context) = softmax over the candidates of cosine / temperature, per similarity. Chosen
# on WordNet's own usage examples, never on an evaluation set, by ``python -m eval.choose_temperature
# --wsd`` (the default MiniLM teacher and dictionary): held-out examples of polysemous lemmas
# against gloss-only sense vectors, the temperature of the grid with the highest mean
# log-likelihood of the example's own synset. The Bayes variants (``<similarity>+prior``) answer
# argmax_s cos_s / temperature + log p(s): no weight is tuned on the test set.
# Grid 0.005-1 (x2-2.5 steps), 500 examples: contextual 0.05 (mean log-likelihood -1.28), sentence
# 0.1 (-1.15), contextual+sentence 0.1 (-1.12), senses_dot 0.5 (-1.46), senses_cos and senses_l2
# 0.2 (-1.44); uniform over the candidates would score about -1.5 there.
TEMPERATURES = {"contextual": 0.05, "sentence": 0.1, "contextual+sentence": 0.1,
                "senses_dot": 0.5, "senses_cos": 0.2, "senses_l2": 0.2}


def candidate_scores(bm: C.BenchModel, sense_dict, queries: list[tuple[str, str, C.Target]], texts_of,
                     batch_size: int = 32, window: int | None = None):
    """Cosine of every query to each candidate synset of its lemma and POS, per similarity.

    Args:
      queries: (lemma, pos in NOUN/VERB/ADJ/ADV, the word in context).
      texts_of: ``texts_of(synset_id, lemma) -> [Target]``, the texts whose mean vector is the
        synset's (:func:`sense_texts`).

    Returns:
      candidates (per query, synset ids in WordNet order), scores ({similarity: per query a [K]
      float64 array, or None where the query has no candidate or is not covered}), the query
      WordStates and the number of sense texts.
    """
    _examples()
    cands = [candidates(lemma, pos) for lemma, pos, _ in queries]
    lemma_sid = sorted({(q[0], s) for q, c in zip(queries, cands) for s in c})
    texts, owner = [], []
    for j, (lemma, sid) in enumerate(lemma_sid):
        for t in texts_of(sid, lemma):
            texts.append(t)
            owner.append(j)
    # Whole texts: the mean over every word of the sentence / the sense's text (mean pooling).
    # One call for the words and the whole texts: each distinct text is read once.
    whole = lambda ts: [C.Target(t.words, 0, len(t.words)) for t in ts]
    targets = [q[2] for q in queries]
    n_q, n_t = len(targets), len(texts)
    ws_all = C.encode_targets(bm, targets + texts + whole(targets) + whole(texts), batch_size, window=window)
    ws_inst, ws_sense = ws_all.subset(range(n_q)), ws_all.subset(range(n_q, n_q + n_t))
    owner = np.array(owner)
    spaces = {"contextual": (C.contextual_vectors(ws_inst), C.contextual_vectors(ws_sense)),
              "sentence": (C.contextual_vectors(ws_all.subset(range(n_q + n_t, 2 * n_q + n_t))),
                           C.contextual_vectors(ws_all.subset(range(2 * n_q + n_t, 2 * (n_q + n_t)))))}
    if sense_dict is not None:
        for m in C.METRICS:
            spaces[f"senses_{m}"] = (C.sense_vectors(ws_inst, sense_dict, m)[0],
                                     C.sense_vectors(ws_sense, sense_dict, m)[0])
    pos_of = {key: j for j, key in enumerate(lemma_sid)}
    scores: dict[str, list] = {}
    for name, (q, s) in spaces.items():
        vec = np.full((len(lemma_sid), q.shape[1]), np.nan)
        for j in range(len(lemma_sid)):
            rows = s[owner == j]
            rows = rows[~np.isnan(rows).any(1)]
            if len(rows):
                vec[j] = rows.mean(0)
        scores[name] = []
        for c, (lemma, _, _) in enumerate(queries):
            v = vec[[pos_of[(lemma, sid)] for sid in cands[c]]]
            scores[name].append(C.unit(np.nan_to_num(v)) @ C.unit(np.nan_to_num(q[c]))
                                if cands[c] and not np.isnan(q[c]).any() else None)
    # The word's and the whole text's cosines added: both views of the same candidates.
    scores["contextual+sentence"] = [None if a is None or b is None else a + b
                                     for a, b in zip(scores["contextual"], scores["sentence"])]
    return cands, scores, ws_inst, len(texts)


def evaluate(bm: C.BenchModel, data, sense_dict=None, senses_path=None, batch_size: int = 32,
             window: int | None = None, temperatures: dict | None = None, lemma_names: bool = False) -> dict:
    """F1 of nearest-candidate WSD for every variant, beside the first-sense baseline (``window``:
    context tokens read around each word, :func:`sense_jax.benchmarks.common.encode_targets`).

    ``<similarity>+prior`` variants combine p(sense | context) (softmax of the cosines over the
    candidates at ``temperatures[similarity]``, default :data:`TEMPERATURES`) with the prior
    p(sense) of :func:`sense_prior` by Bayes' rule; ``prior`` answers the most tagged sense alone
    (ties: WordNet order). ``lemma_names``: glosses name the synset's other lemmas
    (:func:`sense_texts`; an option, the reference figures are without).
    """
    xml, gold_file = find_files(data)
    inst = read_xml(xml)
    gold = read_gold(gold_file, inst)
    temperatures = {**TEMPERATURES, **(temperatures or {})}
    cands, scores, ws_inst, n_texts = candidate_scores(
        bm, sense_dict, [(i.lemma, i.pos, i.target) for i in inst],
        lambda sid, lemma: sense_texts(sid, lemma, lemma_names), batch_size, window)
    total = len(inst)
    answered = sum(bool(c) for c in cands)
    priors = [sense_prior(i.lemma, c) if c else None for i, c in zip(inst, cands)]

    def score(choices) -> dict:
        got = [(c, k) for c, k in enumerate(choices) if k is not None]
        return f1(sum(cands[c][k] in gold[inst[c].id] for c, k in got), len(got), total)

    variants = {name: score([None if x is None else int(np.argmax(x)) for x in sc]) for name, sc in scores.items()}
    for name, sc in scores.items():
        if name in temperatures:
            variants[f"{name}+prior"] = score([None if x is None else
                                               int(np.argmax(posterior(x, p, temperatures[name])))
                                               for x, p in zip(sc, priors)])
    variants["prior"] = score([None if p is None else int(np.argmax(p)) for p in priors])
    variants["first_sense"] = score([0 if c else None for c in cands])
    cov = {"instances": total, "with_candidates": answered, "covered": int(ws_inst.covered.sum()),
           "candidate_synsets": len({(i.lemma, s) for i, c in zip(inst, cands) for s in c}),
           "sense_texts": n_texts}
    return C.result("wsd", data, bm, senses_path, cov, variants, REFERENCE, window=window, lemma_names=lemma_names,
                    temperatures={k: v for k, v in temperatures.items() if k in scores})


def gloss_text(sid: str, lemma: str) -> list[C.Target]:
    """A synset's ``"<lemma> : <definition>"`` alone (the first of :func:`sense_texts`)."""
    return sense_texts(sid, lemma)[:1]


POS_OF_TYPE = {"n": "NOUN", "v": "VERB", "a": "ADJ", "s": "ADJ", "r": "ADV"}


def example_queries(n: int = 500, seed: int = 0) -> list[tuple[str, str, C.Target, str]]:
    """Up to ``n`` WordNet usage examples of polysemous lemmas, drawn with ``seed``: (lemma, POS,
    the lemma in its example, the example's synset). Held-out instances for choosing the
    temperatures (the synset's vector then comes from its gloss alone)."""
    examples = _examples()
    rows = []
    for sid in sorted(examples):
        syn = _SYN[sid]
        pos = POS_OF_TYPE[sid[-1]]
        for lemma in syn.lemmas:
            lemma = lemma.lower()
            if len(candidates(lemma, pos)) < 2:
                continue
            found = sense_texts(sid, lemma)[1:]
            if found:
                rows.append((lemma, pos, found[0], sid))
                break
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(rows), size=min(n, len(rows)), replace=False).tolist())
    return [rows[i] for i in pick]


def choose_temperatures(bm: C.BenchModel, sense_dict=None, grid=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
                        n: int = 500, seed: int = 0, batch_size: int = 32) -> dict[str, dict[float, float]]:
    """Per similarity and temperature, the mean log-likelihood of the held-out example's synset
    under softmax(cos / temperature) over its lemma's candidates (:func:`example_queries`)."""
    queries = example_queries(n, seed)
    cands, scores, _, _ = candidate_scores(bm, sense_dict, [q[:3] for q in queries], gloss_text, batch_size)
    out = {}
    for name, sc in scores.items():
        ll = {}
        for tau in grid:
            vals = []
            for (_, _, _, sid), c, x in zip(queries, cands, sc):
                if x is None:
                    continue
                z = x / tau
                vals.append(z[c.index(sid)] - (z.max() + np.log(np.exp(z - z.max()).sum())))
            ll[tau] = float(np.mean(vals))
        out[name] = ll
    return out
