"""Checks of the arrays the estimators and flags take: probabilities, class codes, masks.

Each returns the array in the dtype the callers compute with, or raises `DataError` naming the
argument and the first bad row, so a caller's mistake is reported where it entered.
"""

from __future__ import annotations

import numpy as np

from dm_audit.errors import DataError

__all__ = ["validate_labels", "validate_mask", "validate_probs"]


def validate_probs(probs: np.ndarray, *, name: str = "probs", atol: float = 1e-3) -> np.ndarray:
    """Check a (N, C) probability matrix and return it as float64.

    Raises
    ------
    DataError
        If it is not 2-D with C >= 2, holds non-finite or negative values, or a row does not sum
        to 1 within `atol` (the first bad row is named).
    """
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise DataError(f"{name} must have shape (N, C) with C >= 2, got {arr.shape}")
    if arr.shape[0] == 0:
        raise DataError(f"{name} is empty")
    bad = ~np.isfinite(arr).all(axis=1) | (arr < 0).any(axis=1)
    if bad.any():
        raise DataError(
            f"{name} row {int(np.flatnonzero(bad)[0])} has a negative or non-finite value"
        )
    sums = arr.sum(axis=1)
    off = np.abs(sums - 1.0) > atol
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise DataError(f"{name} row {i} sums to {sums[i]:.6f}, expected 1 (pass softmax outputs)")
    return arr


def validate_mask(mask: np.ndarray, name: str, n: int) -> np.ndarray:
    """Check a boolean mask of shape (n,) (0/1 integers are accepted) and return it as bool."""
    arr = np.asarray(mask)
    if arr.shape != (n,):
        raise DataError(f"{name} must have shape ({n},), got {arr.shape}")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise DataError(f"{name} must be a boolean mask")
        arr = arr.astype(bool)
    return arr


def validate_labels(
    labels: np.ndarray, n: int, n_classes: int, *, name: str = "labels"
) -> np.ndarray:
    """Check integer class codes of length `n` in ``[0, n_classes)`` and return them as int64."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise DataError(f"{name} must have shape ({n},), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
            raise DataError(f"{name} must hold integer class codes, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= n_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{name}[{i}] = {arr[i]} is not a class code in [0, {n_classes})")
    return arr
