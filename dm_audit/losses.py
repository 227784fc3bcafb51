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
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dm_audit.distributed import batch_mean, batch_sum, global_batch_size
from dm_audit.emphasis import (
    Weighting,
    create_weighting,
    edf,
)
from dm_audit.errors import ConfigError, DataError

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

NORMALIZATIONS: tuple[str, ...] = ("batch_sum", "batch_mean", "integral", "none")
"""How a DM loss scales its weights over a batch (see :class:`DMLoss`)."""

REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
"""How a loss without DM weighting reduces per-example losses."""

# The authors' code adds 1e-8 to 2(1 - p_i); the same constant keeps our gradient equal to theirs.
_DEFAULT_EPS = 1e-8


@dataclass
class LossOutput:
    """What every loss returns.

    Attributes
    ----------
    loss : torch.Tensor, shape ()
        The value to back-propagate; shape (B,) only for ``reduction="none"``.
    p_given : torch.Tensor, shape (B,)
        Probability of the given label, p_i, detached.
    weights : torch.Tensor, shape (B,)
        Each example's weight before batch normalisation, detached (see the module docstring).
    extras : dict of str to torch.Tensor
        Loss-specific detached diagnostics, e.g. ProSelfLC's "epsilon" (B,), "g" (), "l" (B,)
        and "target" (B, C).
    """

    loss: Tensor
    p_given: Tensor
    weights: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------- shared helpers


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _number(name: str, value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


def _unit_interval(name: str, value: float) -> float:
    value = _number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must lie in [0, 1], got {value:g}")
    return value


def _positive(name: str, value: float) -> float:
    value = _number(name, value)
    if not (math.isfinite(value) and value > 0.0):
        raise ConfigError(f"{name} must be a positive number, got {value:g}")
    return value


@dataclass
class _Batch:
    logits: Tensor  # (B, C), float32 or float64, with grad
    targets: Tensor  # (B,) int64
    log_p: Tensor  # (B, C), with grad
    log_p_given: Tensor  # (B,), with grad

    @property
    def n_classes(self) -> int:
        return self.logits.shape[1]

    def p_given(self) -> Tensor:
        return self.log_p_given.detach().exp()

    def one_minus_p_given(self) -> Tensor:
        """1 - p_i as the sum of the other classes' probabilities (detached).

        ``1 - exp(log p_i)`` rounds to 0 once 1 - p_i drops below float32's resolution near 1
        (6e-8) although the other probabilities are still representable; summing them keeps
        1 - p_i accurate down to the smallest float.
        """
        others = self.log_p.detach().scatter(1, self.targets[:, None], -math.inf)
        return others.logsumexp(dim=1).exp()

    def onehot(self) -> Tensor:
        return F.one_hot(self.targets, self.n_classes).to(self.log_p.dtype)


def _prepare(logits: Tensor, targets: Tensor) -> _Batch:
    """Validate the inputs and compute log-probabilities in float32 or float64."""
    if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
        raise DataError("logits and targets must be torch tensors")
    if logits.ndim != 2 or not logits.is_floating_point():
        raise DataError(
            f"logits must be a floating tensor of shape (B, C), got {tuple(logits.shape)} "
            f"{logits.dtype}"
        )
    if targets.ndim != 1 or targets.is_floating_point() or targets.dtype == torch.bool:
        raise DataError(
            f"targets must be an integer tensor of shape (B,), got {tuple(targets.shape)} "
            f"{targets.dtype}"
        )
    n, c = logits.shape
    if targets.shape[0] != n:
        raise DataError(f"logits have {n} rows but targets have {targets.shape[0]}")
    if n == 0 or c == 0:
        raise DataError(f"empty batch: logits of shape {(n, c)}")
    targets = targets.to(device=logits.device, dtype=torch.long)
    # One host sync per batch buys a message naming the row, instead of a CUDA device-side
    # assert (or silent garbage on CPU) from gather/one_hot on an out-of-range label.
    bad = (targets < 0) | (targets >= c)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise DataError(
            f"target {int(targets[row])} at row {row} is outside the class range 0..{c - 1}"
        )
    # Half precision cannot hold exp(beta) weights or 1 - p_i near 1: compute in float32.
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    log_p = F.log_softmax(logits, dim=1)
    log_p_given = log_p.gather(1, targets[:, None]).squeeze(1)
    return _Batch(logits, targets, log_p, log_p_given)


def _reduce(per_example: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        # Under data-parallel training the mean is over the global batch of all processes.
        total = global_batch_size(per_example.shape[0])
        return per_example.mean() if total is None else per_example.sum() / total
    if reduction == "sum":
        return per_example.sum()
    return per_example


def _normalise_weights(w: Tensor, normalization: str, weighting: Weighting) -> Tensor:
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


class LabelLoss(nn.Module):
    """Base class of dm-audit's losses: ``forward(logits, targets) -> LossOutput``.

    Subclasses that depend on training progress override :meth:`_on_progress`.
    """

    def forward(self, logits: Tensor, targets: Tensor) -> LossOutput:  # pragma: no cover
        raise NotImplementedError

    def set_progress(self, iteration: int, total_iterations: int) -> None:
        """Tell the loss where training is; call once per optimisation step.

        Parameters
        ----------
        iteration : int
            Steps done so far, >= 0 (may exceed ``total_iterations``: the schedule then stays at
            its end value).
        total_iterations : int
            Planned number of steps, >= 1.
        """
        iteration, total_iterations = int(iteration), int(total_iterations)
        if total_iterations < 1:
            raise ConfigError(f"total_iterations must be >= 1, got {total_iterations}")
        if iteration < 0:
            raise ConfigError(f"iteration must be >= 0, got {iteration}")
        self._on_progress(iteration, total_iterations)

    def _on_progress(self, iteration: int, total_iterations: int) -> None:
        """Most losses do not depend on progress."""


class _EmphasisRamp:
    """Holds a DM weighting and the emphasis scale that ramps its parameters up from 0."""

    def _init_emphasis(self, weighting: Weighting, normalization: str, ramp: float) -> None:
        if not isinstance(weighting, Weighting):
            raise ConfigError(f"weighting must be a Weighting, got {type(weighting).__name__}")
        self.weighting = weighting
        self.normalization = _choice("normalization", normalization, NORMALIZATIONS)
        self.ramp = _unit_interval("ramp", ramp)
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
        value = _unit_interval("emphasis_scale", value)
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


# --------------------------------------------------------------------------- DM


class DMLoss(_EmphasisRamp, LabelLoss):
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
        eps: float = _DEFAULT_EPS,
    ) -> None:
        super().__init__()
        self._init_emphasis(weighting, normalization, ramp)
        self.eps = _positive("eps", eps)

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
        batch = _prepare(logits, targets)
        with torch.no_grad():
            p_given = batch.p_given()
            weighting = self.current_weighting
            w = weighting(p_given)
            w_hat = _normalise_weights(w, self.normalization, weighting)
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
        eps: float = _DEFAULT_EPS,
    ) -> None:
        super().__init__(create_weighting("imae", T=T), normalization, ramp=ramp, eps=eps)


