"""The pipeline's optional benchmarks stage: skipped without evaldata, else every task x run."""

from __future__ import annotations

import json

from transformers import BertConfig

from conftest import save_tiny_hf_model
from sense_jax.benchmarks import common
from sense_jax.pipeline import Pipeline, PipelineConfig
from test_benchmarks import tiny_dict, write


def test_benchmarks_stage_says_why_it_is_skipped(tmp_path, monkeypatch):
    monkeypatch.delenv("SENSE_JAX_EVALDATA", raising=False)
    logs = []
    Pipeline(PipelineConfig(out=str(tmp_path / "run")), log=logs.append).stage_benchmarks()
    assert logs == ["[benchmarks] skipped: no --set evaldata=DIR and no SENSE_JAX_EVALDATA"]
    monkeypatch.setenv("SENSE_JAX_EVALDATA", str(tmp_path / "nowhere"))
    Pipeline(PipelineConfig(out=str(tmp_path / "run")), log=logs.append).stage_benchmarks()
    assert logs[-1] == f"[benchmarks] skipped: {tmp_path / 'nowhere'} does not exist"
    assert not (tmp_path / "run" / "benchmarks").exists()


def test_benchmarks_stage_runs_each_task_for_each_run(tmp_path, minilm_dir):
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    run = tmp_path / "run"
    save_tiny_hf_model(run / "teacher", cfg, tokenizer_dir=minilm_dir)
    bm = common.load_bench_model(run / "teacher")
    tiny_dict(bm, run / "senses")
    tiny_dict(bm, run / "senses_k1", k=1)
    write(tmp_path / "evaldata" / "wordsim" / "RG.txt", "bank\tplant\t3\nbank\tplant\t3\nbass\tcar\t1\ncat\tbank\t2\n")
    logs = []
    p = Pipeline(PipelineConfig(out=str(run), evaldata=str(tmp_path / "evaldata"), benchmark_layers="1"),
                 log=logs.append)
    p.stage_benchmarks()
    res = json.loads((run / "benchmarks" / "benchmarks.json").read_text())
    assert set(res) == {"wordsim"}
    assert {k: v["layer"] for k, v in res["wordsim"].items()} == {"teacher_senses": 2, "teacher_k1": 2,
                                                                  "teacher_layer1": 1}
    assert res["wordsim"]["teacher_senses"]["coverage"]["rg65"]["pairs"] == 3  # repeated first line dropped
    assert "one_sense" not in res["wordsim"]["teacher_layer1"]["variants"]  # no dictionary at layer 1
    assert "| one_sense |" in (run / "benchmarks" / "benchmarks.md").read_text()
    p.stage_benchmarks()
    assert logs[-1].startswith("[benchmarks] done already")
