"""Benchmark: ``nearest_sense`` (jitted, chosen-row gather) vs the block path vs a per-token loop.

Side by side in one run, same dictionary and inputs, rounds interleaved (each round times every
contender once; the median over rounds is reported, the machine may be shared):

  - ours: :func:`sense_jax.nearest_sense` (scores from the gathered senses, the replaced state
    gathered as the one chosen row; chunked on CPU);
  - block: the previous implementation, kept here as the reference: the whole padded
    [B, T, K_max, D] codebook (:func:`sense_jax.gather_senses`, zeroed at padding), its scores,
    and the chosen slot taken from it (same chunking);
  - loop: the reference implementation's per-token Python loop (numpy slices and a matvec per
    position), as the paper's code does it.

All three give the same sense indices (checked). Also printed: the bytes of senses each call
must read (sum over positions of K_t x D x itemsize), which bounds any implementation.

Data: a synthetic dictionary (``--tokens`` tokens with 1..K_max senses, D = ``--dim``) and
Zipfian token ids, or ``--dict DIR`` (a saved dictionary: ids drawn from its tokens, Zipfian).

Run:  .venv/bin/python eval/bench_nearest.py [--dict DIR] [--dtype float32|bfloat16|int8]
                                              [--metric dot|cos|l2] [--batch 32] [--length 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dict", metavar="DIR", help="a saved sense dictionary (default: synthetic)")
    ap.add_argument("--tokens", type=int, default=2000, help="synthetic: tokens with an entry")
    ap.add_argument("--k-max", type=int, default=10, help="synthetic: most senses of a token")
    ap.add_argument("--dim", type=int, default=384, help="synthetic: D")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "int8"))
    ap.add_argument("--metric", default="dot", choices=("dot", "cos", "l2"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp

    from sense_jax.sense_dict import (SenseDictionary, default_chunk, gather_senses, nearest_sense,
                                      sense_scores)

    rng = np.random.default_rng(args.seed)
    if args.dict:
        sd = SenseDictionary.load(args.dict)
    else:
        V = 30522
        toks = rng.choice(V, args.tokens, replace=False)
        n = np.zeros(V, np.int64)
        n[toks] = rng.integers(1, args.k_max + 1, args.tokens)
        offsets = np.concatenate([[0], np.cumsum(n)])
        sd = SenseDictionary.from_arrays(rng.normal(size=(offsets[-1], args.dim)).astype(np.float32), offsets)
    sd = sd.astype(args.dtype)
    offsets = np.asarray(sd.offsets)
    toks = np.flatnonzero(np.diff(offsets) > 0)
    B, L, D = args.batch, args.length, sd.hidden_size
    zipf = 1.0 / np.arange(1, toks.size + 1)
    ids = rng.choice(rng.permutation(toks), size=(B, L), p=zipf / zipf.sum())
    hidden = rng.normal(size=(B, L, D)).astype(np.float32)
    ids_j, hid_j = jnp.asarray(ids, jnp.int32), jnp.asarray(hidden)
    chunk = default_chunk(sd.k_max, D)

    @jax.jit
    def block_path(sd, token_ids, hidden):
        def flat(a):
            codebook, valid = gather_senses(sd, a[0])
            k = jnp.argmax(sense_scores(codebook, valid, a[1], args.metric), axis=-1)
            chosen = jnp.take_along_axis(codebook, k[..., None, None], axis=-2)[..., 0, :]
            return jnp.where(valid[..., 0], k, -1), jnp.where(valid[..., :1], chosen.astype(a[1].dtype), a[1])
        if not chunk or token_ids.size <= chunk:
            return flat((token_ids, hidden))
        M = token_ids.size
        pad = -M % chunk
        i = jnp.pad(token_ids.reshape(-1), (0, pad), constant_values=-1).reshape(-1, chunk)
        h = jnp.pad(hidden.reshape(-1, D), ((0, pad), (0, 0))).reshape(-1, chunk, D)
        k, r = jax.lax.map(flat, (i, h))
        return k.reshape(-1)[:M].reshape(token_ids.shape), r.reshape(-1, D)[:M].reshape(hidden.shape)

    C = sd.float_centres()

    def loop():
        k = np.full((B, L), -1)
        rep = hidden.copy()
        for b in range(B):
            for i in range(L):
                c = C[offsets[ids[b, i]]:offsets[ids[b, i] + 1]]
                h = hidden[b, i]
                if args.metric == "dot":
                    s = c @ h
                elif args.metric == "cos":
                    s = c @ h / np.maximum(np.linalg.norm(c, axis=1) * np.linalg.norm(h), 1e-12)
                else:
                    s = -np.sum((c - h) ** 2, axis=1)
                k[b, i] = int(np.argmax(s))
                rep[b, i] = c[k[b, i]]
        return k

    ours = lambda: jax.block_until_ready(nearest_sense(sd, ids_j, hid_j, metric=args.metric))
    block = lambda: jax.block_until_ready(block_path(sd, ids_j, hid_j))
    k_ours, k_block, k_loop = np.asarray(ours()[0]), np.asarray(block()[0]), loop()
    assert np.array_equal(k_ours, k_block), "nearest_sense disagrees with the block path"
    agree = float(np.mean(k_ours == k_loop))  # float32 vs numpy rounding: exact ties aside, 1.0

    def per_call(fn, reps):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    times = {"ours": [], "block": [], "loop": []}
    for _ in range(args.rounds):
        times["ours"].append(per_call(ours, 20))
        times["block"].append(per_call(block, 20))
        times["loop"].append(per_call(loop, 2))
    med = {k: statistics.median(v) for k, v in times.items()}
    n_t = np.diff(offsets)[ids]
    read = int(n_t.sum()) * D * np.dtype(np.asarray(sd.centres).dtype).itemsize
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}; jax {jax.__version__} "
          f"on {jax.devices()[0].platform}; dictionary {sd.vocab_size:,} x K_max {sd.k_max}, "
          f"{int(sd.centres.shape[0]):,} senses, D={D}, {sd.dtype}; metric {args.metric}; chunk {chunk}")
    print(f"== nearest_sense, [{B}, {L}] positions (mean {n_t.mean():.1f} senses each), median of {args.rounds} rounds ==")
    print(f"ours (chosen row)      {med['ours'] * 1e3:8.2f} ms")
    print(f"block path (previous)  {med['block'] * 1e3:8.2f} ms   block/ours {med['block'] / med['ours']:.2f}x")
    print(f"per-token Python loop  {med['loop'] * 1e3:8.2f} ms   loop/ours  {med['loop'] / med['ours']:.1f}x "
          f"(same index at {agree:.2%} of positions)")
    print(f"senses read per call: {read / 1e6:.1f} MB ({read / med['ours'] / 1e9:.1f} GB/s for ours; "
          f"100x the loop would need {read / (med['loop'] / 100) / 1e9:.0f} GB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