# --------------------------------------------------------------------------- common losses


class _ProbabilityLoss(LabelLoss):
    """A loss of p_i alone; with ``dn=True`` its weight curve's EDF drives a DM loss instead."""

    def __init__(
        self,
        weighting: Weighting,
        *,
        dn: bool,
        reduction: str | None,
        normalization: str | None,
    ) -> None:
        super().__init__()
        self.weighting = weighting
        self.dn = bool(dn)
        if self.dn:
            if reduction is not None:
                raise ConfigError(
                    "reduction applies to the plain loss; with dn=True use normalization"
                )
            self.reduction = None
            # Under batch_sum the EDF's constant cancels; it matters for "integral" and "none".
            self._dm: DMLoss | None = DMLoss(edf(weighting), normalization or "batch_sum")
        else:
            if normalization is not None:
                raise ConfigError("normalization applies only with dn=True; use reduction")
            self.reduction = _choice("reduction", reduction or "mean", REDUCTIONS)
            self._dm = None

    def _per_example(self, log_p_given: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, logits: Tensor, targets: Tensor) -> LossOutput:
        """Compute the loss.

        Parameters
        ----------
        logits : torch.Tensor, shape (B, C)
            Unnormalised scores.
        targets : torch.Tensor, shape (B,)
            Given labels, integer codes in 0..C-1.

        Returns
        -------
        LossOutput
            ``loss`` () or (B,) for ``reduction="none"``, ``p_given`` (B,), ``weights`` (B,): the
            curve's weight of p_i (‖∂ℓ_i/∂z_i‖₁ for the plain loss).
        """
        if self._dm is not None:
            return self._dm(logits, targets)
        batch = _prepare(logits, targets)
        p_given = batch.p_given()
        per_example = self._per_example(batch.log_p_given)
        return LossOutput(_reduce(per_example, self.reduction), p_given, self.weighting(p_given))

    def extra_repr(self) -> str:
        if self._dm is not None:
            return f"weighting={self.weighting}, dn=True, normalization={self._dm.normalization}"
        return f"weighting={self.weighting}, dn=False, reduction={self.reduction}"


