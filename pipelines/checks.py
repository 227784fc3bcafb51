"""Asset checks that keep bad data and bad models from flowing on.

* ``dataset_is_valid`` (blocking): the dataset validates (labels in the class list, unique ids,
  finite features) and its training split can be audited (two or more classes). Nothing trains
  on a dataset that fails it.
* ``flag_rate_is_plausible``: the share of examples flagged as label issues is not far above
  the estimated noise rate (a sign of a model that failed to learn, or of a bad threshold).
* ``reviews_applied``: every row of a reviews file was applied (unknown ids and labels listed).
* ``retrain_not_worse`` (blocking): on the held-out split the retrained model is not worse than
  the audit model; otherwise the export for review is not published.
"""

# No `from __future__ import annotations`: Dagster reads the parameter annotations at
# definition time to find config classes, resources and inputs, and strings would not resolve.

import json
from typing import Any

import dagster as dg
import pandas as pd

from dm_audit import audit
from dm_audit.dataset import AuditDataset
from dm_audit.errors import DataError
from dm_audit.reports import ReportPaths
from pipelines.metadata import markdown_table, scalar_metadata
from pipelines.resources import AuditSettings

__all__ = [
    "AUDIT_CHECKS",
    "dataset_is_valid",
    "flag_rate_is_plausible",
    "retrain_not_worse",
    "reviews_applied",
]

# Added to the allowed flag share: at a near-zero noise estimate a handful of flags is normal.
FLAG_RATE_SLACK = 0.05


@dg.asset_check(asset="dataset", blocking=True)
def dataset_is_valid(dataset: AuditDataset) -> dg.AssetCheckResult:
    """Labels, ids and inputs validate, and the training split holds two or more classes.

    A class without training examples, or no test split, only warns: the audit still runs, but
    that class cannot be learnt, or the retrained model cannot be compared on held-out data.
    """
    errors: list[str] = []
    warnings: list[str] = []
    try:
        dataset.validate()
    except DataError as exc:
        errors.append(str(exc))
    table = dataset.table
    train_labels = table.loc[table["split"] == "train", "label"]
    present = sorted(set(train_labels))
    if len(present) < 2:
        errors.append(
            f"the training split holds {len(train_labels)} example(s) of {len(present)} class(es) "
            f"{present}; an audit needs at least two classes to learn"
        )
    missing = [c for c in dataset.classes if c not in set(present)]
    if missing and len(present) >= 2:
        warnings.append(f"class(es) {missing} have no training examples")
    if not (table["split"] == "test").any():
        warnings.append("no test split: the retrained model cannot be compared on held-out data")
    counts = table.groupby(["label", "split"]).size().unstack(fill_value=0).reset_index()
    metadata = {
        **scalar_metadata({"errors": errors, "warnings": warnings, "n_rows": len(table)}),
        "class_counts": dg.MetadataValue.md(markdown_table(counts)),
    }
    problems = errors or warnings
    return dg.AssetCheckResult(
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR if errors else dg.AssetCheckSeverity.WARN,
        description="; ".join(problems) if problems else "the dataset is valid",
        metadata=metadata,
    )


@dg.asset_check(asset="flags")
def flag_rate_is_plausible(
    flags: audit.Flags, audit_settings: AuditSettings
) -> dg.AssetCheckResult:
    """The flagged share stays within ``max_flag_rate_ratio`` x the estimated noise rate + 5 %.

    Twice that limit fails with ERROR severity: a flag rate that far off the estimate means the
    audit model or the threshold is broken, not that the data is that noisy.
    """
    share = float(flags.table["is_label_issue"].mean())
    rate = float(flags.noise_estimate.rate)
    limit = audit_settings.max_flag_rate_ratio * rate + FLAG_RATE_SLACK
    metadata = scalar_metadata(
        {"flagged_share": share, "estimated_noise_rate": rate, "allowed_share": limit}
    )
    if share <= limit:
        return dg.AssetCheckResult(passed=True, metadata=metadata)
    return dg.AssetCheckResult(
        passed=False,
        severity=dg.AssetCheckSeverity.ERROR if share > 2 * limit else dg.AssetCheckSeverity.WARN,
        description=(
            f"{share:.1%} of the examples are flagged but the estimated noise rate is "
            f"{rate:.1%} (allowed up to {limit:.1%})"
        ),
        metadata=metadata,
    )


@dg.asset_check(asset="corrected_labels")
def reviews_applied(corrected_labels: audit.Corrections) -> dg.AssetCheckResult:
    """Every row of the reviews file was applied; unknown ids or labels fail with WARN."""
    report = corrected_labels.review_report
    if report is None:
        return dg.AssetCheckResult(passed=True, description="no reviews file in this run")
    metadata: dict[str, Any] = scalar_metadata(
        {"path": str(report.path), "n_rows": report.n_rows, "n_accepted": report.n_accepted}
    )
    if report.ok:
        return dg.AssetCheckResult(passed=True, metadata=metadata)
    problems = pd.DataFrame([vars(p) for p in report.problems])
    metadata["problems"] = dg.MetadataValue.md(markdown_table(problems, max_rows=50))
    return dg.AssetCheckResult(
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        description=report.summary(limit=5),
        metadata=metadata,
    )


@dg.asset_check(asset="audit_reports", blocking=True)
def retrain_not_worse(
    audit_reports: ReportPaths, audit_settings: AuditSettings
) -> dg.AssetCheckResult:
    """Held-out accuracy after retraining >= before - ``max_accuracy_drop``.

    Blocking: when it fails, ``mislabel_export`` is not published (the reports stay in the
    run's folder for diagnosis). Without a test split it cannot compare and only warns.
    """
    summary = json.loads(audit_reports.summary.read_text(encoding="utf-8"))
    before = summary["quality"]["test_accuracy_before"]
    after = summary["quality"]["test_accuracy_after"]
    tolerance = audit_settings.max_accuracy_drop
    metadata = scalar_metadata(
        {"test_accuracy_before": before, "test_accuracy_after": after, "max_drop": tolerance}
    )
    if before is None or after is None:
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description="no held-out split (or no retrain): the models cannot be compared",
            metadata=metadata,
        )
    passed = after >= before - tolerance
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"held-out accuracy {before:.4f} -> {after:.4f} after retraining"
        + ("" if passed else f" (drop above the allowed {tolerance:.4f})"),
        metadata=metadata,
    )


AUDIT_CHECKS = [dataset_is_valid, flag_rate_is_plausible, reviews_applied, retrain_not_worse]
