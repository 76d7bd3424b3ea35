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
driver compiles those shapes ahead of time on a thread pool.

Compile time: compiling dominates a first build. The program is ~150 small XLA fusions, each
compiled by LLVM (LLVM was two thirds of the compile's CPU samples), so its compile time does not
depend on its shape: 3.8-4.9 s per bucket program with XLA's defaults (D=384, K=10, 2 CPU
devices, load 3-4), whatever the sample count (16-1024). The driver cuts it three ways: its
chunks hold only tokens with more than K samples (and empty slots), so its program leaves out
the few-samples branch (``clustered_only``: 0.5 s less); it compiles with
:data:`CPU_COMPILER_OPTIONS` (local to these programs: ~40% less, Lloyd steps as fast); and its
sample-count buckets are an octave apart (7 programs up to 1024 samples instead of 13): 1.3-2.2
CPU s per program. XLA's CPU compiler already spreads one compile's code generation over the cores
(a compiling thread's own CPU time was 0.3-0.5 s of a 4-7 s compile), so compiling on a thread
pool overlaps the compiles with the uniforms and the first chunks rather than multiplying
throughput. The persistent XLA cache, which :func:`build_sense_dictionary` turns on
(:func:`sense_jax.compile_cache.enable_compile_cache`), removes compiling from later runs.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sense_jax.errors import SenseJaxError

ADAPTIVE_RULES = ("bic",)
_HI = jax.lax.Precision.HIGHEST

# XLA options for the k-means programs on the CPU backend only (the driver compiles them with
# these; other programs, e.g. the encoder, keep XLA's defaults: a global O0 slowed the encoder).
# The program is ~150 small fusions, each compiled by LLVM: the classic loop emitters instead of
# the fusion emitters and no expensive LLVM passes compile it ~40% faster with Lloyd steps as
# fast (2 CPU devices: bucket programs of 16 / 128 / 1024 samples 4.1 / 4.9 / 4.4 s -> 2.5 /
# 2.5 / 2.7 s to compile, 0.24 / 0.14 / 0.60 s -> 0.17 / 0.09 / 0.57 s to run their chunks, same
# inertia to 6 digits; load 3-4). Rejected: xla_backend_optimization_level 0 (compile 2x
# faster, Lloyd steps 1.5-6x slower) and 1 (no clear gain, other rounding).
CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False, "xla_llvm_disable_expensive_passes": True}


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


def _kmeans_one(x, mask, u, k_active, init, max_iter, tol, *, k: int, has_init: bool, spherical: bool = False,
                clustered_only: bool = False):
    """k-means of one token with ``k_active <= k`` clusters. x [N, D] f32 (zeroed at padding).

    A token with ``n <= k`` real points keeps them as senses whatever ``k_active`` is. The
    branch is a ``lax.cond``: a real branch when tokens are mapped one at a time (CPU), both
    sides computed and selected when they are vmapped. ``clustered_only`` (static) promises
    that every token has ``n > k`` real points or none (padding slots, whose output is
    discarded: 0 senses): the branch is left out, which takes a fifth off the program's
    compile time (0.5 of 2.4 s, D=384, K=10) and, vmapped, skips a computed-then-dropped side.
    """
    if x.shape[0] <= k:  # static: every token of this shape keeps its samples
        return _keep_samples(x, mask, k=k)
    p = _Points(x, x.T, jnp.sum(x * x, axis=-1), mask)
    if clustered_only:
        return _cluster(p, u, k_active, init, max_iter, tol, k=k, has_init=has_init, spherical=spherical)
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
                   k_min: int, has_init: bool, spherical: bool = False, clustered_only: bool = False):
    x = jnp.where(mask[:, None], x.astype(jnp.float32), 0.0)
    # Checked by the driver, not a host pass. A squared norm that is not finite in f32 catches
    # NaN/inf and also finite vectors whose squares overflow (|x| > ~1.8e19): their distances
    # would be inf, silently losing the point (inertia inf).
    finite = jnp.all(jnp.isfinite(jnp.sum(x * x, axis=-1)))
    if spherical:  # unit vectors: the clustering sees directions only
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    if adaptive is None:
        return dict(_kmeans_one(x, mask, u[0], k, init, max_iter, tol, k=k, has_init=has_init,
                                spherical=spherical, clustered_only=clustered_only), finite=finite)
    n = jnp.sum(mask)
    D = x.shape[-1]

    def one(kc, uc):
        r = _kmeans_one(x, mask, uc, kc, init, max_iter, tol, k=k, has_init=has_init, spherical=spherical,
                        clustered_only=clustered_only)
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


@jax.jit(static_argnames=("k", "adaptive", "k_min", "has_init", "loop", "map_batch", "spherical",
                          "clustered_only"))
def _batched(x, mask, u, init, max_iter, tol, *, k, adaptive, k_min, has_init, loop="vmap",
             map_batch=1, spherical=False, clustered_only=False):
    """The batched program: x [T, N, D], mask [T, N], u [T, C, k, L] uniforms, init [T, k, D].

    ``loop="vmap"`` runs the T tokens in lockstep (every while loop runs as long as the slowest
    token's: the shape for accelerators); ``"map"`` runs them one after another with
    ``lax.map`` (each token its own iteration count, branches really skipped, the token's points
    stay in cache: the fast shape for CPUs), ``map_batch`` tokens in lockstep at a time
    (:func:`map_batch_size`). ``clustered_only``: every token has more than k real points or
    none (the driver's chunks), see :func:`_kmeans_one`.
    """
    fn = lambda xt, mt, ut, it: _token_program(xt, mt, ut, it, max_iter, tol, k=k,
                                               adaptive=adaptive, k_min=k_min, has_init=has_init,
                                               spherical=spherical, clustered_only=clustered_only)
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