class _ParameterFreeLoss(_ProbabilityLoss):
    """A loss of p_i whose weight curve has no parameter: ``curve`` names it."""

    curve: str = ""

    def __init__(
        self, *, dn: bool = False, reduction: str | None = None, normalization: str | None = None
    ) -> None:
        super().__init__(
            create_weighting(self.curve), dn=dn, reduction=reduction, normalization=normalization
        )


# The per-example losses are written with expm1 so that 1 - p_i keeps its precision near p_i = 1
# and the gradient is the textbook c_i (p - onehot) down to p_i = 0 (log_p of -2e4 is fine).


class CCELoss(_ParameterFreeLoss):
    """Categorical cross entropy ``-log p_i``; weight ``2(1 - p_i)``, emphasis mode 0.

    Parameters
    ----------
    dn : bool, default False
        Train with CCE's emphasis density function through :class:`DMLoss` ("CCE-DN").
    reduction : {"mean", "sum", "none"}, optional
        Plain loss only; default "mean".
    normalization : str, optional
        ``dn=True`` only; one of :data:`NORMALIZATIONS`, default "batch_sum".
    """

    curve = "cce"

    def _per_example(self, log_p_given: Tensor) -> Tensor:
        return -log_p_given


class MAELoss(_ParameterFreeLoss):
    """Mean absolute error as in DM, ``1 - p_i``; weight ``2 p_i (1 - p_i)``, mode 0.5.

    IMAE and GR write ``2(1 - p_i)`` (the L1 distance between p and the one-hot label), which
    doubles the weight; the factor vanishes under any normalisation.

    Parameters
    ----------
    dn : bool, default False
        Train with MAE's emphasis density function through :class:`DMLoss` ("MAE-DN").
    reduction : {"mean", "sum", "none"}, optional
        Plain loss only; default "mean".
    normalization : str, optional
        ``dn=True`` only; one of :data:`NORMALIZATIONS`, default "batch_sum".
    """

    curve = "mae"

    def _per_example(self, log_p_given: Tensor) -> Tensor:
        return -torch.expm1(log_p_given)


