"""Audit quality with default options on seeded data of several shapes whose truth is known.

Digits is covered in test_audit.py; these are the shapes it says nothing about: a tiny table, a
strongly imbalanced one (noisy and clean), a raw table whose columns differ in scale by seven
orders of magnitude, and images (a noisy set, and a small clean one). Every input row must come
back audited.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.datasets import make_classification

from dm_audit.audit import AuditConfig, run_audit
from dm_audit.dataset import AuditDataset
from dm_audit.noise import inject_symmetric

pytestmark = pytest.mark.slow


def _blobs(counts: list[int], dim: int, seed: int, spread: float = 0.6) -> tuple:
    """Gaussian blobs, class k centred at 4 e_k, with `counts[k]` rows each."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    centres = 4.0 * np.eye(len(counts), dim)
    x = centres[labels] + rng.normal(0.0, spread, size=(labels.size, dim))
    return x.astype(np.float32), labels


def _audit(x: np.ndarray, given: np.ndarray, truth: np.ndarray, **config: object):
    names = [f"c{k}" for k in range(int(truth.max()) + 1)]
    kind = "images" if x.ndim == 4 else "features"
    data = AuditDataset.from_arrays(
        [names[k] for k in given], classes=names, **{kind: x}, source="shapes"
    )
    report = run_audit(data, AuditConfig(seed=0, progress=False, device="cpu", **config))
    examples = report.examples
    # Every input row is audited, in the input's order.
    assert examples["example_id"].tolist() == data.example_ids.tolist()
    codes = {name: k for k, name in enumerate(names)}
    flagged = examples["is_label_issue"].to_numpy(dtype=bool)
    suggested = examples["suggested_label"].map(codes).to_numpy()
    return report, flagged, suggested


def _f1(noisy: np.ndarray, flagged: np.ndarray) -> float:
    tp = float((noisy & flagged).sum())
    return 2 * tp / max(noisy.sum() + flagged.sum(), 1)


def test_tiny_table() -> None:
    # 150 rows: each cross-fitted half trains on 75.
    x, truth = _blobs([50, 50, 50], dim=5, seed=1)
    given = inject_symmetric(truth, 3, 0.2, seed=1)
    noisy = given != truth
    report, flagged, suggested = _audit(x, given, truth)
    assert len(report.examples) == 150
    assert _f1(noisy, flagged) >= 0.8  # measured 0.847
    right = flagged & noisy
    assert (suggested[right] == truth[right]).mean() >= 0.9


def test_eighty_rows_where_a_network_may_learn_nothing() -> None:
    # Two classes, 80 rows with 16 flipped: each cross-fitted network learns from 40 rows and
    # on some draws predicts the other half at chance (seed 0: out-of-sample balanced accuracy
    # 0.49 on the given labels), where the linear reference is right on most rows. Weighing
    # each family by its skill keeps such a network from halving the reference's evidence
    # (measured F1 per seed 0.941, 0.867, 0.857, 0.882 with it; 0.500, 0.867, 0.857, 0.778
    # with equal weights).
    scores = []
    for seed in range(4):
        x, truth = make_classification(
            80,
            4,
            n_informative=3,
            n_redundant=0,
            n_classes=2,
            n_clusters_per_class=1,
            class_sep=1.5,
            flip_y=0.0,
            random_state=seed,
        )
        given = truth.copy()
        flip = np.random.default_rng(seed).choice(80, 16, replace=False)
        given[flip] = 1 - truth[flip]
        report, flagged, _ = _audit(x.astype(np.float32), given, truth, retrain=False)
        weights = report.summary["ensemble_weights"]
        if weights["networks_skill"] < weights["linear_reference_skill"]:
            assert weights["linear_reference_share"] > 0.5  # the better family weighs more
        scores.append(_f1(given != truth, flagged))
    assert np.mean(scores) >= 0.82  # measured 0.887 (0.750 with equal weights)
    assert min(scores) >= 0.7


def test_imbalanced_noisy_table() -> None:
    # Largest / smallest class = 30.
    x, truth = _blobs([1500, 300, 50], dim=6, seed=2)
    given = inject_symmetric(truth, 3, 0.2, seed=2)
    noisy = given != truth
    _, flagged, _ = _audit(x, given, truth)
    assert _f1(noisy, flagged) >= 0.85
    # The rare class keeps most of its clean rows unflagged.
    rare_clean = (given == 2) & ~noisy
    assert flagged[rare_clean].mean() <= 0.2


def test_clean_imbalanced_table_is_left_alone() -> None:
    # 98 % majority: no class may be lost, no row set aside.
    x, truth = _blobs([980, 10, 10], dim=4, seed=3, spread=0.4)
    report, flagged, _ = _audit(x, truth, truth)
    examples = report.examples
    assert flagged.mean() <= 0.02
    assert examples["is_ood"].mean() <= 0.01
    for k in (1, 2):
        assert not flagged[truth == k].any(), f"clean rows of rare class {k} flagged"
    assert report.summary["training_events"]["audit"] == []


