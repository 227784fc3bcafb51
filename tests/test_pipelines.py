"""The Dagster pipeline end to end: definitions, a full audit, blocking checks, reviews.

The audit runs once per module on a small seeded table (three separable Gaussian blobs with 20%
symmetric label noise injected by the dataset asset, so the truth is known) and the tests read
its events and reports.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from dm_audit.dataset import AuditDataset
from dm_audit.reports import ReportPaths
from pipelines.assets import AUDIT_ASSETS, dataset
from pipelines.checks import AUDIT_CHECKS, dataset_is_valid, retrain_not_worse
from pipelines.definitions import build_resources, defs, executor_from_name
from pipelines.jobs import AUDIT_ASSETS as AUDIT_ASSET_NAMES
from pipelines.jobs import RELABEL_ASSETS, UPSTREAM_RUN_TAG
from pipelines.resources import AuditRuntime, AuditSettings

CLASSES = ("ant", "bee", "cat")
N_PER_CLASS = 80
NOISE_RATE = 0.2


def audit_settings(**overrides: object) -> AuditSettings:
    """Few epochs: the blobs are separable, so the audit still finds the flipped labels."""
    return AuditSettings(
        **{"epochs": 8, "probe_epochs": 3, "batch_size": 64, "knn_k": 5, **overrides}
    )


def write_blobs(path: Path, *, seed: int = 0) -> Path:
    """A CSV of three Gaussian blobs in 6-D, 80 rows per class, ids ``ex-000`` ..."""
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(len(CLASSES)), N_PER_CLASS)
    centres = 4.0 * np.eye(len(CLASSES), 6)
    features = centres[codes] + rng.normal(0.0, 0.6, size=(len(codes), 6))
    frame = pd.DataFrame(features, columns=[f"f{i}" for i in range(6)])
    frame.insert(0, "example_id", [f"ex-{i:03d}" for i in range(len(codes))])
    frame["label"] = np.array(CLASSES)[codes]
    frame.to_csv(path, index=False)
    return path


def resources_for(root: Path, settings: AuditSettings | None = None) -> dict[str, object]:
    resources = build_resources(AuditRuntime(output_root=str(root), device="cpu"))
    resources["audit_settings"] = settings or audit_settings()
    return resources


def materialize_bad_dataset(source: Path, root: Path) -> dg.ExecuteInProcessResult:
    """Materialise the whole graph on a dataset that must fail its blocking check."""
    with dg.instance_for_test() as instance:
        return dg.materialize(
            [*AUDIT_ASSETS, *AUDIT_CHECKS],
            resources=resources_for(root),
            instance=instance,
            run_config=dataset_config(source),
            raise_on_error=False,
        )


def dataset_config(source: Path, **extra: object) -> dict[str, object]:
    config = {"source": str(source), "id_column": "example_id", "test_size": 0.3, **extra}
    return {"ops": {"dataset": {"config": config}}}


def materialized(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def asset_metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, object]:
    for event in result.get_asset_materialization_events():
        if event.asset_key.to_user_string() == asset:
            return {k: v.value for k, v in event.materialization.metadata.items()}
    raise KeyError(asset)


@dataclass
class Audit:
    instance: dg.DagsterInstance
    root: Path
    result: dg.ExecuteInProcessResult

    @property
    def report_dir(self) -> Path:
        return self.root / self.result.run_id / "report"


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audit]:
    """One full audit of the blobs table, shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("pipeline")
    source = write_blobs(tmp / "blobs.csv")
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [*AUDIT_ASSETS, *AUDIT_CHECKS],
            resources=resources_for(tmp / "runs"),
            instance=instance,
            run_config=dataset_config(source, noise_kind="symmetric", noise_rate=NOISE_RATE),
        )
        yield Audit(instance, tmp / "runs", result)


# ------------------------------------------------------------------------------ definitions


def test_definitions_resolve_every_job_asset_check_sensor_and_schedule() -> None:
    assert defs.resolve_job_def("audit_job").name == "audit_job"
    relabel = defs.resolve_job_def("relabel_job")
    audit_job = defs.resolve_job_def("audit_job")
    assert {n.name for n in audit_job.nodes} >= set(AUDIT_ASSET_NAMES)
    assert {n.name for n in relabel.nodes} >= set(RELABEL_ASSETS)
    assert "dataset" not in {n.name for n in relabel.nodes}
    graph = defs.resolve_asset_graph()
    # Plus the torchrun training launched through Pipes (tests/test_pipelines_pipes.py).
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {
        *AUDIT_ASSET_NAMES,
        "distributed_model",
    }
    assert {k.name for k in graph.asset_check_keys} == {
        "dataset_is_valid",
        "flag_rate_is_plausible",
        "reviews_applied",
        "retrain_not_worse",
    }
    assert defs.resolve_schedule_def("audit_schedule").job_name == "audit_job"
    assert defs.resolve_sensor_def("new_dataset_sensor").job_name == "audit_job"
    assert defs.resolve_sensor_def("reviews_sensor").job_name == "relabel_job"


