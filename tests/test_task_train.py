"""Fine-tuning and task distillation (issue 13 items 3-4): labelled batches, the task step."""

from __future__ import annotations

import numpy as np
import pytest

from sense_jax.task_train import ExampleStream, eval_batches, tokenize_examples


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


PAIRS = ([f"the bank number {i} of the river" for i in range(11)],
         [f"a loan from bank {i}" + " again" * (i % 4) for i in range(11)])


def test_pairs_are_tokenised_as_transformers_pairs_with_token_types(tokenizer):
    b = tokenize_examples(tokenizer, [PAIRS[0][:3], PAIRS[1][:3]], 24, batch_size=4)
    ref = tokenizer(PAIRS[0][:3], PAIRS[1][:3], truncation=True, max_length=24, padding="max_length",
                    return_tensors="np")
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert b[k].shape == (4, 24) and b[k].dtype == np.int32
        np.testing.assert_array_equal(b[k][:3], ref[k])
        np.testing.assert_array_equal(b[k][3], ref[k][0])  # a padding row repeats a real example
    assert b["token_type_ids"][0].max() == 1


def test_example_stream_sees_every_example_once_per_epoch_with_its_label(tokenizer):
    labels = np.arange(11) % 3
    s = ExampleStream(PAIRS, labels, tokenizer, batch_size=4, max_length=32, seed=0, group_window=2)
    seen = np.concatenate([s.indices(j) for j in range(s.per_epoch)])
    assert set(seen.tolist()) == set(range(11)) and len(seen) == 12
    mb = s.micro_batch(1)
    idx = s.indices(1)
    np.testing.assert_array_equal(mb["labels"], labels[idx])
    assert mb["labels"].dtype == np.int32 and mb["weights"].tolist() == [1.0] * 4
    ref = tokenize_examples(tokenizer, [[PAIRS[0][i] for i in idx], [PAIRS[1][i] for i in idx]], 32)
    np.testing.assert_array_equal(mb["input_ids"], ref["input_ids"])
    floats = ExampleStream(PAIRS[:1], labels.astype(np.float64) / 2, tokenizer, 4, 32, 0)
    assert floats.micro_batch(0)["labels"].dtype == np.float32


def test_eval_batches_cover_every_example_once_and_weigh_padding_rows_zero(tokenizer):
    labels = np.arange(11)
    got, rows = [], 0
    for idx, b in eval_batches(tokenizer, PAIRS, labels, 4, 64):
        assert b["input_ids"].shape[0] == 4 and b["input_ids"].shape[1] in (16, 24, 32, 48, 64)
        np.testing.assert_array_equal(b["labels"][:len(idx)], labels[idx])
        assert b["weights"].tolist() == [1.0] * len(idx) + [0.0] * (4 - len(idx))
        got += idx.tolist()
        rows += 4
    assert sorted(got) == list(range(11)) and rows == 12


# --- Fine-tuning and task distillation end to end (tiny random BERT) ---------------------------

import json  # noqa: E402

import jax  # noqa: E402

from skd_helpers import make_sense_dict, make_teacher  # noqa: E402

SUBJECTS = ["the film", "this book", "the meal", "our trip", "the song", "that game", "the hotel", "his talk"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def task_assets(tmp_path_factory, minilm_dir, sentences):
    """A tiny random BERT (no head), a two-label JSONL task (train = dev: it is learnable in a few
    steps), a three-label one, and a sense dictionary of the teacher."""
    import sense_jax
    from sense_jax.distill import teacher_fingerprint

    d = tmp_path_factory.mktemp("task")
    teacher_dir = make_teacher(d / "teacher", minilm_dir)
    rows = [{"sentence": f"{s} was {w}", "label": lab} for s in SUBJECTS for w, lab in (("good", "pos"), ("bad", "neg"))]
    (d / "data").mkdir()
    _write_jsonl(d / "data" / "train.jsonl", rows)
    _write_jsonl(d / "data" / "dev.jsonl", rows)
    (d / "three").mkdir()
    three = [dict(r, label=["a", "b", "c"][i % 3]) for i, r in enumerate(rows)]
    _write_jsonl(d / "three" / "train.jsonl", three)
    _write_jsonl(d / "three" / "dev.jsonl", three)
    teacher = sense_jax.load_model(teacher_dir)
    sd = make_sense_dict(teacher.tokenizer, sentences + [r["sentence"] for r in rows], meta={
        "teacher_fingerprint": teacher_fingerprint(teacher.params, 30522, teacher.tokenizer)})
    sd.save(d / "senses")
    return {"dir": d, "teacher": teacher_dir, "data": d / "data", "three": d / "three", "senses": d / "senses"}


def _task_cfg(assets, out, **kw):
    from sense_jax import trainer as T

    base = dict(teacher=str(assets["teacher"]), task_data=str(assets["data"]), text_fields="sentence",
                out_dir=str(out), steps=16, batch_size=8, max_length=16, eval_every=4, save_every=4,
                warmup_steps=2, learning_rate=3e-3, patience=1, progress=False, plot=False)
    base.update(kw)
    return T.load_config(None, [f"{k}={v}" for k, v in base.items()], preset="finetune")


def _flat(params) -> dict:
    from flax import traverse_util

    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(params), sep="/").items()}


