"""Training losses: derivative manipulation (DM), the common losses, and target modification.

Every loss is an ``nn.Module`` with ``forward(logits (B, C), targets (B,)) -> LossOutput`` and
``set_progress(iteration, total_iterations)``. Probabilities are computed from ``log_softmax``
(float32 at least, also under mixed precision), so logits of ±1e4 and p_i of exactly 0 or 1 give
finite losses and gradients.

Two families:

* **Example weighting** (:class:`DMLoss` and the common losses CCE, MAE, MSE, GCE, IMAE): the
  gradient w.r.t. the logits is ``c_i (p - onehot(y_i))`` and only its L1 magnitude, the example's
  weight ``w(p_i)``, differs between losses. DM chooses ``w`` directly.
* **Target modification** (label smoothing, confidence penalty, bootstrapping, ProSelfLC): the
  cross entropy ``-Σ_j q̃_ij log p_ij`` against a modified target ``q̃``. ProSelfLC can also take a
  DM weighting, which then sets each example's gradient magnitude while ProSelfLC's corrected
  target sets its direction.

``LossOutput.weights`` always holds each example's weight as the loss defines it, before any batch
normalisation: the DM weight ``w(p_i)`` for DM losses, and the gradient's L1 norm
``‖∂ℓ_i/∂z_i‖₁`` for the others (``2(1 - p_i)`` for CCE, ``‖p_i - q̃_i‖₁`` for a modified target).

This module builds any loss by name (`create_loss`) and re-exports the classes, which live by
family: `dm_audit.loss_base` (LossOutput, LabelLoss, input checks), `dm_audit.dm_loss` (DMLoss,
IMAELoss, the emphasis ramp), `dm_audit.baseline_losses` (CCE, MAE, MSE, GCE, label smoothing,
confidence penalty, bootstrapping) and `dm_audit.proselflc`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from dm_audit.baseline_losses import (
    BootHardLoss,
    BootSoftLoss,
    CCELoss,
    ConfidencePenaltyLoss,
    GCELoss,
    LabelSmoothingLoss,
    MAELoss,
    MSELoss,
)
from dm_audit.dm_loss import DEFAULT_EPS, NORMALIZATIONS, DMLoss, IMAELoss
from dm_audit.emphasis import Weighting, create_weighting
from dm_audit.errors import ConfigError
from dm_audit.loss_base import REDUCTIONS, LabelLoss, LossOutput
from dm_audit.proselflc import ProSelfLCLoss

__all__ = [
    "LOSS_NAMES",
    "NORMALIZATIONS",
    "REDUCTIONS",
    "BootHardLoss",
    "BootSoftLoss",
    "CCELoss",
    "ConfidencePenaltyLoss",
    "DMLoss",
    "GCELoss",
    "IMAELoss",
    "LabelLoss",
    "LabelSmoothingLoss",
    "LossOutput",
    "MAELoss",
    "MSELoss",
    "ProSelfLCLoss",
    "create_loss",
]

# --------------------------------------------------------------------------- factory


def _build_dm(
    *,
    variant: str = "dm",
    normalization: str = "batch_sum",
    ramp: float = 0.0,
    eps: float = DEFAULT_EPS,
    **weighting_params: float,
) -> DMLoss:
    """DM with any weighting variant; its parameters (lam, beta, psi, ...) pass through."""
    return DMLoss(create_weighting(variant, **weighting_params), normalization, ramp=ramp, eps=eps)


def _build_proselflc(
    total_iterations: int | None = None,
    B: float = 12.0,
    r: float = 0.5,
    trust: str = "entropy",
    temperature: float = 0.5,
    *,
    dm_lam: float | None = None,
    dm_beta: float | None = None,
    weighting: Weighting | None = None,
    normalization: str | None = None,
    reduction: str | None = None,
    ramp: float = 0.0,
    eps: float = DEFAULT_EPS,
) -> ProSelfLCLoss:
    """ProSelfLC; ``dm_lam``/``dm_beta`` (either one) combine it with a DM weighting."""
    if dm_lam is not None or dm_beta is not None:
        if weighting is not None:
            raise ConfigError("give either weighting or dm_lam/dm_beta, not both")
        dm_params = {"lam": dm_lam, "beta": dm_beta}
        weighting = create_weighting("dm", **{k: v for k, v in dm_params.items() if v is not None})
    return ProSelfLCLoss(
        total_iterations,
        B,
        r,
        trust,
        temperature,
        weighting,
        normalization=normalization,
        reduction=reduction,
        ramp=ramp,
        eps=eps,
    )


_LOSSES: dict[str, Callable[..., LabelLoss]] = {
    "cce": CCELoss,
    "cce-dn": functools.partial(CCELoss, dn=True),
    "mae": MAELoss,
    "mae-dn": functools.partial(MAELoss, dn=True),
    "mse": MSELoss,
    "mse-dn": functools.partial(MSELoss, dn=True),
    "gce": GCELoss,
    "gce-dn": functools.partial(GCELoss, dn=True),
    "imae": IMAELoss,
    "dm": _build_dm,
    "ls": LabelSmoothingLoss,
    "cp": ConfidencePenaltyLoss,
    "boot-soft": BootSoftLoss,
    "boot-hard": BootHardLoss,
    "proselflc": _build_proselflc,
}

LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)
"""Every name :func:`create_loss` accepts."""


def create_loss(name: str, **params: object) -> LabelLoss:
    """Build a loss by name.

    Parameters
    ----------
    name : str
        One of :data:`LOSS_NAMES`: "cce", "mae", "mse", "gce" (q) and their "-dn" versions,
        "imae" (T), "dm" (variant="dm" with lam, beta; or any weighting name with its parameters,
        e.g. ``variant="normal", psi=0.5, beta=8``; plus normalization, ramp), "ls", "cp",
        "boot-soft", "boot-hard" (eps), "proselflc" (total_iterations, B, r, trust, temperature,
        and dm_lam/dm_beta to combine with DM).
    **params
        Keyword arguments of the loss.

    Returns
    -------
    LabelLoss
        The loss module.

    Raises
    ------
    ConfigError
        Unknown name, unknown parameter, or an invalid value.
    """
    builder = _LOSSES.get(name) if isinstance(name, str) else None
    if builder is None:
        raise ConfigError(f"unknown loss {name!r}; choose one of: {', '.join(LOSS_NAMES)}")
    signature = inspect.signature(builder)
    try:
        signature.bind(**params)
    except TypeError:
        accepted = [
            p.name
            for p in signature.parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        unknown = sorted(set(params) - set(accepted))
        raise ConfigError(
            f"loss {name!r} got unknown parameter(s) {', '.join(unknown) or '?'}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        ) from None
    try:
        return builder(**params)
    except (TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"loss {name!r}: invalid parameter value ({error})") from error
