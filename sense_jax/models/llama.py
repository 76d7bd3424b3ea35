"""Llama-family decoders (Llama 2/3, Mistral, Qwen2) as a Flax Linen module, causal or bidirectional.

Reimplements transformers' ``models/llama/modeling_llama.py`` (LlamaModel),
``models/mistral/modeling_mistral.py`` (sliding-window attention),
``models/qwen2/modeling_qwen2.py`` (biases on q/k/v, per-layer sliding windows) and the rotary
frequency rules of ``modeling_rope_utils.py`` ("default", "linear", "llama3"). Pre-RMSNorm
Transformer:

    x_0 = E[ids]
    a_l = x_{l-1} + W_o · Attn(RoPE(W_q n), RoPE(W_k n), W_v n),   n = RMSNorm(x_{l-1})
    x_l = a_l + W_down · (silu(W_gate m) ⊙ W_up m),                m = RMSNorm(a_l)
    h   = RMSNorm(x_L)

Grouped-query attention: N query heads share K key/value heads, query head ``n`` reading kv
head ``n // (N / K)`` (transformers' ``repeat_kv``). ``causal=False`` removes the causal mask
so every token sees the whole sequence, as LLM2Vec runs Llama (BehnamGhader et al. 2024,
"LLM2Vec", section 2); padding is masked either way. Position ids come from the attention
mask (``cumsum(mask) - 1``, as transformers' ``generate`` computes them), so left and right
padding give the same hidden states at real tokens.

Einsum letters: B batch, T/S query/key positions, D model width, N query heads, K kv heads,
G = N / K query heads per kv head, H head width, F MLP width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sense_jax.errors import ConfigError, ConversionError
from sense_jax.models import COPY, LINEAR, ModelFamily, ParamRule, count_in_segment, register, same_segment
from sense_jax.models.bert import ACTIVATIONS

ROPE_TYPES = ("default", "linear", "llama3")
POOLING_MODES = ("mean", "last_token", "weighted_mean", "first_token")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder (field names as in transformers' LlamaConfig).

    Attributes:
      num_key_value_heads: K kv heads (GQA); equals ``num_attention_heads`` for plain MHA.
      head_dim: H; transformers' ``head_dim`` or ``hidden_size // num_attention_heads``.
      max_position_embeddings: the context the checkpoint was trained for. Rotary positions are
        computed, not looked up, so a longer input gives finite states (as in transformers) and
        is not refused (``max_input_length`` is None); quality past it is the model's own.
        ``Model.tokenize`` truncates to it by default.
      rope_type: "default", "linear" or "llama3" (``rope_scaling`` / ``rope_parameters``).
      rope_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_position_embeddings:
        the scaling parameters of "linear" / "llama3" (unused for "default").
      attention_bias: biases on q, k, v and o (Llama's ``attention_bias``).
      qkv_bias: biases on q, k, v only (Qwen2).
      sliding_windows: per layer, the sliding-window width W (a key is seen only from queries
        less than W positions after it) or None for full attention; () means none anywhere.
      tie_word_embeddings: the LM head is the token embedding (``logits`` uses ``E^T``).
      lm_head: the params hold an untied ``lm_head`` (False for a bare LlamaModel checkpoint).
      causal: True for the decoder's causal mask; False for LLM2Vec-style bidirectional attention.
      pooling: the sentence pooling mode this checkpoint is meant for (see
        :mod:`sense_jax.pooling`); LLM2Vec uses "mean" for its supervised Llama-3 models.
      add_pooler: always False (no pooler in this family); present so that family-agnostic
        code can treat every config alike.
      num_labels: outputs of the sequence classification ``score`` head
        (:mod:`sense_jax.models.heads`); 0 for none; set at conversion from a
        ``*ForSequenceClassification`` config.json.
      dtype: compute dtype name ("float32" or "bfloat16"); parameters are always float32.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    sliding_windows: tuple = ()
    tie_word_embeddings: bool = False
    lm_head: bool = False
    causal: bool = True
    pooling: str = "mean"
    pad_token_id: int | None = None
    add_pooler: bool = False
    num_labels: int = 0
    model_type: str = "llama"
    dtype: str = "float32"

    @property
    def max_input_length(self) -> None:
        """No limit: rotary positions have no table to overflow (see ``max_position_embeddings``)."""
        return None

    def __post_init__(self):
        # Restored from JSON metadata the tuple arrives as a list; keep the config hashable.
        object.__setattr__(self, "sliding_windows", tuple(self.sliding_windows or ()))
        if self.add_pooler:
            raise ConversionError("Llama-family models have no pooler (add_pooler must be False); "
                                  "pool token states with sense_jax.pooling instead")

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def to_hf(self) -> dict:
        """The transformers config.json fields this config determines (inverse of
        :func:`config_from_hf` for the architecture; ``causal`` and ``pooling`` are ours)."""
        out = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type != "qwen2":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
        if self.rope_type == "linear":
            out["rope_scaling"] = {"rope_type": "linear", "factor": self.rope_factor}
        elif self.rope_type == "llama3":
            out["rope_scaling"] = {
                "rope_type": "llama3", "factor": self.rope_factor,
                "low_freq_factor": self.rope_low_freq_factor, "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings}
        windows = [w for w in self.sliding_windows if w is not None]
        if self.model_type == "mistral":
            out["sliding_window"] = windows[0] if windows else None
        elif self.model_type == "qwen2":
            out["use_sliding_window"] = bool(windows)
            out["sliding_window"] = windows[0] if windows else None
            out["layer_types"] = ["sliding_attention" if self.window(i) else "full_attention"
                                  for i in range(self.num_hidden_layers)]
        return out

    def window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    def adapt_to_checkpoint(self, names) -> "LlamaConfig":
        """Keep an ``lm_head`` only if the (prefix-stripped) checkpoint has one."""
        return dataclasses.replace(self, lm_head=(not self.tie_word_embeddings)
                                   and any(n.startswith("lm_head.") for n in names))


def _rope_settings(hf: dict, source: str) -> dict:
    """The rotary settings of a transformers config, old (``rope_scaling`` + ``rope_theta``) or
    new (``rope_parameters``) layout."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling:
        params.update(scaling)
    if "layer_types" in params or any(isinstance(v, dict) for v in params.values()):
        raise ConversionError(f"{source}: per-layer rope_parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConversionError(f"{source}: unsupported rope_scaling type {rope_type!r}; "
                              f"supported: {list(ROPE_TYPES)}")
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ConversionError(f"{source}: unsupported partial_rotary_factor "
                              f"{params.get('partial_rotary_factor', hf.get('partial_rotary_factor'))}")
    out = {"rope_type": rope_type,
           "rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if rope_type in ("linear", "llama3"):
        if "factor" not in params:
            raise ConversionError(f"{source}: rope_scaling type {rope_type!r} needs 'factor'")
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise ConversionError(f"{source}: rope_scaling type 'llama3' needs {key!r}")
            out["rope_" + key] = float(params[key])
        out["rope_original_max_position_embeddings"] = int(
            params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192)))
    return out