class MSELoss(_ParameterFreeLoss):
    """Mean square error as in DM, ``(1 - p_i)^2``; weight ``4 p_i (1 - p_i)^2``, mode 1/3.

    Parameters
    ----------
    dn : bool, default False
        Train with MSE's emphasis density function through :class:`DMLoss` ("MSE-DN").
    reduction : {"mean", "sum", "none"}, optional
        Plain loss only; default "mean".
    normalization : str, optional
        ``dn=True`` only; one of :data:`NORMALIZATIONS`, default "batch_sum".
    """

    curve = "mse"

    def _per_example(self, log_p_given: Tensor) -> Tensor:
        return torch.expm1(log_p_given) ** 2


class GCELoss(_ProbabilityLoss):
    """Generalised cross entropy ``(1 - p_i^q)/q``; weight ``2 p_i^q (1 - p_i)``, mode q/(q+1).

    Parameters
    ----------
    q : float, default 0.7
        Exponent in (0, 1]; q -> 0 approaches CCE, q = 1 is MAE.
    dn : bool, default False
        Train with GCE's emphasis density function through :class:`DMLoss` ("GCE-DN").
    reduction : {"mean", "sum", "none"}, optional
        Plain loss only; default "mean".
    normalization : str, optional
        ``dn=True`` only; one of :data:`NORMALIZATIONS`, default "batch_sum".
    """

    def __init__(
        self,
        q: float = 0.7,
        dn: bool = False,
        *,
        reduction: str | None = None,
        normalization: str | None = None,
    ) -> None:
        q = _number("q", q)
        if not 0.0 < q <= 1.0:
            raise ConfigError(f"GCE's q must lie in (0, 1], got {q:g}")
        super().__init__(
            create_weighting("gce", q=q), dn=dn, reduction=reduction, normalization=normalization
        )
        self.q = q

    def _per_example(self, log_p_given: Tensor) -> Tensor:
        return -torch.expm1(self.q * log_p_given) / self.q


# --------------------------------------------------------------------------- target modification


class _TargetLoss(LabelLoss):
    """Cross entropy ``-Σ_j q̃_ij log p_ij`` against a detached modified target ``q̃`` (B, C)."""

    def __init__(self, eps: float, reduction: str) -> None:
        super().__init__()
        self.eps = _unit_interval("eps", eps)
        self.reduction = _choice("reduction", reduction, REDUCTIONS)

    def _target(self, batch: _Batch, p: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, logits: Tensor, targets: Tensor) -> LossOutput:
        """Compute the loss.

        Parameters
        ----------
        logits : torch.Tensor, shape (B, C)
            Unnormalised scores.
        targets : torch.Tensor, shape (B,)
            Given labels, integer codes in 0..C-1.

        Returns
        -------
        LossOutput
            ``loss`` () or (B,) for ``reduction="none"``, ``p_given`` (B,), ``weights`` (B,) =
            ``‖p_i - q̃_i‖₁``, ``extras["target"]`` (B, C) = q̃.
        """
        batch = _prepare(logits, targets)
        with torch.no_grad():
            p = batch.log_p.exp()
            target = self._target(batch, p)
            weights = (p - target).abs().sum(dim=1)
        per_example = -(target * batch.log_p).sum(dim=1)
        return LossOutput(
            _reduce(per_example, self.reduction), batch.p_given(), weights, {"target": target}
        )

    def extra_repr(self) -> str:
        return f"eps={self.eps}, reduction={self.reduction}"


class LabelSmoothingLoss(_TargetLoss):
    """Label smoothing: ``q̃ = (1 - eps) onehot(y) + eps / C``.

    Parameters
    ----------
    eps : float, default 0.1
        Smoothing weight in [0, 1].
    reduction : {"mean", "sum", "none"}, default "mean"
        Reduction over the batch.
    """

    def __init__(self, eps: float = 0.1, reduction: str = "mean") -> None:
        super().__init__(eps, reduction)

    def _target(self, batch: _Batch, p: Tensor) -> Tensor:
        return (1.0 - self.eps) * batch.onehot() + self.eps / batch.n_classes