def test_every_setting_reaches_the_library_config() -> None:
    config = AuditSettings(epochs=7, lam=1.0, beta=8.0, top_k=5).audit_config("cpu")
    assert (config.epochs, config.lam, config.beta, config.top_k, config.device) == (
        7,
        1.0,
        8.0,
        5,
        "cpu",
    )
    # Every setting but the thresholds of the checks is an AuditConfig option.
    check_only = {"max_flag_rate_ratio", "max_accuracy_drop", "retrain_check_alpha"}
    assert set(AuditSettings.model_fields) - check_only <= set(vars(config))


def test_the_default_config_audits_the_built_in_digits(tmp_path: Path) -> None:
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [dataset, dataset_is_valid], resources=resources_for(tmp_path), instance=instance
        )
    meta = asset_metadata(result, "dataset")
    # Every row is audited: no rows are held out by default.
    assert (meta["dagster/row_count"], meta["n_train"], meta["n_test"]) == (1797, 1797, 0)
    assert meta["n_classes"] == 10
    assert check_results(result)["dataset_is_valid"].passed


# ------------------------------------------------------------------------------ the full audit


def test_the_whole_graph_materialises_with_checks_passing(audit_run: Audit) -> None:
    assert audit_run.result.success
    assert materialized(audit_run.result) == set(AUDIT_ASSET_NAMES)
    checks = check_results(audit_run.result)
    assert set(checks) == {c.check_key.name for c in AUDIT_CHECKS}
    assert all(c.passed for c in checks.values()), {k: c.description for k, c in checks.items()}


def test_reports_land_in_the_run_folder_and_the_export_is_published(audit_run: Audit) -> None:
    report = audit_run.report_dir
    for name in ("examples.parquet", "label_issues.parquet", "summary.json"):
        assert (report / name).is_file(), name
    examples = pd.read_parquet(report / "examples.parquet")
    assert len(examples) == N_PER_CLASS * len(CLASSES)  # every input row is audited
    summary = json.loads((report / "summary.json").read_text())
    assert summary["counts"]["label_issues"] == int(examples["is_label_issue"].sum())

    export = audit_run.root / "exports" / "label_issues.parquet"
    assert export.read_bytes() == (report / "label_issues.parquet").read_bytes()
    issues = pd.read_parquet(export)
    assert len(issues) == summary["counts"]["label_issues"]
    assert issues["label_issue_score"].is_monotonic_decreasing


def test_metadata_shows_counts_noise_rate_detection_and_plots(audit_run: Audit) -> None:
    data = asset_metadata(audit_run.result, "dataset")
    # The config holds 30 % out as a "test" split: noise goes into the training split only, and
    # every row, the test split's too, is audited.
    n_train = round(N_PER_CLASS * 0.7) * len(CLASSES)
    assert data["injected_noise"] == {"clean": N_PER_CLASS * 3 - int(NOISE_RATE * n_train),
                                      "flipped": int(NOISE_RATE * n_train)}  # fmt: skip

    probe = asset_metadata(audit_run.result, "noise_probe")
    assert 0.05 < probe["probe_noise_rate"] < 0.4
    assert probe["lambda"] > 0 and probe["beta"] > 0

    reports = asset_metadata(audit_run.result, "audit_reports")
    truth = json.loads((audit_run.report_dir / "summary.json").read_text())["against_truth"]
    n_rows = N_PER_CLASS * len(CLASSES)
    assert reports["true_noise_rate"] == pytest.approx(int(NOISE_RATE * n_train) / n_rows)
    # Metadata shows four significant digits; summary.json keeps the exact values.
    assert reports["detection_recall"] == pytest.approx(truth["label_issues"]["recall"], rel=1e-3)
    assert reports["detection_precision"] == pytest.approx(
        truth["label_issues"]["precision"], rel=1e-3
    )
    # Separable blobs: the flipped labels rank first and the flags are right.
    assert reports["detection_auroc"] > 0.95
    assert reports["detection_precision"] > 0.9
    assert reports["detection_recall"] > 0.8
    assert reports["label_accuracy_after"] > reports["label_accuracy_before"]
    assert reports["top_suspects"].startswith("| example_id | given_label | suggested_label |")
    flagged = asset_metadata(audit_run.result, "flags")["top_suspects"]
    assert flagged.startswith(
        "| example_id | given_label | predicted_label | label_issue_score | p_given |"
    )
    assert "knn_agreement" not in flagged and "is_ood" not in flagged
    decisions = asset_metadata(audit_run.result, "corrected_labels")["decisions"]
    assert decisions.startswith("| example_id | given_label | suggested_label |")
    plots = [k for k in reports if k.startswith("plot_")]
    assert "plot_p_distribution" in plots and "plot_class_health" in plots
    assert reports["report_html"].endswith("report.html")
    assert 0.0 <= reports["label_health_score"] <= 1.0
    assert reports["class_health"].startswith("| class | rows | label_quality |")
    # One noise rate per meaning: the probe's, and the one that sets how many rows are flagged.
    assert reports["estimated_noise_rate"] == pytest.approx(
        asset_metadata(audit_run.result, "flags")["estimated_noise_rate"]
    )
    assert all(reports[k].startswith("![") and "base64," in reports[k] for k in plots)


