"""DeBERTa-v2 / v3 encoders as a Flax Linen module.

Reimplements transformers' ``models/deberta_v2/modeling_deberta_v2.py`` (DebertaV2Model) for
inference and training without dropout. DeBERTa (He et al., 2021, "DeBERTa: Decoding-enhanced
BERT with Disentangled Attention", section 3.1) adds to content-to-content attention two terms
read from a table of relative-position embeddings P [2k, D]:

    A[t, s] = ( q_t·k_s  +  q_t·Pk[δ(t, s)]  +  k_s·Pq[δ(t, s)] ) / sqrt(H · m)
                content       c2p                 p2c

where ``δ(t, s) = clamp(bucket(t - s) + k, 0, 2k - 1)``, ``Pk = P W_k``, ``Pq = P W_q`` (with
``share_att_key``; separate ``pos_key_proj`` / ``pos_query_proj`` otherwise) and ``m`` is one
plus the number of enabled terms. v2/v3 bucket relative distances logarithmically beyond
``position_buckets / 2`` (``make_log_bucket_position``), normalise P with a LayerNorm
(``norm_rel_ebd = "layer_norm"``) and, in the v2 xlarge/xxlarge models, add a convolution
after the first layer (``conv_kernel_size``).

Einsum letters: B batch, T/S query/key positions, D width, N heads, H head width, R relative
position slots (2k).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sense_jax.errors import ConversionError
from sense_jax.models import (COPY, LINEAR, ModelFamily, ParamRule, Transform, check_input_length,
                              count_in_segment, dense_rules, layer_norm_rules, register, same_segment)
from sense_jax.models.bert import ACTIVATIONS as _BERT_ACTIVATIONS

ACTIVATIONS = {**_BERT_ACTIVATIONS, "tanh": jnp.tanh}
POS_ATT_TYPES = ("c2p", "p2c")
# torch.nn.Conv1d weight [out, in/groups, k] <-> flax.linen.Conv kernel [k, in/groups, out].
CONV1D = Transform("conv1d", lambda x: np.ascontiguousarray(x.transpose(2, 1, 0)),
                   lambda y: np.ascontiguousarray(y.transpose(2, 1, 0)))


@dataclasses.dataclass(frozen=True)
class DebertaV2Config:
    """Architecture of a DeBERTa-v2/v3 encoder (field names as in transformers' DebertaV2Config).

    Attributes:
      relative_attention: use the disentangled relative-position terms.
      pos_att_type: which relative terms, a subset of ("c2p", "p2c").
      position_buckets: log-bucketing size (v3: 256); <= 0 for plain clipping.
      max_relative_positions: k before bucketing (-1 in config.json means max_position_embeddings).
      share_att_key: project P with the content query/key projections.
      norm_rel_ebd_layer_norm: LayerNorm on P (``norm_rel_ebd = "layer_norm"``).
      position_biased_input: add absolute position embeddings to the input (v3: False).
      embedding_size: width of the token embeddings (projected to hidden_size if different).
      conv_kernel_size / conv_groups / conv_act: the convolution after the first layer (0 = none).
      add_pooler: the checkpoint has ContextPooler weights (dense + act on the first token).
      num_labels: outputs of the sequence classification head (:mod:`sense_jax.models.heads`);
        0 for none; set at conversion from a DebertaV2ForSequenceClassification config.json.
      dtype: compute dtype name ("float32" or "bfloat16"); parameters are always float32.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    head_dim: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-7
    pad_token_id: int = 0
    relative_attention: bool = True
    pos_att_type: tuple = ("p2c", "c2p")
    position_buckets: int = 256
    max_relative_positions: int = 512
    share_att_key: bool = True
    norm_rel_ebd_layer_norm: bool = True
    position_biased_input: bool = False
    embedding_size: int = 0
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"
    add_pooler: bool = False
    pooler_hidden_act: str = "gelu"
    num_labels: int = 0
    model_type: str = "deberta-v2"
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "pos_att_type", tuple(self.pos_att_type or ()))
        if not self.embedding_size:
            object.__setattr__(self, "embedding_size", self.hidden_size)

    @property
    def max_input_length(self) -> int | None:
        """Most tokens per row: ``max_position_embeddings`` when absolute positions are added
        (``position_biased_input``, DeBERTa-v2 style); None otherwise (v3): relative positions
        are log-bucketed and clipped to 2k slots for any length, as in transformers."""
        return self.max_position_embeddings if self.position_biased_input else None

    @property
    def att_span(self) -> int:
        """k: half the number of relative-position slots."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

    def to_hf(self) -> dict:
        """The transformers config.json fields this config determines."""
        norm = "layer_norm" if self.norm_rel_ebd_layer_norm else "none"
        out = {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
            "relative_attention": self.relative_attention,
            "pos_att_type": list(self.pos_att_type),
            "position_buckets": self.position_buckets,
            "max_relative_positions": self.max_relative_positions,
            "share_att_key": self.share_att_key,
            "norm_rel_ebd": norm,
            "position_biased_input": self.position_biased_input,
            "embedding_size": self.embedding_size,
            "conv_kernel_size": self.conv_kernel_size,
            "conv_groups": self.conv_groups,
            "conv_act": self.conv_act,
            "pooler_hidden_size": self.hidden_size,
            "pooler_hidden_act": self.pooler_hidden_act,
        }
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            out["attention_head_size"] = self.head_dim
        return out

    def replace(self, **changes) -> "DebertaV2Config":
        return dataclasses.replace(self, **changes)


def config_from_hf(hf: dict, source: str = "config.json") -> DebertaV2Config:
    """Build a :class:`DebertaV2Config` from a transformers deberta-v2 config dict.

    Raises:
      ConversionError: a required key is missing, or a setting is unsupported (an attention
        variant in ``pos_att_type`` other than c2p / p2c, a ``norm_rel_ebd`` other than
        "layer_norm" / "none", an activation); the message names the key and value.
    """
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ConversionError(f"{source}: missing required key(s) {missing}")
    for key, default in (("hidden_act", "gelu"), ("conv_act", "tanh"), ("pooler_hidden_act", "gelu")):
        if hf.get(key, default) not in ACTIVATIONS:
            raise ConversionError(f"{source}: unsupported {key} {hf.get(key)!r}; supported: {sorted(ACTIVATIONS)}")
    pat = hf.get("pos_att_type") or []
    if isinstance(pat, str):
        pat = [x.strip() for x in pat.lower().split("|")]
    bad = [p for p in pat if p not in POS_ATT_TYPES]
    if bad:
        raise ConversionError(f"{source}: unsupported attention variant(s) in pos_att_type: {bad}; "
                              f"supported: {list(POS_ATT_TYPES)}")
    norms = [x.strip() for x in str(hf.get("norm_rel_ebd", "none")).lower().split("|")]
    bad = [n for n in norms if n not in ("layer_norm", "none")]
    if bad:
        raise ConversionError(f"{source}: unsupported norm_rel_ebd {bad}; supported: 'layer_norm', 'none'")
    n_heads = int(hf["num_attention_heads"])
    if hf["hidden_size"] % n_heads:
        raise ConversionError(f"{source}: hidden_size {hf['hidden_size']} is not a multiple of "
                              f"num_attention_heads {n_heads}")
    max_pos = int(hf.get("max_position_embeddings", 512))
    max_rel = int(hf.get("max_relative_positions", -1))
    if max_rel < 1:
        max_rel = max_pos
    buckets = int(hf.get("position_buckets", -1))
    conv = int(hf.get("conv_kernel_size", 0) or 0)
    if conv and conv % 2 == 0:
        raise ConversionError(f"{source}: even conv_kernel_size {conv} is not supported")
    pad = hf.get("pad_token_id", 0)
    return DebertaV2Config(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=n_heads,
        intermediate_size=int(hf["intermediate_size"]),
        head_dim=int(hf.get("attention_head_size") or hf["hidden_size"] // n_heads),
        hidden_act=hf.get("hidden_act", "gelu"),
        max_position_embeddings=max_pos,
        type_vocab_size=int(hf.get("type_vocab_size", 0)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-7)),
        pad_token_id=0 if pad is None else int(pad),
        relative_attention=bool(hf.get("relative_attention", False)),
        pos_att_type=tuple(pat),
        position_buckets=buckets,
        max_relative_positions=max_rel,
        share_att_key=bool(hf.get("share_att_key", False)),
        norm_rel_ebd_layer_norm="layer_norm" in norms,
        position_biased_input=bool(hf.get("position_biased_input", True)),
        embedding_size=int(hf.get("embedding_size") or hf["hidden_size"]),
        conv_kernel_size=conv,
        conv_groups=int(hf.get("conv_groups", 1)),
        conv_act=hf.get("conv_act", "tanh"),
        add_pooler=True,
        pooler_hidden_act=hf.get("pooler_hidden_act", "gelu"),
        model_type=hf.get("model_type", "deberta-v2"),
    )


def relative_position_index(T: int, cfg: DebertaV2Config) -> np.ndarray:
    """Slot index δ(t, s) [T, T] int32 into the 2k relative embeddings, for query t and key s.

    ``bucket(r)`` is transformers' ``make_log_bucket_position``: r itself when
    ``|r| <= k/2``, else ``sign(r) · (ceil(log(|r| / (k/2)) / log((max - 1) / (k/2)) · (k/2 - 1)) + k/2)``,
    computed in float32 as there. c2p reads ``δ = clamp(bucket(t - s) + k, 0, 2k - 1)``; p2c reads
    ``clamp(-bucket(s - t) + k, ...)``, the same slots since ``bucket`` is odd.
    """
    rel = np.arange(T, dtype=np.int64)[:, None] - np.arange(T, dtype=np.int64)[None, :]
    if cfg.position_buckets > 0 and cfg.max_relative_positions > 0:
        mid = cfg.position_buckets // 2
        sign = np.sign(rel)
        abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel))
        denom = np.log(np.float32((cfg.max_relative_positions - 1) / mid))
        log_pos = np.ceil(np.log(abs_pos.astype(np.float32) / np.float32(mid)) / denom
                          * np.float32(mid - 1)) + np.float32(mid)
        rel = np.where(abs_pos <= mid, rel.astype(np.float32), log_pos * sign).astype(np.int64)
    k = cfg.att_span
    return np.clip(rel + k, 0, 2 * k - 1).astype(np.int32)


def _dense(features: int, axes: tuple[str, str], dtype: Any, name: str | None = None,
           bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
    )


def _layer_norm(eps: float, dtype: Any, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
    )


class DisentangledSelfAttention(nn.Module):
    """DeBERTa's attention with c2p / p2c relative terms, and the post-LN residual."""

    cfg: DebertaV2Config

    @nn.compact
    def __call__(self, x, attention_mask, rel_embeddings, rel_index, segment_ids=None):
        """x: [B, T, D]; attention_mask: [B, T]; rel_embeddings: [2k, D] (normed) or None;
        rel_index: [T, T] int32 slots; segment_ids: [B, T] or None (packed rows: attend only
        within a segment). Returns [B, T, D]."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        B, T, D = x.shape
        N, H = cfg.num_attention_heads, cfg.head_dim
        query = _dense(N * H, ("embed", "heads"), dtype, "query_proj")
        key = _dense(N * H, ("embed", "heads"), dtype, "key_proj")
        q = query(x).reshape(B, T, N, H)
        k = key(x).reshape(B, T, N, H)
        v = _dense(N * H, ("embed", "heads"), dtype, "value_proj")(x).reshape(B, T, N, H)
        scale = math.sqrt(H * (1 + len(cfg.pos_att_type)))
        scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) / scale
        if cfg.relative_attention:
            R = rel_embeddings.shape[0]
            idx = jnp.asarray(rel_index)
            if "c2p" in cfg.pos_att_type:
                proj = key if cfg.share_att_key else _dense(N * H, ("embed", "heads"), dtype, "pos_key_proj")
                pk = proj(rel_embeddings).reshape(R, N, H)
                c2p = jnp.einsum("BTNH,RNH->BNTR", q, pk, preferred_element_type=jnp.float32)
                scores = scores + jnp.take_along_axis(c2p, idx[None, None], axis=-1) / scale
            if "p2c" in cfg.pos_att_type:
                proj = query if cfg.share_att_key else _dense(N * H, ("embed", "heads"), dtype, "pos_query_proj")
                pq = proj(rel_embeddings).reshape(R, N, H)
                p2c = jnp.einsum("BSNH,RNH->BNSR", k, pq, preferred_element_type=jnp.float32)
                # p2c[b, n, s, δ(t, s)] placed at [t, s].
                p2c = jnp.take_along_axis(p2c, idx.T[None, None], axis=-1)
                scores = scores + jnp.swapaxes(p2c, -1, -2) / scale
        m = attention_mask.astype(bool)
        keep = m[:, None, :, None] & m[:, None, None, :]  # transformers masks pad queries too
        if segment_ids is not None:
            keep = keep & same_segment(segment_ids)[:, None]
        scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        ctx = jnp.einsum("BNTS,BSNH->BTNH", probs, v).reshape(B, T, N * H)
        out = _dense(D, ("heads", "embed"), dtype, "output_dense")(ctx)
        return _layer_norm(cfg.layer_norm_eps, dtype, "output_LayerNorm")(out + x)


class Layer(nn.Module):
    """One encoder layer (DebertaV2Layer): attention, then the feed-forward block."""

    cfg: DebertaV2Config

    @nn.compact
    def __call__(self, x, attention_mask, rel_embeddings, rel_index, segment_ids=None):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        a = DisentangledSelfAttention(cfg, name="attention")(x, attention_mask, rel_embeddings, rel_index,
                                                             segment_ids)
        h = ACTIVATIONS[cfg.hidden_act](_dense(cfg.intermediate_size, ("embed", "mlp"), dtype, "intermediate")(a))
        h = _dense(cfg.hidden_size, ("mlp", "embed"), dtype, "output_dense")(h)
        return _layer_norm(cfg.layer_norm_eps, dtype, "output_LayerNorm")(h + a)


class ConvLayer(nn.Module):
    """The convolution after the first layer (ConvLayer): LN(h_1 + act(conv(x_0))) · mask.

    With ``segment_ids`` (packed rows) a window tap that falls in another segment reads zero,
    as it reads the zero padding at the ends of a passage alone.
    """

    cfg: DebertaV2Config

    @nn.compact
    def __call__(self, x0, h1, attention_mask, segment_ids=None):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        p = (cfg.conv_kernel_size - 1) // 2
        conv = nn.Conv(cfg.hidden_size, (cfg.conv_kernel_size,), padding=[(p, p)],
                       feature_group_count=cfg.conv_groups, dtype=dtype, param_dtype=jnp.float32,
                       kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                (None, None, "embed")),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                       name="conv")
        out = conv(x0)
        if segment_ids is not None:
            out = _segment_conv(x0, segment_ids, conv.variables["params"], cfg.conv_groups, p, dtype)
        m = attention_mask.astype(dtype)[..., None]
        out = ACTIVATIONS[cfg.conv_act](out * m)
        return _layer_norm(cfg.layer_norm_eps, dtype, "LayerNorm")(h1 + out) * m


def _segment_conv(x: jax.Array, segment_ids: jax.Array, params, groups: int, p: int, dtype) -> jax.Array:
    """nn.Conv's 1-D grouped convolution with padding ``p`` on each side, written as a sum of
    window taps, each tap zeroed where it reads another segment (or outside the row).

    x: [B, T, C]; segment_ids: [B, T]; params: the conv's ``kernel`` [k, C / groups, O] and
    ``bias`` [O]. Returns [B, T, O].
    """
    kernel = jnp.asarray(params["kernel"], dtype)
    k, ci, O = kernel.shape
    B, T, _ = x.shape
    xg = x.astype(dtype).reshape(B, T, groups, ci)
    out = jnp.zeros((B, T, groups, O // groups), dtype)
    for j in range(k):
        d = j - p  # this tap reads position t + d
        src = jnp.clip(jnp.arange(T) + d, 0, T - 1)
        ok = ((jnp.arange(T) + d >= 0) & (jnp.arange(T) + d < T))[None, :] & (segment_ids[:, src] == segment_ids)
        tap = jnp.where(ok[:, :, None, None], xg[:, src], 0)
        out = out + jnp.einsum("BTgi,igo->BTgo", tap, kernel[j].reshape(ci, groups, O // groups))
    return out.reshape(B, T, O) + jnp.asarray(params["bias"], dtype)


class Embeddings(nn.Module):
    """Word (+ absolute position) (+ token type) embeddings, projection, LayerNorm, mask."""

    cfg: DebertaV2Config

    @nn.compact
    def __call__(self, input_ids, token_type_ids, attention_mask, segment_ids=None):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        init = nn.initializers.normal(0.02)
        E = cfg.embedding_size

        def embed(n, axes, name):
            return nn.Embed(n, E, dtype=dtype, param_dtype=jnp.float32, name=name,
                            embedding_init=nn.with_logical_partitioning(init, axes))

        x = embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
        if cfg.position_biased_input:
            T = input_ids.shape[1]
            check_input_length(T, cfg)  # past the table a look-up is NaN, silently
            positions = (jnp.arange(T)[None, :] if segment_ids is None
                         else count_in_segment(segment_ids, jnp.ones_like(segment_ids)) - 1)
            x = x + embed(cfg.max_position_embeddings, (None, "embed"), "position_embeddings")(positions)
        if cfg.type_vocab_size > 0:
            x = x + embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids)
        if E != cfg.hidden_size:
            x = _dense(cfg.hidden_size, (None, "embed"), dtype, "embed_proj", bias=False)(x)
        x = _layer_norm(cfg.layer_norm_eps, dtype, "LayerNorm")(x)
        return x * attention_mask.astype(dtype)[..., None]


class DebertaV2Model(nn.Module):
    """The encoder: ``(params, input_ids, attention_mask, token_type_ids) -> [B, T, D]``.

    Call ``module.apply({"params": params}, input_ids, attention_mask, token_type_ids)``:

    Args:
      input_ids: [B, T] int32 token ids (right padding, as DeBERTa's tokenizer pads).
      attention_mask: [B, T] int or bool, 1 for real tokens, 0 for padding.
      token_type_ids: [B, T] int32 segment ids, or None for all zeros.
      output_all_hidden_states: also return every layer's output.
      segment_ids: [B, T] int32 for packed rows, or None: 0 at padding, 1..S for the passages
        of a row, each a contiguous run (:func:`sense_jax.models.count_in_segment`). Attention
        stays within a segment; the relative distance of two tokens of one segment is their
        index difference, which is their position difference within the passage, so the
        relative terms are those of the passage alone; absolute positions (v2) restart per
        segment; the convolution's taps do not cross segments. Pass ``attention_mask =
        segment_ids > 0``. None: the unpacked forward, unchanged.

    Returns:
      last hidden states [B, T, D] in the compute dtype; with ``output_all_hidden_states`` a
      tuple ``(last, all)`` with ``all`` [L + 1, B, T, D] (embeddings output first). Values at
      padding positions are unspecified.
    """

    cfg: DebertaV2Config

    def setup(self):
        cfg = self.cfg
        self.embeddings = Embeddings(cfg)
        self.layers = [Layer(cfg, name=f"layer_{i}") for i in range(cfg.num_hidden_layers)]
        if cfg.relative_attention:
            self.rel_embeddings = nn.Embed(
                2 * cfg.att_span, cfg.hidden_size, param_dtype=jnp.float32,
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")))
            if cfg.norm_rel_ebd_layer_norm:
                self.rel_LayerNorm = _layer_norm(cfg.layer_norm_eps, jnp.dtype(cfg.dtype))
        if cfg.conv_kernel_size > 0:
            self.conv = ConvLayer(cfg)
        if cfg.add_pooler:
            self.pooler = _dense(cfg.hidden_size, ("embed", "embed_out"), jnp.dtype(cfg.dtype))

    def __call__(self, input_ids, attention_mask, token_type_ids=None, output_all_hidden_states=False,
                 segment_ids=None):
        cfg = self.cfg
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x0 = self.embeddings(input_ids, token_type_ids, attention_mask, segment_ids)
        rel, rel_index = None, None
        if cfg.relative_attention:
            rel = self.rel_embeddings.embedding.astype(jnp.dtype(cfg.dtype))
            if cfg.norm_rel_ebd_layer_norm:
                rel = self.rel_LayerNorm(rel)
            rel_index = relative_position_index(input_ids.shape[1], cfg)
        x, all_states = x0, [x0]
        for i, layer in enumerate(self.layers):
            x = layer(x, attention_mask, rel, rel_index, segment_ids)
            if i == 0 and cfg.conv_kernel_size > 0:
                x = self.conv(x0, x, attention_mask, segment_ids)
            all_states.append(x)
        if output_all_hidden_states:
            return x, jnp.stack(all_states)
        return x

    def pooled_output(self, hidden_states: jax.Array) -> jax.Array:
        """ContextPooler: act(W · h[:, 0] + b) -> [B, D]. Requires ``cfg.add_pooler``."""
        return ACTIVATIONS[self.cfg.pooler_hidden_act](self.pooler(hidden_states[:, 0]))

    def init_all(self, input_ids, attention_mask):
        """Touch every parameter (used by ``init``)."""
        h = self(input_ids, attention_mask)
        return self.pooled_output(h) if self.cfg.add_pooler else h


def _layer_rules() -> tuple[ParamRule, ...]:
    hf, fx = "encoder.layer.{i}.", "layer_{i}/"
    rows = [
        ("attention.self.query_proj", "attention/query_proj"),
        ("attention.self.key_proj", "attention/key_proj"),
        ("attention.self.value_proj", "attention/value_proj"),
        ("attention.self.pos_key_proj", "attention/pos_key_proj"),
        ("attention.self.pos_query_proj", "attention/pos_query_proj"),
        ("attention.output.dense", "attention/output_dense"),
        ("intermediate.dense", "intermediate"),
        ("output.dense", "output_dense"),
    ]
    norms = [("attention.output.LayerNorm", "attention/output_LayerNorm"), ("output.LayerNorm", "output_LayerNorm")]
    return tuple(dense_rules(hf, fx, rows) + layer_norm_rules(hf, fx, norms))


RULES: tuple[ParamRule, ...] = (
    ParamRule("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding"),
    ParamRule("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding"),
    ParamRule("embeddings.token_type_embeddings.weight", "embeddings/token_type_embeddings/embedding"),
    ParamRule("embeddings.embed_proj.weight", "embeddings/embed_proj/kernel", LINEAR),
    ParamRule("embeddings.LayerNorm.weight", "embeddings/LayerNorm/scale"),
    ParamRule("embeddings.LayerNorm.bias", "embeddings/LayerNorm/bias"),
    *_layer_rules(),
    ParamRule("encoder.rel_embeddings.weight", "rel_embeddings/embedding"),
    ParamRule("encoder.LayerNorm.weight", "rel_LayerNorm/scale"),
    ParamRule("encoder.LayerNorm.bias", "rel_LayerNorm/bias"),
    ParamRule("encoder.conv.conv.weight", "conv/conv/kernel", CONV1D),
    ParamRule("encoder.conv.conv.bias", "conv/conv/bias"),
    ParamRule("encoder.conv.LayerNorm.weight", "conv/LayerNorm/scale"),
    ParamRule("encoder.conv.LayerNorm.bias", "conv/LayerNorm/bias"),
    ParamRule("pooler.dense.weight", "pooler/kernel", LINEAR),
    ParamRule("pooler.dense.bias", "pooler/bias"),
    # DebertaV2ForSequenceClassification's classifier after the ContextPooler (sense_jax.models.heads).
    ParamRule("classifier.weight", "classifier/kernel", LINEAR),
    ParamRule("classifier.bias", "classifier/bias"),
)


FAMILY = register(ModelFamily(
    name="deberta_v2",
    model_types=("deberta-v2",),
    config_from_hf=config_from_hf,
    make_module=DebertaV2Model,
    rules=RULES,
    base_prefixes=("deberta.",),
    # position_embeddings: v3 checkpoints store an unused table (position_biased_input=False),
    # which transformers also ignores (_keys_to_ignore_on_load_unexpected).
    ignored=(r"^embeddings\.position_ids$", r"^embeddings\.position_embeddings\.weight$",
             r"^lm_predictions\.", r"^mask_predictions\.", r"^cls\.", r"^lm_head\.",
             r"^classifier\.", r"^qa_outputs\."),
    init_method="init_all",
))
