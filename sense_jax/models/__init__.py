"""Model families and their registry.

Each family lives in one file (``bert.py``, later ``llama.py``, ``deberta_v2.py``) with the same
small contract, collected in a :class:`ModelFamily`:

* a frozen config dataclass built from a transformers ``config.json`` (``config_from_hf``),
* a Flax Linen module built from that config (``make_module``), a pure function of
  ``(params, input_ids [B, T], attention_mask [B, T], ...) -> hidden states [B, T, D]``,
* a conversion table (:class:`ParamRule` rows) mapping transformers' parameter names to ours.

Families register themselves under every transformers ``model_type`` they implement;
:func:`get_family` looks one up and names the supported types when it cannot.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from sense_jax.errors import ConversionError, SenseJaxError

# --- Conversion rules -------------------------------------------------------------------------
# A value transform maps a transformers tensor to ours and back. Both directions are given so one
# table serves conversion (HF -> Flax) and export (Flax -> HF).


@dataclasses.dataclass(frozen=True)
class Transform:
    """A pair of array functions: ``to_flax(hf_array) -> flax_array`` and its inverse."""

    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


COPY = Transform("copy", lambda x: x, lambda y: y)
# torch.nn.Linear stores weight as [out, in]; flax.linen.Dense stores kernel as [in, out].
LINEAR = Transform("linear", lambda x: np.ascontiguousarray(x.T), lambda y: np.ascontiguousarray(y.T))


@dataclasses.dataclass(frozen=True)
class ParamRule:
    """One row of a conversion table.

    ``hf`` and ``flax`` are names with an optional ``{i}`` layer placeholder, e.g.
    ``"encoder.layer.{i}.attention.self.query.weight"`` and
    ``"encoder/layer_{i}/attention/query/kernel"`` (a ``/``-joined path in the params pytree).
    """

    hf: str
    flax: str
    transform: Transform = COPY

    def hf_regex(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.hf).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


@dataclasses.dataclass(frozen=True)
class Rename:
    """A rewrite of stored tensor names, applied (after the task-model prefix is stripped) before
    the conversion table is consulted: ``re.sub(pattern, replacement, name)``.

    Renames describe names that older releases wrote and that transformers still loads; they are
    data beside the table, never special cases in the converter.
    """

    pattern: str
    replacement: str

    def apply(self, name: str) -> str:
        return re.sub(self.pattern, self.replacement, name)


# transformers' "legacy" renamings, applied on load to every model whatever its type
# (transformers/conversion_mapping.py, mapping["legacy"], added by get_model_conversion_mapping):
# TF-era conversions named LayerNorm parameters gamma / beta. (The other legacy rows, weight-norm
# weight_g / weight_v and a duplicated ``model.language_model.model`` prefix, name modules that no
# family here has.)
LEGACY_RENAMES: tuple[Rename, ...] = (
    Rename(r"LayerNorm\.gamma$", "LayerNorm.weight"),
    Rename(r"LayerNorm\.beta$", "LayerNorm.bias"),
)


def dense_rules(hf_prefix: str, flax_prefix: str, rows) -> list[ParamRule]:
    """Rows ``(hf_module, our_module)`` of torch Linear layers -> weight (LINEAR) and bias rules."""
    out = []
    for h, f in rows:
        out.append(ParamRule(f"{hf_prefix}{h}.weight", f"{flax_prefix}{f}/kernel", LINEAR))
        out.append(ParamRule(f"{hf_prefix}{h}.bias", f"{flax_prefix}{f}/bias"))
    return out


def layer_norm_rules(hf_prefix: str, flax_prefix: str, rows) -> list[ParamRule]:
    """Rows ``(hf_module, our_module)`` of torch LayerNorms -> weight->scale and bias rules."""
    out = []
    for h, f in rows:
        out.append(ParamRule(f"{hf_prefix}{h}.weight", f"{flax_prefix}{f}/scale"))
        out.append(ParamRule(f"{hf_prefix}{h}.bias", f"{flax_prefix}{f}/bias"))
    return out


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What a model family provides to the converter and the loader.

    Attributes:
      name: family name, e.g. ``"bert"``.
      model_types: transformers ``model_type`` values this family implements.
      config_from_hf: ``dict -> config`` (a frozen dataclass); raises ConversionError on
        unsupported settings, naming the key.
      make_module: ``config -> flax.linen.Module``.
      rules: the conversion table.
      base_prefixes: prefixes that task models put before base-model names (``"bert."``);
        stripped when every weight of a checkpoint carries one of them.
      ignored: regexes of transformers keys that hold no parameter of ours (buffers such as
        ``position_ids``, task heads); they are skipped, and reported.
      init_method: name of the module method that touches every parameter (for ``init``).
      renames: stored-name rewrites applied before ``rules`` (:class:`Rename`); by default
        transformers' legacy names (``LayerNorm.gamma`` / ``LayerNorm.beta``).
      tied: ``(head, source, config_flag)`` rows as transformers' ``_tied_weights_keys``: when
        the config's ``config_flag`` is true the ``head`` tensor is ``source`` and need not be
        stored. A checkpoint that stores both with different values is untied on load, as
        transformers does (``config_flag`` set false, the stored head kept, and a note says so).
      head_params: top-level params that belong to a task head, not to transformers' base model
        (AutoModel); an export of the base model leaves them out.
    """

    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict], Any]
    make_module: Callable[[Any], Any]
    rules: tuple[ParamRule, ...]
    base_prefixes: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    init_method: str | None = None
    renames: tuple[Rename, ...] = LEGACY_RENAMES
    tied: tuple[tuple[str, str, str], ...] = ()
    head_params: tuple[str, ...] = ()

    def rename(self, name: str) -> str:
        """``name`` after every :attr:`renames` row (a no-op for current names)."""
        for r in self.renames:
            name = r.apply(name)
        return name

    def init_fn(self, cfg: Any, *, boxed: bool = False) -> Callable[[Any], dict]:
        """``key -> params`` of ``self.make_module(cfg)`` (pure, not jitted): the module's
        initialisers run through :attr:`init_method` on a [1, 2] dummy batch.

        With ``boxed`` the leaves keep their ``nn.Partitioned`` boxes (logical axis names, for
        :func:`sense_jax.sharding.params_sharding`); else plain arrays (float32 unless the
        config's ``param_dtype`` says otherwise).
        """
        module = self.make_module(cfg)
        method = getattr(module, self.init_method) if self.init_method else None

        def init(key):
            ids = jnp.zeros((1, 2), jnp.int32)
            params = module.init(key, ids, jnp.ones_like(ids), method=method)["params"]
            return params if boxed else meta.unbox(params)

        return init

    def abstract_params(self, cfg: Any, *, boxed: bool = False) -> dict:
        """Shapes and dtypes of the params of ``cfg`` (a pytree of ShapeDtypeStruct, boxed in
        ``nn.Partitioned`` with ``boxed``), by ``jax.eval_shape``: nothing is allocated. The one
        abstract init used by conversion, students, sharding and the trainer."""
        return jax.eval_shape(self.init_fn(cfg, boxed=boxed), jax.random.PRNGKey(0))


