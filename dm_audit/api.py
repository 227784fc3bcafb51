"""The Python API: audit arrays and DataFrames in a notebook, no files involved.

    >>> from dm_audit import find_label_issues
    >>> issues = find_label_issues(X, y)                 # doctest: +SKIP
    >>> issues[issues["is_label_issue"]].head()           # doctest: +SKIP

`find_label_issues` returns the report's per-example table (``examples.parquet``'s columns)
indexed like the input, with labels in their original type. `LabelAuditor` is the same audit
as a scikit-learn estimator: its parameters are `dm_audit.config.AuditConfig`'s fields, so
`get_params`, `set_params` and `sklearn.base.clone` work, and after `fit` it predicts with the
final (retrained) cross-fitted models.

Inputs: a numeric array (N, D) of features, a uint8 array (N, H, W) or (N, H, W, C) of images,
or a pandas DataFrame of tabular columns (numbers, booleans, categories, dates; encoded as the
command line encodes a table's columns, see `dm_audit.tabular`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin

from dm_audit.config import AuditConfig
from dm_audit.errors import ConfigError, DataError

__all__ = ["LabelAuditor", "find_label_issues"]

# Report columns holding class names: turned back into the caller's label values.
_LABEL_COLUMNS = ("given_label", "predicted_label", "suggested_label", "corrected_label")


def find_label_issues(X: Any, y: Any, **options: Any) -> pd.DataFrame:
    """Audit labelled data and return one row per input row, aligned with the input.

    Parameters
    ----------
    X : array (N, D) or (N, H, W[, C]) uint8, or pandas DataFrame
        Features, images, or a table of input columns.
    y : array-like (N,)
        The given labels, of any hashable type (ints, strings, ...).
    **options
        Any `dm_audit.config.AuditConfig` field (``seed``, ``epochs``, ``device``, ...);
        ``progress`` defaults to False here.

    Returns
    -------
    pandas.DataFrame
        The report's per-example columns (``is_label_issue``, ``label_issue_score``,
        ``suggested_label``, ``is_ood``, ...), indexed like `X` (a DataFrame's index, else
        0..N-1); label columns hold values of `y`'s type (None where a row was set aside).
    """
    return LabelAuditor(**options).fit(X, y).report_


class LabelAuditor(ClassifierMixin, BaseEstimator):
    """The audit as a scikit-learn estimator (parameters: `AuditConfig`'s fields).

    Attributes (after `fit`)
    ------------------------
    classes_ : ndarray
        The distinct labels, in code order.
    report_ : DataFrame
        See `find_label_issues`.
    label_issue_scores_, is_label_issue_, suggested_labels_, ood_scores_, is_ood_ : ndarray
        Columns of `report_`, in input order.
    summary_ : dict
        The report's summary (``summary.json``).
    """

    def __init__(
        self,
        model: str = "auto",
        epochs: int | None = None,
        probe_epochs: int | None = None,
        batch_size: int = 128,
        lr: float | None = None,
        device: str = "auto",
        seed: int = 0,
        lam: float | None = None,
        beta: float | None = None,
        label_issue_threshold: float | None = None,
        top_k: int | None = None,
        ood_threshold: float | None = None,
        min_correction_confidence: float = 0.8,
        correction_source: str = "model",
        knn_k: int = 10,
        retrain: bool = True,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.epochs = epochs
        self.probe_epochs = probe_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.device = device
        self.seed = seed
        self.lam = lam
        self.beta = beta
        self.label_issue_threshold = label_issue_threshold
        self.top_k = top_k
        self.ood_threshold = ood_threshold
        self.min_correction_confidence = min_correction_confidence
        self.correction_source = correction_source
        self.knn_k = knn_k
        self.retrain = retrain
        self.progress = progress

    # -- fitting ------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any) -> LabelAuditor:
        """Audit `X` with labels `y` (every row, cross-fitted; see `dm_audit.audit`)."""
        from dm_audit.audit import run_audit

        config = AuditConfig(**self.get_params())
        labels = np.asarray(y, dtype=object) if not isinstance(y, np.ndarray) else y
        if labels.ndim != 1:
            raise DataError(f"y must be one-dimensional, got shape {labels.shape}")
        index = X.index if isinstance(X, pd.DataFrame) else pd.RangeIndex(len(labels))
        if len(index) != len(labels):
            raise DataError(f"X has {len(index)} rows but y has {len(labels)} labels")
        self.classes_, codes = np.unique(labels, return_inverse=True)
        names = [str(c) for c in self.classes_]
        if len(set(names)) != len(names):
            raise DataError(f"labels {list(self.classes_)} are distinct values with equal text")
        dataset, self._input_kind = _dataset(X, codes, names)
        report = run_audit(dataset, config)
        self._models = report.final_models
        examples = report.examples.copy()
        by_name = dict(zip(names, self.classes_, strict=True))
        for column in _LABEL_COLUMNS:
            if column in examples:
                examples[column] = [
                    by_name.get(v) if v is not None else None for v in examples[column]
                ]
        examples.index = index
        self.report_ = examples
        self.summary_ = report.summary
        self.label_issue_scores_ = examples["label_issue_score"].to_numpy()
        self.is_label_issue_ = examples["is_label_issue"].to_numpy(dtype=bool)
        self.suggested_labels_ = examples["suggested_label"].to_numpy()
        self.ood_scores_ = examples["ood_score"].to_numpy()
        self.is_ood_ = examples["is_ood"].to_numpy(dtype=bool)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (N, C) of new inputs under the final cross-fitted models."""
        if not hasattr(self, "_models") or self._models is None:
            raise ConfigError("call fit before predict_proba")
        if isinstance(X, pd.DataFrame):
            raise ConfigError(
                "predict and predict_proba take arrays (N, D) of numeric features; a DataFrame's "
                "categorical columns would need the encoding fit chose"
            )
        array = np.asarray(X)
        if self._input_kind == "features":
            inputs = array.astype(np.float32)
        else:
            inputs = array[..., None] if array.ndim == 3 else array  # grayscale: one channel
        return self._models.predict_proba(inputs, device=self.device)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable label of each new input, in `y`'s values."""
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def _dataset(X: Any, codes: np.ndarray, names: list[str]) -> tuple[Any, str]:
    from dm_audit.dataset import AuditDataset
    from dm_audit.sources import read_tabular

    n = len(codes)
    ids = [str(i) for i in range(n)]
    if isinstance(X, pd.DataFrame):
        if X.index.is_unique:
            ids = [str(i) for i in X.index]  # the caller's row names, as the report's ids
        notes: dict[str, Any] = {}
        frame = X.reset_index(drop=True)
        features = np.stack(read_tabular(frame, list(X.columns), ids, "X", notes, strict=False))
        data = AuditDataset.from_arrays(codes, features=features, classes=names, example_ids=ids)
        data.notes.update(notes)
        return data, "features"
    array = np.asarray(X)
    if array.ndim == 2 and np.issubdtype(array.dtype, np.number):
        return AuditDataset.from_arrays(codes, features=array, classes=names, example_ids=ids), (
            "features"
        )
    if array.ndim in (3, 4) and array.dtype == np.uint8:
        return AuditDataset.from_arrays(codes, images=array, classes=names, example_ids=ids), (
            "image"
        )
    raise DataError(
        f"X must be a numeric (N, D) array, a uint8 (N, H, W[, C]) image array or a DataFrame; "
        f"got {array.dtype} of shape {array.shape}"
    )
