"""Sequence classification heads of every family, as one small Flax Linen module.

A head maps the encoder's last hidden states [B, T, D] to logits [B, L] (L = ``num_labels``; 1 for
regression). It is a module of its own, apart from the encoder, so that any states of the
teacher's width can go through it: the teacher's own, or a student's adapted states (METHOD §3:
the teacher's pooler and classifier copied onto the student and frozen). Four kinds reimplement
transformers' task models (dropout is off, as in ``eval()``):

* ``bert_pooler`` (``BertForSequenceClassification``, models/bert/modeling_bert.py):
  ``classifier(tanh(pooler(h[:, 0])))``.
* ``roberta_classifier`` (``RobertaClassificationHead`` of RoBERTa, XLM-RoBERTa, CamemBERT, which
  have no pooler in that model): ``classifier.out_proj(tanh(classifier.dense(h[:, 0])))``.
* ``context_pooler`` (``DebertaV2ForSequenceClassification``, models/deberta_v2/modeling_deberta_v2.py):
  ``classifier(act(pooler(h[:, 0])))`` with ``act`` = ``pooler_hidden_act``.
* ``last_token`` (``GenericForSequenceClassification`` of Llama, Mistral, Qwen2,
  transformers/modeling_layers.py): ``score(h[b, t_b])`` without bias, where ``t_b`` is the
  rightmost position whose input id is not ``pad_token_id`` (so left and right padding both give
  the last real token; a real token equal to the pad id is treated as padding, as transformers
  does); with ``pad_token_id`` None only a batch of one is defined (its last position).

Params of a head are top-level keys of the family's params pytree, named as in the family's
conversion table (``pooler``, ``classifier``, ``score``), so one table converts the encoder and
its head both ways. The BERT and DeBERTa pooler is shared with the encoder's ``params["pooler"]``.
Whether a config has a head: ``cfg.num_labels > 0`` (set at conversion from a
``*ForSequenceClassification`` checkpoint's ``architectures`` and ``id2label``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta

from sense_jax.errors import ConversionError, SenseJaxError
from sense_jax.models.deberta_v2 import ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class HeadType:
    """How one transformers ``model_type`` classifies sequences.

    Attributes:
      kind: ``bert_pooler``, ``roberta_classifier``, ``context_pooler`` or ``last_token``.
      architecture: transformers' task class, e.g. ``"BertForSequenceClassification"``.
      base_prefix: the attribute holding the base model in that class (``"bert."``); every
        stored name but those in ``outside_base`` carries it.
      params: top-level params keys of the head.
      outside_base: transformers name prefixes stored beside the base model, not in it.
    """

    kind: str
    architecture: str
    base_prefix: str
    params: tuple[str, ...]
    outside_base: tuple[str, ...]


_BERT = ("bert_pooler", ("pooler", "classifier"), ("classifier.",))
_ROBERTA = ("roberta_classifier", ("classifier",), ("classifier.",))
_DEBERTA = ("context_pooler", ("pooler", "classifier"), ("pooler.", "classifier."))
_LAST = ("last_token", ("score",), ("score.",))

# transformers model_type -> its sequence classification model.
HEAD_TYPES: dict[str, HeadType] = {
    mt: HeadType(kind, arch, prefix, params, outside)
    for mt, arch, prefix, (kind, params, outside) in (
        ("bert", "BertForSequenceClassification", "bert.", _BERT),
        ("roberta", "RobertaForSequenceClassification", "roberta.", _ROBERTA),
        ("xlm-roberta", "XLMRobertaForSequenceClassification", "roberta.", _ROBERTA),
        ("camembert", "CamembertForSequenceClassification", "roberta.", _ROBERTA),
        ("deberta-v2", "DebertaV2ForSequenceClassification", "deberta.", _DEBERTA),
        ("llama", "LlamaForSequenceClassification", "model.", _LAST),
        ("mistral", "MistralForSequenceClassification", "model.", _LAST),
        ("qwen2", "Qwen2ForSequenceClassification", "model.", _LAST),
    )
}


def head_type(cfg: Any) -> HeadType:
    """The :class:`HeadType` of ``cfg.model_type``.

    Raises:
      ConversionError: no sequence classification head is implemented for the model type.
    """
    try:
        return HEAD_TYPES[cfg.model_type]
    except KeyError:
        raise ConversionError(f"no sequence classification head for model_type {cfg.model_type!r}; "
                              f"supported: {sorted(HEAD_TYPES)}") from None


def has_head(cfg: Any) -> bool:
    """Whether ``cfg`` describes a model with a sequence classification head (``num_labels > 0``)."""
    return int(getattr(cfg, "num_labels", 0) or 0) > 0


def num_labels_from_hf(hf_config: dict) -> int:
    """The head width of a ``*ForSequenceClassification`` config.json: ``len(id2label)`` when
    stored (transformers' ``PretrainedConfig.num_labels``), else ``num_labels``, else 2 (the
    transformers default)."""
    id2label = hf_config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    return int(hf_config.get("num_labels", 2))


def head_labels_for(hf_config: dict, model_type: str) -> int:
    """``num_labels`` for a checkpoint whose config.json is ``hf_config``: the head width when its
    ``architectures`` name this model type's ``*ForSequenceClassification`` class, else 0 (no head;
    other task heads, e.g. token classification, stay skipped)."""
    ht = HEAD_TYPES.get(model_type)
    archs = hf_config.get("architectures") or []
    if ht is None or ht.architecture not in archs:
        return 0
    return num_labels_from_hf(hf_config)


def _init(axes):
    # transformers' _init_weights: normal(initializer_range = 0.02) kernels, zero biases.
    return nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)


def _dense(features: int, axes, dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=_init(axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


class _RobertaClassifier(nn.Module):
    """RobertaClassificationHead's two layers (params ``classifier/dense``, ``classifier/out_proj``)."""

    hidden_size: int
    num_labels: int
    dtype: Any

    def setup(self):
        self.dense = _dense(self.hidden_size, ("embed", "embed_out"), self.dtype, "dense")
        self.out_proj = _dense(self.num_labels, ("embed", None), self.dtype, "out_proj")

    def __call__(self, x):
        return self.out_proj(jnp.tanh(self.dense(x)))


