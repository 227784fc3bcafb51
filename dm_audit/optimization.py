"""The optimisation recipe: optimizer, per-iteration learning-rate schedule, and the loss.

Learning-rate schedules are evaluated per iteration: cosine decays smoothly within epochs; the
step schedule multiplies by ``step_gamma`` at the epoch boundaries given by ``step_milestones``
(fractions of ``epochs``); an optional linear warm-up spans ``warmup_epochs``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dm_audit.losses import create_loss
from dm_audit.train_config import TrainConfig

__all__ = ["LRSchedule", "build_loss", "make_optimizer"]


class LRSchedule:
    """Per-iteration learning-rate factor, for ``torch.optim.lr_scheduler.LambdaLR``.

    A callable object rather than a function, so that LambdaLR checkpoints it: its attributes
    (their names included) are part of every checkpoint's ``scheduler`` entry.
    """

    def __init__(self, config: TrainConfig, iters_per_epoch: int) -> None:
        self.kind = config.schedule
        self.total = config.epochs * iters_per_epoch
        self.per_epoch = iters_per_epoch
        self.warmup = round(config.warmup_epochs * iters_per_epoch)
        self.milestones = [round(m * config.epochs) for m in config.step_milestones]
        self.gamma = config.step_gamma
        self.scale = 1.0  # lowered by a collapse recovery for losses without emphasis

    def __call__(self, it: int) -> float:
        if it < self.warmup:
            return self.scale * (it + 1) / self.warmup
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            t = min(1.0, (it - self.warmup) / span)
            factor = 0.5 * (1.0 + math.cos(math.pi * t))
        elif self.kind == "step":
            epoch = it // self.per_epoch
            factor = self.gamma ** sum(epoch >= m for m in self.milestones)
        else:
            factor = 1.0
        return self.scale * factor


def make_optimizer(model: nn.Module, config: TrainConfig, n_examples: int) -> torch.optim.Optimizer:
    """The optimizer of ``config`` over ``model``'s parameters, at the peak learning rate."""
    lr = config.peak_lr
    weight_decay = config.resolved_weight_decay(model, n_examples)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=weight_decay,
        )
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=lr, weight_decay=weight_decay)


def build_loss(
    name: str, params: dict[str, Any], ramp: float, total_iters: int
) -> tuple[nn.Module, dict[str, Any]]:
    """The loss ``name`` and the keyword arguments it was created with.

    The emphasis ramp goes to every loss with a rampable DM weighting: DM, IMAE and
    ProSelfLC+DM carry a ``ramp``; plain losses (and "-dn" ones) have none. ProSelfLC's clock
    runs over the whole training unless ``params`` set it.
    """
    kwargs = dict(params)
    if name == "proselflc":
        kwargs.setdefault("total_iterations", total_iters)
    loss = create_loss(name, **kwargs)
    weighting = getattr(loss, "weighting", None)
    if ramp > 0 and hasattr(loss, "ramp") and weighting is not None and weighting.scalable:
        kwargs["ramp"] = ramp
        loss = create_loss(name, **kwargs)
    return loss, kwargs
