"""The task recipe as one command (issue 13 item 6): sense-jax pipeline --set task=... on a tiny
random BERT and a two-label JSONL task; every stage resumable."""

from __future__ import annotations

import json

import pytest

from skd_helpers import make_teacher

SUBJECTS = ["the film", "this book", "the meal", "our trip", "the song", "that game", "the hotel", "his talk"]


@pytest.mark.slow
def test_task_pipeline_runs_every_stage_writes_the_papers_rows_and_resumes(tmp_path, minilm_dir, capsys):
    from sense_jax.cli import main

    teacher = make_teacher(tmp_path / "teacher", minilm_dir)
    (tmp_path / "data").mkdir()
    rows = [{"sentence": f"{s} was {w}", "label": lab} for s in SUBJECTS for w, lab in (("good", "pos"), ("bad", "neg"))]
    for split in ("train", "dev"):
        (tmp_path / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["pipeline", "--out", str(tmp_path / "out"), "--set", f"teacher={teacher}",
            "--set", f"task_data={tmp_path / 'data'}", "--set", "text_fields=sentence", "--set", "k=2",
            "--set", "n_per_token=8", "--set", "batch_size=8", "--set", "max_length=16",
            "--set", "teacher_epochs=1", "--set", "student_epochs=1", "--set", "student_layers=1",
            "--set", "objectives=skd,task_only", "--set", "progress=false", "--set", "teacher_learning_rate=1e-3"]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    variants = [r["variant"] for r in report["rows"]]
    assert variants == ["teacher", "teacher + senses", "skd_student", "skd_student + senses", "task_only_student"]
    for r in report["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["parameters"] > 0 and r["tokens_per_s"] > 0
    assert report["rows"][2]["parameters"] < report["rows"][0]["parameters"]
    md = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "| skd_student + senses |" in md
    capsys.readouterr()
    assert main(argv) == 0  # a second run finds every stage done
    err = capsys.readouterr().err
    for stage in ("finetune", "corpus", "extract", "cluster", "distill", "evaluate"):
        assert f"[{stage}] done already" in err


def test_a_teacher_that_cannot_be_fine_tuned_on_the_data_stops_the_recipe_before_anything_is_written(
        tmp_path, minilm_dir, capsys):
    # Before: OUT and OUT/pipeline_config.json were written, then the finetune stage found the
    # missing teacher, the head of another size or the label outside the teacher's vocabulary.
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from sense_jax.cli import main
    from sense_jax.labelled import LabelVocabulary
    from skd_helpers import TINY

    torch.manual_seed(0)
    three = tmp_path / "three"
    BertForSequenceClassification(BertConfig(**TINY, num_labels=3)).save_pretrained(str(three))
    for f in minilm_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            (three / f.name).write_bytes(f.read_bytes())
    named = tmp_path / "named"  # a head of 2 labels whose recorded names are not the data's
    BertForSequenceClassification(BertConfig(**TINY, num_labels=2)).save_pretrained(str(named))
    for f in three.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            (named / f.name).write_bytes(f.read_bytes())
    LabelVocabulary(names=("no", "yes")).save(named)
    (tmp_path / "data").mkdir()
    rows = [{"sentence": f"{s} was {w}", "label": lab} for s in SUBJECTS[:2] for w, lab in (("good", "pos"), ("bad", "neg"))]
    for split in ("train", "dev"):
        (tmp_path / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    capsys.readouterr()  # transformers' save progress bars
    for teacher, needle in ((three, "classification head of 3 labels but the custom data has 2"),
                            (tmp_path / "missing", "model directory not found"),
                            (named, "train.jsonl:1: label 'pos' is not in the label vocabulary")):
        rc = main(["pipeline", "--out", str(out), "--set", f"teacher={teacher}", "--set",
                   f"task_data={tmp_path / 'data'}", "--set", "text_fields=sentence", "--set", "progress=false"])
        lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert rc == 2 and len(lines) == 1 and needle in lines[0], lines
        assert not out.exists()


def test_the_recipe_passes_skd_weight_to_its_students_and_refuses_a_negative_one(tmp_path):
    # Before: the pipeline had no skd_weight key (refused as unknown), so its SKD student always
    # summed task + 1 × SKD, the setting under which the WiC SKD student's task loss never moved.
    from sense_jax.errors import ConfigError
    from sense_jax.task_pipeline import TaskPipeline, load_task_pipeline_config

    cfg = load_task_pipeline_config(overrides=["task=wic", "skd_weight=0.1"], out=str(tmp_path / "out"))
    pipe = TaskPipeline(cfg)
    assert pipe._train_config("skd", "teacher", senses="senses", out_dir=str(tmp_path / "skd")).skd_weight == 0.1
    default = TaskPipeline(load_task_pipeline_config(overrides=["task=wic"], out=str(tmp_path / "o2")))
    assert default._train_config("skd", "teacher", senses="senses", out_dir=str(tmp_path / "skd")).skd_weight == 1.0
    with pytest.raises(ConfigError, match="skd_weight=-0.5"):
        load_task_pipeline_config(overrides=["task=wic", "skd_weight=-0.5"])
