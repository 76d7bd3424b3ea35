"""The forward stage of extraction: teacher hidden states at the kept positions, into the store.

Windows of consecutive passages; inside a window, the passages holding a kept occurrence are
sorted by length and cut into micro-batches of ``batch_size`` rows (one per device per step, so
each device always computes the same [batch_size, T] shapes whatever the device count, which
makes the bytes identical on 1 or 8 devices). A step feeds ``batch_size × n_data`` rows, each
process its own slice (``jax.make_array_from_process_local_data``); padding rows have an
all-zero mask. The jitted forward gathers the kept positions of each row and returns them
replicated; process 0 writes them into the store's memory-mapped ``vectors.npy``
(:class:`sense_jax.store.StoreWriter`) and saves ``progress.json`` after each window, the unit a
resumed run restarts from.

Packed (``pack=True``, :func:`plan_window_packed`): the window's passages are packed first-fit
decreasing (:func:`sense_jax.batching.pack_passages`) into rows of one or two fixed lengths
(:func:`pack_row_lengths`), ``batch_size`` rows per device per step, so that the whole run
compiles at most two forward programs; the model masks attention within each passage and
restarts its positions (``segment_ids``), so the same occurrences get the same vectors within
float rounding (docs/senses.md's extraction section gives the difference measured).
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import weakref
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sense_jax.batching import DEFAULT_BUCKETS, bucket_length, length_bucketed_batches, pack_passages
from sense_jax.corpus import PassageHasher, iter_passages
from sense_jax.errors import SenseJaxError
from sense_jax.extract_job import Counted, Job, fail_point
from sense_jax.io_utils import read_json, write_json_atomic
from sense_jax.multiprocess import barrier, broadcast_ints
from sense_jax.sharding import batch_sharding, process_rows, replicated
from sense_jax.store import STORE_DTYPES, StoreWriter
from sense_jax.tokenizing import make_encoder

# The jitted forward and the teacher's params replicated over the mesh, for the last model
# used: a re-run with the same model (a resumed or repeated extraction in one process) skips the
# copy and the trace. Keyed by id(model); the entry goes when the model is garbage-collected.
_FORWARD_CACHE: dict[int, tuple[tuple, Any, Any]] = {}
# One entry per trace of the jitted forward, (packed, input shape): each is one compiled program
# (what the compile-count test and eval/bench_extract.py read).
FORWARD_TRACES: list[tuple[bool, tuple[int, ...]]] = []
# Packed rows: passages up to this many tokens go into rows of this length (attention costs T²
# per row, so short passages are not packed into the longest rows); longer ones into rows of
# the run's longest possible passage.
PACK_SHORT_ROW = 128


@dataclasses.dataclass
class Step:
    """One forward step: ``n_data`` micro-batches padded to the same length."""

    length: int                    # padded length T
    micro: list[np.ndarray]        # per micro-batch, global passage ids (<= batch_size each; packed: any number)
    # Packed steps only: per micro-batch, the (row within the micro-batch, offset in the row) of
    # each passage of ``micro``; None for one passage per row.
    layout: list[tuple[np.ndarray, np.ndarray]] | None = None


def plan_window(needed: np.ndarray, lengths: np.ndarray, batch_size: int, n_data: int) -> list[Step]:
    """Steps for one window: micro-batches are cut from the window's needed passages sorted by
    length (independent of the device count); a step holds ``n_data`` micro-batches of equal T."""
    micro = [(needed[idx], T) for idx, T in
             length_bucketed_batches(lengths[needed], batch_size, DEFAULT_BUCKETS)]
    steps: list[Step] = []
    for T, group in itertools.groupby(micro, key=lambda m: m[1]):
        group = [g[0] for g in group]
        for s in range(0, len(group), n_data):
            steps.append(Step(int(T), group[s:s + n_data]))
    return steps


def pack_row_lengths(max_length: int) -> tuple[int, ...]:
    """The row lengths of a packed run whose passages have at most ``max_length`` tokens: one
    (the bucket of ``max_length``) when that is at most :data:`PACK_SHORT_ROW`, else two."""
    long = bucket_length(int(max_length), DEFAULT_BUCKETS)
    return (long,) if long <= PACK_SHORT_ROW else (PACK_SHORT_ROW, long)


def plan_window_packed(needed: np.ndarray, lengths: np.ndarray, batch_size: int, n_data: int,
                       row_lengths: tuple[int, ...]) -> list[Step]:
    """Packed steps for one window: each passage goes to the shortest row length that holds
    it; per row length the passages are packed first-fit decreasing, the rows cut into
    micro-batches of ``batch_size`` rows (independent of the device count) and ``n_data``
    micro-batches make a step."""
    steps: list[Step] = []
    lens = lengths[needed]
    lo = 0
    for T in row_lengths:
        group = needed[(lens > lo) & (lens <= T)]
        lo = T
        if not len(group):
            continue
        pk = pack_passages(lengths[group], T)
        order = np.lexsort((pk.offset, pk.row))
        micro, layout = [], []
        for first in range(0, pk.n_rows, batch_size):
            sel = order[(pk.row[order] >= first) & (pk.row[order] < first + batch_size)]
            micro.append(group[sel])
            layout.append((pk.row[sel] - first, pk.offset[sel]))
        for s in range(0, len(micro), n_data):
            steps.append(Step(int(T), micro[s:s + n_data], layout[s:s + n_data]))
    return steps


def gather_indices_packed(st: Step, batch_size: int, n_rows: int, kp: np.ndarray, by_passage: np.ndarray,
                          positions: np.ndarray):
    """:func:`gather_indices` for a packed step: per row, the kept occurrences of all its
    passages at ``offset + position``; K = T (a row may keep any of its tokens, and one K
    keeps the program count at one per row length).

    Returns:
      gpos [R, T] int32; ri, ki [n]; src [n] (as :func:`gather_indices`); seg_rows [n_p],
      seg_offsets [n_p], seg_passages [n_p]: every passage of the step with its global row.
    """
    T = st.length
    rows = np.concatenate([r + m * batch_size for m, (r, _) in enumerate(st.layout)])
    offs = np.concatenate([o for _, o in st.layout])
    pids = np.concatenate(st.micro)
    a = np.searchsorted(kp, pids, "left")
    b = np.searchsorted(kp, pids, "right")
    nk = b - a
    ri = np.repeat(rows, nk)  # rows ascending: the layout is sorted by (row, offset)
    src = (np.concatenate([by_passage[x:y] for x, y in zip(a, b)]) if len(a)
           else np.zeros(0, np.int64))
    ki = np.arange(len(ri)) - np.searchsorted(ri, ri, "left")
    gpos = np.zeros((n_rows, T), np.int32)  # n_rows = batch_size × n_data: padding rows at the end
    gpos[ri, ki] = positions[src] + np.repeat(offs, nk)
    return gpos, ri, ki, src, rows, offs, pids


def gather_indices(rows: np.ndarray, T: int, kp: np.ndarray, by_passage: np.ndarray,
                   positions: np.ndarray):
    """Where a step's kept occurrences are and where they go.

    Args:
      rows: [R] global passage id of each batch row (-1 for padding rows).
      kp: [S] passage of each kept occurrence in ``by_passage`` order (sorted by passage,
        position); ``by_passage`` [S] maps that order to store rows; ``positions`` [S] by store row.

    Returns:
      gpos [R, K] int32 positions to gather per row (K = T, or T/4 for buckets of >= 128 tokens
      when every row keeps at most T/4: two compiles at most per bucket, less to copy off the
      devices); ri, ki [n] the (row, slot) of each kept occurrence of the step; src [n] its store row.
    """
    real = rows >= 0
    a = np.searchsorted(kp, rows[real], "left")
    b = np.searchsorted(kp, rows[real], "right")
    nk = np.zeros(len(rows), np.int64)
    nk[real] = b - a
    K = T // 4 if T >= 128 and int(nk.max()) <= T // 4 else T
    ri = np.repeat(np.arange(len(rows)), nk)
    ki = np.arange(int(nk.sum())) - np.repeat(np.cumsum(nk) - nk, nk)
    src = (np.concatenate([by_passage[x:y] for x, y in zip(a, b)]) if len(a)
           else np.zeros(0, np.int64))
    gpos = np.zeros((len(rows), K), np.int32)
    gpos[ri, ki] = positions[src]
    return gpos, ri, ki, src


def make_forward(model, mesh, layer_index: int, n_layers: int, dtype: str, packed: bool = False):
    """``(fn, params)``: ``fn(params, input_ids [B, T], attention_mask [B, T], positions [B, K])
    -> [B, K, D]`` hidden states of layer ``layer_index`` at those positions, cast to the store
    ``dtype`` on device; batch sharded over ``data``, params and result replicated. With
    ``packed`` the fn takes a fifth argument, ``segment_ids`` [B, T] (packed rows)."""
    key = (mesh, layer_index, dtype, id(model.params), packed)
    cached = _FORWARD_CACHE.get(id(model))
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    out_dtype = jnp.dtype(STORE_DTYPES[dtype])
    module = model.module

    def forward(params, input_ids, attention_mask, gather_pos, segment_ids=None):
        """[B, T] ids, mask; [B, K] positions -> [B, K, D] hidden states at those positions."""
        FORWARD_TRACES.append((packed, tuple(input_ids.shape)))
        seg = {} if segment_ids is None else {"segment_ids": segment_ids}
        if layer_index == n_layers:
            h = module.apply({"params": params}, input_ids, attention_mask, **seg)
        else:
            _, states = module.apply({"params": params}, input_ids, attention_mask,
                                     output_all_hidden_states=True, **seg)
            h = states[layer_index]
        g = jnp.take_along_axis(h, gather_pos[:, :, None], axis=1)
        return g.astype(out_dtype)

    bs = batch_sharding(mesh)
    rep = replicated(mesh)
    fn = jax.jit(forward, in_shardings=(rep, bs, bs, bs) + ((bs,) if packed else ()), out_shardings=rep)

    def put(x):  # params as global replicated arrays (works across processes)
        if isinstance(x, jax.Array) and x.sharding == rep:
            return x
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, rep, lambda idx: host[idx])

    params = jax.tree.map(put, model.params)
    _FORWARD_CACHE.clear()  # one entry: the replicated params copy is the memory that matters
    _FORWARD_CACHE[id(model)] = (key, fn, params)
    weakref.finalize(model, _FORWARD_CACHE.pop, id(model), None)
    return fn, params


@dataclasses.dataclass
class _Feed:
    """What every step of one forward stage shares."""

    c: Counted
    corpus: Any
    fn: Any
    params: Any
    sharding: Any                  # the batch sharding
    batch_size: int
    rows_global: int               # batch_size × n_data
    kp: np.ndarray                 # [S] passage of each kept occurrence, sorted by (passage, position)
    by_passage: np.ndarray         # [S] store row of each entry of kp
    pad_id: int
    writer: StoreWriter | None     # process 0 only
    bar: Any
    pending: tuple | None = None   # (device output, row_index, k_index, store_rows, tokens) of the last step

    def drain(self) -> None:
        """Write the last dispatched step's vectors (while the next one runs on the devices)."""
        if self.pending is None:
            return
        dev_out, ri, ki, dst, ntok = self.pending
        self.pending = None
        host = np.asarray(jax.device_get(dev_out))
        if self.writer is not None and len(dst):
            self.writer.write(dst, host[ri, ki])
        self.bar.update(ntok)


