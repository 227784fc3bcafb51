"""Accuracy, entropy, confidence, the six metrics and the paired test on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dm_audit import metrics
from dm_audit.metrics import (
    accuracy,
    confidence,
    given_probability,
    margin,
    max_probability,
    mcnemar_worse_p,
    normalised_entropy,
    paired_accuracy_test,
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


# ------------------------------------------------------------------------------ paired test


@pytest.mark.parametrize(
    ("before_only", "after_only", "expected"),
    [
        (0, 0, 1.0),  # no discordant example: no evidence either way
        (2, 0, 1 / 4),  # P(X >= 2), X ~ Bin(2, 1/2)
        (1, 1, 3 / 4),  # 1 - P(X = 0)
        (5, 3, (56 + 28 + 8 + 1) / 256),  # C(8, 5..8) / 2^8
        (3, 5, 1 - (1 + 8 + 28) / 256),  # 1 - C(8, 0..2) / 2^8
        (0, 7, 1.0),
        (40, 0, 2.0**-40),
        (19, 1, 21 / 2**20),  # (C(20, 19) + C(20, 20)) / 2^20
    ],
)
def test_mcnemar_worse_p_matches_the_binomial_tail(before_only, after_only, expected):
    assert mcnemar_worse_p(before_only, after_only) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("half", [3, 400, 6_000, 60_000])
def test_mcnemar_worse_p_with_as_many_pairs_lost_as_gained(half):
    # P(X >= n) for X ~ Bin(2n, 1/2) is 1/2 + C(2n, n) / 2^(2n + 1); above 10,000 discordant
    # pairs the tail is summed in log space.
    expected = 0.5 + math.comb(2 * half, half) / 2 ** (2 * half + 1)
    assert mcnemar_worse_p(half, half) == pytest.approx(expected, rel=1e-9)


def test_log_space_tail_agrees_with_the_exact_sum(monkeypatch):
    pairs = [(2, 0), (30, 10), (10, 30), (120, 80), (250, 251), (700, 600)]
    exact = [mcnemar_worse_p(b, c) for b, c in pairs]
    monkeypatch.setattr(metrics, "_EXACT_TAIL_LIMIT", 0)
    assert [mcnemar_worse_p(b, c) for b, c in pairs] == pytest.approx(exact, rel=1e-10)


def test_mcnemar_worse_p_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for b, c in [(7, 2), (60, 45), (5_400, 5_200), (30_000, 29_500)]:
        expected = stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue
        assert mcnemar_worse_p(b, c) == pytest.approx(expected, rel=1e-8)


def test_mcnemar_worse_p_rejects_bad_counts():
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="non-negative integer"):
            mcnemar_worse_p(bad, 0)
    assert mcnemar_worse_p(np.int64(2), np.int32(0)) == 0.25


def test_paired_accuracy_test_counts_the_discordant_examples():
    before = np.array([True, True, True, False, True, False])
    after = np.array([True, False, True, True, False, False])
    result = paired_accuracy_test(before, after)
    assert result == {
        "n": 6,
        "before_only": 2,  # rows 1 and 4
        "after_only": 1,  # row 3
        "accuracy_before": pytest.approx(4 / 6),
        "accuracy_after": pytest.approx(3 / 6),
        "p_worse": pytest.approx(1 / 2),  # P(X >= 2), X ~ Bin(3, 1/2)
    }
    # The accuracy difference is (before_only - after_only) / n.
    assert result["accuracy_before"] - result["accuracy_after"] == pytest.approx(1 / 6)
    # Swapping the models: the gain is no evidence of a loss.
    assert paired_accuracy_test(after, before)["p_worse"] == pytest.approx(7 / 8)
    empty = paired_accuracy_test(np.zeros(0, bool), np.zeros(0, bool))
    assert empty["n"] == 0 and empty["p_worse"] == 1.0 and math.isnan(empty["accuracy_after"])
    with pytest.raises(ValueError, match="one length"):
        paired_accuracy_test(before, after[:-1])
    with pytest.raises(ValueError, match="boolean"):
        paired_accuracy_test(before.astype(int), after)


def test_skill_is_balanced_accuracy_above_chance() -> None:
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    eye = np.eye(3)
    # A perfect model: 1 - 1/2 over the two classes given (class 2 is never given).
    assert metrics.skill_above_chance(eye[labels], labels) == pytest.approx(0.5)
    # Always the majority class: 6 of 8 right, but balanced accuracy 1/2: no skill.
    assert metrics.skill_above_chance(eye[np.zeros(8, dtype=int)], labels) == 0.0
    # Worse than chance counts as none.
    assert metrics.skill_above_chance(eye[1 - labels], labels) == 0.0
    # Half of class 1 right, all of class 0: (1 + 1/2) / 2 - 1/2.
    predicted = labels.copy()
    predicted[7] = 0
    assert metrics.skill_above_chance(eye[predicted], labels) == pytest.approx(0.25)
    assert metrics.skill_above_chance(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 0.0
