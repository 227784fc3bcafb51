"""Noise-rate estimation and the choice of (λ, β) from it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dm_audit import estimate as estimate_module
from dm_audit.errors import ConfigError, DataError
from dm_audit.estimate import (
    EMPHASIS_ANCHORS,
    choose_emphasis,
    estimate_noise,
)


def _flip(labels: np.ndarray, n_classes: int, rate: float, kind: str, seed: int) -> np.ndarray:
    """Flip exactly floor(rate * N) labels: symmetric (another class uniformly) or pair (k->k+1)."""
    rng = np.random.default_rng(seed)
    n = labels.size
    idx = rng.choice(n, int(np.floor(rate * n)), replace=False)
    out = labels.copy()
    shift = rng.integers(1, n_classes, size=idx.size) if kind == "symmetric" else 1
    out[idx] = (labels[idx] + shift) % n_classes
    return out


def _model_probs(true: np.ndarray, n_classes: int, accuracy: float, seed: int) -> np.ndarray:
    """Probabilities of a model that learned the true classes and not the noise.

    With probability `accuracy` the model's top class is the true class; its confidence is
    Beta(8, 2)-distributed, the rest of the mass spread at random over the other classes.
    """
    rng = np.random.default_rng(seed)
    n = true.size
    top = np.where(
        rng.random(n) < accuracy, true, (true + rng.integers(1, n_classes, n)) % n_classes
    )
    conf = rng.beta(8, 2, n)
    rest = rng.dirichlet(np.ones(n_classes - 1), n) * (1 - conf)[:, None]
    probs = np.empty((n, n_classes))
    for i in range(n):
        others = np.delete(np.arange(n_classes), top[i])
        probs[i, others] = rest[i]
        probs[i, top[i]] = conf[i]
    return probs


@pytest.mark.parametrize(
    ("kind", "rate"),
    [("symmetric", 0.0), ("symmetric", 0.2), ("symmetric", 0.4), ("pair", 0.2), ("symmetric", 0.6)],
)
def test_estimate_recovers_rate_from_synthetic_probs(kind: str, rate: float) -> None:
    c = 10
    true = np.random.default_rng(1).integers(0, c, 4000)
    given = _flip(true, c, rate, kind, seed=2)
    probs = _model_probs(true, c, accuracy=1.0, seed=3)
    est = estimate_noise(probs, given)
    # Measured: 0.000 / 0.204 / 0.399 / 0.203 / 0.600.
    assert est.rate == pytest.approx(rate, abs=0.01)
    assert est.n_examples == 4000
    assert est.matrix.shape == (c, c) and est.joint.shape == (c, c)
    np.testing.assert_allclose(est.matrix.sum(axis=1), 1.0)
    assert est.joint.sum() == pytest.approx(1.0)
    assert est.rate == pytest.approx(1 - np.trace(est.joint))
    assert est.per_class_rate.shape == (c,)


def test_confident_model_errors_count_as_noise() -> None:
    # A model wrong on 3 % of examples with ~0.8 confidence cannot be told apart from noise:
    # the estimate is about the noise rate plus the error rate (measured 0.031 and 0.225).
    c = 10
    true = np.random.default_rng(1).integers(0, c, 4000)
    probs = _model_probs(true, c, accuracy=0.97, seed=3)
    assert estimate_noise(probs, true).rate == pytest.approx(0.03, abs=0.01)
    given = _flip(true, c, 0.2, "symmetric", seed=2)
    assert estimate_noise(probs, given).rate == pytest.approx(0.2 + 0.03 * 0.8, abs=0.01)


def test_pair_noise_matrix_is_recovered() -> None:
    c = 6
    true = np.random.default_rng(4).integers(0, c, 6000)
    given = _flip(true, c, 0.2, "pair", seed=5)
    est = estimate_noise(_model_probs(true, c, accuracy=0.98, seed=6), given)
    expected = 0.8 * np.eye(c) + 0.2 * np.roll(np.eye(c), 1, axis=1)  # P(given=k+1 | true=k)
    assert np.abs(est.matrix - expected).max() < 0.04
    # The noise lands in the right cell: row k, column k+1.
    assert all(
        np.argmax(est.matrix[k] - np.diag(np.diag(est.matrix))[k]) == (k + 1) % c for k in range(c)
    )
    np.testing.assert_allclose(est.per_class_rate, 0.2, atol=0.04)


@pytest.mark.parametrize(
    ("kind", "rate", "low", "high"),
    # Out-of-fold logistic regression probs of digits (a realistic, weak model: 92 % accurate).
    # Measured mean of seeds 0-2: 0.014, 0.229, 0.449, 0.249: its own errors count as noise.
    [
        ("symmetric", 0.0, 0.0, 0.03),
        ("symmetric", 0.2, 0.19, 0.26),
        ("symmetric", 0.4, 0.39, 0.47),
        ("pair", 0.2, 0.19, 0.27),
    ],
)
def test_estimate_on_digits_with_out_of_fold_probs(
    kind: str, rate: float, low: float, high: float
) -> None:
    x, y = load_digits(return_X_y=True)
    given = _flip(y, 10, rate, kind, seed=0)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))
    probs = cross_val_predict(model, x, given, cv=5, method="predict_proba")
    est = estimate_noise(probs, given)
    assert low <= est.rate <= high


def test_estimate_validates_inputs() -> None:
    probs = np.full((4, 2), 0.5)
    with pytest.raises(DataError, match="shape"):
        estimate_noise(probs[:, :1], np.zeros(4, int))
    with pytest.raises(DataError, match="row 1 sums to"):
        estimate_noise(np.array([[0.5, 0.5], [0.9, 0.3], [1, 0], [0, 1]]), np.zeros(4, int))
    with pytest.raises(DataError, match=r"labels\[2\] = 5"):
        estimate_noise(probs, np.array([0, 1, 5, 0]))
    with pytest.raises(DataError, match="shape"):
        estimate_noise(probs, np.zeros(3, int))
    with pytest.raises(DataError, match="non-finite"):
        estimate_noise(np.array([[np.nan, 1.0], [0.5, 0.5]]), np.zeros(2, int))


def test_class_without_examples_adds_no_noise() -> None:
    probs = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.85, 0.05], [0.2, 0.7, 0.1]])
    est = estimate_noise(probs, np.array([0, 0, 1, 1]))
    assert est.rate == 0.0
    assert np.isinf(est.thresholds[2])
    np.testing.assert_allclose(est.matrix[2], [0, 0, 1])


# ----------------------------------------------------------------------------- choose_emphasis


@pytest.mark.parametrize(
    ("rate", "lam", "beta"),
    [(0.0, 0.0, 2.0), (0.2, 0.5, 12.0), (0.4, 1.0, 16.0), (0.6, 2.0, 16.0), (0.9, 2.0, 16.0)],
)
def test_emphasis_anchors_ten_classes(rate: float, lam: float, beta: float) -> None:
    choice = choose_emphasis(rate, 10)
    assert (choice.lam, choice.beta) == (lam, beta)
    assert choice.reason


@pytest.mark.parametrize(
    ("rate", "lam", "beta"), [(0.2, 0.3, 6.0), (0.4, 0.4, 6.0), (0.6, 0.5, 8.0)]
)
def test_emphasis_anchors_hundred_classes(rate: float, lam: float, beta: float) -> None:
    choice = choose_emphasis(rate, 100)
    assert (choice.lam, choice.beta) == (lam, beta)
    assert "100-class" in choice.reason


def test_small_noise_is_treated_as_clean() -> None:
    for rate in (0.0, 0.01, 0.049):
        choice = choose_emphasis(rate, 10)
        assert choice.lam == 0.0 and choice.beta == 2.0
        assert "clean" in choice.reason
    assert choose_emphasis(0.05, 10).lam > 0


def test_emphasis_interpolates_between_anchors() -> None:
    choice = choose_emphasis(0.3, 10)
    assert choice.lam == pytest.approx(0.75) and choice.beta == pytest.approx(14.0)
    assert "20%" in choice.reason and "40%" in choice.reason


def test_emphasis_is_monotone_in_rate_and_classes() -> None:
    rates = np.linspace(0, 1, 201)
    classes = [2, 5, 10, 20, 50, 100, 1000]
    lam = np.array([[choose_emphasis(float(r), c).lam for r in rates] for c in classes])
    beta = np.array([[choose_emphasis(float(r), c).beta for r in rates] for c in classes])
    assert (np.diff(lam, axis=1) >= 0).all() and (np.diff(beta, axis=1) >= 0).all()
    assert (np.diff(lam, axis=0) <= 1e-12).all() and (np.diff(beta, axis=0) <= 1e-12).all()
    assert lam.max() == EMPHASIS_ANCHORS[10][-1][1]


def test_emphasis_rejects_bad_options() -> None:
    with pytest.raises(ConfigError, match="noise_rate"):
        choose_emphasis(1.5, 10)
    with pytest.raises(ConfigError, match="noise_rate"):
        choose_emphasis(float("nan"), 10)
    with pytest.raises(ConfigError, match="n_classes"):
        choose_emphasis(0.2, 1)
    with pytest.raises(ConfigError, match="clean_below"):
        choose_emphasis(0.2, 10, clean_below=1.0)


def test_noise_concentration_reads_symmetric_as_0_and_pair_as_1() -> None:
    from dm_audit.estimate import noise_concentration

    c = 10
    symmetric = np.full((c, c), 0.4 / (c - 1))
    np.fill_diagonal(symmetric, 0.6)
    pair = 0.8 * np.eye(c) + 0.2 * np.roll(np.eye(c), 1, axis=1)
    assert noise_concentration(symmetric) == pytest.approx(0.0, abs=1e-12)
    assert noise_concentration(pair) == pytest.approx(1.0)
    assert noise_concentration(np.eye(c)) == 0.0
    half = 0.8 * np.eye(c) + 0.1 * np.roll(np.eye(c), 1, axis=1) + 0.1 * np.roll(np.eye(c), 2, 1)
    assert 0.0 < noise_concentration(half) < 1.0


def test_a_class_no_model_saw_is_no_candidate_true_class() -> None:
    # Out-of-sample probabilities of cross-fitted models: the single row of class 2 was scored
    # by a model that never saw the class, so the class's threshold would be ~0.
    rng = np.random.default_rng(0)
    labels = np.r_[np.repeat([0, 1], 500), 2]
    probs = np.zeros((1_001, 3))
    probs[np.arange(1_001), np.minimum(labels, 1)] = rng.uniform(0.6, 0.99, size=1_001)
    probs[:, :2] += (1.0 - probs[:, :2].sum(axis=1, keepdims=True)) * np.array([0.5, 0.5])
    probs[:, 2] = 1e-6
    probs /= probs.sum(axis=1, keepdims=True)
    inflated = estimate_noise(probs, labels)
    guarded = estimate_noise(probs, labels, min_class_rows=2)
    assert inflated.rate > 0.3  # every row passes class 2's threshold
    assert guarded.rate < 0.01


def test_the_confident_joint_counted_in_blocks_equals_one_pass(monkeypatch) -> None:
    c = 5
    true = np.random.default_rng(7).integers(0, c, 1_000)
    given = _flip(true, c, 0.3, "symmetric", seed=8)
    probs = _model_probs(true, c, accuracy=0.9, seed=9)
    whole = estimate_noise(probs, given)
    monkeypatch.setattr(estimate_module, "CONFIDENT_JOINT_BLOCK_ROWS", 97)  # 11 blocks, uneven
    blocks = estimate_noise(probs, given)
    np.testing.assert_array_equal(blocks.joint, whole.joint)
    np.testing.assert_array_equal(blocks.matrix, whole.matrix)
    assert blocks.rate == whole.rate
