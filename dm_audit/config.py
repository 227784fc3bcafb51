"""The options of one audit run, in a module light enough to check them before any heavy
import (torch, faiss, Dagster): a bad option is refused in well under a second.

`AuditConfig` is the single description of the options: the command line (`dm_audit.cli`) and
the Dagster resource (`pipelines.resources.AuditSettings`) map onto it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dm_audit.errors import ConfigError

__all__ = ["CORRECTION_SOURCES", "AuditConfig"]

# Where suggested labels come from (`AuditConfig.correction_source`).
CORRECTION_SOURCES = ("model", "proselflc")


@dataclass
class AuditConfig:
    """Options of one audit run; every field has a default that works on a feature table.

    Attributes
    ----------
    model : str
        Model name for `dm_audit.models.create_model` ("auto" picks one from the input).
    epochs : int or None
        Epochs of the audit training and of the retrain; None chooses from the dataset size.
    probe_epochs : int or None
        Epochs of the short probe training; None: a quarter of ``epochs``.
    batch_size : int or None
        Examples per training step; None: 128, fewer for a conv net on a small training set
        (8 steps per epoch where batches of at least 16 allow), more for other models on a large
        one (doubled while an epoch keeps at least 10 steps, up to 512), the default learning
        rate scaled alike; see `dm_audit.crossfit.training_batch`.
    lr : float or None
        Learning rate; None: the training engine's default for the optimizer (0.1), scaled
        with the automatic batch.
    device : str
        "auto", "cpu", "cuda", "cuda:N" or "mps".
    seed : int
        Seeds every random choice: the same seed and data give the same report.
    lam, beta : float or None
        DM emphasis mode and spread. None (the default) chooses them from the estimated noise rate.
    label_issue_threshold : float or None
        Flag examples whose ``label_issue_score`` is at least this; None flags, per given class,
        the confident joint's count of wrong labels among the rows scoring at least 0.5.
    top_k : int or None
        Flag exactly the k most suspicious examples instead of thresholding.
    ood_threshold : float or None
        Flag examples whose ``ood_score`` is above this (the score is the share of unflagged
        rows that score lower: 0.99 flags about 1 % of them, and inputs above them all); None
        chooses by a conformal test.
    min_correction_confidence : float
        A suggested label is applied automatically only at this confidence or above; flagged
        examples below it go to review and are left out of the retrain.
    correction_source : {"model", "proselflc"}
        Where suggested labels come from: the audit model's tempered prediction, or the corrected
        targets of a ProSelfLC (annealed temperature) training.
    knn_k : int
        Neighbours per example for the embedding-space label agreement and OOD distance.
    linear_reference : bool
        Mix a cross-fitted logistic regression's out-of-sample probabilities with the
        networks' (each family weighing by its skill) for the flags, the noise count and the
        suggested labels (`dm_audit.linear_reference`; feature tables up to 200,000 rows whose
        every class has at least 10 rows).
    retrain : bool
        Retrain on the corrected labels (the final model); False stops after the corrections.
    progress : bool
        Show progress bars.
    """

    model: str = "auto"
    epochs: int | None = None
    probe_epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    device: str = "auto"
    seed: int = 0
    lam: float | None = None
    beta: float | None = None
    label_issue_threshold: float | None = None
    top_k: int | None = None
    ood_threshold: float | None = None
    min_correction_confidence: float = 0.8
    correction_source: str = "model"
    knn_k: int = 10
    linear_reference: bool = True
    retrain: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.correction_source not in CORRECTION_SOURCES:
            raise ConfigError(
                f"correction_source must be one of {CORRECTION_SOURCES}, "
                f"got {self.correction_source!r}"
            )
        if (self.lam is None) != (self.beta is None):
            raise ConfigError("give both lam and beta to fix the emphasis, or neither to adapt it")
        if self.lam is not None and self.lam < 0:
            raise ConfigError(f"lam must be >= 0, got {self.lam}")
        for name in ("label_issue_threshold", "ood_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {value}")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_correction_confidence <= 1.0:
            raise ConfigError(
                "min_correction_confidence must lie in [0, 1], "
                f"got {self.min_correction_confidence}"
            )
        if self.knn_k < 1:
            raise ConfigError(f"knn_k must be >= 1, got {self.knn_k}")
        for name in ("epochs", "probe_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.batch_size is not None and self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2, got {self.batch_size}")

    def check_against(self, n_rows: int) -> None:
        """Refuse options that the data cannot satisfy, before any training.

        Raises
        ------
        ConfigError
            Naming the option and the data size.
        """
        # The unflagged rows calibrate the OOD test and carry the retrain: they must remain
        # the majority, so at most half of the rows can be flagged.
        if self.top_k is not None and self.top_k > n_rows // 2:
            raise ConfigError(
                f"top_k {self.top_k} flags more than half of the dataset's {n_rows} rows; the "
                f"unflagged rows are the reference of the audit: flag at most {n_rows // 2}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-ready dict (recorded in ``summary.json``)."""
        return dataclasses.asdict(self)
