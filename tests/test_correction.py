"""Suggested labels, automatic corrections and their provenance."""

from __future__ import annotations

import numpy as np
import pytest

from dm_audit import correction
from dm_audit.correction import (
    CORRECTION_SOURCES,
    automatic_correction_gate,
    decide_corrections,
    suggest_labels,
)
from dm_audit.errors import ConfigError, DataError


def test_suggest_from_probs_with_temperature() -> None:
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    suggested, confidence = suggest_labels(probs)
    np.testing.assert_array_equal(suggested, [0, 2])
    np.testing.assert_allclose(confidence, [0.6, 0.6])
    sharp, sharp_conf = suggest_labels(probs, temperature=0.5)
    np.testing.assert_array_equal(sharp, [0, 2])  # a temperature never changes the argmax
    np.testing.assert_allclose(sharp_conf[0], 0.36 / (0.36 + 0.09 + 0.01))
    assert (sharp_conf > confidence).all()


def test_knn_votes_blend_and_proselflc_targets() -> None:
    probs = np.array([[0.55, 0.45], [0.9, 0.1]])
    votes = np.array([[0.0, 1.0], [1.0, 0.0]])
    suggested, confidence = suggest_labels(probs, knn_votes=votes, knn_weight=0.5)
    np.testing.assert_array_equal(suggested, [1, 0])  # neighbours overturn a torn prediction
    np.testing.assert_allclose(confidence, [0.725, 0.95])
    targets = np.array([[0.2, 0.8], [0.3, 0.7]])
    suggested, confidence = suggest_labels(probs, proselflc_targets=targets)
    np.testing.assert_array_equal(suggested, [1, 1])  # argmax of q̃
    np.testing.assert_allclose(confidence, [0.8, 0.7])


def test_suggest_validates() -> None:
    probs = np.full((2, 2), 0.5)
    with pytest.raises(ConfigError, match="temperature"):
        suggest_labels(probs, temperature=0)
    with pytest.raises(ConfigError, match="knn_weight"):
        suggest_labels(probs, knn_votes=probs, knn_weight=1.5)
    with pytest.raises(DataError, match="knn_votes"):
        suggest_labels(probs, knn_votes=np.full((3, 2), 0.5))
    with pytest.raises(DataError, match="proselflc_targets"):
        suggest_labels(probs, proselflc_targets=np.full((2, 3), 1 / 3))


def test_flagged_rows_are_suggested_another_class() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.8, 0.2, 0.0]])
    given = np.array([0, 0, 2, 0])
    flagged = np.array([True, False, False, True])
    suggested, confidence = suggest_labels(probs, given=given, flagged=flagged)
    # Flagged rows: the best class other than the doubted one, with that class's probability;
    # unflagged rows keep the plain argmax, their own label included.
    np.testing.assert_array_equal(suggested, [1, 0, 2, 1])
    np.testing.assert_allclose(confidence, [0.2, 0.7, 0.6, 0.2])
    # A binary flagged row is always suggested the other class.
    binary = np.array([[0.9, 0.1], [0.3, 0.7]])
    suggested, _ = suggest_labels(binary, given=np.array([0, 1]), flagged=np.array([True, True]))
    np.testing.assert_array_equal(suggested, [1, 0])
    # A low confidence keeps such a suggestion out of the automatic corrections.
    plan = decide_corrections(
        given, *suggest_labels(probs, given=given, flagged=flagged), flagged, np.zeros(4, bool)
    )
    assert list(plan.source) == ["needs_review", "kept", "kept", "needs_review"]
    # However low the confidence asked for, a runner-up to the given label is never applied.
    first, _ = suggest_labels(probs)
    for floor in (0.3, 0.0):
        plan = decide_corrections(
            given,
            *suggest_labels(probs, given=given, flagged=flagged),
            flagged,
            np.zeros(4, bool),
            min_confidence=floor,
            favours_given=first == given,
        )
        assert list(plan.source) == ["needs_review", "kept", "kept", "needs_review"]
    # A flagged row whose evidence ranks another class first is corrected as before.
    other = np.array([[0.1, 0.85, 0.05]])
    plan = decide_corrections(
        np.array([0]),
        *suggest_labels(other, given=np.array([0]), flagged=np.array([True])),
        np.array([True]),
        np.array([False]),
        favours_given=suggest_labels(other)[0] == 0,
    )
    assert list(plan.source) == ["auto_corrected"] and list(plan.corrected) == [1]
    with pytest.raises(ConfigError, match="both"):
        suggest_labels(probs, given=given)
    with pytest.raises(DataError, match="flagged"):
        suggest_labels(probs, given=given, flagged=np.ones(3, bool))
    with pytest.raises(DataError, match="given"):
        suggest_labels(probs, given=np.array([0, 0, 7, 0]), flagged=flagged)


