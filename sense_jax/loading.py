"""``load_model``: a converted sense_jax directory or a transformers directory, ready to run."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer

from sense_jax import convert as _convert
from sense_jax.errors import ConfigError, ConversionError, SenseJaxError
from sense_jax.io_utils import read_json
from sense_jax.models import ModelFamily, check_input_length, get_family, input_length_limit
from sense_jax.models.heads import head_logits, split_head


@dataclasses.dataclass
class Model:
    """A loaded encoder: module, params, tokenizer and config, with a jitted forward.

    Attributes:
      module: the Flax Linen module (pure: ``module.apply({"params": params}, ...)``).
      params: float32 params pytree (jax arrays).
      tokenizer: the model's transformers fast tokenizer (None if no tokenizer files).
      config: the family's frozen config dataclass (``dtype`` is the compute dtype).
      family: the registry entry (conversion table, config parser).
      hf_config: transformers' config.json as a dict.
      path: where it was loaded from.
      head_params: the sequence classification head's params (:mod:`sense_jax.models.heads`),
        or None when the model has none; ``params`` holds the encoder alone (with its pooler,
        which the BERT / DeBERTa head shares).
    """

    module: Any
    params: Any
    tokenizer: Any
    config: Any
    family: ModelFamily
    hf_config: dict
    path: Path
    head_params: Any = None

    def __post_init__(self):
        self._forward = jax.jit(functools.partial(self.module.apply),
                                static_argnames=("output_all_hidden_states",))
        module, cfg = self.module, self.config

        def logits(params, head_params, input_ids, attention_mask, token_type_ids):
            states = module.apply({"params": params}, input_ids, attention_mask, token_type_ids)
            return head_logits(cfg, head_params, states, attention_mask, input_ids)

        self._logits = jax.jit(logits)

    @property
    def max_input_length(self) -> int | None:
        """Most tokens per input row (specials included) the position table holds, e.g. 512 for
        BERT (512 positions) and RoBERTa (514 minus its padding offset 2); None for rotary
        (Llama family) and relative (DeBERTa-v3) positions, which have no table to overflow."""
        return input_length_limit(self.config)

    def hidden_states(self, input_ids, attention_mask, token_type_ids=None) -> jax.Array:
        """Last-layer hidden states [B, T, D] (compute dtype) for int [B, T] inputs; jitted.

        Compiles once per distinct (B, T); use :func:`sense_jax.batching.length_buckets` to keep
        the number of shapes small.

        Raises:
          SenseJaxError: T > :attr:`max_input_length` (checked on the shape when tracing, by
            the model's embeddings; never NaN states).
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        if token_type_ids is not None:
            token_type_ids = jnp.asarray(token_type_ids, jnp.int32)
        return self._forward({"params": self.params}, input_ids, attention_mask, token_type_ids)

    def logits(self, input_ids, attention_mask, token_type_ids=None) -> jax.Array:
        """Sequence classification logits [B, num_labels] float32 for int [B, T] inputs; jitted.

        The converted ``*ForSequenceClassification`` head on the last hidden states, as
        transformers' model of that class computes it (:mod:`sense_jax.models.heads`): the
        pooled first token (BERT, RoBERTa, DeBERTa) or the last non-pad token by ``pad_token_id``
        (Llama, Mistral, Qwen2). Labels: ``hf_config["id2label"]``; one output is a regression.

        Raises:
          SenseJaxError: the model has no head (names the directory); a decoder batch of more
            than one row with no ``pad_token_id``; T > :attr:`max_input_length`.
        """
        if self.head_params is None:
            archs = self.hf_config.get("architectures") or ["(none)"]
            raise SenseJaxError(f"{self.path}: no sequence classification head (architectures "
                                f"{', '.join(archs)}); convert a *ForSequenceClassification checkpoint")
        input_ids = jnp.asarray(input_ids, jnp.int32)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        if token_type_ids is not None:
            token_type_ids = jnp.asarray(token_type_ids, jnp.int32)
        try:
            return self._logits(self.params, self.head_params, input_ids, attention_mask, token_type_ids)
        except SenseJaxError as e:
            raise type(e)(f"{self.path}: {e}") from None

    def all_hidden_states(self, input_ids, attention_mask, token_type_ids=None) -> jax.Array:
        """Every layer's hidden states [L + 1, B, T, D] (embeddings output first)."""
        _, states = self._forward({"params": self.params}, jnp.asarray(input_ids, jnp.int32),
                                  jnp.asarray(attention_mask, jnp.int32), token_type_ids,
                                  output_all_hidden_states=True)
        return states

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, np.ndarray]:
        """Tokenise ``texts`` with the model's tokenizer, unpadded, truncated to the model's length.

        Returns a dict of ragged lists under ``input_ids`` (and ``token_type_ids`` if the
        tokenizer makes them). Default length: :attr:`max_input_length`, else (rotary positions)
        ``max_position_embeddings``.

        Raises:
          SenseJaxError: ``max_length`` exceeds :attr:`max_input_length`.
        """
        if max_length is not None:
            check_input_length(max_length, self.config, "max_length", f"the {self.path} model's")
        if self.tokenizer is None:
            raise SenseJaxError(f"{self.path}: no tokenizer files")
        limit = max_length or self.max_input_length or int(self.config.max_position_embeddings)
        return self.tokenizer(list(texts), truncation=True, max_length=limit, padding=False)

    def with_dtype(self, dtype: str) -> "Model":
        """The same model computing in ``dtype`` (:data:`COMPUTE_DTYPES`); params stay float32.

        Raises:
          ConfigError: another dtype, named.
        """
        cfg = dataclasses.replace(self.config, dtype=compute_dtype(dtype))
        return dataclasses.replace(self, config=cfg, module=self.family.make_module(cfg))


