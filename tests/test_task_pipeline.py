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
