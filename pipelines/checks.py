"""Asset checks that keep bad data and bad models from flowing on.

* ``dataset_is_valid`` (blocking): the dataset validates (labels in the class list, unique ids,
  finite features) and can be audited (two or more classes). Nothing trains on a dataset that
  fails it.
* ``flag_rate_is_plausible``: the share of examples flagged as label issues is not far above
  the estimated noise rate (a sign of a model that failed to learn, or of a bad threshold).
* ``reviews_applied``: every row of a reviews file was applied (unknown ids and labels listed).
* ``retrain_not_worse`` (blocking): out of sample (each row predicted by the cross-fitted
  models that never saw it) the retrained models are not worse than the audit models; otherwise
  the export for review is not published. Both are scored on the same rows against the same
  labels, so "worse" is a paired question: the check blocks only when the accuracy drop exceeds
  ``max_accuracy_drop`` and the one-sided exact McNemar test
  (:func:`dm_audit.metrics.mcnemar_worse_p`) on the rows that only one model gets right says
  it is no sampling accident (p <= ``retrain_check_alpha``). A retrain that loses 2 of 539
  rows (0.9852 -> 0.9814) passes; one that loses 40 and gains none does not.
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
from dm_audit.metrics import mcnemar_worse_p
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
    """Labels, ids and inputs validate, and the rows hold two or more classes.

    Every row is audited (cross-fitted), whatever its split. A class with fewer rows than
    cross-fitting folds only warns: some model never sees it, so its rows are scored by a model
    that cannot predict it.
    """
    errors: list[str] = []
    warnings: list[str] = []
    try:
        dataset.validate()
    except DataError as exc:
        errors.append(str(exc))
    table = dataset.table
    sizes = table["label"].value_counts()
    present = sorted(sizes.index)
    if len(present) < 2:
        errors.append(
            f"the dataset holds {len(table)} row(s) of {len(present)} class(es) {present}; "
            "an audit needs at least two classes to learn"
        )
    missing = [c for c in dataset.classes if c not in set(present)]
    if missing and len(present) >= 2:
        warnings.append(f"class(es) {missing} have no rows")
    rare = sorted(str(c) for c, n in sizes.items() if n < audit.CROSSFIT_FOLDS)
    if rare:
        warnings.append(
            f"class(es) {rare} have fewer than {audit.CROSSFIT_FOLDS} rows: a cross-fitted "
            "model that never saw them scores them"
        )
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
        return dg.AssetCheckResult(
            passed=True,
            description=(
                f"{share:.1%} of the examples are flagged; the estimated noise rate is "
                f"{rate:.1%} (allowed up to {limit:.1%})"
            ),
            metadata=metadata,
        )
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
    """The retrained models are not significantly worse out of sample than the audit models.

    Reads ``quality`` from ``summary.json``: ``accuracy_before`` / ``accuracy_after`` and
    ``paired`` (``n`` examples, ``before_only`` / ``after_only``: those only the audit model,
    only the retrained model gets right). Fails when the drop is above ``max_accuracy_drop``
    and the one-sided exact McNemar p-value that the retrained model is worse is at most
    ``retrain_check_alpha``: a drop of a few examples is within sampling error and passes.
    A report without the paired counts is compared on ``test_accuracy_before`` /
    ``test_accuracy_after`` alone (blocking on any drop above ``max_accuracy_drop``).

    Blocking: when it fails, ``mislabel_export`` is not published (the reports stay in the
    run's folder for diagnosis). Without a retrain (or rows to compare on) it cannot compare
    and only warns.
    """
    summary = json.loads(audit_reports.summary.read_text(encoding="utf-8"))
    quality = summary.get("quality") or {}
    tolerance = audit_settings.max_accuracy_drop
    paired = quality.get("paired")
    if not paired:
        return _unpaired_retrain_check(quality, tolerance)
    alpha = audit_settings.retrain_check_alpha
    before, after = quality.get("accuracy_before"), quality.get("accuracy_after")
    n = int(paired.get("n") or 0)
    before_only, after_only = paired.get("before_only"), paired.get("after_only")
    values: dict[str, Any] = {
        "accuracy_before": before,
        "accuracy_after": after,
        "n": n,
        "before_only": before_only,
        "after_only": after_only,
        "p_value": None,
        "alpha": alpha,
        "max_drop": tolerance,
    }
    if before is None or after is None or before_only is None or after_only is None or n == 0:
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description="no retrain (or no row kept its label): the models cannot be compared",
            metadata=scalar_metadata(values),
        )
    p_value = mcnemar_worse_p(int(before_only), int(after_only))
    values["p_value"] = p_value
    worse = after < before - tolerance and p_value <= alpha
    description = (
        f"out-of-sample accuracy {before:.4f} -> {after:.4f} after retraining, on the {n} rows "
        "whose label was kept "
        f"({before_only} lost, {after_only} gained; one-sided McNemar p = {p_value:.2g} for a "
        f"worse retrain, blocking at p <= {alpha:g} with a drop above {tolerance:g})"
    )
    if worse:
        description = "the retrained model is worse: " + description
    return dg.AssetCheckResult(
        passed=not worse,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata=scalar_metadata(values),
    )


def _unpaired_retrain_check(quality: dict[str, Any], tolerance: float) -> dg.AssetCheckResult:
    """`retrain_not_worse` on reports without paired counts: the plain accuracy comparison."""
    before = quality.get("test_accuracy_before")
    after = quality.get("test_accuracy_after")
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
