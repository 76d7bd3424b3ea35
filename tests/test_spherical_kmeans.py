"""Spherical (cosine) k-means: unit samples, centres = mean directions (Dhillon & Modha 2001)."""

from __future__ import annotations

import jax
import numpy as np

from sense_jax.kmeans import batched_kmeans
from sense_jax.sense_builder import build_sense_dictionary
from sense_jax.store import open_store, write_store


def numpy_spherical_kmeans(x, init, iters=100):
    """The textbook algorithm: assign by highest cosine, centre = normalised mean of its points."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = init / np.linalg.norm(init, axis=1, keepdims=True)
    for _ in range(iters):
        a = np.argmax(x @ c.T, axis=1)
        new = np.stack([x[a == j].sum(0) for j in range(len(c))])
        new /= np.linalg.norm(new, axis=1, keepdims=True)
        if np.allclose(new, c, atol=1e-7):
            break
        c = new
    return c, a


def test_same_init_converges_like_textbook_spherical_kmeans():
    rng = np.random.default_rng(0)
    # Three directions, points at very different norms: Euclidean k-means would split by norm.
    dirs = rng.normal(size=(3, 6))
    lab = rng.integers(0, 3, 60)
    x = (dirs[lab] + 0.3 * rng.normal(size=(60, 6))) * rng.uniform(0.2, 20, size=(60, 1))
    init = x[[0, 1, 2]] / np.linalg.norm(x[[0, 1, 2]], axis=1, keepdims=True)
    want_c, want_a = numpy_spherical_kmeans(x, init)
    r = batched_kmeans(x[None].astype(np.float32), np.ones((1, 60), bool), 3, key=jax.random.key(0),
                       init=init[None].astype(np.float32), tol=0.0, spherical=True)
    np.testing.assert_array_equal(np.asarray(r.assignments[0]), want_a)
    np.testing.assert_allclose(np.asarray(r.centres[0]), want_c, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(r.centres[0]), axis=1), 1.0, atol=1e-6)
    plain = batched_kmeans(x[None].astype(np.float32), np.ones((1, 60), bool), 3, key=jax.random.key(0),
                           init=init[None].astype(np.float32), tol=0.0)
    assert not np.array_equal(np.asarray(plain.assignments[0]), want_a)  # the option changes the result


def test_build_records_spherical_and_keeps_unit_senses(tmp_path):
    rng = np.random.default_rng(1)
    n = np.array([0, 2, 40, 25])
    offsets = np.concatenate([[0], np.cumsum(n)])
    vec = (rng.normal(size=(int(n.sum()), 5)) * 4).astype(np.float32)
    write_store(tmp_path / "s", vec, offsets, n, np.zeros((int(n.sum()), 2)), {"teacher": "synthetic"})
    sd = build_sense_dictionary(open_store(tmp_path / "s"), 3, seed=0, progress=False, spherical=True)
    assert sd.meta["k_rule"]["spherical"] is True
    c = np.asarray(sd.centres)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(sd.token_senses(1), vec[:2] / np.linalg.norm(vec[:2], axis=1, keepdims=True),
                               atol=1e-6)