# --- Input length ------------------------------------------------------------------------------
# A learned position table (BERT, RoBERTa, DeBERTa with position_biased_input) has rows for a fixed
# number of positions; looking up a row past its end gives NaN in JAX (the gather's fill value),
# which spreads through attention to every row of the batch. Inputs that long are refused here, by
# name, at trace time (the length is a static shape), so every path (the API, extraction, training,
# evaluation) is covered. Rotary (Llama family) and DeBERTa's relative positions are computed,
# not looked up: no limit applies (see each family's ``max_input_length``).


def input_length_limit(cfg: Any) -> int | None:
    """Most tokens (special tokens included) one input row may hold for ``cfg``'s position table;
    None when positions are computed rather than looked up (no table to overflow)."""
    limit = getattr(cfg, "max_input_length", None)
    return None if limit is None else int(limit)


def describe_positions(cfg: Any) -> str:
    """``max_position_embeddings=512`` (and RoBERTa's padding offset), for error messages."""
    text = f"max_position_embeddings={getattr(cfg, 'max_position_embeddings', '?')}"
    offset = int(getattr(cfg, "position_offset", 0) or 0)
    return text + (f" minus the padding offset {offset} of {cfg.model_type}'s position ids" if offset else "")


def check_input_length(length: int, cfg: Any, what: str = "input of", whose: str = "the model's",
                       error: type = SenseJaxError, fix: str = "truncate to at most {limit} tokens") -> None:
    """Refuse ``length`` tokens when they do not fit ``cfg``'s position table.

    Raises:
      ``error`` (a SenseJaxError): ``length`` > :func:`input_length_limit`; the message names
        ``what``, the length, the limit and ``max_position_embeddings``.
    """
    limit = input_length_limit(cfg)
    if limit is not None and int(length) > limit:
        raise error(f"{what} {int(length)} tokens exceeds {whose} {limit} positions ({describe_positions(cfg)}); "
                    + fix.format(limit=limit))


