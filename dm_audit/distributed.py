"""Data-parallel training with ``torch.distributed``: process group, global batches, rank 0 writes.

:func:`dm_audit.training.fit` trains with :class:`~torch.nn.parallel.DistributedDataParallel`
whenever a process group with more than one process is active; :func:`process_group` starts one
from the environment that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), with gloo on CPU and nccl on CUDA::

    torchrun --standalone --nproc_per_node 2 -m dm_audit.cli train --input digits --out DIR

What makes a run of W processes follow the single-process trajectory (up to floating-point
summation order):

* **One global permutation.** Every rank draws the same seeded permutation per epoch and splits
  it into the same global batches; rank r takes the r-th contiguous slice of each batch
  (:func:`shard`), so the union of a step's local batches is the single-process batch.
* **Global batch normalisation of the loss.** DM losses divide each weight by the sum of the
  batch's weights, "mean" reductions by the batch size. While :func:`global_batch` is active the
  losses take these totals over all ranks' local batches (one small all-reduce per step), and
  the trainer multiplies the local loss by W because DDP averages the gradients of the ranks.
* **Synchronised BatchNorm.** BatchNorm statistics are taken over the global batch:
  ``torch.nn.SyncBatchNorm`` on CUDA, :class:`CPUSyncBatchNorm` (the same arithmetic with
  differentiable all-reduces, which gloo supports) on CPU.
* **Reduced statistics.** Per-epoch sums (loss, accuracy, predicted-class counts, every
  example's p_i for the dynamics) are all-reduced, so every rank holds the same history and the
  collapse guard takes the same decision on every rank.

Only rank 0 writes checkpoints and outputs (:func:`on_main` runs a step there and hands its
result, or its error, to every rank).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dm_audit.errors import ConfigError, DataError, DMAuditError

__all__ = [
    "CPUSyncBatchNorm",
    "DistInfo",
    "barrier",
    "batch_mean",
    "batch_sum",
    "convert_sync_batchnorm",
    "current",
    "env_world_size",
    "global_batch",
    "global_batch_size",
    "is_main",
    "on_main",
    "process_group",
    "restore_batchnorm",
    "shard",
]

T = TypeVar("T")

# The global batch of the step being computed: (size, group) while global_batch() is active.
_GLOBAL_BATCH: tuple[int, Any] | None = None


@dataclass(frozen=True)
class DistInfo:
    """The active process group as a training run sees it.

    Attributes
    ----------
    rank : int
        This process's rank, ``0 .. world_size - 1``.
    world_size : int
        Number of processes (> 1).
    local_rank : int
        Rank on this machine (selects the GPU).
    backend : str
        "gloo" or "nccl".
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str


def env_world_size() -> int:
    """``WORLD_SIZE`` as ``torchrun`` sets it (1 when it is not set)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        value = os.environ["WORLD_SIZE"]
        raise ConfigError(f"WORLD_SIZE must be an integer, got {value!r}") from exc


def current() -> DistInfo | None:
    """The active process group with more than one process, or None (single-process run)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world < 2:
        return None
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistInfo(dist.get_rank(), world, local, str(dist.get_backend()))


def is_main() -> bool:
    """Whether this process writes outputs: rank 0, or the only process."""
    info = current()
    return info is None or info.rank == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if current() is not None:
        dist.barrier()


@contextlib.contextmanager
def process_group(device: str = "auto", *, timeout_s: float = 1800.0) -> Iterator[DistInfo | None]:
    """Start the process group ``torchrun`` describes; destroy it on exit.

    Parameters
    ----------
    device : str
        The training device option: CPU runs use gloo, CUDA runs nccl with one GPU per process
        (``cuda:LOCAL_RANK``). "auto" means CUDA when this machine has it.
    timeout_s : float
        How long a collective waits for a missing rank before failing.

    Yields
    ------
    DistInfo or None
        None when ``WORLD_SIZE`` is unset or 1 (nothing is started: single-process training),
        or when a process group is already active (it is left to its owner).
    """
    world = env_world_size()
    if world < 2 or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    needed = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in needed if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun"
        )
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if backend == "gloo" and not dist.is_gloo_available():
        raise ConfigError("distributed CPU training needs gloo, which this torch build lacks")
    kwargs: dict[str, Any] = {}
    if use_cuda:
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local} has no GPU: this machine has {torch.cuda.device_count()}; "
                "start at most that many processes per node"
            )
        torch.cuda.set_device(local)
        kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group(
        backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs
    )
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank.

    A :class:`~dm_audit.errors.DMAuditError` raised on rank 0 is raised on every rank (so no
    rank waits forever for a step that failed); the result must be picklable.
    """
    if current() is None:
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except DMAuditError as exc:
            box[0] = ("error", type(exc).__name__, str(exc))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        cls = DataError if box[0][1] == "DataError" else ConfigError
        raise cls(box[0][2])
    return box[0][1]


# --------------------------------------------------------------------------- global batches


def shard(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s contiguous slice of a global batch of indices (sizes differ by <= 1)."""
    return torch.tensor_split(batch, world_size)[rank]


