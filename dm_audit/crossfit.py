"""Cross-fitting: every row trained on by one model and scored out of sample by another.

The rows are dealt into `CROSSFIT_FOLDS` stratified folds (`fold_assignment`) and model k trains
on every row outside fold k (`train_crossfit`), so each row has an in-sample trajectory under the
model that trains on it and an out-of-sample prediction (`out_of_sample_probs`) from the one
that never saw it. Also here: how many epochs a training of a given size gets and the training
options each stage derives from the audit's configuration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dm_audit import estimate
from dm_audit.batches import RowSubset, check_inputs
from dm_audit.config import AuditConfig
from dm_audit.dataset import AuditDataset
from dm_audit.errors import ConfigError
from dm_audit.heavy_tails import tame_heavy_tails
from dm_audit.inference import predict_class_probs
from dm_audit.stage_results import CrossFit
from dm_audit.training import FitResult, TrainConfig, fit

# Two folds: two models on halves cost one training on all rows (the product's budget), and
# every row is trained on by exactly one model (its dynamics) and scored by the other.
CROSSFIT_FOLDS = 2

# A fold's model needs at least this many rows to train on.
MIN_TRAIN_ROWS = 2

# The automatic batch: the CIFAR ResNet recipe's 128 (He et al. 2016), which the learning rate
# 0.1 belongs to.
AUTO_BATCH_SIZE = 128
# A conv net on a small training set still gets this many steps per epoch: a batch of 128 gives
# 150 images 2 steps per epoch (120 in a 60-epoch training, 30 in the probe), too few for a
# 20-layer net with batch norm to settle at lr 0.1 (He et al. warm up even deeper nets at 0.01
# for 400 steps). On 300 clean sklearn digits as 8x8 PNGs the probe then read 23 % noise and
# the audit flagged 13 rows (4.3 %) with 4 collapse rollbacks, retrained accuracy 0.972 ->
# 0.948 (one CLI audit of such a folder); with batches of 18 (9 steps per epoch, lr scaled with
# it) the probe reads 1.9 % and 1 row is flagged (0.970 -> 0.980), and with 30 % symmetric
# noise F1 rises 0.842 -> 0.905 (0.808 -> 0.853 at 16x16). benchmarks/clean_tables.py's own
# folders (other files, other folds): 13 -> 4, 5 -> 2 and 15 -> 5 flagged (8x8, 16x16, mixed
# modes); the generality benchmark's 200-image dev folder: mean F1 0.763 -> 0.864 at 20-40 %
# noise. Small feature tables keep 128: the 2-layer MLP trains in few steps (wine: 89 rows per
# fold, one step per epoch) and its defaults were chosen at that batch on the development tables
# of benchmarks/generality.py.
CONV_MIN_STEPS_PER_EPOCH = 8
# Below 16 images batch norm's batch statistics get noisy, so a fold of fewer than 128 images
# gets fewer than 8 steps (100 images: 7).
CONV_MIN_BATCH_SIZE = 16
# A large feature table gets larger batches, doubled from 128 while an epoch keeps at least
# `FEATURE_MIN_STEPS_PER_EPOCH` steps, up to `FEATURE_MAX_BATCH_SIZE`, with the rate scaled by
# the same factor (the linear scaling rule: an epoch moves the weights about as far, and L2
# decay per epoch stays the same). Why: much of a step of the MLP costs the same at any batch:
# on a 20,000-row table on 2 CPU cores the optimiser step and the rest of each step (zero_grad,
# the scheduler, the batch to the device) took 7.6 s beside forward and backward's 16 s
# (benchmarks/results/audit_time.md, before this rule).
# Ten steps per epoch leave every table of up to 5,118 rows its batch of 128 (each fold trains
# on half of them), so the tables the defaults were chosen on keep their training. Measured on
# the two development tables above that size against a fixed 128, one audit per setting at
# 0/20/40 % symmetric, pair and instance noise (benchmarks/results/batch_size.md, 2 cores):
# synth-binary-mid (10,000 rows, batches of 256) mean F1 at 20-40 % 0.568 -> 0.578, AUROC
# 0.932 -> 0.929, clean table flagged 1.9 -> 1.5 %, seconds to the flags 11.7 -> 8.4; HI
# (22,272 rows, 512) F1 0.465 -> 0.460, AUROC 0.861 -> 0.854, clean 10.9 -> 11.1 %, seconds
# 30.9 -> 16.9. The same flags within sampling noise, in half the time on the larger table.
# Afterwards, on held-out tables (not used to choose): the generality benchmark's test table
# synth-imbalanced (10,000 rows) 0.618 -> 0.625, clean 3.3 -> 3.0 %; the held-out real pool's
# Caravan, Default and fair 0.507, 0.515, 0.403 -> 0.511, 0.528, 0.398.
# 512 is the largest batch measured (rate 0.4, no warm-up).
FEATURE_MIN_STEPS_PER_EPOCH = 10
FEATURE_MAX_BATCH_SIZE = 512


def auto_epochs(n: int) -> int:
    """Epochs for a training set of n examples: small sets need more passes to converge."""
    if n <= 5_000:
        return 60
    if n <= 50_000:
        return 40
    if n <= 500_000:
        return 20
    return 8


def training_epochs(config: AuditConfig, n: int) -> int:
    """Epochs of the audit training or the retrain on n rows: the user's, else by size."""
    return config.epochs if config.epochs is not None else auto_epochs(n)


