"""Example-weighting curves as objects: named, parameterised, normalised and analysed.

A classification loss that depends only on p_i, the probability of the given label, back-propagates
``dL/dz_i = w(p_i) / (2(1 - p_i)) * (p - onehot(y_i))``: its direction is the same for CCE, MAE,
MSE and GCE, and its L1 magnitude ``w(p_i)`` is the example's *weight*. Derivative manipulation
(DM) chooses ``w`` directly. The curves themselves, in closed form, are the ``weight_*`` functions
of `dm_audit.weight_curves` (re-exported here). This module names them and binds their parameters
(`Weighting`, `create_weighting`), normalises them into emphasis density functions (`edf`: a
curve divided by its integral over [0, 1]), gives their emphasis mode and variance, and plots
several curves.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dm_audit.errors import ConfigError, DataError
from dm_audit.weight_curves import (
    ArrayT,
    check_at_least,
    check_finite,
    check_within,
    weight_beta,
    weight_cce,
    weight_dm,
    weight_exponential,
    weight_gce,
    weight_imae,
    weight_mae,
    weight_mse,
    weight_normal,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "WEIGHTING_NAMES",
    "Weighting",
    "batch_variance",
    "create_weighting",
    "curve_variance",
    "dm_emphasis_mode",
    "edf",
    "emphasis_mode",
    "integrate_unit",
    "plot_weighting_curves",
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

# Training evaluates weights in float32 (max 3.4e38) and sums a batch of them, so a curve whose
# peak exceeds this bound would overflow to inf and turn the batch normalisation into NaN; a peak
# below the lower bound underflows to zero and silently stops learning.
_MAX_WEIGHT = 1e30
_MIN_PEAK = 1e-30
_DN_SUFFIX = "-dn"


# --------------------------------------------------------------------------- registry


def _scale_keys(*keys: str) -> Callable[[dict[str, float], float], dict[str, float]]:
    """Ramp rule: the listed parameters grow linearly from 0 with the emphasis scale."""

    def rule(params: dict[str, float], scale: float) -> dict[str, float]:
        return {k: v * scale if k in keys else v for k, v in params.items()}

    return rule


def _scale_beta_shape(params: dict[str, float], scale: float) -> dict[str, float]:
    # Shape parameters grow from 1 (a flat curve), not from 0 (an unbounded one).
    return {k: 1.0 + (v - 1.0) * scale for k, v in params.items()}


@dataclass(frozen=True)
class _Family:
    fn: Callable[..., Any]
    params: tuple[str, ...]
    defaults: Mapping[str, float]
    # How an emphasis scale s in [0, 1] maps the parameters (s = 0: the ramp's start);
    # None for curves without emphasis parameters.
    ramp: Callable[[dict[str, float], float], dict[str, float]] | None


_FAMILIES: dict[str, _Family] = {
    "cce": _Family(weight_cce, (), {}, None),
    "mae": _Family(weight_mae, (), {}, None),
    "mse": _Family(weight_mse, (), {}, None),
    # q = 0.7 is GCE's recommended setting; (lam, beta) = (0.5, 8) is GR's all-round default;
    # T = 8 is IMAE's setting for noisy labels. The other variants have no published default.
    "gce": _Family(weight_gce, ("q",), {"q": 0.7}, _scale_keys("q")),
    "dm": _Family(
        weight_dm, ("lam", "beta"), {"lam": 0.5, "beta": 8.0}, _scale_keys("lam", "beta")
    ),
    "normal": _Family(weight_normal, ("psi", "beta"), {}, _scale_keys("psi", "beta")),
    "exponential": _Family(weight_exponential, ("beta",), {}, _scale_keys("beta")),
    "beta": _Family(weight_beta, ("alpha", "eta"), {}, _scale_beta_shape),
    "imae": _Family(weight_imae, ("T",), {"T": 8.0}, _scale_keys("T")),
}

WEIGHTING_NAMES: tuple[str, ...] = tuple(_FAMILIES) + tuple(n + _DN_SUFFIX for n in _FAMILIES)
"""Every name :func:`create_weighting` accepts: the families and their "-dn" (EDF) versions."""


def _split_name(name: str) -> tuple[str, bool]:
    if not isinstance(name, str) or name not in WEIGHTING_NAMES:
        raise ConfigError(
            f"unknown weighting {name!r}; choose one of: {', '.join(WEIGHTING_NAMES)}"
        )
    if name.endswith(_DN_SUFFIX):
        return name[: -len(_DN_SUFFIX)], True
    return name, False


# --------------------------------------------------------------------------- quadrature


def _tanh_sinh_rule(step: float = 1.0 / 64.0, t_max: float = 4.5) -> tuple[np.ndarray, np.ndarray]:
    # Tanh-sinh (double-exponential) quadrature mapped to [0, 1]: p = sigmoid(pi sinh t). The
    # trapezoid rule in t converges exponentially even for endpoint singularities such as
    # p^0.01 (GCE, DM with small lam), which defeat plain Gauss-Legendre; 577 nodes give ~1e-15
    # on every curve of this module. The tails beyond |t| = 4.5 weigh < 1e-60.
    t = np.arange(-t_max, t_max + step / 2, step)
    s = np.pi * np.sinh(t)
    p = 1.0 / (1.0 + np.exp(-s))
    one_minus_p = 1.0 / (1.0 + np.exp(s))
    weights = step * np.pi * np.cosh(t) * p * one_minus_p
    return p, weights


_NODES, _QWEIGHTS = _tanh_sinh_rule()


def integrate_unit(f: Callable[[np.ndarray], Any]) -> float:
    """Integral of a vectorised function over [0, 1], accurate to about 1e-12.

    Parameters
    ----------
    f : callable
        Maps a float64 array of probabilities, shape (n,), to values of the same shape
        (a :class:`Weighting` or any ``weight_*`` function with its parameters bound).

    Returns
    -------
    float
        ``∫₀¹ f(p) dp`` by tanh-sinh quadrature.
    """
    values = np.asarray(f(_NODES.copy()), dtype=np.float64)
    if values.shape != _NODES.shape:
        raise ConfigError(f"integrand returned shape {values.shape}, expected {_NODES.shape}")
    return float(np.dot(_QWEIGHTS, values))


@functools.lru_cache(maxsize=4096)
def _raw_integral(base: str, params: tuple[tuple[str, float], ...]) -> float:
    fn = _FAMILIES[base].fn
    kwargs = dict(params)
    return integrate_unit(lambda p: fn(p, **kwargs))


# --------------------------------------------------------------------------- Weighting


@dataclass(frozen=True)
class Weighting:
    """A named weighting curve with bound parameters, callable on probabilities.

    Parameters
    ----------
    name : str
        One of :data:`WEIGHTING_NAMES`. A name ending in "-dn" is the family's emphasis density
        function: the curve divided by its integral over [0, 1].
    params : dict of str to float
        The family's parameters (see the ``weight_*`` functions); missing ones take the family's
        default where it has one. Unknown or invalid parameters raise :class:`ConfigError`.

    Examples
    --------
    >>> w = Weighting("dm", {"lam": 1.0, "beta": 8.0})
    >>> w(np.array([0.0, 0.5, 1.0])).round(4)
    array([1.    , 7.3891, 1.    ])
    """

    name: str
    params: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        base, _ = _split_name(self.name)
        family = _FAMILIES[base]
        if not isinstance(self.params, Mapping):
            raise ConfigError(f"weighting params must be a mapping, got {type(self.params)}")
        unknown = sorted(set(self.params) - set(family.params))
        if unknown:
            accepted = ", ".join(family.params) or "none"
            raise ConfigError(
                f"weighting {base!r} got unknown parameter(s) {', '.join(unknown)}; "
                f"accepted: {accepted}"
            )
        merged = {**family.defaults, **self.params}
        missing = [k for k in family.params if k not in merged]
        if missing:
            raise ConfigError(f"weighting {base!r} needs parameter(s) {', '.join(missing)}")
        params = {k: check_finite(k, merged[k]) for k in family.params}
        object.__setattr__(self, "params", params)
        # Evaluate once in float64: runs the family's parameter checks and bounds the range.
        peak = float(np.max(family.fn(np.linspace(0.0, 1.0, 1025), **params)))
        if not _MIN_PEAK <= peak <= _MAX_WEIGHT:
            raise ConfigError(
                f"weighting {self} peaks at {peak:.3g} on [0, 1], outside the float32-safe range "
                f"[{_MIN_PEAK:g}, {_MAX_WEIGHT:g}]; use a smaller |beta| or T"
            )

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.params.items()))))

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
        return f"{self.name}({args})" if args else self.name

    @property
    def base(self) -> str:
        """Family name without the "-dn" suffix."""
        return _split_name(self.name)[0]

    @property
    def normalised(self) -> bool:
        """Whether this is an EDF (integral one over [0, 1])."""
        return _split_name(self.name)[1]

    def __call__(self, p: ArrayT) -> ArrayT:
        """Evaluate the curve.

        Parameters
        ----------
        p : np.ndarray or torch.Tensor, shape (...)
            Probabilities of the given labels, in [0, 1].

        Returns
        -------
        np.ndarray or torch.Tensor, shape (...)
            The weights, same type (and floating dtype) as ``p``.
        """
        w = _FAMILIES[self.base].fn(p, **self.params)
        if self.normalised:
            w = w / self._raw_integral()
        return w

    def _raw_integral(self) -> float:
        return _raw_integral(self.base, tuple(sorted(self.params.items())))

    def integral(self) -> float:
        """``∫₀¹ w(p) dp`` (1 up to ~1e-15 for an EDF).

        Returns
        -------
        float
            The area under the curve.
        """
        # An EDF is w / ∫w by construction; its integral is checked numerically in the tests.
        return 1.0 if self.normalised else self._raw_integral()

    @property
    def scalable(self) -> bool:
        """Whether the curve has emphasis parameters that an emphasis scale can ramp."""
        return _FAMILIES[self.base].ramp is not None

    def scaled(self, scale: float) -> Weighting:
        """The curve with its emphasis parameters scaled by ``scale`` in [0, 1].

        Used by an emphasis ramp: dm scales lam and beta, normal psi and beta, exponential beta,
        imae T, gce q (0: CCE's curve); beta moves alpha and eta towards 1 (a flat curve). At
        scale 0 the dm, normal, exponential, imae and beta curves weigh every example the same.

        Parameters
        ----------
        scale : float
            Fraction of the emphasis parameters to apply, in [0, 1].

        Returns
        -------
        Weighting
            A new weighting of the same name.
        """
        scale = check_within("scale", scale, 0.0, 1.0)
        rule = _FAMILIES[self.base].ramp
        if rule is None:
            raise ConfigError(f"weighting {self.name!r} has no emphasis parameters to scale")
        if scale == 1.0:
            return self
        return Weighting(self.name, rule(dict(self.params), scale))


def create_weighting(name: str, **params: float) -> Weighting:
    """Build a weighting curve by name.

    Parameters
    ----------
    name : str
        One of :data:`WEIGHTING_NAMES`: "cce", "mae", "mse", "gce" (q), "dm" (lam, beta),
        "normal" (psi, beta), "exponential" (beta), "beta" (alpha, eta), "imae" (T), or any of
        these with "-dn" appended for its emphasis density function.
    **params : float
        The family's parameters. Defaults: gce q=0.7, dm lam=0.5 beta=8, imae T=8.

    Returns
    -------
    Weighting
        The validated curve.

    Raises
    ------
    ConfigError
        Unknown name, unknown, missing or invalid parameter, or a curve outside float32 range.
    """
    return Weighting(name, dict(params))


def edf(weighting: Weighting) -> Weighting:
    """Emphasis density function: the curve divided by its integral over [0, 1].

    Parameters
    ----------
    weighting : Weighting
        Any weighting; an EDF is returned unchanged.

    Returns
    -------
    Weighting
        The "-dn" version, with ``∫₀¹ h(p) dp = 1``.
    """
    if weighting.normalised:
        return weighting
    return Weighting(weighting.name + _DN_SUFFIX, dict(weighting.params))


# --------------------------------------------------------------------------- mode and variance


def emphasis_mode(weighting: Callable[[np.ndarray], Any], *, grid_size: int = 2001) -> float:
    """Emphasis mode ψ = argmax over p in [0, 1] of w(p), found numerically.

    A grid search followed by successive zooms around the best point (accurate to ~1e-8, the
    limit set by the curve's flatness at a smooth peak). Where several points tie (a flat curve,
    or equal endpoints) the smallest maximiser is returned.

    Parameters
    ----------
    weighting : Weighting or callable
        Vectorised curve mapping a float64 array of shape (n,) to weights of shape (n,).
    grid_size : int, default 2001
        Points of the initial grid (>= 3).

    Returns
    -------
    float
        The mode in [0, 1].
    """
    if grid_size < 3:
        raise ConfigError(f"grid_size must be >= 3, got {grid_size}")
    grid = np.linspace(0.0, 1.0, grid_size)
    best = int(np.argmax(np.asarray(weighting(grid), dtype=np.float64)))
    centre, half = float(grid[best]), 1.0 / (grid_size - 1)
    for _ in range(8):
        grid = np.clip(np.linspace(centre - half, centre + half, 201), 0.0, 1.0)
        centre = float(grid[int(np.argmax(np.asarray(weighting(grid), dtype=np.float64)))])
        half /= 50.0
    return centre


def dm_emphasis_mode(lam: float) -> float:
    """Closed-form emphasis mode of the DM curve, ψ = lam/(lam+1) (for beta > 0).

    Parameters
    ----------
    lam : float
        DM's lambda, >= 0.

    Returns
    -------
    float
        The mode, in [0, 1).
    """
    lam = check_at_least("lam", lam, 0.0)
    return lam / (lam + 1.0)


def curve_variance(weighting: Callable[[np.ndarray], Any]) -> float:
    """Emphasis variance of a curve with p uniform on [0, 1]: ``∫w² dp − (∫w dp)²``.

    Parameters
    ----------
    weighting : Weighting or callable
        Vectorised curve mapping a float64 array of shape (n,) to weights of shape (n,).

    Returns
    -------
    float
        The variance (e.g. 4.546 for ``imae`` with T = 8, 1/3 for ``cce``).
    """
    mean = integrate_unit(weighting)
    second = integrate_unit(lambda p: np.asarray(weighting(p), dtype=np.float64) ** 2)
    return max(second - mean * mean, 0.0)


def batch_variance(weights: np.ndarray | torch.Tensor) -> float:
    """Emphasis variance of a batch, ``E[(w_i - E[w_i])²]`` (population variance).

    Parameters
    ----------
    weights : np.ndarray or torch.Tensor, shape (B,)
        Per-example weights of one batch (any shape is flattened).

    Returns
    -------
    float
        The variance over the batch.
    """
    if isinstance(weights, torch.Tensor):
        values = weights.detach().to("cpu", torch.float64).numpy().ravel()
    else:
        values = np.asarray(weights, dtype=np.float64).ravel()
    if values.size == 0:
        raise DataError("batch_variance needs at least one weight, got an empty batch")
    if not np.all(np.isfinite(values)):
        raise DataError("batch_variance got non-finite weights")
    return float(np.var(values))


# --------------------------------------------------------------------------- plot


def plot_weighting_curves(
    curves: Mapping[str, Weighting],
    path: str | os.PathLike[str] | None = None,
    *,
    normalise: bool = False,
) -> Path | Figure:
    """Plot weighting curves over p in [0, 1] to a PNG file (like the DM paper's Figure 1).

    Parameters
    ----------
    curves : mapping of str to Weighting
        Legend label -> curve. Each legend entry also shows the curve's emphasis mode.
    path : str or os.PathLike, optional
        Output PNG file; parent folders are created. Written atomically (temporary name, then
        rename), so a crash never leaves a partial image. Without a path the figure is returned
        (to embed it in a report).
    normalise : bool, default False
        Plot each curve's emphasis density function (integral one) instead of the raw curve,
        which makes curves of different scales comparable.

    Returns
    -------
    pathlib.Path or matplotlib.figure.Figure
        The written file, or the figure when no path is given.
    """
    # Figure + Agg canvas instead of pyplot: no global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ConfigError("plot_weighting_curves needs at least one curve")
    p = np.linspace(0.0, 1.0, 501)
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, weighting in curves.items():
        curve = edf(weighting) if normalise else weighting
        ax.plot(p, curve(p), label=f"{label} (ψ={emphasis_mode(curve):.2f})")
    ax.set_xlabel("p_i (probability of the given label)")
    ax.set_ylabel("emphasis density h(p_i)" if normalise else "weight w(p_i)")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    if path is None:
        return fig
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
