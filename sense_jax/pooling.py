"""Sentence pooling of token states, the modes LLM2Vec uses, correct for left and right padding.

LLM2Vec (BehnamGhader et al. 2024, ``llm2vec/llm2vec.py`` ``get_pooling``) pools the last
layer of a (bidirectional) decoder with one of:

* ``mean``: average of the real tokens' states;
* ``weighted_mean``: position-weighted average, the i-th real token (1-based) weighted
  ``i / sum(1..n)`` (Muennighoff 2022, SGPT);
* ``last_token`` (alias ``eos_token``): the state of the last real token;
* ``first_token`` (alias ``bos_token`` / ``cls``): the first real token (BERT's [CLS]).

LLM2Vec assumes left padding (``h[i, -n:]``); these functions read the attention mask
instead, so either padding side gives the same result. ``pool_mask`` restricts pooling to a
subset of real tokens (LLM2Vec's ``embed_mask`` that skips instruction tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sense_jax.errors import ConfigError

MODES = ("mean", "weighted_mean", "last_token", "first_token")
_ALIASES = {"eos_token": "last_token", "bos_token": "first_token", "cls": "first_token"}


def canonical_mode(mode: str) -> str:
    """The canonical name of a pooling mode (ConfigError naming it if unknown)."""
    mode = _ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ConfigError(f"unknown pooling mode {mode!r}; supported: {list(MODES) + sorted(_ALIASES)}")
    return mode


def pool(hidden_states: jax.Array, attention_mask: jax.Array, mode: str = "mean",
         pool_mask: jax.Array | None = None) -> jax.Array:
    """Pool token states [B, T, D] to sentence vectors [B, D] float32.

    Args:
      hidden_states: [B, T, D] any float dtype (accumulated in float32).
      attention_mask: [B, T], 1 for real tokens, 0 for padding (either side).
      mode: one of :data:`MODES` (or the aliases eos_token, bos_token, cls).
      pool_mask: optional [B, T]; tokens to pool over among the real ones (default all).

    Returns:
      [B, D] float32. A row with no token to pool gives zeros.

    Raises:
      ConfigError: unknown ``mode``.
    """
    mode = canonical_mode(mode)
    m = attention_mask.astype(bool)
    if pool_mask is not None:
        m = m & pool_mask.astype(bool)
    h = hidden_states.astype(jnp.float32)
    mf = m.astype(jnp.float32)
    T = h.shape[1]
    if mode == "mean":
        w = mf / jnp.maximum(mf.sum(axis=1, keepdims=True), 1.0)
    elif mode == "weighted_mean":
        w = jnp.cumsum(mf, axis=1) * mf
        w = w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-9)
    else:
        idx = jnp.arange(T)
        if mode == "last_token":
            pick = jnp.max(jnp.where(m, idx, -1), axis=1)
        else:
            pick = jnp.min(jnp.where(m, idx, T), axis=1)
        w = ((idx[None, :] == pick[:, None]) & m).astype(jnp.float32)
    return jnp.einsum("BT,BTD->BD", w, h)
