"""Step 1 of the method: teacher hidden states for a per-token uniform sample of a corpus.

METHOD.md §1 (Wang et al. 2025, §3.1): run a teacher over a corpus and keep, for every token id,
a uniform random sample of at most N (paper: 1000) of its contextual embeddings. The reference
code keeps the first N occurrences and then replaces old ones with count-dependent probabilities,
which is not uniform; here the sample is exactly uniform and a pure function of the corpus, the
tokenizer and the seed.

Sampling (bottom-k, :mod:`sense_jax.sampling`): every occurrence gets a 64-bit key that is a
pure function of (seed, passage, position); token t keeps the min(count_t, N) occurrences with
the smallest keys, a uniform sample that does not depend on batch size, order, devices or
processes and merges exactly across processes.

Modules: this one is the driver and the counting pass; :mod:`sense_jax.sampling` the keys,
:mod:`sense_jax.tokenizing` the encoder, :mod:`sense_jax.extract_forward` the forward stage,
:mod:`sense_jax.extract_job` the work directory (resumption) and the tests' fault hook,
:mod:`sense_jax.multiprocess` the collectives, :mod:`sense_jax.store` the store writer and
:mod:`sense_jax.fingerprints` the teacher / tokenizer ids.

Pipeline.
  1. Counting pass: tokenise (teacher's fast tokenizer, truncated to the model's length), count
     occurrences per token, keep a streaming bottom-N; no teacher forward. Special tokens are
     excluded with ``tokenizer.all_special_ids``. Processes split the chunks of passages and merge
     occurrences and candidates with ``process_allgather``.
  2. Plan: rows of the store are the kept occurrences sorted by (token, passage, position); only
     passages holding a kept occurrence are forwarded (the rest are skipped and counted).
  3. Forward pass: windows of consecutive passages; inside a window, passages are sorted by
     length and cut into micro-batches of ``batch_size`` rows (one per device per step, so
     each device always computes the same [batch_size, T] shapes whatever the device count,
     which makes the bytes identical on 1 or 8 devices). A step feeds ``batch_size × n_data``
     rows, each process its own slice (``jax.make_array_from_process_local_data``); padding
     rows have an all-zero mask. The jitted forward gathers the kept positions of each row and
     returns them replicated; process 0 writes them into a memory-mapped ``vectors.npy``.
  4. Finish: ``meta.json`` and ``COMPLETE`` are written, then the store directory is renamed
     into place (a reader never sees a half-written store).

Resuming: work lives in ``OUT.partial/`` beside the output (counting results, the store being
filled, ``progress.json`` saved atomically after each window). Re-running the same command
after a kill at any point continues from the last finished window and writes the same bytes.
In multi-process runs ``OUT`` must be on a filesystem shared by all processes; only process 0
writes.

Determinism. The sample (offsets, occurrences, sources) depends only on the corpus, tokenizer, N and
seed. The vectors' last bits also depend on each row's padded length, hence on ``batch_size``
and ``window_passages`` (kept in ``OUT.partial/job.json``, so a resumed run uses the same), but
not on the number of devices or processes.
"""

from __future__ import annotations

import os
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sense_jax.compile_cache import enable_compile_cache
from sense_jax.corpus import CorpusStats, PassageHasher, corpus_files, iter_passages, quick_fingerprint
from sense_jax.errors import SenseJaxError
from sense_jax.extract_forward import forward_stage
from sense_jax.extract_job import (IDENTITY_KEYS, WORK_SUFFIX, Counted, Job, existing_is_done,  # noqa: F401
                                   fail_point, load_counted, prepare_work_dir, save_counted, work_dir)
from sense_jax.fingerprints import config_hash, teacher_fingerprint, tokenizer_hash
from sense_jax.io_utils import check_out_spares_sources, replace_directory
from sense_jax.loading import Model, load_model
from sense_jax.multiprocess import allgather_many, barrier, broadcast_ints, process_info
from sense_jax.provenance import provenance
# the sampling's old home: kept importable from here
from sense_jax.sampling import POSITION_BITS, SAMPLER, BottomK, occurrence_keys  # noqa: F401
from sense_jax.sharding import make_mesh
from sense_jax.store import STORE_DTYPES, complete_store
from sense_jax.tokenizing import flatten, make_encoder, max_length_for

