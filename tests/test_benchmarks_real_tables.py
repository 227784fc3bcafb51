"""The real-table benchmarks: the two pools stay apart, and the score choices on hand-made
evidence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def real_tables():
    yield from load_benchmark("real_tables")


@pytest.fixture(scope="module")
def dev_choices():
    yield from load_benchmark("real_dev_choices")


def test_the_pools_are_disjoint_and_each_has_its_results_file(real_tables):
    assert set(real_tables.POOLS) == {"dev", "test"}
    assert not set(real_tables.TABLES) & set(real_tables.DEV_TABLES)
    assert len(real_tables.DEV_TABLES) >= 12 and len(real_tables.TABLES) >= 12
    assert real_tables.RESULTS["dev"] != real_tables.RESULTS["test"]
    for name in ("Caravan", "Chile"):
        assert real_tables.table_spec(name)[1]  # a label column
    with pytest.raises(KeyError, match="no real table"):
        real_tables.table_spec("nonexistent")


def test_a_table_of_the_other_pool_is_refused(real_tables):
    # Tuning on the held-out pool by accident: a dev run naming a test table stops at once.
    with pytest.raises(SystemExit):
        real_tables.main(["--split", "dev", "--datasets", "Caravan"])


def test_unlabelled_rows_are_left_out_before_the_audit(real_tables, monkeypatch):
    frame = pd.DataFrame(
        {"x": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "y": ["a", "b", None, "a", "b", "a"]}
    )
    monkeypatch.setitem(real_tables.DEV_TABLES, "toy", (lambda: frame, "y", {}))
    data, kept = real_tables.build("toy")
    assert len(kept) == 5 and data.labels.size == 5


def _evidence(n_per_class: int = 40, wrong: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Two classes; the networks and the linear reference lean to the true class."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(2), n_per_class)
    given = truth.copy()
    flipped = rng.choice(truth.size, size=wrong, replace=False)
    given[flipped] = 1 - truth[flipped]
    sure = np.eye(2)[truth] * 0.8 + 0.1
    return {
        "given": given,
        "truth": truth,
        "probs": sure,
        "probe": sure,
        "reference": np.eye(2)[truth] * 0.6 + 0.2,
        "mean_p": np.where(given == truth, 0.9, 0.1),
        "p_given": sure[np.arange(truth.size), given],
        "knn": np.where(given == truth, 1.0, 0.0),
        "issue_weights": np.array([1.0, 2.0, 0.0]),
        "lr_flags": given != truth,
        "lr_scores": (given != truth).astype(float),
    }


def test_every_variant_finds_evidence_this_plain(dev_choices):
    rows = {row["variant"]: row for row in dev_choices.measure(_evidence())}
    assert set(rows) == {*dev_choices.VARIANTS, "cleanlab + LR"}
    for name, row in rows.items():
        assert row["f1"] == 1.0, name
        assert row["auroc"] == 1.0, name
        assert row["flagged"] == pytest.approx(8 / 80), name


def test_the_dynamics_weight_moves_the_score(dev_choices):
    ev = _evidence()
    # A trajectory that contradicts the prediction on every row: its weight decides the score.
    ev["mean_p"] = np.where(ev["given"] == ev["truth"], 0.1, 0.9)
    probs = dev_choices.siblings.load("evidence_choices").prediction_probs(ev, "ensemble")
    without, _ = dev_choices.flag_rule(ev, probs, 0.0)
    heavy, _ = dev_choices.flag_rule(ev, probs, 2.0)
    wrong = ev["given"] != ev["truth"]
    assert without[wrong].min() > without[~wrong].max()
    assert heavy[wrong].max() < heavy[~wrong].min()


def test_temperature_scaling_flattens_overconfident_probabilities(dev_choices):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=400)
    # Right 70 % of the time but always 99 % sure: the fitted temperature softens them.
    predicted = np.where(rng.random(400) < 0.7, labels, 1 - labels)
    probs = np.eye(2)[predicted] * 0.98 + 0.01
    scaled = dev_choices.temperature_scaled(probs, labels)
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0)
    assert scaled.max() == pytest.approx(0.7, abs=0.02)
    assert (scaled.argmax(axis=1) == predicted).all()


def test_linear_if_better_needs_a_clear_margin(dev_choices):
    ev = _evidence()
    assert not dev_choices.linear_better(ev)  # both right everywhere: no margin
    worse = ev | {"probs": 1 - ev["probs"], "probe": 1 - ev["probe"]}
    assert dev_choices.linear_better(worse)


def test_accuracy_weighting_picks_the_model_that_predicts_the_labels(dev_choices):
    given = np.array([0, 0, 1, 1])
    right = np.eye(2)[given] * 0.8 + 0.1
    wrong = 1.0 - right
    # The networks wrong everywhere, the linear reference right: shares 3/4 and 1 predict
    # every label, and the tie goes to the one nearer the default's half.
    np.testing.assert_allclose(
        dev_choices.accuracy_weighted(wrong, right, given), 0.25 * wrong + 0.75 * right
    )
    np.testing.assert_allclose(
        dev_choices.accuracy_weighted(right, wrong, given), 0.75 * right + 0.25 * wrong
    )
    # Both right: every share ties, and the default's half is kept.
    np.testing.assert_allclose(
        dev_choices.accuracy_weighted(right, right * 0.5 + 0.25, given), right * 0.75 + 0.125
    )


def test_every_model_doubts_needs_every_model_and_the_trajectory(dev_choices):
    ev = _evidence()
    wrong = ev["given"] != ev["truth"]
    np.testing.assert_array_equal(dev_choices.every_model_doubts(ev), wrong)
    # The linear reference agrees with the given labels: no row is doubted by every model.
    agreeing = ev | {"reference": np.eye(2)[ev["given"]] * 0.6 + 0.2}
    assert not dev_choices.every_model_doubts(agreeing).any()
    # Without a linear reference the two networks decide.
    alone = ev | {"reference": np.zeros(0)}
    np.testing.assert_array_equal(dev_choices.every_model_doubts(alone), wrong)
    # The trajectory counts only where the audit weighed it.
    np.testing.assert_array_equal(dev_choices.trajectory_unfitted(ev), wrong)
    unweighted = ev | {"issue_weights": np.array([1.0, 0.0, 0.0])}
    assert dev_choices.trajectory_unfitted(unweighted).all()


def test_the_margin_leans_at_a_tie_and_beyond(dev_choices):
    probs = np.array([[0.6, 0.4], [0.5, 0.5], [0.3, 0.7]])
    np.testing.assert_array_equal(
        dev_choices.margin_leans(probs, np.array([0, 0, 0])), [False, True, True]
    )
