"""Training engine: one configurable, resumable, reproducible training loop for every loss.

:func:`fit` follows torchvision's reference scripts: an epoch of optimisation
(:func:`dm_audit.engine.train_one_epoch`), an evaluation (:func:`dm_audit.engine.evaluate`), a
check for a collapse (:class:`dm_audit.collapse_guard.CollapseGuard`, which may roll the run back
with a gentler emphasis), and a checkpoint dict (model, optimizer, scheduler, epoch, config, RNG
states, history, dynamics; :mod:`dm_audit.checkpoints`) written atomically after every kept
epoch, so that ``resume=True`` continues to bit-identical weights on CPU.

The pieces, one module each: the options (:mod:`dm_audit.train_config`), devices and mixed
precision (:mod:`dm_audit.devices`), batches (:mod:`dm_audit.batches`), optimizer, schedule and
loss (:mod:`dm_audit.optimization`), the per-epoch steps over a
:class:`~dm_audit.engine.TrainState` (:mod:`dm_audit.engine`), eval-mode passes
(:mod:`dm_audit.inference`), the collapse guard and the checkpoints. This module ties them
together and re-exports what callers use.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dm_audit import distributed
from dm_audit.batches import check_inputs, check_labels, prepare_batch
from dm_audit.checkpoints import (
    CHECKPOINT_NAME,
    check_resumable,
    data_fingerprint,
    plain,
    read_checkpoint,
    restore_state,
    state_of,
    write_checkpoint,
)
from dm_audit.collapse_guard import CollapseGuard, with_emphasis_defaults
from dm_audit.devices import determinism, resolve_device
from dm_audit.dynamics import TrainingDynamics
from dm_audit.engine import TrainState, evaluate, train_one_epoch
from dm_audit.errors import ConfigError, DataError
from dm_audit.inference import predict_proba
from dm_audit.memory import release_unused_memory
from dm_audit.models import AuditModel
from dm_audit.progress import progress_bar
from dm_audit.train_config import MLP_DECAY_ROWS, MLP_WEIGHT_DECAY, TrainConfig

__all__ = [
    "CHECKPOINT_NAME",
    "CHECKPOINT_SECONDS_ENV",
    "DEFAULT_CHECKPOINT_SECONDS",
    "MLP_DECAY_ROWS",
    "MLP_WEIGHT_DECAY",
    "FitResult",
    "TrainConfig",
    "fit",
    "predict_proba",
    "prepare_batch",
    "resolve_device",
]

log = logging.getLogger(__name__)

# Least seconds of training between two checkpoints, checked after each epoch; the last epoch's
# is always written, so a crash loses at most this much training plus one epoch. Written after
# every epoch, the checkpoints took 20 % of a 2,000-row audit (benchmarks/results/audit_time.md);
# a training whose epochs take longer than this is still checkpointed after every epoch. 0
# writes one after every epoch.
CHECKPOINT_SECONDS_ENV = "DM_AUDIT_CHECKPOINT_SECONDS"
DEFAULT_CHECKPOINT_SECONDS = 30.0


def checkpoint_interval() -> float:
    """Seconds between checkpoints: ``DM_AUDIT_CHECKPOINT_SECONDS``, or the default."""
    raw = os.environ.get(CHECKPOINT_SECONDS_ENV, "").strip()
    if not raw:
        return DEFAULT_CHECKPOINT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0.0 or math.isinf(seconds):
        raise ConfigError(
            f"{CHECKPOINT_SECONDS_ENV} must be a number of seconds >= 0 (0: a checkpoint after "
            f"every epoch), got {raw!r}"
        )
    return seconds


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes
    ----------
    model : AuditModel
        The trained model, in eval mode, on the training device.
    history : list of dict
        One entry per epoch run; entries of epochs undone by a collapse recovery stay, flagged
        ``discarded``. An entry holds ``epoch`` (1-based), ``attempt``, ``loss`` (the optimised
        loss), ``train_ce`` (cross entropy of the given labels), ``train_acc`` (against the given
        labels; both from the training passes), ``balanced_acc`` (mean per-class recall on the
        given labels, from the training passes) and ``balanced_acc_chance`` (the highest
        balanced accuracy that still counts as chance; both None with fewer than two classes in
        the labels), ``mean_weight`` (mean per-example emphasis weight), ``emphasis_scale`` (the
        loss's ramp factor, None for losses without one), ``pred_share`` (largest
        predicted-class share), ``lr`` (at the epoch's end), ``seconds``, ``dead_class_share``
        (share of the labels in classes the network has given up on), ``examples_per_s``,
        ``eval_acc`` with an eval set, the six metrics with ``true_labels``, ``alarm`` (a
        collapse symptom, or None), ``collapsed`` and ``discarded``.
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
    effective_loss_params : dict
        The weighting that trained the final model: the keyword arguments with which
        ``dm_audit.losses.create_loss(config.loss, ...)`` rebuilds its loss. That is
        ``loss_params`` (after every collapse recovery: each halves lambda and beta, or T, or
        ProSelfLC's dm_lam and dm_beta) plus the emphasis ``ramp`` in force (a recovery doubles
        it, to at least 0.25) for a loss that ramps, and ProSelfLC's ``total_iterations``.
    lr_scale : float
        Factor on the configured learning-rate schedule in force at the end: 1.0 unless a
        recovery of a loss without emphasis parameters halved it.
    """

    model: AuditModel
    history: list[dict[str, Any]]
    dynamics: TrainingDynamics
    events: list[dict[str, Any]]
    config: TrainConfig
    loss_params: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    effective_loss_params: dict[str, Any] = field(default_factory=dict)
    lr_scale: float = 1.0


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
        Folder for ``checkpoint.pt``, rewritten atomically after an epoch once
        `checkpoint_interval` seconds have passed since the last one, and after the last epoch.
    resume : bool
        Continue from the checkpoint in ``checkpoint_dir`` when there is one (bit-identical to an
        uninterrupted run on CPU). A checkpoint of another configuration or other data raises
        :class:`ConfigError`.
    on_epoch_end : callable, optional
        Called with each kept epoch's history entry after the epoch's checkpoint, when one is
        due, is written.

    Returns
    -------
    FitResult
        Model (eval mode), history (see :class:`FitResult`), dynamics, events, config, and the
        emphasis in force at the end.

    Notes
    -----
    Seeding sets the global ``random``, NumPy and torch seeds (like most training scripts).

    While a ``torch.distributed`` process group of more than one process is active (e.g. under
    ``torchrun``, see :func:`dm_audit.distributed.process_group`), every process calls ``fit``
    with the same arguments and trains one model with DistributedDataParallel:
    ``config.batch_size`` is the global batch, each rank takes its slice of it, and the run
    follows the single-process trajectory up to floating-point summation order (see
    :mod:`dm_audit.distributed`). Every rank returns the same result; only rank 0 writes the
    checkpoint.
    """
    x, y, eval_set, t = _checked_data(
        inputs, labels, config, num_classes, eval_inputs, eval_labels, true_labels
    )
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and ckpt is None:
        raise ConfigError("resume=True needs a checkpoint_dir")

    with determinism(config.deterministic, resolve_device(config.device)):
        run = _Run.start(x, y, config, int(num_classes), ckpt)
        if resume and not _resume(run):
            log.info("no checkpoint in %s; starting a new run", ckpt)
        _train(run, eval_set=eval_set, true_labels=t, on_epoch_end=on_epoch_end)
        run.state.unwrap()
    # The batches' tensors are freed; malloc keeps their blocks unless asked.
    release_unused_memory()
    return run.result()


def _checked_data(
    inputs: np.ndarray,
    labels: np.ndarray,
    config: TrainConfig,
    num_classes: int,
    eval_inputs: np.ndarray | None,
    eval_labels: np.ndarray | None,
    true_labels: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None, np.ndarray | None]:
    """`fit`'s arguments checked: inputs, labels, the eval set and the true labels (or None)."""
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(num_classes, int | np.integer) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    x = check_inputs(inputs)
    y = check_labels(labels, len(x), num_classes, "labels", allow_open=False)
    if len(x) < 2:
        raise DataError(f"need at least 2 training examples, got {len(x)}")
    eval_set = None
    if (eval_inputs is None) != (eval_labels is None):
        raise ConfigError("give both eval_inputs and eval_labels, or neither")
    if eval_inputs is not None:
        ex = check_inputs(eval_inputs, "eval_inputs")
        if ex.shape[1:] != x.shape[1:]:
            raise DataError(
                f"eval_inputs have shape {ex.shape[1:]} per example, training inputs {x.shape[1:]}"
            )
        ey = check_labels(eval_labels, len(ex), num_classes, "eval_labels", allow_open=False)
        eval_set = (ex, ey)
    t = None
    if true_labels is not None:
        t = check_labels(true_labels, len(x), num_classes, "true_labels", allow_open=True)
    return x, y, eval_set, t