FORMAT_VERSION = 1
DEFAULT_N = 1000

# tokenizer -> tokenizer_hash (hashing a 30k vocabulary takes ~0.5 s; a re-run skips it)
_TOKENIZER_HASHES: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


# --- Pass 1: counting and sampling ----------------------------------------------------------------

def _count_pass(corpus, text_field, tokenizer, max_length, special_ids, V, n, seed,
                chunk_passages, progress) -> Counted:
    """Tokenise the corpus once (processes take chunks in turn), count every non-special token
    and keep each token's bottom-N occurrences (:class:`sense_jax.sampling.BottomK`), merged
    across processes. No teacher forward."""
    encode = make_encoder(tokenizer, max_length)

    proc, nproc = process_info()
    stats = CorpusStats()
    hasher = PassageHasher()
    sampler = BottomK(V, n, seed)
    occurrences = np.zeros(V, np.int64)
    special = np.asarray(sorted(special_ids), np.int32)
    local_lengths: list[tuple[int, np.ndarray]] = []
    truncated = 0
    bar = tqdm(desc="counting", unit=" passages", disable=not progress or proc != 0,
               dynamic_ncols=True, mininterval=1.0)
    chunk_idx = 0

    def flush(texts, first):
        nonlocal truncated
        ids, tr = encode(texts)
        truncated += tr
        flat, passage, position, lengths = flatten(ids, first)
        local_lengths.append((first, lengths))
        keep = ~np.isin(flat, special)
        if (flat[keep] >= V).any():
            raise SenseJaxError(f"tokenizer produced id {int(flat[keep].max())} >= the model's "
                                f"vocab_size {V}")
        occurrences[:] += np.bincount(flat[keep], minlength=V)
        sampler.add(flat[keep], passage[keep], position[keep])

    texts: list[str] = []
    first = 0
    for i, text in enumerate(iter_passages(corpus, text_field, stats)):
        hasher.update(text)
        if not texts:
            first = i
        texts.append(text)
        if len(texts) == chunk_passages:
            if chunk_idx % nproc == proc:
                flush(texts, first)
            fail_point("count", chunk_idx)
            chunk_idx += 1
            bar.update(len(texts))
            texts = []
    if texts:
        if chunk_idx % nproc == proc:
            flush(texts, first)
        bar.update(len(texts))
    bar.close()
    n_passages = stats.passages
    tok, passage, position = sampler.result()
    lengths = np.zeros(n_passages, np.int32)
    for first, ls in local_lengths:
        lengths[first:first + len(ls)] = ls
    if nproc > 1:  # merge occurrences, lengths and candidates (bottom-k of the union of bottom-ks)
        parts = allgather_many([occurrences, lengths, np.array([truncated], np.int64), tok, passage, position])
        occurrences = np.sum([p[0] for p in parts], axis=0)
        lengths = np.max([p[1] for p in parts], axis=0).astype(np.int32)
        truncated = int(sum(int(p[2][0]) for p in parts))
        merged = BottomK(V, n, seed)
        for p in parts:
            merged.add(p[3], p[4], p[5])
        tok, passage, position = merged.result()
    out_stats = stats.as_dict()
    out_stats["truncated"] = int(truncated)
    out_stats["fingerprint"] = hasher.hexdigest()
    return Counted(occurrences, tok, passage, position, lengths, out_stats)


def _counting_stage(job: Job, corpus, text_field, tokenizer, L, special_ids, V, n, seed,
                    chunk_passages, progress) -> Counted:
    """The counting pass's result: loaded from the work directory when a killed run saved it,
    else counted now (and saved by process 0)."""
    path = job.work / "counted"
    (done,) = broadcast_ints([int(path.is_dir()) if job.proc == 0 else 0])
    if done:
        return load_counted(path)
    counted = _count_pass(corpus, text_field, tokenizer, L, special_ids, V, n, seed,
                          chunk_passages, progress)
    s = counted.stats
    if s["passages"] == 0:
        raise SenseJaxError(f"corpus {corpus} holds no passages ({s['lines']} line(s): "
                            f"{s['empty_skipped']} empty, {s['malformed_skipped']} malformed "
                            f"JSONL / missing {text_field!r})")
    if len(counted.tok) == 0:
        raise SenseJaxError(f"corpus {corpus} holds no non-special tokens")
    if job.proc == 0:
        save_counted(path, counted)
    fail_point("counted", 0)
    barrier("sense_jax.extract.counted")
    return counted


