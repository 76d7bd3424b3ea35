"""Helper for tests/test_extract.py: tiny teacher and corpus builders, and a subprocess entry point.

Run as a script (a fresh process, so XLA_FLAGS / jax.distributed can be set before jax starts)::

    python tests/extract_worker.py MODEL CORPUS OUT [--devices 8] [--process-id I --num-processes P
        --port PORT] [--n 3] [--seed 0] [--batch-size 4] [--window 16] [--dtype float32]
        [--fail-at STAGE:K]

``--fail-at step:5`` kills the run (``os._exit(86)``: no cleanup, no flush) at that point of
:data:`sense_jax.extract_job.FAULT_HOOK`'s list.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path

TOKENIZER_PREFIXES = ("tokenizer", "vocab", "special_tokens")


def make_tiny_teacher(out: Path, tokenizer_dir: Path, *, seed: int = 0, hidden: int = 32,
                      layers: int = 2, max_length: int = 32) -> Path:
    """A random BERT with the MiniLM vocabulary (30522), saved as a transformers directory
    (config.json + model.safetensors + tokenizer files) through our own converter's inverse."""
    from safetensors.numpy import save_file

    from sense_jax.convert import init_params, params_to_hf
    from sense_jax.models import get_family
    from sense_jax.models.bert import BertConfig

    family = get_family("bert")
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=max_length)
    params = init_params(family, cfg, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    save_file(params_to_hf(family, params), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(dict(cfg.to_hf(), architectures=["BertModel"])))
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(TOKENIZER_PREFIXES):
            shutil.copy2(f, out / f.name)
    return out


def make_corpus(sentences: list[str], out: Path, n_passages: int = 120, seed: int = 0) -> Path:
    """Deterministic passages: mostly one real sentence, some two, every 17th eight (truncated),
    with empty lines and an undecodable byte mixed in."""
    rng = random.Random(seed)
    lines: list[bytes] = []
    for i in range(n_passages):
        k = 8 if i % 17 == 0 else 1 + (rng.random() < 0.3)
        lines.append(" ".join(rng.choice(sentences) for _ in range(k)).encode())
        if i % 23 == 5:
            lines.append(b"")
    lines[7] = lines[7] + b" caf\xe9"
    out.write_bytes(b"\n".join(lines) + b"\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("corpus")
    ap.add_argument("out")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=None)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--layer", type=int, default=-1)
    ap.add_argument("--fail-at", default=None, metavar="STAGE:K")
    a = ap.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if a.process_id is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{a.port}",
                                   num_processes=a.num_processes, process_id=a.process_id)
    from sense_jax import extract_job
    from sense_jax.extract import extract

    if a.fail_at:
        def die(stage: str, k: int) -> None:
            if f"{stage}:{k}" == a.fail_at:
                sys.stderr.flush()
                os._exit(86)
        extract_job.FAULT_HOOK = die
    extract(a.model, a.corpus, a.out, n_per_token=a.n, seed=a.seed, batch_size=a.batch_size,
            dtype=a.dtype, layer=a.layer, window_passages=a.window, chunk_passages=a.chunk,
            progress=False)
    print(f"devices={jax.device_count()} processes={jax.process_count()} ok")
    if a.process_id is not None:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