def test_stage_results_are_stored_per_run_as_data(audit_run: Audit) -> None:
    import torch

    stages = audit_run.root / audit_run.result.run_id / "stages"
    assert (stages / "dataset" / "stage.json").is_file()
    assert (stages / "dataset" / "blob-0.parquet").is_file()
    models = [p for p in (stages / "audit_model").glob("blob-*.pt")]
    states = [torch.load(p, weights_only=True) for p in models]
    assert any(key.endswith("weight") for state in states for key in state)
    suffixes = {p.suffix for p in stages.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".npy", ".parquet", ".pt"}, suffixes  # no pickles


# ------------------------------------------------------------------------------ blocking checks


def test_a_split_column_does_not_hide_rows_from_the_audit() -> None:
    # Only "ant" rows are marked for training: every row is audited anyway, so the check passes.
    rows = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
    labels = ["ant", "bee", "cat"] * 4
    split = ["train" if label == "ant" else "test" for label in labels]
    check = dataset_is_valid(AuditDataset.from_arrays(labels, features=rows, split=split))
    assert check.passed, check.description


def test_a_class_with_one_row_warns() -> None:
    rows = np.random.default_rng(0).normal(size=(9, 3)).astype(np.float32)
    check = dataset_is_valid(
        AuditDataset.from_arrays(["ant"] * 4 + ["bee"] * 4 + ["cat"], features=rows)
    )
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "['cat']" in check.description


def test_infinite_features_stop_the_graph_at_the_dataset(tmp_path: Path) -> None:
    source = write_blobs(tmp_path / "inf.csv")
    frame = pd.read_csv(source)
    frame.loc[7, "f3"] = np.inf
    frame.to_csv(source, index=False)
    result = materialize_bad_dataset(source, tmp_path / "runs")
    assert not result.success
    assert materialized(result) == set()
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "dataset"
    assert "ex-007" in failure.event_specific_data.error.cause.message


