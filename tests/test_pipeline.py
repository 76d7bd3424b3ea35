"""The main job end to end on a tiny random teacher with the real tokenizer and WordNet data."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
from transformers import BertConfig

from sense_jax.errors import ConfigError, SenseJaxError
from sense_jax.pipeline import Pipeline, PipelineConfig, load_pipeline_config
from sense_jax.sense_dict import SenseDictionary
from sense_jax.store import open_store
from conftest import save_tiny_hf_model

VARIANTS = {"teacher", "teacher_senses", "teacher_one_sense", "skd_student_senses", "skd_student",
            "mse_student", "truncated_student"}


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, minilm_dir):
    # 128 positions: the WordNet suite's items (cut to the models' positions) are those of the
    # default run, so its random baseline is not degenerate (fewer positions gave random ARI 0).
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    return save_tiny_hf_model(tmp_path_factory.mktemp("teacher") / "tiny", cfg, seed=5, tokenizer_dir=minilm_dir)


def _cfg(tmp_path, teacher, **kw) -> PipelineConfig:
    # The smallest run through every stage and table, with as few compiled shapes as possible:
    # max_length 8 (the smallest length bucket) gives one training-step program per run, and
    # n_per_token 16 (the smallest k-means bucket) one k-means program per K; the 400 glosses in
    # one extraction batch, one forward program (batches of 64 fell in 5 length buckets).
    base = dict(out=str(tmp_path / "run"), teacher=str(teacher), n_glosses=400, n_heldout=50, n_per_token=16,
                extract_batch_size=512,
                k=3, epochs=0.25, batch_size=16, max_length=8, student_layers=1, eval_max_lemmas=12,
                eval_train=60, eval_test=30, speed_sentences=8, progress=False,
                teacher_cache="on")  # auto would skip it at epochs 0.25: it would not pay
    base.update(kw)
    return PipelineConfig(**base)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_teacher):
    tmp = tmp_path_factory.mktemp("pipeline")
    logs = []
    Pipeline(_cfg(tmp, tiny_teacher), log=logs.append).run()
    return tmp, logs


def test_pipeline_writes_a_complete_report(finished):
    tmp, _ = finished
    report_dir = tmp / "run" / "report"
    report = json.loads((report_dir / "report.json").read_text())
    for block in ("wsi", "wic", "classification", "retrieval", "size", "speed"):
        assert block in report, block
    assert set(report["classification"]) == VARIANTS == set(report["retrieval"])
    assert {"one_sense", "random", "teacher_senses", "skd_student_senses"} <= set(report["wsi"])
    for m in report["classification"].values():
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
    assert report["wsi"]["one_sense"]["ari"] == 0.0
    assert report["size"]["skd_student"]["params"] < report["size"]["teacher"]["params"]
    assert report["size"]["sense_dictionary"]["senses"] > 0
    md = (report_dir / "report.md").read_text()
    assert "## classification" in md and "| skd_student_senses |" in md
    assert {"curves_skd.png", "curves_mse.png"} <= {p.name for p in report_dir.glob("*.png")}


def test_each_stage_logs_its_time_and_the_peak_memory_so_far(finished):
    import re

    from sense_jax.pipeline import peak_rss_bytes

    _, logs = finished
    lines = [re.fullmatch(r"\[(\w+)\] \d+s, peak RSS so far (\d+\.\d\d) GiB", m) for m in logs]
    peaks = {m[1]: float(m[2]) for m in lines if m}
    assert list(peaks) == ["convert", "corpus", "extract", "cluster", "distill", "evaluate"], logs
    # getrusage's high-water mark only rises, and this process has held every stage's memory
    assert list(peaks.values()) == sorted(peaks.values()) and 0 < peaks["convert"]
    assert peaks["evaluate"] <= peak_rss_bytes() / 2**30 + 0.005


def test_rerun_skips_every_stage_and_changes_nothing(finished, tiny_teacher):
    tmp, _ = finished
    before = (tmp / "run" / "report" / "report.json").read_bytes()
    logs = []
    Pipeline(_cfg(tmp, tiny_teacher), log=logs.append).run()
    for stage in ("convert", "corpus", "extract", "cluster", "distill", "evaluate"):
        assert any(line.startswith(f"[{stage}] done already") for line in logs), stage
    assert (tmp / "run" / "report" / "report.json").read_bytes() == before


def test_stage_times_add_up_over_the_runs_into_one_output(tmp_path):
    """A resumed run's report gave the seconds it took to skip the finished stages (about 0) as
    their times; OUT/timings.json now sums each stage's seconds over every run, failed ones too."""
    from sense_jax.pipeline import TIMINGS_FILE, run_stages

    class Job:  # run_stages' contract: out, timings, log and one stage_<name>() per stage
        def __init__(self, fail=False):
            self.out, self.timings, self.logs, self.fail, self.seen = tmp_path, {}, [], fail, None
            self.log = self.logs.append

        def stage_work(self):
            time.sleep(0.05)
            if self.fail:
                raise SenseJaxError("killed")

        def stage_report(self):
            self.seen = dict(self.timings)  # what a report written now would show

    with pytest.raises(SenseJaxError):
        run_stages(Job(fail=True), ["work", "report"])
    first = json.loads((tmp_path / TIMINGS_FILE).read_text())
    assert set(first) == {"work"} and first["work"] >= 0.05  # the failed stage's time is kept
    job = Job()
    run_stages(job, ["work", "report"])
    second = json.loads((tmp_path / TIMINGS_FILE).read_text())
    assert second["work"] >= first["work"] + 0.05 and job.seen["work"] == second["work"]
    assert job.timings == second and set(second) == {"work", "report"}
    (tmp_path / TIMINGS_FILE).write_text("[1, 2]")  # a damaged record loses only the earlier times
    run_stages(Job(), ["report"])
    assert set(json.loads((tmp_path / TIMINGS_FILE).read_text())) == {"report"}


