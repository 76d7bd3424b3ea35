"""Conversion between transformers (PyTorch) checkpoints and Flax params pytrees.

Sources: a local transformers model directory holding ``config.json`` and one of
``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, or
``pytorch_model.bin`` (sharded or not; read with ``torch.load(weights_only=True)`` and only when
torch is installed); or a hub id, downloaded with huggingface_hub where the hub is reachable.

Conversion is data: each family (``sense_jax/models/*.py``) gives a table of
:class:`~sense_jax.models.ParamRule` rows, and the same table drives export back to transformers'
names. A checkpoint is accepted only when every tensor maps to a parameter of ours, every
parameter of ours is filled, and every shape matches exactly (as nanoGPT's ``from_pretrained``).

A converted directory holds ``config.json`` (transformers' own), the tokenizer files,
``sense_jax.json`` (what this is and where it came from) and ``params/`` (an Orbax checkpoint of
the float32 params pytree).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from sense_jax.errors import ConfigError, ConversionError
from sense_jax.hf_checkpoint import read_hf_config, read_hf_state_dict  # noqa: F401  (also named here)
from sense_jax.io_utils import atomic_directory, check_replaceable, holds_only, write_json_atomic
from sense_jax.lora import merge_lora
from sense_jax.models import ModelFamily, get_family
from sense_jax.models.heads import abstract_head_params, head_labels_for

FORMAT_VERSION = 1
METADATA_FILE = "sense_jax.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spm.model",
    "tokenizer.model",
)


class ConversionNote(UserWarning):
    """A conversion choice the user should know of (e.g. a tied head stored apart, kept untied);
    also listed under ``notes`` in ``sense_jax.json``."""


# --- Reading a transformers checkpoint --------------------------------------------------------

def resolve_source(src: str | os.PathLike) -> Path:
    """A local directory as is, or a hub id downloaded to the local cache.

    Raises:
      ConversionError: ``src`` is neither an existing directory nor a downloadable hub id.
    """
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"{path} is a file; expected a transformers model directory")
    if str(src).count("/") > 1 or str(src).startswith((".", "/", "~")):
        raise ConversionError(f"model directory not found: {path}")
    try:
        from huggingface_hub import snapshot_download  # only hub ids need it

        return Path(snapshot_download(str(src), allow_patterns=[
            "config.json", "*.safetensors", "*.safetensors.index.json", *TOKENIZER_FILES]))
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        raise ConversionError(
            f"{src!r} is not a local directory and could not be fetched from the hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


# --- Mapping names and values -----------------------------------------------------------------

def _family_and_config(hf_config: dict, source: str) -> tuple[ModelFamily, Any]:
    model_type = hf_config.get("model_type")
    if not model_type:
        raise ConversionError(f"{source}: no 'model_type' key")
    family = get_family(model_type, source)
    return family, family.config_from_hf(hf_config)


def abstract_params(family: ModelFamily, cfg: Any) -> dict:
    """Shapes and dtypes of the params of ``cfg`` (a pytree of ShapeDtypeStruct), no allocation
    (:meth:`ModelFamily.abstract_params`)."""
    return family.abstract_params(cfg)


def abstract_model_params(family: ModelFamily, cfg: Any) -> dict:
    """:func:`abstract_params` of the encoder plus, when ``cfg`` has one, its sequence
    classification head's (:func:`sense_jax.models.heads.abstract_head_params`; the BERT and
    DeBERTa pooler is one entry, shared): every parameter a converted directory stores."""
    return {**abstract_params(family, cfg), **abstract_head_params(cfg)}


def init_params(family: ModelFamily, cfg: Any, seed: int = 0) -> dict:
    """Randomly initialised params of ``cfg`` (unboxed float32 pytree), deterministic in ``seed``."""
    return family.init_fn(cfg)(jax.random.PRNGKey(seed))


def _strip_prefix(names: list[str], family: ModelFamily) -> dict[str, str]:
    """Map stored names to base-model names: a task model's prefix (``bert.``) stripped, then the
    family's :attr:`~sense_jax.models.ModelFamily.renames` (older releases' names) applied."""
    for prefix in family.base_prefixes:
        if any(n.startswith(prefix) for n in names) and not any(
                n.startswith(("embeddings.", "encoder.")) for n in names):
            return {n: family.rename(n[len(prefix):] if n.startswith(prefix) else n) for n in names}
    return {n: family.rename(n) for n in names}


def _match(rules, name: str) -> tuple[str, Any] | None:
    for rule in rules:
        m = rule.hf_regex().match(name)
        if m:
            path = rule.flax.replace("{i}", m.group("i")) if "i" in m.groupdict() else rule.flax
            return path, rule.transform
    return None


def hf_to_params(family: ModelFamily, cfg: Any, state: dict[str, np.ndarray],
                 file_of: dict[str, Path] | None = None) -> tuple[dict, list[str]]:
    """Map a transformers state dict to our params pytree, checking names and shapes exactly.

    Returns:
      (params, skipped): a nested dict of float32 numpy arrays, and the stored names that were
      skipped as buffers or task heads (``family.ignored``); a sequence classification head is
      converted, not skipped, when ``cfg.num_labels`` > 0 (:mod:`sense_jax.models.heads`).

    Raises:
      ConversionError: a tensor maps to nothing, a parameter is missing, or a shape differs;
        the message names the tensor and its file.
    """
    file_of = file_of or {}
    expected = traverse_util.flatten_dict(abstract_model_params(family, cfg), sep="/")
    base = _strip_prefix(list(state), family)
    ignored = [re.compile(p) for p in family.ignored]
    flat: dict[str, np.ndarray] = {}
    source_of: dict[str, str] = {}
    skipped, unknown = [], []
    for stored, name in base.items():
        where = f"{file_of.get(stored, 'checkpoint')}: tensor {stored!r}"
        hit = _match(family.rules, name)
        if hit is None or hit[0] not in expected:
            if any(p.search(name) for p in ignored):
                skipped.append(stored)
                continue
            unknown.append(where)
            continue
        path, transform = hit
        if path in source_of:  # e.g. both LayerNorm.gamma and LayerNorm.weight stored
            raise ConversionError(f"{where} and tensor {source_of[path]!r} both name parameter "
                                  f"{_hf_name(family, path)!r}; keep one of them")
        source_of[path] = stored
        value = transform.to_flax(np.asarray(state[stored]))
        want = tuple(expected[path].shape)
        if tuple(value.shape) != want:
            raise ConversionError(f"{where} has shape {tuple(state[stored].shape)}, expected "
                                  f"{_hf_shape(transform, want)} for this config")
        if not np.issubdtype(value.dtype, np.floating):
            raise ConversionError(f"{where} has dtype {value.dtype}, expected a float tensor")
        flat[path] = value.astype(np.float32)
    if unknown:
        raise ConversionError("tensors that map to no parameter of this model: " + "; ".join(unknown[:10])
                              + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""))
    missing = sorted(set(expected) - set(flat))
    if missing:
        names = [_hf_name(family, p) for p in missing]
        raise ConversionError(f"checkpoint lacks {len(missing)} tensor(s) the model needs: {names[:10]}")
    return traverse_util.unflatten_dict(flat, sep="/"), skipped


def _hf_shape(transform, flax_shape):
    # Any transform (transpose, conv kernel layout, ...) maps shapes as it maps values.
    return tuple(transform.to_hf(np.empty(flax_shape, np.float32)).shape)


def _hf_name(family: ModelFamily, flax_path: str) -> str:
    for rule in family.rules:
        pattern = "^" + re.escape(rule.flax).replace(r"\{i\}", r"(?P<i>\d+)") + "$"
        m = re.match(pattern, flax_path)
        if m:
            return rule.hf.replace("{i}", m.group("i")) if "i" in m.groupdict() else rule.hf
    return flax_path


def params_to_hf(family: ModelFamily, params: dict) -> dict[str, np.ndarray]:
    """Our params pytree -> transformers' base-model state dict (float32 numpy arrays).

    The inverse of :func:`hf_to_params`: ``params_to_hf(hf_to_params(sd)) == sd`` bit for bit
    (minus skipped buffers and heads). Every param is named, task heads included (a decoder's
    ``lm_head``); a writer of a base-model directory leaves out ``family.head_params`` and states
    float32 in its config.json (:func:`sense_jax.hf_export.export_hf`).
    """
    out = {}
    for path, value in traverse_util.flatten_dict(params, sep="/").items():
        name = _hf_name(family, path)
        if name == path:
            raise ConversionError(f"parameter {path!r} has no transformers name in the {family.name} table")
        rule = _match(family.rules, name)
        out[name] = rule[1].to_hf(np.asarray(jax.device_get(value), dtype=np.float32))
    return out


# --- The converted directory ------------------------------------------------------------------

@dataclasses.dataclass
class Converted:
    """A checkpoint in memory: family, config, float32 params and the source's config.json."""

    family: ModelFamily
    config: Any
    params: dict
    hf_config: dict
    skipped: list[str]
    adapters: list = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def apply_config_overrides(cfg: Any, overrides: dict | None, source: str = "config_overrides") -> Any:
    """``cfg`` with fields replaced by ``overrides`` (e.g. ``{"causal": False}``).

    Raises:
      ConfigError: a key is not a field of the family's config (names it and the fields).
    """
    if not overrides:
        return cfg
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"{source}: unknown config field(s) {unknown} for {type(cfg).__name__}; "
                          f"fields: {sorted(fields)}")
    return dataclasses.replace(cfg, **overrides)