def probe_epochs(config: AuditConfig, n: int) -> int:
    """Epochs of the probe on n rows: the user's, else a quarter of a training (at least 5)."""
    if config.probe_epochs is not None:
        return config.probe_epochs
    # Short on purpose: the probe must stop before the network starts to memorise the noise.
    return max(5, training_epochs(config, n) // 4)


def is_conv_net(model: str, input_kind: str) -> bool:
    """Whether the model trains on images as a conv net: every image model but ``"mlp"``
    (``"auto"`` picks a ResNet for images); on feature tables no model is one."""
    return input_kind == "image" and model != "mlp"


def training_batch(config: AuditConfig, n_train: int | None, input_kind: str) -> tuple[int, float]:
    """Batch size of a training on ``n_train`` rows, and the factor on the default learning rate.

    The user's ``batch_size`` is kept as given (factor 1). Automatic: `AUTO_BATCH_SIZE`; for a
    conv net whose training set gives fewer than `CONV_MIN_STEPS_PER_EPOCH` steps per epoch a
    batch that gives that many where batches of `CONV_MIN_BATCH_SIZE` allow; for any other model
    on a training set large enough, `AUTO_BATCH_SIZE` doubled while an epoch keeps at least
    `FEATURE_MIN_STEPS_PER_EPOCH` steps, up to `FEATURE_MAX_BATCH_SIZE`. The rate scales by the
    same factor (the linear scaling rule, Goyal et al. 2017: an epoch moves the weights about as
    far as before, in fewer or more steps).
    """
    if config.batch_size is not None:
        return config.batch_size, 1.0
    batch = AUTO_BATCH_SIZE
    if n_train is not None and is_conv_net(config.model, input_kind):
        batch = min(batch, max(CONV_MIN_BATCH_SIZE, n_train // CONV_MIN_STEPS_PER_EPOCH))
    elif n_train is not None:
        largest = min(FEATURE_MAX_BATCH_SIZE, n_train / FEATURE_MIN_STEPS_PER_EPOCH)
        while 2 * batch <= largest:
            batch *= 2
    return batch, batch / AUTO_BATCH_SIZE


def make_train_config(
    config: AuditConfig,
    *,
    loss: str,
    loss_params: dict[str, Any],
    epochs: int,
    n_train: int | None = None,
    input_kind: str = "features",
    seed_offset: int = 0,
    label: str = "",
) -> TrainConfig:
    """The options of one fold's training: the audit's model, device and learning rate, the
    batch size for its ``n_train`` rows of ``input_kind`` (`training_batch`), with this
    training's loss, epochs, seed offset and progress label."""
    batch, lr_factor = training_batch(config, n_train, input_kind)
    options: dict[str, Any] = {
        "model": config.model,
        "loss": loss,
        "loss_params": loss_params,
        "epochs": epochs,
        "batch_size": batch,
        "device": config.device,
        "seed": config.seed + seed_offset,
        "progress": config.progress,
        "progress_label": label,
    }
    train = TrainConfig(**options)
    if config.lr is not None:
        return dataclasses.replace(train, lr=config.lr)
    if lr_factor != 1.0:
        return dataclasses.replace(train, lr=train.peak_lr * lr_factor)
    return train


def dm_params(choice: estimate.EmphasisChoice) -> dict[str, Any]:
    """The DM loss's options for an emphasis choice."""
    return {"lam": float(choice.lam), "beta": float(choice.beta)}


def audited(dataset: AuditDataset) -> AuditDataset:
    """The dataset as the audit reads it: every row (the audit covers the training and the test
    split alike), heavy-tailed feature columns by the normal scores of their ranks
    (`dm_audit.heavy_tails`)."""
    if len(dataset) == 0:
        raise ConfigError(f"dataset {dataset.source!r} has no rows to audit")
    return tame_heavy_tails(dataset)


def true_codes(dataset: AuditDataset) -> np.ndarray | None:
    """The true label codes when the noise was synthetic (-1 for an open-set row), else None."""
    return dataset.true_label_codes() if dataset.has_truth else None


def fold_assignment(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Stratified cross-fitting folds: each class's rows dealt to the folds in a seeded order.

    Every class with at least `n_folds` rows appears in every fold, so each model trains on
    every such class. Each class continues where the previous one stopped, so the fold sizes
    differ by at most one.

    Parameters
    ----------
    labels : ndarray (N,) int
    n_folds : int
        Number of folds, at least 2.
    seed : int

    Returns
    -------
    ndarray (N,) int64
        The fold of every row, in ``0..n_folds-1``.
    """
    if n_folds < 2:
        raise ConfigError(f"cross-fitting needs at least 2 folds, got {n_folds}")
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    folds = np.empty(y.size, dtype=np.int64)
    offset = 0
    for cls in np.unique(y):
        rows = np.flatnonzero(y == cls)
        rows = rows[rng.permutation(rows.size)]
        # Start each class where the previous one stopped, so small classes do not all put
        # their single extra row into fold 0.
        folds[rows] = (np.arange(rows.size) + offset) % n_folds
        offset = (offset + rows.size) % n_folds
    return folds


def dataset_folds(dataset: AuditDataset, config: AuditConfig) -> np.ndarray:
    """The cross-fitting folds of the dataset's rows, stratified by the given label."""
    return fold_assignment(dataset.label_codes(), CROSSFIT_FOLDS, config.seed)


def _fold_checkpoint(checkpoint_dir: str | Path | None, k: int) -> Path | None:
    return None if checkpoint_dir is None else Path(checkpoint_dir) / f"fold{k}"


def train_crossfit(
    dataset: AuditDataset,
    inputs: np.ndarray,
    folds: np.ndarray,
    make_config: Callable[[int, int], TrainConfig],
    *,
    labels: np.ndarray | None = None,
    keep: np.ndarray | None = None,
    evaluate: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> CrossFit:
    """Train one model per fold on the rows outside it (and inside `keep`).

    `inputs` are the dataset's decoded inputs (decoded once per stage: images are costly; for
    features, the audited ones, whose heavy-tail map the returned models carry);
    `make_config(k, n_train)` gives the training options of fold k's model, which trains on
    n_train rows. With `evaluate`, each model is evaluated after every epoch on its own fold
    (kept rows, given or corrected `labels`): the ``eval_acc`` of its history is out of sample.
    """
    # Checked (and made C-ordered float32) once: each fold's subsets then share this array.
    inputs = check_inputs(inputs)
    y = dataset.label_codes() if labels is None else np.asarray(labels)
    keep = np.ones(y.size, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    truth = true_codes(dataset)
    fits: list[FitResult] = []
    for k in range(int(folds.max()) + 1):
        train_rows = np.flatnonzero((folds != k) & keep)
        held_out = np.flatnonzero((folds == k) & keep)
        if train_rows.size < MIN_TRAIN_ROWS:
            raise ConfigError(
                f"cross-fitting fold {k} leaves {train_rows.size} row(s) to train on; "
                "an audit needs more rows"
            )
        fits.append(
            fit(
                # Subsets, not copies: the rows are gathered batch by batch.
                RowSubset(inputs, train_rows),
                y[train_rows],
                make_config(k, train_rows.size),
                num_classes=dataset.n_classes,
                eval_inputs=RowSubset(inputs, held_out) if evaluate and held_out.size else None,
                eval_labels=y[held_out] if evaluate and held_out.size else None,
                true_labels=None if truth is None else truth[train_rows],
                checkpoint_dir=_fold_checkpoint(checkpoint_dir, k),
                resume=resume,
                on_epoch_end=on_epoch_end,
            )
        )
    # The map the inputs went through (their dataset's, `audited`) goes with the models, so that
    # every copy of them predicts new rows the way they were trained.
    return CrossFit(fits, folds, input_map=dataset.heavy_tail_map)


def out_of_sample_probs(
    models: CrossFit, inputs: np.ndarray, n_classes: int, device: str
) -> np.ndarray:
    """Class probabilities of every row under the model that did not train on its fold."""
    inputs = check_inputs(inputs)  # once, not per fold
    probs = np.zeros((len(inputs), n_classes), dtype=np.float32)
    for k, f in enumerate(models.fits):
        rows = np.flatnonzero(models.folds == k)
        if rows.size:
            probs[rows] = predict_class_probs(
                f.model, inputs, device=device, batch_size=1024, rows=rows
            )
    return probs
