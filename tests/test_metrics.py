"""Accuracy, entropy, confidence and the six metrics on hand-made probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dm_audit.metrics import (
    accuracy,
    confidence,
    given_probability,
    margin,
    max_probability,
    normalised_entropy,
    six_metrics,
)

PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [1 / 3, 1 / 3, 1 / 3],
        [0.0, 0.0, 1.0],
        [0.1, 0.6, 0.3],
        [0.5, 0.4, 0.1],
        [0.2, 0.2, 0.6],
    ]
)


def test_accuracy_from_probs_or_codes():
    labels = np.array([0, 1, 2, 1, 1, 0])
    assert accuracy(PROBS, labels) == pytest.approx(3 / 6)
    assert accuracy(PROBS.argmax(1), labels) == pytest.approx(0.5)
    assert math.isnan(accuracy(np.zeros((0, 3)), np.zeros(0, dtype=int)))
    with pytest.raises(ValueError, match="shape"):
        accuracy(PROBS, labels[:-1])


def test_entropy_confidence_and_max():
    h = normalised_entropy(PROBS)
    assert h.dtype == np.float32
    assert h[1] == pytest.approx(1.0) and h[2] == pytest.approx(0.0)
    expected = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    assert h[0] == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(confidence(PROBS), 1.0 - h)
    np.testing.assert_allclose(max_probability(PROBS), [0.7, 1 / 3, 1.0, 0.6, 0.5, 0.6], rtol=1e-6)


def test_given_probability_and_margin():
    labels = np.array([0, 1, 2, 2, 1, 0])
    np.testing.assert_allclose(given_probability(PROBS, labels), [0.7, 1 / 3, 1, 0.3, 0.4, 0.2])
    np.testing.assert_allclose(margin(PROBS, labels), [0.5, 0.0, 1.0, -0.3, -0.1, -0.4], atol=1e-6)
    with pytest.raises(ValueError, match="labels must lie"):
        given_probability(PROBS, np.array([0, 1, 2, 3, 0, 0]))


def test_six_metrics_split_clean_noisy_and_open_set():
    given = np.array([0, 1, 2, 2, 1, 0])
    true = np.array([0, 1, 2, 1, 0, -1])  # rows 3, 4 flipped; row 5 is open-set
    test_probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8]])
    m = six_metrics(PROBS, given, true, test_probs=test_probs, test_labels=np.array([0, 1]))
    h = normalised_entropy(PROBS)
    # Clean rows 0-2: predictions 0, 0 (tie broken to the first class), 2 -> 2 of 3 right.
    assert m["clean_fit"] == pytest.approx(2 / 3)
    # Noisy rows 3, 4: predicted 1, 0; given 2, 1 -> none fitted; true 1, 0 -> both corrected.
    assert m["noisy_fit"] == 0.0 and m["noisy_correction"] == 1.0
    assert m["test_acc"] == 0.5
    assert m["entropy_clean"] == pytest.approx(h[:3].mean())
    assert m["entropy_noisy"] == pytest.approx(h[3:5].mean())
    assert m["confidence_noisy"] == pytest.approx(1 - h[3:5].mean())
    assert m["max_prob_clean"] == pytest.approx((0.7 + 1 / 3 + 1.0) / 3)
    assert (m["n_clean"], m["n_noisy"], m["n_open_set"]) == (3, 2, 1)
    assert m["open_set_fit"] == 0.0 and m["entropy_open_set"] == pytest.approx(h[5])


def test_six_metrics_without_noise_or_test_set():
    labels = np.array([0, 1, 2, 1, 0, 2])
    m = six_metrics(PROBS, labels, labels)
    assert math.isnan(m["noisy_fit"]) and math.isnan(m["test_acc"])
    assert math.isnan(m["open_set_fit"]) and m["n_noisy"] == 0
    with pytest.raises(ValueError, match="without test_labels"):
        six_metrics(PROBS, labels, labels, test_probs=PROBS)