class BootSoftLoss(_TargetLoss):
    """Soft bootstrapping: ``q̃ = (1 - eps) onehot(y) + eps p`` with p detached.

    Parameters
    ----------
    eps : float, default 0.05
        Self-trust in [0, 1] (Reed et al.'s beta = 0.95 is eps = 0.05).
    reduction : {"mean", "sum", "none"}, default "mean"
        Reduction over the batch.
    """

    def __init__(self, eps: float = 0.05, reduction: str = "mean") -> None:
        super().__init__(eps, reduction)

    def _target(self, batch: _Batch, p: Tensor) -> Tensor:
        return (1.0 - self.eps) * batch.onehot() + self.eps * p


class BootHardLoss(_TargetLoss):
    """Hard bootstrapping: ``q̃ = (1 - eps) onehot(y) + eps onehot(argmax p)``.

    Parameters
    ----------
    eps : float, default 0.2
        Self-trust in [0, 1] (Reed et al.'s beta = 0.8 is eps = 0.2).
    reduction : {"mean", "sum", "none"}, default "mean"
        Reduction over the batch.
    """

    def __init__(self, eps: float = 0.2, reduction: str = "mean") -> None:
        super().__init__(eps, reduction)

    def _target(self, batch: _Batch, p: Tensor) -> Tensor:
        predicted = F.one_hot(p.argmax(dim=1), batch.n_classes).to(p.dtype)
        return (1.0 - self.eps) * batch.onehot() + self.eps * predicted


class ConfidencePenaltyLoss(LabelLoss):
    """Confidence penalty: ``(1 - eps) CE_i - eps H(p_i)``, i.e. the target ``(1 - eps) q - eps p``.

    Unlike the other target modifications the penalty's gradient flows through both p and
    log p of the entropy term (Pereyra et al.), so the gradient is
    ``(1 - eps)(p - onehot) + eps p ⊙ (log p + H(p))``.

    Parameters
    ----------
    eps : float, default 0.1
        Penalty weight in [0, 1].
    reduction : {"mean", "sum", "none"}, default "mean"
        Reduction over the batch.
    """

    def __init__(self, eps: float = 0.1, reduction: str = "mean") -> None:
        super().__init__()
        self.eps = _unit_interval("eps", eps)
        self.reduction = _choice("reduction", reduction, REDUCTIONS)

    def forward(self, logits: Tensor, targets: Tensor) -> LossOutput:
        """Compute the loss.

        Parameters
        ----------
        logits : torch.Tensor, shape (B, C)
            Unnormalised scores.
        targets : torch.Tensor, shape (B,)
            Given labels, integer codes in 0..C-1.

        Returns
        -------
        LossOutput
            ``loss`` () or (B,), ``p_given`` (B,), ``weights`` (B,) = ‖∂ℓ_i/∂z_i‖₁,
            ``extras["entropy"]`` (B,) = H(p_i).
        """
        batch = _prepare(logits, targets)
        p = batch.log_p.exp()
        entropy = -(p * batch.log_p).sum(dim=1)
        per_example = (1.0 - self.eps) * -batch.log_p_given - self.eps * entropy
        with torch.no_grad():
            grad = (1.0 - self.eps) * (p - batch.onehot()) + self.eps * p * (
                batch.log_p + entropy[:, None]
            )
            weights = grad.abs().sum(dim=1)
        return LossOutput(
            _reduce(per_example, self.reduction),
            batch.p_given(),
            weights.detach(),
            {"entropy": entropy.detach()},
        )

    def extra_repr(self) -> str:
        return f"eps={self.eps}, reduction={self.reduction}"


