"""Bytes of parameters, extraction store and sense dictionary for Llama-3-8B (issue 7 docs).

Run: ``.venv/bin/python eval/llama8b_memory.py``. Parameter counts come from our own module
(``jax.eval_shape`` of ``LlamaModel`` with Llama-3-8B's config.json: nothing is allocated);
store and dictionary sizes from their on-disk layouts (sense_jax/store.py, sense_dict.py).

Formulas (V vocabulary, D width, N samples per token, K senses per token, c_t occurrences of
token t in the corpus, V_seen tokens with c_t > 0, special tokens excluded):
  store rows        S  = sum_t min(c_t, N)  <= min(corpus tokens, V_seen * N)
  store bytes          = S * D * b  (vectors) + 16 S (sources) + 16 V + 8 (offsets, counts)
  dictionary rows   S' = sum_t min(K, n_t)  <= V_seen * K
  dictionary bytes     = S' * D * b (centres) + 4 S' (counts) + 4 (V + 1) (offsets)
"""

from __future__ import annotations

import jax
import numpy as np

from sense_jax.convert import abstract_params
from sense_jax.models import get_family

LLAMA3_8B = {  # meta-llama/Meta-Llama-3-8B config.json
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
GB = 1e9


def n_params(cfg) -> int:
    family = get_family("llama")
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(family, cfg)))


def main() -> None:
    family = get_family("llama")
    cfg = family.config_from_hf(LLAMA3_8B)
    V, D = cfg.vocab_size, cfg.hidden_size
    full = n_params(cfg)                                   # with the untied LM head
    enc = n_params(cfg.replace(lm_head=False))             # LLM2Vec encoder: no LM head
    student = n_params(cfg.replace(lm_head=False, num_hidden_layers=4))
    print(f"Llama-3-8B params: {full:,} with lm_head, {enc:,} as an encoder (no lm_head)")
    print(f"  encoder bytes: f32 {enc * 4 / GB:.2f} GB, bf16 {enc * 2 / GB:.2f} GB")
    print(f"  4-layer student: {student:,} params, f32 {student * 4 / GB:.2f} GB; "
          f"+ grads + AdamW (2 moments) = {student * 16 / GB:.2f} GB")
    N, K = 1000, 10
    for v_seen in (100_000, 30_000):
        S = v_seen * N
        for name, b in (("float32", 4), ("bfloat16", 2)):
            store = S * D * b + 16 * S + 16 * V + 8
            print(f"  store, V_seen={v_seen:,} all at N={N}: S={S:,} rows, {name}: {store / GB:,.1f} GB")
        Sd = v_seen * K
        for name, b in (("float32", 4), ("bfloat16", 2)):
            sd = Sd * D * b + 4 * Sd + 4 * (V + 1)
            print(f"  dictionary, V_seen={v_seen:,}, K={K}: {Sd:,} senses, {name}: {sd / GB:.2f} GB")
    B, T = 32, 512
    print(f"  padded sense look-up per batch [B={B}, T={T}, K={K}, D]: bf16 {B * T * K * D * 2 / GB:.2f} GB, "
          f"f32 {B * T * K * D * 4 / GB:.2f} GB")
    print(f"  attention scores per layer [B={B}, N=32, T={T}, T] f32: {B * 32 * T * T * 4 / GB:.2f} GB")


if __name__ == "__main__":
    main()