@pytest.fixture(scope="module")
def finetuned(task_assets, tmp_path_factory):
    """One fine-tuning run to its early stop, its export, and the same run killed at step 4 and resumed."""
    from sense_jax import trainer as T
    from sense_jax.task_train import export_task

    d = tmp_path_factory.mktemp("ft")
    full = T.train(_task_cfg(task_assets, d / "full"))
    export = export_task(d / "full", d / "model")
    T.train(_task_cfg(task_assets, d / "cut"), stop_after=4)
    resumed = T.train(_task_cfg(task_assets, d / "cut"))
    return {"full": full, "resumed": resumed, "export": export, "dir": d}


def test_finetune_learns_stops_early_and_resumes_exactly(finetuned, task_assets):
    from sense_jax import trainer as T

    full, resumed = finetuned["full"], finetuned["resumed"]
    train = [r for r in full.history if r["kind"] == "train"]
    evals = [r for r in full.history if r["kind"] == "eval"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.1                 # the loss falls
    assert evals[-1]["accuracy"] == 1.0 and "macro_f1" in evals[-1]
    # Early stopping (patience 1): dev accuracy is perfect at step 8, not better at 12: stop at 12 of 16.
    best = json.loads((finetuned["export"] / "sense_jax_task.json").read_text())["best"]
    assert best == {"step": 8, "metric": "accuracy", "value": 1.0}
    assert int(full.state.step) == 12 and [r["step"] for r in evals] == [4, 8, 12]
    # Exact resume: killed after step 4, resumed: the same params bit for bit, the same records.
    assert resumed.resumed_from == 4
    a, b = _flat(full.state.params), _flat(resumed.state.params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    strip = lambda h: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in h]
    assert strip(resumed.history) == strip(full.history)
    # A run that stopped early, started again with more steps allowed, stops at once.
    again = T.train(_task_cfg(task_assets, finetuned["dir"] / "full", steps=20))
    assert again.resumed_from == 12 and int(again.state.step) == 12


def test_finetuned_export_loads_in_transformers_with_the_same_logits(finetuned, task_assets):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sense_jax.models.heads import head_logits
    from sense_jax.task_train import restore_best

    out = finetuned["export"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert cfg["id2label"] == {"0": "neg", "1": "pos"} and cfg["label2id"] == {"neg": 0, "pos": 1}
    assert json.loads((out / "label_vocabulary.json").read_text())["names"] == ["neg", "pos"]
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    texts = ["the film was good", "our trip was bad and long", "a"]
    enc = tok(texts, padding=True, return_tensors="np")
    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
    params, meta = restore_best(finetuned["dir"] / "full")
    student = finetuned["full"].setup.student_module
    h = student.apply({"params": params["student"]}, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    ours = np.asarray(head_logits(meta["family_config"]["head"], params["head"], h, enc["attention_mask"],
                                  enc["input_ids"]))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert (ref.argmax(-1) == [1, 0, ref[2].argmax()]).all()


@pytest.fixture(scope="module")
def teacher_senses(finetuned, sentences):
    """A sense dictionary of the fine-tuned teacher (its fingerprint recorded)."""
    import sense_jax
    from sense_jax.distill import teacher_fingerprint

    t = sense_jax.load_model(finetuned["export"])
    sd = make_sense_dict(t.tokenizer, sentences + [f"{s} was good bad" for s in SUBJECTS], meta={
        "teacher_fingerprint": teacher_fingerprint(t.params, 30522, t.tokenizer)})
    return sd.save(finetuned["dir"] / "teacher_senses"), t


@pytest.mark.parametrize("objective,extra", [("task_only", {}),
                                             ("logit_kd", {"kd_temperature": 2.0, "kd_alpha": 0.7}),
                                             ("mse", {"mse_weight": 0.5}),
                                             # SKD with sense replacement, on a fresh narrower student: the
                                             # adaptor maps 16 -> 32 for the dictionary and the head (the
                                             # teacher-initialised student runs in the three cases above)
                                             ("skd", {"sense_replace": "true", "student": "fresh",
                                                      "student_hidden_size": 16, "student_heads": 2,
                                                      "student_intermediate_size": 32})])
def test_task_distillation_keeps_the_teachers_head_frozen_bit_for_bit(objective, extra, finetuned, teacher_senses,
                                                                    task_assets, tmp_path):
    from sense_jax import trainer as T

    senses, teacher = teacher_senses
    cfg = T.load_config(None, [f"{k}={v}" for k, v in dict(
        teacher=str(finetuned["export"]), task_data=str(task_assets["data"]), text_fields="sentence",
        senses=str(senses), out_dir=str(tmp_path / "run"), objective=objective, student_layers=1, steps=3,
        batch_size=8, max_length=16, eval_every=3, save_every=3, warmup_steps=1, learning_rate=3e-3,
        progress=False, plot=False, **extra).items()])
    r = T.train(cfg)
    params = _flat(r.state.params)
    head = _flat(teacher.head_params)
    for k, v in head.items():  # the teacher's pooler and classifier, unchanged after 3 updates
        np.testing.assert_array_equal(params[f"head/{k}"], v, err_msg=k)
    start = _flat(r.setup.init_params)
    assert any(not np.array_equal(params[k], start[k]) for k in params if k.startswith("student/"))
    train = [x for x in r.history if x["kind"] == "train"]
    ev = [x for x in r.history if x["kind"] == "eval"][-1]
    assert {"accuracy", "senses_accuracy", "macro_f1"} <= ev.keys()
    part = {"skd": "skd", "logit_kd": "kd", "mse": "mse"}.get(objective)
    if part:  # the objective's own term is computed, and adds to the task loss
        assert all(x[part] > 0 for x in train)
        w = {"skd": 1.0, "mse": 0.5}.get(objective)
        if w:
            np.testing.assert_allclose(train[0]["loss"], train[0]["task"] + w * train[0][part], rtol=1e-5)
        else:
            np.testing.assert_allclose(train[0]["loss"], 0.7 * train[0]["kd"] + 0.3 * train[0]["task"], rtol=1e-5)
    else:
        assert train[0]["loss"] == train[0]["task"]
    if objective == "skd":
        assert 0.0 < train[0]["sense_accuracy"] <= 1.0


def _cli(argv, capsys):
    from sense_jax.cli import main

    rc = main(argv)
    return rc, capsys.readouterr()


def test_bad_task_inputs_exit_2_with_one_line_and_write_nothing(finetuned, task_assets, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    bare = shutil.copytree(finetuned["export"], tmp_path / "bare")
    (bare / "label_vocabulary.json").unlink()  # a head of 2 labels, and no recorded label names
    cases = [
        (["finetune", str(bare), str(task_assets["three"]), str(out), "--text-fields", "sentence"],
         "classification head of 2 labels but the custom data has 3"),
        # the recorded vocabulary: a label outside it, by file and line
        (["finetune", str(finetuned["export"]), str(task_assets["three"]), str(out), "--text-fields", "sentence"],
         "train.jsonl:1: label 'a' is not in the label vocabulary"),
        # distillation needs a teacher with a head
        (["distill", "--set", f"teacher={task_assets['teacher']}", "--set", f"task_data={task_assets['data']}",
          "--set", "text_fields=sentence", "--set", "objective=task_only", "--set", f"out_dir={out}"],
         "has no classification head"),
        (["finetune", str(task_assets["teacher"]), str(task_assets["data"]), str(out), "--task", "glue-sst9"],
         "unknown task 'glue-sst9'"),
        (["finetune", str(task_assets["teacher"]), str(task_assets["data"]), str(out), "--text-fields", "sentence",
          "--label-field", "gold"], "gold"),
        (["finetune", str(task_assets["teacher"]), str(task_assets["data"]), str(out), "--text-fields", "sentence",
          "--regression"], "train.jsonl:1"),
        (["distill", "--set", f"task_data={task_assets['data']}", "--set", "text_fields=sentence",
          "--set", "objective=hinton"], "objective"),
        (["distill", "--set", f"task_data={task_assets['data']}", "--set", "text_fields=sentence",
          "--set", "objective=mse"], "objective=mse needs mse_weight > 0"),
    ]
    for argv, needle in cases:
        rc, cap = _cli([*argv, "--set", "max_length=16"], capsys)
        assert rc == 2, (argv, cap.err)
        lines = [x for x in cap.err.splitlines() if x.strip()]
        assert len(lines) == 1 and needle in lines[0], (argv, cap.err)
        assert not out.exists()


def test_evaluate_task_scores_a_run_and_an_export_with_and_without_senses(finetuned, teacher_senses, task_assets,
                                                                          tmp_path, capsys):
    senses, _ = teacher_senses
    data = str(task_assets["data"])
    rc, cap = _cli(["evaluate-task", str(finetuned["dir"] / "full"), data, "--text-fields", "sentence",
                    "--senses", str(senses), "--out", str(tmp_path / "r.json")], capsys)
    assert rc == 0, cap.err
    run = json.loads((tmp_path / "r.json").read_text())
    rc, cap = _cli(["evaluate-task", str(finetuned["export"]), data, "--text-fields", "sentence"], capsys)
    assert rc == 0, cap.err
    exported = json.loads(cap.out)
    assert run["accuracy"] == exported["accuracy"] == 1.0 and run["examples"] == 16
    assert 0.0 <= run["senses_accuracy"] <= 1.0 and "senses_accuracy" not in exported
    assert run["tokens_per_s"] > 0


def test_evaluate_task_scores_an_exported_task_student_as_its_run(finetuned, teacher_senses, task_assets, tmp_path,
                                                                   capsys):
    # Before: "neither a task run (no best/) nor a model with a sequence classification head" for
    # the export of a distilled student (AutoModel + adaptor.safetensors + head.safetensors).
    from sense_jax import trainer as T
    from sense_jax.task_train import export_task

    senses, _ = teacher_senses
    cfg = T.load_config(None, [f"{k}={v}" for k, v in dict(
        teacher=str(finetuned["export"]), task_data=str(task_assets["data"]), text_fields="sentence",
        out_dir=str(tmp_path / "run"), objective="task_only", student="fresh", student_hidden_size=16,
        student_heads=2, student_intermediate_size=32, student_layers=1, steps=2, batch_size=8,
        max_length=16, eval_every=2, save_every=2, warmup_steps=1, progress=False, plot=False).items()])
    T.train(cfg, log=lambda m: None)
    export_task(tmp_path / "run", tmp_path / "student")
    figures = []
    for source in (tmp_path / "run", tmp_path / "student"):
        rc, cap = _cli(["evaluate-task", str(source), str(task_assets["data"]), "--text-fields", "sentence",
                        "--senses", str(senses), "--max-length", "16"], capsys)
        assert rc == 0, cap.err
        figures.append({k: v for k, v in json.loads(cap.out).items() if k not in ("source", "tokens_per_s")})
    assert figures[0] == figures[1] and {"accuracy", "senses_accuracy"} <= figures[0].keys()


def test_evaluate_task_refuses_a_dictionary_of_another_teacher(finetuned, task_assets, capsys):
    # Before: the untuned teacher's dictionary (same width and vocabulary) was taken for the
    # fine-tuned model's, and its "with senses" figures printed as if they were the model's own.
    for source in (finetuned["dir"] / "full", finetuned["export"]):
        rc, cap = _cli(["evaluate-task", str(source), str(task_assets["data"]), "--text-fields", "sentence",
                        "--senses", str(task_assets["senses"]), "--max-length", "16"], capsys)
        lines = [x for x in cap.err.splitlines() if x.strip()]
        assert rc == 2 and len(lines) == 1 and "another teacher or tokenizer" in lines[0], cap.err
        assert cap.out == ""


def test_a_second_classifier_of_the_same_model_evaluates_without_tracing_again(finetuned, task_assets):
    """``load_classifier`` shares one jitted evaluator per architecture: a task pipeline scores
    each student twice (without, with senses) and students of one size alike; each load used to
    trace and compile its programs anew."""
    import types

    import jax.monitoring

    from sense_jax.task_train import evaluate_task, load_classifier, load_task_data

    def score():
        ev, params = load_classifier(finetuned["export"], batch_size=8, max_length=16)
        spec = types.SimpleNamespace(task="", task_data=str(task_assets["data"]), text_fields="sentence",
                                     label_field="label", task_regression=False, eval_data="", seed=0,
                                     max_train_examples=0, max_eval_examples=0)
        return evaluate_task(ev, params, load_task_data(spec, vocabulary=ev.vocabulary, with_train=False))

    first = score()
    traces = []

    def listen(event, secs, **kw):  # traces of the evaluator (loading the model traces its init shapes)
        if event == "/jax/core/compile/jaxpr_trace_duration" and kw.get("fun_name") == "ev":
            traces.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        assert score()["accuracy"] == first["accuracy"] == 1.0
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert traces == []