def last_token_index(input_ids: jax.Array | None, pad_token_id: int | None) -> jax.Array:
    """Per row, the position transformers' ``GenericForSequenceClassification`` reads: the rightmost
    token whose id is not ``pad_token_id`` (0 when a row is all padding), [B] int32.

    Args:
      input_ids: [B, T] int token ids, or None (then the last position, as transformers does for
        ``inputs_embeds``).
      pad_token_id: the config's pad id; None: only a batch of one is defined (last position).

    Raises:
      SenseJaxError: ``pad_token_id`` is None and B > 1 (transformers raises too: without a pad id
        it cannot tell where a padded row ends).
    """
    if input_ids is None:
        raise SenseJaxError("the last-token head needs input_ids to find each row's last non-padding token")
    B, T = input_ids.shape
    if pad_token_id is None:
        if B != 1:
            raise SenseJaxError(f"a batch of {B} rows needs pad_token_id in config.json to find each row's "
                                "last token (it is null); set it, or classify one row at a time")
        return jnp.full((B,), T - 1, jnp.int32)
    not_pad = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.argmax(jnp.arange(T, dtype=jnp.int32) * not_pad, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """What a head module needs: kind, widths, pooler activation, pad id, compute dtype."""

    kind: str
    num_labels: int
    hidden_size: int
    activation: str = "tanh"
    pad_token_id: int | None = None
    dtype: str = "float32"


def head_spec(cfg: Any) -> HeadSpec:
    """The :class:`HeadSpec` of a family config with a head.

    Raises:
      ConversionError: ``cfg.num_labels`` < 1 (no head), or no head for the model type.
    """
    ht = head_type(cfg)
    if not has_head(cfg):
        raise ConversionError(f"{cfg.model_type} config has no sequence classification head (num_labels=0)")
    act = getattr(cfg, "pooler_hidden_act", "tanh") if ht.kind == "context_pooler" else "tanh"
    return HeadSpec(kind=ht.kind, num_labels=int(cfg.num_labels), hidden_size=int(cfg.hidden_size),
                    activation=act, pad_token_id=getattr(cfg, "pad_token_id", None), dtype=cfg.dtype)


class SequenceClassificationHead(nn.Module):
    """A sequence classification head (the module docstring lists the kinds and their sources).

    Call ``head.apply({"params": head_params}, hidden_states, attention_mask, input_ids)``:

    Args:
      hidden_states: [B, T, D] the encoder's last hidden states (any float dtype).
      attention_mask: [B, T] 1 for real tokens; unused by transformers' heads (kept so every head
        has one signature).
      input_ids: [B, T] int ids; needed by ``last_token`` (it finds the last non-pad token by id).

    Returns:
      logits [B, num_labels] float32 (computed in ``spec.dtype``).
    """

    spec: HeadSpec

    def setup(self):
        s, dtype = self.spec, jnp.dtype(self.spec.dtype)
        if s.kind in ("bert_pooler", "context_pooler"):
            self.pooler = _dense(s.hidden_size, ("embed", "embed_out"), dtype, "pooler")
            self.classifier = _dense(s.num_labels, ("embed", None), dtype, "classifier")
        elif s.kind == "roberta_classifier":
            self.classifier = _RobertaClassifier(s.hidden_size, s.num_labels, dtype, name="classifier")
        elif s.kind == "last_token":
            self.score = _dense(s.num_labels, ("embed", None), dtype, "score", use_bias=False)
        else:
            raise ConversionError(f"unknown head kind {s.kind!r}")

    def __call__(self, hidden_states, attention_mask=None, input_ids=None):
        del attention_mask
        s = self.spec
        if s.kind == "last_token":
            idx = last_token_index(input_ids, s.pad_token_id)
            x = hidden_states[jnp.arange(hidden_states.shape[0]), idx]
            return self.score(x).astype(jnp.float32)
        x = hidden_states[:, 0]
        if s.kind == "roberta_classifier":
            return self.classifier(x).astype(jnp.float32)
        pooled = ACTIVATIONS[s.activation](self.pooler(x))
        return self.classifier(pooled).astype(jnp.float32)


def head_param_keys(cfg: Any) -> tuple[str, ...]:
    """Top-level params keys of ``cfg``'s head (``()`` without a head)."""
    return head_type(cfg).params if has_head(cfg) else ()


def abstract_head_params(cfg: Any, boxed: bool = False) -> dict:
    """Shapes and dtypes of ``cfg``'s head params ({} without a head), no allocation; ``boxed``
    keeps the ``nn.Partitioned`` logical-axis boxes (for :func:`sense_jax.sharding.params_sharding`)."""
    if not has_head(cfg):
        return {}
    module = SequenceClassificationHead(head_spec(cfg))
    h = jnp.zeros((1, 2, cfg.hidden_size), jnp.float32)
    ids = jnp.ones((1, 2), jnp.int32)
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), h, ids, ids))
    return variables["params"] if boxed else meta.unbox(variables["params"])


