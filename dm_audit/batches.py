"""Batches for training and inference: input checks, shuffled (augmented) batches, scaling.

Feature tables and un-augmented images are batched from in-memory tensors (index slicing, no
DataLoader: several times faster on CPU); augmented images go through a DataLoader whose dataset
applies ``torchvision.transforms.v2`` per example on uint8 tensors. The conversion to float and
the standardisation (:func:`prepare_batch`) run on the training device, so uint8 images cross
the bus at a quarter of the float size.

Batch order comes from one seeded generator whose state is checkpointed, so a resumed run draws
the same batches as an uninterrupted one. Under data-parallel training every rank draws the same
permutation and takes its own slice of each global batch.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dm_audit import distributed
from dm_audit.errors import ConfigError, DataError
from dm_audit.models import AuditModel

if TYPE_CHECKING:
    from dm_audit.train_config import TrainConfig

__all__ = [
    "EpochBatchSampler",
    "RowSubset",
    "TrainData",
    "augmentation",
    "check_inputs",
    "check_labels",
    "input_stats",
    "n_batches",
    "prepare_batch",
    "split_batches",
]

# In-memory tensors above this size stay in host memory and are copied per batch.
_DEVICE_DATA_LIMIT = 1 << 30
# Rows sampled for the standardisation statistics.
_STATS_SAMPLE = 20000


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


# Rows whose finiteness `check_inputs` checks at a time.
_FINITE_CHECK_ROWS = 65_536


class RowSubset:
    """Some rows of an input array, read without copying them out first.

    ``base[rows]`` would copy the rows at once: a cross-fitted training of a million 128-d rows
    made two such copies per fold (its training rows and its held-out rows), 512 MB. A subset
    gathers only the rows each batch, slice or sample asks for, so `fit` and `forward_all` can
    take it where they take an array: ``len``, ``shape``, ``ndim``, ``dtype`` and indexing by an
    int, a slice or an array of positions (positions within the subset).

    Parameters
    ----------
    base : np.ndarray
        Checked inputs (`check_inputs`): float32 features ``(N, D)`` or uint8 images.
    rows : array of int
        Row numbers of `base`, in the subset's order.
    """

    def __init__(self, base: np.ndarray | RowSubset, rows: np.ndarray) -> None:
        picked = np.asarray(rows)
        if picked.ndim != 1 or not (picked.size == 0 or np.issubdtype(picked.dtype, np.integer)):
            raise DataError(f"rows must be a 1-d array of row numbers, got shape {picked.shape}")
        if picked.size and (picked.min() < 0 or picked.max() >= len(base)):
            raise DataError(
                f"rows must lie in [0, {len(base)}); got {picked.min()}..{picked.max()}"
            )
        picked = picked.astype(np.int64, copy=False)
        if isinstance(base, RowSubset):  # rows of rows: one level, positions in the array
            base, picked = base.base, base.rows[picked]
        self.base = base
        self.rows = picked

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.base.shape[1:])

    @property
    def ndim(self) -> int:
        return self.base.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, torch.Tensor):
            key = key.numpy()
        return self.base[self.rows[key]]

    def materialise(self) -> np.ndarray:
        """The rows as one array (a copy)."""
        return self.base[self.rows]


def check_inputs(inputs: Any, name: str = "inputs") -> np.ndarray | RowSubset:
    """``inputs`` as float32 features ``(N, D)`` or uint8 images ``(N, H, W, C)``.

    A `RowSubset` is checked through its base array and returned as it is.

    Raises :class:`DataError` naming ``name`` and the first bad value or the wrong shape.
    """
    if isinstance(inputs, RowSubset):
        base = check_inputs(inputs.base, name)
        return inputs if base is inputs.base else RowSubset(base, inputs.rows)
    x = np.asarray(inputs)
    if x.ndim == 2:
        if not np.issubdtype(x.dtype, np.number):
            raise DataError(f"{name}: features must be numeric, got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        # Checked a block of rows at a time: a mask of a million-row table would be N x D bytes.
        for start in range(0, len(x), _FINITE_CHECK_ROWS):
            bad = ~np.isfinite(x[start : start + _FINITE_CHECK_ROWS])
            if bad.any():
                row, col = np.argwhere(bad)[0]
                raise DataError(
                    f"{name}: non-finite feature value at row {start + row}, column {col}"
                )
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


def check_labels(
    labels: Any, n: int, num_classes: int, name: str, *, allow_open: bool
) -> np.ndarray:
    """``labels`` as int64 codes ``(n,)``; :class:`DataError` naming the first bad row.

    Codes lie in ``0..num_classes-1``, or are ``-1`` (open-set examples) with ``allow_open``.
    """
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


def n_batches(n: int, batch_size: int) -> int:
    """Batches of an epoch over ``n`` examples."""
    # A last batch of one example is folded into the one before (BatchNorm needs two).
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > 1 or (rest == 1 and full == 0) else 0)


def split_batches(perm: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``perm`` cut into the epoch's batches (see `n_batches`)."""
    n = perm.numel()
    bounds = [min(n, i * batch_size) for i in range(n_batches(n, batch_size))] + [n]
    return [perm[a:b] for a, b in itertools.pairwise(bounds)]