class ProSelfLCLoss(_EmphasisRamp, LabelLoss):
    """ProSelfLC with an annealed temperature, optionally with DM's example weights.

    Target and trust (ProSelfLC paper, Eq. 1, with AT):

        p_T = softmax(z.detach() / T)
        q̃_i = (1 - ε_i) onehot(y_i) + ε_i p_T,i,    ε_i = g(t) · l(p_T,i)
        g(t) = 1 / (1 + exp(-B (t/Γ - r)))                trust in learning time
        l(p) = 1 - H(p)/H(u)  ("entropy")  or  max_j p_j  ("max")   trust in the example

    and the loss is the cross entropy ``-Σ_j q̃_ij log p_ij`` with log p at temperature 1 and q̃
    detached, so the gradient is ``p_i - q̃_i``. There is no warm-up: g(t) is tiny early on.

    A temperature T < 1 sharpens the self knowledge, so once the model is reasonably confident
    the corrected targets have lower entropy. It also raises l(p_T) and so ε: on near-uniform
    predictions the target then moves further from the given label than at T = 1.

    With a ``weighting``, the direction stays ``p_i - q̃_i`` but each example's gradient
    magnitude becomes DM's normalised weight: ``∇z_i = ŵ_i (p_i - q̃_i)/(‖p_i - q̃_i‖₁ + eps)``.
    The weight is taken at ``p̃_i = Σ_j q̃_ij p_ij``, the probability the model gives the
    *corrected* target, not at p_i of the given label: an example whose label ProSelfLC is
    correcting is then weighed by how well it fits its corrected label, so correction is not
    cancelled by DM down-weighting the (wrong) given label. Early in training, ε ≈ 0 and
    p̃_i = p_i, so the combination starts as plain DM.

    Parameters
    ----------
    total_iterations : int, optional
        Γ, the planned number of steps; :meth:`set_progress` also sets it. Until the first
        ``set_progress`` call, t = 0.
    B : float, default 12.0
        Sharpness of g(t), > 0 (the authors use 8-16, smaller for more noise).
    r : float, default 0.5
        Fraction of training at which g(t) = 0.5, in [0, 1].
    trust : {"entropy", "max"}, default "entropy"
        Example trust l(p_T).
    temperature : float, default 0.5
        T > 0 of the self knowledge p_T; T < 1 sharpens it (the annealed temperature).
    weighting : Weighting, optional
        DM weighting that sets each example's gradient magnitude.
    normalization : str, optional
        With ``weighting`` only: one of :data:`NORMALIZATIONS`, default "batch_sum".
    reduction : {"mean", "sum", "none"}, optional
        Without ``weighting`` only; default "mean".
    ramp : float, default 0.0
        With ``weighting`` only: emphasis ramp as in :class:`DMLoss`.
    eps : float, default 1e-8
        Added to ``‖p_i - q̃_i‖₁`` with ``weighting``.
    """

    def __init__(
        self,
        total_iterations: int | None = None,
        B: float = 12.0,
        r: float = 0.5,
        trust: str = "entropy",
        temperature: float = 0.5,
        weighting: Weighting | None = None,
        *,
        normalization: str | None = None,
        reduction: str | None = None,
        ramp: float = 0.0,
        eps: float = _DEFAULT_EPS,
    ) -> None:
        super().__init__()
        if total_iterations is not None and int(total_iterations) < 1:
            raise ConfigError(f"total_iterations must be >= 1, got {total_iterations}")
        self.total_iterations = None if total_iterations is None else int(total_iterations)
        self.iteration = 0
        self.B = _positive("B", B)
        self.r = _unit_interval("r", r)
        self.trust = _choice("trust", trust, ("entropy", "max"))
        self.temperature = _positive("temperature", temperature)
        self.eps = _positive("eps", eps)
        if weighting is None:
            if normalization is not None or ramp:
                raise ConfigError("normalization and ramp apply only with a weighting")
            self.weighting = None
            self.normalization = None
            self.ramp = 0.0
            self._scale, self._scaled = 1.0, None
            self.reduction = _choice("reduction", reduction or "mean", REDUCTIONS)
        else:
            if reduction is not None:
                raise ConfigError("reduction applies without a weighting; use normalization")
            self.reduction = None
            self._init_emphasis(weighting, normalization or "batch_sum", ramp)

    def g(self) -> float:
        """Global trust g(t) in (0, 1) at the current progress.

        Returns
        -------
        float
            ``1 / (1 + exp(-B (t/Γ - r)))``; 0.5 at t = r Γ.
        """
        fraction = self.iteration / self.total_iterations if self.total_iterations else 0.0
        x = self.B * (fraction - self.r)
        # Written to avoid overflow of exp for large |x|.
        return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))

    def _on_progress(self, iteration: int, total_iterations: int) -> None:
        self.iteration = iteration
        self.total_iterations = total_iterations
        if self.weighting is not None:
            self._ramp_progress(iteration, total_iterations)

    def forward(self, logits: Tensor, targets: Tensor) -> LossOutput:
        """Compute the loss against the corrected target.

        Parameters
        ----------
        logits : torch.Tensor, shape (B, C)
            Unnormalised scores.
        targets : torch.Tensor, shape (B,)
            Given labels, integer codes in 0..C-1.

        Returns
        -------
        LossOutput
            ``loss`` () (or (B,) for ``reduction="none"``), ``p_given`` (B,), ``weights`` (B,):
            ‖p_i - q̃_i‖₁, or the DM weight w(p̃_i) with a weighting; extras "epsilon" (B,),
            "g" (), "l" (B,), "target" (B, C), and "p_target" (B,) = p̃_i with a weighting.
        """
        batch = _prepare(logits, targets)
        with torch.no_grad():
            log_p_t = F.log_softmax(batch.logits.detach() / self.temperature, dim=1)
            p_t = log_p_t.exp()
            if self.trust == "entropy":
                entropy = -(p_t * log_p_t).sum(dim=1)
                # One class: H(u) = 0 and the prediction is certain, so l = 1.
                h_uniform = math.log(batch.n_classes)
                trust = 1.0 - entropy / h_uniform if h_uniform > 0 else torch.ones_like(entropy)
            else:
                trust = p_t.max(dim=1).values
            trust = trust.clamp(0.0, 1.0)
            g = torch.tensor(self.g(), dtype=trust.dtype, device=trust.device)
            epsilon = g * trust
            target = (1.0 - epsilon)[:, None] * batch.onehot() + epsilon[:, None] * p_t
            p = batch.log_p.exp()
        per_example = -(target * batch.log_p).sum(dim=1)
        extras = {"epsilon": epsilon, "g": g, "l": trust, "target": target}
        if self.weighting is None:
            with torch.no_grad():
                weights = (p - target).abs().sum(dim=1)
            loss = _reduce(per_example, self.reduction)
            return LossOutput(loss, batch.p_given(), weights, extras)
        with torch.no_grad():
            p_target = (target * p).sum(dim=1)
            weighting = self.current_weighting
            weights = weighting(p_target)
            w_hat = _normalise_weights(weights, self.normalization, weighting)
            # The L1 norm of exactly the vector autograd produces (p Σq̃ - q̃), so the ratio below
            # scales it to ŵ_i without rounding surprises when p ≈ q̃.
            direction = p * target.sum(dim=1, keepdim=True) - target
            coef = w_hat / (direction.abs().sum(dim=1) + self.eps)
        extras.update(p_target=p_target, normalised_weights=w_hat)
        return LossOutput((coef * per_example).sum(), batch.p_given(), weights, extras)

    def extra_repr(self) -> str:
        text = (
            f"total_iterations={self.total_iterations}, B={self.B}, r={self.r}, "
            f"trust={self.trust}, temperature={self.temperature}"
        )
        if self.weighting is not None:
            text += ", " + self._dm_extra_repr()
        return text


# --------------------------------------------------------------------------- factory


def _build_dm(
    *,
    variant: str = "dm",
    normalization: str = "batch_sum",
    ramp: float = 0.0,
    eps: float = _DEFAULT_EPS,
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
    eps: float = _DEFAULT_EPS,
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
