"""Options of one training run (`TrainConfig`), validated on construction.

Default recipe (SGD, lr 0.1, Nesterov momentum 0.9, cosine, batch 128, 100 epochs, emphasis
ramp 0.2; weight decay by model family, see :meth:`TrainConfig.resolved_weight_decay`). On
scikit-learn's digits with 40% symmetric label noise, an MLP (2 x 256, BatchNorm) trained this
way with CCE memorises the noisy labels (noisy-subset fit ~1.0, test accuracy ~0.67) while DM
with lambda = 1, beta = 16 fits ~13% of them and tests ~0.90. The weight decay is what makes
the difference for DM on an MLP: it keeps clean examples' p_i below saturation, where DM's
weights exceed those of the noisy examples (near p_i = 0 and p_i = 1 every DM weight is ~1);
with Adam and a small decay DM memorises too (noisy-subset fit ~0.8).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from dm_audit.checkpoints import plain
from dm_audit.devices import DEVICE_PATTERN
from dm_audit.errors import ConfigError
from dm_audit.models import MLP, CifarResNet, list_models

__all__ = ["MLP_DECAY_ROWS", "MLP_WEIGHT_DECAY", "TrainConfig"]

_DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}
# The MLP recipe's weight decay, and the table size up to which it applies in full. Above it the
# decay shrinks as 1/N: on a synthetic 50,000-row table with 20 % noise the full 2e-2 held the
# audit model at 0.71 test accuracy (detection F1 0.58), 2e-3 gave 0.97 (F1 0.94).
MLP_WEIGHT_DECAY = 2e-2
MLP_DECAY_ROWS = 5_000


@dataclass
class TrainConfig:
    """Options of one training run. Every field is validated on construction.

    Attributes
    ----------
    model : str
        Name for :func:`dm_audit.models.create_model` ("auto": mlp / resnet20 / resnet18).
    model_params : dict
        Architecture options (mlp: ``hidden``, ``batchnorm``, ``dropout``; CIFAR ResNets:
        ``shortcut``).
    weights_path : str or None
        Local pretrained state dict (resnet18 / resnet50 only).
    loss : str
        Name for ``dm_audit.losses.create_loss`` ("dm", "cce", "imae", "proselflc", ...).
    loss_params : dict
        Keyword arguments of the loss (e.g. ``{"lam": 1.0, "beta": 16.0}`` for "dm").
    epochs : int
        Passes over the training set.
    batch_size : int
        Examples per step (>= 2: BatchNorm needs two).
    optimizer : {"sgd", "adam", "adamw"}
        "sgd" and "adam" add ``weight_decay`` to the gradient (L2); "adamw" decays decoupled.
    lr : float or None
        Peak learning rate; None: 0.1 for sgd, 1e-3 for adam/adamw.
    momentum : float
        SGD momentum (Adam keeps its default betas).
    nesterov : bool
        Nesterov momentum for SGD.
    weight_decay : float or None
        L2 penalty (decoupled for adamw); None: the recipe's value for the model family (see
        :meth:`resolved_weight_decay`).
    schedule : {"cosine", "step", "none"}
        Learning-rate schedule, evaluated per iteration.
    warmup_epochs : float
        Linear warm-up length in epochs (0: none).
    step_milestones : tuple of float
        Fractions of ``epochs`` at which the step schedule multiplies the rate by ``step_gamma``.
    step_gamma : float
        Step schedule factor.
    augment : {"auto", "none", "crop_flip", "crop", "flip"}
        Image augmentation. "auto": pad-4 random crop + horizontal flip for colour images up to
        64 px, crop only for grayscale ones (flipping digits or letters changes their meaning),
        flip only for larger images; nothing for features.
    emphasis_ramp : float
        Fraction of training over which DM's lambda and beta grow linearly from 0 (passed to
        the "dm" loss as ``ramp``).
    device : str
        "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps".
    amp : {"auto", "off", "bf16", "fp16"}
        Mixed precision. CUDA: "auto" is bf16 where supported, else fp16 with a gradient
        scaler. CPU: "auto" is bf16 for convolutional networks on a CPU with native bf16
        (`dm_audit.devices.amp_dtype`), float32 otherwise; "bf16" asks for it on any model.
    num_workers : int
        DataLoader workers for augmented images; -1: ``min(8, cpu_count)`` on CUDA, 0 elsewhere.
    seed : int
        Seeds model initialisation, batch order, augmentation and dropout.
    deterministic : bool
        Ask torch for deterministic algorithms during training (restored afterwards).
    collapse_guard : bool
        Roll back and reduce the emphasis when training collapses (see
        :mod:`dm_audit.collapse_guard`).
    collapse_retries : int
        Maximum number of recoveries.
    collapse_share : float
        Largest predicted-class share that counts as a collapse (when the labels are at least
        0.2 less concentrated and the balanced accuracy is at chance).
    dynamics_source : {"train", "eval"}
        Record p_i from the training forward passes (free) or from an eval-mode pass over the
        training set after each epoch (one extra forward pass per epoch).
    eval_batch_size : int
        Batch size of evaluation passes.
    progress : bool
        Show progress: a bar on a terminal, else a plain line every 30 s (`dm_audit.progress`).
    progress_label : str
        The progress bar's label (default: "train <loss>").
    """

    model: str = "auto"
    model_params: dict[str, Any] = field(default_factory=dict)
    weights_path: str | None = None
    loss: str = "dm"
    loss_params: dict[str, Any] = field(default_factory=dict)
    epochs: int = 100
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    step_milestones: tuple[float, ...] = (0.5, 0.75)
    step_gamma: float = 0.1
    augment: str = "auto"
    emphasis_ramp: float = 0.2
    device: str = "auto"
    amp: str = "auto"
    num_workers: int = -1
    seed: int = 0
    deterministic: bool = True
    collapse_guard: bool = True
    collapse_retries: int = 3
    collapse_share: float = 0.9
    dynamics_source: str = "train"
    eval_batch_size: int = 1024
    progress: bool = True
    progress_label: str = ""

    def __post_init__(self) -> None:
        self.step_milestones = tuple(float(m) for m in self.step_milestones)
        self.validate()

    @property
    def peak_lr(self) -> float:
        """``lr``, or the optimizer's default when ``lr`` is None."""
        return float(self.lr) if self.lr is not None else _DEFAULT_LR[self.optimizer]

    def resolved_weight_decay(self, model: nn.Module, n_examples: int | None = None) -> float:
        """``weight_decay``, or the recipe's value for ``model``'s family when it is None.

        SGD/Adam (L2): for MLPs 2e-2 up to `MLP_DECAY_ROWS` training examples (strong enough
        that an emphasis loss cannot memorise noisy labels on a small feature table, see the
        module docstring) and 2e-2 · `MLP_DECAY_ROWS` / N above, since more data regularise by
        themselves; 5e-4 for CIFAR ResNets, 1e-4 for torchvision ResNets (the DM/GR papers'
        fine-tuning value); AdamW: 0.05.
        """
        if self.weight_decay is not None:
            return float(self.weight_decay)
        if self.optimizer == "adamw":
            return 0.05
        if isinstance(model, MLP):
            if n_examples is None or n_examples <= MLP_DECAY_ROWS:
                return MLP_WEIGHT_DECAY
            return MLP_WEIGHT_DECAY * MLP_DECAY_ROWS / n_examples
        if isinstance(model, CifarResNet):
            return 5e-4
        return 1e-4

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        if self.model not in list_models():
            raise ConfigError(
                f"TrainConfig.model must be one of {list_models()}, got {self.model!r}"
            )
        for name in ("model_params", "loss_params"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ConfigError(f"TrainConfig.{name} must be a dict with string keys")
        if "ramp" in self.loss_params:
            raise ConfigError(
                "set the emphasis ramp with TrainConfig.emphasis_ramp, not loss_params"
            )
        if not isinstance(self.loss, str) or not self.loss:
            raise ConfigError(f"TrainConfig.loss must be a loss name, got {self.loss!r}")
        if self.weights_path is not None and not isinstance(self.weights_path, str | os.PathLike):
            raise ConfigError("TrainConfig.weights_path must be a path or None")
        _integer(self, "epochs", 1)
        _integer(self, "batch_size", 2)
        _choice(self, "optimizer", tuple(_DEFAULT_LR))
        if self.lr is not None:
            _number(self, "lr", 0.0, 10.0, low_open=True)
        _number(self, "momentum", 0.0, 0.999)
        _boolean(self, "nesterov")
        if self.nesterov and self.optimizer == "sgd" and self.momentum == 0:
            raise ConfigError("TrainConfig.nesterov needs momentum > 0")
        if self.weight_decay is not None:
            _number(self, "weight_decay", 0.0, 1.0)
        _choice(self, "schedule", ("cosine", "step", "none"))
        _number(self, "warmup_epochs", 0.0, float(self.epochs))
        if self.warmup_epochs >= self.epochs:
            raise ConfigError("TrainConfig.warmup_epochs must be shorter than epochs")
        ms = self.step_milestones
        if any(not 0.0 < m < 1.0 for m in ms) or list(ms) != sorted(set(ms)):
            raise ConfigError(
                f"TrainConfig.step_milestones must be increasing fractions in (0, 1), got {ms}"
            )
        _number(self, "step_gamma", 0.0, 1.0, low_open=True)
        _choice(self, "augment", ("auto", "none", "crop_flip", "crop", "flip"))
        _number(self, "emphasis_ramp", 0.0, 1.0)
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(
                f"TrainConfig.device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', "
                f"got {self.device!r}"
            )
        _choice(self, "amp", ("auto", "off", "bf16", "fp16"))
        _integer(self, "num_workers", -1)
        _integer(self, "seed", 0)
        _boolean(self, "deterministic")
        _boolean(self, "collapse_guard")
        _integer(self, "collapse_retries", 0)
        _number(self, "collapse_share", 0.5, 1.0, low_open=True)
        _choice(self, "dynamics_source", ("train", "eval"))
        _integer(self, "eval_batch_size", 1)
        _boolean(self, "progress")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON- and checkpoint-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["step_milestones"] = list(self.step_milestones)
        if out["weights_path"] is not None:
            out["weights_path"] = str(out["weights_path"])
        return plain(out)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**values)


# Field checks of `TrainConfig.validate`: each raises a ConfigError naming the field.


def _choice(config: TrainConfig, name: str, options: Sequence[str]) -> None:
    value = getattr(config, name)
    if value not in options:
        raise ConfigError(f"TrainConfig.{name} must be one of {list(options)}, got {value!r}")


def _integer(config: TrainConfig, name: str, low: int) -> None:
    value = getattr(config, name)
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
        raise ConfigError(f"TrainConfig.{name} must be an integer >= {low}, got {value!r}")


def _number(
    config: TrainConfig, name: str, low: float, high: float, *, low_open: bool = False
) -> None:
    value = getattr(config, name)
    ok = isinstance(value, int | float | np.floating) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value > low if low_open else value >= low)
    if not (ok and value <= high):
        bracket = "(" if low_open else "["
        raise ConfigError(
            f"TrainConfig.{name} must be a number in {bracket}{low:g}, {high:g}], got {value!r}"
        )


def _boolean(config: TrainConfig, name: str) -> None:
    if not isinstance(getattr(config, name), bool):
        raise ConfigError(f"TrainConfig.{name} must be True or False")