class EpochBatchSampler(Sampler[list[int]]):
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
        for batch in split_batches(perm, self.batch_size):
            if self.world > 1:
                batch = distributed.shard(batch, self.rank, self.world)
            yield batch.tolist()

    def __len__(self) -> int:
        return n_batches(self.n, self.batch_size)


class _AugmentedImages(Dataset):
    """uint8 NHWC images -> augmented uint8 CHW tensors (torchvision.transforms.v2)."""

    def __init__(self, images: np.ndarray, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        return self.transform(img), i


def augmentation(
    kind: str, shape: tuple[int, ...]
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The transform of ``TrainConfig.augment`` for examples of ``shape``; None: no augmentation.

    "auto": pad-and-crop plus horizontal flip for colour images up to 64 px, crop only for
    grayscale ones (flipping digits or letters changes their meaning), flip only for larger
    images; nothing for features.
    """
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


def _read_only_view(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing `array`'s memory. Training only reads its inputs, so a read-only array
    (a memory-mapped or frozen matrix) is shared too, without torch's warning about writes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class TrainData:
    """The training set: yields ``(indices, raw_x, y)`` batches on the device for one epoch.

    Also keeps the arrays themselves (``inputs``, ``labels_np``) for eval-mode passes over the
    training set, and the share of each class in the labels (``label_freq``, ``(C,)``).
    """

    def __init__(
        self,
        inputs: np.ndarray | RowSubset,
        labels: np.ndarray,
        num_classes: int,
        device: torch.device,
        config: TrainConfig,
        generator: torch.Generator,
        dist_info: distributed.DistInfo | None = None,
    ) -> None:
        self.n = len(labels)
        self.inputs, self.labels_np = inputs, labels
        self.label_freq = np.bincount(labels, minlength=num_classes) / self.n
        self.device = device
        self.batch_size = config.batch_size
        self.generator = generator
        self.rank, self.world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
        # Sizes of the global batches of an epoch (a rank's local batches are slices of them).
        self.global_sizes = [len(b) for b in split_batches(torch.arange(self.n), self.batch_size)]
        if self.world > 1 and min(self.global_sizes) < self.world:
            raise ConfigError(
                f"TrainConfig.batch_size {self.batch_size} on {self.n} examples leaves a batch of "
                f"{min(self.global_sizes)}, fewer than the {self.world} processes: every process "
                "needs at least one example per step"
            )
        self.labels = torch.from_numpy(labels).to(device)
        self.transform = augmentation(config.augment, inputs.shape[1:])
        self.loader: DataLoader | None = None
        # Positions of the training rows in `x` when `x` is a larger base array (see below).
        self.rows: torch.Tensor | None = None
        if self.transform is not None:
            workers = config.num_workers
            if workers < 0:
                workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
            # No persistent workers: each epoch draws the workers' seeds from the (restorable)
            # global torch RNG, which keeps augmentation reproducible across a resume.
            self.loader = DataLoader(
                _AugmentedImages(inputs, self.transform),
                batch_sampler=EpochBatchSampler(
                    self.n, self.batch_size, generator, self.rank, self.world
                ),
                num_workers=workers,
                pin_memory=device.type == "cuda",
            )
            self.x = None
        else:
            # On the CPU a subset of rows is gathered batch by batch from its base array (no
            # copy of the training rows); an accelerator gets the rows themselves.
            if isinstance(inputs, RowSubset) and device.type == "cpu":
                self.rows = torch.from_numpy(inputs.rows)
                inputs = inputs.base
            elif isinstance(inputs, RowSubset):
                inputs = inputs.materialise()
            x = _read_only_view(inputs)
            if x.ndim == 4:
                x = x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last strides
            if x.element_size() * x.nelement() <= _DEVICE_DATA_LIMIT or device.type == "cpu":
                self.x = x.to(device)
            else:
                self.x = x.pin_memory() if device.type == "cuda" else x

    def __len__(self) -> int:
        return n_batches(self.n, self.batch_size)

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One epoch's batches, in the order the seeded generator draws."""
        nb = self.device.type == "cuda"
        if self.loader is not None:
            for xb, idx in self.loader:
                idx = idx.to(self.device, non_blocking=nb)
                yield idx, xb.to(self.device, non_blocking=nb), self.labels[idx]
            return
        assert self.x is not None
        perm = torch.randperm(self.n, generator=self.generator)
        for idx in split_batches(perm, self.batch_size):
            if self.world > 1:
                idx = distributed.shard(idx, self.rank, self.world)
            if self.rows is not None:
                xb = self.x[self.rows[idx]]
            elif self.x.device == self.device:
                idx = idx.to(self.device, non_blocking=nb)
                xb = self.x[idx]
            else:
                xb = self.x[idx].to(self.device, non_blocking=nb)
                idx = idx.to(self.device, non_blocking=nb)
            yield idx, xb, self.labels[idx]


def input_stats(inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
