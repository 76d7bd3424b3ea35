"""Batched k-means: every token's sense clustering in one jitted array program.

METHOD §1 (Wang et al. 2025, §3.1): each token's sampled hidden states are clustered with k-means
and the centres become its sense embeddings. The reference fits one scikit-learn ``KMeans`` per
token in a Python loop; here the per-token algorithm is written once for a single token
(``[N, D]`` points and an ``[N]`` mask) and mapped over a chunk of tokens ``[T, N, D]`` inside one
jitted program, the chunk's token axis sharded over the devices.

Execution (how the token axis is walked; the arithmetic per token is the same):

- ``loop="vmap"`` (accelerators): the T tokens run in lockstep, every op batched over them;
  each while loop runs as long as its slowest token's.
- ``loop="map"`` (the CPU default): ``jax.lax.map`` runs the tokens one after another (small
  tokens in groups of up to 4, :func:`map_batch_size`): each token stops at its own iteration
  count, ``lax.cond`` branches are really skipped and a token's points stay in cache. On 2 CPU
  cores this is 1.5-2.5x faster than vmap per token.
- Devices: the driver lays each chunk out on a 1-D mesh ``("tokens",)`` and runs the program
  under ``jax.shard_map`` (tokens are independent: no collectives). On CPU, XLA runs these
  programs on about one core each, so one CPU device per core
  (``jax.config.update("jax_num_cpu_devices", n)`` before JAX starts; ``sense-jax cluster``
  does it) is what puts every core to work.

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
- **Final**: a last assignment step; the points of a centre exactly equal to an earlier one
  (re-seeded clusters on copies of one point) go to the earlier one; clusters left empty (only
  possible when the token has fewer distinct points than K, i.e. duplicates) are dropped, so
  ``n_senses`` counts distinct, non-empty senses and real centres come first. Inertia is
  ``sum_i ||x_i - c_{a(i)}||^2`` over real points, computed directly (not from the expanded
  form) for accuracy.
- **Few samples**: a token with ``n <= K`` real points keeps its distinct points as senses
  (METHOD §1), each with the count of its copies (``n_senses`` = distinct points, inertia 0):
  two equal senses would get equal SKD logits.
- **Overflow**: a real point whose squared norm is not finite in float32 (NaN, inf, or
  ``|x|`` above ~1.8e19) is refused: its distances would be inf and the point silently lost.

Distances use ``||x||^2 - 2 x·c + ||c||^2`` (one matmul per step, taken as ``c @ x.T`` ->
[K, N] with the points on the minor axis, 1.3-1.5x faster on CPU than ``x @ c.T``) in float32 at
``Precision.HIGHEST`` whatever the input dtype (bf16/f16 stores are upcast inside the jit).
Rows are moved with one-hot matmuls rather than [N, D] gathers and scatters (slow on CPU).
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
so a token's draws do not depend on which chunk it lands in; with ``loop="map"`` a token's
arithmetic does not depend on its chunk either, so the dictionary is the same, byte for byte,
whatever the device count or chunk size (tested: 1 and 2 CPU devices). The k-means++ uniforms
are drawn by a separate small program (the threefry RNG is a third of the clustering program's
compile time), so the clustering program compiles once per (chunk size, bucket size) shape; the
driver compiles those shapes ahead of time on a thread pool. Compilation (~1 s per shape, about
12 shapes for K=10 and up to 1000 samples) dominates small builds; the persistent XLA cache,
which :func:`build_sense_dictionary` turns on (:func:`sense_jax.compile_cache.enable_compile_cache`),
removes it from later runs.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sense_jax.errors import SenseJaxError
from sense_jax.provenance import provenance

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

class _Points(NamedTuple):
    """One token's points in both layouts: x [N, D] and xt = x.T [D, N] (f32, zero at padding),
    squared norms xx [N] and mask [N]. Distances are taken as ``c @ xt`` -> [M, N], points on
    the minor axis: on CPU this runs a Lloyd step 1.3-1.5x faster than ``x @ c.T`` -> [N, M]
    (measured at N = 24-1024, D = 384, K = 10)."""

    x: jax.Array
    xt: jax.Array
    xx: jax.Array
    mask: jax.Array


def _sqdist(p: _Points, c: jax.Array) -> jax.Array:
    """Squared distances [M, N] of centres c [M, D] to the points, f32, >= 0."""
    cc = jnp.sum(c * c, axis=-1)
    return jnp.maximum(cc[:, None] - 2.0 * jnp.dot(c, p.xt, precision=_HI) + p.xx[None, :], 0.0)


def _draw(u, weights):
    """Indices drawn with probability ∝ weights [N] (>= 0, not all zero) from uniforms u [...]
    in [0, 1): inverse-CDF sampling, as scikit-learn's ``_kmeans_plusplus``."""
    cdf = jnp.cumsum(weights)
    idx = jnp.searchsorted(cdf, u * cdf[-1], side="right", method="scan")
    return jnp.minimum(idx, weights.shape[0] - 1)


