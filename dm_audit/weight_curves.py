"""Example-weighting curves in closed form: a loss's derivative magnitude ``w(p_i)``.

A classification loss that depends only on p_i, the probability of the given label, back-propagates
``dL/dz_i = w(p_i) / (2(1 - p_i)) * (p - onehot(y_i))``; ``w(p_i)`` is the example's *weight*.
This module holds the curves of CCE, MAE, MSE and GCE, and of DM and its variants (normal,
exponential, beta, IMAE), with the checks of their parameters. `dm_audit.emphasis` names them,
binds their parameters (`Weighting`) and analyses them (EDF, emphasis mode and variance).

Every ``weight_*`` function accepts a NumPy array or a torch tensor of probabilities of any shape
and returns the same type with the same shape (and dtype, for floating inputs), so the same code
serves analysis in NumPy and training on any torch device. Probabilities are clipped to [0, 1]
first: rounding can push a softmax output a hair past 1, which would make ``1 - p`` negative.

Constants follow the DM paper's L1 magnitudes: MAE is ``1 - p_i`` with weight ``2 p (1 - p)``.
IMAE and GR write MAE as ``2 (1 - p_i)`` and so its weight as ``4 p (1 - p)``; constant factors
vanish under any normalisation (EDF or batch), so only analyses of raw variance see the difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from dm_audit.errors import ConfigError

__all__ = [
    "check_at_least",
    "check_finite",
    "check_within",
    "weight_beta",
    "weight_cce",
    "weight_dm",
    "weight_exponential",
    "weight_gce",
    "weight_imae",
    "weight_mae",
    "weight_mse",
    "weight_normal",
]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


# --------------------------------------------------------------------------- array backend


def _backend(p: Any) -> tuple[Any, Callable[[Any], Any]]:
    """Return ``(p clipped to [0, 1], exp)`` in p's own library, floating point."""
    if isinstance(p, torch.Tensor):
        x = p if p.is_floating_point() else p.to(torch.get_default_dtype())
        return x.clamp(0.0, 1.0), torch.exp
    x = np.asarray(p)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    return np.clip(x, 0.0, 1.0), np.exp


# --------------------------------------------------------------------------- parameter checks


