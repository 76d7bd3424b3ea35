"""Checkpoints written before issue 12's trainer split still restore (issue 12 "Constraints").

``tests/data/ckpt_v0/`` was written by the one-module trainer (commit d43c09a) with
tests/make_checkpoint_fixture.py: a tiny run stopped after 2 of 3 steps, and what that code did
next (``expected.json``): the step-3 record of the resumed run and the exported parameters' sums.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from make_checkpoint_fixture import config_overrides
from sense_jax import trainer as T

FIXTURE = Path(__file__).parent / "data" / "ckpt_v0"


@pytest.fixture()
def old_run(tmp_path):
    shutil.copytree(FIXTURE / "run", tmp_path / "run")
    return tmp_path / "run", json.loads((FIXTURE / "expected.json").read_text())


def test_a_checkpoint_of_the_old_trainer_resumes_to_the_same_step(old_run):
    run, expected = old_run
    cfg = T.load_config(None, config_overrides(FIXTURE, run, 3))
    result = T.train(cfg, log=lambda m: None)
    assert result.resumed_from == 2 and int(result.state.step) == 3
    step3 = [r for r in result.history if r["kind"] == "train" and r["step"] == 3][0]
    for k in ("loss", "skd", "mse", "accuracy", "grad_norm", "lr", "tokens", "real_tokens"):
        np.testing.assert_allclose(step3[k], expected["step3"][k], rtol=1e-6, err_msg=k)


def test_a_checkpoint_of_the_old_trainer_exports_the_same_student(old_run, tmp_path):
    from safetensors.numpy import load_file

    run, expected = old_run
    out = T.export_checkpoint(run, tmp_path / "hf", log=lambda m: None)
    exported = load_file(Path(out) / "model.safetensors")
    assert sorted(exported) == sorted(expected["export_sums"])
    for k, v in exported.items():
        np.testing.assert_allclose(np.asarray(v, np.float64).sum(), expected["export_sums"][k], rtol=1e-6,
                                   atol=1e-9, err_msg=k)