def _kmeanspp(p: _Points, u, k_active, *, k: int):
    """Greedy k-means++ initial centres [k, D] (slots >= k_active left at zero).

    u: [k, L] uniforms in [0, 1): u[0, 0] draws the first centre, u[j] the L candidates of
    centre j (drawn outside the program so the RNG is compiled once per chunk size, not per
    bucket).
    """
    D = p.x.shape[-1]
    real = p.mask.astype(jnp.float32)
    first = _draw(u[0, 0], real)
    centres = jnp.zeros((k, D), jnp.float32).at[0].set(p.x[first])
    closest = jnp.where(p.mask, _sqdist(p, p.x[first][None])[0], 0.0)

    def body(j, carry):
        centres, closest = carry
        # Every real point sits on a centre already (duplicates): draw uniformly instead.
        w = jnp.where(jnp.sum(closest) > 0, closest, real)
        cand = _draw(u[j], w)
        new_closest = jnp.minimum(closest[None, :], _sqdist(p, p.x[cand]))  # [L, N]
        potential = jnp.sum(jnp.where(p.mask[None, :], new_closest, 0.0), axis=1)
        best = jnp.argmin(potential)
        active = j < k_active
        centres = centres.at[j].set(jnp.where(active, p.x[cand[best]], centres[j]))
        closest = jnp.where(active & p.mask, new_closest[best], closest)
        return centres, closest

    centres, _ = jax.lax.fori_loop(1, k, body, (centres, closest))
    return centres


def _assign(p: _Points, centres, active):
    """Nearest active centre of every point: (assignment [N] int32, squared distance [N])."""
    d = jnp.where(active[:, None], _sqdist(p, centres), jnp.inf)
    return jnp.argmin(d, axis=0).astype(jnp.int32), jnp.min(d, axis=0)


def _lloyd_step(p: _Points, centres, active, spherical: bool = False):
    """One Lloyd iteration for one token: assign, average, re-seed empty clusters. [k, D].
    ``spherical``: the points are unit vectors and each mean is scaled back to unit length (its
    direction), so that nearest centre = highest cosine (Dhillon & Modha 2001)."""
    k = centres.shape[0]
    a, dmin = _assign(p, centres, active)
    onehot = ((a[None, :] == jnp.arange(k)[:, None]) & p.mask[None, :]).astype(jnp.float32)  # [k, N]
    counts = jnp.sum(onehot, axis=1)
    new = jnp.dot(onehot, p.x, precision=_HI) / jnp.maximum(counts, 1.0)[:, None]
    if spherical:
        new = new / jnp.maximum(jnp.linalg.norm(new, axis=-1, keepdims=True), 1e-12)
    new = jnp.where(active[:, None], new, centres)
    # Empty clusters (rare) take the farthest points, the farthest to the first empty cluster.
    # A while loop rather than a top_k: under vmap it runs as many rounds as the most empty
    # clusters of any token in the chunk, usually none, where a top_k would sort every time.
    def relocate(carry):
        new, far, empty = carry
        j, i = jnp.argmax(empty), jnp.argmax(far)
        return new.at[j].set(p.x[i]), far.at[i].set(-1.0), empty.at[j].set(False)

    empty = (counts == 0) & active
    new, _, _ = jax.lax.while_loop(lambda c: jnp.any(c[2]), relocate,
                                   (new, jnp.where(p.mask, dmin, -1.0), empty))
    return new


def _first_equal(c, valid):
    """For each row j of c [k, D], the first valid row i <= j exactly equal to it (j itself
    when none is; invalid rows map to themselves). Two equal senses would get equal SKD logits
    (the student's loss could never fall below log 2), so equal rows are merged into the first."""
    k = c.shape[0]
    eq = jnp.all(c[:, None, :] == c[None, :, :], axis=-1) & valid[:, None] & valid[None, :]
    eq = eq & (jnp.arange(k)[None, :] <= jnp.arange(k)[:, None])
    return jnp.where(valid, jnp.argmax(eq, axis=1), jnp.arange(k)).astype(jnp.int32)


