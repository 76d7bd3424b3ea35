"""Run in a subprocess with 8 simulated CPU devices (XLA_FLAGS set by the caller): forward passes
of tiny Llama / BERT models with params sharded by the logical rules on meshes
(8, 1), (2, 4), (1, 8), compared with one device. Prints one JSON line."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sense_jax.convert import init_params
from sense_jax.models import get_family
from sense_jax.sharding import DEFAULT_RULES, FSDP_RULES, batch_sharding, family_params_sharding, make_mesh

HF = {
    "llama": dict(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 8.0, "original_max_position_embeddings": 64}),
    "bert": dict(model_type="bert", vocab_size=97, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=8, max_position_embeddings=64),
}


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    B, T = 8, 24
    ids = rng.integers(1, 97, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, :5] = 0   # left padding
    mask[2, 17:] = 0  # right padding
    out = {}
    for model_type, hf in HF.items():
        family = get_family(model_type)
        cfg = family.config_from_hf(hf)
        if model_type == "llama":
            cfg = cfg.replace(causal=False)  # LLM2Vec mode; the causal mask is tested elsewhere
        params = init_params(family, cfg, seed=0)
        keys = iter(jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(params))))
        params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), params)
        module = family.make_module(cfg)
        fwd = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m))
        one = jax.devices()[0]
        ref = np.asarray(fwd(jax.device_put(params, one), jax.device_put(ids, one), jax.device_put(mask, one)))
        combos = [((8, 1), "fsdp"), ((2, 4), "fsdp"), ((1, 8), "fsdp"), ((2, 4), "default")]
        if model_type != "llama":
            combos = combos[:3]
        for shape, rules_name in combos:
            mesh = make_mesh(shape)
            rules = FSDP_RULES if rules_name == "fsdp" else DEFAULT_RULES
            if True:
                shard = family_params_sharding(family, cfg, mesh, rules)
                p = jax.device_put(params, shard)
                n_split = sum(1 for x in jax.tree.leaves(p)
                              if x.addressable_shards[0].data.size < x.size)
                got = np.asarray(fwd(p, jax.device_put(ids, batch_sharding(mesh)),
                                     jax.device_put(mask, batch_sharding(mesh))))
                err = float(np.abs(got - ref)[mask.astype(bool)].max())
                out[f"{model_type} {shape} {rules_name}"] = {
                    "err": err, "n_split": n_split, "n_params": len(jax.tree.leaves(p)),
                    "max_abs": float(np.abs(ref)[mask.astype(bool)].max())}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