def init_head_params(cfg: Any, seed: int = 0) -> dict:
    """A fresh head for ``cfg`` (``cfg.num_labels`` outputs): kernels N(0, 0.02), biases 0, as
    transformers initialises one; float32, deterministic in ``seed``."""
    module = SequenceClassificationHead(head_spec(cfg))
    h = jnp.zeros((1, 2, cfg.hidden_size), jnp.float32)
    ids = jnp.ones((1, 2), jnp.int32)
    return meta.unbox(module.init(jax.random.PRNGKey(seed), h, ids, ids)["params"])


def split_head(cfg: Any, params: dict) -> tuple[dict, dict | None]:
    """(encoder params, head params or None) of a converted params pytree.

    The encoder keeps every key it had before heads existed (its ``pooler`` included, when
    ``cfg.add_pooler``); the head takes its own keys (:func:`head_param_keys`); a pooler sits in
    both, as the same arrays (not copied).
    """
    if not has_head(cfg):
        return params, None
    keys = head_param_keys(cfg)
    shared = {"pooler"} if getattr(cfg, "add_pooler", False) else set()
    encoder = {k: v for k, v in params.items() if k not in keys or k in shared}
    return encoder, {k: params[k] for k in keys}


def head_logits(cfg: Any, head_params: dict, hidden_states: jax.Array, attention_mask: jax.Array,
                input_ids: jax.Array | None = None) -> jax.Array:
    """Logits [B, num_labels] float32 of ``cfg``'s head on hidden states [B, T, D]; pure, jittable.

    ``hidden_states`` may be any states of width D = ``cfg.hidden_size`` (a student's, after the
    adaptor); ``input_ids`` [B, T] is needed by the last-token head of decoders.

    Raises:
      ConversionError: ``cfg`` has no head. SenseJaxError: a last-token head without input_ids,
        or with ``pad_token_id`` None and B > 1.
    """
    module = SequenceClassificationHead(head_spec(cfg))
    return module.apply({"params": head_params}, hidden_states, attention_mask, input_ids)
