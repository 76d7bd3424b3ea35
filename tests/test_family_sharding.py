"""Sharded forward passes equal one device (issue 7): tiny Llama (GQA, llama3 rope,
bidirectional) and BERT, params sharded by the logical rules (FSDP over ``data`` + tensor
parallelism over ``model``) on 8 simulated CPU devices with meshes (8, 1), (2, 4) and (1, 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(HERE.parent))
    proc = subprocess.run([sys.executable, str(HERE / "family_sharding_worker.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("shape", ["(8, 1)", "(2, 4)", "(1, 8)"])
def test_sharded_forward_equals_one_device(results, family, shape):
    r = results[f"{family} {shape} fsdp"]
    assert r["err"] < 1e-5, r
    assert r["max_abs"] > 1.0  # outputs of a size where 1e-5 is a real bound
    assert r["n_split"] >= r["n_params"] // 2  # most params are really split across devices


def test_tensor_parallel_without_fsdp(results):
    r = results["llama (2, 4) default"]
    assert r["err"] < 1e-5 and r["n_split"] > 0, r