# Compute dtypes of every family. Attention scores, softmax and norm statistics are float32 in
# each, so padded rows stay finite in float16 too; float16 keeps 3 more mantissa bits than
# bfloat16 (closer to float32) but overflows beyond ±65504, which a model with large activations
# can reach (check the output with jnp.isfinite). Tested against float32 for BERT and Llama.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(dtype: Any) -> str:
    """The canonical name of a compute dtype (``"bf16"``-style aliases excluded).

    Raises:
      ConfigError: ``dtype`` is not one of :data:`COMPUTE_DTYPES`.
    """
    try:
        name = str(jnp.dtype(dtype))
    except TypeError:
        name = None
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"compute dtype {dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    return name


def _load_tokenizer(path: Path):
    if not any((path / f).exists() for f in _convert.TOKENIZER_FILES):
        return None
    try:
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True, local_files_only=True)
    except Exception as e:
        raise SenseJaxError(f"{path}: tokenizer files could not be loaded ({type(e).__name__}: {e})") from None
    if tok.pad_token is None and tok.eos_token is not None:
        # Decoder tokenizers (Llama 3, Mistral) define no pad token. Pad with EOS, as LLM2Vec
        # does: the attention mask hides padding, so the id only has to be a valid one.
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of the model directory ``path`` (converted or transformers), as
    :func:`load_model` loads it, without its weights.

    Raises:
      SenseJaxError: no tokenizer files there, or they cannot be loaded (named)."""
    tok = _load_tokenizer(Path(path))
    if tok is None:
        raise SenseJaxError(f"{path}: no tokenizer files")
    return tok


def load_model(path: str | os.PathLike, *, dtype: str = "float32", sharding: Any = None,
               adapter: Any = None, config_overrides: dict | None = None) -> Model:
    """Load a model for inference or training.

    Args:
      path: a directory written by ``sense-jax convert`` (holds ``sense_jax.json``), a
        transformers model directory (converted in memory), or a hub id (where reachable).
      dtype: compute dtype, "float32" (default), "bfloat16" or "float16" (:data:`COMPUTE_DTYPES`).
        Params are float32.
      sharding: optional pytree of ``jax.sharding.Sharding`` for the params (see
        :func:`sense_jax.sharding.params_sharding`), else the default device.
      adapter: PEFT LoRA adapter directory (or list) to merge; transformers directories only
        (a converted directory already holds merged weights).
      config_overrides: config fields to replace, e.g. ``{"causal": False}`` (LLM2Vec).

    Returns:
      A :class:`Model`.

    Raises:
      ConversionError / SenseJaxError: missing files, corrupt weights, unsupported model_type;
        the message names the file. ConfigError: an unknown ``dtype``.
    """
    dtype = compute_dtype(dtype)
    p = Path(path)
    if (p / _convert.METADATA_FILE).is_file():
        meta = read_json(p / _convert.METADATA_FILE, "sense_jax metadata")
        hf_config = _convert.read_hf_config(p)
        family = get_family(meta.get("model_type") or hf_config.get("model_type"), str(p / "config.json"))
        cfg = family.config_from_hf(hf_config)
        saved = meta.get("config") or {}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in saved.items()
                                          if k in {f.name for f in dataclasses.fields(cfg)}})
        if adapter is not None:
            raise ConversionError(f"{p}: adapters are merged at conversion; convert the base "
                                  "model with adapter=... instead")
        cfg = _convert.apply_config_overrides(cfg, config_overrides)
        abstract = _convert.abstract_model_params(family, cfg)
        params = _convert.restore_params(p / _convert.PARAMS_DIR, abstract, _with_head_sharding(abstract, sharding))
        params, head = split_head(cfg, params)
        tok_dir = p
    else:
        converted, tok_dir = _convert.load_hf(path, adapter=adapter, config_overrides=config_overrides)
        family, cfg, hf_config = converted.family, converted.config, converted.hf_config
        params, head = split_head(cfg, converted.params)
        if sharding is not None:
            params = jax.device_put(params, sharding)
            if head is not None:
                head = jax.device_put(head, _with_head_sharding(head, sharding))
        else:
            params = jax.tree.map(jnp.asarray, params)
            head = None if head is None else jax.tree.map(jnp.asarray, head)
        if head is not None and "pooler" in head and "pooler" in params:
            head["pooler"] = params["pooler"]  # one pooler, shared, as in a restored directory
    cfg = dataclasses.replace(cfg, dtype=str(jnp.dtype(dtype)))
    return Model(module=family.make_module(cfg), params=params, tokenizer=_load_tokenizer(tok_dir),
                 config=cfg, family=family, hf_config=hf_config, path=p, head_params=head)


def _with_head_sharding(tree: Any, sharding: Any) -> Any:
    """``sharding`` (a pytree for the encoder's params, or None) extended to every key of ``tree``:
    a head's params (few, small) are replicated over the mesh of the encoder's shardings."""
    if not isinstance(sharding, dict):  # None, or one sharding for every leaf
        return sharding
    leaf = jax.tree.leaves(sharding)[0]
    replicated = (jax.sharding.NamedSharding(leaf.mesh, jax.sharding.PartitionSpec())
                  if isinstance(leaf, jax.sharding.NamedSharding) else leaf)
    return {k: sharding[k] if k in sharding else jax.tree.map(lambda _: replicated, v) for k, v in tree.items()}
