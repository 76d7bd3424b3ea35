"""The sense-dictionary builder: an extraction store in, a :class:`SenseDictionary` out (METHOD §1).

:func:`build_sense_dictionary` is a short driver over named steps:

1. :class:`ClusterSettings` validates every argument once (the ``cluster`` command builds the
   same object from its flags, so the command and the library refuse the same values);
2. :func:`partition_by_sample_count`: tokens with ``n_t <= k`` samples keep them as senses, the
   others are clustered;
3. :func:`plan_chunks`: clustered tokens grouped by padded sample count (:func:`bucket_size`),
   cut into chunks of ``n_devices * T`` token slots;
4. :class:`ChunkRunner`: compiles each chunk shape ahead of time, gathers chunks from the
   (memory-mapped) store in waves, runs the batched k-means of :mod:`sense_jax.kmeans` sharded
   over the devices and collects the senses;
5. :func:`assemble`: the dictionary's arrays and metadata, deduplicated, cast, merged into a base.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from sense_jax.compile_cache import enable_compile_cache
from sense_jax.errors import SenseJaxError
from sense_jax.fingerprints import store_fingerprint
from sense_jax.kmeans import (CPU_COMPILER_OPTIONS, _bad_rows, _bad_rows_message, _batched, _uniforms_by_id,
                              map_batch_size, n_local_trials, validate_k, validate_loop)
from sense_jax.provenance import provenance
from sense_jax.sense_dict import METRICS, STORAGE_DTYPES, SenseDictionary, source_record, teacher_mismatch
from sense_jax.store import Store, open_store


def bucket_size(n: int, minimum: int = 16) -> int:
    """Padded sample count for a token with ``n`` samples: the smallest ``minimum * 2^i``
    (rounded up to a multiple of 8) that holds ``n``.

    Samples per token are Zipfian, so padding everyone to the largest would waste ~10x. Each
    bucket is one compiled k-means program (1.3-2.2 CPU s to compile, whatever its sample count:
    see :mod:`sense_jax.kmeans`), and compiling dominates a first build, so the buckets are an
    octave apart: 7 programs up to 1024 samples (16, 32, 64, ..., 1024 for ``minimum=16``),
    padding at most 2x and on the default run's store 1.37x (half-octave buckets: 13 programs,
    1.17x; the Lloyd steps run one token at a time, so padding costs less than in proportion).
    A token's padded size changes the last bits of its arithmetic, so the dictionary's bytes
    depend on this rule (not on devices or chunks): on the default run's store the half-octave
    buckets gave other bytes, at mean inertia 647.905 vs 647.901 now (scikit-learn 648.311).
    """
    i = 0
    while (size := int(math.ceil(minimum * 2 ** i / 8 - 1e-6) * 8)) < n:
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
                        has_init=False, loop=loop, map_batch=map_batch, spherical=spherical,
                        clustered_only=True)

    tokens = P("tokens")
    # check_vma=False: the per-token while loops start from unvarying constants.
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, tokens, P(), P()),
                                 out_specs=tokens, check_vma=False))


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


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    """Everything :func:`build_sense_dictionary` needs besides the store, validated on creation.

    Fields as in :func:`build_sense_dictionary`; ``loop=None`` stays None (resolved per backend
    when the build starts, so creating settings does not start JAX). ``option_names`` makes the
    messages name the ``sense-jax cluster`` flags (``--max-iter``) instead of the parameters.

    Raises:
      SenseJaxError: K < 1, unknown rule / dtype / metric / loop, k_min outside [1, k],
        max_iter < 0, tol negative or not finite, chunk_tokens or memory_budget < 1.
    """

    k: int
    adaptive: str | None = None
    k_min: int = 1
    max_iter: int = 100
    tol: float = 1e-4
    chunk_tokens: int | None = None
    memory_budget: int = 1 << 30
    dtype: str = "float32"
    metric: str = "dot"
    loop: str | None = None
    spherical: bool = False
    option_names: bool = dataclasses.field(default=False, compare=False)

    def _name(self, field: str) -> str:
        return "--" + field.replace("_", "-") if self.option_names else field

    def __post_init__(self):
        object.__setattr__(self, "k", validate_k(self.k, adaptive=self.adaptive, k_min=self.k_min))
        if self.loop is not None:
            validate_loop(self.loop)
        if self.dtype not in STORAGE_DTYPES:
            raise SenseJaxError(f"unknown dtype {self.dtype!r}; choose from {sorted(STORAGE_DTYPES)}")
        if self.metric not in METRICS:
            raise SenseJaxError(f"unknown metric {self.metric!r}; choose from {METRICS}")
        c = self.chunk_tokens
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1):
            raise SenseJaxError(f"{self._name('chunk_tokens')} must be an integer >= 1, got {c!r}")
        m = self.memory_budget
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise SenseJaxError(f"memory_budget must be a number of bytes >= 1, got {m!r}")
        i = self.max_iter
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise SenseJaxError(f"{self._name('max_iter')} must be an integer >= 0, got {i!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float, np.floating)) \
                or not (math.isfinite(self.tol) and self.tol >= 0):
            raise SenseJaxError(f"{self._name('tol')} must be a finite number >= 0, got {self.tol}")



def build_sense_dictionary(store, k: int, *, seed: int = 0, adaptive: str | None = None,
                           k_min: int = 1, max_iter: int = 100, tol: float = 1e-4,
                           chunk_tokens: int | None = None, memory_budget: int = 1 << 30,
                           dtype: str = "float32", metric: str = "dot", base=None,
                           devices=None, loop: str | None = None, progress: bool = True,
                           spherical: bool = False):
    """Cluster every token of an extraction store into senses (METHOD §1).

    Tokens with ``n_t <= k`` samples keep their samples as senses (no clustering). The others
    are grouped by padded number of samples (:func:`bucket_size`) so padding stays small under
    Zipfian samples per token, and each bucket is clustered in chunks by the program of
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
      SenseJaxError: invalid settings (:class:`ClusterSettings`), NaN/inf vectors or vectors whose squared
        norm overflows float32 (naming the token id), or a ``base`` of another width, vocabulary,
        teacher fingerprint, tokenizer or layer (checked before clustering).
    """
    settings = ClusterSettings(k=k, adaptive=adaptive, k_min=k_min, max_iter=max_iter, tol=tol,
                               chunk_tokens=chunk_tokens, memory_budget=memory_budget, dtype=dtype,
                               metric=metric, loop=loop, spherical=spherical)
    return build_with_settings(store, settings, seed=seed, base=base, devices=devices, progress=progress)


def build_with_settings(store, settings: ClusterSettings, *, seed: int = 0, base=None, devices=None,
                        progress: bool = True):
    """:func:`build_sense_dictionary` with already validated ``settings``."""
    enable_compile_cache()
    settings = dataclasses.replace(settings, loop=validate_loop(settings.loop))
    if not isinstance(store, Store):
        store = open_store(store)
    _check_base(store, base)
    part = partition_by_sample_count(store, settings.k, settings.spherical)
    devices = list(devices) if devices is not None else jax.local_devices()
    chunks = plan_chunks(part, len(devices), store.hidden_size, settings)
    runner = ChunkRunner(store, part, settings, seed, devices, chunks)
    senses, inertia = runner.run(progress)
    senses.update(part.senses)
    out = assemble(store, senses, inertia, part, settings, seed)
    return base.merged(out).astype(settings.dtype) if base is not None else out


def _check_base(store, base) -> None:
    """Refuse adding ``store`` to a ``base`` dictionary of another width, vocabulary or teacher."""
    V, D = store.vocab_size, store.hidden_size
    if base is not None and (base.hidden_size != D or base.vocab_size != V):
        raise SenseJaxError(f"cannot add store {store.path} (width {D}, vocabulary {V}) to a dictionary "
                            f"of width {base.hidden_size}, vocabulary {base.vocab_size} "
                            "(a store from another teacher?)")
    if base is not None and (mismatch := teacher_mismatch(base.meta, store.meta)):
        raise SenseJaxError(f"cannot add store {store.path} to a dictionary from another teacher: "
                            f"{mismatch} (dictionary vs store)")


@dataclasses.dataclass
class Partition:
    """The store's tokens split by sample count.

    Attributes:
      offsets: [V + 1] int64 the store's offsets. n: [V] int64 samples per token.
      tokens: ids of tokens with samples. big: ids with more than k samples (clustered).
      senses: token id -> (senses [n_t, D] float32, counts [n_t] int64) of the others.
    """

    offsets: np.ndarray
    n: np.ndarray
    tokens: np.ndarray
    big: np.ndarray
    senses: dict[int, tuple[np.ndarray, np.ndarray]]


def partition_by_sample_count(store, k: int, spherical: bool) -> Partition:
    """Tokens with ``n_t <= k`` samples keep them as senses (unit length when ``spherical``; one
    store read for all of them); the others are left to cluster.

    Raises:
      SenseJaxError: a kept sample is NaN/inf or its squared norm overflows float32.
    """
    offsets = np.asarray(store.offsets, np.int64)
    n = np.diff(offsets)
    tokens = np.flatnonzero(n > 0)
    small = tokens[n[tokens] <= k]
    big = tokens[n[tokens] > k]
    senses: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if small.size:
        vec = np.concatenate([store.read_rows(offsets[t], offsets[t + 1]) for t in small])
        starts = np.concatenate([[0], np.cumsum(n[small])[:-1]])
        _check_finite_rows(vec, small, starts, n[small], str(store.path))
        for t, s0 in zip(small, starts):
            v = vec[s0:s0 + n[t]].astype(np.float32)
            if spherical:
                v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
            senses[int(t)] = (v, np.ones(n[t], np.int64))
    return Partition(offsets, n, tokens, big, senses)


def plan_chunks(part: Partition, n_dev: int, D: int, s: ClusterSettings) -> list[tuple[int, np.ndarray, int]]:
    """Chunks ``(N, token ids, T)`` of the clustered tokens: tokens padded to N samples
    (:func:`bucket_size`), ``n_dev * T`` token slots per chunk, largest tokens first."""
    n, big, k = part.n, part.big, s.k
    sizes = np.array([bucket_size(int(c), minimum=max(16, k + 1)) for c in n[big]], np.int64)
    chunks = []
    for size in np.unique(sizes):
        members = big[sizes == size]
        members = members[np.argsort(-n[members], kind="stable")]  # largest first: balanced devices
        cap = s.chunk_tokens or default_chunk_tokens(int(size), D, k, s.memory_budget, loop=s.loop)
        # Chunks hold whole map groups, so a token's arithmetic never depends on the chunking.
        group = map_batch_size(int(size), D) if s.loop == "map" else 1
        cap = -(-cap // group) * group
        # One program per bucket: a bucket that fits one chunk is padded to a multiple of 8
        # tokens per device, the last chunk of a larger bucket to the full chunk size.
        per_dev = -(-members.size // n_dev)
        T = cap if per_dev > cap else min(cap, -(-per_dev // 8) * 8)
        for i in range(0, members.size, T * n_dev):
            chunks.append((int(size), members[i:i + T * n_dev], T))
    return chunks


class ChunkRunner:
    """Runs planned chunks on ``devices`` (a 1-D mesh ``("tokens",)``) and collects the senses.

    Every distinct (T, N) program (one per bucket) is compiled ahead of time on a thread pool,
    overlapping the uniforms, the first gathers and the first chunks' execution; on CPU with
    :data:`sense_jax.kmeans.CPU_COMPILER_OPTIONS`. XLA's CPU compiler already spreads each
    compile over the cores, so on 2 cores two compiles in flight take about twice as long each
    (1.3-2.2 CPU s per program; see :mod:`sense_jax.kmeans`).
    """

    def __init__(self, store, part: Partition, s: ClusterSettings, seed: int, devices, chunks):
        self.store, self.part, self.s, self.devices, self.chunks = store, part, s, devices, chunks
        self.mesh = jax.sharding.Mesh(np.asarray(devices), ("tokens",))
        self.n_dev = len(devices)
        self.statics = dict(k=s.k, adaptive=s.adaptive, k_min=int(s.k_min))
        # The scalars on every device once (not re-sent with each chunk).
        self.scalars = jax.device_put((jnp.int32(s.max_iter), jnp.float32(s.tol)),
                                      jax.sharding.NamedSharding(self.mesh, P()))
        shapes = list(dict.fromkeys((T, N) for N, _, T in chunks))
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, min(len(shapes), os.cpu_count() or 1, 8)))
        self.programs = {shape: self.pool.submit(self._compile, *shape) for shape in shapes}
        self.u_all = self._uniforms(jax.random.key(seed))
        self.u_row = {int(t): i for i, t in enumerate(part.big)}
        self.sharded = jax.sharding.NamedSharding(self.mesh, P("tokens"))
        self.senses: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.inertia: dict[int, float] = {}

    def _compile(self, T, N):
        s, store, D = self.s, self.store, self.store.hidden_size
        cache_key = (T, N, D, str(store.vectors.dtype), s.k, s.adaptive, int(s.k_min), s.loop,
                     bool(s.spherical), tuple((d.platform, d.id) for d in self.devices))
        if cache_key not in _COMPILED:  # AOT compiles bypass jit's cache: keep our own
            C = 1 if s.adaptive is None else s.k - s.k_min + 1
            sharded = jax.sharding.NamedSharding(self.mesh, P("tokens"))
            rows = self.n_dev * T
            spec = (jax.ShapeDtypeStruct((rows, N, D), store.vectors.dtype, sharding=sharded),
                    jax.ShapeDtypeStruct((rows, N), bool, sharding=sharded),
                    jax.ShapeDtypeStruct((rows, C, s.k, n_local_trials(s.k)), jnp.float32, sharding=sharded),
                    jax.ShapeDtypeStruct((rows, 1, 1), jnp.float32, sharding=sharded))
            program = _sharded_program(self.mesh, **self.statics, loop=s.loop, map_batch=map_batch_size(N, D),
                                       spherical=bool(s.spherical))
            options = CPU_COMPILER_OPTIONS if self.devices[0].platform == "cpu" else None
            _COMPILED[cache_key] = program.lower(*spec, *self.scalars).compile(compiler_options=options)
        return _COMPILED[cache_key]

    def _uniforms(self, root) -> np.ndarray:
        """Every clustered token's k-means++ uniforms up front, in fixed-size blocks (one RNG compile)."""
        big, s, block = self.part.big, self.s, 4096
        return np.concatenate([np.asarray(_uniforms_by_id(
            root, np.pad(big[i:i + block], (0, max(0, block - big[i:i + block].size))).astype(np.uint32),
            **self.statics))[:big[i:i + block].size] for i in range(0, big.size, block)]
            or [np.zeros((0, 1 if s.adaptive is None else s.k - s.k_min + 1, s.k, n_local_trials(s.k)),
                         np.float32)])

    def _slots(self, count, T):
        """Chunk slot of the chunk's j-th token: tokens are dealt to the devices in turn (j-th
        token to device j % n_dev), so each device gets a similar share of the large ones."""
        j = np.arange(count)
        return (j % self.n_dev) * T + j // self.n_dev

    def _gather(self, size, ids, T):
        store, offsets, n, D = self.store, self.part.offsets, self.part.n, self.store.hidden_size
        T = T * self.n_dev
        x = np.zeros((T, size, D), store.vectors.dtype)
        mask = np.zeros((T, size), bool)
        slots = self._slots(ids.size, T // self.n_dev)
        for i, t in zip(slots, ids):
            x[i, :n[t]] = store.read_rows(offsets[t], offsets[t + 1])
            mask[i, :n[t]] = True
        u = np.zeros((T, *self.u_all.shape[1:]), np.float32)
        u[slots] = self.u_all[[self.u_row[int(t)] for t in ids]]
        return jax.device_put((x, mask, u, np.zeros((T, 1, 1), np.float32)), self.sharded)

    def _collect(self, ids, T, res):
        store, offsets, n = self.store, self.part.offsets, self.part.n
        res = jax.device_get(res)
        slots = self._slots(ids.size, T)
        bad = np.flatnonzero(~res["finite"][slots])
        if bad.size:  # NaN/inf found in the program: name the token and sample from the store
            t = int(ids[bad[0]])
            _check_finite_rows(store.read_rows(offsets[t], offsets[t + 1]), np.array([t]),
                               np.array([0]), n[[t]], str(store.path))
        overflow = np.flatnonzero(~np.isfinite(res["inertia"][slots]))
        if overflow.size:  # finite squared norms whose distances still overflow float32
            raise SenseJaxError(f"{store.path}: token {int(ids[overflow[0]])}: k-means inertia overflows "
                                "float32 (vectors too large); refusing to cluster")
        for i, t in zip(slots, ids):
            m = int(res["n_senses"][i])
            self.senses[int(t)] = (res["centres"][i, :m], res["counts"][i, :m].astype(np.int64))
            self.inertia[int(t)] = float(res["inertia"][i])

    def _waves(self) -> list[list[tuple[int, np.ndarray, int]]]:
        """Chunks grouped in waves of at most ``memory_budget / 4`` bytes of padded points."""
        waves: list[list[tuple[int, np.ndarray, int]]] = []
        room = 0
        D, itemsize = self.store.hidden_size, self.store.vectors.dtype.itemsize
        for size, ids, T in self.chunks:
            nbytes = self.n_dev * T * size * D * itemsize
            if not waves or nbytes > room:
                waves.append([])
                room = max(self.s.memory_budget // 4, nbytes)
            waves[-1].append((size, ids, T))
            room -= nbytes
        return waves

    def run(self, progress: bool):
        """Run every chunk; returns (senses, inertia) of the clustered tokens by token id.

        A wave is gathered from the store, all its chunks are dispatched, then collected. On
        accelerators a loader thread gathers the next wave while this one runs; on CPU the
        programs already keep every core busy and a loader thread only competes with them
        (measured 1.3x slower on 2 cores), so waves are gathered in turn.
        """
        waves = self._waves()
        overlap = self.devices[0].platform != "cpu"
        big = self.part.big

        def load(wave):
            return [self._gather(*chunk) for chunk in wave]

        bar = tqdm(total=int(big.size), desc="k-means", unit="tok", disable=not progress or not big.size)
        loader = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        ready = loader.submit(load, waves[0]) if overlap and waves else None
        try:
            for w, wave in enumerate(waves):
                arrays = ready.result() if overlap else load(wave)
                if overlap and w + 1 < len(waves):
                    ready = loader.submit(load, waves[w + 1])
                results = [self.programs[(T, size)].result()(*a, *self.scalars)
                           for a, (size, _, T) in zip(arrays, wave)]
                del arrays
                for (_, ids, T), res in zip(wave, results):
                    self._collect(ids, T, res)
                    bar.update(ids.size)
        finally:
            bar.close()
            for f in self.programs.values():
                f.cancel()
            if ready is not None:
                ready.cancel()
            self.pool.shutdown(wait=True)
            loader.shutdown(wait=True)
        return self.senses, self.inertia


def assemble(store, senses: dict, inertia: dict, part: Partition, s: ClusterSettings, seed: int):
    """The dictionary of ``senses`` (token id -> (senses, counts)) with its metadata, cast to
    ``s.dtype``; equal senses of a token (equal samples kept as senses, centres a narrower dtype
    makes equal) are merged into one."""
    V, D = store.vocab_size, store.hidden_size
    senses_per_token = np.zeros(V, np.int64)
    for t, (c, _) in senses.items():
        senses_per_token[t] = c.shape[0]
    new_offsets = np.concatenate([[0], np.cumsum(senses_per_token)])
    order = sorted(senses)
    centres = np.concatenate([senses[t][0] for t in order] or [np.zeros((0, D), np.float32)])
    counts = np.concatenate([senses[t][1] for t in order] or [np.zeros(0, np.int64)])
    meta = {
        "teacher": store.meta.get("teacher"),
        "teacher_fingerprint": store.meta.get("teacher_fingerprint"),
        "tokenizer_hash": store.meta.get("tokenizer_hash"),
        "layer": store.meta.get("layer"),
        "hidden_size": D,
        "metric": s.metric,
        "k_rule": {"k": s.k, "adaptive": s.adaptive, "k_min": s.k_min if s.adaptive else None,
                   "max_iter": s.max_iter, "tol": s.tol, "init": "greedy k-means++",
                   "spherical": bool(s.spherical)},
        "seed": seed,
        "store": str(store.path),
        "store_fingerprint": store_fingerprint(store), "provenance": provenance(),
        "stats": {"tokens": int(part.tokens.size), "tokens_clustered": int(part.big.size),
                  "senses": int(centres.shape[0]),
                  "mean_inertia": float(np.mean(list(inertia.values()))) if inertia else 0.0},
    }
    meta["sources"] = [source_record(meta)]
    out = SenseDictionary.from_arrays(centres, new_offsets, counts, meta).astype(s.dtype).deduplicated()
    if "duplicate_senses_merged" not in out.meta["stats"]:
        out = out.replace(meta_json=json.dumps(dict(meta, stats=dict(meta["stats"], duplicate_senses_merged=0)),
                                               sort_keys=True))
    return out
