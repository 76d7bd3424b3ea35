"""Batched k-means: every token's sense clustering in one jitted array program.

METHOD §1 (Wang et al. 2025, §3.1): each token's sampled hidden states are clustered with k-means
and the centres become its sense embeddings. The reference fits one scikit-learn ``KMeans`` per
token in a Python loop; here the per-token algorithm is written once for a single token
(``[N, D]`` points and an ``[N]`` mask) and ``jax.vmap``-ed over a chunk of tokens ``[T, N, D]``.

Algorithm (per token; mirrors scikit-learn's ``KMeans(init="k-means++", n_init=1,
algorithm="lloyd")``, ``sklearn/cluster/_kmeans.py``):

- **Init**: greedy k-means++ (Arthur & Vassilvitskii 2007, with the greedy candidate trials of
  scikit-learn's ``_kmeans_plusplus``): the first centre is a uniformly drawn point; each next
  centre is the best of ``2 + floor(ln K)`` candidates drawn with probability ∝ D(x)^2 (squared
  distance to the closest chosen centre), "best" meaning the smallest resulting potential.
  When every real point already coincides with a centre (duplicate points, fewer distinct
  points than K), candidates are drawn uniformly instead.
- **Lloyd iterations** (``jax.lax.while_loop``) until the squared centre shift summed over
  clusters is ``<= tol * mean_d var(x[:, d])`` (scikit-learn's tolerance) or ``max_iter``.
- **Empty clusters** are re-seeded with the real points farthest from their assigned centres
  (scikit-learn's ``_relocate_empty_clusters``), the farthest going to the first empty cluster.
- **Final**: a last assignment step; clusters left empty (only possible when the token has fewer
  distinct points than K, i.e. duplicates) are dropped, so ``n_senses`` counts distinct,
  non-empty senses and real centres come first. Inertia is ``sum_i ||x_i - c_{a(i)}||^2`` over
  real points, computed directly (not from the expanded form) for accuracy.
- **Few samples**: a token with ``n <= K`` real points keeps its points as senses
  (``n_senses = n``, inertia 0; METHOD §1).

Distances use ``||x||^2 - 2 x·c + ||c||^2`` (one matmul per step) in float32 at
``Precision.HIGHEST`` whatever the input dtype (bf16/f16 stores are upcast inside the jit).
Masked (padding) points are zeroed before any arithmetic and excluded from every sum, draw and
argmax, so their values (even NaN) cannot change the result.

**Adaptive K** (``adaptive="bic"``): for every candidate ``k in [k_min, K]`` the token is
clustered with ``k`` active clusters and the Bayesian information criterion of a spherical
Gaussian mixture with hard assignments is computed, as in X-means (Pelleg & Moore, "X-means:
Extending K-means with Efficient Estimation of the Number of Clusters", ICML 2000, §2.1)::

    sigma^2 = inertia / (D (n - k))                      (pooled per-dimension variance)
    logL    = sum_j n_j log(n_j / n) - n D / 2 log(2 pi sigma^2) - D (n - k) / 2
    BIC     = logL - p / 2 log n,     p = (k - 1) + k D + 1

and the ``k`` with the largest BIC is kept (ties: the smaller k). All candidates run inside the
same jitted, batched program (``jax.lax.scan`` over k), so cost grows by about
``sum(k_min..K) / K``. The variance is divided by D: the original paper's formula omits it, which
is a known erratum (Kass & Wasserman 1995 give the per-dimension form). Caveat: in high
dimension the likelihood gain of an extra cluster usually dwarfs the ``D/2 log n`` penalty, so
for tokens with many samples BIC tends to choose K; it prunes senses of tokens with few samples
or genuinely fewer modes.

Determinism: given the key, results are bitwise reproducible on a given backend. The driver
:func:`build_sense_dictionary` derives each token's key as ``fold_in(PRNGKey(seed), token_id)``
so a token's draws do not depend on which chunk it lands in. The k-means++ uniforms are drawn
by a separate small program (the threefry RNG is a third of the clustering program's compile
time), so the clustering program compiles once per (chunk size, bucket size) shape; the driver
compiles those shapes ahead of time on a thread pool, overlapping the first chunks' execution.
A persistent XLA cache (``JAX_COMPILATION_CACHE_DIR`` or ``sense-jax cluster --compile-cache``)
removes compilation from later runs.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sense_jax.errors import SenseJaxError

ADAPTIVE_RULES = ("bic",)
_HI = jax.lax.Precision.HIGHEST


class KMeansResult(NamedTuple):
    """Output of :func:`batched_kmeans`.

    Attributes:
      centres: [T, K, D] float32; rows ``>= n_senses[t]`` are padding (zeros).
      n_senses: [T] int32, real senses per token (0 for a token without real points).
      assignments: [T, N] int32 in ``[0, n_senses[t])``, -1 at masked points.
      inertia: [T] float32, sum of squared distances of real points to their centre.
    """

    centres: jax.Array
    n_senses: jax.Array
    assignments: jax.Array
    inertia: jax.Array


def n_local_trials(k: int) -> int:
    """Greedy k-means++ candidates per centre: ``2 + floor(ln k)`` (scikit-learn's default)."""
    return 2 + int(math.log(k)) if k > 1 else 1


# --- single-token building blocks (vmapped over tokens below) -------------------------------

def _sqdist(x: jax.Array, xx: jax.Array, c: jax.Array) -> jax.Array:
    """Squared distances [N, M] of points x [N, D] (norms xx [N]) to c [M, D], f32, >= 0."""
    cc = jnp.sum(c * c, axis=-1)
    xc = jnp.dot(x, c.T, precision=_HI)
    return jnp.maximum(xx[:, None] - 2.0 * xc + cc[None, :], 0.0)


def _draw(u, weights):
    """Indices drawn with probability ∝ weights [N] (>= 0, not all zero) from uniforms u [...]
    in [0, 1): inverse-CDF sampling, as scikit-learn's ``_kmeans_plusplus``."""
    cdf = jnp.cumsum(weights)
    idx = jnp.searchsorted(cdf, u * cdf[-1], side="right", method="compare_all")
    return jnp.minimum(idx, weights.shape[0] - 1)


def _kmeanspp(x, xx, mask, u, k_active, *, k: int):
    """Greedy k-means++ initial centres [k, D] (slots >= k_active left at zero).

    u: [k, L] uniforms in [0, 1): u[0, 0] draws the first centre, u[j] the L candidates of
    centre j (drawn outside the program so the RNG is compiled once per chunk size, not per
    bucket).
    """
    D = x.shape[-1]
    first = _draw(u[0, 0], mask.astype(jnp.float32))
    centres = jnp.zeros((k, D), jnp.float32).at[0].set(x[first])
    closest = jnp.where(mask, _sqdist(x, xx, x[first][None])[:, 0], 0.0)

    def body(j, carry):
        centres, closest = carry
        # Every real point sits on a centre already (duplicates): draw uniformly instead.
        w = jnp.where(jnp.sum(closest) > 0, closest, mask.astype(jnp.float32))
        cand = _draw(u[j], w)
        new_closest = jnp.minimum(closest[:, None], _sqdist(x, xx, x[cand]))  # [N, L]
        potential = jnp.sum(jnp.where(mask[:, None], new_closest, 0.0), axis=0)
        best = jnp.argmin(potential)
        active = j < k_active
        centres = centres.at[j].set(jnp.where(active, x[cand[best]], centres[j]))
        closest = jnp.where(active & mask, new_closest[:, best], closest)
        return centres, closest

    centres, _ = jax.lax.fori_loop(1, k, body, (centres, closest))
    return centres


def _assign(x, xx, centres, active):
    d = jnp.where(active[None, :], _sqdist(x, xx, centres), jnp.inf)
    return jnp.argmin(d, axis=-1).astype(jnp.int32), jnp.min(d, axis=-1)


def _lloyd_step(x, xx, mask, centres, active):
    """One Lloyd iteration for one token: assign, average, re-seed empty clusters. [k, D]."""
    k = centres.shape[0]
    a, dmin = _assign(x, xx, centres, active)
    onehot = ((a[:, None] == jnp.arange(k)[None, :]) & mask[:, None]).astype(jnp.float32)
    counts = jnp.sum(onehot, axis=0)
    new = jnp.dot(onehot.T, x, precision=_HI) / jnp.maximum(counts, 1.0)[:, None]
    new = jnp.where(active[:, None], new, centres)
    # Empty clusters (rare) take the farthest points, the farthest to the first empty cluster.
    # A while loop rather than a top_k: under vmap it runs as many rounds as the most empty
    # clusters of any token in the chunk, usually none, where a top_k would sort every time.
    def relocate(carry):
        new, far, empty = carry
        j, i = jnp.argmax(empty), jnp.argmax(far)
        return new.at[j].set(x[i]), far.at[i].set(-1.0), empty.at[j].set(False)

    empty = (counts == 0) & active
    new, _, _ = jax.lax.while_loop(lambda c: jnp.any(c[2]), relocate,
                                   (new, jnp.where(mask, dmin, -1.0), empty))
    return new


def _kmeans_one(x, mask, u, k_active, init, max_iter, tol, *, k: int, has_init: bool):
    """k-means of one token with ``k_active <= k`` clusters. x [N, D] f32 (zeroed at padding).

    A token with ``n <= k`` real points keeps them as senses whatever ``k_active`` is.
    """
    N, D = x.shape
    xx = jnp.sum(x * x, axis=-1)
    n = jnp.sum(mask)
    nf = jnp.maximum(n, 1).astype(jnp.float32)
    mean = jnp.sum(x, axis=0) / nf
    mean_var = jnp.maximum(jnp.sum(xx) / nf - jnp.sum(mean * mean), 0.0) / D
    tol_abs = tol * mean_var
    active = jnp.arange(k) < k_active

    if N <= k:  # static: every token of this shape keeps its samples
        centres, n_iter = jnp.zeros((k, D), jnp.float32), jnp.int32(0)
    else:
        centres = init if has_init else _kmeanspp(x, xx, mask, u, k_active, k=k)

        def cond(s):
            return (s[1] < max_iter) & (s[2] > tol_abs)

        def body(s):
            c, it, _ = s
            new = _lloyd_step(x, xx, mask, c, active)
            return new, it + 1, jnp.sum((new - c) ** 2)

        centres, n_iter, _ = jax.lax.while_loop(cond, body, (centres, jnp.int32(0), jnp.float32(jnp.inf)))

    a, _ = _assign(x, xx, centres, active)
    counts = jnp.sum((a[:, None] == jnp.arange(k)[None, :]) & mask[:, None], axis=0)
    nonempty = (counts > 0) & active
    # Real, non-empty senses first, in cluster order (a stable compaction by cumsum, no sort).
    n_senses = jnp.sum(nonempty).astype(jnp.int32)
    pos = jnp.where(nonempty, jnp.cumsum(nonempty) - 1, n_senses + jnp.cumsum(~nonempty) - 1)
    centres = jnp.zeros_like(centres).at[pos].set(jnp.where(nonempty[:, None], centres, 0.0))
    counts = jnp.zeros_like(counts).at[pos].set(counts)
    a = jnp.where(mask, pos[a], -1).astype(jnp.int32)
    inertia = jnp.sum(jnp.where(mask, jnp.sum((x - centres[jnp.maximum(a, 0)]) ** 2, axis=-1), 0.0))

    # Tokens with n <= k keep their samples: real points moved to the front, in order.
    small_a = jnp.where(mask, jnp.cumsum(mask) - 1, -1).astype(jnp.int32)
    small_centres = jnp.zeros((k, D), jnp.float32).at[jnp.where(mask, small_a, k)].set(x, mode="drop")
    small_counts = (jnp.arange(k) < n).astype(counts.dtype)

    small = n <= k  # K (K_max when adaptive): METHOD §1 keeps the samples themselves
    return dict(
        centres=jnp.where(small, small_centres, centres),
        n_senses=jnp.where(small, n, n_senses).astype(jnp.int32),
        assignments=jnp.where(small, small_a, a),
        inertia=jnp.where(small, 0.0, inertia),
        counts=jnp.where(small, small_counts, counts).astype(jnp.int32),
        n_iter=jnp.where(small, 0, n_iter),
    )


def _bic(res, n, D):
    """X-means BIC of one token's hard clustering (see the module docstring)."""
    k = res["n_senses"].astype(jnp.float32)
    nf = jnp.maximum(n, 1).astype(jnp.float32)
    dof = jnp.maximum(nf - k, 1.0)
    var = jnp.maximum(res["inertia"] / (D * dof), 1e-30)
    cnt = res["counts"].astype(jnp.float32)
    ll = (jnp.sum(jnp.where(cnt > 0, cnt * jnp.log(jnp.maximum(cnt, 1.0) / nf), 0.0))
          - nf * D / 2 * jnp.log(2 * jnp.pi * var) - D * dof / 2)
    p = (k - 1) + k * D + 1
    return ll - p / 2 * jnp.log(nf)


def _token_uniforms(key, *, k: int, adaptive: str | None, k_min: int):
    """One token's k-means++ uniforms [C, k, L]: C = 1, or one block per adaptive candidate
    k_c in [k_min, k] drawn from ``fold_in(key, k_c)``."""
    shape = (k, n_local_trials(k))
    if adaptive is None:
        return jax.random.uniform(key, shape)[None]
    return jax.vmap(lambda kc: jax.random.uniform(jax.random.fold_in(key, kc), shape))(
        jnp.arange(k_min, k + 1, dtype=jnp.int32))


@jax.jit(static_argnames=("k", "adaptive", "k_min"))
def _uniforms(keys, *, k, adaptive, k_min):
    """[T, C, k, L] uniforms from per-token keys [T]."""
    return jax.vmap(lambda kt: _token_uniforms(kt, k=k, adaptive=adaptive, k_min=k_min))(keys)


@jax.jit(static_argnames=("k", "adaptive", "k_min"))
def _uniforms_by_id(root, token_ids, *, k, adaptive, k_min):
    """[T, C, k, L] uniforms of tokens ``token_ids`` [T], token t's key ``fold_in(root, t)``."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(root, token_ids)
    return _uniforms(keys, k=k, adaptive=adaptive, k_min=k_min)


def _token_program(x, mask, u, init, max_iter, tol, *, k: int, adaptive: str | None,
                   k_min: int, has_init: bool):
    x = jnp.where(mask[:, None], x.astype(jnp.float32), 0.0)
    if adaptive is None:
        return _kmeans_one(x, mask, u[0], k, init, max_iter, tol, k=k, has_init=has_init)
    n = jnp.sum(mask)
    D = x.shape[-1]

    def one(kc, uc):
        r = _kmeans_one(x, mask, uc, kc, init, max_iter, tol, k=k, has_init=has_init)
        return r, _bic(r, n, D)

    best, best_bic = one(jnp.int32(k_min), u[0])

    def step(carry, xs):
        best, best_bic = carry
        r, b = one(*xs)
        better = b > best_bic
        best = jax.tree.map(lambda new, old: jnp.where(better, new, old), r, best)
        return (best, jnp.where(better, b, best_bic)), None

    (best, _), _ = jax.lax.scan(step, (best, best_bic),
                                (jnp.arange(k_min + 1, k + 1, dtype=jnp.int32), u[1:]))
    return best


@jax.jit(static_argnames=("k", "adaptive", "k_min", "has_init"))
def _batched(x, mask, u, init, max_iter, tol, *, k, adaptive, k_min, has_init):
    """The batched program: x [T, N, D], mask [T, N], u [T, C, k, L] uniforms, init [T, k, D]."""
    fn = lambda xt, mt, ut, it: _token_program(xt, mt, ut, it, max_iter, tol, k=k,
                                               adaptive=adaptive, k_min=k_min, has_init=has_init)
    return jax.vmap(fn)(x, mask, u, init)


def _as_token_keys(key, T: int) -> jax.Array:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.split(key, T) if key.ndim == 0 else key
    if key.ndim == 1:  # raw uint32 [2] key
        return jax.random.split(key, T)
    return key


def validate_k(k: Any, *, adaptive: str | None = None, k_min: int = 1) -> int:
    """Check the K rule; returns int k. Raises SenseJaxError for K < 1, unknown rule, bad k_min."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SenseJaxError(f"k must be an integer >= 1, got {k!r}")
    if adaptive is not None and adaptive not in ADAPTIVE_RULES:
        raise SenseJaxError(f"unknown adaptive rule {adaptive!r}; choose from {ADAPTIVE_RULES}")
    if isinstance(k_min, bool) or not isinstance(k_min, (int, np.integer)) or not 1 <= k_min <= k:
        raise SenseJaxError(f"k_min must be an integer in [1, k={k}], got {k_min!r}")
    return int(k)


def kmeans_detailed(x, mask, k: int, *, key, max_iter: int = 100, tol: float = 1e-4,
                    adaptive: str | None = None, k_min: int = 1, init=None,
                    check_finite: bool = True) -> dict[str, jax.Array]:
    """:func:`batched_kmeans` plus ``counts`` [T, K] int32 (points per sense) and ``n_iter`` [T]."""
    k = validate_k(k, adaptive=adaptive, k_min=k_min)
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise SenseJaxError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise SenseJaxError(f"tol must be a finite number >= 0, got {tol!r}")
    x = jnp.asarray(x)
    mask = jnp.asarray(mask, bool)
    if x.ndim != 3 or mask.shape != x.shape[:2]:
        raise SenseJaxError(f"batched_kmeans expects x [T, N, D] and mask [T, N]; got {x.shape}, {mask.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise SenseJaxError(f"batched_kmeans expects floating x, got {x.dtype}")
    T, N, D = x.shape
    if check_finite and not isinstance(x, jax.core.Tracer):
        bad = np.asarray(jnp.any(~jnp.isfinite(x) & mask[..., None], axis=(1, 2)))
        if bad.any():
            raise SenseJaxError(f"token row {int(np.flatnonzero(bad)[0])} of the batch has NaN or inf "
                                "vectors; refusing to cluster")
    has_init = init is not None
    if has_init:
        init = jnp.asarray(init, jnp.float32)
        if init.shape != (T, k, D):
            raise SenseJaxError(f"init must be [T, K, D] = {(T, k, D)}, got {init.shape}")
    else:
        init = jnp.zeros((T, 1, 1), jnp.float32)  # unused placeholder
    statics = dict(k=k, adaptive=adaptive, k_min=int(k_min))
    u = _uniforms(_as_token_keys(key, T), **statics)
    return _batched(x, mask, u, init, jnp.int32(max_iter), jnp.float32(tol), **statics, has_init=has_init)


def batched_kmeans(x, mask, k: int, *, key, max_iter: int = 100, tol: float = 1e-4,
                   adaptive: str | None = None, k_min: int = 1, init=None,
                   check_finite: bool = True) -> KMeansResult:
    """k-means of many tokens' samples at once (one jitted, vmapped program).

    Args:
      x: [T, N, D] samples, any float dtype (distances are computed in float32).
      mask: [T, N] bool, True at real samples; masked values never affect the result.
      k: K (or K_max with ``adaptive``), >= 1.
      key: a PRNG key (split into one key per token) or [T] per-token keys.
      max_iter: Lloyd iteration cap. tol: stop when the summed squared centre shift is
        ``<= tol * mean per-dimension variance`` of the token's points (scikit-learn's rule).
      adaptive: None (fixed K) or ``"bic"`` (per-token K_t in [k_min, k] by X-means BIC; see the
        module docstring).
      k_min: smallest K_t the adaptive rule may pick.
      init: optional [T, K, D] initial centres (skips k-means++; for testing against
        scikit-learn started from the same centres).
      check_finite: refuse NaN/inf among real samples (needs concrete ``x``; one device sync).

    Returns:
      :class:`KMeansResult` (centres [T, K, D] f32, n_senses [T] int32, assignments [T, N]
      int32 with -1 at masked points, inertia [T] f32).

    Raises:
      SenseJaxError: K < 1, bad shapes, an unknown rule, or NaN/inf samples (naming the row).
    """
    r = kmeans_detailed(x, mask, k, key=key, max_iter=max_iter, tol=tol, adaptive=adaptive,
                        k_min=k_min, init=init, check_finite=check_finite)
    return KMeansResult(r["centres"], r["n_senses"], r["assignments"], r["inertia"])


# --- the codebook driver: a store in, a SenseDictionary out ----------------------------------

def bucket_size(n: int, minimum: int = 16) -> int:
    """Padded sample count for a token with ``n`` samples: the smallest ``minimum * sqrt(2)^i``
    (rounded up to a multiple of 8) that holds ``n``.

    Token counts are Zipfian, so padding everyone to the largest count would waste ~10x; these
    geometric buckets waste at most ~45% and on average under 20%, with two compiled shapes per
    octave (16, 24, 32, 48, 64, 96, 128, 184, 256, 368, 512, 728, 1024 for ``minimum=16``).
    """
    i = 0
    while (size := int(math.ceil(minimum * math.sqrt(2) ** i / 8 - 1e-6) * 8)) < n:
        i += 1
    return size


def store_fingerprint(store) -> str:
    """sha256 of the store's metadata and offsets/counts arrays (identifies the sample set cheaply)."""
    import json

    h = hashlib.sha256(json.dumps(store.meta, sort_keys=True).encode())
    h.update(np.ascontiguousarray(store.offsets, np.int64).tobytes())
    h.update(np.ascontiguousarray(store.counts, np.int64).tobytes())
    h.update(str(store.vectors.shape).encode())
    return h.hexdigest()


def default_chunk_tokens(n_pad: int, hidden_size: int, k: int, memory_budget: int = 1 << 30,
                         cache_bytes: int = 2 << 20) -> int:
    """Tokens per k-means chunk for samples padded to ``n_pad``.

    On CPU the Lloyd step is memory-bound unless a chunk's points stay in cache, so chunks hold
    about ``cache_bytes`` of f32 points (a power of two, >= 1): measured on all-MiniLM-L6-v2
    vectors, 2 tokens x 1024 samples run ~3x faster than 16 x 1024. Elsewhere (GPU/TPU) chunks
    are as large as ``memory_budget`` allows (<= 1024 tokens) for parallelism.
    """
    if jax.default_backend() == "cpu":
        return 1 << max(int(cache_bytes // (4 * n_pad * hidden_size)).bit_length() - 1, 0)
    per_token = 4 * n_pad * hidden_size * 4 + 8 * n_pad * k * 4  # x (storage + f32 copies) + [N, K]
    return max(1, min(1024, memory_budget // per_token))


_COMPILED: dict[tuple, Any] = {}  # (T, N, D, dtype, k, adaptive, k_min, backend) -> executable


def _check_finite_rows(vectors: np.ndarray, token_ids: np.ndarray, starts: np.ndarray,
                       lengths: np.ndarray, where: str) -> None:
    """Raise naming the first token whose rows hold NaN/inf. vectors are the gathered rows."""
    bad = ~np.isfinite(np.asarray(vectors, np.float32)).all(axis=-1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        i = int(np.searchsorted(starts, row, side="right") - 1)
        raise SenseJaxError(f"{where}: token {int(token_ids[i])} has NaN or inf vectors "
                            f"(sample {row - int(starts[i])} of {int(lengths[i])}); refusing to cluster")


def build_sense_dictionary(store, k: int, *, seed: int = 0, adaptive: str | None = None,
                           k_min: int = 1, max_iter: int = 100, tol: float = 1e-4,
                           chunk_tokens: int | None = None, memory_budget: int = 1 << 30,
                           dtype: str = "float32", metric: str = "dot", base=None,
                           progress: bool = True):
    """Cluster every token of an extraction store into senses (METHOD §1).

    Tokens with ``n_t <= k`` samples keep their samples as senses (no clustering). The others
    are grouped by padded sample count (:func:`bucket_size`) so padding stays small under
    Zipfian counts, and each bucket is clustered in chunks by :func:`kmeans_detailed`; the next
    chunk is gathered from the (memory-mapped) store while the previous one runs.

    Args:
      store: a :class:`sense_jax.store.Store` (or a path, opened with ``open_store``).
      k: K, or K_max with ``adaptive``; >= 1.
      seed: token t's k-means++ draws use ``fold_in(PRNGKey(seed), t)``.
      adaptive: None or ``"bic"`` (see the module docstring). k_min: smallest adaptive K_t.
      max_iter, tol: Lloyd cap and tolerance (scikit-learn's meaning).
      chunk_tokens: tokens per chunk; default :func:`default_chunk_tokens` (cache-sized on CPU,
        ``memory_budget``-sized on accelerators).
      dtype: storage dtype of the centres, "float32" | "bfloat16" | "float16".
      metric: look-up metric recorded in the metadata ("dot" | "cos" | "l2").
      base: optional :class:`SenseDictionary` to add to: the store's tokens replace its entries.
      progress: show a tqdm progress bar.

    Returns:
      :class:`sense_jax.sense_dict.SenseDictionary` over the store's vocabulary, its metadata
      holding the teacher, hidden size, metric, K rule, seed, store fingerprint and build stats
      (``tokens``, ``tokens_clustered``, ``senses``, ``mean_inertia`` over clustered tokens).

    Raises:
      SenseJaxError: K < 1, unknown rule/dtype/metric, NaN/inf vectors (naming the token id),
        or a ``base`` of another width / vocabulary.
    """
    from tqdm.auto import tqdm

    from sense_jax.sense_dict import DTYPES, METRICS, SenseDictionary
    from sense_jax.store import Store, open_store

    k = validate_k(k, adaptive=adaptive, k_min=k_min)
    if dtype not in DTYPES:
        raise SenseJaxError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    if metric not in METRICS:
        raise SenseJaxError(f"unknown metric {metric!r}; choose from {METRICS}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise SenseJaxError(f"chunk_tokens must be an integer >= 1, got {chunk_tokens!r}")
    if not isinstance(store, Store):
        store = open_store(store)
    V, D = store.vocab_size, store.hidden_size
    if base is not None and (base.hidden_size != D or base.vocab_size != V):
        raise SenseJaxError(f"cannot add store {store.path} (width {D}, vocabulary {V}) to a dictionary "
                            f"of width {base.hidden_size}, vocabulary {base.vocab_size} "
                            "(a store from another teacher?)")
    offsets = np.asarray(store.offsets, np.int64)
    n = np.diff(offsets)
    tokens = np.flatnonzero(n > 0)
    small = tokens[n[tokens] <= k]
    big = tokens[n[tokens] > k]
    senses: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    inertia: dict[int, float] = {}

    # Few samples: the samples are the senses (one store read for all of them).
    if small.size:
        rows = np.concatenate([np.arange(offsets[t], offsets[t + 1]) for t in small])
        vec = np.asarray(store.vectors[rows])
        starts = np.concatenate([[0], np.cumsum(n[small])[:-1]])
        _check_finite_rows(vec, small, starts, n[small], str(store.path))
        for t, s0 in zip(small, starts):
            senses[int(t)] = (vec[s0:s0 + n[t]].astype(np.float32), np.ones(n[t], np.int64))

    root = jax.random.key(seed)
    sizes = np.array([bucket_size(int(c), minimum=max(16, k + 1)) for c in n[big]], np.int64)
    chunks = []  # (N, token ids, T)
    for size in np.unique(sizes):
        members = big[sizes == size]
        cap = chunk_tokens or default_chunk_tokens(int(size), D, k, memory_budget)
        # One program per bucket: a bucket that fits one chunk is padded to a power of two,
        # the last chunk of a larger bucket to the full chunk size.
        T = cap if members.size > cap else min(cap, 1 << int(math.ceil(math.log2(members.size))))
        for i in range(0, members.size, cap):
            chunks.append((int(size), members[i:i + cap], T))

    # Compile every distinct (T, N) program ahead of time on a thread pool (XLA compiles without
    # the GIL), so compilation runs in parallel and overlaps the first chunks' execution.
    statics = dict(k=k, adaptive=adaptive, k_min=int(k_min))
    scalars = (jnp.int32(max_iter), jnp.float32(tol))

    def compile_shape(T, N):
        cache_key = (T, N, D, str(store.vectors.dtype), k, adaptive, int(k_min), jax.default_backend())
        if cache_key not in _COMPILED:  # AOT compiles bypass jit's cache: keep our own
            C = 1 if adaptive is None else k - k_min + 1
            spec = (jax.ShapeDtypeStruct((T, N, D), store.vectors.dtype), jax.ShapeDtypeStruct((T, N), bool),
                    jax.ShapeDtypeStruct((T, C, k, n_local_trials(k)), jnp.float32),
                    jax.ShapeDtypeStruct((T, 1, 1), jnp.float32), *scalars)
            _COMPILED[cache_key] = _batched.lower(*spec, **statics, has_init=False).compile()
        return _COMPILED[cache_key]

    shapes = list(dict.fromkeys((T, N) for N, _, T in chunks))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(shapes), os.cpu_count() or 1, 8)))
    programs = {shape: pool.submit(compile_shape, *shape) for shape in shapes}

    # Every clustered token's k-means++ uniforms up front, in fixed-size blocks (one RNG compile).
    block = 4096
    u_all = np.concatenate([np.asarray(_uniforms_by_id(
        root, np.pad(big[i:i + block], (0, max(0, block - big[i:i + block].size))).astype(np.uint32),
        **statics))[:big[i:i + block].size] for i in range(0, big.size, block)]
        or [np.zeros((0, 1 if adaptive is None else k - k_min + 1, k, n_local_trials(k)), np.float32)])
    u_row = {int(t): i for i, t in enumerate(big)}

    def gather(size, ids, T):
        x = np.zeros((T, size, D), store.vectors.dtype)
        mask = np.zeros((T, size), bool)
        for i, t in enumerate(ids):
            x[i, :n[t]] = store.vectors[offsets[t]:offsets[t + 1]]
            mask[i, :n[t]] = True
        _check_finite_rows(x[:ids.size].reshape(-1, D)[mask[:ids.size].reshape(-1)], ids,
                           np.concatenate([[0], np.cumsum(n[ids])[:-1]]), n[ids], str(store.path))
        u = np.zeros((T, *u_all.shape[1:]), np.float32)
        u[:ids.size] = u_all[[u_row[int(t)] for t in ids]]
        return programs[(T, size)].result()(x, mask, u, np.zeros((T, 1, 1), np.float32), *scalars)

    def collect(ids, res):
        res = jax.device_get(res)
        for i, t in enumerate(ids):
            m = int(res["n_senses"][i])
            senses[int(t)] = (res["centres"][i, :m], res["counts"][i, :m].astype(np.int64))
            inertia[int(t)] = float(res["inertia"][i])

    bar = tqdm(total=int(big.size), desc="k-means", unit="tok", disable=not progress or not big.size)
    try:
        pending = None
        for size, ids, T in chunks:
            res = gather(size, ids, T)  # dispatched asynchronously
            if pending is not None:
                collect(*pending)
                bar.update(pending[0].size)
            pending = (ids, res)
        if pending is not None:
            collect(*pending)
            bar.update(pending[0].size)
    finally:
        bar.close()
        for f in programs.values():
            f.cancel()
        pool.shutdown(wait=True)

    counts_per_token = np.zeros(V, np.int64)
    for t, (c, _) in senses.items():
        counts_per_token[t] = c.shape[0]
    new_offsets = np.concatenate([[0], np.cumsum(counts_per_token)])
    order = sorted(senses)
    centres = np.concatenate([senses[t][0] for t in order] or [np.zeros((0, D), np.float32)])
    counts = np.concatenate([senses[t][1] for t in order] or [np.zeros(0, np.int64)])
    meta = {
        "teacher": store.meta.get("teacher"),
        "teacher_fingerprint": store.meta.get("teacher_fingerprint"),
        "layer": store.meta.get("layer"),
        "hidden_size": D,
        "metric": metric,
        "k_rule": {"k": k, "adaptive": adaptive, "k_min": k_min if adaptive else None,
                   "max_iter": max_iter, "tol": tol, "init": "greedy k-means++"},
        "seed": seed,
        "store": str(store.path),
        "store_fingerprint": store_fingerprint(store),
        "stats": {"tokens": int(tokens.size), "tokens_clustered": int(big.size),
                  "senses": int(centres.shape[0]),
                  "mean_inertia": float(np.mean(list(inertia.values()))) if inertia else 0.0},
    }
    out = SenseDictionary.from_arrays(centres.astype(DTYPES[dtype]), new_offsets, counts, meta)
    return base.merged(out) if base is not None else out