def forward_stage(job: Job, model, mesh, c: Counted, corpus, text_field, L, layer_index,
                  n_layers, dtype, batch_size, window, progress, pack: bool = False):
    """Fill the store of ``c``'s sample in ``job.work / "store"`` with the teacher's hidden
    states, window by window from the last finished one. Returns the store directory.
    ``pack``: packed rows of :func:`pack_row_lengths` ``(L)`` (module docstring).

    Raises:
      SenseJaxError: the corpus changed since the counting pass (fewer passages, a passage
        tokenising differently, or another fingerprint; the work directory is then removed).
    """
    store_dir = _plan_store(job, c, int(model.config.hidden_size), dtype)
    progress_file = job.work / "progress.json"  # absent if killed right after the plan
    (windows_done,) = broadcast_ints([read_json(progress_file)["windows_done"]
                                      if job.proc == 0 and progress_file.exists() else 0])
    by_passage = np.lexsort((c.position, c.passage))  # rows[order] sorted by (passage, position)
    kp = c.passage[by_passage]
    needed_all = np.unique(kp)
    n_data = int(mesh.shape["data"])
    fn, params = make_forward(model, mesh, layer_index, n_layers, dtype, packed=pack)
    row_lengths = pack_row_lengths(L)
    total_tokens = int(c.lengths[needed_all].sum())
    done_tokens = int(c.lengths[needed_all[needed_all < windows_done * window]].sum())
    bar = tqdm(total=total_tokens, initial=done_tokens, desc="teacher forward", unit="tok",
               unit_scale=True, disable=not progress or job.proc != 0, dynamic_ncols=True,
               mininterval=1.0)
    pad_id = model.tokenizer.pad_token_id
    pad_id = int(pad_id if pad_id is not None else getattr(model.config, "pad_token_id", 0) or 0)
    feed = _Feed(c, corpus, fn, params, batch_sharding(mesh), batch_size, n_data * batch_size, kp,
                 by_passage, pad_id, StoreWriter(store_dir, dtype) if job.proc == 0 else None, bar)
    encode = make_encoder(model.tokenizer, L)
    hasher = PassageHasher()
    passages = iter_passages(corpus, text_field)
    pid, step_counter = 0, 0
    n_passages = len(c.lengths)
    for w in range(-(-n_passages // window)):
        lo, hi = w * window, min((w + 1) * window, n_passages)
        needed = needed_all[(needed_all >= lo) & (needed_all < hi)]
        if w < windows_done:
            steps = []
        elif pack:
            steps = plan_window_packed(needed, c.lengths, batch_size, n_data, row_lengths)
        else:
            steps = plan_window(needed, c.lengths, batch_size, n_data)
        local_ranges, mine = _local_rows(feed, steps)
        texts, pid = _read_window(passages, pid, hi, mine, hasher, corpus)
        if not steps:
            continue
        order = sorted(texts)
        ids_list, _ = encode([texts[p] for p in order]) if order else ([], 0)
        ids_of = dict(zip(order, ids_list))
        for st in steps:
            _run_step(feed, st, local_ranges[id(st)], ids_of)
            fail_point("step", step_counter)
            step_counter += 1
        feed.drain()
        if feed.writer is not None:
            feed.writer.flush()
            write_json_atomic(job.work / "progress.json", {"windows_done": w + 1})
        barrier(f"sense_jax.extract.window{w}")
        fail_point("window", w)
    feed.drain()
    bar.close()
    for text in passages:
        hasher.update(text)
    if feed.writer is not None:
        feed.writer.close()
        feed.writer = None
    if hasher.hexdigest() != c.stats["fingerprint"]:
        barrier("sense_jax.extract.changed")
        if job.proc == 0:
            shutil.rmtree(job.work, ignore_errors=True)
        raise SenseJaxError(f"corpus {corpus} changed during extraction; re-run to start over")
    return store_dir


def _plan_store(job: Job, c: Counted, hidden_size: int, dtype: str):
    """Process 0 writes the store's index arrays and zero vectors once (kept on resumption)."""
    store_dir = job.work / "store"
    (planned,) = broadcast_ints([int(store_dir.is_dir()) if job.proc == 0 else 0])
    if job.proc == 0 and not planned:
        V = len(c.occurrences)
        offsets = np.zeros(V + 1, np.int64)
        offsets[1:] = np.cumsum(np.bincount(c.tok, minlength=V))
        StoreWriter.plan(store_dir, offsets, c.occurrences.astype(np.int64),
                         np.stack([c.passage, c.position.astype(np.int64)], axis=1), hidden_size, dtype)
        fail_point("planned", 0)
    barrier("sense_jax.extract.planned")
    return store_dir


def _local_rows(feed: _Feed, steps: list[Step]) -> tuple[dict[int, tuple[int, int]], set[int]]:
    """This process's rows of every step (by ``id(step)``), and the passages they hold (the ones
    it tokenises)."""
    mine: set[int] = set()
    local_ranges = {}
    for st in steps:
        mine_rows = process_rows(feed.sharding, (feed.rows_global, st.length))
        rlo, rhi = mine_rows.start, mine_rows.stop
        local_ranges[id(st)] = (rlo, rhi)
        for m in range(rlo // feed.batch_size, -(-rhi // feed.batch_size)):
            if m < len(st.micro):
                mine.update(int(x) for x in st.micro[m])
    return local_ranges, mine


def _read_window(passages: Iterator[str], pid: int, hi: int, mine: set[int], hasher: PassageHasher,
                 corpus) -> tuple[dict[int, str], int]:
    """Read passages ``pid .. hi - 1`` (hashing every one); keep the texts of ``mine``."""
    texts: dict[int, str] = {}
    while pid < hi:
        text = next(passages, None)
        if text is None:
            raise SenseJaxError(f"corpus {corpus} changed during extraction (fewer passages)")
        hasher.update(text)
        if pid in mine:
            texts[pid] = text
        pid += 1
    return texts, pid


def _run_step(feed: _Feed, st: Step, local: tuple[int, int], ids_of: dict[int, list[int]]) -> None:
    """Feed this process's rows of step ``st``, dispatch the forward, then write the previous
    step's result (overlapping the host work with the devices)."""
    if st.layout is not None:
        return _run_packed_step(feed, st, local, ids_of)
    c, T, bsz = feed.c, st.length, feed.batch_size
    rows = np.full(feed.rows_global, -1, np.int64)
    flat_rows = np.concatenate(st.micro)
    for m, mb in enumerate(st.micro):
        rows[m * bsz:m * bsz + len(mb)] = mb
    gpos, ri, ki, src = gather_indices(rows, T, feed.kp, feed.by_passage, c.position)
    K = gpos.shape[1]
    rlo, rhi = local
    ids = np.full((rhi - rlo, T), feed.pad_id, np.int32)
    mask = np.zeros((rhi - rlo, T), np.int32)
    for r in range(rlo, rhi):
        p = int(rows[r])
        if p < 0:
            continue
        seq = ids_of[p]
        if len(seq) != c.lengths[p]:
            raise SenseJaxError(f"corpus {feed.corpus} changed during extraction "
                                f"(passage {p} tokenises differently)")
        ids[r - rlo, :len(seq)] = seq
        mask[r - rlo, :len(seq)] = 1
    g_ids = jax.make_array_from_process_local_data(feed.sharding, ids, (feed.rows_global, T))
    g_mask = jax.make_array_from_process_local_data(feed.sharding, mask, (feed.rows_global, T))
    g_pos = jax.make_array_from_process_local_data(feed.sharding, gpos[rlo:rhi], (feed.rows_global, K))
    dev_out = feed.fn(feed.params, g_ids, g_mask, g_pos)
    feed.drain()  # overlap: write the previous step while this one runs
    feed.pending = (dev_out, ri, ki, src, int(c.lengths[flat_rows].sum()))


def _run_packed_step(feed: _Feed, st: Step, local: tuple[int, int], ids_of: dict[int, list[int]]) -> None:
    """:func:`_run_step` for a packed step: rows of several passages with their segment ids."""
    c, T = feed.c, st.length
    gpos, ri, ki, src, rows, offs, pids = gather_indices_packed(st, feed.batch_size, feed.rows_global, feed.kp,
                                                                feed.by_passage, c.position)
    rlo, rhi = local
    ids = np.full((rhi - rlo, T), feed.pad_id, np.int32)
    seg = np.zeros((rhi - rlo, T), np.int32)
    last_row, n_seg = -1, 0
    for r, o, p in zip(rows, offs, pids):
        n_seg = n_seg + 1 if r == last_row else 1  # segment ids 1, 2, .. along the row
        last_row = r
        if not rlo <= r < rhi:
            continue
        seq = ids_of[int(p)]
        if len(seq) != c.lengths[p]:
            raise SenseJaxError(f"corpus {feed.corpus} changed during extraction "
                                f"(passage {int(p)} tokenises differently)")
        ids[r - rlo, o:o + len(seq)] = seq
        seg[r - rlo, o:o + len(seq)] = n_seg
    mask = (seg > 0).astype(np.int32)
    shape = (feed.rows_global, T)
    g_ids = jax.make_array_from_process_local_data(feed.sharding, ids, shape)
    g_mask = jax.make_array_from_process_local_data(feed.sharding, mask, shape)
    g_pos = jax.make_array_from_process_local_data(feed.sharding, gpos[rlo:rhi], shape)
    g_seg = jax.make_array_from_process_local_data(feed.sharding, seg, shape)
    dev_out = feed.fn(feed.params, g_ids, g_mask, g_pos, g_seg)
    feed.drain()
    feed.pending = (dev_out, ri, ki, src, int(c.lengths[pids].sum()))
