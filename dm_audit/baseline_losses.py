"""The common losses that DM is compared with: losses of p_i alone and target modification.

* **Losses of p_i** (CCE, MAE, MSE, GCE): the gradient w.r.t. the logits is
  ``c_i (p - onehot(y_i))`` and only its L1 magnitude, the example's weight ``w(p_i)``, differs
  between them. With ``dn=True`` (the "-dn" names of `dm_audit.losses.create_loss`) the curve's
  emphasis density function drives a `dm_audit.dm_loss.DMLoss` instead.
* **Target modification** (label smoothing, confidence penalty, soft and hard bootstrapping):
  the cross entropy ``-Σ_j q̃_ij log p_ij`` against a modified target ``q̃``; the weight reported
  is the gradient's L1 norm ``‖p_i - q̃_i‖₁``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dm_audit.dm_loss import DMLoss
from dm_audit.emphasis import Weighting, create_weighting, edf
from dm_audit.errors import ConfigError
from dm_audit.loss_base import (
    REDUCTIONS,
    Batch,
    LabelLoss,
    LossOutput,
    check_choice,
    check_number,
    check_unit_interval,
    prepare_batch,
    reduce_losses,
)

__all__ = [
    "BootHardLoss",
    "BootSoftLoss",
    "CCELoss",
    "ConfidencePenaltyLoss",
    "GCELoss",
    "LabelSmoothingLoss",
    "MAELoss",
    "MSELoss",
]


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
            self.reduction = check_choice("reduction", reduction or "mean", REDUCTIONS)
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
        batch = prepare_batch(logits, targets)
        p_given = batch.p_given()
        per_example = self._per_example(batch.log_p_given)
        return LossOutput(
            reduce_losses(per_example, self.reduction), p_given, self.weighting(p_given)
        )

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
        q = check_number("q", q)
        if not 0.0 < q <= 1.0:
            raise ConfigError(f"GCE's q must lie in (0, 1], got {q:g}")
        super().__init__(
            create_weighting("gce", q=q), dn=dn, reduction=reduction, normalization=normalization
        )
        self.q = q

    def _per_example(self, log_p_given: Tensor) -> Tensor:
        return -torch.expm1(self.q * log_p_given) / self.q


class _TargetLoss(LabelLoss):
    """Cross entropy ``-Σ_j q̃_ij log p_ij`` against a detached modified target ``q̃`` (B, C)."""

    def __init__(self, eps: float, reduction: str) -> None:
        super().__init__()
        self.eps = check_unit_interval("eps", eps)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def _target(self, batch: Batch, p: Tensor) -> Tensor:  # pragma: no cover
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
        batch = prepare_batch(logits, targets)
        with torch.no_grad():
            p = batch.log_p.exp()
            target = self._target(batch, p)
            weights = (p - target).abs().sum(dim=1)
        per_example = -(target * batch.log_p).sum(dim=1)
        return LossOutput(
            reduce_losses(per_example, self.reduction), batch.p_given(), weights, {"target": target}
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

    def _target(self, batch: Batch, p: Tensor) -> Tensor:
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

    def _target(self, batch: Batch, p: Tensor) -> Tensor:
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

    def _target(self, batch: Batch, p: Tensor) -> Tensor:
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
        self.eps = check_unit_interval("eps", eps)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

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
        batch = prepare_batch(logits, targets)
        p = batch.log_p.exp()
        entropy = -(p * batch.log_p).sum(dim=1)
        per_example = (1.0 - self.eps) * -batch.log_p_given - self.eps * entropy
        with torch.no_grad():
            grad = (1.0 - self.eps) * (p - batch.onehot()) + self.eps * p * (
                batch.log_p + entropy[:, None]
            )
            weights = grad.abs().sum(dim=1)
        return LossOutput(
            reduce_losses(per_example, self.reduction),
            batch.p_given(),
            weights.detach(),
            {"entropy": entropy.detach()},
        )

    def extra_repr(self) -> str:
        return f"eps={self.eps}, reduction={self.reduction}"
