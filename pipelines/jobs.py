"""Jobs: the full audit, and the relabel-and-retrain job that applies human reviews.

Both jobs run their assets' checks too (Dagster includes the checks of selected assets), so the
blocking checks guard scheduled and sensor-started runs as well as manual ones.

Every run carries the tag ``dm-audit/pipeline``; a deployment that wants one audit at a time
(runs share the GPU) limits it in ``dagster.yaml``::

    concurrency:
      runs:
        tag_concurrency_limits:
          - {key: dm-audit/pipeline, limit: 1}
"""

from __future__ import annotations

import dagster as dg

__all__ = [
    "AUDIT_ASSETS",
    "PIPELINE_TAG",
    "RELABEL_ASSETS",
    "REVIEWS_FILE_TAG",
    "SOURCE_FILE_TAG",
    "UPSTREAM_RUN_TAG",
    "audit_job",
    "relabel_job",
]

#: Run tag of every dm-audit run ("audit" or "relabel"), for run-queue limits.
PIPELINE_TAG = "dm-audit/pipeline"
#: Run tag naming the run whose stage results a run reads for inputs it does not produce.
UPSTREAM_RUN_TAG = "dm-audit/upstream-run"
#: Run tags naming the file that started a sensor run.
SOURCE_FILE_TAG = "dm-audit/source-file"
REVIEWS_FILE_TAG = "dm-audit/reviews-file"

#: Every asset of the audit, in data-flow order.
AUDIT_ASSETS: tuple[str, ...] = (
    "dataset",
    "noise_probe",
    "audit_model",
    "example_scores",
    "flags",
    "corrected_labels",
    "retrained_model",
    "audit_reports",
    "mislabel_export",
)
#: What a reviews file changes: the corrections and everything after them.
RELABEL_ASSETS: tuple[str, ...] = AUDIT_ASSETS[AUDIT_ASSETS.index("corrected_labels") :]

audit_job = dg.define_asset_job(
    name="audit_job",
    selection=dg.AssetSelection.assets(*AUDIT_ASSETS),
    description="Ingest, probe, train with DM, score, flag, correct, retrain and report.",
    tags={PIPELINE_TAG: "audit"},
)

relabel_job = dg.define_asset_job(
    name="relabel_job",
    selection=dg.AssetSelection.assets(*RELABEL_ASSETS),
    description=(
        "Apply a reviews file over the automatic corrections of an earlier audit (its dataset, "
        "scores and flags are reused), retrain and publish new reports."
    ),
    tags={PIPELINE_TAG: "relabel"},
)
