"""Per-run Dagster config: which data a run audits and which reviews it applies.

Dagster attaches a ``Config`` to one asset, so each class here belongs to the asset that
consumes it (``dataset`` and ``corrected_labels``). The audit parameters that every stage
shares (model, epochs, emphasis, thresholds, seed) live in the `AuditSettings` resource
(`pipelines.resources`) instead: one value per run, seen identically by all stages.

In the launchpad or in a sensor's run config they read::

    ops:
      dataset:
        config: {source: data/incoming/batch.parquet, label_column: target}
      corrected_labels:
        config: {reviews_path: data/reviews/batch-1.csv}
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field

__all__ = ["DATASET_OPTIONS", "DatasetConfig", "ReviewsConfig"]


class DatasetConfig(dg.Config):
    """Where the audited data comes from, and optional synthetic noise for demonstrations.

    The defaults audit scikit-learn's digits, which ship with scikit-learn: a run works with no
    setup and no download.
    """

    source: str = Field(
        default="digits",
        description=(
            '"digits", a .parquet/.csv/.tsv table, an image folder, or "cifar10:ROOT", '
            '"cifar100:ROOT", "mnist:ROOT", "fashionmnist:ROOT".'
        ),
    )
    label_column: str = Field(default="label", description="Label column of a table.")
    id_column: str | None = Field(
        default=None, description="Id column of a table; None derives ids from the row order."
    )
    feature_columns: list[str] | None = Field(
        default=None,
        description="Numeric feature columns, or the one embedding column; None detects them.",
    )
    image_column: str | None = Field(
        default=None, description="Image-bytes or image-path column of a table."
    )
    image_root: str | None = Field(
        default=None, description="Folder that image paths in a table are relative to."
    )
    split_column: str | None = Field(
        default=None,
        description=(
            "Column of train/test values for your own split (default: 'split' when present); "
            "every row, the test rows too, is audited and the split kept in the report."
        ),
    )
    test_size: float = Field(
        default=0.0,
        description=(
            "Share of each class marked 'test' in the report's split column (every row is "
            "audited either way; ignored when the source fixes the split)."
        ),
    )
    noise_kind: str = Field(
        default="none",
        description=(
            'Synthetic label noise, to try the audit on data whose truth is known: "none", '
            '"symmetric", "pair" or "open_set".'
        ),
    )
    noise_rate: float = Field(default=0.0, description="Share of training labels corrupted.")
    open_set_classes: list[str] | None = Field(
        default=None, description="Classes held out and mixed in as out-of-distribution inputs."
    )
    open_set_fraction: float | None = Field(
        default=None, description="Share of the training split made of held-out-class inputs."
    )

    def load_options(self, seed: int) -> dict[str, Any]:
        """Keyword arguments of `dm_audit.sources.load_source` (the spec excluded).

        `seed` is the audit's one seed (`AuditSettings.seed`), as on the command line: the
        split, the noise and the training all follow it.
        """
        return {
            "label_column": self.label_column,
            "id_column": self.id_column,
            "feature_columns": self.feature_columns,
            "image_column": self.image_column,
            "image_root": self.image_root,
            "split_column": self.split_column,
            "test_size": self.test_size,
            "seed": seed,
        }

    def noise_options(self, seed: int) -> dict[str, Any]:
        """Keyword arguments of `dm_audit.noise.add_noise` (the dataset excluded)."""
        return {
            "kind": self.noise_kind,
            "rate": self.noise_rate,
            "seed": seed,
            "open_set_classes": self.open_set_classes,
            "open_set_fraction": self.open_set_fraction,
        }


#: Option names a sidecar JSON file next to an incoming dataset may set (see the sensors).
DATASET_OPTIONS: frozenset[str] = frozenset(DatasetConfig.model_fields) - {"source"}


class ReviewsConfig(dg.Config):
    """Human reviews applied over the automatic corrections."""

    reviews_path: str | None = Field(
        default=None,
        description=(
            "A .csv or .parquet file with columns example_id,label. Reviewed labels win over "
            "automatic corrections and are recorded with provenance 'reviewed'."
        ),
    )
