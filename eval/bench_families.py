"""Benchmark: tokens/s of our jitted Llama / DeBERTa-v3 encoders vs transformers' PyTorch models.

Random small-but-real-shaped models (D=256, 4 layers; Llama with GQA 8:2 and llama3 rope,
bidirectional and causal; DeBERTa-v3 with 256 position buckets), the same right-padded f32
batch on both sides, the same thread count. Compilation is excluded and reported apart; each
side runs ``--reps`` times and the median is reported. Run:

    python -m eval.bench_families [--batch-size 16] [--length 128] [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def _bench(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import DebertaV2Config, DebertaV2Model, LlamaConfig, LlamaModel

    from sense_jax.convert import load_hf

    torch.set_num_threads(args.threads)
    B, T = args.batch_size, args.length
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 1000, (B, T))
    mask = np.ones((B, T), np.int64)
    lengths = rng.integers(T // 4, T + 1, B)
    mask[np.arange(T)[None, :] >= lengths[:, None]] = 0
    real = int(mask.sum())
    models = {
        "llama": (LlamaModel, LlamaConfig(
            vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})),
        "deberta-v3": (DebertaV2Model, DebertaV2Config(
            vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=512, relative_attention=True,
            pos_att_type=["p2c", "c2p"], position_buckets=256, share_att_key=True,
            norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0)),
    }
    report = {}
    for name, (cls, cfg) in models.items():
        torch.manual_seed(0)
        tm = cls(cfg).eval()
        with tempfile.TemporaryDirectory() as d:
            tm.save_pretrained(d, safe_serialization=True)
            conv = load_hf(d)[0]
        module = conv.family.make_module(conv.config)
        params = jax.tree.map(jnp.asarray, conv.params)
        fwd = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m))
        ji, jm = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
        t0 = time.perf_counter()
        out = fwd(params, ji, jm).block_until_ready()
        compile_s = time.perf_counter() - t0
        ti, tmask = torch.tensor(ids), torch.tensor(mask)

        def run_torch():
            with torch.no_grad():
                return tm(input_ids=ti, attention_mask=tmask).last_hidden_state

        ref = run_torch().numpy()
        err = float(np.abs(np.asarray(out) - ref)[mask.astype(bool)].max())
        jt = _bench(lambda: fwd(params, ji, jm).block_until_ready(), args.reps)
        tt = _bench(run_torch, args.reps)
        report[name] = {"flax_tok_s": real / jt, "torch_tok_s": real / tt, "ratio": tt / jt,
                        "compile_s": compile_s, "max_abs_err": err}
        print(f"{name}: flax {real / jt:,.0f} tok/s, torch {real / tt:,.0f} tok/s, "
              f"flax/torch speed ratio {tt / jt:.2f} (compile {compile_s:.1f}s once; "
              f"max |diff| {err:.1e}; B={B}, T={T}, {real} real tokens, {args.threads} threads)")
    return report


if __name__ == "__main__":
    main()