def _keep_samples(x, mask, *, k: int):
    """A token with ``n <= k`` real points keeps its distinct points as senses (METHOD §1),
    in order of first appearance, each counting its copies; inertia 0. Only k rows are
    gathered (positions found by cumsum)."""
    N = x.shape[0]
    n = jnp.sum(mask).astype(jnp.int32)
    seen = jnp.cumsum(mask)
    first = jnp.searchsorted(seen, jnp.arange(1, k + 1), side="left", method="compare_all")  # [k]
    real = jnp.arange(k) < n
    rows = jnp.where(real[:, None], x[jnp.minimum(first, N - 1)], 0.0)
    canon = _first_equal(rows, real)
    keep = real & (canon == jnp.arange(k))
    slot = jnp.cumsum(keep) - 1  # slot of each kept row
    row_slot = slot[canon]       # slot of each real row (that of the first copy)
    copies = (row_slot[None, :] == jnp.arange(k)[:, None]) & real[None, :]  # [k, k]: slot <- rows
    src = jnp.argmax(copies & keep[None, :], axis=1)  # the kept row of each slot
    n_senses = jnp.sum(keep).astype(jnp.int32)
    return dict(
        centres=jnp.where((jnp.arange(k) < n_senses)[:, None], rows[src], 0.0),
        n_senses=n_senses,
        assignments=jnp.where(mask, row_slot[jnp.clip(seen - 1, 0, k - 1)], -1).astype(jnp.int32),
        inertia=jnp.float32(0.0),
        counts=jnp.sum(copies, axis=1).astype(jnp.int32),
        n_iter=jnp.int32(0),
    )


def _cluster(p: _Points, u, k_active, init, max_iter, tol, *, k: int, has_init: bool, spherical: bool = False):
    """k-means++ (or ``init``), Lloyd to tolerance, final assignment and compaction (n > k)."""
    x, mask = p.x, p.mask
    D = x.shape[-1]
    nf = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
    mean = jnp.sum(x, axis=0) / nf
    mean_var = jnp.maximum(jnp.sum(p.xx) / nf - jnp.sum(mean * mean), 0.0) / D
    tol_abs = tol * mean_var
    active = jnp.arange(k) < k_active
    centres = init if has_init else _kmeanspp(p, u, k_active, k=k)

    def cond(s):
        return (s[1] < max_iter) & (s[2] > tol_abs)

    def body(s):
        c, it, _ = s
        new = _lloyd_step(p, c, active, spherical)
        return new, it + 1, jnp.sum((new - c) ** 2)

    centres, n_iter, _ = jax.lax.while_loop(cond, body, (centres, jnp.int32(0), jnp.float32(jnp.inf)))

    a, _ = _assign(p, centres, active)
    # Equal centres (re-seeded clusters on copies of one point) become one sense: the points of
    # a later copy go to the first; the later one is then empty and dropped below.
    a = _first_equal(centres, active)[a]
    onehot = (a[None, :] == jnp.arange(k)[:, None]) & mask[None, :]  # [k, N]
    counts = jnp.sum(onehot, axis=1).astype(jnp.int32)
    nonempty = (counts > 0) & active
    # Real, non-empty senses first, in cluster order (a stable compaction by cumsum, no sort).
    n_senses = jnp.sum(nonempty).astype(jnp.int32)
    pos = jnp.where(nonempty, jnp.cumsum(nonempty) - 1, n_senses + jnp.cumsum(~nonempty) - 1)
    # Row moves as one-hot matmuls, not gathers/scatters of [N, D] (slow on CPU); exact: each
    # output row is one input row times 1.0 plus zeros. Inertia directly, not expanded.
    inertia = jnp.sum((x - jnp.dot(onehot.T.astype(jnp.float32), centres, precision=_HI)) ** 2)
    perm = pos[None, :] == jnp.arange(k)[:, None]  # [k, k]: slot <- cluster
    return dict(
        centres=jnp.dot(perm.astype(jnp.float32), jnp.where(nonempty[:, None], centres, 0.0), precision=_HI),
        n_senses=n_senses,
        assignments=jnp.where(mask, jnp.sum(jnp.where(onehot, pos[:, None], 0), axis=0), -1).astype(jnp.int32),
        inertia=inertia,
        counts=jnp.sum(jnp.where(perm, counts[None, :], 0), axis=1).astype(jnp.int32),
        n_iter=n_iter,
    )


def _kmeans_one(x, mask, u, k_active, init, max_iter, tol, *, k: int, has_init: bool, spherical: bool = False):
    """k-means of one token with ``k_active <= k`` clusters. x [N, D] f32 (zeroed at padding).

    A token with ``n <= k`` real points keeps them as senses whatever ``k_active`` is. The
    branch is a ``lax.cond``: a real branch when tokens are mapped one at a time (CPU), both
    sides computed and selected when they are vmapped.
    """
    if x.shape[0] <= k:  # static: every token of this shape keeps its samples
        return _keep_samples(x, mask, k=k)
    p = _Points(x, x.T, jnp.sum(x * x, axis=-1), mask)
    return jax.lax.cond(
        jnp.sum(mask) <= k,
        lambda: _keep_samples(x, mask, k=k),
        lambda: _cluster(p, u, k_active, init, max_iter, tol, k=k, has_init=has_init, spherical=spherical))


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
                   k_min: int, has_init: bool, spherical: bool = False):
    x = jnp.where(mask[:, None], x.astype(jnp.float32), 0.0)
    # Checked by the driver, not a host pass. A squared norm that is not finite in f32 catches
    # NaN/inf and also finite vectors whose squares overflow (|x| > ~1.8e19): their distances
    # would be inf, silently losing the point (inertia inf).
    finite = jnp.all(jnp.isfinite(jnp.sum(x * x, axis=-1)))
    if spherical:  # unit vectors: the clustering sees directions only
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    if adaptive is None:
        return dict(_kmeans_one(x, mask, u[0], k, init, max_iter, tol, k=k, has_init=has_init,
                                    spherical=spherical), finite=finite)
    n = jnp.sum(mask)
    D = x.shape[-1]

    def one(kc, uc):
        r = _kmeans_one(x, mask, uc, kc, init, max_iter, tol, k=k, has_init=has_init, spherical=spherical)
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
    return dict(best, finite=finite)


