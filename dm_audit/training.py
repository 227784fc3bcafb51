"""Training engine: one configurable, resumable, reproducible training loop for every loss.

The loop follows torchvision's reference scripts: an epoch of optimisation, an evaluation, a
checkpoint dict (model, optimizer, scheduler, epoch, config, RNG states, history, dynamics)
written atomically every epoch so that ``resume=True`` continues to bit-identical weights on CPU.

Three things are specific to training with an emphasis (DM) loss:

* **Progress.** The loss's ``set_progress(iteration, total_iterations)`` is called before every
  step: DM ramps its emphasis (lambda, beta) up over the first ``emphasis_ramp`` fraction of
  training, ProSelfLC grows its correction over time.
* **Collapse guard.** A large emphasis can make a network give up on whole classes or predict
  one class for everything: examples whose p_i is near 0 weigh e^{beta/4}-fold less than those
  near the emphasis mode, so a class that falls behind early never catches up. After every
  epoch the training-pass predictions are checked: a non-finite loss; one class taking more
  than ``collapse_share`` of the predictions while the labels are far more spread and the
  predictions tell the classes apart no better than chance; and, once the emphasis ramp is over
  and from the second epoch on, classes holding >= 20% of the labels that the network has given
  up on (it almost never predicts them and gives their examples less than half the uniform
  probability), or a balanced accuracy (mean per-class recall on the given labels) no better
  than chance, which is 1/C for any predictor that ignores its input, however imbalanced the
  labels (see :func:`dm_audit.metrics.balanced_accuracy_vs_chance`). A symptom that persists
  for two consecutive epochs is a collapse (divergence counts at once). With ``collapse_guard``
  the run then rolls back to the last epoch that passed every check (the initial weights if none
  did), halves the emphasis parameters (lambda, beta, T; the learning rate for a loss without
  any), doubles the ramp (at least 0.25) and goes on, at most ``collapse_retries`` times. Every
  detection is recorded in ``FitResult.events`` and in the history (``collapsed`` /
  ``discarded`` flags).
* **Dynamics.** Every example's p_i at every epoch is stored (see :mod:`dm_audit.dynamics`).

Data pipeline: feature tables and un-augmented images are batched from in-memory tensors
(index slicing, no DataLoader: several times faster on CPU); augmented images go through a
DataLoader whose dataset applies ``torchvision.transforms.v2`` per example on uint8 tensors. The
conversion to float and the standardisation (:func:`prepare_batch`) run on the training device,
so uint8 images cross the bus at a quarter of the float size.

Default recipe (SGD, lr 0.1, Nesterov momentum 0.9, cosine, batch 128, 100 epochs, emphasis
ramp 0.2; weight decay by model family, see :meth:`TrainConfig.resolved_weight_decay`). On
scikit-learn's digits with 40% symmetric label noise, an MLP (2 x 256, BatchNorm) trained this
way with CCE memorises the noisy labels (noisy-subset fit ~1.0, test accuracy ~0.67) while DM
with lambda = 1, beta = 16 fits ~13% of them and tests ~0.90. The weight decay is what makes
the difference for DM on an MLP: it keeps clean examples' p_i below saturation, where DM's
weights exceed those of the noisy examples (near p_i = 0 and p_i = 1 every DM weight is ~1);
with Adam and a small decay DM memorises too (noisy-subset fit ~0.8).

Learning-rate schedules are evaluated per iteration: cosine decays smoothly within epochs; the
step schedule multiplies by ``step_gamma`` at the epoch boundaries given by ``step_milestones``
(fractions of ``epochs``); an optional linear warm-up spans ``warmup_epochs``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import itertools
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from dm_audit import distributed
from dm_audit.atomic import atomic_write
from dm_audit.dynamics import TrainingDynamics
from dm_audit.errors import ConfigError, DataError
from dm_audit.metrics import balanced_accuracy_vs_chance, six_metrics
from dm_audit.models import MLP, AuditModel, CifarResNet, create_model, list_models
from dm_audit.progress import progress_bar

__all__ = [
    "CHECKPOINT_NAME",
    "FitResult",
    "TrainConfig",
    "fit",
    "predict_proba",
    "prepare_batch",
    "resolve_device",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
_CHECKPOINT_FORMAT = "dm_audit.checkpoint"
_CHECKPOINT_VERSION = 1
# Config fields that cannot change the trained weights: a checkpoint may differ in them.
_RESUME_IGNORED_FIELDS = frozenset({"progress", "progress_label", "eval_batch_size"})
_DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}
# The MLP recipe's weight decay, and the table size up to which it applies in full. Above it the
# decay shrinks as 1/N: on a synthetic 50,000-row table with 20 % noise the full 2e-2 held the
# audit model at 0.71 test accuracy (detection F1 0.58), 2e-3 gave 0.97 (F1 0.94).
MLP_WEIGHT_DECAY = 2e-2
MLP_DECAY_ROWS = 5_000
# Emphasis parameters a collapse recovery halves (dm/normal/exponential: beta, lam/psi; imae: T;
# ProSelfLC combined with DM: dm_lam, dm_beta).
_EMPHASIS_KEYS = ("lam", "beta", "psi", "T", "dm_lam", "dm_beta")
# In-memory tensors above this size stay in host memory and are copied per batch.
_DEVICE_DATA_LIMIT = 1 << 30
_STATS_SAMPLE = 20000
# A collapse: classes the network (almost) never predicts hold at least this share of the labels.
_DEAD_CLASS_SHARE = 0.2


# ============================================================================================
# configuration


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
        Mixed precision on CUDA ("auto": bf16 where supported, else fp16 with a gradient
        scaler); ignored on other devices.
    num_workers : int
        DataLoader workers for augmented images; -1: ``min(8, cpu_count)`` on CUDA, 0 elsewhere.
    seed : int
        Seeds model initialisation, batch order, augmentation and dropout.
    deterministic : bool
        Ask torch for deterministic algorithms during training (restored afterwards).
    collapse_guard : bool
        Roll back and reduce the emphasis when training collapses (see the module docstring).
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

        def choice(name: str, options: Sequence[str]) -> None:
            value = getattr(self, name)
            if value not in options:
                raise ConfigError(
                    f"TrainConfig.{name} must be one of {list(options)}, got {value!r}"
                )

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= {low}, got {value!r}")

        def number(name: str, low: float, high: float, *, low_open: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, int | float | np.floating) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and (value > low if low_open else value >= low)
            if not (ok and value <= high):
                bracket = "(" if low_open else "["
                raise ConfigError(
                    f"TrainConfig.{name} must be a number in {bracket}{low:g}, {high:g}], "
                    f"got {value!r}"
                )

        def boolean(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"TrainConfig.{name} must be True or False")

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
        integer("epochs", 1)
        integer("batch_size", 2)
        choice("optimizer", tuple(_DEFAULT_LR))
        if self.lr is not None:
            number("lr", 0.0, 10.0, low_open=True)
        number("momentum", 0.0, 0.999)
        boolean("nesterov")
        if self.nesterov and self.optimizer == "sgd" and self.momentum == 0:
            raise ConfigError("TrainConfig.nesterov needs momentum > 0")
        if self.weight_decay is not None:
            number("weight_decay", 0.0, 1.0)
        choice("schedule", ("cosine", "step", "none"))
        number("warmup_epochs", 0.0, float(self.epochs))
        if self.warmup_epochs >= self.epochs:
            raise ConfigError("TrainConfig.warmup_epochs must be shorter than epochs")
        ms = self.step_milestones
        if any(not 0.0 < m < 1.0 for m in ms) or list(ms) != sorted(set(ms)):
            raise ConfigError(
                f"TrainConfig.step_milestones must be increasing fractions in (0, 1), got {ms}"
            )
        number("step_gamma", 0.0, 1.0, low_open=True)
        choice("augment", ("auto", "none", "crop_flip", "crop", "flip"))
        number("emphasis_ramp", 0.0, 1.0)
        if not isinstance(self.device, str) or not _DEVICE_RE.fullmatch(self.device):
            raise ConfigError(
                f"TrainConfig.device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', "
                f"got {self.device!r}"
            )
        choice("amp", ("auto", "off", "bf16", "fp16"))
        integer("num_workers", -1)
        integer("seed", 0)
        boolean("deterministic")
        boolean("collapse_guard")
        integer("collapse_retries", 0)
        number("collapse_share", 0.5, 1.0, low_open=True)
        choice("dynamics_source", ("train", "eval"))
        integer("eval_batch_size", 1)
        boolean("progress")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON- and checkpoint-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["step_milestones"] = list(self.step_milestones)
        if out["weights_path"] is not None:
            out["weights_path"] = str(out["weights_path"])
        return _plain(out)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**values)


_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes
    ----------
    model : AuditModel
        The trained model, in eval mode, on the training device.
    history : list of dict
        One entry per epoch run (see :func:`fit`); entries of epochs undone by a collapse
        recovery stay, flagged ``discarded``.
    dynamics : TrainingDynamics
        p_i of every training example at every epoch of the final trajectory.
    events : list of dict
        Collapse detections and recoveries, and resumptions.
    config : TrainConfig
        The configuration the run used.
    loss_params : dict
        The loss parameters in force at the end (the configured ones, defaults filled in, unless
        a recovery reduced the emphasis).
    recipe : dict
        The resolved training recipe: ``model``, ``device``, ``amp``, ``optimizer``, ``lr``,
        ``weight_decay``, ``epochs``, ``batch_size``, ``iterations``.
    """

    model: AuditModel
    history: list[dict[str, Any]]
    dynamics: TrainingDynamics
    events: list[dict[str, Any]]
    config: TrainConfig
    loss_params: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)


