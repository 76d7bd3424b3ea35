"""Parts of the split trainer (issue 12): the config checks itself, the trainer counts the epochs'
steps, the optimizer state is sharded like the params it follows, one abstract init per family."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

import sense_jax
from sense_jax import trainer as T
from sense_jax.errors import ConfigError

FIXTURE = Path(__file__).parent / "data" / "ckpt_v0"
SENTENCES = Path(__file__).parent / "data" / "sentences.txt"


def test_a_directly_built_config_is_checked():
    with pytest.raises(ConfigError, match=r"config: steps=0: must be >= 1"):
        T.DistillConfig(steps=0)
    with pytest.raises(ConfigError, match="metric"):
        T.DistillConfig(metric="dotty")


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_floats_are_refused_as_such(value, tmp_path):
    """Fresh-user trial: ``--set learning_rate=inf`` was accepted (the run died on a NaN loss,
    metrics.jsonl got "lr": NaN); ``nan`` was refused as "must be >= 0". Every float setting is
    now refused when not finite, saying so: --set, a config file, a directly built config, the
    pipeline's and the task recipe's configs."""
    from sense_jax.pipeline import load_pipeline_config
    from sense_jax.task_pipeline import load_task_pipeline_config

    with pytest.raises(ConfigError, match=f"^--set: learning_rate='{value}' must be a finite number$"):
        T.load_config(None, [f"learning_rate={value}"])
    f = tmp_path / "c.yaml"
    f.write_text(f"kd_alpha: .{value.lstrip('-')}\n" if value != "-inf" else "kd_alpha: -.inf\n")
    with pytest.raises(ConfigError, match=f"config file {f}: kd_alpha=.* must be a finite number"):
        T.load_config(f)
    with pytest.raises(ConfigError, match=f"^config: clip_norm={value}: must be a finite number$"):
        T.DistillConfig(clip_norm=float(value))
    with pytest.raises(ConfigError, match="epochs='.*' must be a finite number"):
        load_pipeline_config(None, [f"epochs={value}"])
    with pytest.raises(ConfigError, match="student_learning_rate='.*' must be a finite number"):
        load_task_pipeline_config(None, ["task=sst2", f"student_learning_rate={value}"])


def test_steps_for_epochs_counts_the_trainers_own_training_passages():
    # 40 passages; eval_fraction 0.05 holds out int(40 * 0.05) = 2, so 38 train: ceil(38 / 3) = 13.
    cfg = T.DistillConfig(train_data=str(SENTENCES), batch_size=3)
    assert len(SENTENCES.read_text(encoding="utf-8").splitlines()) == 40
    assert T.steps_for_epochs(cfg, 1.0) == 13
    assert T.steps_for_epochs(cfg, 0.5) == 7      # ceil(19 / 3)
    # A separate held-out corpus: all 40 train, ceil(40 / 3) = 14; accumulation counts A x B.
    held = T.DistillConfig(train_data=str(SENTENCES), eval_data=str(SENTENCES), batch_size=3)
    assert T.steps_for_epochs(held, 1.0) == 14
    assert T.steps_for_epochs(T.DistillConfig(train_data=str(SENTENCES), batch_size=2, grad_accum=2), 1.0) == 10


def test_steps_for_epochs_counts_packed_rows():
    # pack_length 64, max_length 16: the 38 training passages (4..16 tokens with the fixture
    # teacher's tokenizer) fill R rows, R >= their tokens / 64; batch_size counts rows.
    import numpy as np

    from sense_jax.loading import load_tokenizer
    from sense_jax.training.data import run_passages, truncated_lengths

    cfg = T.DistillConfig(train_data=str(SENTENCES), teacher=str(FIXTURE / "teacher"), batch_size=2,
                          max_length=16, pack_length=64)
    passages, _ = run_passages(cfg)
    lengths = truncated_lengths(load_tokenizer(FIXTURE / "teacher"), passages, 16)
    R = T.PackedStream(passages, load_tokenizer(FIXTURE / "teacher"), 2, 16, 64, 0).rows_per_epoch
    assert len(passages) == 38 and np.ceil(lengths.sum() / 64) <= R <= np.ceil(lengths.sum() / 64) + 1 < 19
    assert T.steps_for_epochs(cfg, 1.0) == -(-R // 2) and T.steps_for_epochs(cfg, 2.5) == -(-5 * R // 4)
    with pytest.raises(ConfigError, match="pack_length=8: must be 0 or >= max_length=16"):
        T.DistillConfig(max_length=16, pack_length=8)
    with pytest.raises(ConfigError, match="group_by_length"):
        T.DistillConfig(pack_length=256, group_by_length=4)


def _by_path(tree) -> dict[tuple, object]:
    return {tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in p): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("freeze", [False, True])
def test_optimizer_moments_are_sharded_like_their_params(freeze):
    teacher = sense_jax.load_model(FIXTURE / "teacher")
    from sense_jax.students import split_pooler, truncated_student

    scfg, _ = truncated_student(teacher.config, split_pooler(jax.device_get(teacher.params))[0], 1)
    cfg = T.DistillConfig(fsdp=True, freeze_embeddings=freeze, batch_size=1)
    layout = T.make_layout(cfg, teacher.family, scfg, teacher.config, True, T.make_optimizer(cfg))
    params = _by_path(layout.state.params)
    moments = {p: s for p, s in _by_path(layout.state.opt_state).items() if {"mu", "nu"} & set(p)}
    assert any(s.spec != jax.sharding.PartitionSpec() for s in params.values())  # FSDP shards some
    n = 0
    for path, s in moments.items():
        key = path[path.index("mu" if "mu" in path else "nu") + 1:]
        assert s.spec == params[key].spec, path
        n += 1
    frozen = 2 + (5 if freeze else 0)  # pooler kernel, bias (+ the embeddings: 3 tables, LayerNorm scale, bias)
    assert n == 2 * (len(params) - frozen)
    others = [s for p, s in _by_path(layout.state.opt_state).items() if not {"mu", "nu"} & set(p)]
    assert others and all(s.spec == jax.sharding.PartitionSpec() for s in others)  # counts: replicated
    # The abstract state is what a step-0 state of these configs holds.
    assert jax.tree.structure(layout.abstract_state.opt_state) == jax.tree.structure(
        jax.eval_shape(T.make_optimizer(cfg).init, layout.abstract_state.params))


def test_one_abstract_init_per_family_matches_a_real_init():
    from sense_jax.convert import abstract_params, init_params

    teacher = sense_jax.load_model(FIXTURE / "teacher")
    real = init_params(teacher.family, teacher.config, seed=3)
    for abstract in (abstract_params(teacher.family, teacher.config), teacher.family.abstract_params(teacher.config)):
        assert jax.tree.structure(abstract) == jax.tree.structure(real)
        assert [(a.shape, a.dtype) for a in jax.tree.leaves(abstract)] == \
            [(r.shape, r.dtype) for r in jax.tree.leaves(real)]
    boxed = teacher.family.abstract_params(teacher.config, boxed=True)
    names = {tuple(x.names) for x in jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))}
    assert ("vocab", "embed") in names or any("embed" in n for n in names)


def test_the_mse_baseline_needs_no_sense_dictionary(tmp_path):
    # Before: "config: senses (the sense dictionary directory) is required", and every step
    # gathered the dictionary and scored sense accuracy it did not train on.
    from make_checkpoint_fixture import config_overrides

    sets = config_overrides(FIXTURE, tmp_path / "run", 2) + ["senses=", "skd_weight=0", "mse_weight=1",
                                                              "eval_every=1", "log_every=1"]
    result = T.train(T.load_config(None, sets), log=lambda m: None)
    assert int(result.state.step) == 2 and result.setup.sense_dict is None
    assert [r["kind"] for r in result.history] == ["train", "train"]  # nothing to score held out
    for r in result.history:
        assert r["loss"] == r["mse"] > 0 and "accuracy" not in r and "skd" not in r
    out = T.export_checkpoint(tmp_path / "run", tmp_path / "hf", log=lambda m: None)
    assert (Path(out) / "model.safetensors").exists()


def test_curves_are_drawn_for_task_runs_whose_dev_records_hold_no_accuracy(tmp_path):
    # Before: KeyError 'accuracy' at the end of every regression (STS-B: pearson, spearman) or
    # MNLI (accuracy_matched) fine-tuning, so `sense-jax finetune --regression` never finished.
    from sense_jax.training.metrics import plot_curves

    train = [{"kind": "train", "step": s, "loss": 1.0 / s, "accuracy": 0.0} for s in (1, 2)]
    for ev in ({"pearson": 0.5, "spearman": 0.4}, {"accuracy_matched": 0.6, "accuracy_mismatched": 0.5}):
        out = plot_curves(train + [{"kind": "eval", "step": 2, "examples": 4.0, **ev}], tmp_path / "c.png")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        out.unlink()


def test_a_run_into_a_model_directory_is_refused_and_writes_nothing(tmp_path):
    # Before: `sense-jax finetune M DATA M` (or distill with out_dir=M) replaced M's config.json by
    # the run config, and M could no longer be loaded.
    import shutil

    from make_checkpoint_fixture import config_overrides

    model = shutil.copytree(FIXTURE / "teacher", tmp_path / "model")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    with pytest.raises(ConfigError, match=r"model[/\\]config.json is not a run's config"):
        T.train(T.load_config(None, config_overrides(FIXTURE, model, 2)), log=lambda m: None)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_a_run_into_one_of_its_inputs_is_refused_and_writes_nothing(tmp_path):
    # Fresh-user trial: distill with out_dir = the sense dictionary, the store, or the folder
    # holding teacher, senses and corpus exited 0 and wrote checkpoints/, config.json and
    # tokenizer/ among them (a later `cluster --overwrite` then refused the spoiled dictionary).
    import shutil

    from make_checkpoint_fixture import config_overrides

    work = tmp_path / "work"
    for name in ("teacher", "senses"):
        shutil.copytree(FIXTURE / name, work / name)
    corpus = shutil.copy(Path(__file__).parent / "data" / "sentences.txt", work / "corpus.txt")
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    for out, verb, src in ((work / "senses", "is", work / "senses"), (work, "holds", work / "teacher")):
        sets = [s for s in config_overrides(FIXTURE, out, 2) if not s.startswith(("teacher=", "senses=", "train_data="))]
        sets += [f"teacher={work / 'teacher'}", f"senses={work / 'senses'}", f"train_data={corpus}"]
        with pytest.raises(ConfigError, match=f"output {out} {verb} the input {src}"):
            T.train(T.load_config(None, sets), log=lambda m: None)
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before
