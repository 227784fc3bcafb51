"""One epoch of training and its evaluation, over a `TrainState`.

`train_one_epoch` and `evaluate` follow torchvision's reference loop. Two things are specific to
training with an emphasis (DM) loss: the loss's ``set_progress(iteration, total_iterations)`` is
called before every step (DM ramps its emphasis up over the first ``emphasis_ramp`` fraction of
training, ProSelfLC grows its correction over time), and every example's p_i is recorded at
every epoch (see :mod:`dm_audit.dynamics`).

Under data parallelism (:mod:`dm_audit.distributed`) each rank trains on its slice of every
global batch; the loss normalises over the global batch and the epoch's sums are all-reduced, so
every rank reports the statistics of the whole epoch.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dm_audit import distributed
from dm_audit.batches import TrainData, input_stats, n_batches, prepare_batch
from dm_audit.checkpoints import plain, seed_everything
from dm_audit.devices import amp_dtype, autocast, resolve_device
from dm_audit.dynamics import TrainingDynamics
from dm_audit.inference import forward_all
from dm_audit.metrics import balanced_accuracy_vs_chance, six_metrics
from dm_audit.models import AuditModel, create_model
from dm_audit.optimization import LRSchedule, build_loss, make_optimizer
from dm_audit.train_config import TrainConfig

__all__ = ["TrainState", "evaluate", "train_one_epoch"]


@dataclass(eq=False)
class TrainState:
    """What the epoch loop reads and advances.

    `dm_audit.checkpoints.state_of` saves the part that changes (weights, optimizer, scheduler,
    scaler, RNG states, ``epoch`` and ``global_iter``); the rest follows from the configuration
    and the data.
    """

    config: TrainConfig
    model: AuditModel
    # The module that runs the training forward pass: the model, or its DDP wrapper.
    net: nn.Module
    data: TrainData
    device: torch.device
    amp_dtype: torch.dtype | None
    generator: torch.Generator  # batch order (and augmentation workers' seeds)
    optimizer: torch.optim.Optimizer
    lr_schedule: LRSchedule
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    loss_kwargs: dict[str, Any]  # what `loss_fn` was created with
    num_classes: int
    total_iters: int
    dist: distributed.DistInfo | None = None
    sync_group: Any = None
    bn_undo: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    epoch: int = 0  # completed epochs of the current trajectory
    global_iter: int = 0

    @classmethod
    def create(
        cls,
        inputs: np.ndarray,
        labels: np.ndarray,
        config: TrainConfig,
        num_classes: int,
    ) -> TrainState:
        """Seed, then build the model, data, optimizer and loss of a new run.

        The order of construction fixes what the seeded generators produce: keep it.
        """
        dist = distributed.current()
        device = resolve_device(config.device)
        if dist is not None and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)  # one GPU per process
        amp = amp_dtype(config.amp, device, convnet=inputs.ndim == 4)
        iters_per_epoch = n_batches(len(labels), config.batch_size)
        total_iters = config.epochs * iters_per_epoch
        seed_everything(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        model = create_model(
            config.model,
            num_classes=num_classes,
            input_shape=inputs.shape[1:],
            weights_path=config.weights_path,
            **config.model_params,
        )
        if config.weights_path is None:
            model.set_input_stats(*input_stats(inputs))
        model.to(device)
        if inputs.ndim == 4:
            # The batches are NCHW views of NHWC memory; weights in the same layout spare the
            # convolutions a conversion (CPU: 738 -> 832 images/s, ResNet-20 at 28 x 28).
            model.to(memory_format=torch.channels_last)
        data = TrainData(inputs, labels, num_classes, device, config, generator, dist)
        net, sync_group, bn_undo = model, None, []
        if dist is not None:
            net, sync_group, bn_undo = _data_parallel(model, device)
        optimizer = make_optimizer(model, config, data.n)
        lr_schedule = LRSchedule(config, iters_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule)
        scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
        loss_fn, loss_kwargs = build_loss(
            config.loss, config.loss_params, float(config.emphasis_ramp), total_iters
        )
        return cls(
            config=config,
            model=model,
            data=data,
            device=device,
            amp_dtype=amp,
            generator=generator,
            optimizer=optimizer,
            lr_schedule=lr_schedule,
            scheduler=scheduler,
            scaler=scaler,
            loss_fn=loss_fn.to(device),
            loss_kwargs=loss_kwargs,
            num_classes=num_classes,
            total_iters=total_iters,
            dist=dist,
            net=net,
            sync_group=sync_group,
            bn_undo=bn_undo,
        )

    def set_loss(self, loss_params: dict[str, Any], ramp: float) -> None:
        """Rebuild the loss with other emphasis parameters (a recovery, a resume)."""
        loss_fn, self.loss_kwargs = build_loss(
            self.config.loss, loss_params, ramp, self.total_iters
        )
        self.loss_fn = loss_fn.to(self.device)

    def set_lr_scale(self, scale: float) -> None:
        """Scale the learning-rate schedule, effective from the current step."""
        self.lr_schedule.scale = float(scale)
        factor = self.lr_schedule(self.scheduler.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * factor

    def unwrap(self) -> None:
        """Plain BatchNorm modules again (same tensors), for the model handed to the caller."""
        distributed.restore_batchnorm(self.bn_undo)
        self.bn_undo = []
        self.net = self.model

    def recipe(self) -> dict[str, Any]:
        """The resolved training recipe (what `FitResult.recipe` reports)."""
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


def _data_parallel(
    model: nn.Module, device: torch.device
) -> tuple[nn.Module, Any, list[tuple[nn.Module, str, nn.Module]]]:
    """DistributedDataParallel with BatchNorm statistics over the global batch.

    Returns the wrapper, the process group of the loss's and BatchNorm's all-reduces, and what
    undoes the BatchNorm conversion.
    """
    from torch.nn.parallel import DistributedDataParallel

    # The loss's and BatchNorm's all-reduces get their own group, apart from DDP's gradient
    # buckets on the default group.
    sync_group = torch.distributed.new_group()
    bn_undo = distributed.convert_sync_batchnorm(model, device, sync_group)
    # Synchronised BatchNorm keeps every buffer identical on all ranks already: no broadcast of
    # the buffers before each forward pass (the option's name varies).
    options = inspect.signature(DistributedDataParallel).parameters
    no_sync = "forward_sync_buffers"
    if no_sync not in options:
        no_sync = "broadcast_buffers"
    net = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        **{no_sync: False},
    )
    return net, sync_group, bn_undo


# ============================================================================================
# one epoch


def train_one_epoch(state: TrainState, dynamics: TrainingDynamics, bar: Any) -> dict[str, Any]:
    """Optimise over one epoch of ``state.data``; the epoch's training-pass statistics.

    Advances ``state.global_iter`` (not ``state.epoch``: the caller decides whether the epoch is
    kept). With ``dynamics_source="train"`` every example's p_i goes to ``dynamics``.
    """
    state.model.train()
    record = state.config.dynamics_source == "train"
    tally = _EpochTally(state.num_classes, state.data.n, state.device, record=record)
    start = time.perf_counter()
    for step, (idx, xb, yb) in enumerate(state.data.epoch()):
        global_size = state.data.global_sizes[step]
        logits, out = _step(state, xb, yb, global_size)
        # Under DDP out.loss is this rank's share of the global batch's loss.
        tally.add(idx, yb, logits, out, yb.numel() if state.dist is None else global_size)
        bar.update(1)
        if not bar.disable and (step % 10 == 0 or step == len(state.data) - 1):
            rate = tally.seen / max(1e-9, time.perf_counter() - start)
            bar.set_postfix(
                epoch=f"{state.epoch + 1}/{state.config.epochs}",
                loss=f"{tally.loss_sum.item() / tally.seen:.4f}",
                acc=f"{tally.correct.item() / tally.seen:.3f}",
                ex_s=f"{rate:.0f}",
                refresh=False,
            )
    seconds = time.perf_counter() - start
    if state.dist is not None:
        tally.all_reduce(state.device)
    if record:
        assert tally.epoch_p is not None and tally.epoch_ok is not None
        dynamics.record(
            state.epoch,
            np.arange(state.data.n),
            tally.epoch_p.cpu().numpy(),
            tally.epoch_ok.cpu().numpy(),
        )
    return tally.stats(state.data.label_freq, seconds)


def _step(
    state: TrainState, xb: torch.Tensor, yb: torch.Tensor, global_size: int
) -> tuple[torch.Tensor, Any]:
    """One optimisation step on a batch; its logits and loss output."""
    state.loss_fn.set_progress(state.global_iter, state.total_iters)
    x = prepare_batch(state.model, xb)
    with autocast(state.device, state.amp_dtype):
        logits = state.net(x)
    if state.dist is None:
        out = state.loss_fn(logits.float(), yb)
        objective = out.loss
    else:
        # The loss normalises over the global batch; this rank's loss is its share of the
        # single-process loss, and DDP averages gradients, hence the factor.
        with distributed.global_batch(global_size, state.sync_group):
            out = state.loss_fn(logits.float(), yb)
        objective = out.loss * state.dist.world_size
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler.is_enabled():
        state.scaler.scale(objective).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        objective.backward()
        state.optimizer.step()
    state.scheduler.step()
    state.global_iter += 1
    return logits, out


class _EpochTally:
    """Sums over one epoch's training passes, kept on the device (no host sync per step)."""

    def __init__(self, num_classes: int, n: int, device: torch.device, *, record: bool) -> None:
        c = self.num_classes = num_classes
        # MPS has no float64; elsewhere float64 keeps the epoch sums exact enough to compare.
        acc = self.acc = torch.float32 if device.type == "mps" else torch.float64
        self.loss_sum = torch.zeros((), device=device, dtype=acc)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.weight_sum = torch.zeros((), device=device, dtype=acc)
        self.ce_sum = torch.zeros((), device=device, dtype=acc)
        self.pred_counts = torch.zeros(c, device=device, dtype=torch.int64)
        self.class_p = torch.zeros(c, device=device, dtype=acc)  # sum of p_i per given class
        self.class_seen = torch.zeros(c, device=device, dtype=torch.int64)  # examples per class
        self.class_hits = torch.zeros(c, device=device, dtype=torch.int64)  # ... predicted as it
        self.seen = 0  # examples this process trained on
        # Every example's p_i and "predicted == given", for the training dynamics.
        self.epoch_p = torch.full((n,), float("nan"), device=device) if record else None
        self.epoch_ok = torch.zeros(n, device=device, dtype=torch.bool) if record else None

    @torch.no_grad()
    def add(
        self, idx: torch.Tensor, yb: torch.Tensor, logits: torch.Tensor, out: Any, loss_weight: int
    ) -> None:
        """Count one batch; ``loss_weight`` turns ``out.loss`` (a mean) into a sum."""
        acc, c = self.acc, self.num_classes
        pred = logits.argmax(dim=1)
        hit = pred == yb
        p_given = out.p_given.detach().float()
        self.loss_sum += out.loss.detach().to(acc) * loss_weight
        self.correct += hit.sum()
        self.weight_sum += out.weights.detach().to(acc).sum()
        self.ce_sum -= torch.log(p_given.clamp_min(1e-12)).to(acc).sum()
        # one_hot().sum() rather than bincount: bincount is non-deterministic on CUDA.
        self.pred_counts += F.one_hot(pred, c).sum(dim=0)
        given = F.one_hot(yb, c)
        self.class_p += given.to(acc).T @ p_given.to(acc)
        self.class_seen += given.sum(dim=0)
        self.class_hits += (given * hit.unsqueeze(1)).sum(dim=0)
        if self.epoch_p is not None and self.epoch_ok is not None:
            self.epoch_p[idx] = p_given
            self.epoch_ok[idx] = hit
        self.seen += yb.numel()

    def all_reduce(self, device: torch.device) -> None:
        """Sum the epoch over the ranks in place (``seen`` becomes the examples of all ranks).

        Every example belongs to exactly one rank per epoch, so its p_i is summed with zeros.
        """
        dist = torch.distributed
        sums = [self.loss_sum, self.correct, self.weight_sum, self.ce_sum, self.pred_counts]
        for t in [*sums, self.class_p, self.class_seen, self.class_hits]:
            dist.all_reduce(t)
        if self.epoch_p is not None and self.epoch_ok is not None:
            self.epoch_p.nan_to_num_(nan=0.0)
            dist.all_reduce(self.epoch_p)
            ok = self.epoch_ok.to(torch.int32)
            dist.all_reduce(ok)
            self.epoch_ok.copy_(ok.bool())
        total = torch.tensor([self.seen], device=device, dtype=torch.int64)
        dist.all_reduce(total)
        self.seen = int(total.item())

    def stats(self, label_freq: np.ndarray, seconds: float) -> dict[str, Any]:
        """The epoch's statistics; ``label_freq`` is each class's share of the labels."""
        seen = self.seen
        counts = self.pred_counts.cpu().numpy() / seen
        mean_p = self.class_p.cpu().numpy() / np.maximum(label_freq * seen, 1)
        # Share of the labels in classes the network has given up on: it (almost) never
        # predicts them and gives their examples less than half the uniform probability. A
        # class merely not learned yet (early epochs, many classes) sits near 1/C instead.
        dead = (counts < 0.1 * label_freq) & (mean_p < 0.5 / self.num_classes)
        balanced, chance = balanced_accuracy_vs_chance(
            self.class_hits.cpu().numpy(), self.class_seen.cpu().numpy(), counts
        )
        return {
            "loss": float(self.loss_sum.item() / seen),
            "train_ce": float(self.ce_sum.item() / seen),
            "train_acc": float(self.correct.item() / seen),
            "balanced_acc": balanced,
            "balanced_acc_chance": chance,
            "mean_weight": float(self.weight_sum.item() / seen),
            "pred_share": float(counts.max()),
            "dead_class_share": float(label_freq[dead].sum()),
            "seconds": seconds,
            "examples_per_s": seen / max(seconds, 1e-9),
        }