@jax.jit(static_argnames=("k", "adaptive", "k_min", "has_init", "loop", "map_batch", "spherical"))
def _batched(x, mask, u, init, max_iter, tol, *, k, adaptive, k_min, has_init, loop="vmap",
             map_batch=1, spherical=False):
    """The batched program: x [T, N, D], mask [T, N], u [T, C, k, L] uniforms, init [T, k, D].

    ``loop="vmap"`` runs the T tokens in lockstep (every while loop runs as long as the slowest
    token's: the shape for accelerators); ``"map"`` runs them one after another with
    ``lax.map`` (each token its own iteration count, branches really skipped, the token's points
    stay in cache: the fast shape for CPUs), ``map_batch`` tokens in lockstep at a time
    (:func:`map_batch_size`).
    """
    fn = lambda xt, mt, ut, it: _token_program(xt, mt, ut, it, max_iter, tol, k=k,
                                               adaptive=adaptive, k_min=k_min, has_init=has_init,
                                               spherical=spherical)
    if loop == "map":
        return jax.lax.map(lambda args: fn(*args), (x, mask, u, init),
                           batch_size=min(map_batch, x.shape[0]) if map_batch > 1 else None)
    if loop != "vmap":
        raise SenseJaxError(f"loop must be 'vmap' or 'map', got {loop!r}")
    return jax.vmap(fn)(x, mask, u, init)