def test_inspect_shows_the_sampled_contexts_and_refuses_another_corpus(finished):
    """Fresh-user trial: ``inspect --corpus WRONG`` printed other texts' tokens as the word's contexts."""
    from sense_jax.inspection import token_senses

    run = finished[0] / "run"
    store = open_store(run / "store")
    tid = int(np.argmax(np.asarray(store.n_samples())))  # the most sampled token, surely with senses
    r = token_senses(f"#{tid}", run / "senses", run / "store", contexts=2)
    texts = [t for s in r["senses"] for _, t in s["contexts"]]
    assert texts and all("[[" in t and "]]" in t for t in texts)
    # each sense shows both its share of the samples by the look-up and the dictionary's own count
    r = token_senses(f"#{tid}", run / "senses", run / "store", contexts=0, metric="l2")
    sd = SenseDictionary.load(run / "senses")
    start = int(np.asarray(sd.offsets)[tid])
    assert [s["count"] for s in r["senses"]] == np.asarray(sd.counts)[start:start + len(r["senses"])].tolist()
    assert sum(s["count"] for s in r["senses"]) == sum(s["assigned"] for s in r["senses"]) == r["samples"]
    wrong = run / "corpus" / "heldout.txt"  # definitions too, but not the extracted ones
    with pytest.raises(SenseJaxError, match="not the corpus the store was extracted from"):
        token_senses(f"#{tid}", run / "senses", run / "store", corpus=wrong, contexts=2)


def test_a_half_written_stage_is_redone_identically(finished, tiny_teacher):
    tmp, _ = finished
    senses = tmp / "run" / "senses" / "senses.safetensors"
    before = senses.read_bytes()
    (tmp / "run" / "senses" / "meta.json").unlink()  # as if killed before completion was marked
    logs = []
    Pipeline(_cfg(tmp, tiny_teacher), log=logs.append).run(stages=("cluster",))
    assert any(m.startswith("[cluster] K=3:") for m in logs), logs  # really clustered again
    assert any(m.startswith("[cluster] done already") for m in logs), logs  # the complete K=1 kept
    assert senses.read_bytes() == before


