"""Task losses (classification, regression, Hinton logit KD) and early stopping, against optax,
numpy and values worked out by hand."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sense_jax.task_losses import (EarlyStopping, classification_loss, logit_kd_loss, regression_loss,
                                   task_loss, task_objective)


def test_classification_loss_is_optax_cross_entropy_over_counted_rows():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 3)).astype(np.float32)
    y = np.array([0, 2, 1, 1, 7])             # the last row is padding: its label is out of range
    w = np.array([1, 1, 1, 1, 0], np.float32)
    out = classification_loss(jnp.asarray(z), jnp.asarray(y), jnp.asarray(w))
    ref = optax.softmax_cross_entropy_with_integer_labels(z[:4], y[:4]).mean()
    np.testing.assert_allclose(out["task"], ref, rtol=1e-6)
    np.testing.assert_allclose(out["accuracy"], np.mean(z[:4].argmax(-1) == y[:4]), rtol=1e-6)
    assert float(out["examples"]) == 4.0
    # With the whole step's count as denominator, two halves add up to the whole.
    a = classification_loss(jnp.asarray(z[:2]), jnp.asarray(y[:2]), denominator=jnp.float32(4.0))
    b = classification_loss(jnp.asarray(z[2:]), jnp.asarray(y[2:]), jnp.asarray(w[2:]), jnp.float32(4.0))
    np.testing.assert_allclose(a["task"] + b["task"], ref, rtol=1e-6)


def test_classification_loss_by_hand():
    # logits [0, ln 3]: p = [1/4, 3/4]; label 0 -> ln 4, label 1 -> ln 4/3.
    z = jnp.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    out = classification_loss(z, jnp.array([0, 1]))
    np.testing.assert_allclose(out["task"], (math.log(4) + math.log(4 / 3)) / 2, rtol=1e-6)
    np.testing.assert_allclose(out["accuracy"], 0.5)


def test_regression_loss_is_the_mean_squared_error():
    p = jnp.array([[1.0], [2.0], [0.5], [9.0]])
    y = jnp.array([0.0, 2.5, 0.5, -1.0])
    out = regression_loss(p, y, jnp.array([1.0, 1.0, 1.0, 0.0]))
    np.testing.assert_allclose(out["task"], (1.0 + 0.25 + 0.0) / 3, rtol=1e-6)
    assert float(out["examples"]) == 3.0
    np.testing.assert_allclose(task_loss(p, y)["task"], np.mean((np.array([1, 2, .5, 9]) - np.array(y)) ** 2))


def test_logit_kd_is_the_soft_cross_entropy_times_t_squared():
    # T = 2, teacher [0, 0] -> p_t = [1/2, 1/2]; student [0, 2 ln 3] -> p_s(T) = [1/4, 3/4].
    s = jnp.array([[0.0, 2 * math.log(3.0)]])
    t = jnp.array([[0.0, 0.0]])
    hand = 4.0 * 0.5 * (math.log(4.0) + math.log(4.0 / 3.0))
    np.testing.assert_allclose(logit_kd_loss(s, t, 2.0), hand, rtol=1e-6)
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 6, 4)).astype(np.float32)
    T = 3.0
    ref = optax.softmax_cross_entropy(s / T, jax.nn.softmax(t / T)).mean() * T * T
    np.testing.assert_allclose(logit_kd_loss(jnp.asarray(s), jnp.asarray(t), T), ref, rtol=1e-5)
    # Same gradient as T² KL(p_t || p_s): they differ by the teacher's entropy only.
    g = jax.grad(lambda x: logit_kd_loss(x, jnp.asarray(t), T))(jnp.asarray(s))
    kl = lambda x: optax.kl_divergence(jax.nn.log_softmax(x / T), jax.nn.softmax(t / T)).mean() * T * T
    np.testing.assert_allclose(g, jax.grad(kl)(jnp.asarray(s)), atol=1e-6)
    # No gradient reaches the teacher.
    gt = jax.grad(lambda x: logit_kd_loss(jnp.asarray(s), x, T))(jnp.asarray(t))
    assert not np.any(np.asarray(gt))
    # Regression: squared difference of the predictions.
    np.testing.assert_allclose(logit_kd_loss(jnp.array([[1.0], [3.0]]), jnp.array([[0.0], [1.0]]), 5.0), 2.5)


def test_task_objectives_combine_their_parts():
    z = jnp.array([[0.0, math.log(3.0)]])
    y = jnp.array([1])
    task = math.log(4 / 3)
    assert float(task_objective("task_only", z, y)["loss"]) == pytest.approx(task, rel=1e-6)
    o = task_objective("skd", z, y, skd=jnp.float32(2.0), skd_weight=0.5)
    assert float(o["loss"]) == pytest.approx(task + 1.0, rel=1e-6)
    o = task_objective("mse", z, y, mse=jnp.float32(3.0), mse_weight=2.0)
    assert float(o["loss"]) == pytest.approx(task + 6.0, rel=1e-6)
    t = jnp.array([[0.0, 0.0]])
    o = task_objective("logit_kd", z, y, teacher_logits=t, kd_temperature=1.0, kd_alpha=0.25)
    kd = 0.5 * (math.log(4) + math.log(4 / 3))
    assert float(o["kd"]) == pytest.approx(kd, rel=1e-6)
    assert float(o["loss"]) == pytest.approx(0.25 * kd + 0.75 * task, rel=1e-6)
    with pytest.raises(ValueError, match="unknown objective"):
        task_objective("hinton", z, y)


def test_early_stopping_counts_evaluations_without_improvement_and_survives_a_round_trip():
    es = EarlyStopping(patience=2, mode="max")
    assert [es.update(s, v) for s, v in [(10, 0.5), (20, 0.6), (30, 0.6)]] == [True, True, False]
    assert (es.best, es.best_step, es.bad_evals, es.should_stop) == (0.6, 20, 1, False)
    resumed = EarlyStopping.from_dict(es.to_dict())
    assert resumed == es
    assert resumed.update(40, float("nan")) is False and resumed.should_stop
    low = EarlyStopping(patience=1, mode="min", min_delta=0.1)
    assert low.update(1, 1.0) and not low.update(2, 0.95) and low.should_stop
    assert not EarlyStopping(patience=0).should_stop
    with pytest.raises(ValueError):
        EarlyStopping(mode="up")
