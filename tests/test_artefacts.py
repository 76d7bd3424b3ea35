"""Artefacts appear whole, readable, and only when their inputs were valid."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sense_jax.errors import ConfigError, SenseJaxError
from sense_jax.io_utils import atomic_directory


def test_atomic_directory_is_readable_like_mkdir(tmp_path):
    # Fresh-user trial: every .safetensors file came out 0600 (safetensors' save_file), the rest
    # 0644, so a sense dictionary or an exported student could not be shared.
    from safetensors.numpy import save_file

    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
            (tmp / "sub").mkdir()
            save_file({"a": np.zeros(2, np.float32)}, str(tmp / "sub" / "t.safetensors"))
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "f").read_text() == "x"
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    for f in ("f", "sub/t.safetensors"):
        assert (tmp_path / "out" / f).stat().st_mode & 0o777 == 0o644, f


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out"):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_leaves_nothing_and_keeps_the_old_artefact(tmp_path, monkeypatch):
    """Fresh-user trial: an interrupted ``convert --overwrite`` left a ``.OUT.tmp-*`` beside OUT.
    A KeyboardInterrupt in the block, or between the two renames that replace OUT, leaves OUT
    as it was and nothing else."""
    from sense_jax import io_utils

    out = tmp_path / "out"
    out.mkdir()
    (out / "f").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "f").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "f").read_text() == "old"
    calls = []

    def replace(src, dst):  # the second rename (new -> out) is interrupted
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return os_replace(src, dst)

    os_replace = os.replace
    monkeypatch.setattr(io_utils.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "f").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "f").read_text() == "old"


def test_a_writer_thread_that_outlives_an_interrupt_leaves_nothing(tmp_path):
    """What the interrupted ``convert`` did: Orbax's writer thread went on after the main
    thread's KeyboardInterrupt and re-created the removed temporary directory. The process
    (killed by the interrupt) must end with nothing beside OUT."""
    script = textwrap.dedent(f"""
        import threading, time
        from pathlib import Path
        from sense_jax.io_utils import atomic_directory

        def late_writer(tmp):  # writes on after the block's cleanup, as Orbax's commit thread
            while tmp.exists():
                time.sleep(0.01)
            (tmp / "params").mkdir(parents=True)
            (tmp / "params" / "late").write_text("x")

        with atomic_directory(Path({str(tmp_path / 'out')!r})) as tmp:
            threading.Thread(target=late_writer, args=(tmp,)).start()
            raise KeyboardInterrupt
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert "KeyboardInterrupt" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_refused_training_config_creates_no_run_directory(tmp_path):
    from sense_jax import trainer

    cfg = trainer.load_config(None, [f"out_dir={tmp_path / 'run'}", "senses=x"], preset="runlocal")
    with pytest.raises(ConfigError, match="train_data is required"):
        trainer.train(cfg)
    assert not (tmp_path / "run").exists()


def test_inspect_refuses_a_dictionary_built_from_another_store(tmp_path):
    from sense_jax.inspection import token_senses
    from sense_jax.sense_builder import build_sense_dictionary
    from sense_jax.store import open_store, write_store

    def store(name, seed):
        x = np.random.default_rng(seed).normal(size=(6, 4)).astype(np.float32)
        return write_store(tmp_path / name, x, [0, 0, 6, 6], [0, 9, 0], np.zeros((6, 2)),
                           {"teacher": "t", "seed": seed})  # as two extractions with other seeds

    a, b = store("a", 1), store("b", 2)
    build_sense_dictionary(open_store(a), 2, seed=0, progress=False).save(tmp_path / "senses")
    with pytest.raises(SenseJaxError, match="was built from another store"):
        token_senses("#1", tmp_path / "senses", b)


def test_json_artefacts_never_hold_nan(tmp_path):
    """A metric over no items (NaN) is written as null: JSON has no NaN, strict readers refuse it."""
    import json
    import math

    from sense_jax.io_utils import write_json_atomic

    write_json_atomic(tmp_path / "r.json", {"rg65": float("nan"), "x": [1.5, float("inf")], "n": 3})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text, parse_constant=lambda c: math.nan if False else (_ for _ in ()).throw(ValueError(c))) \
        == {"rg65": None, "x": [1.5, None], "n": 3}


def test_export_or_convert_onto_its_own_input_is_refused_and_the_input_kept(tmp_path, capsys):
    # Before: `sense-jax export RUN RUN --overwrite` replaced the run (checkpoints, best/, metrics)
    # by its export, and `convert SRC SRC --overwrite` the transformers directory by the conversion.
    import shutil
    from pathlib import Path

    from sense_jax.cli import main

    fixture = Path(__file__).parent / "data" / "ckpt_v0"
    run = shutil.copytree(fixture / "run", tmp_path / "runs" / "run")
    teacher = shutil.copytree(fixture / "teacher", tmp_path / "teacher")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for argv, needle in ((["export", str(run), str(run)], f"output {run} is the input {run}"),
                         (["export", str(run), str(run.parent)], f"output {run.parent} holds the input {run}"),
                         (["convert", str(teacher), str(teacher)], f"output {teacher} is the input {teacher}")):
        rc = main([*argv, "--overwrite"])
        lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert rc == 2 and len(lines) == 1 and needle in lines[0], lines
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_an_unwritable_out_file_is_refused_before_the_work_and_leaves_no_temporary_file(tmp_path, monkeypatch,
                                                                                          capsys):
    # Before: `evaluate-task ... --out DIR` evaluated everything, then died with IsADirectoryError
    # (exit 1, a traceback) and left `.DIR.tmp-<pid>` behind; a missing parent: FileNotFoundError.
    from sense_jax.cli import main
    from sense_jax.io_utils import write_json_atomic

    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").mkdir()
    with pytest.raises(SenseJaxError, match=r"cannot write taken: Is a directory"):
        write_json_atomic("taken", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    for out, needle in (("taken", "--out taken: is a directory"), ("no/such/r.json", "its directory")):
        for argv in (["evaluate-task", "missing-model", "data", "--task", "sst2", "--out", out],
                     ["evaluate", "wordsim", "--data", "data", "--model", "missing-model", "--out", out]):
            rc = main(argv)
            lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
            assert rc == 2 and len(lines) == 1 and needle in lines[0], (argv, lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_store_rows_read_by_pread_equal_the_memory_map(tmp_path, dtype):
    import ml_dtypes

    from sense_jax.store import STORE_DTYPES, open_store, write_store

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(9, 4)).astype(STORE_DTYPES[dtype])
    write_store(tmp_path / "s", vectors, np.array([0, 2, 2, 9]), np.array([2, 0, 7]),
                np.zeros((9, 2), np.int64), {"dtype": dtype})
    store = open_store(tmp_path / "s")
    got = store.read_rows(2, 9)
    assert got.dtype == (ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))
    np.testing.assert_array_equal(got, vectors[2:9])
    np.testing.assert_array_equal(store.read_rows(2, 9), store.token_vectors(2))
    assert store.read_rows(2, 2).shape == (0, 4)