# ============================================================================================
# devices and the data pipeline


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn a device string into a ``torch.device``, checking that it exists.

    Parameters
    ----------
    name : str or torch.device
        "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps".

    Raises
    ------
    ConfigError
        Unknown name, or a device this machine does not have.
    """
    if isinstance(name, torch.device):
        return name
    if not isinstance(name, str) or not _DEVICE_RE.fullmatch(name):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but MPS is not available")
    return torch.device(name)


def prepare_batch(model: AuditModel, x: torch.Tensor) -> torch.Tensor:
    """Turn a raw batch into the model's float input, on the batch's device.

    Parameters
    ----------
    model : AuditModel
        Supplies ``input_mean`` / ``input_std``.
    x : torch.Tensor
        Features, float ``(B, D)``, or images, uint8 ``(B, C, H, W)`` (any memory format).

    Returns
    -------
    torch.Tensor
        float32, standardised: ``(x - mean) / std`` (images first scaled to [0, 1]).
    """
    mean = model.input_mean.to(x.device)
    std = model.input_std.to(x.device)
    if x.ndim == 4:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return (x.float() - mean) / std


def _check_inputs(inputs: Any, name: str = "inputs") -> np.ndarray:
    x = np.asarray(inputs)
    if x.ndim == 2:
        if not np.issubdtype(x.dtype, np.number):
            raise DataError(f"{name}: features must be numeric, got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        bad = ~np.isfinite(x)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise DataError(f"{name}: non-finite feature value at row {row}, column {col}")
        return x
    if x.ndim == 4:
        if x.dtype != np.uint8:
            raise DataError(f"{name}: images must be uint8 (N, H, W, C), got dtype {x.dtype}")
        if x.shape[-1] not in (1, 3, 4):
            raise DataError(f"{name}: images must be (N, H, W, C) with C in 1, 3, 4; got {x.shape}")
        return x
    raise DataError(
        f"{name}: expected float features (N, D) or uint8 images (N, H, W, C), got shape {x.shape}"
    )


def _check_labels(
    labels: Any, n: int, num_classes: int, name: str, *, allow_open: bool
) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise DataError(f"{name}: expected shape ({n},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name}: labels must be integer codes, got dtype {y.dtype}")
    low = -1 if allow_open else 0
    bad = np.flatnonzero((y < low) | (y >= num_classes))
    if bad.size:
        raise DataError(
            f"{name}: row {bad[0]} has label {y[bad[0]]}, outside {low}..{num_classes - 1}"
        )
    return y.astype(np.int64)


def _n_batches(n: int, batch_size: int) -> int:
    # A last batch of one example is folded into the one before (BatchNorm needs two).
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > 1 or (rest == 1 and full == 0) else 0)


def _split_batches(perm: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    n = perm.numel()
    bounds = [min(n, i * batch_size) for i in range(_n_batches(n, batch_size))] + [n]
    return [perm[a:b] for a, b in itertools.pairwise(bounds)]


class _EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches from a seeded generator (its state is checkpointed).

    Under data-parallel training every rank draws the same permutation and yields its own
    slice of each global batch (:func:`dm_audit.distributed.shard`).
    """

    def __init__(
        self, n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1
    ) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(self.n, generator=self.generator)
        for batch in _split_batches(perm, self.batch_size):
            if self.world > 1:
                batch = distributed.shard(batch, self.rank, self.world)
            yield batch.tolist()

    def __len__(self) -> int:
        return _n_batches(self.n, self.batch_size)


