"""Conversion transformers -> sense_jax directory: exact, strict, atomic, clear on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from transformers import BertConfig

import sense_jax
from sense_jax import convert as cv
from sense_jax.errors import ConversionError, SenseJaxError
from conftest import save_tiny_hf_model

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=24, max_position_embeddings=20)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, minilm_dir):
    return save_tiny_hf_model(tmp_path_factory.mktemp("tiny") / "bert", BertConfig(**TINY),
                              seed=3, tokenizer_dir=None)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sense_jax.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_convert_minilm_writes_loadable_directory_with_identical_outputs(tmp_path, minilm_dir, sentences):
    out = sense_jax.convert.convert(minilm_dir, tmp_path / "minilm")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "sense_jax.json", "params", "tokenizer.json", "vocab.txt"} <= names
    meta = json.loads((out / "sense_jax.json").read_text())
    assert meta["family"] == "bert" and meta["param_count"] == 22_713_216
    assert meta["skipped_tensors"] == ["embeddings.position_ids"]
    direct, converted = sense_jax.load_model(minilm_dir), sense_jax.load_model(out)
    b = dict(direct.tokenizer(sentences[:8], padding=True, return_tensors="np"))
    assert converted.tokenizer(sentences[:8], padding=True, return_tensors="np")["input_ids"].tolist() \
        == b["input_ids"].tolist()
    np.testing.assert_array_equal(np.asarray(direct.hidden_states(b["input_ids"], b["attention_mask"])),
                                  np.asarray(converted.hidden_states(b["input_ids"], b["attention_mask"])))


def test_round_trip_hf_to_flax_to_hf_is_bit_identical(minilm_dir):
    converted, _ = cv.load_hf(minilm_dir)
    original = load_file(str(minilm_dir / "model.safetensors"))
    back = cv.params_to_hf(converted.family, converted.params)
    assert set(back) == set(original) - {"embeddings.position_ids"}
    for k, v in back.items():
        assert v.shape == original[k].shape and v.dtype == np.float32
        np.testing.assert_array_equal(v, original[k].astype(np.float32), err_msg=k)


def test_sharded_safetensors_with_index(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "sharded")
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for f, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(d / f))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    sharded, _ = cv.load_hf(d)
    single, _ = cv.load_hf(tiny_dir)
    for a, b in zip(*(cv.jax.tree.leaves(x.params) for x in (sharded, single))):
        np.testing.assert_array_equal(a, b)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match="model-00002-of-00002.safetensors"):
        cv.load_hf(d)


def test_pytorch_bin_is_read_with_weights_only(tmp_path, tiny_dir):
    import torch

    d = _copy(tiny_dir, tmp_path / "bin")
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, d / "pytorch_model.bin")
    from_bin, _ = cv.load_hf(d)
    from_st, _ = cv.load_hf(tiny_dir)
    for a, b in zip(cv.jax.tree.leaves(from_bin.params), cv.jax.tree.leaves(from_st.params)):
        np.testing.assert_array_equal(a, b)


def test_bin_only_checkpoint_without_torch_is_a_clear_error(tmp_path, tiny_dir, monkeypatch):
    d = _copy(tiny_dir, tmp_path / "bin_only")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin.*needs torch"):
        cv.load_hf(d)


def test_task_model_prefix_is_stripped_and_heads_skipped(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "task")
    state = load_file(str(d / "model.safetensors"))
    state = {f"bert.{k}": v for k, v in state.items()}
    state["classifier.weight"] = np.zeros((3, 16), np.float32)
    save_file(state, str(d / "model.safetensors"))
    converted, _ = cv.load_hf(d)
    assert "classifier.weight" in converted.skipped


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"model\.safetensors: not a readable safetensors file"),
    ("garbage", r"model\.safetensors: not a readable safetensors file"),
    ("wrong_shape", r"tensor 'encoder\.layer\.1\.intermediate\.dense\.weight' has shape \(24, 8\), expected \(24, 16\)"),
    ("missing_tensor", r"lacks 1 tensor\(s\).*encoder\.layer\.0\.output\.LayerNorm\.bias"),
    ("extra_tensor", r"map to no parameter.*'encoder\.layer\.7\.attention\.self\.query\.weight'"),
    ("unknown_model_type", r"config\.json: unsupported model_type 'gpt_neo'; supported: .*bert"),
    ("no_config", r"config\.json not found: .*config\.json"),
    ("no_weights", r"no weights found"),
    ("bad_act", r"unsupported hidden_act 'mish'"),
])
def test_bad_checkpoints_raise_clear_errors_and_leave_nothing(tmp_path, tiny_dir, damage, message):
    d = _copy(tiny_dir, tmp_path / "src")
    st = d / "model.safetensors"
    cfg = json.loads((d / "config.json").read_text())
    if damage == "truncate":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        st.write_bytes(b"\x00" * 100)
    elif damage in ("wrong_shape", "missing_tensor", "extra_tensor"):
        state = load_file(str(st))
        if damage == "wrong_shape":
            state["encoder.layer.1.intermediate.dense.weight"] = np.zeros((24, 8), np.float32)
        elif damage == "missing_tensor":
            del state["encoder.layer.0.output.LayerNorm.bias"]
        else:
            state["encoder.layer.7.attention.self.query.weight"] = np.zeros((16, 16), np.float32)
        save_file(state, str(st))
    elif damage == "unknown_model_type":
        cfg["model_type"] = "gpt_neo"
    elif damage == "no_config":
        (d / "config.json").unlink()
    elif damage == "no_weights":
        st.unlink()
    elif damage == "bad_act":
        cfg["hidden_act"] = "mish"
    if damage in ("unknown_model_type", "bad_act"):
        (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(SenseJaxError, match=message):
        cv.convert(d, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary left behind


def test_cli_convert_success_and_clean_failure(tmp_path, tiny_dir):
    ok = _run_cli("convert", tiny_dir, tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr
    assert "converted" in ok.stdout and (tmp_path / "ok" / "sense_jax.json").exists()
    again = _run_cli("convert", tiny_dir, tmp_path / "ok")
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = _run_cli("convert", tmp_path / "nope", tmp_path / "out")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip() == f"sense-jax convert: error: model directory not found: {tmp_path / 'nope'}"
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_only_after_success(tmp_path, tiny_dir):
    out = cv.convert(tiny_dir, tmp_path / "m")
    before = (out / "sense_jax.json").read_bytes()
    broken = _copy(tiny_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ConversionError):
        cv.convert(broken, out, overwrite=True)
    assert (out / "sense_jax.json").read_bytes() == before  # the complete artefact survived
    cv.convert(tiny_dir, out, overwrite=True)
    assert sense_jax.load_model(out).config.num_hidden_layers == 2


def test_overwrite_never_deletes_a_user_directory_or_file(tmp_path, tiny_dir, capsys):
    """Fresh-user trial: ``convert SRC ~/work --overwrite`` and ``export RUN ~/work --overwrite``
    replaced whatever directory OUT named. Only an artefact of the command's own kind (or an
    empty directory) is replaced now; anything else is refused by name and left as it was."""
    from sense_jax.cli import main
    from sense_jax.hf_export import EXPORT_FILES, export_model
    from sense_jax.labelled import VOCABULARY_FILE

    assert VOCABULARY_FILE in EXPORT_FILES  # a task export's label vocabulary is replaceable too

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine too")
    model = cv.convert(tiny_dir, tmp_path / "m")
    for out in (user, tmp_path / "file.txt"):
        assert main(["convert", str(tiny_dir), str(out), "--overwrite"]) == 2
        assert f"{out} exists and is not a converted model directory" in capsys.readouterr().err
        with pytest.raises(SenseJaxError, match="is not an exported model directory"):
            export_model(model, out, overwrite=True)
    assert (user / "notes.txt").read_text() == "mine" and (tmp_path / "file.txt").read_text() == "mine too"
    assert main(["export", str(model), str(user), "--overwrite"]) == 2
    assert "is not an exported model directory" in capsys.readouterr().err
    # a user's own transformers model (save_pretrained: config.json + model.safetensors) is not ours
    theirs = _copy(tiny_dir, tmp_path / "theirs")
    with pytest.raises(SenseJaxError, match="is not an exported model directory"):
        export_model(model, theirs, overwrite=True)
    assert (theirs / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    # An exported directory is not a converted one, and the other way round.
    exported = export_model(model, tmp_path / "hf")
    with pytest.raises(SenseJaxError, match="is not a converted model directory"):
        cv.convert(tiny_dir, exported, overwrite=True)
    with pytest.raises(SenseJaxError, match="is not an exported model directory"):
        export_model(model, model, overwrite=True)
    # Their own kind, or an empty directory, is replaced as before.
    (tmp_path / "empty").mkdir()
    for out in (model, tmp_path / "empty"):
        assert main(["convert", str(tiny_dir), str(out), "--overwrite"]) == 0
    assert export_model(model, exported, overwrite=True) == exported
    assert (user / "notes.txt").read_text() == "mine"


def test_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConversionError, match="could not be fetched from the hub"):
        cv.resolve_source("someone/not-a-real-model-xyz")


def test_partial_params_checkpoint_is_refused(tmp_path, tiny_dir):
    out = cv.convert(tiny_dir, tmp_path / "m")
    shutil.rmtree(out / "params")
    with pytest.raises(ConversionError, match="params checkpoint not found"):
        sense_jax.load_model(out)