def test_every_provenance() -> None:
    given = np.array([0, 1, 2, 0, 1, 2, 0])
    suggested = np.array([0, 2, 0, 1, 1, 1, 2])
    confidence = np.array([0.99, 0.95, 0.4, 0.9, 0.9, 0.99, 0.99])
    is_issue = np.array([0, 1, 1, 1, 1, 1, 0], dtype=bool)
    is_ood = np.array([0, 0, 0, 1, 0, 1, 0], dtype=bool)
    plan = decide_corrections(
        given, suggested, confidence, is_issue, is_ood, min_confidence=0.8, reviews={5: 0}
    )
    assert list(plan.source) == [
        "kept",  # not flagged
        "auto_corrected",  # flagged, confident and different
        "needs_review",  # flagged, not confident
        "ood_set_aside",  # OOD wins over a confident suggestion
        "needs_review",  # flagged but the suggestion is the given label
        "reviewed",  # a review overrides the OOD flag
        "kept",  # confident disagreement without a flag changes nothing
    ]
    np.testing.assert_array_equal(plan.corrected, [0, 2, 2, -1, 1, 0, 0])
    np.testing.assert_array_equal(plan.include_in_retrain, [1, 1, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(plan.retrain_indices(), [0, 1, 5, 6])
    assert plan.counts() == {
        "kept": 2,
        "auto_corrected": 1,
        "needs_review": 2,
        "ood_set_aside": 1,
        "reviewed": 1,
    }
    assert set(plan.counts()) == set(CORRECTION_SOURCES)


def test_ood_score_cap_blocks_auto_correction() -> None:
    given = np.array([0, 0])
    plan = decide_corrections(
        given,
        np.array([1, 1]),
        np.array([0.9, 0.9]),
        np.array([True, True]),
        np.array([False, False]),
        ood_scores=np.array([0.2, 0.97]),
        max_ood_score=0.9,
    )
    assert list(plan.source) == ["auto_corrected", "needs_review"]


def test_corrections_on_synthetic_noise() -> None:
    # A model that knows the true class of 95 % of examples with high confidence, and OOD
    # inputs whose prediction is spread: every confident flagged suggestion is right, and the
    # OOD inputs that escaped the OOD flag are not relabelled into a class.
    rng = np.random.default_rng(0)
    n, c = 2000, 10
    true = rng.integers(0, c, n)
    given = true.copy()
    noisy = rng.choice(n, 600, replace=False)
    given[noisy] = (true[noisy] + rng.integers(1, c, 600)) % c
    probs = np.full((n, c), 0.02 / (c - 1))
    probs[np.arange(n), true] = 0.98
    ood = np.arange(n) >= 1900
    probs[ood] = rng.dirichlet(np.ones(c), ood.sum())
    votes = np.zeros((n, c))
    votes[np.arange(n), true] = 0.7
    votes += 0.3 / c
    votes[ood] = rng.dirichlet(np.ones(c), ood.sum())
    suggested, confidence = suggest_labels(probs, knn_votes=votes)
    is_issue = given != true
    is_issue[ood] = True
    plan = decide_corrections(given, suggested, confidence, is_issue, np.zeros(n, bool))
    fixed = plan.source == "auto_corrected"
    assert (plan.corrected[fixed] == true[fixed]).all()
    assert (plan.corrected[noisy[noisy < 1900]] == true[noisy[noisy < 1900]]).mean() > 0.99
    assert (plan.source[ood] != "auto_corrected").mean() >= 0.9  # measured 1.0


def test_decide_validates() -> None:
    ok = np.array([0, 1])
    flags = np.array([False, True])
    with pytest.raises(DataError, match="suggested"):
        decide_corrections(ok, np.array([0]), np.ones(2), flags, flags)
    with pytest.raises(DataError, match="confidence"):
        decide_corrections(ok, ok, np.ones(3), flags, flags)
    with pytest.raises(DataError, match="is_ood"):
        decide_corrections(ok, ok, np.ones(2), flags, np.array([0, 2]))
    with pytest.raises(DataError, match="row 5"):
        decide_corrections(ok, ok, np.ones(2), flags, flags, reviews={5: 0})
    with pytest.raises(DataError, match="class code 7"):
        decide_corrections(ok, ok, np.ones(2), flags, flags, reviews={0: 7}, n_classes=2)
    with pytest.raises(ConfigError, match="min_confidence"):
        decide_corrections(ok, ok, np.ones(2), flags, flags, min_confidence=2)
    with pytest.raises(ConfigError, match="needs ood_scores"):
        decide_corrections(ok, ok, np.ones(2), flags, flags, max_ood_score=0.5)


# ------------------------------------------------------------- when corrections need a person


def _one_hot_probs(predicted: np.ndarray, c: int) -> np.ndarray:
    probs = np.full((len(predicted), c), 0.02)
    probs[np.arange(len(predicted)), predicted] = 1.0 - 0.02 * (c - 1)
    return probs


def test_a_model_at_chance_may_correct_nothing() -> None:
    rng = np.random.default_rng(0)
    given = np.arange(300) % 3
    predicted = rng.integers(0, 3, 300)  # ignores the input
    allowed, report = automatic_correction_gate(
        given, _one_hot_probs(predicted, 3), np.arange(300) % 2, ["a", "b", "c"]
    )
    assert not allowed.any()
    assert report["model_better_than_chance"] is False
    assert report["balanced_accuracy"] <= report["chance_limit"]


def test_a_majority_answer_is_chance_however_imbalanced() -> None:
    given = np.array([0] * 95 + [1] * 5)
    allowed, report = automatic_correction_gate(
        given, _one_hot_probs(np.zeros(100, int), 2), np.arange(100) % 2, ["a", "b"]
    )
    assert not report["model_better_than_chance"] and not allowed.any()


def test_a_class_its_scoring_model_never_saw_is_not_corrected_away() -> None:
    given = np.array([0, 1] * 50 + [2])  # class "c" has one row, in fold 0
    folds = (np.arange(101) // 2) % 2  # both folds hold both big classes
    predicted = given.copy()
    predicted[-1] = 0  # fold 0's model never saw "c": it cannot predict it
    allowed, report = automatic_correction_gate(
        given, _one_hot_probs(predicted, 3), folds, ["a", "b", "c"]
    )
    assert report["model_better_than_chance"]
    assert report["unlearnable_classes"] == ["c"]
    assert allowed[:-1].all() and not allowed[-1]


def test_rows_outside_the_gate_go_to_review() -> None:
    given = np.array([0, 0, 1, 1])
    suggested = np.array([1, 1, 1, 0])
    plan = decide_corrections(
        given,
        suggested,
        np.full(4, 0.99),
        np.array([True, True, False, True]),
        np.zeros(4, bool),
        min_confidence=0.8,
        allowed=np.array([True, False, True, True]),
    )
    assert plan.source.tolist() == ["auto_corrected", "needs_review", "kept", "auto_corrected"]
    assert plan.include_in_retrain.tolist() == [True, False, True, True]


def test_suggestions_in_blocks_of_rows_equal_the_whole_table_at_once(monkeypatch) -> None:
    rng = np.random.default_rng(4)
    n, c = 500, 6
    probs = rng.dirichlet(np.ones(c), size=n)
    votes = rng.dirichlet(np.ones(c), size=n)
    given = rng.integers(0, c, size=n)
    flagged = rng.random(n) < 0.3
    options = dict(temperature=0.5, knn_votes=votes, knn_weight=0.3, given=given, flagged=flagged)
    whole = correction.suggest_labels(probs, **options)
    monkeypatch.setattr(correction, "_SUGGEST_BLOCK_ROWS", 7)
    blocked = correction.suggest_labels(probs, **options)
    np.testing.assert_array_equal(whole[0], blocked[0])
    np.testing.assert_array_equal(whole[1], blocked[1])
    # The blend written out for the whole table: probabilities at T = 0.5 (squared,
    # renormalised) and the votes, 0.7 and 0.3.
    tempered = probs**2 / (probs**2).sum(axis=1, keepdims=True)
    blend = 0.7 * tempered + 0.3 * votes
    blend[np.flatnonzero(flagged), given[flagged]] = -np.inf
    np.testing.assert_array_equal(blocked[0], blend.argmax(axis=1))


def test_the_class_from_one_prediction_and_the_confidence_from_another() -> None:
    # Row 0: the ranking prefers class 1 where the confidence model prefers class 0.
    ranking = np.array([[0.4, 0.6], [0.1, 0.9]])
    confident = np.array([[0.7, 0.3], [0.05, 0.95]])
    votes = np.array([[0.0, 1.0], [0.0, 1.0]])
    suggested, confidence = suggest_labels(ranking, confidence_probs=confident)
    np.testing.assert_array_equal(suggested, [1, 1])
    np.testing.assert_allclose(confidence, [0.3, 0.95])
    # The confidence is tempered and blended with the neighbours' votes as the ranking is.
    suggested, confidence = suggest_labels(
        ranking, temperature=0.5, knn_votes=votes, knn_weight=0.5, confidence_probs=confident
    )
    sharp = np.array([0.09 / (0.49 + 0.09), 0.9025 / (0.0025 + 0.9025)])
    np.testing.assert_array_equal(suggested, [1, 1])
    np.testing.assert_allclose(confidence, 0.5 * sharp + 0.5)
    # A flagged row's own label stays excluded from the pick, whatever the confidence says.
    suggested, confidence = suggest_labels(
        ranking,
        given=np.array([1, 0]),
        flagged=np.array([True, False]),
        confidence_probs=confident,
    )
    np.testing.assert_array_equal(suggested, [0, 1])
    np.testing.assert_allclose(confidence, [0.7, 0.95])
    # ProSelfLC's targets are their own confidence; a wrong shape is named.
    targets = np.array([[0.2, 0.8], [0.6, 0.4]])
    suggested, confidence = suggest_labels(
        ranking, proselflc_targets=targets, confidence_probs=confident
    )
    np.testing.assert_allclose(confidence, [0.8, 0.6])
    with pytest.raises(DataError, match="confidence_probs"):
        suggest_labels(ranking, confidence_probs=np.full((2, 3), 1 / 3))
