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
a pandas DataFrame of tabular columns (numbers, booleans, categories, dates; encoded as the
command line encodes a table's columns, see `dm_audit.tabular`), a torch ``Dataset`` of
``(input, label)`` items (image tensors C x H x W in [0, 1], PIL images, uint8 arrays or feature
vectors), or the path of an image folder (one subfolder per class; the labels are the folder
names, so no ``y``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin

from dm_audit.config import AuditConfig
from dm_audit.errors import ConfigError, DataError

__all__ = ["LabelAuditor", "find_label_issues"]

# Report columns holding class names: turned back into the caller's label values.
_LABEL_COLUMNS = ("given_label", "predicted_label", "suggested_label", "corrected_label")


def find_label_issues(X: Any, y: Any = None, **options: Any) -> pd.DataFrame:
    """Audit labelled data and return one row per input row, aligned with the input.

    Parameters
    ----------
    X : array (N, D) or (N, H, W[, C]) uint8, DataFrame, torch Dataset, or folder path
        Features, images, a table of input columns, ``(input, label)`` items, or an image
        folder with one subfolder per class.
    y : array-like (N,), optional
        The given labels, of any hashable type (ints, strings, ...). Required for arrays and
        DataFrames; a Dataset's labels are its items' second element unless `y` is given; an
        image folder's are its subfolder names.
    **options
        Any `dm_audit.config.AuditConfig` field (``seed``, ``epochs``, ``device``, ...);
        ``progress`` defaults to False here.

    Returns
    -------
    pandas.DataFrame
        The report's per-example columns (``is_label_issue``, ``label_issue_score``,
        ``suggested_label``, ``is_ood``, ...), indexed like `X` (a DataFrame's index, an image
        folder's file paths, else 0..N-1); label columns hold values of `y`'s type (None where
        a row was set aside).
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
        batch_size: int | None = None,
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
        linear_reference: bool = True,
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
        self.linear_reference = linear_reference
        self.retrain = retrain
        self.progress = progress

    # -- fitting ------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None) -> LabelAuditor:
        """Audit `X` with labels `y` (every row, cross-fitted; see `dm_audit.audit`)."""
        from dm_audit.audit import run_audit

        config = AuditConfig(**self.get_params())
        self._encoding = None
        if isinstance(X, str | os.PathLike):
            if y is not None:
                raise ConfigError("an image folder's labels are its subfolder names: pass no y")
            dataset, index = _folder_dataset(Path(X))
            self.classes_ = np.asarray(dataset.classes, dtype=object)
            names = list(dataset.classes)
            self._input_kind = "image"
        else:
            if _is_torch_dataset(X):
                X, y = _dataset_items(X, y)
            if y is None:
                raise ConfigError("y, the given labels, is required for arrays and DataFrames")
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
            if isinstance(X, pd.DataFrame):
                self._encoding = dataset.notes.get("inputs")
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
            if self._encoding is None:
                raise ConfigError("this auditor was fit on arrays: pass an array, not a DataFrame")
            from dm_audit.tabular import apply_encoding

            return self._models.predict_proba(
                apply_encoding(X, self._encoding, "X"), device=self.device
            )
        if _is_torch_dataset(X):
            X, _ = _dataset_items(X, np.zeros(len(X)))
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


def _is_torch_dataset(X: Any) -> bool:
    torch = sys.modules.get("torch")  # a Dataset exists only where torch is imported
    return torch is not None and isinstance(X, torch.utils.data.Dataset)


def _as_array(item: Any) -> np.ndarray:
    """One input as numpy: image tensors (C, H, W) in [0, 1] become uint8 (H, W, C)."""
    if hasattr(item, "detach"):  # a torch tensor
        array = item.detach().cpu().numpy()
        if array.ndim == 3 and array.dtype.kind == "f":
            # torchvision's ToTensor layout: channels first, intensities in [0, 1].
            return np.clip(np.round(array.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
        return array
    return np.asarray(item)  # PIL images and arrays


def _dataset_items(X: Any, y: Any) -> tuple[np.ndarray, Any]:
    """The inputs of a torch Dataset as one array, and its labels unless `y` is given."""
    inputs, labels = [], []
    for i in range(len(X)):
        item = X[i]
        if isinstance(item, tuple | list):
            inputs.append(_as_array(item[0]))
            if y is None:
                if len(item) < 2:
                    raise DataError(f"dataset item {i} has no label: pass y")
                label = item[1]
                labels.append(label.item() if hasattr(label, "item") else label)
        else:
            if y is None:
                raise DataError(f"dataset item {i} is not an (input, label) pair: pass y")
            inputs.append(_as_array(item))
    shapes = {a.shape for a in inputs}
    if len(shapes) > 1:
        raise DataError(f"the dataset's inputs differ in shape: {sorted(shapes)[:3]}")
    stacked = np.stack(inputs) if inputs else np.zeros((0, 0), dtype=np.float32)
    if stacked.ndim == 2 and stacked.dtype.kind not in "f":
        stacked = stacked.astype(np.float32)
    return stacked, (y if y is not None else np.asarray(labels))


def _folder_dataset(path: Path) -> tuple[Any, pd.Index]:
    """An image folder, every row audited; the report is indexed by the files' ids."""
    from dm_audit.sources import load_source

    if not path.is_dir():
        raise DataError(f"{path} is not a folder of images (one subfolder per class)")
    dataset = load_source(str(path), test_size=0.0)
    return dataset, pd.Index(dataset.example_ids, name="example_id")
