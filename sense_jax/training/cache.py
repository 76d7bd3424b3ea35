"""The teacher cache in a training run: where it lives, building it with the run's teacher and mesh,
and the stream and step that read it (the cache itself: :mod:`sense_jax.teacher_cache`).

``teacher_cache`` (config): ``off``: the teacher runs inside every step (as before the cache);
``on``: the cache at ``out_dir/teacher_cache`` is built if absent and read; ``auto`` (default): as
``on`` when the run sees its passages more than once (``steps x batch_size x grad_accum`` >
passages, or > an epoch's packed rows with ``pack_length``) or a complete cache is already
there, else ``off`` (for a single pass building it costs what it saves); a path: that cache, built if absent (the pipeline shares one between its
two students). What a run reads:

* SKD (``mse_weight`` 0): the targets; the step has no teacher forward;
* the MSE baseline (``skd_weight`` 0): the hidden states, when the cache holds them (they fit
  ``teacher_cache_max_bytes``); else the teacher runs in the step;
* both terms: targets and hidden states when both are cached, else the teacher runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from sense_jax import teacher_cache as tc
from sense_jax.losses import teacher_targets
from sense_jax.sense_dict import gather_senses
from sense_jax.sharding import process_rows
from sense_jax.training.data import place_in_rows, run_passages


def cache_path(cfg) -> Path | None:
    """The cache directory ``cfg.teacher_cache`` names (None for ``off``)."""
    v = cfg.teacher_cache.strip()
    if v == "off":
        return None
    return Path(cfg.out_dir) / "teacher_cache" if v in ("auto", "on") else Path(v)


def run_identity(s, passages: Sequence[str]) -> dict:
    """:func:`sense_jax.teacher_cache.cache_identity` of run ``s`` (a Setup) on ``passages``.

    The teacher's params are fingerprinted from the loaded model (every process holds them whole),
    not from the run's copy, which ``fsdp`` shards across processes."""
    return tc.cache_identity(teacher_params=s.teacher.params, teacher_config=s.teacher.config,
                             compute_dtype=s.cfg.compute_dtype, tokenizer=s.teacher.tokenizer,
                             passages=passages, max_length=s.cfg.max_length, sense_dict=s.sense_dict,
                             metric=s.cfg.metric)


def _forward(s, targets: bool, hidden: bool) -> tuple[Callable[[dict], dict], int, slice]:
    """``(forward, batch size, this process's rows)`` for :func:`sense_jax.teacher_cache.build_teacher_cache`:
    the teacher over a [B, L] batch on the run's mesh (B = batch_size x grad_accum passages, the
    batch dimension over ``data``), its outputs replicated so that process 0 can write them."""
    cfg, layout = s.cfg, s.layout
    B = cfg.batch_size * cfg.grad_accum

    def fwd(teacher_params, sense_dict, batch):
        h = s.teacher_module.apply({"params": teacher_params}, batch["input_ids"], batch["attention_mask"],
                                   batch["token_type_ids"])
        out = {}
        if targets:
            codebook, valid = gather_senses(sense_dict, batch["input_ids"])
            out["targets"] = teacher_targets(codebook, valid, h, batch["attention_mask"], cfg.metric)
        if hidden:
            out["hidden"] = h
        return out

    # One jitted function per run and kind, so that a second build (another path) reuses its
    # compiled programs (one per length bucket).
    programs = vars(s).setdefault("_teacher_cache_programs", {})
    jitted = programs.setdefault((targets, hidden), jax.jit(fwd, out_shardings=layout.replicated))
    rows = process_rows(layout.eval_batch, (B, cfg.max_length), 0)

    def forward(enc: dict) -> dict:
        dev = {k: (jax.device_put(v, layout.eval_batch) if jax.process_count() == 1 else
                   jax.make_array_from_process_local_data(layout.eval_batch, v, (B, v.shape[1])))
               for k, v in enc.items()}
        out = jitted(s.frozen[0], s.frozen[1], dev)
        return {k: np.asarray(v.addressable_data(0)) for k, v in out.items()}

    return forward, B, rows


def ensure_teacher_cache(s, passages: Sequence[str], path: Path, *, hidden: bool,
                         log: Callable[[str], None] = print,
                         chunk_passages: int = tc.DEFAULT_CHUNK_PASSAGES) -> tc.TeacherCache | None:
    """Open the cache at ``path`` for run ``s`` (a Setup), building it first when absent.

    A new cache holds the SKD targets when the run has a dictionary, and the hidden states when
    ``hidden`` and they fit ``teacher_cache_max_bytes``; None when it would hold nothing.

    Raises:
      SenseJaxError: the cache at ``path`` was built for another teacher, dictionary, corpus,
        tokenizer, max_length, layer or metric (names the key), or is unreadable.
    """
    cfg = s.cfg
    identity = run_identity(s, passages)
    keys = tc.IDENTITY_KEYS if s.sense_dict is not None else tc.HIDDEN_KEYS
    if (path / tc.COMPLETE_MARKER).exists():
        return tc.open_teacher_cache(path, identity, keys)
    lengths = tc.token_lengths(s.teacher.tokenizer, passages, cfg.max_length)
    targets_dtype = None
    if s.sense_dict is not None:
        targets_dtype = "int8" if s.sense_dict.k_max <= 127 else "int16"
    states = None
    if hidden:
        D = s.teacher.config.hidden_size
        dtype = np.dtype(jax.eval_shape(lambda: s.teacher_module.apply(
            {"params": s.frozen[0]}, *(np.zeros((1, 1), np.int32),) * 3)).dtype)
        need = int(lengths.sum()) * D * dtype.itemsize
        if need <= cfg.teacher_cache_max_bytes:
            states = (D, str(dtype))
        else:
            log(f"teacher cache: the teacher's hidden states would take {need / 2**30:.2f} GiB > "
                f"teacher_cache_max_bytes={cfg.teacher_cache_max_bytes}; not cached (the teacher runs in the "
                "MSE steps)")
    if targets_dtype is None and states is None:
        return None
    what = " and ".join(x for x, on in (("SKD targets", targets_dtype), ("hidden states", states)) if on)
    log(f"teacher cache: computing the teacher's {what} for {len(passages)} passages -> {path}")
    forward, B, rows = _forward(s, targets_dtype is not None, states is not None)
    tc.build_teacher_cache(path, identity=identity, passages=passages, tokenizer=s.teacher.tokenizer,
                           max_length=cfg.max_length, forward=forward, batch_size=B, targets_dtype=targets_dtype,
                           hidden=states, rows=None if jax.process_count() == 1 else rows,
                           chunk_passages=chunk_passages, lengths=lengths, log=log)
    return tc.open_teacher_cache(path, identity, keys)