def test_a_worse_retrain_blocks_the_export(audit_run: Audit, tmp_path: Path) -> None:
    # Demand an improvement no model can make, and block on any shortfall however small (alpha
    # 1: no significance needed), so the retrain check must fail.
    strict = audit_settings(max_accuracy_drop=-1.0, retrain_check_alpha=1.0)
    result = dg.materialize(
        [*AUDIT_ASSETS, *AUDIT_CHECKS],
        selection=["audit_reports", "mislabel_export"],
        resources=resources_for(audit_run.root, strict),
        instance=audit_run.instance,
        tags={UPSTREAM_RUN_TAG: audit_run.result.run_id},
        raise_on_error=False,
    )
    assert materialized(result) == {"audit_reports"}
    check = check_results(result)["retrain_not_worse"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR


def reports_with_quality(folder: Path, quality: dict[str, object]) -> ReportPaths:
    """`ReportPaths` of a report folder holding only a ``summary.json`` with ``quality``."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = folder / "summary.json"
    summary.write_text(json.dumps({"quality": quality}), encoding="utf-8")
    missing = folder / "missing"
    return ReportPaths(folder, missing, missing, missing, missing, summary, {})


def paired_quality(n: int, correct_before: int, before_only: int, after_only: int) -> dict:
    correct_after = correct_before - before_only + after_only
    return {
        "accuracy_before": correct_before / n,
        "accuracy_after": correct_after / n,
        "paired": {"n": n, "before_only": before_only, "after_only": after_only},
    }


def test_a_retrain_two_examples_worse_passes_within_sampling_error(tmp_path: Path) -> None:
    # The default digits run: 531 of 539 test examples right before, 529 after.
    quality = paired_quality(539, 531, before_only=2, after_only=0)
    result = retrain_not_worse(reports_with_quality(tmp_path, quality), audit_settings())
    assert result.passed
    assert result.description.startswith("out-of-sample accuracy 0.9852 -> 0.9814")
    assert "539 rows" in result.description and "p = 0.25" in result.description
    meta = {k: v.value for k, v in result.metadata.items()}
    assert meta["n"] == 539 and (meta["before_only"], meta["after_only"]) == (2, 0)
    assert meta["p_value"] == pytest.approx(0.25)  # P(X >= 2), X ~ Bin(2, 1/2)
    assert (meta["accuracy_before"], meta["accuracy_after"]) == pytest.approx(
        (531 / 539, 529 / 539), rel=1e-3
    )
    # Blocking on any drop (alpha 1) restores the plain comparison: the same run fails.
    strict = retrain_not_worse(
        reports_with_quality(tmp_path, quality), audit_settings(retrain_check_alpha=1.0)
    )
    assert not strict.passed and strict.severity == dg.AssetCheckSeverity.ERROR


def test_a_retrain_forty_examples_worse_is_blocked(tmp_path: Path) -> None:
    quality = paired_quality(539, 531, before_only=40, after_only=0)
    result = retrain_not_worse(reports_with_quality(tmp_path, quality), audit_settings())
    assert not result.passed and result.severity == dg.AssetCheckSeverity.ERROR
    assert result.description.startswith("the retrained model is worse")
    assert result.metadata["p_value"].value == pytest.approx(2.0**-40)
    # Significant, but within an allowed drop of 0.1 (40 / 539 = 0.074): passes.
    lenient = audit_settings(max_accuracy_drop=0.1)
    assert retrain_not_worse(reports_with_quality(tmp_path, quality), lenient).passed


def test_an_improved_retrain_passes_even_when_an_improvement_is_demanded(tmp_path: Path) -> None:
    # Many discordant examples, more of them gained than lost: no evidence of a worse model.
    quality = paired_quality(539, 500, before_only=10, after_only=30)
    settings = audit_settings(max_accuracy_drop=-1.0)
    assert retrain_not_worse(reports_with_quality(tmp_path, quality), settings).passed


@pytest.mark.parametrize(
    "quality",
    [
        {},
        {"test_accuracy_before": 0.9, "test_accuracy_after": None},
        {"accuracy_before": 0.9, "accuracy_after": None, "paired": None},
        {"accuracy_before": 0.9, "accuracy_after": 0.9, "paired": {"n": 0}},
    ],
    ids=["no-fields", "old-fields-no-retrain", "no-retrain", "no-examples"],
)
def test_a_retrain_check_without_the_figures_only_warns(tmp_path: Path, quality: dict) -> None:
    result = retrain_not_worse(reports_with_quality(tmp_path, quality), audit_settings())
    assert not result.passed and result.severity == dg.AssetCheckSeverity.WARN
    assert "cannot be compared" in result.description


def test_reports_without_paired_counts_are_compared_as_before(tmp_path: Path) -> None:
    old = {"test_accuracy_before": 0.9852, "test_accuracy_after": 0.9814}
    result = retrain_not_worse(reports_with_quality(tmp_path, old), audit_settings())
    assert not result.passed and result.severity == dg.AssetCheckSeverity.ERROR
    assert "drop above the allowed 0.0000" in result.description
    assert set(result.metadata) == {"test_accuracy_before", "test_accuracy_after", "max_drop"}
    tolerant = audit_settings(max_accuracy_drop=0.01)
    assert retrain_not_worse(reports_with_quality(tmp_path, old), tolerant).passed


def test_the_retrain_check_level_is_validated() -> None:
    for alpha in (0.0, 1.5):
        with pytest.raises(ValueError, match="retrain_check_alpha"):
            AuditSettings(retrain_check_alpha=alpha)


# ------------------------------------------------------------------------------ reviews


def test_reviews_change_exactly_the_reviewed_labels(audit_run: Audit, tmp_path: Path) -> None:
    before = pd.read_parquet(audit_run.report_dir / "corrected_labels.parquet")
    before = before.set_index("example_id")
    # Three reviews that disagree with the automatic decision, one unknown id, one unknown label.
    picked = before.index[[0, 10, 20]]
    relabel = {
        eid: next(c for c in CLASSES if c != before.loc[eid, "corrected_label"]) for eid in picked
    }
    rows = [*relabel.items(), ("ex-999", "ant"), (before.index[30], "dog")]
    reviews = tmp_path / "reviews.csv"
    pd.DataFrame(rows, columns=["example_id", "label"]).to_csv(reviews, index=False)

    result = dg.materialize(
        [*AUDIT_ASSETS, *AUDIT_CHECKS],
        selection=list(RELABEL_ASSETS),
        resources=resources_for(audit_run.root),
        instance=audit_run.instance,
        run_config={"ops": {"corrected_labels": {"config": {"reviews_path": str(reviews)}}}},
        tags={UPSTREAM_RUN_TAG: audit_run.result.run_id},
        raise_on_error=False,
    )

    assert materialized(result) >= {"corrected_labels", "retrained_model", "audit_reports"}
    after = pd.read_parquet(audit_run.root / result.run_id / "report" / "corrected_labels.parquet")
    after = after.set_index("example_id")
    # Examples set aside have no corrected label: compare them as equal.
    differs = after.fillna("-") != before.fillna("-")
    changed = after.index[differs["corrected_label"] | differs["source"]]
    assert sorted(changed) == sorted(relabel)
    for eid, label in relabel.items():
        assert (after.loc[eid, "corrected_label"], after.loc[eid, "source"]) == (label, "reviewed")

    meta = asset_metadata(result, "corrected_labels")
    assert (meta["reviews_accepted"], meta["review_rows_not_used"]) == (3, 2)
    problems = {(p["example_id"], p["problem"]) for p in meta["review_problems"]}
    assert problems == {("ex-999", "unknown_id"), (before.index[30], "unknown_label")}
    check = check_results(result)["reviews_applied"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "ex-999" in check.description


# ------------------------------------------------------------------------------ executors


def test_executors_are_chosen_by_name() -> None:
    assert executor_from_name("in_process") is dg.in_process_executor
    assert executor_from_name("multiprocess") is dg.multiprocess_executor
    with pytest.raises(ValueError, match="not one of"):
        executor_from_name("ray")
    try:
        import dagster_k8s  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the package dagster-k8s"):
            executor_from_name("k8s")


def test_training_steps_ask_kubernetes_for_gpus_only_when_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipelines.assets import _gpu_op_tags

    monkeypatch.delenv("DM_AUDIT_K8S_GPUS", raising=False)
    assert _gpu_op_tags() == {}
    monkeypatch.setenv("DM_AUDIT_K8S_GPUS", "2")
    limits = _gpu_op_tags()["dagster-k8s/config"]["container_config"]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": "2"}


# ------------------------------------------------------------------------------ idempotency


def test_materialising_the_reports_twice_in_one_run_folder_gives_the_same_reports(
    audit_run: Audit,
) -> None:
    # A retried step runs again with its run's id: the second write replaces the first with
    # identical files and leaves nothing else behind.
    job = dg.define_asset_job("reports_again", selection=["audit_reports"])
    job_def = dg.Definitions(
        assets=list(AUDIT_ASSETS), jobs=[job], resources=resources_for(audit_run.root)
    ).resolve_job_def("reports_again")
    run_id = "00000000-0000-4000-8000-000000000001"
    folder = audit_run.root / run_id / "report"
    contents = []
    for _ in range(2):
        with dg.instance_for_test() as instance:
            result = job_def.execute_in_process(
                instance=instance, run_id=run_id, tags={UPSTREAM_RUN_TAG: audit_run.result.run_id}
            )
        assert materialized(result) == {"audit_reports"}
        contents.append(
            {
                str(p.relative_to(folder)): p.read_bytes()
                for p in sorted(folder.rglob("*"))
                if p.is_file() and p.name != ".dm-audit-run.json"
            }
        )
    assert contents[0] == contents[1]
    assert {"examples.parquet", "summary.json", "plots/noise_matrix.png"} <= set(contents[0])
    assert not list(folder.glob(".staging-*"))


def test_the_default_run_is_one_process_and_every_network_step_is_pooled() -> None:
    from pipelines import definitions
    from pipelines.assets import MODEL_POOL

    assert definitions.DEFAULT_EXECUTOR == "in_process"
    repo = definitions.defs.get_repository_def()
    pooled = {
        node.name
        for job in [repo.get_job("audit_job")]
        for node in job.graph.node_defs
        if getattr(node, "pool", None) == MODEL_POOL
    }
    assert {"noise_probe", "audit_model", "retrained_model"} <= pooled
