"""Per-example evidence vectors: checked, then averaged into one score.

The label-issue score (`dm_audit.flags`) and the OOD score (`dm_audit.ood`) are both weighted
means of components in [0, 1], one value per example. This module holds what they share: the
checks of such vectors (`validate_vector`, `validate_unit_vector`) and the weighted mean over the
components that are available (`combine_components`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from dm_audit.errors import ConfigError, DataError

__all__ = ["combine_components", "validate_unit_vector", "validate_vector"]


def validate_vector(x: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    """Check a finite, non-empty vector (of length `n` when given) and return it as float64."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        want = f"({n},)" if n is not None else "(N,)"
        raise DataError(f"{name} must have shape {want}, got {arr.shape}")
    if arr.size == 0:
        raise DataError(f"{name} is empty")
    if not np.isfinite(arr).all():
        raise DataError(f"{name}[{int(np.flatnonzero(~np.isfinite(arr))[0])}] is not finite")
    return arr


def validate_unit_vector(x: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    """`validate_vector` with values in [0, 1] (rounding slack of 1e-6 is clipped away)."""
    arr = validate_vector(x, name, n)
    bad = (arr < -1e-6) | (arr > 1 + 1e-6)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{name}[{i}] = {arr[i]:.6g} is outside [0, 1]")
    return np.clip(arr, 0.0, 1.0)


def combine_components(
    components: Mapping[str, np.ndarray], weights: Mapping[str, float]
) -> np.ndarray:
    """Weighted mean of the available components, clipped to [0, 1].

    Parameters
    ----------
    components : mapping of str to np.ndarray, shape (N,)
        Component values by name, each in [0, 1].
    weights : mapping of str to float
        Weights by name; a name missing here weighs 0, a weight without a component is ignored
        and the others are renormalised.

    Returns
    -------
    np.ndarray, shape (N,)
        Scores in [0, 1], float64.
    """
    used = {name: float(weights.get(name, 0.0)) for name in components}
    if any(w < 0 or not math.isfinite(w) for w in used.values()):
        raise ConfigError(f"weights must be finite and >= 0, got {dict(weights)}")
    total = sum(used.values())
    if total <= 0:
        raise ConfigError(
            f"the weights {dict(weights)} give every available component "
            f"{sorted(components)} weight zero"
        )
    out = sum(used[name] * comp for name, comp in components.items()) / total
    return np.clip(np.asarray(out, dtype=np.float64), 0.0, 1.0)
