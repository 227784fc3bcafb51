"""The audit's three trainings: the probe, the audit training and the retrain.

Each is a cross-fitted pair of models (`dm_audit.crossfit`): the probe estimates the noise and
chooses the DM emphasis from it, the audit training produces the models every row is scored
with, and the retrain fits the final models on the corrected labels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dm_audit import estimate
from dm_audit.config import AuditConfig
from dm_audit.crossfit import (
    CROSSFIT_FOLDS,
    MIN_TRAIN_ROWS,
    audited,
    dataset_folds,
    dm_params,
    make_train_config,
    out_of_sample_probs,
    probe_epochs,
    train_crossfit,
    training_epochs,
)
from dm_audit.dataset import AuditDataset
from dm_audit.progress import announce, duration
from dm_audit.stage_results import AuditFit, Corrections, ExampleScores, ProbeResult, Retrained
from dm_audit.training import FitResult

log = logging.getLogger(__name__)

# GR's all-round default emphasis: robust enough not to fit the noise during a short probe.
PROBE_EMPHASIS = {"lam": 0.5, "beta": 8.0}
# Below this many rows the noise estimate is uncertain: each half-model learns from a few
# dozen examples per class, so out-of-sample errors of a weak model read as noise.
SMALL_TRAINING_SET = 500


def probe(
    dataset: AuditDataset,
    config: AuditConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> ProbeResult:
    """Estimate the noise rate and choose the DM emphasis (λ, β) from it.

    Two short cross-fitted trainings with GR's all-round default emphasis (β = 8, λ = 0.5)
    give every row an out-of-sample probability vector, and confident learning's calibrated
    confident joint (`estimate.estimate_noise`) turns them into the noise rate and the noise
    matrix: no threshold of ours is involved, and the two halves cost one training on all rows.
    The rate chooses λ and β (`estimate.choose_emphasis`: the published picks of DM and GR at
    known noise rates).

    `checkpoint_dir`, `resume` and `on_epoch_end` go to `dm_audit.training.fit` (one
    sub-folder per fold).
    """
    start = time.perf_counter()
    data = audited(dataset)
    labels = data.label_codes()
    folds = dataset_folds(data, config)
    epochs = probe_epochs(config, len(labels))
    inputs = data.inputs()
    models = train_crossfit(
        data,
        inputs,
        folds,
        lambda k, n_train: make_train_config(
            config,
            n_train=n_train,
            input_kind=data.input_kind,
            loss="dm",
            loss_params=dict(PROBE_EMPHASIS),
            epochs=epochs,
            seed_offset=1 + k,
            label=f"1/3 probe {k + 1}/{CROSSFIT_FOLDS}",
        ),
        evaluate=False,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        on_epoch_end=on_epoch_end,
    )
    probs = out_of_sample_probs(models, inputs, data.n_classes, config.device)
    noise = estimate.estimate_noise(probs, labels, min_class_rows=CROSSFIT_FOLDS)
    noise_rate = float(noise.rate)
    if len(labels) < SMALL_TRAINING_SET:
        _warn_about_small_set(len(labels), noise_rate)
    choice = _emphasis(config, noise_rate, dataset.n_classes)
    log.info(
        "probe: estimated noise rate %.3f -> lam=%.2f beta=%.2f",
        noise_rate,
        choice.lam,
        choice.beta,
    )
    adaptive = config.lam is None
    return ProbeResult(
        noise_rate,
        noise,
        choice,
        adaptive,
        time.perf_counter() - start,
        folds,
        probs,
        _epoch_seconds(models.fits),
    )


def _epoch_seconds(fits: list[FitResult]) -> float | None:
    """Seconds of one epoch of every fold model together: each model's median epoch (the
    first epoch also pays one-off start-up costs), summed; None without a recorded epoch."""
    medians = [
        float(np.median([h["seconds"] for h in f.history if "seconds" in h]))
        for f in fits
        if any("seconds" in h for h in f.history)
    ]
    return float(sum(medians)) if medians else None


def _emphasis(config: AuditConfig, noise_rate: float, n_classes: int) -> estimate.EmphasisChoice:
    """λ and β fixed by the user, else chosen from the estimated noise rate."""
    if config.lam is not None:
        return estimate.EmphasisChoice(
            lam=float(config.lam), beta=float(config.beta), reason="fixed by the user"
        )
    return estimate.choose_emphasis(noise_rate, n_classes)


def _warn_about_small_set(n_rows: int, noise_rate: float) -> None:
    log.warning(
        "only %d rows: the estimated noise rate (%.1f%%), and with it the chosen emphasis "
        "and the flags, are uncertain below %d; consider fixing --lam/--beta or reviewing "
        "by --top-k",
        n_rows,
        100 * noise_rate,
        SMALL_TRAINING_SET,
    )


def train_audit_model(
    dataset: AuditDataset,
    probe_result: ProbeResult,
    config: AuditConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> AuditFit:
    """Train the cross-fitted audit models with the chosen DM emphasis.

    Model k trains on every row outside fold k; with two folds the two halves cost as much as
    one training on all rows, and every row gets both an in-sample trajectory (p_i at every
    epoch under the model that trains on it) and an out-of-sample prediction.

    With ``correction_source="proselflc"`` the loss is ProSelfLC with annealed temperature whose
    gradient magnitude is rescaled by the same DM weights, so the run also yields corrected
    targets; otherwise plain DM.
    """
    start = time.perf_counter()
    data = audited(dataset)
    folds = probe_result.folds if probe_result.folds is not None else dataset_folds(data, config)
    choice = probe_result.choice
    if config.correction_source == "proselflc":
        loss, params = "proselflc", {"dm_lam": choice.lam, "dm_beta": choice.beta}
    else:
        loss, params = "dm", dm_params(choice)
    epochs = training_epochs(config, len(data))
    if config.progress:
        announce(training_plan(probe_result, config, len(data), epochs, data.input_kind))
    models = train_crossfit(
        data,
        data.inputs(),
        folds,
        lambda k, n_train: make_train_config(
            config,
            n_train=n_train,
            input_kind=data.input_kind,
            loss=loss,
            loss_params=params,
            epochs=epochs,
            seed_offset=10 * k,
            label=f"2/3 audit {k + 1}/{CROSSFIT_FOLDS}",
        ),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        on_epoch_end=on_epoch_end,
    )
    return AuditFit(models, choice, time.perf_counter() - start, probe_result.probs)


def training_plan(
    probe_result: ProbeResult,
    config: AuditConfig,
    n_rows: int,
    epochs: int,
    input_kind: str = "features",
) -> str:
    """The audit's remaining training, and its expected time read off the probe's.

    The probe trained the same model on the same folds, so its seconds per epoch, measured on
    this machine (`ProbeResult.epoch_seconds`: the median epoch, without the first epoch's
    start-up costs; else the probe's whole time over its epochs), times the epochs still to
    come estimate the rest: the audit training and (unless switched off) the retrain, each
    `epochs` long.
    """
    probe_epochs_done = probe_epochs(config, n_rows)
    per_epoch = probe_result.epoch_seconds
    if per_epoch is None:
        per_epoch = probe_result.seconds / max(probe_epochs_done, 1)
    trainings = 2 if config.retrain else 1
    expected = per_epoch * epochs * trainings
    what = "audit training and retrain" if config.retrain else "audit training"
    # The audit training's halves; the retrain's (kept rows only) can get a smaller batch.
    train = make_train_config(
        config,
        loss="dm",
        loss_params={},
        epochs=epochs,
        n_train=n_rows - n_rows // CROSSFIT_FOLDS,
        input_kind=input_kind,
    )
    return (
        f"{what}: {trainings} x {CROSSFIT_FOLDS} cross-fitted models of {epochs} epochs "
        f"(batch {train.batch_size}, lr {train.peak_lr:.3g}) on {n_rows} rows; "
        f"expected about {duration(expected)} at the probe's "
        f"{per_epoch:.2g} s per epoch (--epochs sets a shorter or fuller run)"
    )


def retrain(
    dataset: AuditDataset,
    scores: ExampleScores,
    corrections: Corrections,
    config: AuditConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> Retrained:
    """Cross-fit the final models on the corrected labels, OOD and unresolved rows left out.

    The same folds as the audit: every row gets an out-of-sample prediction from a retrained
    model that never saw it, so the audit and the retrain are compared on the same rows
    (`summary.quality`). The residual noise of the corrected labels is estimated with the audit
    models' out-of-sample probabilities and the emphasis chosen again from it (less noise: a
    smaller λ), unless the user fixed it. `checkpoint_dir`, `resume` and `on_epoch_end` go to
    `dm_audit.training.fit`.
    """
    if not config.retrain:
        return Retrained(None, None, None, 0.0)
    start = time.perf_counter()
    data = audited(dataset)
    keep = corrections.table["include_in_retrain"].to_numpy(dtype=bool)
    skipped = _retrain_impossible(keep, scores.folds)
    if skipped is not None:
        # The audit's flags and suggestions stand without it; failing here would lose them.
        log.warning("no retrain: %s; the reports hold the audit's results alone", skipped)
        return Retrained(None, None, None, time.perf_counter() - start, skipped=skipped)
    corrected = corrections.table["corrected"].to_numpy()
    labels = np.where(keep, corrected, scores.table["given"].to_numpy())
    residual = estimate.estimate_noise(
        scores.probs[keep], labels[keep], min_class_rows=CROSSFIT_FOLDS
    )
    choice = _emphasis(config, residual.rate, dataset.n_classes)
    epochs = training_epochs(config, int(keep.sum()))
    inputs = data.inputs()
    models = train_crossfit(
        data,
        inputs,
        scores.folds,
        lambda k, n_train: make_train_config(
            config,
            n_train=n_train,
            input_kind=data.input_kind,
            loss="dm",
            loss_params=dm_params(choice),
            epochs=epochs,
            seed_offset=100 + 10 * k,
            label=f"3/3 retrain {k + 1}/{CROSSFIT_FOLDS}",
        ),
        labels=labels,
        keep=keep,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        on_epoch_end=on_epoch_end,
    )
    probs = out_of_sample_probs(models, inputs, data.n_classes, config.device)
    return Retrained(models, choice, residual, time.perf_counter() - start, probs)


def _retrain_impossible(keep: np.ndarray, folds: np.ndarray) -> str | None:
    """Why no model of some fold can be retrained on the kept rows, or None.

    Each fold's model trains on the kept rows outside its fold, and a training needs
    `MIN_TRAIN_ROWS` of them (`train_crossfit`). On a tiny table whose labels the inputs
    barely predict, most rows can go to review and leave a fold's model one row or none.
    """
    for k in range(int(folds.max()) + 1):
        n_train = int(((folds != k) & keep).sum())
        if n_train < MIN_TRAIN_ROWS:
            return (
                f"{int(keep.sum())} of {keep.size} rows kept their label or were corrected, "
                f"leaving the model of fold {k + 1} {n_train} row(s) to train on"
            )
    return None