# --- Packed rows (several passages per row) ------------------------------------------------------
# Every family's module takes an optional ``segment_ids`` [B, T] int32: 0 at padding, 1..S for the
# S passages packed into a row, each passage one contiguous run of positions (as T5X's and
# MaxText's packed datasets lay them out, ``inputs_segmentation``). Attention is then
# block-diagonal (a token sees only its own passage), and positions restart at every passage, so
# that each passage's states equal those of the passage alone (within float rounding: the
# softmax sums over a longer, masked row). The two helpers below are shared by the families.


def count_in_segment(segment_ids: jax.Array, counted: jax.Array) -> jax.Array:
    """Inclusive running count of ``counted`` within each contiguous run of equal segment id.

    Args:
      segment_ids: [B, T] int segment ids; a run starts wherever the id changes.
      counted: [B, T] int 0/1, what to count.

    Returns:
      [B, T] int32: at position t, the sum of ``counted`` over t's run up to and including t
      (the position id ``count - 1`` for a run of real tokens).
    """
    counted = counted.astype(jnp.int32)
    T = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids.shape)
    first = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], dtype=bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(first, idx, 0), axis=1)
    total = jnp.cumsum(counted, axis=1)
    before = jnp.take_along_axis(total - counted, start, axis=1)
    return total - before


def same_segment(segment_ids: jax.Array) -> jax.Array:
    """[B, T] segment ids -> [B, T, S] bool, True where query t and key s share a segment."""
    return segment_ids[:, :, None] == segment_ids[:, None, :]


_REGISTRY: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Register ``family`` under each of its ``model_types``."""
    for t in family.model_types:
        _REGISTRY[t] = family
    return family


def supported_model_types() -> list[str]:
    """Sorted list of the transformers ``model_type`` values that can be converted."""
    _import_families()
    return sorted(_REGISTRY)


def get_family(model_type: str, source: str = "config.json") -> ModelFamily:
    """Return the family registered for ``model_type``.

    Raises:
      ConversionError: no family implements ``model_type`` (names ``source`` and the
        supported types).
    """
    _import_families()
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise ConversionError(
            f"{source}: unsupported model_type {model_type!r}; supported: "
            + ", ".join(sorted(_REGISTRY))
        ) from None


def _import_families() -> None:
    # Importing a family module registers it (here, not at the top: each family imports this
    # module). New families add one line here.
    from sense_jax.models import bert  # noqa: F401
    from sense_jax.models import deberta_v2  # noqa: F401
    from sense_jax.models import llama  # noqa: F401
