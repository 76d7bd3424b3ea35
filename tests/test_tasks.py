"""Labelled data, the task table and GLUE metrics (issue 13, items 2 and 5): every format read from
fixtures written here (GLUE's TSV quirks, CSV, JSONL, a saved ``datasets`` directory, WiC), each
bad input named by file and line, metric values against hand-computed ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sense_jax.errors import ConfigError, DataError, SenseJaxError
from sense_jax.glue_metrics import compute_metrics, main_metric, split_metrics, task_metrics
from sense_jax.labelled import LabelVocabulary, parse_text_fields, read_labelled
from sense_jax.tasks import TASKS, get_task, load_split, load_task, read_wic, read_wordnet_lexfile

from conftest import need_evaldata


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- GLUE TSV files ------------------------------------------------------------------------------

# Sentences as GLUE's SST-2 writes them: a lone double quote opens a field under the csv module's
# default quoting and would swallow the following lines; GLUE's loaders read with QUOTE_NONE.
SST2_TRAIN = ('sentence\tlabel\n'
              'hide new secretions from the parental units \t0\n'
              '" a movie that \'s about as overbearing \t0\n'
              'it \'s a " mess " of a film\t0\n'
              'the "best" movie , '"'"'really\t1\n'
              '"\t1\n')


def test_glue_tsv_reads_quotes_as_text(tmp_path):
    write(tmp_path / "train.tsv", SST2_TRAIN)
    d = load_task("sst2", tmp_path, "train")
    assert d.texts == (['hide new secretions from the parental units ', '" a movie that \'s about as overbearing ',
                        'it \'s a " mess " of a film', 'the "best" movie , \'really', '"'],)
    assert d.labels.dtype == np.int32 and d.labels.tolist() == [0, 0, 0, 1, 1]
    assert d.vocabulary.names == ("negative", "positive") and d.text_fields == ("sentence",)
    assert not d.is_pair and len(d) == 5


def test_cola_header_less_tsv_and_mrpc_with_byte_order_mark(tmp_path):
    write(tmp_path / "cola" / "dev.tsv",
          "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
          "gj04\t0\t*\tThey drank the pub \"dry.\n")
    d = load_task("cola", tmp_path / "cola", "dev")
    assert d.texts[0][1] == 'They drank the pub "dry.' and d.labels.tolist() == [1, 0]
    write(tmp_path / "mrpc" / "train.tsv",
          "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
          "1\t702876\t702977\tAmrozi accused his brother , whom he called \" the witness \" .\t"
          "Referring to him as only \" the witness \" , Amrozi accused his brother .\n"
          "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's in 1995 .\n",
          encoding="utf-8-sig")
    d = load_task("mrpc", tmp_path / "mrpc", "train")
    assert d.is_pair and d.texts[1][0].startswith("Referring to him as only \" the witness")
    assert d.labels.tolist() == [1, 0] and d.vocabulary.names == ("not_equivalent", "equivalent")


def test_mnli_matched_and_mismatched_splits_and_string_labels(tmp_path):
    head = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    write(tmp_path / "dev_matched.tsv", head + "0\t1\t1e\tgov\tA man sleeps .\tA man rests .\tentailment\tentailment\n"
          "1\t2\t2c\tgov\tIt rains .\tIt is dry .\tcontradiction\tcontradiction\n")
    write(tmp_path / "dev_mismatched.tsv", head + "0\t3\t3n\tnine\tA cat .\tA black cat .\tneutral\tneutral\n")
    spec = get_task("mnli")
    assert spec.dev_splits == ("dev_matched", "dev_mismatched") and spec.splits[0] == "train"
    m = load_task("mnli", tmp_path, "dev_matched")
    mm = load_task("mnli", tmp_path, "dev_mismatched")
    assert m.labels.tolist() == [0, 2] and mm.labels.tolist() == [1] and m.texts[1] == ["A man rests .", "It is dry ."]
    with pytest.raises(ConfigError, match="no split 'dev'"):
        load_task("mnli", tmp_path, "dev")


def test_stsb_is_regression(tmp_path):
    write(tmp_path / "dev.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
          "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing.\t"
          "A man wearing a hard hat is dancing.\t5.000\n"
          "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA young child is riding a horse.\tA child is riding a horse.\t4.750\n")
    d = load_task("stsb", tmp_path, "dev")
    assert d.labels.dtype == np.float32 and d.labels.tolist() == [5.0, 4.75]
    assert d.vocabulary.regression and d.vocabulary.num_labels == 1


def test_every_glue_task_has_its_fields_and_metric():
    assert set(TASKS) >= {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "wic"}
    assert {t: main_metric(t) for t in ("cola", "mrpc", "qqp", "stsb", "sst2", "mnli", "wic")} == {
        "cola": "matthews_correlation", "mrpc": "f1", "qqp": "f1", "stsb": "pearson", "sst2": "accuracy",
        "mnli": "accuracy", "wic": "accuracy"}
    assert get_task("SST-2") is get_task("sst2") and get_task("qqp").text_fields == ("question1", "question2")


# --- CSV, JSONL, saved datasets ------------------------------------------------------------------

def test_csv_with_quoted_commas_quotes_and_newlines(tmp_path):
    p = write(tmp_path / "d.csv", 'text,label\n"one, two",pos\n"she said ""hi""\nthen left",neg\nplain,pos\n')
    d = read_labelled(p, "text")
    assert d.texts == (["one, two", 'she said "hi"\nthen left', "plain"],)
    assert d.vocabulary.names == ("neg", "pos") and d.labels.tolist() == [1, 0, 1]
    write(p, 'text,label\n"a\nb",pos\nc\n')  # the record without a label starts on line 4
    with pytest.raises(DataError) as e:
        read_labelled(p, "text")
    assert one_line(e) == f"{p}:4: label field 'label' missing"


def test_jsonl_pairs_and_numeric_vocabulary(tmp_path):
    p = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in [
        {"premise": "a", "hypothesis": "b", "label": 2}, {"premise": "c", "hypothesis": "d", "label": 10},
        {"premise": "e", "hypothesis": "f", "label": 2.0}]) + "\n\n")
    d = read_labelled(p, "premise,hypothesis")
    assert d.texts == (["a", "c", "e"], ["b", "d", "f"])
    assert d.vocabulary.names == ("2", "10") and d.labels.tolist() == [0, 1, 0]  # 2 < 10 numerically
    write(p, '{"premise": "a", "hypothesis": "b", "label": 1}\n{"premise": "a", \n')
    with pytest.raises(DataError, match=rf"^{p}:2: not valid JSON"):
        read_labelled(p, "premise,hypothesis")


def test_saved_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]}, features=feats),
        "validation": datasets.Dataset.from_dict({"sentence": ["meh"], "label": [0]}, features=feats)})
    dd.save_to_disk(str(tmp_path / "sst2"))
    d = load_task("sst2", tmp_path / "sst2", "dev")  # the glue dataset's split name: validation
    assert d.texts == (["meh"],) and d.labels.tolist() == [0]
    d = read_labelled(tmp_path / "sst2", "sentence", split="train")
    assert d.vocabulary.names == ("negative", "positive") and d.labels.tolist() == [1, 0, 1]
    assert load_split(tmp_path / "sst2", "dev", text_fields="sentence").texts == (["meh"],)  # dev -> validation
    dd["train"].save_to_disk(str(tmp_path / "one"))
    assert read_labelled(tmp_path / "one", "sentence").texts == (["good", "bad", "fine"],)
    with pytest.raises(DataError, match=r"no split 'test' \(splits: train, validation\)"):
        read_labelled(tmp_path / "sst2", "sentence", split="test")
    with pytest.raises(DataError, match=r"\[train\]: no column 'text'"):
        read_labelled(tmp_path / "sst2", "text", split="train")


# --- bad input -----------------------------------------------------------------------------------

def test_bad_input_is_one_line_naming_file_and_line(tmp_path):
    tsv = write(tmp_path / "train.tsv", "sentence1\tsentence2\tlabel\na\tb\t0\nc\t1\n")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match="unknown task 'sst3'"):
        load_task("sst3", tmp_path)
    with pytest.raises(DataError) as e:
        read_labelled(tsv, "sentence1,sentence2", "gold")
    assert one_line(e) == f"{tsv}: no column 'gold' (columns: sentence1, sentence2, label)"
    with pytest.raises(DataError) as e:
        read_labelled(tsv, "sentence1,sentence2")
    assert one_line(e) == f"{tsv}:3: label field 'label' missing"
    write(tsv, "sentence1\tsentence2\tlabel\na\tb\t0\nc\n")
    with pytest.raises(DataError) as e:
        read_labelled(tsv, "sentence1,sentence2")
    assert one_line(e) == f"{tsv}:3: text field 'sentence2' missing (the line has 1 fields)"
    write(tsv, "sentence1\tsentence2\tlabel\na\tb\t0\nc\td\tmaybe\n")
    with pytest.raises(DataError) as e:
        read_labelled(tsv, "sentence1,sentence2", vocabulary=LabelVocabulary(("0", "1")))
    assert one_line(e) == f"{tsv}:3: label 'maybe' is not in the label vocabulary ['0', '1']"
    with pytest.raises(DataError) as e:
        load_task("rte", tmp_path, "train")  # RTE's labels are entailment / not_entailment (or 0 / 1)
    assert one_line(e).startswith(f"{tsv}:3: label 'maybe' is not in the label vocabulary")
    write(tsv, "sentence1\tsentence2\tscore\na\tb\t3.5\nc\td\thigh\n")
    with pytest.raises(DataError) as e:
        read_labelled(tsv, "sentence1,sentence2", "score", regression=True)
    assert one_line(e) == f"{tsv}:3: label 'high' is not a number (regression task)"
    with pytest.raises(DataError, match=rf"^{tsv}:3: label 'high' is not a number"):
        read_labelled(tsv, "sentence1,sentence2", "score", vocabulary=get_task("stsb").vocabulary)
    with pytest.raises(DataError, match=r"no dev\.tsv"):
        load_task("rte", tmp_path, "dev")
    with pytest.raises(ConfigError, match="one or two distinct"):
        parse_text_fields("a,b,c")
    assert sorted(tmp_path.rglob("*")) == before  # reading wrote nothing


def test_label_vocabulary_json_round_trip_and_recorded_check(tmp_path):
    v = get_task("sst2").vocabulary
    path = v.save(tmp_path)
    assert path == tmp_path / "label_vocabulary.json" and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert LabelVocabulary.load(tmp_path) == v and v.class_id("1") == 1 and v.class_id("positive") == 1
    assert json.loads(path.read_text())["names"] == ["negative", "positive"]
    assert v.id2label == {0: "negative", 1: "positive"} and v.label2id == {"negative": 0, "positive": 1}
    # New data read against the recorded vocabulary: known labels get the recorded ids.
    tsv = write(tmp_path / "new.tsv", "sentence\tlabel\nx\tpositive\ny\t0\n")
    assert read_labelled(tsv, "sentence", vocabulary=LabelVocabulary.load(path)).labels.tolist() == [1, 0]
    with pytest.raises(DataError, match="label 'neutral' is not in the recorded vocabulary"):
        LabelVocabulary(("negative", "neutral")).check_within(v)
    with pytest.raises(DataError, match="'positive' has class id 0 but 1"):
        LabelVocabulary(("positive",)).check_within(v)
    with pytest.raises(DataError, match="regression"):
        LabelVocabulary(regression=True).check_within(v)
    with pytest.raises(DataError, match="task sst2 is a classification target but the recorded vocabulary is regression"):
        load_task("sst2", tmp_path, vocabulary=LabelVocabulary(regression=True))
    path.write_text(json.dumps({"format_version": 1, "names": "negative", "regression": False}))
    with pytest.raises(ConfigError, match=r"label_vocabulary\.json: key 'names'"):
        LabelVocabulary.load(path)
    with pytest.raises(ConfigError, match="names 'a' twice"):
        LabelVocabulary(("a", "a"))


# --- metrics -------------------------------------------------------------------------------------

def test_metrics_against_hand_computed_values():
    p, y = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp 2, tn 1, fp 1, fn 1
    m = compute_metrics(["accuracy", "f1", "matthews_correlation"], p, y)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 / 3)  # precision 2/3, recall 2/3
    assert m["matthews_correlation"] == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    logits = np.eye(2)[p] * 3.0 - 1.0  # [N, C] logits: argmax gives p
    assert task_metrics("mrpc", logits, y) == {"f1": pytest.approx(2 / 3), "accuracy": pytest.approx(0.6)}
    assert task_metrics("cola", p, y)["matthews_correlation"] == pytest.approx(1 / 6)
    s = task_metrics("stsb", np.array([[1.0], [2.0], [3.0]]), [1.0, 2.0, 4.0])
    # Pearson by hand: deviations (-1, 0, 1) and (-4/3, -1/3, 5/3): 3 / sqrt(2 * 42/9).
    assert s["pearson"] == pytest.approx(9 / math.sqrt(84))
    assert task_metrics("stsb", [1.0, 2.0, 3.0], [3.0, 1.0, 2.0])["spearman"] == pytest.approx(-0.5)  # 1 - 6*6/(3*8)
    both = split_metrics("mnli", {"dev_matched": ([0, 1, 2, 2], [0, 1, 2, 0]), "dev_mismatched": ([0], [1])})
    assert both == {"accuracy_matched": 0.75, "accuracy_mismatched": 0.0}
    assert split_metrics("sst2", {"dev": ([0, 1], [0, 0])}) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="do not match"):
        compute_metrics(["accuracy"], [0, 1], [0])
    with pytest.raises(ValueError, match="for regression"):
        compute_metrics(["pearson"], [0, 1], [0, 1])


# --- WiC -----------------------------------------------------------------------------------------

def test_wic_official_files_and_superglue_jsonl(tmp_path):
    write(tmp_path / "dev" / "dev.data.txt",
          "carry\tV\t2-1\tYou must carry your camping gear .\tSound carries well over water .\n"
          "board\tN\t2-2\tRoom and board .\tHe nailed boards across the windows .\n")
    write(tmp_path / "dev" / "dev.gold.txt", "F\nT\n")
    d = load_task("wic", tmp_path, "dev")
    assert d.texts == (["You must [carry] your camping gear .", "Room and [board] ."],
                       ["Sound [carries] well over water .", "He nailed [boards] across the windows ."])
    assert d.labels.tolist() == [0, 1] and d.vocabulary.names == ("False", "True")
    assert read_wic(tmp_path, "dev", markers=None).texts[0][0] == "You must carry your camping gear ."
    write(tmp_path / "dev" / "dev.gold.txt", "F\n")
    with pytest.raises(SenseJaxError, match="1 labels for 2 pairs"):
        load_task("wic", tmp_path, "dev")
    sg = tmp_path / "superglue"
    write(sg / "val.jsonl", json.dumps({"word": "place", "sentence1": "Do you want to come over to my place later?",
                                        "sentence2": "A political system with no place for the less prominent groups.",
                                        "start1": 31, "end1": 36, "start2": 27, "end2": 32, "label": False}) + "\n")
    d = load_task("wic", sg, "dev")
    assert d.texts == (["Do you want to come over to my [place] later?"],
                       ["A political system with no [place] for the less prominent groups."])
    assert d.labels.tolist() == [0]


def test_wic_real_sizes():
    wic_dir = need_evaldata("wic")
    train, dev = load_task("wic", wic_dir, "train"), load_task("wic", wic_dir, "dev")
    assert (len(train), len(dev)) == (5428, 638)
    assert all(t.count("[") == 1 and t.count("]") == 1 for t in train.texts[0] + train.texts[1])
    assert 0.45 < train.labels.mean() < 0.55  # WiC is balanced


# --- WordNet lexicographer files -----------------------------------------------------------------

def test_wordnet_lexfile_split_is_seeded_and_deterministic():
    train = read_wordnet_lexfile("train", seed=0)
    dev = read_wordnet_lexfile("dev", seed=0)
    assert len(train) + len(dev) == 117_659 and 0.09 < len(dev) / 117_659 < 0.11
    assert train.vocabulary.num_labels == 45 and train.vocabulary.names[0] == "adj.all"
    again = load_task("wordnet-lexfile", split="dev", seed=0)
    assert again.texts == dev.texts and np.array_equal(again.labels, dev.labels)
    other = read_wordnet_lexfile("dev", seed=1)
    assert other.texts != dev.texts
    sub = read_wordnet_lexfile("train", seed=0, source="example", max_examples=50)
    assert len(sub) == 50 and sub.texts == read_wordnet_lexfile("train", seed=0, source="example", max_examples=50).texts
    with pytest.raises(ConfigError, match="no split 'test'"):
        read_wordnet_lexfile("test")
    with pytest.raises(ConfigError, match="takes no option 'markers'"):
        load_task("wordnet-lexfile", split="dev", markers=None)


def test_load_split_of_own_data_directory_file_and_dataset(tmp_path):
    write(tmp_path / "own" / "train.jsonl", '{"text": "a", "y": "x"}\n{"text": "b", "y": "z"}\n')
    write(tmp_path / "own" / "validation.csv", "text,y\nc,z\nd,w\n")
    train = load_split(tmp_path / "own", "train", text_fields="text", label_field="y")
    assert train.texts == (["a", "b"],) and train.vocabulary.names == ("x", "z")
    with pytest.raises(DataError) as e:  # dev read against train's vocabulary: 'w' was never seen
        load_split(tmp_path / "own", "dev", text_fields="text", label_field="y", vocabulary=train.vocabulary)
    assert one_line(e) == f"{tmp_path / 'own' / 'validation.csv'}:3: label 'w' is not in the label vocabulary ['x', 'z']"
    assert load_split(tmp_path / "own" / "train.jsonl", "anything", text_fields="text", label_field="y").labels.tolist() == [0, 1]
    with pytest.raises(DataError, match=r"no test split \(test\.tsv, test\.csv, test\.jsonl, test\.json"):
        load_split(tmp_path / "own", "test", text_fields="text", label_field="y")
    write(tmp_path / "sst2" / "dev.tsv", "sentence\tlabel\nok\t1\n")
    assert load_split(tmp_path / "sst2", "dev", task="sst2").labels.tolist() == [1]
    with pytest.raises(ConfigError, match="needs a task"):
        load_split(tmp_path / "own", "train", markers=None)


def test_a_missing_or_wrong_data_directory_names_the_argument_the_commands_really_take(tmp_path):
    # Before: "task sst2 needs a data directory (--data DIR)", an option no command has, and
    # "data directory not found: train.tsv" for a file that is there.
    with pytest.raises(ConfigError, match=r"needs its data directory \(DATA for finetune / evaluate-task, "
                                          r"task_data=DIR for distill / pipeline\)$"):
        load_task("sst2", None, "train")
    f = write(tmp_path / "train.tsv", "sentence\tlabel\na\t0\n")
    with pytest.raises(DataError, match=r"train.tsv is a file: the task's data is the directory that holds it"):
        load_task("sst2", f, "train")


def test_ambiguous_data_is_refused_not_guessed(tmp_path):
    # Before: train.tsv was read and train.jsonl beside it silently ignored; a named task given
    # with text_fields (sense-jax finetune --task sst2 --text-fields premise) ignored the fields.
    import types

    from sense_jax.task_train import load_task_data

    write(tmp_path / "train.tsv", "sentence\tlabel\na\t0\n")
    write(tmp_path / "train.jsonl", '{"sentence": "b", "label": 1}\n')
    with pytest.raises(DataError, match=r"train.tsv and train.jsonl both hold the train split; keep one"):
        load_split(tmp_path, "train", text_fields="sentence")
    cfg = types.SimpleNamespace(task="sst2", task_data=str(tmp_path), text_fields="sentence", label_field="label",
                                task_regression=False, seed=0, max_train_examples=0, max_eval_examples=0, eval_data="")
    with pytest.raises(ConfigError, match=r"task='sst2' and text_fields are alternatives"):
        load_task_data(cfg)