@dataclass(eq=False)
class _Run:
    """One `fit` call: the trajectory, its collapse guard, and what the run reports."""

    state: TrainState
    guard: CollapseGuard
    dynamics: TrainingDynamics
    checkpoint: Path | None  # the checkpoint file, None: no checkpoints
    fingerprint: dict[str, Any]  # of the training data, checked on resume
    history: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_every: float = DEFAULT_CHECKPOINT_SECONDS
    last_checkpoint: float = field(default_factory=time.monotonic)

    def checkpoint_due(self, *, last_epoch: bool) -> bool:
        """Whether this epoch's checkpoint is written (`checkpoint_interval`)."""
        now = time.monotonic()
        if last_epoch or now - self.last_checkpoint >= self.checkpoint_every:
            self.last_checkpoint = now
            return True
        return False

    @classmethod
    def start(
        cls,
        inputs: np.ndarray,
        labels: np.ndarray,
        config: TrainConfig,
        num_classes: int,
        checkpoint_dir: Path | None,
    ) -> _Run:
        fingerprint = data_fingerprint(inputs, labels, num_classes)
        state = TrainState.create(inputs, labels, config, num_classes)
        guard = CollapseGuard(
            config,
            label_share=float(state.data.label_freq.max()),
            total_iters=state.total_iters,
        )
        # The defaults the loss filled in are in force too: a recovery halves them as well.
        guard.loss_params = with_emphasis_defaults(config.loss, guard.loss_params, state.loss_fn)
        return cls(
            state=state,
            guard=guard,
            dynamics=TrainingDynamics(len(labels), config.epochs, source=config.dynamics_source),
            checkpoint=checkpoint_dir / CHECKPOINT_NAME if checkpoint_dir else None,
            fingerprint=fingerprint,
            checkpoint_every=checkpoint_interval() if checkpoint_dir else math.inf,
        )

    def result(self) -> FitResult:
        params = dict(self.guard.loss_params)
        # What the loss was created with beyond its parameters: the ramp, ProSelfLC's clock.
        built = {k: v for k, v in self.state.loss_kwargs.items() if k not in params}
        return FitResult(
            model=self.state.model,
            history=self.history,
            dynamics=self.dynamics,
            events=self.events,
            config=self.state.config,
            loss_params=params,
            recipe=self.state.recipe(),
            effective_loss_params=plain(params | built),
            lr_scale=float(self.guard.lr_scale),
        )