class _AugmentedImages(Dataset):
    """uint8 NHWC images -> augmented uint8 CHW tensors (torchvision.transforms.v2)."""

    def __init__(self, images: np.ndarray, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        return self.transform(img), i


def _augmentation(
    kind: str, shape: tuple[int, ...]
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if len(shape) != 3:
        return None
    h, w, c = shape
    if kind == "auto":
        if max(h, w) <= 64:
            kind = "crop_flip" if c >= 3 else "crop"
        else:
            kind = "flip"
    if kind == "none":
        return None
    from torchvision.transforms import v2

    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if kind in ("crop_flip", "crop"):
        # CIFAR's 4-pixel shift, scaled down for smaller images: 4 px moves an 8x8 digit half
        # off its canvas and the network learns nothing (measured: test accuracy 0.24 vs 0.95).
        steps.append(v2.RandomCrop((h, w), padding=min(4, max(1, min(h, w) // 8))))
    if kind in ("crop_flip", "flip"):
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


class _TrainData:
    """Yields ``(indices, raw_x, y)`` batches on the device for one epoch."""

    def __init__(
        self,
        inputs: np.ndarray,
        labels: np.ndarray,
        device: torch.device,
        config: TrainConfig,
        generator: torch.Generator,
        dist_info: distributed.DistInfo | None = None,
    ) -> None:
        self.n = len(labels)
        self.device = device
        self.batch_size = config.batch_size
        self.generator = generator
        self.rank, self.world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
        # Sizes of the global batches of an epoch (a rank's local batches are slices of them).
        self.global_sizes = [len(b) for b in _split_batches(torch.arange(self.n), self.batch_size)]
        if self.world > 1 and min(self.global_sizes) < self.world:
            raise ConfigError(
                f"TrainConfig.batch_size {self.batch_size} on {self.n} examples leaves a batch of "
                f"{min(self.global_sizes)}, fewer than the {self.world} processes: every process "
                "needs at least one example per step"
            )
        self.labels = torch.from_numpy(labels).to(device)
        self.transform = _augmentation(config.augment, inputs.shape[1:])
        self.loader: DataLoader | None = None
        if self.transform is not None:
            workers = config.num_workers
            if workers < 0:
                workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
            # No persistent workers: each epoch draws the workers' seeds from the (restorable)
            # global torch RNG, which keeps augmentation reproducible across a resume.
            self.loader = DataLoader(
                _AugmentedImages(inputs, self.transform),
                batch_sampler=_EpochBatchSampler(
                    self.n, self.batch_size, generator, self.rank, self.world
                ),
                num_workers=workers,
                pin_memory=device.type == "cuda",
            )
            self.x = None
        else:
            x = torch.from_numpy(inputs)
            if x.ndim == 4:
                x = x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last strides
            if x.element_size() * x.nelement() <= _DEVICE_DATA_LIMIT or device.type == "cpu":
                self.x = x.to(device)
            else:
                self.x = x.pin_memory() if device.type == "cuda" else x

    def __len__(self) -> int:
        return _n_batches(self.n, self.batch_size)

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        nb = self.device.type == "cuda"
        if self.loader is not None:
            for xb, idx in self.loader:
                idx = idx.to(self.device, non_blocking=nb)
                yield idx, xb.to(self.device, non_blocking=nb), self.labels[idx]
            return
        assert self.x is not None
        perm = torch.randperm(self.n, generator=self.generator)
        for idx in _split_batches(perm, self.batch_size):
            if self.world > 1:
                idx = distributed.shard(idx, self.rank, self.world)
            if self.x.device == self.device:
                idx = idx.to(self.device, non_blocking=nb)
                xb = self.x[idx]
            else:
                xb = self.x[idx].to(self.device, non_blocking=nb)
                idx = idx.to(self.device, non_blocking=nb)
            yield idx, xb, self.labels[idx]


def _input_stats(inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardisation statistics: per feature ``(D,)`` or per image channel ``(C,)``."""
    step = max(1, len(inputs) // _STATS_SAMPLE)
    sample = inputs[::step]
    if inputs.ndim == 2:
        x = sample.astype(np.float64)
        mean, std = x.mean(axis=0), x.std(axis=0)
        # Each feature is scaled by its own spread, whatever its units: raw tables mix columns
        # of 1e-3 and 1e4, and a floor shared across features would flatten the small ones.
        # A feature constant up to rounding (spread below 1e-6 of its magnitude) is only
        # centred, so rounding noise is not blown up into signal.
        constant = std <= 1e-6 * np.maximum(np.abs(mean), np.finfo(np.float32).tiny)
        return mean.astype(np.float32), np.where(constant, 1.0, std).astype(np.float32)
    x = sample.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 1, 2))
    std = np.maximum(x.std(axis=(0, 1, 2)), 1e-3)
    return mean.astype(np.float32), std.astype(np.float32)


# ============================================================================================
# optimisation pieces


class _LRLambda:
    """Per-iteration learning-rate factor (a callable object, so LambdaLR checkpoints it)."""

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


def _make_optimizer(
    model: nn.Module, config: TrainConfig, n_examples: int
) -> torch.optim.Optimizer:
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


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or amp == "off":
        if amp in ("bf16", "fp16") and device.type != "cuda":
            log.info("mixed precision %s ignored on device %s", amp, device)
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _make_loss(name: str, params: dict[str, Any], ramp: float, total_iters: int) -> nn.Module:
    """Build the loss; the emphasis ramp goes to every loss with a rampable DM weighting."""
    from dm_audit.losses import create_loss

    kwargs = dict(params)
    if name == "proselflc":
        kwargs.setdefault("total_iterations", total_iters)
    loss = create_loss(name, **kwargs)
    weighting = getattr(loss, "weighting", None)
    # DM, IMAE and ProSelfLC+DM carry a `ramp`; plain losses (and "-dn" ones) have none.
    if ramp > 0 and hasattr(loss, "ramp") and weighting is not None and weighting.scalable:
        loss = create_loss(name, **kwargs, ramp=ramp)
    return loss


def _effective_emphasis(name: str, params: dict[str, Any], loss: nn.Module) -> dict[str, Any]:
    """``params`` plus the loss's defaulted emphasis parameters (so a recovery can halve them)."""
    out = dict(params)
    weighting = getattr(loss, "weighting", None)
    if weighting is not None and getattr(weighting, "params", None) is not None:
        for key, value in weighting.params.items():
            target = f"dm_{key}" if name == "proselflc" else key
            if key in _EMPHASIS_KEYS:
                out.setdefault(target, float(value))
    return out


def _emphasis_scale(loss: nn.Module) -> float | None:
    value = getattr(loss, "emphasis_scale", None)
    if isinstance(value, torch.Tensor):
        value = value.item()
    return None if value is None else float(value)


# ============================================================================================
# RNG state and checkpoints (weights_only-loadable: tensors, numbers, strings, lists, dicts)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - user code (transforms) may use the legacy global RNG
    torch.manual_seed(seed)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_version), "state": list(py_state), "gauss": py_gauss},
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    generator.set_state(state["generator"].cpu())
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            n["kind"],
            n["key"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def _plain(value: Any) -> Any:
    """Python scalars/containers only (numpy scalars would need weights_only=False)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def _data_fingerprint(inputs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    h = hashlib.sha256()
    h.update(labels.astype(np.int64).tobytes())
    step = max(1, len(inputs) // 4096)
    h.update(np.ascontiguousarray(inputs[::step]).tobytes())
    return {
        "n_examples": len(labels),
        "num_classes": int(num_classes),
        "input_shape": list(inputs.shape[1:]),
        "input_dtype": str(inputs.dtype),
        "sha256": h.hexdigest(),
    }


@contextlib.contextmanager
def _determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels for the duration of training, restored afterwards.

    CPU kernels are deterministic already; the switch matters on accelerators (and importing the
    machinery behind it costs seconds, so CPU runs skip it).
    """
    if device.type == "cpu":
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    if enabled:
        # cuBLAS reads this when it first initialises; harmless when already set.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]
        torch.backends.cudnn.deterministic = previous[3]


# ============================================================================================
# evaluation


@torch.inference_mode()
def _forward_all(
    model: AuditModel,
    inputs: np.ndarray,
    device: torch.device,
    batch_size: int,
    amp_dtype: torch.dtype | None = None,
    *,
    embeddings: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    was_training = model.training
    model.eval()
    # Filled in place (no list of batches to concatenate): at millions of rows a second copy
    # of the (N, E) embeddings would double the memory of the pass.
    n = len(inputs)
    probs = np.empty((n, model.head.out_features), dtype=np.float32)
    emb_all = np.empty((n, model.embedding_dim), dtype=np.float32) if embeddings else None
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        for start in range(0, len(inputs), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch_size]))
            if xb.ndim == 4:
                xb = xb.permute(0, 3, 1, 2)
            x = prepare_batch(model, xb.to(device, non_blocking=device.type == "cuda"))
            with autocast:
                emb = model.embed(x)
                logits = model.head(emb)
            stop = start + len(xb)
            probs[start:stop] = F.softmax(logits.float(), dim=1).cpu().numpy()
            if emb_all is not None:
                emb_all[start:stop] = emb.float().cpu().numpy()
    finally:
        model.train(was_training)
    return probs, emb_all


def predict_proba(
    model: AuditModel,
    inputs: np.ndarray,
    device: str | torch.device = "auto",
    batch_size: int = 1024,
    *,
    amp: str = "off",
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and embeddings of ``inputs`` in eval mode.

    Parameters
    ----------
    model : AuditModel
        A model from :func:`dm_audit.models.create_model` (moved to ``device``).
    inputs : array
        float features ``(N, D)`` or uint8 images ``(N, H, W, C)``.
    device : str or torch.device
        See :func:`resolve_device`.
    batch_size : int
        Examples per forward pass.
    amp : {"off", "auto", "bf16", "fp16"}
        Autocast on CUDA (results are returned in float32 either way).

    Returns
    -------
    probs : array (N, C) float32
        Softmax probabilities; rows sum to 1.
    embeddings : array (N, E) float32
        ``model.embed`` outputs.
    """
    x = _check_inputs(inputs)
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise DataError(
            f"inputs have shape {tuple(x.shape[1:])} per example; "
            f"the model takes {model.input_shape}"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    model.to(dev)
    probs, emb = _forward_all(model, x, dev, batch_size, _amp_dtype(amp, dev))
    assert emb is not None
    return probs, emb


# ============================================================================================
# the trainer


class _Trainer:
    """State and steps of one :func:`fit` call."""

    def __init__(
        self,
        inputs: np.ndarray,
        labels: np.ndarray,
        config: TrainConfig,
        num_classes: int,
        eval_set: tuple[np.ndarray, np.ndarray] | None,
        true_labels: np.ndarray | None,
        checkpoint_dir: Path | None,
    ) -> None:
        self.config = config
        self.inputs, self.labels_np = inputs, labels
        self.num_classes = num_classes
        self.eval_set = eval_set
        self.true_labels = true_labels
        self.checkpoint_path = checkpoint_dir / CHECKPOINT_NAME if checkpoint_dir else None
        self.dist = distributed.current()
        self.device = resolve_device(config.device)
        if self.dist is not None and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)  # one GPU per process
        self.amp_dtype = _amp_dtype(config.amp, self.device)
        self.n = len(labels)
        self.iters_per_epoch = _n_batches(self.n, config.batch_size)
        self.total_iters = config.epochs * self.iters_per_epoch
        self.fingerprint = _data_fingerprint(inputs, labels, num_classes)
        counts = np.bincount(labels, minlength=num_classes)
        self.label_freq = counts / self.n
        self.label_share = float(self.label_freq.max())

        _seed_everything(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.model = create_model(
            config.model,
            num_classes=num_classes,
            input_shape=inputs.shape[1:],
            weights_path=config.weights_path,
            **config.model_params,
        )
        if config.weights_path is None:
            self.model.set_input_stats(*_input_stats(inputs))
        self.model.to(self.device)
        if self.device.type == "cuda" and inputs.ndim == 4:
            self.model.to(memory_format=torch.channels_last)
        self.data = _TrainData(inputs, labels, self.device, config, self.generator, self.dist)
        # The module that runs the training forward pass: the model, or its DDP wrapper.
        self.net: nn.Module = self.model
        self.sync_group: Any = None
        self._bn_undo: list[tuple[nn.Module, str, nn.Module]] = []
        if self.dist is not None:
            self._wrap_ddp()
        self.optimizer = _make_optimizer(self.model, config, self.data.n)
        self.lr_lambda = _LRLambda(config, self.iters_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.guard: dict[str, Any] = {
            "attempt": 0,
            "loss_params": dict(config.loss_params),
            "ramp": float(config.emphasis_ramp),
            "lr_scale": 1.0,
        }
        self.loss_fn = self._build_loss()
        self.guard["loss_params"] = _effective_emphasis(
            config.loss, self.guard["loss_params"], self.loss_fn
        )
        self.dynamics = TrainingDynamics(self.n, config.epochs, source=config.dynamics_source)
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.epoch = 0  # completed epochs of the current trajectory
        self.global_iter = 0
        self.snapshot: dict[str, Any] | None = None

    # ---------------------------------------------------------------- pieces

    def _wrap_ddp(self) -> None:
        """DistributedDataParallel with BatchNorm statistics over the global batch."""
        from torch.nn.parallel import DistributedDataParallel

        # The loss's and BatchNorm's all-reduces get their own group, apart from DDP's
        # gradient buckets on the default group.
        self.sync_group = torch.distributed.new_group()
        self._bn_undo = distributed.convert_sync_batchnorm(self.model, self.device, self.sync_group)
        # Synchronised BatchNorm keeps every buffer identical on all ranks already: no
        # broadcast of the buffers before each forward pass (the option's name varies).
        options = inspect.signature(DistributedDataParallel).parameters
        no_sync = "forward_sync_buffers"
        if no_sync not in options:
            no_sync = "broadcast_buffers"
        self.net = DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            **{no_sync: False},
        )

    def unwrap(self) -> None:
        """Plain BatchNorm modules again (same tensors), for the model handed to the caller."""
        distributed.restore_batchnorm(self._bn_undo)
        self._bn_undo = []
        self.net = self.model

    def _build_loss(self) -> nn.Module:
        loss = _make_loss(
            self.config.loss, self.guard["loss_params"], self.guard["ramp"], self.total_iters
        )
        return loss.to(self.device)

    def _core_state(self) -> dict[str, Any]:
        """Everything needed to continue the trajectory from the current epoch boundary."""
        return {
            "epoch": self.epoch,
            "global_iter": self.global_iter,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(self.generator),
        }

    def _load_core_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], self.generator)
        self.epoch = int(state["epoch"])
        self.global_iter = int(state["global_iter"])

    def recipe(self) -> dict[str, Any]:
        extra = {} if self.dist is None else {"world_size": self.dist.world_size}
        return extra | {
            "model": self.model.model_name,
            "device": str(self.device),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "optimizer": self.config.optimizer,
            "lr": self.config.peak_lr,
            "weight_decay": self.config.resolved_weight_decay(self.model, self.data.n),
            "epochs": self.config.epochs,
            "batch_size": self.config.batch_size,
            "iterations": self.total_iters,
        }

    def _take_snapshot(self) -> None:
        # Deep copies: the live tensors keep changing in place.
        self.snapshot = copy.deepcopy(self._core_state())

    def _apply_lr_scale(self) -> None:
        self.lr_lambda.scale = float(self.guard["lr_scale"])
        factor = self.lr_lambda(self.scheduler.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * factor

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> None:
        # Every rank holds the same state; rank 0 writes it.
        if self.checkpoint_path is None or not distributed.is_main():
            return
        state = self._core_state()
        state.update(
            format=_CHECKPOINT_FORMAT,
            version=_CHECKPOINT_VERSION,
            config=self.config.to_dict(),
            data=self.fingerprint,
            guard=_plain(self.guard),
            history=_plain(self.history),
            events=_plain(self.events),
            dynamics=self.dynamics.state_dict(),
            snapshot=self._snapshot_for_checkpoint(),
        )
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.checkpoint_path, lambda f: torch.save(state, f))

    def _snapshot_for_checkpoint(self) -> dict[str, Any] | str | None:
        # The rollback target travels with the checkpoint so that a resumed run recovers from a
        # later collapse exactly as the uninterrupted run would; usually it is the current state.
        snap = self.snapshot
        if snap is None:
            return None
        if snap["epoch"] == self.epoch and snap["global_iter"] == self.global_iter:
            return "current"
        return snap

    def load_checkpoint(self) -> bool:
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            # torch's own message spans lines (and explains weights_only): keep one line.
            reason = " ".join(str(exc).split())[:200]
            raise ConfigError(
                f"cannot read checkpoint {path} ({type(exc).__name__}: {reason}); delete it "
                "to start afresh"
            ) from None
        if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
            raise ConfigError(f"{path} is not a dm-audit training checkpoint")
        if state.get("version") != _CHECKPOINT_VERSION:
            raise ConfigError(
                f"checkpoint {path} has format version {state.get('version')}, "
                f"this dm-audit writes {_CHECKPOINT_VERSION}"
            )
        mine = self.config.to_dict()
        theirs = state["config"]
        diffs = [
            f"{k}: checkpoint {theirs.get(k)!r} vs now {mine.get(k)!r}"
            for k in sorted(set(mine) | set(theirs))
            if k not in _RESUME_IGNORED_FIELDS and theirs.get(k) != mine.get(k)
        ]
        if diffs:
            raise ConfigError(
                f"checkpoint {path} was written by a different training configuration; "
                f"refusing to resume ({'; '.join(diffs)}). Remove it or use the same options."
            )
        data_diffs = [
            f"{k}: checkpoint {state['data'].get(k)!r} vs now {v!r}"
            for k, v in self.fingerprint.items()
            if state["data"].get(k) != v
        ]
        if data_diffs:
            raise ConfigError(
                f"checkpoint {path} was written for different training data; refusing to resume "
                f"({'; '.join(data_diffs)})"
            )
        self.guard = dict(state["guard"])
        self.loss_fn = self._build_loss()
        self._load_core_state(state)
        self._apply_lr_scale()
        self.history = list(state["history"])
        self.events = list(state["events"])
        self.dynamics.load_state_dict(state["dynamics"])
        snap = state.get("snapshot")
        if snap == "current":
            self._take_snapshot()
        else:
            self.snapshot = snap
        self.events.append({"event": "resume", "epoch": self.epoch, "checkpoint": str(path)})
        return True

    # ---------------------------------------------------------------- one epoch

    def train_epoch(self, bar: Any) -> dict[str, Any]:
        model, device = self.model, self.device
        model.train()
        c = self.num_classes
        # MPS has no float64; elsewhere float64 keeps the epoch sums exact enough to compare.
        acc = torch.float32 if device.type == "mps" else torch.float64
        loss_sum = torch.zeros((), device=device, dtype=acc)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        weight_sum = torch.zeros((), device=device, dtype=acc)
        ce_sum = torch.zeros((), device=device, dtype=acc)
        pred_counts = torch.zeros(c, device=device, dtype=torch.int64)
        class_p = torch.zeros(c, device=device, dtype=acc)  # sum of p_i per given class
        class_seen = torch.zeros(c, device=device, dtype=torch.int64)  # examples per given class
        class_hits = torch.zeros(c, device=device, dtype=torch.int64)  # ... predicted as it
        record = self.config.dynamics_source == "train"
        epoch_p = torch.full((self.n,), float("nan"), device=device)
        epoch_ok = torch.zeros(self.n, device=device, dtype=torch.bool)
        autocast = (
            torch.autocast(device_type="cuda", dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        seen = 0
        world = self.dist.world_size if self.dist is not None else 1
        start = time.perf_counter()
        for step, (idx, xb, yb) in enumerate(self.data.epoch()):
            self.loss_fn.set_progress(self.global_iter, self.total_iters)
            x = prepare_batch(model, xb)
            with autocast:
                logits = self.net(x)
            if self.dist is None:
                out = self.loss_fn(logits.float(), yb)
                objective = out.loss
            else:
                # The loss normalises over the global batch; this rank's loss is its share of
                # the single-process loss, and DDP averages gradients, hence the factor.
                with distributed.global_batch(self.data.global_sizes[step], self.sync_group):
                    out = self.loss_fn(logits.float(), yb)
                objective = out.loss * world
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.scale(objective).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                objective.backward()
                self.optimizer.step()
            self.scheduler.step()
            self.global_iter += 1
            with torch.no_grad():
                b = yb.numel()
                pred = logits.argmax(dim=1)
                hit = pred == yb
                p_given = out.p_given.detach().float()
                # Under DDP out.loss is this rank's share of the global batch's loss.
                loss_sum += out.loss.detach().to(acc) * (
                    b if self.dist is None else self.data.global_sizes[step]
                )
                correct += hit.sum()
                weight_sum += out.weights.detach().to(acc).sum()
                ce_sum -= torch.log(p_given.clamp_min(1e-12)).to(acc).sum()
                # one_hot().sum() rather than bincount: bincount is non-deterministic on CUDA.
                pred_counts += F.one_hot(pred, c).sum(dim=0)
                given = F.one_hot(yb, c)
                class_p += given.to(acc).T @ p_given.to(acc)
                class_seen += given.sum(dim=0)
                class_hits += (given * hit.unsqueeze(1)).sum(dim=0)
                if record:
                    epoch_p[idx] = p_given
                    epoch_ok[idx] = hit
            seen += b
            bar.update(1)
            if not bar.disable and (step % 10 == 0 or step == len(self.data) - 1):
                rate = seen / max(1e-9, time.perf_counter() - start)
                bar.set_postfix(
                    epoch=f"{self.epoch + 1}/{self.config.epochs}",
                    loss=f"{loss_sum.item() / seen:.4f}",
                    acc=f"{correct.item() / seen:.3f}",
                    ex_s=f"{rate:.0f}",
                    refresh=False,
                )
        seconds = time.perf_counter() - start
        if self.dist is not None:
            sums = [loss_sum, correct, weight_sum, ce_sum, pred_counts, class_p, class_seen]
            seen = self._reduce_epoch(seen, [*sums, class_hits], record, epoch_p, epoch_ok)
        if record:
            self.dynamics.record(
                self.epoch, np.arange(self.n), epoch_p.cpu().numpy(), epoch_ok.cpu().numpy()
            )
        counts = pred_counts.cpu().numpy() / seen
        mean_p = class_p.cpu().numpy() / np.maximum(self.label_freq * seen, 1)
        # Share of the labels in classes the network has given up on: it (almost) never
        # predicts them and gives their examples less than half the uniform probability. A
        # class merely not learned yet (early epochs, many classes) sits near 1/C instead.
        dead = (counts < 0.1 * self.label_freq) & (mean_p < 0.5 / self.num_classes)
        balanced, chance = balanced_accuracy_vs_chance(
            class_hits.cpu().numpy(), class_seen.cpu().numpy(), counts
        )
        return {
            "loss": float(loss_sum.item() / seen),
            "train_ce": float(ce_sum.item() / seen),
            "train_acc": float(correct.item() / seen),
            "balanced_acc": balanced,
            "balanced_acc_chance": chance,
            "mean_weight": float(weight_sum.item() / seen),
            "pred_share": float(counts.max()),
            "dead_class_share": float(self.label_freq[dead].sum()),
            "seconds": seconds,
            "examples_per_s": seen / max(seconds, 1e-9),
        }

    def _reduce_epoch(
        self,
        seen: int,
        sums: list[torch.Tensor],
        record: bool,
        epoch_p: torch.Tensor,
        epoch_ok: torch.Tensor,
    ) -> int:
        """Sum an epoch's statistics over the ranks in place; returns the examples seen by all.

        Every example belongs to exactly one rank per epoch, so its p_i is summed with zeros.
        """
        dist = torch.distributed
        for t in sums:
            dist.all_reduce(t)
        if record:
            epoch_p.nan_to_num_(nan=0.0)
            dist.all_reduce(epoch_p)
            ok = epoch_ok.to(torch.int32)
            dist.all_reduce(ok)
            epoch_ok.copy_(ok.bool())
        total = torch.tensor([seen], device=self.device, dtype=torch.int64)
        dist.all_reduce(total)
        return int(total.item())

    def evaluate(self, stats: dict[str, Any]) -> dict[str, Any]:
        """History entry of the epoch just trained (eval passes where needed)."""
        entry: dict[str, Any] = {"epoch": self.epoch + 1, "attempt": self.guard["attempt"]}
        entry.update(stats)
        entry["lr"] = float(self.optimizer.param_groups[0]["lr"])
        entry["emphasis_scale"] = _emphasis_scale(self.loss_fn)
        bs = self.config.eval_batch_size
        test_probs = None
        if self.eval_set is not None:
            test_probs, _ = _forward_all(
                self.model, self.eval_set[0], self.device, bs, self.amp_dtype, embeddings=False
            )
            entry["eval_acc"] = float(np.mean(test_probs.argmax(1) == self.eval_set[1]))
        need_train_pass = self.true_labels is not None or self.config.dynamics_source == "eval"
        if need_train_pass:
            probs, _ = _forward_all(
                self.model, self.inputs, self.device, bs, self.amp_dtype, embeddings=False
            )
            if self.config.dynamics_source == "eval":
                rows = np.arange(self.n)
                self.dynamics.record(
                    self.epoch,
                    rows,
                    probs[rows, self.labels_np],
                    probs.argmax(1) == self.labels_np,
                )
            if self.true_labels is not None:
                m = six_metrics(
                    probs,
                    self.labels_np,
                    self.true_labels,
                    test_probs=test_probs,
                    test_labels=None if self.eval_set is None else self.eval_set[1],
                )
                entry.update(m)
        entry["alarm"] = None
        entry["collapsed"] = False
        entry["discarded"] = False
        return _plain(entry)

    # ---------------------------------------------------------------- collapse guard

    def checks_complete(self) -> bool:
        """Whether every collapse check applies to the epoch just trained.

        The class-coverage and accuracy checks wait until the emphasis ramp is over and a first
        epoch is done: before that, predictions may legitimately be unbalanced or near chance.
        """
        return self.epoch >= 1 and self.global_iter >= self.guard["ramp"] * self.total_iters

    def diagnose(self, entry: dict[str, Any]) -> str | None:
        """Symptom of a collapse in the epoch just trained, or None."""
        if not math.isfinite(entry["loss"]):
            return "diverged"
        # Balanced accuracy rather than accuracy: under imbalance, answering the majority class
        # for everything scores the majority share, and a model that learns every class cannot
        # score much more (see metrics.balanced_accuracy_vs_chance). None: fewer than two classes
        # in the labels.
        balanced = entry.get("balanced_acc")
        at_chance = balanced is not None and balanced <= entry["balanced_acc_chance"]
        # Predictions far more concentrated than the labels are a collapse only if they carry
        # no information about the labels: a noise-robust model on imbalanced data predicts the
        # majority class more often than the noisy labels give it, and tells the classes apart.
        share = entry["pred_share"]
        if share > self.config.collapse_share and share - self.label_share >= 0.2 and at_chance:
            return "one_class"
        if not self.checks_complete():
            return None
        # Classes the network has given up on: a large emphasis can leave every example of some
        # classes at p_i ~ 0, where w(p) is e^{beta/4}-fold below the peak, so they never recover.
        if entry["dead_class_share"] >= _DEAD_CLASS_SHARE:
            return "dead_classes"
        # No better than a predictor that ignores the input.
        if at_chance:
            return "chance_accuracy"
        return None

    def recover(self, reason: str, entry: dict[str, Any]) -> bool:
        """Record a collapse; roll back and reduce the emphasis if allowed. True if rolled back."""
        event: dict[str, Any] = {
            "event": "collapse",
            "epoch": entry["epoch"],
            "attempt": self.guard["attempt"],
            "reason": reason,
            "pred_share": entry["pred_share"],
            "train_acc": entry["train_acc"],
            "balanced_acc": entry.get("balanced_acc"),
            "balanced_acc_chance": entry.get("balanced_acc_chance"),
            "majority_share": self.label_share,
            "loss_params": dict(self.guard["loss_params"]),
            "emphasis_ramp": self.guard["ramp"],
        }
        entry["collapsed"] = True
        if not self.config.collapse_guard or (
            self.guard["attempt"] >= self.config.collapse_retries or self.snapshot is None
        ):
            # Nothing to do: report the start of a collapsed stretch once, not every epoch.
            previous = self.history[-2] if len(self.history) >= 2 else None
            if previous is None or previous["discarded"] or not previous["collapsed"]:
                event["action"] = "none" if not self.config.collapse_guard else "gave_up"
                self.events.append(_plain(event))
                if distributed.is_main():  # every rank decides alike; one says so
                    log.warning(
                        "training collapsed at epoch %d (%s); %s",
                        entry["epoch"],
                        reason,
                        "the collapse guard is off"
                        if event["action"] == "none"
                        else "no retries left",
                    )
            return False
        params = dict(self.guard["loss_params"])
        reduced = {k: float(v) * 0.5 for k, v in params.items() if k in _EMPHASIS_KEYS}
        if reduced:
            params.update(reduced)
        else:
            self.guard["lr_scale"] = float(self.guard["lr_scale"]) * 0.5
        self.guard["attempt"] += 1
        self.guard["loss_params"] = params
        self.guard["ramp"] = min(1.0, max(2.0 * self.guard["ramp"], 0.25))
        self._load_core_state(copy.deepcopy(self.snapshot))
        self._apply_lr_scale()
        self.loss_fn = self._build_loss()
        self.dynamics.truncate(self.epoch)
        for h in self.history:
            if h["epoch"] > self.epoch:
                h["discarded"] = True
        entry["discarded"] = True
        event.update(
            action="rollback",
            rollback_to_epoch=self.epoch,
            new_loss_params=params,
            new_emphasis_ramp=self.guard["ramp"],
            lr_scale=self.guard["lr_scale"],
        )
        self.events.append(_plain(event))
        if distributed.is_main():  # every rank rolls back alike; one says so
            log.warning(
                "training collapsed at epoch %d (%s); rolled back to epoch %d with %s, ramp %.2f",
                entry["epoch"],
                reason,
                self.epoch,
                params,
                self.guard["ramp"],
            )
        return True

    # ---------------------------------------------------------------- the loop

    def run(self, on_epoch_end: Callable[[dict[str, Any]], None] | None) -> None:
        guard_on = self.config.collapse_guard
        retries = self.config.collapse_retries
        if guard_on and self.snapshot is None and self.epoch == 0:
            self._take_snapshot()  # the initial weights: the rollback target of last resort
        bar = progress_bar(
            total=self.total_iters,
            initial=self.global_iter,
            disable=not self.config.progress or not distributed.is_main(),
            desc=self.config.progress_label or f"train {self.config.loss}",
            unit="it",
            dynamic_ncols=True,
        )
        try:
            while self.epoch < self.config.epochs:
                stats = self.train_epoch(bar)
                entry = self.evaluate(stats)
                self.history.append(entry)
                alarm = self.diagnose(entry)
                entry["alarm"] = alarm
                # Early training can show any symptom for an epoch and grow out of it: a
                # collapse is a symptom that persists for two epochs (divergence at once).
                previous = self.history[-2] if len(self.history) >= 2 else None
                persists = (
                    previous is not None
                    and not previous["discarded"]
                    and previous.get("alarm") is not None
                )
                collapsed = alarm is not None and (alarm == "diverged" or persists)
                verified = alarm is None and self.checks_complete()
                if collapsed and self.recover(alarm, entry):
                    bar.n = self.global_iter
                    bar.refresh()
                    continue
                self.dynamics.end_epoch(self.epoch)
                self.epoch += 1
                if guard_on and verified:
                    self._take_snapshot()
                # A collapsed epoch is not checkpointed while the guard may still roll it back.
                if not collapsed or not guard_on or self.guard["attempt"] >= retries:
                    self.save_checkpoint()
                if on_epoch_end is not None:
                    on_epoch_end(entry)
        finally:
            bar.close()
        self.model.eval()


def fit(
    inputs: np.ndarray,
    labels: np.ndarray,
    config: TrainConfig,
    *,
    num_classes: int,
    eval_inputs: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
    true_labels: np.ndarray | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train a model on ``(inputs, labels)`` with any loss of ``dm_audit.losses``.

    Parameters
    ----------
    inputs : array
        float features ``(N, D)`` or uint8 images ``(N, H, W, C)``.
    labels : array (N,) int
        Given labels, codes ``0..num_classes-1``.
    config : TrainConfig
        Options (model, loss, optimisation, device, seed, guard, ...).
    num_classes : int
        Number of classes ``C``.
    eval_inputs, eval_labels : arrays (M, ...), (M,), optional
        Held-out set evaluated after every epoch (``eval_acc``; ``test_acc`` of the six metrics).
    true_labels : array (N,) int, optional
        Clean labels (``-1`` for open-set examples): adds the six metrics of METHOD.md §4 to each
        history entry (one extra eval pass over the training set per epoch).
    checkpoint_dir : path, optional
        Folder for ``checkpoint.pt``, rewritten atomically after every epoch.
    resume : bool
        Continue from the checkpoint in ``checkpoint_dir`` when there is one (bit-identical to an
        uninterrupted run on CPU). A checkpoint of another configuration or other data raises
        :class:`ConfigError`.
    on_epoch_end : callable, optional
        Called with each kept epoch's history entry after its checkpoint is written.

    Returns
    -------
    FitResult
        Model (eval mode), history, dynamics, events, config.

    Notes
    -----
    History entries hold ``epoch`` (1-based), ``attempt``, ``loss`` (the optimised loss),
    ``train_ce`` (cross entropy of the given labels), ``train_acc`` (against the given labels;
    both from the training passes), ``balanced_acc`` (mean per-class recall on the given labels,
    from the training passes) and ``balanced_acc_chance`` (the highest balanced accuracy that
    still counts as chance; both None with fewer than two classes in the labels),
    ``mean_weight`` (mean per-example emphasis weight),
    ``emphasis_scale`` (the loss's ramp factor, None for losses without one), ``pred_share``
    (largest predicted-class share), ``lr`` (at the epoch's end), ``seconds``,
    ``dead_class_share`` (share of the labels in classes the network has given up on),
    ``examples_per_s``, ``eval_acc`` with an eval set, the six metrics with ``true_labels``,
    ``alarm`` (a collapse symptom, or None), ``collapsed`` and ``discarded``.

    Seeding sets the global ``random``, NumPy and torch seeds (like most training scripts).

    While a ``torch.distributed`` process group of more than one process is active (e.g. under
    ``torchrun``, see :func:`dm_audit.distributed.process_group`), every process calls ``fit``
    with the same arguments and trains one model with DistributedDataParallel:
    ``config.batch_size`` is the global batch, each rank takes its slice of it, and the run
    follows the single-process trajectory up to floating-point summation order (see
    :mod:`dm_audit.distributed`). Every rank returns the same result; only rank 0 writes the
    checkpoint.
    """
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(num_classes, int | np.integer) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    x = _check_inputs(inputs)
    y = _check_labels(labels, len(x), num_classes, "labels", allow_open=False)
    if len(x) < 2:
        raise DataError(f"need at least 2 training examples, got {len(x)}")
    eval_set = None
    if (eval_inputs is None) != (eval_labels is None):
        raise ConfigError("give both eval_inputs and eval_labels, or neither")
    if eval_inputs is not None:
        ex = _check_inputs(eval_inputs, "eval_inputs")
        if ex.shape[1:] != x.shape[1:]:
            raise DataError(
                f"eval_inputs have shape {ex.shape[1:]} per example, training inputs {x.shape[1:]}"
            )
        ey = _check_labels(eval_labels, len(ex), num_classes, "eval_labels", allow_open=False)
        eval_set = (ex, ey)
    t = None
    if true_labels is not None:
        t = _check_labels(true_labels, len(x), num_classes, "true_labels", allow_open=True)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and ckpt is None:
        raise ConfigError("resume=True needs a checkpoint_dir")

    with _determinism(config.deterministic, resolve_device(config.device)):
        trainer = _Trainer(x, y, config, int(num_classes), eval_set, t, ckpt)
        if resume and not trainer.load_checkpoint():
            log.info("no checkpoint in %s; starting a new run", ckpt)
        trainer.run(on_epoch_end)
        trainer.unwrap()
    return FitResult(
        model=trainer.model,
        history=trainer.history,
        dynamics=trainer.dynamics,
        events=trainer.events,
        config=config,
        loss_params=dict(trainer.guard["loss_params"]),
        recipe=trainer.recipe(),
    )