# ============================================================================================
# evaluation


def evaluate(
    state: TrainState,
    stats: dict[str, Any],
    dynamics: TrainingDynamics,
    *,
    attempt: int,
    eval_set: tuple[np.ndarray, np.ndarray] | None = None,
    true_labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """History entry of the epoch just trained, from its training-pass ``stats``.

    Adds ``eval_acc`` on ``eval_set``, and the six metrics against ``true_labels``; with
    ``dynamics_source="eval"`` records every example's p_i from an eval-mode pass over the
    training set. ``attempt`` is the collapse-guard retry the epoch belongs to.
    """
    config, data = state.config, state.data
    entry: dict[str, Any] = {"epoch": state.epoch + 1, "attempt": attempt}
    entry.update(stats)
    entry["lr"] = float(state.optimizer.param_groups[0]["lr"])
    entry["emphasis_scale"] = _emphasis_scale(state.loss_fn)
    bs = config.eval_batch_size
    test_probs = None
    if eval_set is not None:
        test_probs, _ = forward_all(
            state.model, eval_set[0], state.device, bs, state.amp_dtype, embeddings=False
        )
        entry["eval_acc"] = float(np.mean(test_probs.argmax(1) == eval_set[1]))
    if true_labels is not None or config.dynamics_source == "eval":
        probs, _ = forward_all(
            state.model, data.inputs, state.device, bs, state.amp_dtype, embeddings=False
        )
        if config.dynamics_source == "eval":
            rows = np.arange(data.n)
            dynamics.record(
                state.epoch,
                rows,
                probs[rows, data.labels_np],
                probs.argmax(1) == data.labels_np,
            )
        if true_labels is not None:
            m = six_metrics(
                probs,
                data.labels_np,
                true_labels,
                test_probs=test_probs,
                test_labels=None if eval_set is None else eval_set[1],
            )
            entry.update(m)
    entry["alarm"] = None
    entry["collapsed"] = False
    entry["discarded"] = False
    return plain(entry)


def _emphasis_scale(loss: nn.Module) -> float | None:
    """The loss's emphasis ramp factor now; None for a loss without one."""
    value = getattr(loss, "emphasis_scale", None)
    if isinstance(value, torch.Tensor):
        value = value.item()
    return None if value is None else float(value)
