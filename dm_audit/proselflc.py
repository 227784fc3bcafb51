"""ProSelfLC: progressive self label correction, optionally with DM's example weights.

The loss is the cross entropy against a target that moves from the given label towards the
model's own (temperature-sharpened) prediction as training progresses and as the prediction
grows confident. With a DM weighting the corrected target sets each example's gradient direction
and DM's weight (`dm_audit.dm_loss`) its magnitude.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dm_audit.dm_loss import DEFAULT_EPS, EmphasisRamp, normalise_weights
from dm_audit.emphasis import Weighting
from dm_audit.errors import ConfigError
from dm_audit.loss_base import (
    REDUCTIONS,
    LabelLoss,
    LossOutput,
    check_choice,
    check_positive,
    check_unit_interval,
    prepare_batch,
    reduce_losses,
)

__all__ = ["ProSelfLCLoss"]


class ProSelfLCLoss(EmphasisRamp, LabelLoss):
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
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        if total_iterations is not None and int(total_iterations) < 1:
            raise ConfigError(f"total_iterations must be >= 1, got {total_iterations}")
        self.total_iterations = None if total_iterations is None else int(total_iterations)
        self.iteration = 0
        self.B = check_positive("B", B)
        self.r = check_unit_interval("r", r)
        self.trust = check_choice("trust", trust, ("entropy", "max"))
        self.temperature = check_positive("temperature", temperature)
        self.eps = check_positive("eps", eps)
        if weighting is None:
            if normalization is not None or ramp:
                raise ConfigError("normalization and ramp apply only with a weighting")
            self.weighting = None
            self.normalization = None
            self.ramp = 0.0
            self._scale, self._scaled = 1.0, None
            self.reduction = check_choice("reduction", reduction or "mean", REDUCTIONS)
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
        batch = prepare_batch(logits, targets)
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
            loss = reduce_losses(per_example, self.reduction)
            return LossOutput(loss, batch.p_given(), weights, extras)
        with torch.no_grad():
            p_target = (target * p).sum(dim=1)
            weighting = self.current_weighting
            weights = weighting(p_target)
            w_hat = normalise_weights(weights, self.normalization, weighting)
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