def test_other_settings_into_the_same_output_are_refused(finished, tiny_teacher):
    tmp, _ = finished
    with pytest.raises(ConfigError, match=r"made with other settings \(k: 3 then, 5 now\)"):
        Pipeline(_cfg(tmp, tiny_teacher, k=5)).run()


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"k": 7, "n_glosses": 1000}))
    cfg = load_pipeline_config(f, ["seed=3"], out=str(tmp_path / "x"))
    assert (cfg.k, cfg.n_glosses, cfg.seed, cfg.out) == (7, 1000, 3, str(tmp_path / "x"))
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) 'kk' \(did you mean 'k'\?\)"):
        load_pipeline_config(None, ["kk=3"])
    with pytest.raises(ConfigError, match="n_per_token=0 must be >= 1"):
        load_pipeline_config(None, ["n_per_token=0"])


def test_missing_corpus_is_a_clear_error(tmp_path, tiny_teacher):
    cfg = dataclasses.replace(_cfg(tmp_path, tiny_teacher), corpus=str(tmp_path / "nope.txt"))
    with pytest.raises(SenseJaxError, match="corpus .*nope.txt does not exist"):
        Pipeline(cfg).run()


def test_a_stage_without_its_inputs_is_refused_by_name(tmp_path, tiny_teacher):
    with pytest.raises(ConfigError, match=r"stage evaluate needs the output of stage convert,.*teacher"):
        Pipeline(_cfg(tmp_path, tiny_teacher)).run(stages=("evaluate",))


def test_both_students_read_one_teacher_cache_built_once(finished):
    tmp, logs = finished
    built = [line for line in logs if line.startswith("teacher cache: computing")]
    assert len(built) == 1 and "SKD targets and hidden states" in built[0]
    reads = [line for line in logs if "training reads" in line]
    assert len(reads) == 2 and reads[0].endswith("targets from it") and "teacher_hidden" in reads[1]
    meta = json.loads((tmp / "run" / "teacher_cache" / "meta.json").read_text())
    assert meta["targets"] and meta["hidden"] and meta["targets_dtype"] == "int8"


def test_out_that_is_a_file_is_refused_by_name(tmp_path, capsys):
    """Fresh-user trial: ``pipeline --out FILE`` exited 1 with a FileExistsError traceback."""
    from sense_jax.cli import main

    f = tmp_path / "f.txt"
    f.write_text("mine")
    for cmd in (["pipeline", "--out", str(f), "--stages", "convert"],
                ["pipeline", "--out", str(f / "run"), "--stages", "convert"]):
        capsys.readouterr()
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert f"--out {f}" in err and len(err.splitlines()) == 1, err
    assert f.read_text() == "mine"


def test_settings_that_fail_late_are_refused_before_anything_is_written(tmp_path, tiny_teacher, capsys):
    """Fresh-user trial: store_dtype=int4 failed after convert and corpus, learning_rate=-1 after
    extract and cluster, and the finished stages then locked --out to the bad value."""
    from sense_jax.cli import main

    for setting, msg in (("store_dtype=int4", "store_dtype='int4': choose from"),
                         ("learning_rate=-1", "learning_rate=-1.0 must be > 0"),
                         ("n_heldout=-1", "n_heldout=-1 must be >= 0"),
                         ("student_layers=3", f"student_layers=3: teacher {tiny_teacher} has 2 layers"),
                         ("max_length=1000", "config: max_length")):
        capsys.readouterr()
        assert main(["pipeline", "--out", str(tmp_path / "run"), "--set", f"teacher={tiny_teacher}",
                     "--set", setting]) == 2, setting
        assert msg in capsys.readouterr().err, setting
        assert not (tmp_path / "run").exists(), setting