def _as_token_keys(key, T: int) -> jax.Array:
    """[T] per-token keys from one key (split) or from [T] keys; SenseJaxError otherwise."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.ndim == 0:
            return jax.random.split(key, T)
        if key.shape == (T,):
            return key
    elif key.dtype == jnp.uint32 and key.shape == (2,):  # one raw uint32 [2] key
        return jax.random.split(key, T)
    elif key.dtype == jnp.uint32 and key.shape == (T, 2):  # raw per-token keys
        return key
    raise SenseJaxError(f"key must be one PRNG key (jax.random.key(seed)) or [T={T}] per-token keys; "
                        f"got {key.dtype} {tuple(key.shape)}")


def map_batch_size(n_pad: int, hidden_size: int) -> int:
    """Tokens run in lockstep per step of ``loop="map"``: small tokens in groups of up to 4, so
    the group's points stay within ~384 KiB (measured on 2 CPU cores, D=384: 24-64 samples per
    token run 1.5x faster 4 at a time than one at a time; from 184 samples, one at a time)."""
    fit = (384 << 10) // (4 * n_pad * hidden_size)
    return 1 << (min(max(fit, 1), 4).bit_length() - 1)


def validate_loop(loop: str | None) -> str:
    """The token loop, ``"map"`` or ``"vmap"``; None picks ``"map"`` on CPU, else ``"vmap"``."""
    if loop is None:
        return "map" if jax.default_backend() == "cpu" else "vmap"
    if loop not in ("map", "vmap"):
        raise SenseJaxError(f"loop must be 'map' or 'vmap', got {loop!r}")
    return loop


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
                    check_finite: bool = True, loop: str | None = None,
                    spherical: bool = False) -> dict[str, jax.Array]:
    """:func:`batched_kmeans` as a dict, plus ``counts`` [T, K] int32 (points per sense),
    ``n_iter`` [T] int32 (Lloyd iterations) and ``finite`` [T] bool (no NaN/inf among the real
    samples; the driver's check when ``check_finite=False``)."""
    k = validate_k(k, adaptive=adaptive, k_min=k_min)
    loop = validate_loop(loop)
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
        x32 = jnp.where(mask[..., None], x.astype(jnp.float32), 0.0)
        nonfinite = np.asarray(jnp.any(~jnp.isfinite(x32), axis=(1, 2)))
        bad = nonfinite | np.asarray(jnp.any(~jnp.isfinite(jnp.sum(x32 * x32, axis=-1)), axis=1))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise SenseJaxError(f"token row {row} of the batch {_bad_rows_message(bool(nonfinite[row]))}; "
                                "refusing to cluster")
    has_init = init is not None
    if has_init:
        init = jnp.asarray(init, jnp.float32)
        if init.shape != (T, k, D):
            raise SenseJaxError(f"init must be [T, K, D] = {(T, k, D)}, got {init.shape}")
    else:
        init = jnp.zeros((T, 1, 1), jnp.float32)  # unused placeholder
    statics = dict(k=k, adaptive=adaptive, k_min=int(k_min))
    u = _uniforms(_as_token_keys(key, T), **statics)
    return _batched(x, mask, u, init, jnp.int32(max_iter), jnp.float32(tol), **statics, has_init=has_init,
                    loop=loop, map_batch=map_batch_size(N, D), spherical=bool(spherical))


def batched_kmeans(x, mask, k: int, *, key, max_iter: int = 100, tol: float = 1e-4,
                   adaptive: str | None = None, k_min: int = 1, init=None,
                   check_finite: bool = True, loop: str | None = None, spherical: bool = False) -> KMeansResult:
    """k-means of many tokens' samples at once (one jitted program over the token axis).

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
      loop: how the program walks the token axis: ``"vmap"`` (tokens in lockstep; for
        accelerators) or ``"map"`` (one token after another, ``lax.map``; for CPUs). Default
        (None): ``"map"`` on the CPU backend, else ``"vmap"``. Both give the same clustering
        (the same arithmetic per token; last bits may differ between the two).
      spherical: spherical (cosine) k-means (Dhillon & Modha 2001): the samples are scaled to
        unit length and each centre is its cluster's mean direction (the mean scaled to unit
        length), so that it agrees with a cosine look-up; k-means++ and the tolerance work on
        the unit vectors. Default False: Euclidean k-means (the paper's).

    Returns:
      :class:`KMeansResult` (centres [T, K, D] f32, n_senses [T] int32, assignments [T, N]
      int32 with -1 at masked points, inertia [T] f32).

    Raises:
      SenseJaxError: K < 1, bad shapes, an unknown rule, or NaN/inf samples or samples whose
        squared norm overflows float32 (naming the row).
    """
    r = kmeans_detailed(x, mask, k, key=key, max_iter=max_iter, tol=tol, adaptive=adaptive,
                        k_min=k_min, init=init, check_finite=check_finite, loop=loop, spherical=spherical)
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


def default_chunk_tokens(n_pad: int, hidden_size: int, k: int, memory_budget: int = 1 << 30,
                         cache_bytes: int = 2 << 20, loop: str | None = None) -> int:
    """Tokens per device per k-means chunk for samples padded to ``n_pad``.

    ``loop="map"`` (CPU default): tokens run one at a time, so a chunk only needs to be large
    enough to amortise its dispatch and small enough to overlap gathering the next one: about
    8 MiB of f32 points (a power of two, >= 1). ``"vmap"`` on CPU: tokens run in lockstep and
    the Lloyd step is memory-bound unless the chunk's points stay in cache, so chunks hold about
    ``cache_bytes``. Accelerators: as large as ``memory_budget`` allows (<= 1024 tokens).
    """
    loop = validate_loop(loop)
    points = 4 * n_pad * hidden_size
    if loop == "map":
        return 1 << max(int(min(8 << 20, memory_budget) // points).bit_length() - 1, 0)
    if jax.default_backend() == "cpu":
        return 1 << max(int(cache_bytes // points).bit_length() - 1, 0)
    per_token = 4 * n_pad * hidden_size * 4 + 8 * n_pad * k * 4  # x (storage + f32 copies) + [N, K]
    return max(1, min(1024, memory_budget // per_token))


_COMPILED: dict[tuple, Any] = {}  # (T, N, D, dtype, k, adaptive, k_min, devices) -> executable


def _sharded_program(mesh, *, k: int, adaptive: str | None, k_min: int, loop: str, map_batch: int = 1,
                     spherical: bool = False):
    """The batched program with its token axis sharded over ``mesh`` axis ``"tokens"``: each
    device runs :func:`_batched` on its own tokens (``jax.shard_map``, no collectives)."""
    def local(x, mask, u, init, max_iter, tol):
        return _batched(x, mask, u, init, max_iter, tol, k=k, adaptive=adaptive, k_min=k_min,
                        has_init=False, loop=loop, map_batch=map_batch, spherical=spherical)

    tokens = P("tokens")
    # check_vma=False: the per-token while loops start from unvarying constants.
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, tokens, P(), P()),
                                 out_specs=tokens, check_vma=False))


def _bad_rows(vectors) -> tuple[np.ndarray, np.ndarray]:
    """Per row of vectors [R, D]: (holds NaN/inf, squared norm not finite in float32) [R] bool.
    The second covers the first and finite rows of norm above ~1.8e19, whose f32 squares
    overflow (k-means would give them distance inf and lose them silently)."""
    v = np.asarray(vectors, np.float32)
    nonfinite = ~np.isfinite(v).all(axis=-1)
    with np.errstate(over="ignore", invalid="ignore"):
        overflow = ~np.isfinite(np.einsum("rd,rd->r", v, v))
    return nonfinite, overflow | nonfinite


def _bad_rows_message(nonfinite: bool) -> str:
    return ("has NaN or inf vectors" if nonfinite else
            "has vectors whose squared norm overflows float32 (|x| above ~1.8e19)")


def _check_finite_rows(vectors: np.ndarray, token_ids: np.ndarray, starts: np.ndarray,
                       lengths: np.ndarray, where: str) -> None:
    """Raise naming the first token whose rows hold NaN/inf or overflow f32 when squared.
    vectors are the gathered rows."""
    nonfinite, bad = _bad_rows(vectors)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        i = int(np.searchsorted(starts, row, side="right") - 1)
        raise SenseJaxError(f"{where}: token {int(token_ids[i])} {_bad_rows_message(bool(nonfinite[row]))} "
                            f"(sample {row - int(starts[i])} of {int(lengths[i])}); refusing to cluster")


def build_sense_dictionary(store, k: int, *, seed: int = 0, adaptive: str | None = None,
                           k_min: int = 1, max_iter: int = 100, tol: float = 1e-4,
                           chunk_tokens: int | None = None, memory_budget: int = 1 << 30,
                           dtype: str = "float32", metric: str = "dot", base=None,
                           devices=None, loop: str | None = None, progress: bool = True,
                           spherical: bool = False):
    """Cluster every token of an extraction store into senses (METHOD §1).

    Tokens with ``n_t <= k`` samples keep their samples as senses (no clustering). The others
    are grouped by padded sample count (:func:`bucket_size`) so padding stays small under
    Zipfian counts, and each bucket is clustered in chunks by the program of
    :func:`kmeans_detailed`. Chunks run in waves of at most ``memory_budget / 4`` bytes of
    padded points, gathered from the (memory-mapped) store; on accelerators the next wave is
    gathered while one runs.

    Tokens are sharded over ``devices``: a chunk is a ``[n_devices * T, N, D]`` array laid out
    on a 1-D mesh with axis ``"tokens"`` (``PartitionSpec("tokens")``), tokens dealt to the
    devices in turn, largest first, and each device clusters its ``T`` tokens under
    ``jax.shard_map`` (no communication: tokens are independent). A token's draws depend only on
    its id and, with ``loop="map"``, its arithmetic not on its chunk, so the dictionary is the
    same, byte for byte, on 1 or 8 devices of one backend. On CPU, XLA runs these programs on
    about one core each, so one CPU device per core
    (``jax.config.update("jax_num_cpu_devices", n)`` before JAX starts; ``sense-jax cluster``
    does it) is what puts every core to work.

    Args:
      store: a :class:`sense_jax.store.Store` (or a path, opened with ``open_store``).
      k: K, or K_max with ``adaptive``; >= 1.
      seed: token t's k-means++ draws use ``fold_in(PRNGKey(seed), t)``.
      adaptive: None or ``"bic"`` (see the module docstring). k_min: smallest adaptive K_t.
      max_iter, tol: Lloyd cap and tolerance (scikit-learn's meaning).
      chunk_tokens: tokens per device per chunk (rounded up to whole :func:`map_batch_size`
        groups); default :func:`default_chunk_tokens`.
      memory_budget: bytes of working memory for a chunk (accelerators) and a wave (/4).
      dtype: storage dtype of the centres, "float32" | "bfloat16" | "float16" | "int8" (per-sense
        scales, :func:`sense_jax.sense_dict.quantize_int8`). Senses a narrower dtype makes equal
        are merged like duplicate samples.
      metric: look-up metric recorded in the metadata ("dot" | "cos" | "l2").
      base: optional :class:`SenseDictionary` to add to: the store's tokens replace its entries;
        the result (stored as ``dtype``) lists the base's sources and this store in
        ``meta["sources"]``.
      devices: devices to shard tokens over (default: ``jax.local_devices()``).
      loop: ``"map"`` | ``"vmap"`` | None, as in :func:`batched_kmeans` (default: map on CPU).
      progress: show a tqdm progress bar.
      spherical: spherical (cosine) k-means, see :func:`batched_kmeans`; tokens with ``n <= k``
        samples keep them scaled to unit length. Recorded as ``meta["k_rule"]["spherical"]``.

    Returns:
      :class:`sense_jax.sense_dict.SenseDictionary` over the store's vocabulary, its metadata
      holding the teacher (path, fingerprint, tokenizer hash, layer), hidden size, metric, K
      rule, seed, store fingerprint, ``sources`` (:func:`sense_jax.sense_dict.source_record`)
      and build stats (``tokens``, ``tokens_clustered``, ``senses``, ``mean_inertia`` over
      clustered tokens, ``duplicate_senses_merged``). No token has two equal senses: equal
      samples of a token with ``<= k`` samples, and equal centres, are merged into one sense
      whose count adds theirs.

    Raises:
      SenseJaxError: K < 1, unknown rule/dtype/metric, NaN/inf vectors or vectors whose squared
        norm overflows float32 (naming the token id), or a ``base`` of another width, vocabulary,
        teacher fingerprint, tokenizer or layer (checked before clustering).
    """
    from tqdm.auto import tqdm

    from sense_jax.compile_cache import enable_compile_cache
    from sense_jax.sense_dict import METRICS, STORAGE_DTYPES, SenseDictionary, source_record, teacher_mismatch
    from sense_jax.store import Store, open_store

    enable_compile_cache()

    k = validate_k(k, adaptive=adaptive, k_min=k_min)
    loop = validate_loop(loop)
    if dtype not in STORAGE_DTYPES:
        raise SenseJaxError(f"unknown dtype {dtype!r}; choose from {sorted(STORAGE_DTYPES)}")
    if metric not in METRICS:
        raise SenseJaxError(f"unknown metric {metric!r}; choose from {METRICS}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise SenseJaxError(f"chunk_tokens must be an integer >= 1, got {chunk_tokens!r}")
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, np.integer)) or memory_budget < 1:
        raise SenseJaxError(f"memory_budget must be a number of bytes >= 1, got {memory_budget!r}")
    if not isinstance(store, Store):
        store = open_store(store)
    V, D = store.vocab_size, store.hidden_size
    if base is not None and (base.hidden_size != D or base.vocab_size != V):
        raise SenseJaxError(f"cannot add store {store.path} (width {D}, vocabulary {V}) to a dictionary "
                            f"of width {base.hidden_size}, vocabulary {base.vocab_size} "
                            "(a store from another teacher?)")
    if base is not None and (mismatch := teacher_mismatch(base.meta, store.meta)):
        raise SenseJaxError(f"cannot add store {store.path} to a dictionary from another teacher: "
                            f"{mismatch} (dictionary vs store)")
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
            v = vec[s0:s0 + n[t]].astype(np.float32)
            if spherical:
                v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
            senses[int(t)] = (v, np.ones(n[t], np.int64))

    root = jax.random.key(seed)
    devices = list(devices) if devices is not None else jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("tokens",))
    n_dev = len(devices)
    sizes = np.array([bucket_size(int(c), minimum=max(16, k + 1)) for c in n[big]], np.int64)
    chunks = []  # (N, token ids, T per device); a chunk holds n_dev * T token slots
    for size in np.unique(sizes):
        members = big[sizes == size]
        members = members[np.argsort(-n[members], kind="stable")]  # largest first: balanced devices
        cap = chunk_tokens or default_chunk_tokens(int(size), D, k, memory_budget, loop=loop)
        # Chunks hold whole map groups, so a token's arithmetic never depends on the chunking.
        group = map_batch_size(int(size), D) if loop == "map" else 1
        cap = -(-cap // group) * group
        # One program per bucket: a bucket that fits one chunk is padded to a multiple of 8
        # tokens per device, the last chunk of a larger bucket to the full chunk size.
        per_dev = -(-members.size // n_dev)
        T = cap if per_dev > cap else min(cap, -(-per_dev // 8) * 8)
        for i in range(0, members.size, T * n_dev):
            chunks.append((int(size), members[i:i + T * n_dev], T))

    # Compile every distinct (T, N) program ahead of time on a thread pool, overlapping the
    # uniforms, the first gathers and the first chunks' execution (on 2 CPU cores the compiles
    # themselves ran mostly one after another: ~1 s each).
    statics = dict(k=k, adaptive=adaptive, k_min=int(k_min))
    scalars = (jnp.int32(max_iter), jnp.float32(tol))
    # The scalars on every device once (not re-sent with each chunk).
    scalars = jax.device_put(scalars, jax.sharding.NamedSharding(mesh, P()))

    def compile_shape(T, N):
        cache_key = (T, N, D, str(store.vectors.dtype), k, adaptive, int(k_min), loop, bool(spherical),
                     tuple((d.platform, d.id) for d in devices))
        if cache_key not in _COMPILED:  # AOT compiles bypass jit's cache: keep our own
            C = 1 if adaptive is None else k - k_min + 1
            sharded = jax.sharding.NamedSharding(mesh, P("tokens"))
            spec = (jax.ShapeDtypeStruct((n_dev * T, N, D), store.vectors.dtype, sharding=sharded),
                    jax.ShapeDtypeStruct((n_dev * T, N), bool, sharding=sharded),
                    jax.ShapeDtypeStruct((n_dev * T, C, k, n_local_trials(k)), jnp.float32, sharding=sharded),
                    jax.ShapeDtypeStruct((n_dev * T, 1, 1), jnp.float32, sharding=sharded))
            program = _sharded_program(mesh, **statics, loop=loop, map_batch=map_batch_size(N, D),
                                       spherical=bool(spherical))
            _COMPILED[cache_key] = program.lower(*spec, *scalars).compile()
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

    sharded = jax.sharding.NamedSharding(mesh, P("tokens"))

    def gather(size, ids, T):
        T = T * n_dev
        x = np.zeros((T, size, D), store.vectors.dtype)
        mask = np.zeros((T, size), bool)
        slots = _slots(ids.size, T // n_dev)
        for i, t in zip(slots, ids):
            x[i, :n[t]] = store.vectors[offsets[t]:offsets[t + 1]]
            mask[i, :n[t]] = True
        u = np.zeros((T, *u_all.shape[1:]), np.float32)
        u[slots] = u_all[[u_row[int(t)] for t in ids]]
        return jax.device_put((x, mask, u, np.zeros((T, 1, 1), np.float32)), sharded)

    def _slots(count, T):
        """Chunk slot of the chunk's j-th token: tokens are dealt to the devices in turn (j-th
        token to device j % n_dev), so each device gets a similar share of the large ones."""
        j = np.arange(count)
        return (j % n_dev) * T + j // n_dev

    def collect(ids, T, res):
        res = jax.device_get(res)
        slots = _slots(ids.size, T)
        bad = np.flatnonzero(~res["finite"][slots])
        if bad.size:  # NaN/inf found in the program: name the token and sample from the store
            t = int(ids[bad[0]])
            _check_finite_rows(np.asarray(store.vectors[offsets[t]:offsets[t + 1]]), np.array([t]),
                               np.array([0]), n[[t]], str(store.path))
        overflow = np.flatnonzero(~np.isfinite(res["inertia"][slots]))
        if overflow.size:  # finite squared norms whose distances still overflow float32
            raise SenseJaxError(f"{store.path}: token {int(ids[overflow[0]])}: k-means inertia overflows "
                                "float32 (vectors too large); refusing to cluster")
        for i, t in zip(slots, ids):
            m = int(res["n_senses"][i])
            senses[int(t)] = (res["centres"][i, :m], res["counts"][i, :m].astype(np.int64))
            inertia[int(t)] = float(res["inertia"][i])

    # Chunks run in waves of at most memory_budget / 4 bytes of padded points: a wave is gathered
    # from the store, all its chunks are dispatched, then collected. On accelerators a loader
    # thread gathers the next wave while this one runs; on CPU the programs already keep every
    # core busy and a loader thread only competes with them (measured 1.3x slower on 2 cores),
    # so waves are gathered in turn.
    waves: list[list[tuple[int, np.ndarray, int]]] = []
    room = 0
    for size, ids, T in chunks:
        nbytes = n_dev * T * size * D * store.vectors.dtype.itemsize
        if not waves or nbytes > room:
            waves.append([])
            room = max(memory_budget // 4, nbytes)
        waves[-1].append((size, ids, T))
        room -= nbytes
    overlap = devices[0].platform != "cpu"

    def load(wave):
        return [gather(*chunk) for chunk in wave]

    bar = tqdm(total=int(big.size), desc="k-means", unit="tok", disable=not progress or not big.size)
    loader = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    ready = loader.submit(load, waves[0]) if overlap and waves else None
    try:
        for w, wave in enumerate(waves):
            arrays = ready.result() if overlap else load(wave)
            if overlap and w + 1 < len(waves):
                ready = loader.submit(load, waves[w + 1])
            results = [programs[(T, size)].result()(*a, *scalars) for a, (size, _, T) in zip(arrays, wave)]
            del arrays
            for (_, ids, T), res in zip(wave, results):
                collect(ids, T, res)
                bar.update(ids.size)
    finally:
        bar.close()
        for f in programs.values():
            f.cancel()
        if ready is not None:
            ready.cancel()
        pool.shutdown(wait=True)
        loader.shutdown(wait=True)

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
        "tokenizer_hash": store.meta.get("tokenizer_hash"),
        "layer": store.meta.get("layer"),
        "hidden_size": D,
        "metric": metric,
        "k_rule": {"k": k, "adaptive": adaptive, "k_min": k_min if adaptive else None,
                   "max_iter": max_iter, "tol": tol, "init": "greedy k-means++",
                   "spherical": bool(spherical)},
        "seed": seed,
        "store": str(store.path),
        "store_fingerprint": store_fingerprint(store), "provenance": provenance(),
        "stats": {"tokens": int(tokens.size), "tokens_clustered": int(big.size),
                  "senses": int(centres.shape[0]),
                  "mean_inertia": float(np.mean(list(inertia.values()))) if inertia else 0.0},
    }
    meta["sources"] = [source_record(meta)]
    # Equal samples kept as senses (and centres a narrower dtype makes equal) become one sense.
    out = SenseDictionary.from_arrays(centres, new_offsets, counts, meta).astype(dtype).deduplicated()
    if "duplicate_senses_merged" not in out.meta["stats"]:
        out = out.replace(meta_json=json.dumps(dict(meta, stats=dict(meta["stats"], duplicate_senses_merged=0)),
                                               sort_keys=True))
    return base.merged(out).astype(dtype) if base is not None else out
