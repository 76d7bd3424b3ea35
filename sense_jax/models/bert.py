"""BERT-family encoders (BertModel, RoBERTa, XLM-RoBERTa) as a Flax Linen module.

Reimplements transformers' ``models/bert/modeling_bert.py`` (BertModel) and
``models/roberta/modeling_roberta.py`` (position ids that start after ``padding_idx``) for
inference and training without dropout. Post-LayerNorm Transformer of Devlin et al. (2019):

    x_0 = LN(E_word[ids] + E_pos[pos] + E_type[token_type_ids])
    a_l = LN(x_{l-1} + W_o · softmax(Q K^T / sqrt(H) + mask) V)        (per head, H = D / N)
    x_l = LN(a_l + W_2 · act(W_1 · a_l))

Einsum letters: B batch, T/S query/key positions, D model width, N heads, H head width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sense_jax.errors import ConversionError
from sense_jax.models import (COPY, LINEAR, ModelFamily, ParamRule, check_input_length, count_in_segment,
                              dense_rules, layer_norm_rules, register, same_segment)

# transformers' ACT2FN names -> jax functions. "gelu" is the exact erf form; the tanh forms are
# "gelu_new" / "gelu_pytorch_tanh" / "gelu_fast" (transformers/activations.py).
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT-family encoder (field names as in transformers' BertConfig).

    Attributes:
      position_offset: first position id. 0 for BERT; ``pad_token_id + 1`` for RoBERTa, whose
        position ids count non-pad tokens starting after ``padding_idx``, with pad tokens at
        ``padding_idx`` itself.
      add_pooler: the checkpoint has BertPooler weights (dense + tanh on the first token).
      num_labels: outputs of the sequence classification head (:mod:`sense_jax.models.heads`);
        0 for none. Set at conversion from a ``*ForSequenceClassification`` config.json (its
        ``architectures`` and ``id2label``), not from ``num_labels`` alone, which every
        transformers config carries.
      dtype: compute dtype name ("float32" or "bfloat16"); parameters are always float32.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_offset: int = 0
    add_pooler: bool = True
    num_labels: int = 0
    model_type: str = "bert"
    dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_input_length(self) -> int:
        """Most tokens per row: the position table's rows after the first position id (RoBERTa:
        514 - 2 = 512). Longer inputs are refused (:func:`sense_jax.models.check_input_length`)."""
        return self.max_position_embeddings - self.position_offset

    def replace(self, **changes) -> "BertConfig":
        return dataclasses.replace(self, **changes)

    def to_hf(self) -> dict:
        """The transformers config.json fields this config determines."""
        return {
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
            "position_embedding_type": "absolute",
        }


def config_from_hf(hf: dict, source: str = "config.json") -> BertConfig:
    """Build a :class:`BertConfig` from a transformers config dict.

    Raises:
      ConversionError: a required key is missing or a setting is unsupported (names the key).
    """
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ConversionError(f"{source}: missing required key(s) {missing}")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ConversionError(f"{source}: unsupported hidden_act {act!r}; supported: {sorted(ACTIVATIONS)}")
    pos_type = hf.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise ConversionError(f"{source}: unsupported position_embedding_type {pos_type!r} (only 'absolute')")
    if hf["hidden_size"] % hf["num_attention_heads"]:
        raise ConversionError(f"{source}: hidden_size {hf['hidden_size']} is not a multiple of "
                              f"num_attention_heads {hf['num_attention_heads']}")
    model_type = hf.get("model_type", "bert")
    pad = hf.get("pad_token_id", 0)
    pad = 0 if pad is None else int(pad)
    roberta_like = model_type in ("roberta", "xlm-roberta", "camembert")
    return BertConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=int(hf["num_attention_heads"]),
        intermediate_size=int(hf["intermediate_size"]),
        hidden_act=act,
        max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        pad_token_id=pad,
        position_offset=pad + 1 if roberta_like else 0,
        add_pooler=bool(hf.get("add_pooling_layer", True)),
        model_type=model_type,
    )


def position_ids(input_ids: jax.Array, cfg: BertConfig, segment_ids: jax.Array | None = None) -> jax.Array:
    """Position ids [B, T] int32.

    BERT: ``0..T-1``. RoBERTa (``create_position_ids_from_input_ids`` in modeling_roberta.py):
    non-pad tokens count up from ``padding_idx + 1``; pad tokens get ``padding_idx``. Note that
    transformers decides "pad" from ``input_ids == pad_token_id``, not from the attention mask.
    With ``segment_ids`` [B, T] (packed rows) the count restarts at every segment, so a packed
    passage gets the position ids it has alone.
    """
    B, T = input_ids.shape
    if cfg.position_offset == 0:
        if segment_ids is not None:
            return count_in_segment(segment_ids, jnp.ones_like(segment_ids)) - 1
        return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
    if segment_ids is not None:
        return count_in_segment(segment_ids, not_pad) * not_pad + cfg.pad_token_id
    return jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id


def _dense(features: int, axes: tuple[str, str], dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(
        features, dtype=dtype, param_dtype=jnp.float32, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
    )


def _layer_norm(eps: float, dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention with BERT's post-LN residual (BertAttention)."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """x: [B, T, D]; attention_mask: [B, T] (1 = attend); segment_ids: [B, T] or None
        (packed rows: attend only within a segment). Returns [B, T, D]."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        B, T, D = x.shape
        N, H = cfg.num_attention_heads, cfg.head_dim
        q = _dense(D, ("embed", "heads"), dtype, "query")(x).reshape(B, T, N, H)
        k = _dense(D, ("embed", "heads"), dtype, "key")(x).reshape(B, T, N, H)
        v = _dense(D, ("embed", "heads"), dtype, "value")(x).reshape(B, T, N, H)
        # Scores and softmax in f32 whatever the compute dtype.
        scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(H)
        keep = attention_mask[:, None, None, :].astype(bool)
        if segment_ids is not None:
            keep = keep & same_segment(segment_ids)[:, None]
        scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        ctx = jnp.einsum("BNTS,BSNH->BTNH", probs, v).reshape(B, T, D)
        out = _dense(D, ("heads", "embed"), dtype, "output_dense")(ctx)
        return _layer_norm(cfg.layer_norm_eps, dtype, "output_LayerNorm")(out + x)