def config_from_hf(hf: dict, source: str = "config.json") -> LlamaConfig:
    """Build a :class:`LlamaConfig` from a transformers llama / mistral / qwen2 config dict.

    Raises:
      ConversionError: a required key is missing, or a setting is unsupported (rope_scaling
        type, partial rotary, activation, a layer type other than full / sliding attention);
        the message names the key and value.
    """
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ConversionError(f"{source}: missing required key(s) {missing}")
    model_type = hf.get("model_type", "llama")
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ConversionError(f"{source}: unsupported hidden_act {act!r}; supported: {sorted(ACTIVATIONS)}")
    n_heads = int(hf["num_attention_heads"])
    n_kv = int(hf.get("num_key_value_heads") or n_heads)
    if n_heads % n_kv:
        raise ConversionError(f"{source}: num_attention_heads {n_heads} is not a multiple of "
                              f"num_key_value_heads {n_kv}")
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // n_heads)
    if head_dim % 2:
        raise ConversionError(f"{source}: head_dim {head_dim} must be even for rotary embeddings")
    n_layers = int(hf["num_hidden_layers"])

    windows: tuple = ()
    if model_type == "mistral":
        w = hf.get("sliding_window")
        windows = (int(w),) * n_layers if w else ()
    elif model_type == "qwen2":
        w = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
        types = hf.get("layer_types") or [
            "sliding_attention" if w is not None and i >= int(hf.get("max_window_layers", 28))
            else "full_attention" for i in range(n_layers)]
        bad = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
        if bad:
            raise ConversionError(f"{source}: unsupported attention variant(s) in layer_types: {bad}")
        if "sliding_attention" in types and not w:
            raise ConversionError(f"{source}: layer_types has sliding_attention but no sliding_window")
        windows = tuple(int(w) if t == "sliding_attention" else None for t in types)
        if all(x is None for x in windows):
            windows = ()
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(key):
            raise ConversionError(f"{source}: unsupported attention variant {key}={hf[key]!r}")
    if model_type == "qwen2":
        attention_bias, qkv_bias = False, True
    else:
        attention_bias, qkv_bias = bool(hf.get("attention_bias", False)), False
    pad = hf.get("pad_token_id")
    tie = bool(hf.get("tie_word_embeddings", False))
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        intermediate_size=int(hf["intermediate_size"]),
        head_dim=head_dim,
        hidden_act=act,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        attention_bias=attention_bias,
        qkv_bias=qkv_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_windows=windows,
        tie_word_embeddings=tie,
        lm_head=not tie,
        pad_token_id=None if pad is None else int(pad if not isinstance(pad, list) else pad[0]),
        model_type=model_type,
        **_rope_settings(hf, source),
    )


