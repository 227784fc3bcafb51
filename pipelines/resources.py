"""Typed Dagster resources: where runs write, which device trains, and the audit parameters.

`AuditSettings` is a resource rather than an asset ``Config`` because all seven audit stages read
the same parameters: a resource gives one value per run that every stage sees, and a run can
still override any field from the launchpad or a sensor::

    resources:
      audit_settings:
        config: {epochs: 20, lam: 1.0, beta: 8.0}

Defaults come from environment variables where a deployment is likely to differ
(``DM_AUDIT_OUTPUT_ROOT``, ``DM_AUDIT_DEVICE``), read when the definitions load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

if TYPE_CHECKING:
    from dm_audit.audit import AuditConfig

__all__ = [
    "DEFAULT_DEVICE",
    "DEFAULT_OUTPUT_ROOT",
    "AuditRuntime",
    "AuditSettings",
]

DEFAULT_OUTPUT_ROOT = "data/runs"
DEFAULT_DEVICE = "auto"


class AuditRuntime(dg.ConfigurableResource):
    """Where a run writes its reports and intermediate results, and which device it trains on.

    A run writes under <output_root>/<run_id>/: report/ holds the Parquet reports, report.html,
    summary.json and plots; stages/ holds the intermediate results passed between assets. The
    review export is published at <output_root>/exports/label_issues.parquet.
    """

    output_root: str = Field(
        default=DEFAULT_OUTPUT_ROOT,
        description="Folder that receives one sub-folder per run (relative paths: to the cwd).",
    )
    device: str = Field(
        default=DEFAULT_DEVICE,
        description='"auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps".',
    )

    def run_dir(self, run_id: str) -> Path:
        """Folder of one run: ``<output_root>/<run_id>``."""
        return Path(self.output_root) / run_id

    def report_dir(self, run_id: str) -> Path:
        """Folder of one run's reports: ``<output_root>/<run_id>/report``."""
        return self.run_dir(run_id) / "report"

    def stage_dir(self, run_id: str) -> Path:
        """Folder of one run's intermediate results: ``<output_root>/<run_id>/stages``."""
        return self.run_dir(run_id) / "stages"

    def export_dir(self) -> Path:
        """Stable folder reviewers read the latest export from: ``<output_root>/exports``."""
        return Path(self.output_root) / "exports"


class AuditSettings(dg.ConfigurableResource):
    """Audit parameters shared by every stage; each maps to a field of `dm_audit.audit.AuditConfig`.

    None means "choose automatically" wherever the library allows it (epochs from the dataset
    size, lam and beta from the estimated noise rate, thresholds from the estimated noise rate).
    """

    model: str = Field(default="auto", description='Model name ("auto", "mlp", "resnet20", ...).')
    epochs: int | None = Field(
        default=None, description="Epochs of the audit training and the retrain; None: auto."
    )
    probe_epochs: int | None = Field(
        default=None, description="Epochs of each noise-probe training; None: auto."
    )
    batch_size: int | None = Field(
        default=None,
        description="Training batch size; None: 128, fewer for a conv net on a small training set.",
    )
    lr: float | None = Field(
        default=None,
        description="Learning rate; None: the optimizer's default, scaled with a smaller "
        "automatic batch.",
    )
    seed: int = Field(default=0, description="Seeds every random choice of the audit.")
    lam: float | None = Field(
        default=None, description="DM emphasis mode lambda; None adapts it to the noise rate."
    )
    beta: float | None = Field(
        default=None, description="DM emphasis spread beta; None adapts it to the noise rate."
    )
    label_issue_threshold: float | None = Field(
        default=None, description="Flag label issues at this score or above; None: auto."
    )
    top_k: int | None = Field(
        default=None, description="Flag exactly the k most suspicious examples instead."
    )
    ood_threshold: float | None = Field(
        default=None,
        description=(
            "Flag out-of-distribution examples at this score or above; None: auto (a "
            "conformal test against the unflagged rows at a 5 % false discovery rate)."
        ),
    )
    min_correction_confidence: float = Field(
        default=0.8, description="Apply a suggested label automatically at this confidence."
    )
    correction_source: str = Field(
        default="model", description='Suggested labels from "model" or "proselflc".'
    )
    knn_k: int = Field(default=10, description="Neighbours for the embedding-space scores.")
    linear_reference: bool = Field(
        default=True,
        description=(
            "Mix a cross-fitted logistic regression's out-of-sample probabilities with the "
            "networks' (each family weighing by its skill) for the flags and suggestions "
            "(feature tables up to 200,000 rows whose every class has at least 10 rows)."
        ),
    )
    max_flag_rate_ratio: float = Field(
        default=2.0,
        description=(
            "Flag-rate check: warn when the flagged share exceeds this multiple of the "
            "estimated noise rate (plus 5 points of slack)."
        ),
    )
    max_accuracy_drop: float = Field(
        default=0.0,
        description=(
            "Retrain check: the largest out-of-sample accuracy drop of the retrained models "
            "against the audit models that still publishes the export."
        ),
    )
    retrain_check_alpha: float = Field(
        default=0.05,
        gt=0.0,
        le=1.0,
        description=(
            "Retrain check: a drop above max_accuracy_drop blocks the export only when the "
            "one-sided exact McNemar test on the rows that only one of the two gets "
            "right finds the retrained model worse at this level (p <= alpha); 1.0 blocks on "
            "any such drop."
        ),
    )

    def audit_config(self, device: str) -> AuditConfig:
        """The library config for these settings on ``device``.

        Progress goes to the step's log as plain lines (one at the start, one every 30 s, one at
        the end: `dm_audit.progress`). Every row is retrained on its corrected label: the asset
        graph always has a retrained model, so ``retrain`` is not a setting here.

        Raises
        ------
        dm_audit.errors.ConfigError
            For invalid combinations (e.g. lam without beta), as the CLI would.
        """
        # Imported here so that loading the definitions (sensors, schedule) stays light.
        import dataclasses

        from dm_audit.config import AuditConfig

        # The settings carry AuditConfig's own field names (a test keeps the two in step); the
        # device comes from the runtime, the retrain always runs here (the relabel job needs
        # it) and progress goes to the run's log.
        shared = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(AuditConfig)
            if f.name in type(self).model_fields and f.name not in {"device", "retrain", "progress"}
        }
        return AuditConfig(**shared, device=device, retrain=True, progress=True)


def runtime_from_env() -> AuditRuntime:
    """`AuditRuntime` with ``DM_AUDIT_OUTPUT_ROOT`` and ``DM_AUDIT_DEVICE`` applied."""
    return AuditRuntime(
        output_root=os.environ.get("DM_AUDIT_OUTPUT_ROOT", DEFAULT_OUTPUT_ROOT),
        device=os.environ.get("DM_AUDIT_DEVICE", DEFAULT_DEVICE),
    )