class Layer(nn.Module):
    """One encoder layer (BertLayer): attention, then the feed-forward block."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        a = SelfAttention(cfg, name="attention")(x, attention_mask, segment_ids)
        h = _dense(cfg.intermediate_size, ("embed", "mlp"), dtype, "intermediate")(a)
        h = ACTIVATIONS[cfg.hidden_act](h)
        h = _dense(cfg.hidden_size, ("mlp", "embed"), dtype, "output_dense")(h)
        return _layer_norm(cfg.layer_norm_eps, dtype, "output_LayerNorm")(h + a)


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm (BertEmbeddings)."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        init = nn.initializers.normal(0.02)

        def embed(n, axes, name):
            return nn.Embed(n, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32, name=name,
                            embedding_init=nn.with_logical_partitioning(init, axes))

        # Past the position table a look-up is NaN, silently: refuse at trace time instead.
        check_input_length(input_ids.shape[1], cfg)
        x = embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
        x = x + embed(cfg.max_position_embeddings, (None, "embed"), "position_embeddings")(
            position_ids(input_ids, cfg, segment_ids))
        x = x + embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids)
        return _layer_norm(cfg.layer_norm_eps, dtype, "LayerNorm")(x)


class BertModel(nn.Module):
    """The encoder: a pure function ``(params, input_ids, attention_mask, token_type_ids) -> [B, T, D]``.

    Call ``module.apply({"params": params}, input_ids, attention_mask, token_type_ids)``:

    Args:
      input_ids: [B, T] int32 token ids.
      attention_mask: [B, T] int or bool, 1 for real tokens, 0 for padding.
      token_type_ids: [B, T] int32 segment ids, or None for all zeros.
      output_all_hidden_states: also return every layer's output.
      segment_ids: [B, T] int32 for packed rows, or None: 0 at padding, 1..S for the passages
        of a row, each a contiguous run (:func:`sense_jax.models.count_in_segment`). Attention
        stays within a segment and position ids restart per segment (RoBERTa's after
        ``padding_idx`` too); ``token_type_ids`` stay per token. Pass ``attention_mask =
        segment_ids > 0``. None: the unpacked forward, unchanged.

    Returns:
      last hidden states [B, T, D] in the compute dtype; with ``output_all_hidden_states`` a
      tuple ``(last, all)`` where ``all`` is [L + 1, B, T, D] (embeddings output first, as
      transformers' ``hidden_states``).
    """

    cfg: BertConfig

    def setup(self):
        self.embeddings = Embeddings(self.cfg)
        self.layers = [Layer(self.cfg, name=f"layer_{i}") for i in range(self.cfg.num_hidden_layers)]
        if self.cfg.add_pooler:
            self.pooler = _dense(self.cfg.hidden_size, ("embed", "embed_out"),
                                 jnp.dtype(self.cfg.dtype), "pooler")

    def __call__(self, input_ids, attention_mask, token_type_ids=None, output_all_hidden_states=False,
                 segment_ids=None):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, segment_ids)
        all_states = [x]
        for layer in self.layers:
            x = layer(x, attention_mask, segment_ids)
            all_states.append(x)
        if output_all_hidden_states:
            return x, jnp.stack(all_states)
        return x

    def pooled_output(self, hidden_states: jax.Array) -> jax.Array:
        """BertPooler: tanh(W · h[:, 0] + b) -> [B, D]. Requires ``cfg.add_pooler``."""
        return jnp.tanh(self.pooler(hidden_states[:, 0]))

    def init_all(self, input_ids, attention_mask):
        """Touch every parameter (used by ``init``): encoder and, if configured, pooler."""
        h = self(input_ids, attention_mask)
        return self.pooled_output(h) if self.cfg.add_pooler else h


def _layer_rules() -> tuple[ParamRule, ...]:
    hf, fx = "encoder.layer.{i}.", "layer_{i}/"
    rows = [
        ("attention.self.query", "attention/query"),
        ("attention.self.key", "attention/key"),
        ("attention.self.value", "attention/value"),
        ("attention.output.dense", "attention/output_dense"),
        ("intermediate.dense", "intermediate"),
        ("output.dense", "output_dense"),
    ]
    norms = [("attention.output.LayerNorm", "attention/output_LayerNorm"), ("output.LayerNorm", "output_LayerNorm")]
    return tuple(dense_rules(hf, fx, rows) + layer_norm_rules(hf, fx, norms))


# transformers name -> our params path. LINEAR transposes torch's [out, in] to flax's [in, out].
RULES: tuple[ParamRule, ...] = (
    ParamRule("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding"),
    ParamRule("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding"),
    ParamRule("embeddings.token_type_embeddings.weight", "embeddings/token_type_embeddings/embedding"),
    ParamRule("embeddings.LayerNorm.weight", "embeddings/LayerNorm/scale", COPY),
    ParamRule("embeddings.LayerNorm.bias", "embeddings/LayerNorm/bias", COPY),
    *_layer_rules(),
    ParamRule("pooler.dense.weight", "pooler/kernel", LINEAR),
    ParamRule("pooler.dense.bias", "pooler/bias"),
    # Sequence classification heads (sense_jax.models.heads): BERT's classifier after the pooler,
    # RoBERTa's two-layer RobertaClassificationHead. Used only when the config has a head.
    ParamRule("classifier.weight", "classifier/kernel", LINEAR),
    ParamRule("classifier.bias", "classifier/bias"),
    *dense_rules("classifier.", "classifier/", [("dense", "dense"), ("out_proj", "out_proj")]),
)


def _config_from_hf(hf: dict) -> BertConfig:
    return config_from_hf(hf)


FAMILY = register(ModelFamily(
    name="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert"),
    config_from_hf=_config_from_hf,
    make_module=BertModel,
    rules=RULES,
    base_prefixes=("bert.", "roberta.", "model."),
    ignored=(r"^embeddings\.position_ids$", r"^cls\.", r"^lm_head\.", r"^classifier\.",
             r"^qa_outputs\.", r"^pre_classifier\."),
    init_method="init_all",
))
