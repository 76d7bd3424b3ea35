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
answers each instance with its lemma's first WordNet sense (the most frequent). Metric: F1 of
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


def sense_texts(sid: str, lemma: str) -> list[C.Target]:
    """The texts of a candidate synset with the lemma's word span in each (see the module doc)."""
    examples = _examples()
    lw = lemma.replace("_", " ").split()
    out = [C.Target(lw + [":"] + _SYN[sid].definition.split(), 0, len(lw))]
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


def evaluate(bm: C.BenchModel, data, sense_dict=None, senses_path=None, batch_size: int = 32,
             window: int | None = None) -> dict:
    """F1 of nearest-candidate WSD for every variant, beside the first-sense baseline (``window``:
    context tokens read around each word, :func:`sense_jax.benchmarks.common.encode_targets`)."""
    xml, gold_file = find_files(data)
    inst = read_xml(xml)
    gold = read_gold(gold_file, inst)
    _examples()
    cands = [candidates(i.lemma, i.pos) for i in inst]
    lemma_sid = sorted({(i.lemma, s) for i, c in zip(inst, cands) for s in c})
    texts, owner = [], []
    for j, (lemma, sid) in enumerate(lemma_sid):
        for t in sense_texts(sid, lemma):
            texts.append(t)
            owner.append(j)
    # Whole texts: the mean over every word of the sentence / the sense's text (mean pooling).
    # One call for the words and the whole texts: each distinct text is read once.
    whole = lambda ts: [C.Target(t.words, 0, len(t.words)) for t in ts]
    queries = [i.target for i in inst]
    n_q, n_t = len(queries), len(texts)
    ws_all = C.encode_targets(bm, queries + texts + whole(queries) + whole(texts), batch_size, window=window)
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
    total = len(inst)
    answered = sum(bool(c) for c in cands)
    variants = {}
    scores: dict[str, list[np.ndarray]] = {}
    for name, (q, s) in spaces.items():
        vec = np.full((len(lemma_sid), q.shape[1]), np.nan)
        for j in range(len(lemma_sid)):
            rows = s[owner == j]
            rows = rows[~np.isnan(rows).any(1)]
            if len(rows):
                vec[j] = rows.mean(0)
        scores[name] = []
        for c, i in enumerate(inst):
            v = vec[[pos_of[(i.lemma, sid)] for sid in cands[c]]]
            scores[name].append(C.unit(np.nan_to_num(v)) @ C.unit(np.nan_to_num(q[c]))
                                if cands[c] and not np.isnan(q[c]).any() else None)
    # The word's and the whole text's cosines added: both views of the same candidates.
    scores["contextual+sentence"] = [None if a is None or b is None else a + b
                                     for a, b in zip(scores["contextual"], scores["sentence"])]
    for name, sc in scores.items():
        answered_here = [(i, x) for i, x in zip(range(total), sc) if x is not None]
        correct = sum(cands[c][int(np.argmax(x))] in gold[inst[c].id] for c, x in answered_here)
        variants[name] = f1(correct, len(answered_here), total)
    variants["first_sense"] = f1(sum(c[0] in gold[i.id] for i, c in zip(inst, cands) if c), answered, total)
    cov = {"instances": total, "with_candidates": answered, "covered": int(ws_inst.covered.sum()),
           "candidate_synsets": len(lemma_sid), "sense_texts": len(texts)}
    return C.result("wsd", data, bm, senses_path, cov, variants, REFERENCE)
