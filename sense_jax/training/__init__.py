"""Sense knowledge distillation trainer (METHOD §3): a sharded, restartable JAX training loop.

Run it::

    sense-jax distill --preset runlocal --set senses=DICT_DIR --set train_data=corpus.txt
    sense-jax distill --config run.yaml --set steps=20000 --set fsdp=true
    python -m train.distill --config run.json          # same thing (train/distill.py)

Design (STYLE §8-10):

* one pure ``train_step(state, batch) -> (state, metrics)``, jitted once with explicit shardings
  and ``donate_argnums=0``; the teacher forward runs inside it under ``stop_gradient``, unless
  the batch carries the teacher's SKD targets (or MSE states) from the teacher cache
  (``teacher_cache``, :mod:`~sense_jax.training.cache`), which skips it; the
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
* batches: one passage per row padded to a length bucket (one step program per bucket), or
  with ``pack_length`` > 0 several passages per row told apart by ``segment_ids``
  (:class:`~sense_jax.training.data.PackedStream`): one step shape, one program, little padding;
* per-step randomness: ``fold_in(rng, step)`` (the BERT student has no dropout, so nothing
  consumes it yet; it is threaded so stochastic extensions stay resumable);
* the only documented non-determinism: none on CPU (resume is bit-exact); on GPU/TPU XLA's
  reductions may differ at float rounding between runs.

Outputs in ``out_dir``: ``config.json`` (the resolved config), ``metrics.jsonl``, ``curves.png``,
``checkpoints/`` (Orbax), ``tokenizer/`` (the teacher's files, for export) and ``tensorboard/``
when tensorboardX is installed.

Modules, one job each (``sense_jax.trainer`` re-exports their public names):

* :mod:`~sense_jax.training.config`: :class:`DistillConfig` (validated in ``__post_init__``),
  presets, :func:`load_config`;
* :mod:`~sense_jax.training.data`: corpus reading, :class:`PassageStream`, :class:`PackedStream`,
  :func:`tokenize`;
* :mod:`~sense_jax.training.step`: :class:`TrainState`, the optimizer, frozen subtrees, the
  pure train and eval steps;
* :mod:`~sense_jax.training.layout`: the mesh and every sharding (optimizer state included,
  from its logical boxes);
* :mod:`~sense_jax.training.checkpoint`: the Orbax manager, save, the resume check and the one
  "newest, else the previous" restore (training, resume and export);
* :mod:`~sense_jax.training.setup`: teacher, dictionary, student, jitted steps, step-0 state;
* :mod:`~sense_jax.training.cache`: the teacher cache of a run (built once, read by the step);
* :mod:`~sense_jax.training.metrics`: ``metrics.jsonl``, TensorBoard, ``curves.png``;
* :mod:`~sense_jax.training.export`: checkpoint -> transformers directory;
* :mod:`~sense_jax.training.loop`: :func:`train`, which ties them.

The command-line entry point is :mod:`sense_jax.commands.distill` (``sense-jax distill``).
"""