# --- The extraction -------------------------------------------------------------------------------

def extract(model_or_path: Any, corpus_path: str | os.PathLike, out: str | os.PathLike, *,
            n_per_token: int = DEFAULT_N, seed: int = 0, batch_size: int = 32,
            dtype: str = "float32", layer: int = -1, mesh: Any = None, text_field: str = "text",
            max_length: int | None = None, window_passages: int = 8192,
            chunk_passages: int = 2048, compute_dtype: str | None = None,
            overwrite: bool = False, progress: bool = True, pack: bool = False) -> Path:
    """Extract a per-token uniform sample of teacher hidden states into a store at ``out``.

    Args:
      model_or_path: a :class:`sense_jax.Model` or a model directory for :func:`load_model`.
      corpus_path: text / JSONL / .gz file, directory of them, or saved ``datasets`` dataset
        (see :mod:`sense_jax.corpus`).
      out: store directory (layout in :mod:`sense_jax.store`); work in progress lives in
        ``out + ".partial"`` beside it.
      n_per_token: N, the sample size cap per token id (>= 1); token t keeps min(count_t, N).
      seed: sampling seed (any int); same seed, corpus and tokenizer -> same sample.
      batch_size: passages per device per step (the global batch is ``batch_size × n_data``);
        results are identical for any device count at the same ``batch_size``.
      dtype: stored vector dtype, "float32", "bfloat16" or "float16" (the cast happens on
        device; the compute dtype is the model's, e.g. ``load_model(path, dtype="bfloat16")``).
      layer: hidden-state index as in transformers' ``hidden_states`` (0 = embeddings output,
        L = last layer); negative counts from the end (-1 = last layer, the paper's choice).
      mesh: a ``jax.sharding.Mesh`` with a ``data`` axis (default: all devices,
        :func:`sense_jax.sharding.make_mesh`).
      text_field: JSONL key / dataset column of the text.
      max_length: truncate passages to this many tokens (default and cap: the model's maximum).
      window_passages: passages per resumption unit (progress is saved after each window).
      chunk_passages: passages per tokenisation call in the counting pass.
      compute_dtype: the teacher's compute dtype ("float32" or "bfloat16"); default: the
        model's own (float32 when loading from a path). Part of the store's identity.
      overwrite: replace a complete store at ``out`` made with other settings (or a partial
        one, or an empty directory; never anything else).
      progress: show tqdm progress bars (tokens/s and ETA) on process 0.
      pack: pack several passages per row (segment ids; rows of one or two lengths, so at most
        two compiled forward programs, and less padding; :mod:`sense_jax.extract_forward`).
        The same samples; the vectors agree with the unpacked run's within float rounding,
        not bit for bit, so ``packed: true`` is part of the store's identity (meta.json).

    Returns:
      ``out`` as a Path. The summary (passages, tokens seen, distinct tokens, tokens at the cap,
      passages truncated or skipped, fraction of forwards skipped) is in ``meta.json["summary"]``.

    Raises:
      SenseJaxError: N < 1, unknown dtype or layer, missing corpus, empty corpus, output not
        writable, or an existing store at ``out`` made with another teacher / seed / settings.
        An existing complete store is never modified unless ``overwrite``.
      ConfigError: ``out`` (or ``out.partial``) is or holds the corpus or the teacher, or is
        something else than an extraction store or an empty directory (even with ``overwrite``).
    """
    enable_compile_cache()

    if isinstance(n_per_token, bool) or not isinstance(n_per_token, (int, np.integer)) or n_per_token < 1:
        raise SenseJaxError(f"n_per_token (N) must be an integer >= 1, got {n_per_token!r}")
    if dtype not in STORE_DTYPES:
        raise SenseJaxError(f"unknown store dtype {dtype!r}; choose from {sorted(STORE_DTYPES)}")
    for name, value in (("batch_size", batch_size), ("window_passages", window_passages),
                        ("chunk_passages", chunk_passages)):
        if value < 1:
            raise SenseJaxError(f"{name} must be >= 1, got {value}")
    out = Path(out).absolute()
    corpus_files(corpus_path)  # raises on a missing corpus before any model loading
    # The store replaces OUT, and OUT.partial is discarded when its settings differ: neither may
    # hold the corpus or the teacher being read.
    teacher_path = model_or_path.path if isinstance(model_or_path, Model) else model_or_path
    for replaced in (out, work_dir(out)):
        check_out_spares_sources(replaced, corpus_path, teacher_path)

    model, teacher = _load_teacher(model_or_path, compute_dtype)
    n_layers = int(getattr(model.config, "num_hidden_layers"))
    layer_index = _layer_index(layer, n_layers)
    L = max_length_for(model, max_length)
    identity = {
        "teacher": teacher, "teacher_config_hash": config_hash(model.config),
        "compute_dtype": str(getattr(model.config, "dtype", "float32")),
        "tokenizer_hash": _tokenizer_hash(model.tokenizer), "layer": layer_index, "dtype": dtype,
        "n_per_token": int(n_per_token), "seed": int(seed), "max_length": L,
        "text_field": text_field, "corpus_files_fingerprint": quick_fingerprint(corpus_path, text_field),
    }
    if pack:  # absent when false: unpacked stores keep the identity they always had
        identity["packed"] = True
    proc, nproc = process_info()
    if existing_is_done(out, identity, overwrite, proc):
        if proc == 0 and work_dir(out).exists():  # killed after the final rename
            shutil.rmtree(work_dir(out), ignore_errors=True)
        return out
    mesh = mesh if mesh is not None else make_mesh()
    if "data" not in mesh.axis_names:
        raise SenseJaxError(f"mesh axes {mesh.axis_names} have no 'data' axis")
    job = Job(out, work_dir(out), identity, proc, nproc)
    fresh = _open_work_dir(job, dict(identity, batch_size=int(batch_size), window_passages=int(window_passages),
                                     format_version=FORMAT_VERSION))

    special_ids = sorted({int(i) for i in model.tokenizer.all_special_ids})
    V = int(model.config.vocab_size)
    try:
        counted = _counting_stage(job, corpus_path, text_field, model.tokenizer, L, special_ids, V,
                                  int(n_per_token), int(seed), chunk_passages, progress)
    except SenseJaxError:
        if fresh and proc == 0:
            shutil.rmtree(job.work, ignore_errors=True)
        raise
    store_dir = forward_stage(job, model, mesh, counted, corpus_path, text_field, L, layer_index,
                              n_layers, dtype, int(batch_size), int(window_passages), progress,
                              pack=bool(pack))
    meta = dict(identity, format_version=FORMAT_VERSION, sampler=SAMPLER, corpus=str(corpus_path),
                corpus_fingerprint=counted.stats["fingerprint"], num_layers=n_layers,
                hidden_size=int(model.config.hidden_size), vocab_size=V,
                special_ids=special_ids, summary=_summary(counted, int(n_per_token)),
                teacher_fingerprint=teacher_fingerprint(model.params, V, model.tokenizer),
                provenance=provenance())
    if proc == 0:
        _finish(job, store_dir, meta, overwrite)
    barrier("sense_jax.extract.done")
    return out


