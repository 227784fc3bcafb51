"""Derivative manipulation (DM): back-propagate a chosen example weight ``w(p_i)``.

`DMLoss` turns any weighting curve of `dm_audit.emphasis` into a loss whose gradient w.r.t. the
logits has L1 magnitude ``w(p_i)`` (normalised over the batch as `NORMALIZATIONS` says);
`IMAELoss` is DM with IMAE's curve. `EmphasisRamp` holds a DM weighting and ramps its emphasis
parameters up from 0 over the first part of training; ProSelfLC (`dm_audit.proselflc`) shares
it, and the common losses' "-dn" versions (`dm_audit.baseline_losses`) train through `DMLoss`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dm_audit.distributed import batch_mean, batch_sum
from dm_audit.emphasis import Weighting, create_weighting
from dm_audit.errors import ConfigError
from dm_audit.loss_base import (
    LabelLoss,
    LossOutput,
    check_choice,
    check_positive,
    check_unit_interval,
    prepare_batch,
)

__all__ = [
    "DEFAULT_EPS",
    "NORMALIZATIONS",
    "DMLoss",
    "EmphasisRamp",
    "IMAELoss",
    "normalise_weights",
]

NORMALIZATIONS: tuple[str, ...] = ("batch_sum", "batch_mean", "integral", "none")
"""How a DM loss scales its weights over a batch (see :class:`DMLoss`)."""

# The authors' code adds 1e-8 to 2(1 - p_i); the same constant keeps our gradient equal to theirs.
DEFAULT_EPS = 1e-8


def normalise_weights(w: Tensor, normalization: str, weighting: Weighting) -> Tensor:
    """Scale a batch of weights (B,) as ``normalization`` says; an all-zero batch stays zero."""
    tiny = torch.finfo(w.dtype).tiny
    # batch_sum/batch_mean span the global batch under data-parallel training (exactly
    # w.sum()/w.mean() otherwise), so W processes normalise as one process would.
    if normalization == "batch_sum":
        return w / batch_sum(w).clamp_min(tiny)
    if normalization == "batch_mean":
        return w / batch_mean(w).clamp_min(tiny)
    if normalization == "integral":
        return w / weighting.integral()
    return w


class EmphasisRamp:
    """Holds a DM weighting and the emphasis scale that ramps its parameters up from 0."""

    def _init_emphasis(self, weighting: Weighting, normalization: str, ramp: float) -> None:
        if not isinstance(weighting, Weighting):
            raise ConfigError(f"weighting must be a Weighting, got {type(weighting).__name__}")
        self.weighting = weighting
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        self.ramp = check_unit_interval("ramp", ramp)
        if self.ramp > 0.0 and not weighting.scalable:
            raise ConfigError(f"ramp needs a weighting with emphasis parameters, not {weighting}")
        self._scale = 0.0 if self.ramp > 0.0 else 1.0
        self._scaled = weighting.scaled(self._scale) if self.ramp > 0.0 else weighting

    @property
    def emphasis_scale(self) -> float:
        """Fraction in [0, 1] of the weighting's emphasis parameters in use (1: all of them).

        With ``ramp > 0`` it starts at 0 and :meth:`set_progress` raises it linearly to 1 over the
        first ``ramp`` fraction of training, so early training, when every p_i is small, is not
        dominated by a sharp emphasis that can collapse it.
        """
        return self._scale

    @emphasis_scale.setter
    def emphasis_scale(self, value: float) -> None:
        value = check_unit_interval("emphasis_scale", value)
        if value != self._scale:
            self._scaled = self.weighting.scaled(value) if value < 1.0 else self.weighting
            self._scale = value

    @property
    def current_weighting(self) -> Weighting:
        """The weighting with the current emphasis scale applied."""
        return self._scaled

    def _ramp_progress(self, iteration: int, total_iterations: int) -> None:
        if self.ramp > 0.0:
            self.emphasis_scale = min(1.0, iteration / (self.ramp * total_iterations))

    def _dm_extra_repr(self) -> str:
        return f"weighting={self.weighting}, normalization={self.normalization}, ramp={self.ramp}"


class DMLoss(EmphasisRamp, LabelLoss):
    """Derivative manipulation: back-propagate a chosen example weight ``w(p_i)``.

    The gradient w.r.t. the logits of example i is

        ∇z_i = ŵ_i / (2(1 - p_i) + eps) · (p_i - onehot(y_i)),   so ‖∇z_i‖₁ ≈ ŵ_i,

    with p_i and ŵ_i constants (no gradient flows through the weight). It is computed by autograd
    from the surrogate ``Σ_i ŵ_i · CE_i / (2(1 - p_i) + eps)`` with the coefficient detached; its
    value is not DM's loss (a non-elementary integral) and is only meant for back-propagation.
    Near p_i = 1, ``CE_i ≈ 1 - p_i`` and the coefficient is at most ``ŵ_i / eps``, so the gradient
    stays below ŵ_i and the value below ŵ_i/2.

    ``normalization`` sets ŵ from the raw weights w (B,):

    ========== =================== =============================================================
    batch_sum  ŵ = w / Σ_batch w   the authors' code; Σ ŵ = 1, a mean-like scale (default)
    batch_mean ŵ = w / mean(w)     Σ ŵ = B: the scale of a sum-reduced loss
    integral   ŵ = w / ∫₀¹ w dp    the EDF value, no batch dependence
    none       ŵ = w               ‖∇z_i‖₁ = w(p_i) exactly (up to eps)
    ========== =================== =============================================================

    Parameters
    ----------
    weighting : Weighting
        The curve w(p), e.g. ``create_weighting("dm", lam=0.5, beta=8)``.
    normalization : str, default "batch_sum"
        One of :data:`NORMALIZATIONS`.
    ramp : float, default 0.0
        Fraction of training over which the emphasis parameters (lambda and beta for "dm") grow
        linearly from 0 to their values, driven by :meth:`set_progress` (0: no ramp).
    eps : float, default 1e-8
        Added to ``2(1 - p_i)``, as in the authors' code.

    Examples
    --------
    >>> loss_fn = DMLoss(create_weighting("dm", lam=1.0, beta=16.0))
    >>> out = loss_fn(torch.zeros(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 0]))
    >>> out.loss.backward()
    """

    def __init__(
        self,
        weighting: Weighting,
        normalization: str = "batch_sum",
        *,
        ramp: float = 0.0,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        self._init_emphasis(weighting, normalization, ramp)
        self.eps = check_positive("eps", eps)

    def forward(self, logits: Tensor, targets: Tensor) -> LossOutput:
        """Compute the DM surrogate loss.

        Parameters
        ----------
        logits : torch.Tensor, shape (B, C)
            Unnormalised scores (any float dtype; half precision is computed in float32).
        targets : torch.Tensor, shape (B,)
            Given labels, integer codes in 0..C-1.

        Returns
        -------
        LossOutput
            ``loss`` (), ``p_given`` (B,), ``weights`` (B,) = w(p_i) before normalisation,
            ``extras["normalised_weights"]`` (B,) = ŵ.
        """
        batch = prepare_batch(logits, targets)
        with torch.no_grad():
            p_given = batch.p_given()
            weighting = self.current_weighting
            w = weighting(p_given)
            w_hat = normalise_weights(w, self.normalization, weighting)
            coef = w_hat / (2.0 * batch.one_minus_p_given() + self.eps)
        loss = (coef * -batch.log_p_given).sum()
        return LossOutput(loss, p_given, w, {"normalised_weights": w_hat})

    def _on_progress(self, iteration: int, total_iterations: int) -> None:
        self._ramp_progress(iteration, total_iterations)

    def extra_repr(self) -> str:
        return self._dm_extra_repr()


class IMAELoss(DMLoss):
    """IMAE: DM with the weighting ``exp(T p (1 - p))`` (emphasis mode 0.5).

    Parameters
    ----------
    T : float, default 8.0
        Emphasis spread, >= 0 (8 on noisy labels, 0.5 on clean ones, as in the IMAE paper).
    normalization : str, default "batch_sum"
        One of :data:`NORMALIZATIONS`.
    ramp : float, default 0.0
        Fraction of training over which T grows linearly from 0.
    eps : float, default 1e-8
        Added to ``2(1 - p_i)``.
    """

    def __init__(
        self,
        T: float = 8.0,
        normalization: str = "batch_sum",
        *,
        ramp: float = 0.0,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__(create_weighting("imae", T=T), normalization, ramp=ramp, eps=eps)