@contextlib.contextmanager
def global_batch(size: int, group: Any = None) -> Iterator[None]:
    """Make :func:`batch_sum`, :func:`batch_mean` and :func:`global_batch_size` span all ranks.

    Parameters
    ----------
    size : int
        Number of examples in the global batch (all ranks' local batches together).
    group : ProcessGroup, optional
        Group of the all-reduces (default: the default group).
    """
    global _GLOBAL_BATCH
    previous = _GLOBAL_BATCH
    _GLOBAL_BATCH = (int(size), group)
    try:
        yield
    finally:
        _GLOBAL_BATCH = previous


def global_batch_size(local: int) -> int | None:
    """Examples in the global batch while :func:`global_batch` is active, else None."""
    return None if _GLOBAL_BATCH is None else _GLOBAL_BATCH[0]


def batch_sum(x: Tensor) -> Tensor:
    """``x.sum()`` over the global batch (no gradient flows through the other ranks' part).

    Outside :func:`global_batch` this is exactly ``x.sum()``.
    """
    total = x.sum()
    if _GLOBAL_BATCH is None:
        return total
    total = total.detach().clone()
    dist.all_reduce(total, group=_GLOBAL_BATCH[1])
    return total


def batch_mean(x: Tensor) -> Tensor:
    """``x.mean()`` over the global batch of examples ``x`` (B,); exactly ``x.mean()`` outside."""
    if _GLOBAL_BATCH is None:
        return x.mean()
    return batch_sum(x) / _GLOBAL_BATCH[0]


# --------------------------------------------------------------------------- BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient is summed over ranks too (each rank's loss uses the sum)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span the global batch of every rank, on any device.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this module computes the same thing with two
    differentiable all-reduces per layer (the per-channel sums and sums of squares, and their
    gradients), which the gloo backend provides on CPU. Outside training, or without a process
    group, it is plain BatchNorm. Parameters and buffers are those of the BatchNorm it replaces,
    so state dicts load into either.
    """

    def __init__(self, *args: Any, group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size(self.group) > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        # float64 sums: the variance as E[x^2] - mean^2 cancels badly in float32.
        xd = x.double()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=xd.dtype, device=x.device)
        local = torch.cat([xd.sum(dims), (xd * xd).sum(dims), count])
        total = _AllReduceSum.apply(local, self.group)
        c = x.shape[1]
        n = total[2 * c]
        mean = total[:c] / n
        # Biased variance for normalising, as BatchNorm; clamped against rounding below zero.
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        mean, var = mean.to(x.dtype), var.to(x.dtype)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def convert_sync_batchnorm(
    module: nn.Module, device: torch.device, group: Any = None
) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every BatchNorm of ``module`` in place by a synchronised one sharing its tensors.

    ``torch.nn.SyncBatchNorm`` on CUDA, :class:`CPUSyncBatchNorm` elsewhere.

    Returns
    -------
    list of (parent, name, original)
        What :func:`restore_batchnorm` needs to put the original modules back.
    """
    undo: list[tuple[nn.Module, str, nn.Module]] = []
    for name, child in module.named_children():
        if not isinstance(child, nn.modules.batchnorm._BatchNorm):
            undo.extend(convert_sync_batchnorm(child, device, group))
            continue
        if isinstance(child, nn.SyncBatchNorm | CPUSyncBatchNorm):
            continue
        args = (child.num_features, child.eps, child.momentum, child.affine)
        if device.type == "cuda":
            sync: nn.Module = nn.SyncBatchNorm(
                *args, child.track_running_stats, process_group=group
            )
        else:
            sync = CPUSyncBatchNorm(*args, child.track_running_stats, group=group)
        if child.affine:
            sync.weight = child.weight
            sync.bias = child.bias
        sync.running_mean = child.running_mean
        sync.running_var = child.running_var
        sync.num_batches_tracked = child.num_batches_tracked
        sync.train(child.training)
        setattr(module, name, sync)
        undo.append((module, name, child))
    return undo


def restore_batchnorm(undo: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Put back the BatchNorm modules :func:`convert_sync_batchnorm` replaced (same tensors)."""
    for parent, name, original in undo:
        original.train(getattr(parent, name).training)
        setattr(parent, name, original)
