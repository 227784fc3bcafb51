"""The report files' schemas and names: the contract other tools read.

Every schema is a pyarrow schema carrying ``dm_audit_schema_version`` (and ``dm_audit_table``)
in its metadata. A change that renames, removes or retypes a column bumps `SCHEMA_VERSION`;
adding a nullable column does not. `dm_audit.reports` validates and writes tables against them.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = [
    "CLASSES_SCHEMA",
    "CORRECTED_LABELS_SCHEMA",
    "EXAMPLES_SCHEMA",
    "LABEL_ISSUES_SCHEMA",
    "METRICS_SCHEMA",
    "REPORT_FILES",
    "REPORT_OWNED_FILES",
    "SCHEMAS",
    "SCHEMA_VERSION",
    "TABLE_KEY",
    "UNIT_COLUMNS",
    "VERSION_KEY",
]

SCHEMA_VERSION = "1"
VERSION_KEY = b"dm_audit_schema_version"
TABLE_KEY = b"dm_audit_table"


def _schema(table: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(
        fields, metadata={VERSION_KEY: SCHEMA_VERSION.encode(), TABLE_KEY: table.encode()}
    )


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


# One row per training example. Non-nullable fields are required in the input frame; nullable
# ones are filled with nulls when absent (true_label / is_noisy are known only for synthetic
# noise, mean_p only when dynamics were recorded).
EXAMPLES_SCHEMA = _schema(
    "examples",
    [
        _f("example_id", pa.string()),
        _f("split", pa.string(), True),
        _f("fold", pa.int32(), True),
        _f("given_label", pa.string()),
        _f("true_label", pa.string(), True),
        _f("is_noisy", pa.bool_(), True),
        _f("p_given", pa.float32()),
        _f("mean_p", pa.float32(), True),
        _f("emphasis_weight", pa.float32()),
        _f("predicted_label", pa.string()),
        _f("predicted_prob", pa.float32(), True),
        _f("knn_agreement", pa.float32(), True),
        _f("label_issue_score", pa.float32()),
        _f("is_label_issue", pa.bool_()),
        _f("ood_score", pa.float32()),
        _f("is_ood", pa.bool_()),
        # Exact and near copies (`dm_audit.duplicates`); the set is named by one member's id.
        _f("near_duplicate_score", pa.float32(), True),
        _f("is_near_duplicate", pa.bool_(), True),
        _f("near_duplicate_set", pa.string(), True),
        # A row outside the training split with a copy inside it.
        _f("is_leaked_duplicate", pa.bool_(), True),
        _f("suggested_label", pa.string()),
        _f("suggestion_confidence", pa.float32(), True),
        _f("corrected_label", pa.string(), True),
        _f("correction_source", pa.string(), True),
    ],
)

# The export for human review: flagged examples, most suspicious first.
LABEL_ISSUES_SCHEMA = _schema(
    "label_issues",
    [
        _f("example_id", pa.string()),
        _f("given_label", pa.string()),
        _f("suggested_label", pa.string()),
        _f("label_issue_score", pa.float32()),
        _f("suggestion_confidence", pa.float32(), True),
        _f("p_given", pa.float32(), True),
        # What the audit did with the row: auto_corrected, needs_review, ood_set_aside, ...
        _f("correction_source", pa.string(), True),
    ],
)

# The label each example carries into the retrain; corrected_label is null when set aside.
CORRECTED_LABELS_SCHEMA = _schema(
    "corrected_labels",
    [
        _f("example_id", pa.string()),
        _f("original_label", pa.string()),
        _f("corrected_label", pa.string(), True),
        _f("source", pa.string()),
    ],
)

# Per-epoch metrics: stage and epoch, then any number of numeric columns stored as float64.
METRICS_SCHEMA = _schema(
    "metrics", [_f("stage", pa.string()), _f("fold", pa.int32(), True), _f("epoch", pa.int32())]
)

# One row per class, worst label quality first (`dm_audit.class_health`).
CLASSES_SCHEMA = _schema(
    "classes",
    [
        _f("class", pa.string()),
        _f("rows", pa.int64()),
        _f("share", pa.float32()),
        _f("label_quality", pa.float32()),
        _f("noise_rate", pa.float32()),
        _f("label_issues", pa.int64()),
        _f("ood", pa.int64()),
        # Where the wrongly labelled rows of the class truly belong, largest share first.
        _f("confused_with", pa.list_(pa.string())),
        _f("confused_share", pa.list_(pa.float32())),
        _f("overlaps_most_with", pa.string(), True),
    ],
)

SCHEMAS: dict[str, pa.Schema] = {
    "examples": EXAMPLES_SCHEMA,
    "label_issues": LABEL_ISSUES_SCHEMA,
    "corrected_labels": CORRECTED_LABELS_SCHEMA,
    "metrics": METRICS_SCHEMA,
    "classes": CLASSES_SCHEMA,
}
REPORT_FILES = (
    "examples.parquet",
    "label_issues.parquet",
    "corrected_labels.parquet",
    "metrics.parquet",
    "classes.parquet",
    "report.html",
    "summary.json",
)
#: Every file a report writes (glob patterns): the only files replacing a report may remove.
REPORT_OWNED_FILES = (*REPORT_FILES, "plots/*.png")
#: Columns holding scores or probabilities, checked to lie in [0, 1].
UNIT_COLUMNS = (
    "p_given",
    "mean_p",
    "knn_agreement",
    "label_issue_score",
    "ood_score",
    "near_duplicate_score",
    "suggestion_confidence",
    "predicted_prob",
)