def _train(
    run: _Run,
    *,
    eval_set: tuple[np.ndarray, np.ndarray] | None,
    true_labels: np.ndarray | None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Epochs until ``config.epochs`` are kept: train, evaluate, check, checkpoint."""
    state, guard, config = run.state, run.guard, run.state.config
    if guard.enabled and guard.snapshot is None and state.epoch == 0:
        # The initial weights: the rollback target of last resort.
        guard.snapshot = state_of(state, detach=True)
    bar = progress_bar(
        total=state.total_iters,
        initial=state.global_iter,
        disable=not config.progress or not distributed.is_main(),
        desc=config.progress_label or f"train {config.loss}",
        unit="it",
        dynamic_ncols=True,
    )
    try:
        while state.epoch < config.epochs:
            stats = train_one_epoch(state, run.dynamics, bar)
            entry = evaluate(
                state,
                stats,
                run.dynamics,
                attempt=guard.attempt,
                eval_set=eval_set,
                true_labels=true_labels,
            )
            run.history.append(entry)
            previous = run.history[-2] if len(run.history) >= 2 else None
            verdict = guard.assess(entry, previous, state.epoch, state.global_iter)
            if verdict == "collapse":
                target = guard.recover(entry, run.history, run.events)
                if target is not None:
                    _roll_back(run, target)
                    bar.n = state.global_iter
                    bar.refresh()
                    continue
            run.dynamics.end_epoch(state.epoch)
            state.epoch += 1
            if guard.enabled and verdict == "passed":
                guard.snapshot = state_of(state, detach=True)
            # A collapsed epoch is not checkpointed while the guard may still roll it back.
            if (
                verdict != "collapse" or not guard.enabled or guard.attempt >= guard.retries
            ) and run.checkpoint_due(last_epoch=state.epoch >= config.epochs):
                _save_checkpoint(run)
            if on_epoch_end is not None:
                on_epoch_end(entry)
    finally:
        bar.close()
    state.model.eval()


def _roll_back(run: _Run, target: dict[str, Any]) -> None:
    """Continue from ``target`` (a snapshot) with the emphasis the guard has just reduced."""
    state, guard = run.state, run.guard
    restore_state(state, target)
    state.set_lr_scale(guard.lr_scale)
    state.set_loss(guard.loss_params, guard.ramp)
    run.dynamics.truncate(state.epoch)


def _save_checkpoint(run: _Run) -> None:
    # Every rank holds the same state; rank 0 writes it.
    if run.checkpoint is None or not distributed.is_main():
        return
    state = run.state
    write_checkpoint(
        run.checkpoint,
        state,
        config=state.config.to_dict(),
        data=run.fingerprint,
        guard=run.guard.state_dict(),
        history=plain(run.history),
        events=plain(run.events),
        dynamics=run.dynamics.state_dict(),
        snapshot=run.guard.snapshot_entry(state.epoch, state.global_iter),
    )


def _resume(run: _Run) -> bool:
    """Continue from the run's checkpoint; False when there is none."""
    path, state, guard = run.checkpoint, run.state, run.guard
    if path is None or not path.is_file():
        return False
    checkpoint = read_checkpoint(path)
    check_resumable(checkpoint, state.config.to_dict(), run.fingerprint, path)
    guard.load_state_dict(checkpoint["guard"])
    state.set_loss(guard.loss_params, guard.ramp)
    restore_state(state, checkpoint)
    state.set_lr_scale(guard.lr_scale)
    run.history = list(checkpoint["history"])
    run.events = list(checkpoint["events"])
    run.dynamics.load_state_dict(checkpoint["dynamics"])
    snapshot = checkpoint.get("snapshot")
    guard.snapshot = state_of(state, detach=True) if snapshot == "current" else snapshot
    run.events.append({"event": "resume", "epoch": state.epoch, "checkpoint": str(path)})
    return True