def load_hf(src: str | os.PathLike, *, adapter: Any = None,
            config_overrides: dict | None = None) -> tuple[Converted, Path]:
    """Read and convert a transformers checkpoint (directory or hub id) in memory.

    Args:
      src: transformers model directory or hub id.
      adapter: a PEFT LoRA adapter directory, or a list of them merged in order (LLM2Vec: the
        MNTP adapter, then the supervised one), folded into the base weights before conversion
        (:func:`sense_jax.lora.merge_lora`).
      config_overrides: fields of the family config to replace, e.g. ``{"causal": False}`` to
        run a Llama bidirectionally (LLM2Vec).

    Returns:
      (converted, model_dir); ``converted.adapters`` describes the merged adapters.

    Raises:
      ConversionError: see :func:`read_hf_state_dict`, :func:`hf_to_params` and
        :func:`sense_jax.lora.merge_lora`. ConfigError: an unknown override key.
    """
    model_dir = resolve_source(src)
    hf_config = read_hf_config(model_dir)
    family, cfg = _family_and_config(hf_config, str(model_dir / "config.json"))
    state, file_of = read_hf_state_dict(model_dir)
    adapters_info = []
    if adapter is not None:
        for a in ([adapter] if isinstance(adapter, (str, os.PathLike)) else list(adapter)):
            state, info = merge_lora(state, a, family)
            adapters_info.append(info)
    names = _strip_prefix(list(state), family)
    cfg, notes = _untie_if_stored_apart(family, cfg, state, names, str(model_dir))
    for _, _, flag in family.tied:  # the config.json we write (and exports) then says what holds
        if flag in hf_config and not getattr(cfg, flag, True):
            hf_config = {**hf_config, flag: False}
    base = list(names.values())
    if hasattr(cfg, "add_pooler"):
        cfg = dataclasses.replace(cfg, add_pooler=any(n.startswith("pooler.") for n in base))
    if hasattr(cfg, "adapt_to_checkpoint"):
        cfg = cfg.adapt_to_checkpoint(base)
    if hasattr(cfg, "num_labels"):  # a *ForSequenceClassification checkpoint keeps its head
        cfg = dataclasses.replace(cfg, num_labels=head_labels_for(hf_config, cfg.model_type))
    cfg = apply_config_overrides(cfg, config_overrides)
    params, skipped = hf_to_params(family, cfg, state, file_of)
    for note in notes:
        warnings.warn(note, ConversionNote, stacklevel=2)
    return Converted(family, cfg, params, hf_config, skipped, adapters_info, notes), model_dir


