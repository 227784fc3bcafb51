"""What every training loss shares: its output, its base class, and the checks of its inputs.

Every loss of `dm_audit.losses` is a `LabelLoss`: an ``nn.Module`` with ``forward(logits (B, C),
targets (B,)) -> LossOutput`` and ``set_progress(iteration, total_iterations)``. `prepare_batch`
validates a batch and computes its log-probabilities with ``log_softmax`` (float32 at least, also
under mixed precision), so logits of ±1e4 and p_i of exactly 0 or 1 give finite losses and
gradients; `reduce_losses` reduces per-example losses over the (global) batch; the ``check_*``
functions validate the losses' options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dm_audit.distributed import global_batch_size
from dm_audit.errors import ConfigError, DataError

__all__ = [
    "REDUCTIONS",
    "Batch",
    "LabelLoss",
    "LossOutput",
    "check_choice",
    "check_number",
    "check_positive",
    "check_unit_interval",
    "prepare_batch",
    "reduce_losses",
]

REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
"""How a loss without DM weighting reduces per-example losses."""


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


# --------------------------------------------------------------------------- checks


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    """`value` if it is one of `allowed`, else a ConfigError naming the option."""
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def check_number(name: str, value: object) -> float:
    """`value` as a float, or a ConfigError naming the option."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


def check_unit_interval(name: str, value: float) -> float:
    """`value` as a float in [0, 1], or a ConfigError naming the option."""
    value = check_number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must lie in [0, 1], got {value:g}")
    return value


def check_positive(name: str, value: float) -> float:
    """`value` as a finite float > 0, or a ConfigError naming the option."""
    value = check_number(name, value)
    if not (math.isfinite(value) and value > 0.0):
        raise ConfigError(f"{name} must be a positive number, got {value:g}")
    return value


# --------------------------------------------------------------------------- batch and base class


@dataclass
class Batch:
    """A validated batch and its log-probabilities (`prepare_batch`)."""

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


def prepare_batch(logits: Tensor, targets: Tensor) -> Batch:
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
    return Batch(logits, targets, log_p, log_p_given)


def reduce_losses(per_example: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        # Under data-parallel training the mean is over the global batch of all processes.
        total = global_batch_size(per_example.shape[0])
        return per_example.mean() if total is None else per_example.sum() / total
    if reduction == "sum":
        return per_example.sum()
    return per_example


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