def _load_teacher(model_or_path: Any, compute_dtype: str | None):
    """(the teacher Model in ``compute_dtype``, its name: a local directory's absolute path, or
    the id as given)."""
    if compute_dtype not in (None, "float32", "bfloat16"):
        raise SenseJaxError(f"unknown compute dtype {compute_dtype!r}; choose float32 or bfloat16")
    if isinstance(model_or_path, Model):
        model = model_or_path
        if compute_dtype is not None and compute_dtype != str(getattr(model.config, "dtype", "")):
            model = model.with_dtype(compute_dtype)
    else:
        model = load_model(model_or_path, dtype=compute_dtype or "float32")
    teacher = str(model.path.absolute()) if Path(model.path).exists() else str(model.path)
    if model.tokenizer is None:
        raise SenseJaxError(f"{teacher}: the teacher has no tokenizer files")
    return model, teacher


def _layer_index(layer: Any, n_layers: int) -> int:
    """transformers' ``hidden_states`` index of ``layer`` (negative counts from the end)."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise SenseJaxError(f"layer must be an integer, got {layer!r}")
    layer_index = layer + n_layers + 1 if layer < 0 else layer
    if not 0 <= layer_index <= n_layers:
        raise SenseJaxError(f"layer {layer} out of range for a {n_layers}-layer teacher "
                            f"(0..{n_layers}, or -1..-{n_layers + 1})")
    return layer_index


def _tokenizer_hash(tokenizer) -> str:
    """:func:`sense_jax.fingerprints.tokenizer_hash`, remembered per tokenizer object."""
    try:
        return _TOKENIZER_HASHES[tokenizer]
    except (KeyError, TypeError):  # TypeError: not weakly referenceable or unhashable
        h = tokenizer_hash(tokenizer)
    try:
        _TOKENIZER_HASHES[tokenizer] = h
    except TypeError:
        pass
    return h


def _open_work_dir(job: Job, run_key: dict) -> bool:
    """:func:`prepare_work_dir` on process 0, its failure shared; True when the directory is new."""
    error = None
    try:
        fresh = prepare_work_dir(job, run_key)
    except SenseJaxError as e:
        error, fresh = e, False
    (failed,) = broadcast_ints([int(error is not None)])  # process 0 decides; nobody waits forever
    if error is not None:
        raise error
    if failed:
        raise SenseJaxError(f"process 0 could not create the work directory {job.work}")
    return fresh


def _summary(c: Counted, n: int) -> dict:
    """The run's figures. ``tokens_seen`` counts non-special token occurrences (what is sampled);
    ``tokens_forwarded`` counts every token, specials included, of the forwarded passages."""
    s = c.stats
    needed = len(np.unique(c.passage))
    return {
        "passages": int(s["passages"]),
        "lines": int(s["lines"]),
        "files": int(s["files"]),
        "empty_skipped": int(s["empty_skipped"]),
        "malformed_skipped": int(s["malformed_skipped"]),
        "undecodable_replaced": int(s["undecodable_replaced"]),
        # what the reader changed (sense_jax.corpus); absent in counting passes saved by older releases
        **{k: int(s.get(k, 0)) for k in ("bom_stripped", "crlf_line_endings", "cr_line_endings",
                                         "separators_replaced")},
        "truncated": int(s["truncated"]),
        "tokens_seen": int(c.occurrences.sum()),
        "distinct_tokens": int((c.occurrences > 0).sum()),
        "tokens_at_cap": int((c.occurrences >= n).sum()),
        "samples": int(len(c.tok)),
        "passages_forwarded": int(needed),
        "passages_skipped": int(s["passages"] - needed),
        "forward_skipped_fraction": float(1.0 - needed / max(1, s["passages"])),
        "tokens_forwarded": int(c.lengths[np.unique(c.passage)].sum()),
    }


def _finish(job: Job, store_dir: Path, meta: dict, overwrite: bool) -> None:
    """Complete the store, rename it to ``job.out``, remove the work directory."""
    complete_store(store_dir, meta)
    fail_point("final", 0)
    out = job.out
    if out.exists() and not overwrite:  # checked at the start; someone wrote it meanwhile
        raise SenseJaxError(f"{out} appeared during the extraction; the result is kept in {store_dir}")
    replace_directory(store_dir, out)
    fail_point("final", 1)
    shutil.rmtree(job.work, ignore_errors=True)


def summary_lines(meta: dict) -> list[str]:
    """Human-readable summary of a store's ``meta.json`` (used by the CLI)."""
    s = meta.get("summary", {})
    return [
        f"passages: {s.get('passages', 0):,} ({s.get('empty_skipped', 0):,} empty and "
        f"{s.get('malformed_skipped', 0):,} malformed lines skipped, "
        f"{s.get('undecodable_replaced', 0):,} with undecodable bytes replaced, "
        f"{s.get('truncated', 0):,} truncated to {meta.get('max_length')} tokens)",
        f"tokens seen: {s.get('tokens_seen', 0):,}; distinct tokens: {s.get('distinct_tokens', 0):,}; "
        f"at the cap N={meta.get('n_per_token')}: {s.get('tokens_at_cap', 0):,}",
        f"samples kept: {s.get('samples', 0):,}; passages forwarded: {s.get('passages_forwarded', 0):,}, "
        f"skipped: {s.get('passages_skipped', 0):,} "
        f"({100 * s.get('forward_skipped_fraction', 0.0):.1f}% of forward passes saved)",
    ]