def check_finite(name: str, value: float) -> float:
    """Parameter `value` as a finite float, or a ConfigError naming it."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"parameter {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"parameter {name!r} must be finite, got {value!r}")
    return value


def check_at_least(name: str, value: float, low: float) -> float:
    """Parameter `value` as a finite float >= `low`, or a ConfigError naming it."""
    value = check_finite(name, value)
    if value < low:
        raise ConfigError(f"parameter {name!r} must be >= {low:g}, got {value:g}")
    return value


def check_within(name: str, value: float, low: float, high: float) -> float:
    """Parameter `value` as a finite float in [`low`, `high`], or a ConfigError naming it."""
    value = check_finite(name, value)
    if not low <= value <= high:
        raise ConfigError(f"parameter {name!r} must lie in [{low:g}, {high:g}], got {value:g}")
    return value


# --------------------------------------------------------------------------- weighting functions


def weight_cce(p: ArrayT) -> ArrayT:
    """Weight of categorical cross entropy, ``w = 2 (1 - p)``; emphasis mode 0.

    Parameters
    ----------
    p : np.ndarray or torch.Tensor, shape (...)
        Probability of the given label, in [0, 1].

    Returns
    -------
    np.ndarray or torch.Tensor, shape (...)
        The weights, same type as ``p``.
    """
    x, _ = _backend(p)
    return 2.0 * (1.0 - x)


def weight_mae(p: ArrayT) -> ArrayT:
    """Weight of mean absolute error ``1 - p``, ``w = 2 p (1 - p)``; emphasis mode 0.5.

    IMAE and GR define MAE as ``2 (1 - p)``, whose weight ``4 p (1 - p)`` is twice this one.

    Parameters
    ----------
    p : np.ndarray or torch.Tensor, shape (...)
        Probability of the given label, in [0, 1].

    Returns
    -------
    np.ndarray or torch.Tensor, shape (...)
        The weights, same type as ``p``.
    """
    x, _ = _backend(p)
    return 2.0 * x * (1.0 - x)


def weight_mse(p: ArrayT) -> ArrayT:
    """Weight of mean square error ``(1 - p)^2``, ``w = 4 p (1 - p)^2``; emphasis mode 1/3.

    Parameters
    ----------
    p : np.ndarray or torch.Tensor, shape (...)
        Probability of the given label, in [0, 1].

    Returns
    -------
    np.ndarray or torch.Tensor, shape (...)
        The weights, same type as ``p``.
    """
    x, _ = _backend(p)
    return 4.0 * x * (1.0 - x) ** 2


def weight_gce(p: ArrayT, q: float) -> ArrayT:
    """Weight of generalised cross entropy ``(1 - p^q)/q``, ``w = 2 p^q (1 - p)``.

    Parameters
    ----------
    p : np.ndarray or torch.Tensor, shape (...)
        Probability of the given label, in [0, 1].
    q : float
        GCE exponent in [0, 1]; q = 0 gives CCE's weight, q = 1 MAE's. Emphasis mode q/(q+1).

    Returns
    -------
    np.ndarray or torch.Tensor, shape (...)
        The weights, same type as ``p``.
    """
    q = check_within("q", q, 0.0, 1.0)
    x, _ = _backend(p)
    return 2.0 * x**q * (1.0 - x)


def weight_dm(p: ArrayT, lam: float, beta: float) -> ArrayT:
    """DM weighting (DM Eq. 12, GR Eq. 6/7), ``w = exp(beta p^lam (1 - p))``.

    Parameters
    ----------
    p : np.ndarray or torch.Tensor, shape (...)
        Probability of the given label, in [0, 1].
    lam : float
        Emphasis-mode parameter, >= 0; the mode is lam/(lam+1) for beta > 0 (0: hardest examples
        first, like CCE; larger: easier examples).
    beta : float
        Emphasis-spread parameter; 0 weighs every example the same.

    Returns
    -------
    np.ndarray or torch.Tensor, shape (...)
        The weights, same type as ``p``.
    """
    lam = check_at_least("lam", lam, 0.0)
    beta = check_finite("beta", beta)
    x, exp = _backend(p)
    return exp(beta * x**lam * (1.0 - x))


def weight_normal(p: ArrayT, psi: float, beta: float) -> ArrayT:
    """Normal-distribution variant (DM Eq. 9), ``w = exp(-beta p (p - 2 psi))``.

    Parameters
    ----------
    p : np.ndarray or torch.Tensor, shape (...)
        Probability of the given label, in [0, 1].
    psi : float
        Emphasis mode in [0, 1] (for beta > 0).
    beta : float
        Emphasis spread; larger is narrower around ``psi``.

    Returns
    -------
    np.ndarray or torch.Tensor, shape (...)
        The weights, same type as ``p``.
    """
    psi = check_within("psi", psi, 0.0, 1.0)
    beta = check_finite("beta", beta)
    x, exp = _backend(p)
    return exp(-beta * x * (x - 2.0 * psi))


def weight_exponential(p: ArrayT, beta: float) -> ArrayT:
    """Exponential-distribution variant (DM Eq. 10), ``w = exp(beta (1 - p))``.

    Equal to :func:`weight_dm` with ``lam = 0``.

    Parameters
    ----------
    p : np.ndarray or torch.Tensor, shape (...)
        Probability of the given label, in [0, 1].
    beta : float
        beta > 0 favours hard examples (small p), beta < 0 easy ones.

    Returns
    -------
    np.ndarray or torch.Tensor, shape (...)
        The weights, same type as ``p``.
    """
    beta = check_finite("beta", beta)
    x, exp = _backend(p)
    return exp(beta * (1.0 - x))


def weight_beta(p: ArrayT, alpha: float, eta: float) -> ArrayT:
    """Beta-distribution variant (DM Eq. 11), ``w = p^(alpha-1) (1 - p)^(eta-1)``.

    (alpha, eta) = (1, 2), (2, 2), (2, 3), (q+1, 2) give CCE, MAE, MSE and GCE up to a constant.
    The DM paper allows alpha, eta >= 0; we require >= 1 so that the weight stays finite at
    p = 0 and p = 1 (a weight of infinity cannot be trained with).

    Parameters
    ----------
    p : np.ndarray or torch.Tensor, shape (...)
        Probability of the given label, in [0, 1].
    alpha, eta : float
        Shape parameters, >= 1. Emphasis mode (alpha-1)/(alpha+eta-2).

    Returns
    -------
    np.ndarray or torch.Tensor, shape (...)
        The weights, same type as ``p``.
    """
    alpha = check_at_least("alpha", alpha, 1.0)
    eta = check_at_least("eta", eta, 1.0)
    x, _ = _backend(p)
    return x ** (alpha - 1.0) * (1.0 - x) ** (eta - 1.0)


def weight_imae(p: ArrayT, T: float) -> ArrayT:
    """IMAE weighting, ``w = exp(T p (1 - p))`` (DM with lam = 1, beta = T); mode 0.5.

    Parameters
    ----------
    p : np.ndarray or torch.Tensor, shape (...)
        Probability of the given label, in [0, 1].
    T : float
        Emphasis spread, >= 0 (the IMAE paper uses 8 on noisy data, 0.5 on clean data).

    Returns
    -------
    np.ndarray or torch.Tensor, shape (...)
        The weights, same type as ``p``.
    """
    T = check_at_least("T", T, 0.0)
    x, exp = _backend(p)
    return exp(T * x * (1.0 - x))