def test_raw_table_of_mixed_scales() -> None:
    # The same blobs with columns in units from 1e-3 to 1e4 and large offsets.
    x, truth = _blobs([200, 200], dim=8, seed=4, spread=1.0)
    scale = np.logspace(-3, 4, x.shape[1]).astype(np.float32)
    raw = x * scale + 10 * scale
    given = inject_symmetric(truth, 2, 0.2, seed=4)
    noisy = given != truth
    _, flagged, suggested = _audit(raw, given, truth)
    assert _f1(noisy, flagged) >= 0.85
    right = flagged & noisy
    assert (suggested[right] == truth[right]).mean() >= 0.9  # binary: the other class


def test_image_dataset(make_colour_images) -> None:
    images, truth = make_colour_images(n_per_class=40, size=8, seed=5)
    given = inject_symmetric(truth, 3, 0.2, seed=5)
    noisy = given != truth
    # A short budget keeps the test quick; the colours are learnt within a few epochs.
    _, flagged, _ = _audit(images, given, truth, epochs=12, probe_epochs=4)
    assert _f1(noisy, flagged) >= 0.85


def test_a_small_clean_image_set_is_left_alone() -> None:
    # 300 scanned digits (8x8, 30 per class), the default budget: each half trains a ResNet on
    # 150 images. With batches of 128 (2 steps per epoch) the probe read 22 % noise on this
    # data, the collapse guard rolled the audit training back twice and 11 rows (3.7 %) were
    # flagged.
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    rows = np.concatenate(
        [rng.choice(np.flatnonzero(y == c), 30, replace=False) for c in range(10)]
    )
    images = (x[rows].reshape(-1, 8, 8, 1) / 16 * 255).astype(np.uint8)
    truth = y[rows]
    report, flagged, _ = _audit(images, truth, truth)
    assert flagged.mean() <= 0.02  # measured 1 of 300
    assert report.summary["training_events"]["audit"] == []
    # Each half's ResNet trained 9 steps per epoch: batches of 150 // 8, at a rate scaled alike.
    recipes = report.summary["training"]["audit"]
    assert [(r["fold"], r["batch_size"]) for r in recipes] == [(0, 18), (1, 18)]
    assert recipes[0]["lr"] == pytest.approx(0.1 * 18 / 128)
    assert not report.summary["quality"]["retrain_worse"]


def test_a_model_at_chance_corrects_nothing_automatically() -> None:
    # Labels unrelated to the inputs: whatever the model "suggests" is noise.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    given = rng.integers(0, 3, 300)
    report, flagged, _ = _audit(x, given, given)
    gate = report.summary["automatic_corrections"]
    assert gate["model_better_than_chance"] is False
    assert report.summary["counts"]["auto_corrected"] == 0
    sources = set(report.examples.loc[flagged, "correction_source"])
    assert sources <= {"needs_review", "ood_set_aside"}


def test_a_singleton_class_is_not_corrected_away() -> None:
    x, truth = _blobs([100, 100, 1], dim=4, seed=2)
    report, _, _ = _audit(x, truth, truth)
    last = report.examples.iloc[-1]
    assert last["correction_source"] in {"kept", "needs_review"}
    assert report.summary["automatic_corrections"]["unlearnable_classes"] == ["c2"]


def test_flagging_every_row_leaves_no_reference_for_the_ood_test() -> None:
    # A threshold of 0 flags every row as a label issue: no unflagged row is left to calibrate
    # the OOD test against, so nothing is flagged OOD (and nothing fails).
    x, truth = _blobs([40, 40], dim=3, seed=4)
    report, flagged, _ = _audit(x, truth, truth, label_issue_threshold=0.0, retrain=False)
    assert flagged.all()
    assert not report.examples["is_ood"].any()


def test_too_few_rows_left_to_retrain_keeps_the_audit(caplog: pytest.LogCaptureFixture) -> None:
    # Labels unrelated to the inputs and every row flagged: every row goes to review, so no
    # fold's model has rows to retrain on. The audit's results are reported without a retrain
    # instead of the whole run failing at its last training.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    given = rng.integers(0, 2, 40)
    with caplog.at_level(logging.WARNING, logger="dm_audit.stage_training"):
        report, flagged, _ = _audit(x, given, given, label_issue_threshold=0.0)
    assert flagged.all()
    assert set(report.examples["correction_source"]) <= {"needs_review", "ood_set_aside"}
    skipped = report.summary["retrain_skipped"]
    assert skipped is not None and "fold" in skipped
    assert "no retrain" in caplog.text
    quality = report.summary["quality"]
    assert quality["accuracy_after"] is None and not quality["retrain_worse"]
    assert report.summary["seconds"]["retrain"] >= 0.0


def test_a_retrain_needs_two_kept_rows_outside_every_fold() -> None:
    from dm_audit.stage_training import _retrain_impossible

    folds = np.array([0, 0, 0, 1, 1, 1])
    assert _retrain_impossible(np.ones(6, dtype=bool), folds) is None
    # Fold 1's model trains on fold 0's kept rows: one is not enough.
    reason = _retrain_impossible(np.array([True, False, False, True, True, True]), folds)
    assert reason is not None and "fold 2" in reason and "1 row(s)" in reason