def _untie_if_stored_apart(family: ModelFamily, cfg: Any, state: dict[str, np.ndarray],
                           names: dict[str, str], source: str) -> tuple[Any, list[str]]:
    """Follow the checkpoint where the config ties a head to a tensor but both are stored, apart.

    transformers (5.x, ``PreTrainedModel.tie_weights`` on load) does not tie them then: it keeps
    the stored head and warns. So do we, and say so, rather than run the stored model with another
    head (a Llama's LM head differed by up to 7.5 in logits). Equal tensors stay tied.
    """
    notes = []
    stored = {base: name for name, base in names.items()}
    for head, src, flag in family.tied:
        if not getattr(cfg, flag, False) or head not in stored or src not in stored:
            continue
        a, b = state[stored[head]], state[stored[src]]
        if a.shape == b.shape and np.array_equal(a, b):
            continue
        cfg = dataclasses.replace(cfg, **{flag: False})
        diff = (f"max |difference| {float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()):.4g}"
                if a.shape == b.shape else f"shapes {tuple(a.shape)} and {tuple(b.shape)}")
        notes.append(f"{source}: config.json says {flag}=true but the checkpoint stores "
                     f"{stored[head]!r} apart from {stored[src]!r} ({diff}); following the "
                     f"checkpoint as transformers does: {flag}=false, the stored {stored[head]!r} kept")
    return cfg, notes


