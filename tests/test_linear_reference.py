"""The linear reference model: out of sample, seeded, robust to tiny classes, used by the audit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_classification

from dm_audit import linear_reference
from dm_audit.audit import AuditConfig, run_audit
from dm_audit.cli_parser import build_parser
from dm_audit.dataset import AuditDataset
from dm_audit.errors import DataError
from dm_audit.stage_results import ExampleScores


def test_probabilities_are_out_of_sample() -> None:
    # Labels independent of 60 random features: a logistic regression fits most of its own
    # training rows, but a model that never saw a row can only guess it.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 60)).astype(np.float32)
    y = rng.integers(0, 2, size=200)
    probs = linear_reference.reference_probs(x, y, 2, seed=0)
    assert probs is not None and probs.shape == (200, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.mean(probs.argmax(axis=1) == y) < 0.65


def test_separable_classes_get_their_label() -> None:
    x, y = make_classification(300, 8, n_informative=4, n_classes=3, class_sep=3.0, random_state=1)
    probs = linear_reference.reference_probs(x * 1e4 + 5e3, y, 3, seed=0)  # raw, unscaled
    assert probs is not None
    assert np.mean(probs.argmax(axis=1) == y) > 0.9


def test_same_seed_same_probabilities() -> None:
    x, y = make_classification(150, 5, n_informative=3, random_state=2)
    a = linear_reference.reference_probs(x, y, 2, seed=3)
    b = linear_reference.reference_probs(x, y, 2, seed=3)
    np.testing.assert_array_equal(a, b)


def test_a_class_too_small_to_learn_is_left_to_the_network() -> None:
    x, y = make_classification(100, 4, n_informative=2, n_redundant=0, random_state=4)
    x = np.vstack([x, [[9.0, 9.0, 9.0, 9.0]]])
    y = np.append(y, 2)  # a class of one row, far from the others
    probs = linear_reference.reference_probs(x, y, 3, seed=0)
    assert probs is not None
    # It abstains on the small class's own row, never predicts that class, and the other rows
    # get the probabilities a model of the two large classes alone gives them.
    assert np.isnan(probs[-1]).all()
    assert (probs[:-1, 2] == 0.0).all()
    np.testing.assert_allclose(probs[:-1].sum(axis=1), 1.0, atol=1e-5)
    alone = linear_reference.reference_probs(x[:-1], y[:-1], 2, seed=0)
    np.testing.assert_allclose(probs[:-1, :2], alone, atol=1e-6)


def test_no_reference_when_a_fold_trains_on_one_class() -> None:
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.array([0] * 9 + [1])
    assert linear_reference.reference_probs(x, y, 2, seed=0) is None


def test_bad_inputs_are_named() -> None:
    with pytest.raises(DataError, match="features"):
        linear_reference.reference_probs(np.zeros(5), np.zeros(5, dtype=int), 2)
    with pytest.raises(DataError, match="folds"):
        linear_reference.reference_probs(np.zeros((3, 2)), np.array([0, 1, 0]), 2)


def test_which_audits_use_a_reference() -> None:
    big = np.repeat(np.arange(3), 400)
    assert linear_reference.skip_reason("features", big, 3) is None
    assert linear_reference.skip_reason("features", big, 3, enabled=False) == "switched off"
    assert "images" in linear_reference.skip_reason("image", big, 3)
    huge = np.zeros(linear_reference.MAX_REFERENCE_ROWS + 1, dtype=np.int64)
    assert "above" in linear_reference.skip_reason("features", huge, 1)
    # A class too small for every fold model to learn, or one never given, is left to the
    # network; the reference needs two classes it can learn.
    few = np.append(big, [3] * (linear_reference.MIN_CLASS_ROWS - 1))
    assert linear_reference.skip_reason("features", few, 4) is None
    assert linear_reference.skip_reason("features", big, 4) is None  # a class unused
    np.testing.assert_array_equal(
        linear_reference.learnable_classes(few, 5), [True, True, True, False, False]
    )
    one = np.append(np.zeros(400, dtype=np.int64), [1] * (linear_reference.MIN_CLASS_ROWS - 1))
    assert "1 class(es) with at least" in linear_reference.skip_reason("features", one, 2)


def test_families_weigh_by_their_skill_on_the_given_labels() -> None:
    given = np.array([0, 1, 0, 1])
    audit = np.array([[0.8, 0.2], [0.4, 0.6], [0.7, 0.3], [0.3, 0.7]], dtype=np.float32)
    probe = np.array([[0.6, 0.4], [0.2, 0.8], [0.9, 0.1], [0.1, 0.9]], dtype=np.float32)
    ref = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.2, 0.8]], dtype=np.float32)
    table = pd.DataFrame({"fold": [0, 1, 0, 1], "given": given})
    networks = (audit + probe) / 2
    # Equally skilled families (every row right: skill 1 - 1/2) weigh half each.
    scores = ExampleScores(table, audit, [], None, probe, ref)
    np.testing.assert_allclose(scores.combined_probs(), (audit + ref) / 2, atol=1e-6)
    np.testing.assert_allclose(scores.ensemble_probs(), (networks + ref) / 2, atol=1e-6)
    assert scores.family_weights.to_dict() == {
        "networks_share": 0.5,
        "linear_reference_share": 0.5,
        "networks_skill": 0.5,
        "linear_reference_skill": 0.5,
        "judged_rows": 4,
    }
    # The reference wrong on one row of class 1: balanced accuracy (1 + 1/2) / 2, skill 1/4
    # against the networks' 1/2, so it weighs a third.
    weaker = ref.copy()
    weaker[3] = [0.7, 0.3]
    mixed = ExampleScores(table, audit, [], None, probe, weaker)
    assert mixed.family_weights.reference_share == pytest.approx(1 / 3)
    np.testing.assert_allclose(mixed.ensemble_probs(), networks * 2 / 3 + weaker / 3, atol=1e-6)
    # Networks that predict one class whatever the row learned nothing: the reference alone.
    chance = np.tile(np.array([[0.9, 0.1]], dtype=np.float32), (4, 1))
    blind = ExampleScores(table, chance, [], None, chance, ref)
    assert blind.family_weights.networks_skill == 0.0
    np.testing.assert_allclose(blind.ensemble_probs(), ref, atol=1e-6)
    # The audit network alone at chance, the probe right: the family (their mean) is judged,
    # and the suggestions' confidence mixes the audit network by the same weights.
    flat = np.tile(np.array([[0.6, 0.4]], dtype=np.float32), (4, 1))
    lone = ExampleScores(table, flat, [], None, probe, weaker)
    family = (flat + probe) / 2
    assert lone.family_weights.networks_skill == 0.5  # the mean still predicts every row
    assert lone.family_weights.reference_share == pytest.approx(1 / 3)
    np.testing.assert_allclose(lone.combined_probs(), flat * 2 / 3 + weaker / 3, atol=1e-6)
    np.testing.assert_allclose(lone.ensemble_probs(), family * 2 / 3 + weaker / 3, atol=1e-6)
    # Neither family skilled: nothing to choose by, half each.
    both = ExampleScores(table, chance, [], None, chance, chance[:, ::-1].copy())
    assert both.family_weights.reference_share == 0.5
    # Without a reference the networks speak alone.
    alone = ExampleScores(table, audit, [], None, probe, None)
    assert alone.family_weights is None
    np.testing.assert_array_equal(alone.combined_probs(), audit)
    np.testing.assert_allclose(alone.ensemble_probs(), networks, atol=1e-6)
    # Where the reference abstains (a row of NaN) the networks speak alone, and the skills are
    # judged on the other rows.
    abstains = weaker.copy()
    abstains[3] = np.nan
    partial = ExampleScores(table, audit, [], None, probe, abstains)
    assert partial.family_weights.reference_share == 0.5
    assert partial.family_weights.judged_rows == 3
    np.testing.assert_allclose(partial.combined_probs()[3], audit[3], atol=1e-6)
    np.testing.assert_allclose(partial.ensemble_probs()[3], networks[3], atol=1e-6)
    np.testing.assert_allclose(partial.ensemble_probs()[:3], scores.ensemble_probs()[:3], atol=1e-6)
    # A reference that abstains on every row leaves the networks alone.
    silent = ExampleScores(table, audit, [], None, probe, np.full_like(ref, np.nan))
    assert silent.family_weights is None
    np.testing.assert_allclose(silent.ensemble_probs(), networks, atol=1e-6)


def _table(seed: int = 0) -> AuditDataset:
    x, y = make_classification(
        240, 10, n_informative=5, n_classes=3, class_sep=2.0, flip_y=0.0, random_state=seed
    )
    noisy = y.copy()
    flip = np.random.default_rng(seed).choice(len(y), 24, replace=False)
    noisy[flip] = (y[flip] + 1) % 3
    return AuditDataset.from_arrays(noisy, features=x.astype(np.float32), classes=["a", "b", "c"])


def test_the_audit_mixes_the_reference_in_and_can_switch_it_off() -> None:
    dataset = _table()
    stages: dict[str, object] = {}
    config = AuditConfig(progress=False, epochs=8, retrain=False)
    run_audit(dataset, config, on_stage=stages.__setitem__)
    scores = stages["scores"]
    assert isinstance(scores, ExampleScores) and scores.reference_probs is not None
    assert stages["report"].summary["linear_reference"] is True
    assert scores.reference_probs.shape == scores.probs.shape
    # The report's weights follow from the two families' out-of-sample predictions.
    weights = stages["report"].summary["ensemble_weights"]
    given = dataset.label_codes()
    networks = (scores.probs + scores.probe_probs) / 2
    skills = [
        np.mean([np.mean(p.argmax(axis=1)[given == k] == k) for k in range(3)]) - 1 / 3
        for p in (networks, scores.reference_probs)
    ]
    assert weights["networks_skill"] == pytest.approx(max(skills[0], 0.0))
    assert weights["linear_reference_skill"] == pytest.approx(max(skills[1], 0.0))
    assert weights["linear_reference_share"] == pytest.approx(
        weights["linear_reference_skill"]
        / (weights["networks_skill"] + weights["linear_reference_skill"])
    )
    stages.clear()
    off = AuditConfig(progress=False, epochs=8, retrain=False, linear_reference=False)
    run_audit(dataset, off, on_stage=stages.__setitem__)
    assert stages["scores"].reference_probs is None
    assert stages["report"].summary["ensemble_weights"] is None


def test_the_command_line_switches_the_reference_off() -> None:
    args = build_parser().parse_args(
        ["audit", "--input", "digits", "--out", "o", "--no-linear-reference"]
    )
    assert args.no_linear_reference
    plain = build_parser().parse_args(["audit", "--input", "digits", "--out", "o"])
    assert not plain.no_linear_reference


def test_tables_of_tiny_classes_are_audited_by_the_network_alone() -> None:
    # 35 classes of 4 rows: fewer rows than folds in every class.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(35), 4)
    x = (rng.normal(size=(140, 6)) + labels[:, None] * 0.5).astype(np.float32)
    dataset = AuditDataset.from_arrays(labels, features=x, classes=[f"k{i}" for i in range(35)])
    report = run_audit(dataset, AuditConfig(progress=False, epochs=6, retrain=False))
    assert report.summary["linear_reference"] is False
    assert "0 class(es) with at least 10 rows" in report.summary["linear_reference_skipped"]
    assert len(report.examples) == 140


def test_a_two_row_minority_class_is_still_flagged() -> None:
    # Every label "a" but two: those two are the rows to look at, as the network alone finds.
    x, _ = make_classification(
        300, 6, n_informative=4, n_redundant=0, n_classes=2, class_sep=2.0, random_state=0
    )
    labels = np.zeros(300, dtype=np.int64)
    labels[[17, 40]] = 1
    dataset = AuditDataset.from_arrays(labels, features=x.astype(np.float32), classes=["a", "b"])
    report = run_audit(dataset, AuditConfig(progress=False, epochs=10, retrain=False))
    flagged = set(report.examples.index[report.examples["is_label_issue"]])
    assert {17, 40} <= flagged and len(flagged) <= 6


def test_one_stray_label_keeps_the_reference_for_the_other_classes() -> None:
    # A table of three classes and one row whose label names a class of its own (a typo).
    x, y = make_classification(
        240, 10, n_informative=5, n_classes=3, class_sep=2.0, flip_y=0.0, random_state=0
    )
    names = np.array(["a", "b", "c"], dtype=object)[y]
    names[7] = "typo"
    dataset = AuditDataset.from_arrays(
        names, features=x.astype(np.float32), classes=["a", "b", "c", "typo"]
    )
    stages: dict[str, object] = {}
    report = run_audit(
        dataset, AuditConfig(progress=False, retrain=False), on_stage=stages.__setitem__
    )
    assert report.summary["linear_reference"] is True
    assert report.summary["linear_reference_skipped"] is None
    assert report.summary["linear_reference_left_out"] == ["typo"]
    reference = stages["scores"].reference_probs
    assert np.isnan(reference[7]).all() and not np.isnan(np.delete(reference, 7, axis=0)).any()
    assert bool(report.examples["is_label_issue"].iloc[7])
