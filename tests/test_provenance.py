"""Provenance (issue 17 item 3): what produced an artefact is recorded, and a restore under another
major library version warns once, naming both versions."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

from sense_jax.provenance import PACKAGES, check_provenance, provenance


def test_provenance_names_versions_and_devices():
    p = provenance()
    assert set(p["versions"]) == set(PACKAGES)
    assert p["versions"]["jax"] == jax.__version__ and p["versions"]["numpy"] == np.__version__
    assert p["versions"]["sense_jax"] and p["versions"]["orbax-checkpoint"]
    assert p["device_count"] == jax.device_count() and p["device_kind"] == jax.devices()[0].device_kind


def test_another_major_version_warns_once_naming_both():
    now = provenance()
    major, minor = jax.__version__.split(".")[:2]
    other_minor = f"{major}.{int(minor) + 1}.0" if major == "0" else f"{int(major) + 1}.0.0"
    same_major = f"{major}.{minor}.999"
    rec = {"versions": dict(now["versions"], jax=other_minor, numpy=now["versions"]["numpy"])}
    with pytest.warns(UserWarning, match=f"ckpt was written with jax {other_minor}, this process has "
                                         f"jax {jax.__version__}"):
        assert len(check_provenance(rec, "ckpt")) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second restore says nothing more
        assert len(check_provenance(rec, "ckpt")) == 1
        assert check_provenance({"versions": dict(now["versions"], jax=same_major)}, "ckpt") == []
        assert check_provenance(None, "ckpt") == [] and check_provenance({}, "ckpt") == []


def test_dictionaries_record_their_provenance(tmp_path):
    from sense_jax import SenseDictionary, build_sense_dictionary, open_store, write_store

    n = np.array([1, 2, 0, 1])  # no token has more samples than K: nothing to compile
    off = np.concatenate([[0], np.cumsum(n)])
    vec = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    write_store(tmp_path / "store", vec, off, n, np.zeros((4, 2)), {"teacher": "synthetic"})
    sd = build_sense_dictionary(open_store(tmp_path / "store"), 2, progress=False)
    assert sd.meta["provenance"] == provenance()
    sd.save(tmp_path / "senses")
    assert SenseDictionary.load(tmp_path / "senses").meta["provenance"]["versions"]["jax"] == jax.__version__