def save_params(path: Path, params: dict) -> None:
    """Write a params pytree as an Orbax checkpoint at ``path`` (must not exist)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path.absolute(), params)
        ckptr.wait_until_finished()


def restore_params(path: Path, abstract: dict, sharding: Any = None) -> dict:
    """Restore an Orbax params checkpoint against ``abstract`` (ShapeDtypeStructs).

    Args:
      sharding: a pytree of ``jax.sharding.Sharding`` matching ``abstract`` (or None for the
        default device).

    Raises:
      ConversionError: the checkpoint is missing, partial, or its shapes differ.
    """
    if sharding is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sharding = jax.tree.map(lambda _: dev, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, sharding)
    if not path.is_dir():
        raise ConversionError(f"params checkpoint not found: {path}")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path.absolute(), target)
    except Exception as e:
        raise ConversionError(f"{path}: could not restore params ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files present in ``src`` to ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def is_converted_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a converted model's files and nothing else (what
    ``overwrite`` may replace)."""
    path = Path(path)
    return path.is_dir() and holds_only(path, (METADATA_FILE, "config.json", PARAMS_DIR, *TOKENIZER_FILES),
                                        (METADATA_FILE,))


def write_converted(out: str | os.PathLike, converted: Converted, tokenizer_dir: Path | None,
                    *, source: str, overwrite: bool = False, extra_metadata: dict | None = None) -> Path:
    """Write a converted model directory atomically (nothing appears at ``out`` on failure).

    Raises:
      SenseJaxError: ``out`` exists and not ``overwrite``; ConfigError: ``out`` is a file or a
        directory other than a converted model or an empty one (``overwrite`` never deletes it).
    """
    out = Path(out)
    if overwrite:
        check_replaceable(out, is_converted_dir, "a converted model directory")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        hf_config = dict(converted.hf_config)
        with open(tmp / "config.json", "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        tok_files = copy_tokenizer_files(tokenizer_dir, tmp) if tokenizer_dir else []
        save_params(tmp / PARAMS_DIR, converted.params)
        n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(converted.params))
        write_json_atomic(tmp / METADATA_FILE, {
            "format_version": FORMAT_VERSION,
            "family": converted.family.name,
            "model_type": hf_config.get("model_type"),
            "config": dataclasses.asdict(converted.config),
            "source": source,
            "param_count": n_params,
            "param_dtype": "float32",
            "tokenizer_files": tok_files,
            "skipped_tensors": converted.skipped,
            "merged_adapters": converted.adapters,
            "notes": converted.notes,
            **(extra_metadata or {}),
        })
    return out


def convert(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
            adapter: Any = None, config_overrides: dict | None = None) -> Path:
    """Convert a transformers checkpoint to a sense_jax model directory.

    Args:
      src: local transformers model directory, or a hub id.
      out: output directory; must not exist unless ``overwrite``.
      adapter: PEFT LoRA adapter directory (or list, merged in order) folded into the weights.
      config_overrides: config fields to replace, e.g. ``{"causal": False}``; saved in
        ``sense_jax.json`` so that :func:`sense_jax.load_model` restores them.

    Returns:
      ``out`` as a Path.

    Raises:
      ConversionError / SenseJaxError: bad input, named; nothing is left at ``out``.
    """
    converted, model_dir = load_hf(src, adapter=adapter, config_overrides=config_overrides)
    return write_converted(out, converted, model_dir, source=str(src), overwrite=overwrite)