def test_out_that_is_another_artefact_is_refused_by_name(finished, tmp_path, capsys):
    """Fresh-user trial: ``pipeline --out CONVERTED_MODEL --stages convert`` exited 0 and wrote
    teacher/ and pipeline_config.json into the model, which then no longer loaded as one."""
    from sense_jax.cli import main

    run = finished[0] / "run"
    for sub, kind in (("teacher", "a converted model"), ("store", "an extraction store"),
                      ("senses", "a sense dictionary"), ("skd_student", "an exported model"),
                      ("skd", "a training run")):
        before = sorted(p.name for p in (run / sub).iterdir())
        capsys.readouterr()
        assert main(["pipeline", "--out", str(run / sub), "--stages", "corpus"]) == 2, sub
        assert f"--out {run / sub}: is {kind}, not a pipeline's output directory" in capsys.readouterr().err
        assert sorted(p.name for p in (run / sub).iterdir()) == before
    from sense_jax.pipeline import artefact_kind

    (tmp_path / "mine.txt").write_text("x")
    assert artefact_kind(run) is None and artefact_kind(tmp_path) is None  # a pipeline's own or a user's: fine


def test_an_empty_stage_list_is_refused_not_read_as_every_stage(tmp_path, capsys):
    """Fresh-user trial: ``--stages "$EMPTY"`` ran the whole default pipeline (15 minutes)."""
    from sense_jax.cli import main

    for stages, task in (("", []), (" , ", []), ("", ["--set", "task=wic"])):
        capsys.readouterr()
        assert main(["pipeline", "--out", str(tmp_path / "run"), "--stages", stages, *task]) == 2
        assert f"--stages {stages!r} names no stage" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_that_completed_no_stage_does_not_lock_its_output(tmp_path, tiny_teacher):
    """Fresh-user trial: a run that failed before any stage completed (a wrong teacher path) left
    pipeline_config.json, and the corrected re-run into the same --out was refused as "made with
    other settings". Now the record is replaced while no stage output is complete; once one is,
    other settings are refused again."""
    with pytest.raises(SenseJaxError):
        Pipeline(_cfg(tmp_path, tmp_path / "not_a_model")).run(stages=("convert",))
    assert (tmp_path / "run" / "pipeline_config.json").exists()
    Pipeline(_cfg(tmp_path, tiny_teacher)).run(stages=("convert",))
    recorded = json.loads((tmp_path / "run" / "pipeline_config.json").read_text())
    assert recorded["teacher"] == str(tiny_teacher)
    with pytest.raises(ConfigError, match=r"made with other settings \(k: 3 then, 5 now\)"):
        Pipeline(_cfg(tmp_path, tiny_teacher, k=5)).run(stages=("convert",))


def test_a_recorded_config_is_kept_once_any_stage_output_is_complete(tmp_path):
    """check_config_unchanged, as both recipes call it: another config replaces the record
    while no marker of ``started`` exists (a training run's config.json counts: it would resume)."""
    from sense_jax.pipeline import check_config_unchanged

    started = [tmp_path / "store" / "COMPLETE", tmp_path / "skd" / "config.json"]
    check_config_unchanged(tmp_path, PipelineConfig(k=3), ignore=("out",), started=started)
    check_config_unchanged(tmp_path, PipelineConfig(k=4), ignore=("out",), started=started)
    assert json.loads((tmp_path / "pipeline_config.json").read_text())["k"] == 4
    for marker in started:
        marker.parent.mkdir()
        marker.write_text("x")
        with pytest.raises(ConfigError, match=r"other settings \(k: 4 then, 5 now\)"):
            check_config_unchanged(tmp_path, PipelineConfig(k=5), ignore=("out",), started=started)
        marker.unlink()


def test_a_run_without_the_evaluate_stage_does_not_name_a_report(tmp_path, tiny_teacher, capsys):
    from sense_jax.cli import main

    out = tmp_path / "run"
    assert main(["pipeline", "--out", str(out), "--set", f"teacher={tiny_teacher}", "--stages", "convert"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"done; no report yet in {out / 'report'} (the evaluate stage has not run)"
