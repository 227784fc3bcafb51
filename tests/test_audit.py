"""The audit end to end on digits whose truth is known (a reduced form of `dm-audit demo`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dm_audit.audit import SMALL_TRAINING_SET, AuditConfig, fold_assignment, probe, run_audit
from dm_audit.cli import main
from dm_audit.errors import ConfigError
from dm_audit.noise import add_noise
from dm_audit.reports import (
    CORRECTED_LABELS_SCHEMA,
    EXAMPLES_SCHEMA,
    LABEL_ISSUES_SCHEMA,
    read_report,
)
from dm_audit.sources import load_source

# Fewer epochs than the defaults keep the suite fast; the floors below hold with margin.
FAST = {"epochs": 30, "probe_epochs": 8, "progress": False, "device": "cpu"}


@pytest.fixture(scope="module")
def noisy_digits():
    return add_noise(load_source("digits", seed=0), kind="symmetric", rate=0.4, seed=0)


@pytest.fixture(scope="module")
def noisy_audit(noisy_digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "run"
    report = run_audit(noisy_digits, AuditConfig(seed=0, **FAST), out)
    return report, out


def test_detects_symmetric_noise_and_improves_labels(noisy_audit) -> None:
    report, _ = noisy_audit
    truth = report.summary["against_truth"]
    issues = truth["label_issues"]
    assert issues["f1"] >= 0.9
    assert issues["auroc"] >= 0.97
    assert truth["label_accuracy_after"] >= truth["label_accuracy_before"] + 0.25
    # Out of sample against the truth, every row: the retrained models beat the audit models.
    assert truth["accuracy_after"] >= 0.9
    assert truth["accuracy_after"] >= truth["accuracy_before"]
    quality = report.summary["quality"]
    assert quality["accuracy_after"] >= 0.9
    # More noise -> larger λ: the probe must see the noise and choose a robust emphasis.
    assert report.summary["noise_estimate"]["probe_rate"] >= 0.25
    assert report.summary["emphasis"]["audit"]["lam"] >= 0.75


def test_reports_follow_the_contract(noisy_audit) -> None:
    report, out = noisy_audit
    examples = read_report(out / "examples.parquet", EXAMPLES_SCHEMA)
    issues = read_report(out / "label_issues.parquet", LABEL_ISSUES_SCHEMA)
    corrected = read_report(out / "corrected_labels.parquet", CORRECTED_LABELS_SCHEMA)
    assert len(examples) == report.summary["n_examples"] == len(corrected)
    assert examples["example_id"].is_unique
    for column in ("label_issue_score", "ood_score", "p_given"):
        assert examples[column].between(0, 1).all()
    assert set(issues["example_id"]) == set(examples.loc[examples["is_label_issue"], "example_id"])
    assert issues["label_issue_score"].is_monotonic_decreasing
    # Original labels are never lost: corrected_labels keeps every given label.
    merged = corrected.merge(examples[["example_id", "given_label"]], on="example_id")
    assert (merged["original_label"] == merged["given_label"]).all()
    auto = merged["source"] == "auto_corrected"
    assert (merged.loc[auto, "corrected_label"] != merged.loc[auto, "original_label"]).all()
    assert (
        merged.loc[merged["source"] == "kept", "corrected_label"]
        .eq(merged.loc[merged["source"] == "kept", "original_label"])
        .all()
    )
    summary = json.loads((out / "summary.json").read_text())
    for key in ("noise_estimate", "emphasis", "counts", "quality", "against_truth"):
        assert key in summary
    plots = {p.stem for p in (out / "plots").glob("*.png")}
    assert {"p_distribution", "weighting_curves", "training_dynamics", "noise_matrix"} <= plots


def test_clean_data_flags_little(tmp_path: Path) -> None:
    dataset = load_source("digits", seed=1)
    report = run_audit(dataset, AuditConfig(seed=1, **FAST))
    counts = report.summary["counts"]
    assert counts["label_issues"] / report.summary["n_examples"] <= 0.03
    assert report.summary["emphasis"]["audit"]["lam"] == 0.0
    quality = report.summary["quality"]
    assert quality["accuracy_after"] >= 0.95
    assert counts["ood"] / report.summary["n_examples"] <= 0.01
    # Nothing to correct: the retrain keeps the audit's accuracy within sampling error.
    assert quality["paired"]["before_only"] - quality["paired"]["after_only"] <= 10


def test_same_seed_gives_the_same_report(noisy_digits, noisy_audit) -> None:
    first, _ = noisy_audit
    again = run_audit(noisy_digits, AuditConfig(seed=0, **FAST))
    columns = ["example_id", "label_issue_score", "is_label_issue", "suggested_label", "ood_score"]
    pd.testing.assert_frame_equal(first.examples[columns], again.examples[columns])


def test_top_k_and_threshold_overrides(noisy_digits) -> None:
    config = AuditConfig(seed=0, top_k=25, retrain=False, **FAST)
    report = run_audit(noisy_digits, config)
    assert report.examples["is_label_issue"].sum() == 25
    assert len(report.label_issues) == 25
    strict = run_audit(
        noisy_digits, AuditConfig(seed=0, label_issue_threshold=0.99, retrain=False, **FAST)
    )
    scores = strict.examples["label_issue_score"]
    assert strict.examples["is_label_issue"].equals(scores >= 0.99)


def test_reviews_override_exactly_the_reviewed_labels(noisy_digits, tmp_path: Path) -> None:
    train = noisy_digits.train()
    ids = train.example_ids[:3]
    true = train.table["true_label"].to_numpy()[:3]
    reviews = tmp_path / "reviews.csv"
    pd.DataFrame({"example_id": ids, "label": true}).to_csv(reviews, index=False)
    config = AuditConfig(seed=0, retrain=False, **FAST)
    base = run_audit(noisy_digits, config)
    reviewed = run_audit(noisy_digits, config, reviews_path=reviews)
    merged = base.corrected_labels.merge(reviewed.corrected_labels, on="example_id")
    changed = merged[merged["source_y"] == "reviewed"]
    assert sorted(changed["example_id"]) == sorted(ids)
    pairs = set(zip(changed["example_id"], changed["corrected_label_y"], strict=True))
    assert pairs == set(zip(ids, true, strict=True))
    others = merged[merged["source_y"] != "reviewed"]
    assert (others["corrected_label_x"].fillna("") == others["corrected_label_y"].fillna("")).all()
    assert reviewed.summary["counts"]["reviewed"] == 3


def test_open_set_examples_are_not_corrected_into_a_class(tmp_path: Path) -> None:
    dataset = add_noise(
        load_source("digits", seed=0),
        kind="symmetric",
        rate=0.3,
        seed=0,
        open_set_classes=["8", "9"],
        open_set_fraction=0.08,
    )
    report = run_audit(dataset, AuditConfig(seed=0, retrain=False, **FAST))
    ood = report.summary["against_truth"]["ood"]
    assert ood["auroc"] >= 0.8
    assert ood["share_not_auto_corrected"] >= 0.7


def test_proselflc_correction_source_suggests_from_corrected_targets(noisy_digits) -> None:
    report = run_audit(
        noisy_digits,
        AuditConfig(seed=0, correction_source="proselflc", retrain=False, **FAST),
    )
    examples = report.examples
    flagged = examples[examples["is_label_issue"]]
    noisy = flagged["is_noisy"].to_numpy()
    # Suggestions for flagged mislabelled examples recover the true class most of the time.
    hits = (flagged["suggested_label"] == flagged["true_label"]).to_numpy()[noisy]
    assert hits.mean() >= 0.85
    assert report.summary["config"]["correction_source"] == "proselflc"


def test_bad_config_is_refused_before_any_work() -> None:
    with pytest.raises(ConfigError, match="lam and beta"):
        AuditConfig(lam=1.0)
    with pytest.raises(ConfigError, match="correction_source"):
        AuditConfig(correction_source="oracle")


def test_demo_command_prints_the_quality_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dm_audit.cli as cli

    monkeypatch.setattr(cli, "DEMO_CONFIG", {"epochs": 10, "probe_epochs": 4})
    code = main(["demo", "--out", str(tmp_path / "demo"), "--quiet", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    for row in ("detection F1", "OOD AUROC", "label accuracy before/after", "accuracy before"):
        assert row in printed
    for row in ("time", "probe", "flags after"):
        assert row in printed
    assert (tmp_path / "demo" / "summary.json").is_file()


def test_probe_warns_that_a_small_training_set_makes_the_estimate_unreliable(caplog) -> None:
    digits = load_source("digits", seed=0)
    small = digits.subset(np.arange(300))
    assert len(small) < SMALL_TRAINING_SET
    with caplog.at_level(logging.WARNING, logger="dm_audit.stage_training"):
        probe(small, AuditConfig(seed=0, epochs=8, probe_epochs=5, progress=False, device="cpu"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"only {len(small)} rows" in m and "uncertain" in m for m in warnings), warnings


def test_folds_are_stratified_seeded_and_balanced() -> None:
    labels = np.repeat(np.arange(4), [50, 31, 7, 1])
    folds = fold_assignment(labels, 2, seed=3)
    assert folds.tolist() == fold_assignment(labels, 2, seed=3).tolist()
    assert folds.tolist() != fold_assignment(labels, 2, seed=4).tolist()
    for cls in range(3):
        counts = np.bincount(folds[labels == cls], minlength=2)
        assert abs(counts[0] - counts[1]) <= 1, (cls, counts)  # every class in both folds
    assert abs(int((folds == 0).sum()) - int((folds == 1).sum())) <= 1
    with pytest.raises(ConfigError, match="2 folds"):
        fold_assignment(labels, 1, seed=0)


def test_automatic_batches_follow_the_training_set_and_scale_the_rate() -> None:
    from dm_audit.crossfit import make_train_config

    def trained(config: AuditConfig, n_train: int, kind: str) -> tuple[int, float]:
        train = make_train_config(
            config, loss="dm", loss_params={}, epochs=3, n_train=n_train, input_kind=kind
        )
        return train.batch_size, train.peak_lr

    auto = AuditConfig()
    # Feature tables (the MLP) keep the recipe's batch and rate up to 10 steps of 256 per
    # epoch, then double the batch (and the rate: linear scaling rule) up to 512.
    assert trained(auto, 89, "features") == (128, 0.1)
    assert trained(auto, 2_559, "features") == (128, 0.1)
    batch, lr = trained(auto, 2_560, "features")
    assert batch == 256 and lr == pytest.approx(0.2)
    batch, lr = trained(auto, 5_119, "features")
    assert batch == 256 and lr == pytest.approx(0.2)
    batch, lr = trained(auto, 5_120, "features")
    assert batch == 512 and lr == pytest.approx(0.4)
    assert trained(auto, 1_000_000, "features")[0] == 512
    assert trained(AuditConfig(model="mlp"), 5_120, "image")[0] == 512
    assert trained(AuditConfig(batch_size=64), 10_000, "features") == (64, 0.1)
    assert trained(AuditConfig(lr=0.05), 10_000, "features") == (512, 0.05)
    # A conv net gets 8 steps per epoch where batches of at least 16 allow, and the rate
    # scales with the batch (linear scaling rule).
    batch, lr = trained(auto, 150, "image")
    assert batch == 18 and lr == pytest.approx(0.1 * 18 / 128)
    assert trained(auto, 40, "image") == (16, pytest.approx(0.1 * 16 / 128))
    assert trained(auto, 5_000, "image") == (128, 0.1)
    # Any image model but the MLP counts as a conv net; on feature tables none does.
    assert trained(AuditConfig(model="mlp"), 150, "image")[0] == 128
    assert trained(AuditConfig(model="resnet20"), 150, "image")[0] == 18
    assert trained(AuditConfig(model="resnet20"), 150, "features")[0] == 128
    # What the user sets is kept as given.
    assert trained(AuditConfig(batch_size=64), 150, "image") == (64, 0.1)
    assert trained(AuditConfig(lr=0.05), 150, "image") == (18, 0.05)
    with pytest.raises(ConfigError, match="batch_size"):
        AuditConfig(batch_size=1)


def test_the_emphasis_reported_is_the_one_that_trained_the_models() -> None:
    from types import SimpleNamespace

    from dm_audit.audit import AuditFit, CrossFit
    from dm_audit.estimate import EmphasisChoice

    requested = EmphasisChoice(1.0, 16.0, "from the noise estimate")
    # The collapse guard halved fold 1's emphasis; fold 0 kept the requested one.
    fits = [
        SimpleNamespace(loss_params={"lam": 1.0, "beta": 16.0}),
        SimpleNamespace(loss_params={"lam": 0.5, "beta": 8.0}),
    ]
    fitted = AuditFit(CrossFit(fits, np.array([0, 1])), requested, 0.0)
    effective = fitted.effective_choice
    assert (effective.lam, effective.beta) == (0.5, 8.0)
    assert "softened by the collapse guard (fold 1)" in effective.reason
    untouched = AuditFit(CrossFit(fits[:1], np.array([0, 0])), requested, 0.0)
    assert untouched.effective_choice == requested


def test_on_stage_is_told_every_stage_in_order(blobs_dataset) -> None:
    from dm_audit.audit import STAGES

    told: list[tuple[str, type]] = []
    report = run_audit(
        blobs_dataset,
        AuditConfig(seed=0, progress=False, device="cpu", epochs=4, probe_epochs=2),
        on_stage=lambda name, result: told.append((name, type(result))),
    )
    assert [name for name, _ in told] == list(STAGES)
    assert told[-1][1] is type(report)
    # Every stage's wall time is in the summary; the flags are known before the rest.
    seconds = report.summary["seconds"]
    assert list(seconds["stages"]) == list(STAGES)
    assert all(s >= 0 for s in seconds["stages"].values())
    to_flags = sum(seconds["stages"][name] for name in STAGES[: STAGES.index("flags") + 1])
    assert seconds["to_flags"] == pytest.approx(to_flags, abs=1e-2)
    assert seconds["to_flags"] <= sum(seconds["stages"].values())


def test_the_plan_and_its_expected_time_are_announced_before_the_audit_training(
    blobs_dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    from types import SimpleNamespace

    from dm_audit.stage_training import training_plan

    stages: dict[str, object] = {}
    run_audit(
        blobs_dataset,
        AuditConfig(seed=0, progress=True, device="cpu", epochs=4, probe_epochs=2),
        on_stage=stages.__setitem__,
    )
    assert stages["probe"].epoch_seconds > 0
    err = capsys.readouterr().err
    plan = next(line for line in err.splitlines() if "expected about" in line)
    assert "2 x 2 cross-fitted models of 4 epochs (batch 128, lr 0.1)" in plan
    # The plan comes after the probe's lines and before the audit training's.
    assert err.index("1/3 probe") < err.index(plan) < err.index("2/3 audit")
    # From the probe's median epoch when known, else its whole time over its epochs.
    config = AuditConfig(epochs=60, probe_epochs=15, retrain=False)
    text = training_plan(SimpleNamespace(seconds=30.0, epoch_seconds=0.8), config, 900, 60)
    assert "1 x 2 cross-fitted models of 60 epochs (batch 128, lr 0.1) on 900 rows" in text
    # A conv net on 450 rows per fold: batches of 56, 8 steps per epoch.
    images = training_plan(
        SimpleNamespace(seconds=30.0, epoch_seconds=0.8), config, 900, 60, "image"
    )
    assert "(batch 56, lr 0.0438) on 900 rows" in images
    assert "expected about 48 s" in text  # 0.8 s per epoch x 60 epochs
    text = training_plan(SimpleNamespace(seconds=12.0, epoch_seconds=None), config, 900, 60)
    assert "expected about 48 s" in text  # 12 s / 15 epochs x 60 epochs