# --- Rotary embeddings ------------------------------------------------------------------------

def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [H / 2] float32, computed as transformers' ``modeling_rope_utils.py``.

    "default": ``1 / theta^(2i / H)``; "linear": divided by ``factor``; "llama3"
    (``_compute_llama3_parameters``): wavelengths above ``original / low_freq_factor`` are
    divided by ``factor``, those below ``original / high_freq_factor`` kept, and those between
    interpolated smoothly. Float32 arithmetic in the same order as transformers, so that
    angles at positions far beyond the original context agree.
    """
    dim = cfg.head_dim
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    # theta ** e correctly rounded to float32 (via float64): this reproduces torch's float32
    # pow on CPU for Llama 3's settings, where numpy's float32 pow differs by an ulp in 20% of
    # entries (an angle error of ~5e-4 rad at position 8192).
    powers = (np.float64(cfg.rope_theta) ** exps.astype(np.float64)).astype(np.float32)
    inv = (np.float32(1.0) / powers).astype(np.float32)
    if cfg.rope_type == "linear":
        inv = (inv / np.float32(cfg.rope_factor)).astype(np.float32)
    elif cfg.rope_type == "llama3":
        factor = np.float32(cfg.rope_factor)
        low, high = np.float32(cfg.rope_low_freq_factor), np.float32(cfg.rope_high_freq_factor)
        old = np.float32(cfg.rope_original_max_position_embeddings)
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif cfg.rope_type != "default":
        raise ConversionError(f"unsupported rope_scaling type {cfg.rope_type!r}")
    return inv


def rotary(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Apply rotary embeddings in transformers' layout (``rotate_half``: pairs (i, i + H/2)).

    Args:
      x: [B, T, N, H] queries or keys (any float dtype).
      positions: [B, T] int32 position ids.
      inv_freq: [H / 2] float32.

    Returns:
      [B, T, N, H] in ``x.dtype``; cos/sin computed in float32 and cast to ``x.dtype`` first,
      as transformers does.
    """
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb).astype(x.dtype)[:, :, None, :]
    sin = jnp.sin(emb).astype(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def position_ids_from_mask(attention_mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Position ids [B, T] int32: ``cumsum(mask) - 1`` at real tokens, 0 at padding.

    The rule of transformers' ``generate`` for left padding; for right padding (or none) it
    gives ``0..T-1`` at real tokens. With ``segment_ids`` [B, T] (packed rows) the count
    restarts at every segment, so each packed passage starts at position 0.
    """
    m = attention_mask.astype(jnp.int32)
    if segment_ids is not None:
        return jnp.where(m > 0, count_in_segment(segment_ids, m) - 1, 0)
    return jnp.where(m > 0, jnp.cumsum(m, axis=1) - 1, 0)


# --- Layers -----------------------------------------------------------------------------------

def _dense(features: int, axes: tuple[str, str], dtype: Any, name: str, bias: bool) -> nn.Dense:
    return nn.Dense(
        features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
    )


class RMSNorm(nn.Module):
    """``w · x / sqrt(mean(x²) + eps)``, statistics in float32 (LlamaRMSNorm)."""

    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., D] in the compute dtype."""
        w = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # transformers casts back to the input dtype before multiplying by the weight.
        return w.astype(self.dtype) * normed.astype(x.dtype).astype(self.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings (LlamaAttention)."""

    cfg: LlamaConfig
    window: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """x: [B, T, D]; attention_mask: [B, T] (1 = real token); positions: [B, T];
        segment_ids: [B, T] or None (packed rows: attend only within a segment). -> [B, T, D]."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        B, T, _ = x.shape
        N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        G = N // K
        bias = cfg.attention_bias or cfg.qkv_bias
        q = _dense(N * H, ("embed", "heads"), dtype, "q_proj", bias)(x).reshape(B, T, N, H)
        k = _dense(K * H, ("embed", "kv_heads"), dtype, "k_proj", bias)(x).reshape(B, T, K, H)
        v = _dense(K * H, ("embed", "kv_heads"), dtype, "v_proj", bias)(x).reshape(B, T, K, H)
        inv_freq = rope_inv_freq(cfg)
        q, k = rotary(q, positions, inv_freq), rotary(k, positions, inv_freq)
        q = q.reshape(B, T, K, G, H)
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        scores = scores * (H ** -0.5)
        keep = attention_mask.astype(bool)[:, None, None, None, :]  # [B, 1, 1, 1, S]
        if segment_ids is not None:
            # Segments are contiguous, so within one the index difference s - t is the position
            # difference: the causal and sliding-window masks below need no change.
            keep = keep & same_segment(segment_ids)[:, None, None]
        t_idx = jnp.arange(T)[:, None]
        s_idx = jnp.arange(T)[None, :]
        if cfg.causal:
            keep = keep & (s_idx <= t_idx)
            if self.window is not None:  # transformers' sliding_window_overlay
                keep = keep & (s_idx > t_idx - self.window)
        elif self.window is not None and T > self.window:
            raise ConfigError(
                f"bidirectional attention with sliding_window={self.window} is not supported for "
                f"sequences longer than the window (T={T}); truncate to {self.window} tokens")
        scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        ctx = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N * H)
        return _dense(cfg.hidden_size, ("heads", "embed"), dtype, "o_proj", cfg.attention_bias)(ctx)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``W_down · (act(W_gate x) ⊙ W_up x)`` (LlamaMLP)."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        F = cfg.intermediate_size
        g = _dense(F, ("embed", "mlp"), dtype, "gate_proj", cfg.mlp_bias)(x)
        u = _dense(F, ("embed", "mlp"), dtype, "up_proj", cfg.mlp_bias)(x)
        return _dense(cfg.hidden_size, ("mlp", "embed"), dtype, "down_proj", cfg.mlp_bias)(
            ACTIVATIONS[cfg.hidden_act](g) * u)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer (LlamaDecoderLayer)."""

    cfg: LlamaConfig
    window: int | None = None

    @nn.compact
    def __call__(self, x, attention_mask, positions, segment_ids=None):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        h = RMSNorm(cfg.rms_norm_eps, dtype, name="input_layernorm")(x)
        x = x + Attention(cfg, self.window, name="self_attn")(h, attention_mask, positions, segment_ids)
        h = RMSNorm(cfg.rms_norm_eps, dtype, name="post_attention_layernorm")(x)
        return x + MLP(cfg, name="mlp")(h)


class LlamaModel(nn.Module):
    """The decoder stack: ``(params, input_ids, attention_mask) -> final-normed states [B, T, D]``.

    Call ``module.apply({"params": params}, input_ids, attention_mask)``:

    Args:
      input_ids: [B, T] int32 token ids; padding may be on either side.
      attention_mask: [B, T] int or bool, 1 for real tokens, 0 for padding.
      token_type_ids: ignored (accepted so every family has the same signature).
      output_all_hidden_states: also return every layer's output.
      position_ids: optional [B, T] int32; default ``cumsum(mask) - 1`` (per segment when
        ``segment_ids`` is given).
      segment_ids: [B, T] int32 for packed rows, or None: 0 at padding, 1..S for the passages
        of a row, each a contiguous run (:func:`sense_jax.models.count_in_segment`). Attention
        stays within a segment (causal within it for a causal decoder) and rotary positions
        restart per segment. Pass ``attention_mask = segment_ids > 0``. None: the unpacked
        forward, unchanged.

    Returns:
      the last layer's output after the final RMSNorm, [B, T, D] in the compute dtype
      (transformers' ``last_hidden_state``); with ``output_all_hidden_states`` a tuple
      ``(last, all)`` where ``all`` is [L + 1, B, T, D]: the embeddings, then each layer's
      output, the last one normed (as transformers' ``hidden_states``). Values at padding
      positions are unspecified.
    """

    cfg: LlamaConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        self.layers = [DecoderLayer(cfg, cfg.window(i), name=f"layer_{i}")
                       for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype))
        if cfg.lm_head and not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")))

    def __call__(self, input_ids, attention_mask, token_type_ids=None, output_all_hidden_states=False,
                 position_ids=None, segment_ids=None):
        del token_type_ids
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, segment_ids)
        x = self.embed_tokens(input_ids)
        all_states = [x]
        for layer in self.layers:
            x = layer(x, attention_mask, position_ids, segment_ids)
            all_states.append(x)
        x = self.norm(x)
        if output_all_hidden_states:
            all_states[-1] = x
            return x, jnp.stack(all_states)
        return x

    def logits(self, hidden_states: jax.Array) -> jax.Array:
        """LM-head logits [B, T, V] from final states [B, T, D]: ``E^T`` when tied, else lm_head.

        Raises:
          ValueError: the model is untied but its params carry no lm_head (a bare LlamaModel).
        """
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(hidden_states)
        if not self.cfg.lm_head:
            raise ValueError("this checkpoint has no lm_head (untied embeddings, base model only)")
        return self.lm_head(hidden_states)

    def init_all(self, input_ids, attention_mask):
        """Touch every parameter (used by ``init``)."""
        h = self(input_ids, attention_mask)
        if self.cfg.tie_word_embeddings or self.cfg.lm_head:
            return self.logits(h)
        return h


def _layer_rules() -> tuple[ParamRule, ...]:
    hf, fx = "layers.{i}.", "layer_{i}/"
    out = []
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out.append(ParamRule(f"{hf}self_attn.{proj}.weight", f"{fx}self_attn/{proj}/kernel", LINEAR))
        out.append(ParamRule(f"{hf}self_attn.{proj}.bias", f"{fx}self_attn/{proj}/bias"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out.append(ParamRule(f"{hf}mlp.{proj}.weight", f"{fx}mlp/{proj}/kernel", LINEAR))
        out.append(ParamRule(f"{hf}mlp.{proj}.bias", f"{fx}mlp/{proj}/bias"))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out.append(ParamRule(f"{hf}{norm}.weight", f"{fx}{norm}/scale"))
    return tuple(out)


# transformers name (after stripping "model.") -> our params path.
RULES: tuple[ParamRule, ...] = (
    ParamRule("embed_tokens.weight", "embed_tokens/embedding", COPY),
    *_layer_rules(),
    ParamRule("norm.weight", "norm/scale"),
    ParamRule("lm_head.weight", "lm_head/kernel", LINEAR),
    # *ForSequenceClassification's score (no bias) on the last non-pad token (sense_jax.models.heads).
    ParamRule("score.weight", "score/kernel", LINEAR),
)


FAMILY = register(ModelFamily(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    config_from_hf=config_from_hf,
    make_module=LlamaModel,
    rules=RULES,
    base_prefixes=("model.",),
    ignored=(r"rotary_emb\.inv_freq$", r"^lm_head\.", r"^score\.", r"^classifier\.",
             r"^qa_outputs\."),
    init_method="init_all",
    # transformers' LlamaForCausalLM._tied_weights_keys (names after the "model." prefix is stripped)
    tied=(("lm_head.weight", "embed_tokens.weight", "tie_word_embeddings"),),
    head_params=("lm_head",),
))