class CachedStream:
    """A :class:`~sense_jax.training.data.PassageStream` (or
    :class:`~sense_jax.training.data.PackedStream`) whose micro-batches also carry the cache's
    ``keys`` (``targets`` [b, T] int32, ``teacher_hidden`` [b, T, D]) of their passages; packed
    rows get each passage's values at its offset in its row (-1 / zeros at padding)."""

    def __init__(self, stream, cache: tc.TeacherCache, keys: Sequence[str]):
        self.stream, self.cache, self.keys = stream, cache, tuple(keys)

    def step_batches(self, j: int, n: int, buckets: bool, rows: slice | None = None) -> list[dict]:
        mbs = self.stream.step_batches(j, n, buckets, rows)
        for m, mb in zip(range(j, j + n), mbs):
            extra = self._packed(m, mb, rows) if "segment_ids" in mb else self._padded(m, mb, rows)
            mb.update(extra)
        return mbs

    def _padded(self, m: int, mb: dict, rows: slice | None) -> dict:
        idx = self.stream.indices(m)
        idx = idx if rows is None else idx[rows]
        mask = mb["attention_mask"][:len(idx)]
        out = {}
        for k, v in self.cache.rows(idx, mb["input_ids"].shape[1], mask, self.keys).items():
            # rows past the passages (a process's empty rows): nothing
            full = np.full((mb["input_ids"].shape[0],) + v.shape[1:], -1 if k == "targets" else 0, v.dtype)
            full[:len(idx)] = v
            out[k] = full
        return out

    def _packed(self, m: int, mb: dict, rows: slice | None) -> dict:
        idx, row, offset = self.stream.layout(m, rows)
        seg = mb["segment_ids"]
        # Each passage's tokens in the batch (the positions of its segment in its row), checked
        # against the cache's count by TeacherCache.rows.
        counts = (seg[row] == seg[row, offset][:, None]).sum(1)
        T = self.stream.T
        mask = (np.arange(T)[None, :] < counts[:, None]).astype(np.int32)
        return {k: place_in_rows(v, counts, row, offset, seg.shape, -1 if k == "targets" else 0)
                for k, v in self.cache.rows(idx, T, mask, self.keys).items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def use_teacher_cache(s, stream, passages: Sequence[str], log: Callable[[str], None] = print) -> tuple:
    """``(s, stream)`` reading the teacher cache that ``s.cfg.teacher_cache`` asks for (built
    when absent), or unchanged when it is off, not worth it (``auto``) or holds nothing this
    run can use. See the module docstring."""
    from sense_jax.training.setup import with_cached

    cfg = s.cfg
    path = cache_path(cfg)
    if path is None:
        return s, stream
    rows_per_epoch = stream.rows_per_epoch if cfg.pack_length else len(passages)
    if cfg.teacher_cache.strip() == "auto" and not (path / tc.COMPLETE_MARKER).exists() \
            and cfg.steps * cfg.batch_size * cfg.grad_accum <= rows_per_epoch:
        return s, stream  # one pass: building costs the teacher forwards it saves
    skd, mse = s.sense_dict is not None, cfg.mse_weight > 0 or s.sense_dict is None
    cache = ensure_teacher_cache(s, passages, path, hidden=mse, log=log)
    if cache is None:
        return s, stream
    keys = (("targets",) if skd else ()) + (("teacher_hidden",) if mse and cache.hidden is not None else ())
    if mse and "teacher_hidden" not in keys:
        if skd:
            log(f"teacher cache {path}: no hidden states for the MSE term; the teacher runs in every step")
        keys = ()  # the teacher runs anyway and gives the targets alike
    if not keys:
        return s, stream
    log(f"teacher cache {path}: training reads the teacher's {' and '.join(keys)} from it")
    return with_cached(s, keys), CachedStream(stream, cache, keys)


def build_for_run(cfg, *, hidden: bool, log: Callable[[str], None] = print) -> tc.TeacherCache | None:
    """Build (or check and reuse) the cache that ``cfg.teacher_cache`` names for ``cfg``'s training
    passages, before any training: the pipeline does this once for its two students, with the
    hidden states (``hidden``, within ``teacher_cache_max_bytes``) for the MSE student. None
    when ``teacher_cache`` is off or the cache would hold nothing.

    Raises:
      SenseJaxError: as :func:`ensure_teacher_cache`, and the setup's errors (named).
    """
    from sense_jax.training.setup import setup

    path = cache_path(cfg)
    if path is None:
        return None
    passages, _ = run_passages(cfg)
    return ensure_teacher_cache(setup(cfg), passages, path, hidden=hidden, log=log)
