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

from sense_jax.batching import DEFAULT_BUCKETS, length_bucketed_batches
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


@dataclasses.dataclass
class Step:
    """One forward step: ``n_data`` micro-batches padded to the same length."""

    length: int                    # padded length T
    micro: list[np.ndarray]        # per micro-batch, global passage ids (<= batch_size each)


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


def make_forward(model, mesh, layer_index: int, n_layers: int, dtype: str):
    """``(fn, params)``: ``fn(params, input_ids [B, T], attention_mask [B, T], positions [B, K])
    -> [B, K, D]`` hidden states of layer ``layer_index`` at those positions, cast to the store
    ``dtype`` on device; batch sharded over ``data``, params and result replicated."""
    key = (mesh, layer_index, dtype, id(model.params))
    cached = _FORWARD_CACHE.get(id(model))
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    out_dtype = jnp.dtype(STORE_DTYPES[dtype])
    module = model.module

    def forward(params, input_ids, attention_mask, gather_pos):
        """[B, T] ids, mask; [B, K] positions -> [B, K, D] hidden states at those positions."""
        if layer_index == n_layers:
            h = module.apply({"params": params}, input_ids, attention_mask)
        else:
            _, states = module.apply({"params": params}, input_ids, attention_mask,
                                     output_all_hidden_states=True)
            h = states[layer_index]
        g = jnp.take_along_axis(h, gather_pos[:, :, None], axis=1)
        return g.astype(out_dtype)

    bs = batch_sharding(mesh)
    rep = replicated(mesh)
    fn = jax.jit(forward, in_shardings=(rep, bs, bs, bs), out_shardings=rep)

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
                  n_layers, dtype, batch_size, window, progress):
    """Fill the store of ``c``'s sample in ``job.work / "store"`` with the teacher's hidden
    states, window by window from the last finished one. Returns the store directory.

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
    fn, params = make_forward(model, mesh, layer_index, n_layers, dtype)
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
        steps = plan_window(needed, c.lengths, batch_size, n_data) if w >= windows_done else []
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
