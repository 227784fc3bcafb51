"""The audit end to end: probe, cross-fitted DM training, flags, corrections, retrain, reports.

Each stage is a function of the previous stages' results, so the CLI (`run_audit`) and the Dagster
assets (one asset per stage) run exactly the same code::

    probe -> train_audit_model -> score_examples -> flag_examples -> correct_labels -> retrain
          -> build_report -> write_report

Every row is audited. The trainings are cross-fitted: the rows are dealt into `CROSSFIT_FOLDS`
stratified folds and model k trains on every row outside fold k, so each row has an in-sample
trajectory (p_i at every epoch under the model that trains on it: DM's signal) and an
out-of-sample prediction (the signal confident learning needs), and two halves cost as much as
one training on all rows. The audit and the retrained models are compared out of sample on the
same rows; a ``split`` column of the input only annotates the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from dm_audit import class_health, correction, duplicates, estimate, flags, neighbours, reports
from dm_audit.atomic import check_output_location, resolve_output_dir
from dm_audit.config import AuditConfig
from dm_audit.dataset import AuditDataset
from dm_audit.emphasis import create_weighting, plot_weighting_curves
from dm_audit.errors import ConfigError, DMAuditError
from dm_audit.faults import kill_point
from dm_audit.losses import create_loss
from dm_audit.metrics import accuracy, mcnemar_worse_p
from dm_audit.reviews import read_reviews
from dm_audit.scoring import (
    SCORES_SCHEMA,
    STREAM_THRESHOLD,
    score_columns,
    write_scores_stream,
)
from dm_audit.training import FitResult, TrainConfig, fit, predict_proba
from dm_audit.workdir import WorkDir, discard_work, run_identity

log = logging.getLogger(__name__)

# Sharpens the audit model's prediction into a suggestion, as ProSelfLC's annealed temperature
# sharpens its self-knowledge (METHOD.md §3 uses T = 0.5 on image data).
SUGGESTION_TEMPERATURE = 0.5
# GR's all-round default emphasis: robust enough not to fit the noise during a short probe.
PROBE_EMPHASIS = {"lam": 0.5, "beta": 8.0}
# Two folds: two models on halves cost one training on all rows (the product's budget), and
# every row is trained on by exactly one model (its dynamics) and scored by the other.
CROSSFIT_FOLDS = 2
# The OOD distance is to the nearest trusted example: the sharpest on digits (AUROC 0.91 at k=1,
# 0.90 at 3, 0.89 at 10).
OOD_NEIGHBOUR = 1
# False discovery rate of the OOD test (Benjamini-Hochberg on conformal p-values against the
# unflagged rows): the conventional 5 %; on in-distribution data the chance of any OOD flag is
# then at most about 5 %, whatever the size of the table.
OOD_FDR = 0.05
# A flagged example whose OOD score exceeds that of 75 % of the unflagged examples is sent to
# review instead of being corrected automatically.
OOD_REVIEW_FPR = 0.25
# Columns `flag_examples` adds from `dm_audit.duplicates`.
DUPLICATE_COLUMNS = (
    "near_duplicate_score",
    "is_near_duplicate",
    "near_duplicate_set",
    "is_leaked_duplicate",
)
# The retrained models count as worse than the audit models when the one-sided exact McNemar
# test on the rows only one of them gets right says so at this conventional level (the
# Dagster check `retrain_not_worse` uses the same default); the CLI then exits with status 3.
RETRAIN_WORSE_ALPHA = 0.05
# Below this many rows the noise estimate is uncertain: each half-model learns from a few
# dozen examples per class, so out-of-sample errors of a weak model read as noise.
SMALL_TRAINING_SET = 500


# ============================================================================================
# stage results


@dataclass
class ProbeResult:
    """The noise estimate of the probe and the emphasis it chose.

    Attributes
    ----------
    noise_rate : float
        Estimated share of wrong labels: the calibrated confident joint of the probe's
        out-of-sample probabilities (``estimate.rate``).
    estimate : NoiseEstimate
        The confident-joint estimate (its class-to-class noise matrix).
    choice : EmphasisChoice
        λ and β for the audit training (fixed by the user, or chosen from the estimate).
    adaptive : bool
        Whether λ and β were chosen from the estimate (False when the user fixed them).
    seconds : float
    folds : ndarray (N,) int
        The cross-fitting fold of every row (the audit training uses the same folds).
    probs : ndarray (N, C) float32
        The probe's out-of-sample probabilities (the flags' count uses them again).
    """

    noise_rate: float
    estimate: estimate.NoiseEstimate
    choice: estimate.EmphasisChoice
    adaptive: bool
    seconds: float
    folds: np.ndarray | None = None
    probs: np.ndarray | None = None


@dataclass
class CrossFit:
    """K models of one training, model k trained on every row outside fold k.

    Attributes
    ----------
    fits : list of FitResult
        ``fits[k]`` never saw the rows of fold k, so its predictions for them are out of sample.
    folds : ndarray (N,) int
        The fold of every row of the dataset.
    """

    fits: list[FitResult]
    folds: np.ndarray

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every fold's per-epoch history, each entry tagged with its ``fold``."""
        return [{"fold": k, **entry} for k, f in enumerate(self.fits) for entry in f.history]

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every fold's training events (collapses, recoveries), tagged with their ``fold``."""
        return [{"fold": k, **event} for k, f in enumerate(self.fits) for event in f.events]

    def predict_proba(self, inputs: np.ndarray, *, device: str = "auto") -> np.ndarray:
        """Class probabilities of new inputs: the mean of the K models' probabilities, (M, C).

        Every model trained on (K-1)/K of the rows; averaging them uses all of the data.
        """
        total: np.ndarray | None = None
        for f in self.fits:
            probs, _ = predict_proba(f.model, inputs, device=device, batch_size=1024)
            total = probs.astype(np.float64) if total is None else total + probs
        assert total is not None  # a CrossFit holds at least two models
        return (total / len(self.fits)).astype(np.float32)

    def in_sample_summary(self, n_rows: int) -> pd.DataFrame:
        """Training-dynamics summary of every row under the models that trained on it.

        A row of fold k was trained on by every model but model k; with two folds that is
        exactly one model. With more, the numeric statistics are averaged over those models.
        """
        frames: list[pd.DataFrame] = []
        for k, f in enumerate(self.fits):
            rows = np.flatnonzero(self.folds != k)
            part = f.dynamics.summary()
            if len(part) != rows.size:
                # A retrain leaves some rows out: its dynamics cover only the rows it used.
                continue
            part.index = rows
            frames.append(part)
        if not frames:
            return pd.DataFrame(index=np.arange(n_rows))
        stacked = pd.concat(frames)
        return stacked.groupby(level=0).mean().reindex(np.arange(n_rows))

    def in_sample_p_history(self, n_rows: int) -> np.ndarray:
        """p_i of every row at every epoch under the (first) model that trained on it, (N, E)."""
        epochs = max((f.dynamics.n_recorded for f in self.fits), default=0)
        out = np.full((n_rows, epochs), np.nan, dtype=np.float32)
        filled = np.zeros(n_rows, dtype=bool)
        for k, f in enumerate(self.fits):
            rows = np.flatnonzero(self.folds != k)
            p = np.asarray(f.dynamics.p_matrix(), dtype=np.float32)
            if p.shape[0] != rows.size:
                continue
            take = ~filled[rows]
            out[rows[take], : p.shape[1]] = p[take]
            filled[rows[take]] = True
        return out


@dataclass
class AuditFit:
    """The cross-fitted DM audit models (every row scored by a model that did not train on it).

    Attributes
    ----------
    models : CrossFit
    choice : EmphasisChoice
        The emphasis requested for the audit training.
    seconds : float
    probe_probs : ndarray (N, C) or None
        The probe's out-of-sample probabilities, carried to the scores.
    """

    models: CrossFit
    choice: estimate.EmphasisChoice
    seconds: float
    probe_probs: np.ndarray | None = None

    @property
    def effective_choice(self) -> estimate.EmphasisChoice:
        """The emphasis that trained the models, after any collapse-guard reduction."""
        return _effective_choice(self.choice, self.models)


@dataclass
class ExampleScores:
    """Per-row scores under the audit models, every row out of sample.

    Attributes
    ----------
    table : DataFrame, N rows (dataset order)
        ``example_id``, ``fold``, ``given`` (code), ``p_given``, ``emphasis_weight``,
        ``predicted`` (code), ``predicted_prob``, ``entropy``, ``margin`` (all from the
        out-of-sample model), and the in-sample training-dynamics summary (``mean_p``, ...).
    probs : ndarray (N, C) float32
        Out-of-sample class probabilities.
    embeddings : list of (ndarray (N_k, E) float32 or EmbeddingChunks)
        Fold k's rows embedded by model k (each model has its own embedding space), in memory
        or (at scale) read back chunk by chunk from the fold's scores Parquet file.
    proselflc_targets : ndarray (N, C) or None
        ProSelfLC's corrected targets at the end of training (``correction_source="proselflc"``).
    probe_probs : ndarray (N, C) or None
        The probe's out-of-sample probabilities: a second, independently trained model of each
        fold (see `flag_examples`).
    """

    table: pd.DataFrame
    probs: np.ndarray
    embeddings: list[np.ndarray | neighbours.EmbeddingChunks]
    proselflc_targets: np.ndarray | None = None
    probe_probs: np.ndarray | None = None

    def ensemble_probs(self) -> np.ndarray:
        """Mean of the audit's and the probe's out-of-sample probabilities (the audit's alone
        when the probe's are unknown)."""
        if self.probe_probs is None or self.probe_probs.shape != self.probs.shape:
            return self.probs
        return ((self.probs.astype(np.float64) + self.probe_probs) / 2.0).astype(np.float32)

    @property
    def folds(self) -> np.ndarray:
        return self.table["fold"].to_numpy()

    def fold_rows(self) -> list[np.ndarray]:
        """Row numbers of each fold, in the order of that fold's embeddings."""
        folds = self.folds
        return [np.flatnonzero(folds == k) for k in range(len(self.embeddings))]


@dataclass
class Flags:
    """Label-issue and out-of-distribution flags of every row."""

    table: pd.DataFrame
    label_issue_threshold: float
    ood_threshold: float
    ood_review_threshold: float
    noise_rate: float
    noise_estimate: estimate.NoiseEstimate
    knn_votes: np.ndarray
    issue_weights: dict[str, float] = field(default_factory=dict)
    # Counts of `duplicates.Duplicates.summary`, and the rows leaked into a held-out split.
    duplicates: dict[str, Any] = field(default_factory=dict)


@dataclass
class Corrections:
    """Suggested and decided labels, with provenance, of every row.

    ``gate`` says whether suggestions could be applied automatically
    (`correction.automatic_correction_gate`).
    """

    table: pd.DataFrame
    plan: correction.CorrectionPlan
    review_report: Any | None = None
    gate: dict[str, Any] = field(default_factory=dict)


@dataclass
class Retrained:
    """The final models, cross-fitted on the corrected labels like the audit models.

    Attributes
    ----------
    models : CrossFit or None
        None when the retrain was switched off.
    choice : EmphasisChoice or None
    residual_estimate : NoiseEstimate or None
    probs : ndarray (N, C) or None
        Out-of-sample probabilities of every row under the retrained models.
    seconds : float
    """

    models: CrossFit | None
    choice: estimate.EmphasisChoice | None
    residual_estimate: estimate.NoiseEstimate | None
    seconds: float
    probs: np.ndarray | None = None

    @property
    def effective_choice(self) -> estimate.EmphasisChoice | None:
        if self.choice is None or self.models is None:
            return self.choice
        return _effective_choice(self.choice, self.models)


@dataclass
class AuditReport:
    """Everything `write_report` writes: report tables, a summary and figures."""

    examples: pd.DataFrame
    label_issues: pd.DataFrame
    corrected_labels: pd.DataFrame
    metrics: pd.DataFrame
    summary: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)
    # Per-class label health (`class_health.class_health`), written as classes.parquet.
    classes: pd.DataFrame | None = None
    # The self-contained report.html (`html_report.render_report`).
    html: str | None = None
    # The final cross-fitted models (the retrained ones, or the audit's without a retrain), for
    # predictions on new inputs (`dm_audit.api.LabelAuditor`); not written to disk.
    final_models: CrossFit | None = None


# ============================================================================================
# helpers


def _auto_epochs(n: int) -> int:
    """Epochs for a training set of n examples: small sets need more passes to converge."""
    if n <= 5_000:
        return 60
    if n <= 50_000:
        return 40
    if n <= 500_000:
        return 20
    return 8


def _epochs(config: AuditConfig, n: int) -> int:
    return config.epochs if config.epochs is not None else _auto_epochs(n)


def _probe_epochs(config: AuditConfig, n: int) -> int:
    if config.probe_epochs is not None:
        return config.probe_epochs
    # Short on purpose: the probe must stop before the network starts to memorise the noise.
    return max(5, _epochs(config, n) // 4)


def _train_config(
    config: AuditConfig,
    *,
    loss: str,
    loss_params: dict[str, Any],
    epochs: int,
    seed_offset: int = 0,
    label: str = "",
) -> TrainConfig:
    options: dict[str, Any] = {
        "model": config.model,
        "loss": loss,
        "loss_params": loss_params,
        "epochs": epochs,
        "batch_size": config.batch_size,
        "device": config.device,
        "seed": config.seed + seed_offset,
        "progress": config.progress,
        "progress_label": label,
    }
    if config.lr is not None:
        options["lr"] = config.lr
    return TrainConfig(**options)


def _dm_params(choice: estimate.EmphasisChoice) -> dict[str, Any]:
    return {"lam": float(choice.lam), "beta": float(choice.beta)}


def _effective_choice(
    requested: estimate.EmphasisChoice, models: CrossFit
) -> estimate.EmphasisChoice:
    """The emphasis in force at the end of training: the collapse guard may have softened it.

    With several folds the softest (smallest λ) is reported, with the reason naming the folds.
    """
    softened = []
    for k, f in enumerate(models.fits):
        params = f.loss_params
        lam = params.get("lam", params.get("dm_lam"))
        beta = params.get("beta", params.get("dm_beta"))
        if lam is None or beta is None:
            continue
        if (float(lam), float(beta)) != (float(requested.lam), float(requested.beta)):
            softened.append((float(lam), float(beta), k))
    if not softened:
        return requested
    lam, beta, _ = min(softened)
    folds = ", ".join(str(k) for *_, k in softened)
    return estimate.EmphasisChoice(
        lam, beta, f"{requested.reason}; softened by the collapse guard (fold {folds})"
    )


def _audited(dataset: AuditDataset) -> AuditDataset:
    """Every row of the dataset: the audit covers the training and the test split alike."""
    if len(dataset) == 0:
        raise ConfigError(f"dataset {dataset.source!r} has no rows to audit")
    return dataset


def _truth(dataset: AuditDataset) -> np.ndarray | None:
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


def _folds_for(dataset: AuditDataset, config: AuditConfig) -> np.ndarray:
    return fold_assignment(dataset.label_codes(), CROSSFIT_FOLDS, config.seed)


def _fold_checkpoint(checkpoint_dir: str | Path | None, k: int) -> Path | None:
    return None if checkpoint_dir is None else Path(checkpoint_dir) / f"fold{k}"


def _crossfit(
    dataset: AuditDataset,
    inputs: np.ndarray,
    folds: np.ndarray,
    make_config: Callable[[int], TrainConfig],
    *,
    labels: np.ndarray | None = None,
    keep: np.ndarray | None = None,
    evaluate: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> CrossFit:
    """Train one model per fold on the rows outside it (and inside `keep`).

    `inputs` are the dataset's decoded inputs (decoded once per stage: images are costly);
    `make_config(k)` gives fold k's training options. With `evaluate`, each model is evaluated
    after every epoch on its own fold (kept rows, given or corrected `labels`): the
    ``eval_acc`` of its history is out of sample.
    """
    y = dataset.label_codes() if labels is None else np.asarray(labels)
    keep = np.ones(y.size, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    truth = _truth(dataset)
    fits: list[FitResult] = []
    for k in range(int(folds.max()) + 1):
        train_rows = np.flatnonzero((folds != k) & keep)
        held_out = np.flatnonzero((folds == k) & keep)
        if train_rows.size < 2:
            raise ConfigError(
                f"cross-fitting fold {k} leaves {train_rows.size} row(s) to train on; "
                "an audit needs more rows"
            )
        fits.append(
            fit(
                inputs[train_rows],
                y[train_rows],
                make_config(k),
                num_classes=dataset.n_classes,
                eval_inputs=inputs[held_out] if evaluate and held_out.size else None,
                eval_labels=y[held_out] if evaluate and held_out.size else None,
                true_labels=None if truth is None else truth[train_rows],
                checkpoint_dir=_fold_checkpoint(checkpoint_dir, k),
                resume=resume,
                on_epoch_end=on_epoch_end,
            )
        )
    return CrossFit(fits, folds)


def _out_of_sample_probs(
    models: CrossFit, inputs: np.ndarray, n_classes: int, device: str
) -> np.ndarray:
    """Class probabilities of every row under the model that did not train on its fold."""
    probs = np.zeros((len(inputs), n_classes), dtype=np.float32)
    for k, f in enumerate(models.fits):
        rows = np.flatnonzero(models.folds == k)
        if rows.size:
            probs[rows], _ = predict_proba(f.model, inputs[rows], device=device, batch_size=1024)
    return probs


# ============================================================================================
# stages


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
    data = _audited(dataset)
    labels = data.label_codes()
    folds = _folds_for(data, config)
    epochs = _probe_epochs(config, len(labels))
    inputs = data.inputs()
    models = _crossfit(
        data,
        inputs,
        folds,
        lambda k: _train_config(
            config,
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
    probs = _out_of_sample_probs(models, inputs, data.n_classes, config.device)
    noise = estimate.estimate_noise(probs, labels, min_class_rows=CROSSFIT_FOLDS)
    noise_rate = float(noise.rate)
    if len(labels) < SMALL_TRAINING_SET:
        log.warning(
            "only %d rows: the estimated noise rate (%.1f%%), and with it the chosen emphasis "
            "and the flags, are uncertain below %d; consider fixing --lam/--beta or reviewing "
            "by --top-k",
            len(labels),
            100 * noise_rate,
            SMALL_TRAINING_SET,
        )
    if config.lam is not None:
        choice = estimate.EmphasisChoice(
            lam=float(config.lam), beta=float(config.beta), reason="fixed by the user"
        )
        adaptive = False
    else:
        choice = estimate.choose_emphasis(noise_rate, dataset.n_classes)
        adaptive = True
    log.info(
        "probe: estimated noise rate %.3f -> lam=%.2f beta=%.2f",
        noise_rate,
        choice.lam,
        choice.beta,
    )
    return ProbeResult(
        noise_rate, noise, choice, adaptive, time.perf_counter() - start, folds, probs
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
    data = _audited(dataset)
    folds = probe_result.folds if probe_result.folds is not None else _folds_for(data, config)
    choice = probe_result.choice
    if config.correction_source == "proselflc":
        loss, params = "proselflc", {"dm_lam": choice.lam, "dm_beta": choice.beta}
    else:
        loss, params = "dm", _dm_params(choice)
    epochs = _epochs(config, len(data))
    models = _crossfit(
        data,
        data.inputs(),
        folds,
        lambda k: _train_config(
            config,
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


def _score_pass(
    model: torch.nn.Module,
    inputs: np.ndarray,
    labels: np.ndarray,
    weighting: Any,
    config: AuditConfig,
    *,
    batch_size: int,
    stream: bool = False,
    example_ids: np.ndarray | None = None,
    chunk_rows: int | None = None,
    scores_path: str | Path | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray | neighbours.EmbeddingChunks]:
    """Score columns, probabilities and embeddings of one eval pass.

    Without `stream` the embeddings stay in memory as an array. With it the pass streams chunk
    by chunk to a scores Parquet file (`scores_path`, else a temporary file removed with the
    returned handle) and the embeddings come back as `neighbours.ParquetEmbeddings`, which the
    flags read chunk by chunk.
    """
    if not stream:
        probs, embeddings = predict_proba(
            model, inputs, device=config.device, batch_size=batch_size
        )
        return score_columns(probs, labels, weighting=weighting), probs, embeddings
    chunk = neighbours.DEFAULT_CHUNK_ROWS if chunk_rows is None else int(chunk_rows)
    folder = None
    if scores_path is None:
        folder = Path(tempfile.mkdtemp(prefix="dm_audit_scores_"))
        scores_path = folder / "scores.parquet"
    try:
        path, probs = write_scores_stream(
            model,
            inputs,
            labels,
            scores_path,
            weighting=weighting,
            device=config.device,
            batch_size=batch_size,
            chunk_rows=chunk,
            example_ids=None if example_ids is None else list(example_ids),
        )
        embeddings = neighbours.ParquetEmbeddings(path, chunk_rows=chunk)
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if folder is not None:
        # The temporary file lives as long as the handle that reads it.
        weakref.finalize(embeddings, shutil.rmtree, folder, True)
    # The per-example columns were computed chunk by chunk on the way to the file: read them
    # back rather than computing them again over every row.
    names = [f.name for f in SCORES_SCHEMA if f.name not in ("example_id", "embedding")]
    written = pq.read_table(path, columns=names)
    columns = {name: written.column(name).to_numpy() for name in names}
    return columns, probs, embeddings


def score_examples(
    dataset: AuditDataset,
    audit_fit: AuditFit,
    config: AuditConfig,
    *,
    chunk_rows: int | None = None,
    scores_path: str | Path | None = None,
) -> ExampleScores:
    """Score every row out of sample: fold k's rows under model k, which never saw them.

    The per-row table holds what `dm_audit.scoring.score` computes (p_i, emphasis weight,
    prediction, entropy, margin) under the out-of-sample model, and the in-sample
    training-dynamics summary (mean p_i over epochs, the epoch an example was first learned,
    ...) under the model that trained on the row.

    Above `dm_audit.scoring.STREAM_THRESHOLD` rows, or when `chunk_rows` or `scores_path` is
    given, each fold's scoring streams chunk by chunk to a scores Parquet file (next to
    `scores_path` with the fold in its name, else a temporary one) and
    ``ExampleScores.embeddings`` reads it back chunk by chunk, so neither this stage nor the
    flags hold every embedding at once.
    """
    data = _audited(dataset)
    labels = data.label_codes()
    inputs = data.inputs()
    models = audit_fit.models
    stream = chunk_rows is not None or scores_path is not None or len(labels) > STREAM_THRESHOLD
    n, c = len(labels), data.n_classes
    probs = np.zeros((n, c), dtype=np.float32)
    columns: dict[str, np.ndarray] = {}
    embeddings: list[np.ndarray | neighbours.EmbeddingChunks] = []
    targets = (
        np.zeros((n, c), dtype=np.float64) if config.correction_source == "proselflc" else None
    )
    for k, f in enumerate(models.fits):
        rows = np.flatnonzero(models.folds == k)
        # Fold k's rows get the emphasis weight of model k's own curve (the collapse guard may
        # have softened one fold's emphasis and not the other's).
        choice = _effective_choice(audit_fit.choice, CrossFit([f], models.folds))
        weighting = create_weighting("dm", lam=choice.lam, beta=choice.beta)
        path = None
        if scores_path is not None:
            base = Path(scores_path)
            path = base.with_name(f"{base.stem}_fold{k}{base.suffix}")
        fold_columns, fold_probs, fold_embeddings = _score_pass(
            f.model,
            inputs[rows],
            labels[rows],
            weighting,
            config,
            batch_size=1024,
            stream=stream,
            example_ids=data.example_ids[rows],
            chunk_rows=chunk_rows,
            scores_path=path,
        )
        probs[rows] = fold_probs
        for name, values in fold_columns.items():
            if name not in columns:
                columns[name] = np.zeros(n, dtype=np.asarray(values).dtype)
            columns[name][rows] = values
        embeddings.append(fold_embeddings)
        if targets is not None:
            targets[rows] = proselflc_targets(f, fold_probs, labels[rows])
    table = pd.DataFrame({"example_id": list(data.example_ids), "fold": models.folds, **columns})
    table = table.rename(columns={"label": "given", "predicted_label": "predicted"})
    dynamics = models.in_sample_summary(n)
    for column in dynamics.columns:
        table[column] = dynamics[column].to_numpy()
    return ExampleScores(table, probs, embeddings, targets, audit_fit.probe_probs)


def streamed_scores_path(dataset: AuditDataset, folder: str | Path) -> Path | None:
    """Where `score_examples` should stream the scores of `dataset` so they outlive the process.

    Above `STREAM_THRESHOLD` rows the scores (embeddings included) live in Parquet files, one
    per fold, that later stages read back; by default they are temporary and go with the
    process. A run that resumes, or a pipeline whose stages run in separate processes, keeps
    them in `folder` instead. None (score in memory) for smaller datasets.
    """
    return Path(folder) / "scores.parquet" if len(dataset) > STREAM_THRESHOLD else None


def proselflc_targets(fit_result: FitResult, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ProSelfLC's corrected targets q̃ at the end of training, shape (N, C).

    Rebuilds the run's loss at t = Γ and feeds it the final model's log-probabilities (a softmax is
    invariant to the constant that separates them from the logits, so p_T is exact).
    """
    loss = create_loss(fit_result.config.loss, **fit_result.loss_params)
    loss.set_progress(1, 1)
    with torch.no_grad():
        logits = torch.log(torch.as_tensor(probs, dtype=torch.float64).clamp_min(1e-12))
        out = loss(logits, torch.tensor(np.asarray(labels), dtype=torch.int64))
    return out.extras["target"].numpy()


def flag_examples(dataset: AuditDataset, scores: ExampleScores, config: AuditConfig) -> Flags:
    """Flag label issues and out-of-distribution examples of every row.

    * **Score**: `flags.label_issue_scores` of the out-of-sample prediction (normalised margin),
      the in-sample training dynamics (mean p_i under DM, which learns clean examples early and
      mislabelled ones late or never) and the label agreement of the row's nearest neighbours
      among its fold in the fold model's embedding space. The dynamics weigh as much as the
      other two together, scaled down by `flags.dynamics_reliability` when the in-sample
      models memorised the rows their out-of-sample twins doubt.
    * **How many**: confident learning's calibrated confident joint of the out-of-sample
      probabilities estimates, per given class, how many of its labels are wrong
      (`estimate.estimate_noise`); each class's most suspicious rows up to that count are
      flagged (`flags.flag_by_class_counts`), if their score leans towards another label
      (`flags.NEUTRAL_ISSUE_SCORE`). A fixed threshold or top k overrides both.
    * **OOD**: `flags.ood_scores` per fold against the fold's trusted rows, and a conformal
      test (`flags.conformal_ood_flags`): an example is flagged when its score is too high for
      the unflagged rows at a false discovery rate of `OOD_FDR`, so in-distribution data gets
      (almost) no OOD flags.
    """
    table = scores.table
    labels = table["given"].to_numpy()
    n, c = scores.probs.shape
    agreement = np.zeros(n)
    votes = np.zeros((n, c))
    fold_rows = scores.fold_rows()
    for k, rows in enumerate(fold_rows):
        if rows.size < 2:
            agreement[rows], votes[rows, labels[rows]] = 1.0, 1.0
            continue
        knn = flags.knn_label_agreement(
            scores.embeddings[k],
            labels[rows],
            n_classes=c,
            k=min(config.knn_k, rows.size - 1),
            seed=config.seed,
            progress=f"flags: neighbours {k + 1}/{len(fold_rows)}" if config.progress else None,
        )
        agreement[rows], votes[rows] = knn.agreement, knn.votes
    mean_p = table["mean_p"].to_numpy() if "mean_p" in table else None
    if mean_p is not None:
        # A row no model trained on (a singleton class) has no trajectory: use its p_i.
        mean_p = np.where(np.isnan(mean_p), table["p_given"].to_numpy(), mean_p)
    weights = dict(flags.DEFAULT_ISSUE_WEIGHTS)
    reliability = 1.0
    if mean_p is not None:
        reliability = flags.dynamics_reliability(mean_p, scores.probs, labels)
        weights["dynamics"] *= reliability
    issue_score = flags.label_issue_scores(
        table["p_given"].to_numpy(),
        scores.probs,
        labels,
        mean_p=mean_p,
        knn_agreement=agreement,
        weights=weights,
    )
    dups = duplicates.find_duplicates(
        dataset.inputs(),
        seed=config.seed,
        progress="flags: duplicates" if config.progress else None,
    )
    conflict = duplicates.conflict_evidence(dups, labels, scores.ensemble_probs())
    has_conflict = ~np.isnan(conflict)
    # A copy of an input labelled otherwise is direct evidence that one of the two labels is
    # wrong, not a model's estimate: it weighs as much as all the other evidence together.
    issue_score[has_conflict] = (issue_score[has_conflict] + conflict[has_conflict]) / 2.0
    # How many rows to flag: the confident joint of two models of each fold, the probe's and
    # the audit's, averaged. Each fold model errs confidently on some rows it never saw; two
    # independently trained ones rarely agree on those, so the mean counts fewer model errors
    # as noise. Chosen on the development data (benchmarks/results/flag_rules.md): clean
    # tables flagged 1.2 -> 0.6 % (digits), 5.6 -> 4.0 % (raw binary), 16.7 -> 12.5 % (tiny
    # and wide); F1 at 20-40 % noise up on five of seven settings, within 0.011 on the others.
    noise = estimate.estimate_noise(scores.ensemble_probs(), labels, min_class_rows=CROSSFIT_FOLDS)
    if config.top_k is not None:
        is_issue = flags.flag_label_issues(issue_score, top_k=config.top_k)
        threshold = float(np.min(issue_score[is_issue])) if is_issue.any() else 1.0
    elif config.label_issue_threshold is not None:
        threshold = float(config.label_issue_threshold)
        is_issue = issue_score >= threshold
    else:
        # The confident joint counts a weak model's errors as noise too: of each class's
        # counted rows, only those whose evidence leans towards another label are flagged.
        is_issue = flags.flag_by_class_counts(
            issue_score, labels, flags.issue_counts_per_class(noise, labels)
        ) & (issue_score >= flags.NEUTRAL_ISSUE_SCORE)
        # The confident joint counts what the models doubt; a duplicate labelled against its
        # set's consensus is flagged on its own evidence, counted or not.
        is_issue |= (conflict == 1.0) & (issue_score >= flags.NEUTRAL_ISSUE_SCORE)
        threshold = float(np.min(issue_score[is_issue])) if is_issue.any() else 1.0

    p_given = table["p_given"].to_numpy()
    trusted = flags.select_trusted(p_given, is_issue)
    std_p = table["std_p"].to_numpy() if "std_p" in table else None
    ood = np.zeros(n)
    for k, rows in enumerate(fold_rows):
        fold_trusted = trusted[rows]
        if fold_trusted.sum() <= OOD_NEIGHBOUR or (~is_issue[rows]).sum() == 0:
            continue  # nothing in this fold to compare with: no OOD evidence
        ood[rows] = flags.ood_scores(
            scores.probs[rows],
            scores.embeddings[k],
            labels[rows],
            trusted_mask=fold_trusted,
            k=OOD_NEIGHBOUR,
            knn_votes=votes[rows],
            p_std=None if std_p is None else np.nan_to_num(std_p[rows], nan=0.0),
            reference_mask=~is_issue[rows],
            seed=config.seed,
            progress=f"flags: OOD distance {k + 1}/{len(fold_rows)}" if config.progress else None,
        )
    if config.ood_threshold is not None:
        ood_threshold = float(config.ood_threshold)
        is_ood = flags.flag_ood(ood, threshold=ood_threshold)
    else:
        is_ood, ood_threshold = flags.conformal_ood_flags(
            ood, reference_mask=~is_issue, fdr=OOD_FDR
        )
    # Suggestions for examples more atypical than most unflagged ones go to a person: an OOD
    # input the OOD test missed would otherwise be "corrected" into a class.
    review_threshold = min(
        ood_threshold,
        flags.auto_ood_threshold(ood, reference_mask=~is_issue, fpr=OOD_REVIEW_FPR),
    )
    ids = table["example_id"].to_numpy(dtype=object)
    out = pd.DataFrame(
        {
            "example_id": ids,
            "knn_agreement": agreement,
            "label_issue_score": issue_score,
            "is_label_issue": is_issue,
            "ood_score": ood,
            "is_ood": is_ood,
            **_duplicate_columns(dups, ids, dataset.table["split"].to_numpy()),
        }
    )
    return Flags(
        out,
        float(threshold),
        float(ood_threshold),
        float(review_threshold),
        float(noise.rate),
        noise,
        votes,
        weights,
        duplicates={
            **dups.summary(labels),
            "leaked_rows": int(out["is_leaked_duplicate"].sum()),
        },
    )


def _duplicate_columns(
    dups: duplicates.Duplicates, ids: np.ndarray, split: np.ndarray
) -> dict[str, np.ndarray]:
    """The duplicate columns of examples.parquet: a set is named by its first member's id."""
    set_names = np.full(len(ids), None, dtype=object)
    member = dups.set_id >= 0
    set_names[member] = ids[dups.set_id[member]]
    return {
        "near_duplicate_score": dups.score,
        "is_near_duplicate": dups.is_near_duplicate,
        "near_duplicate_set": set_names,
        "is_leaked_duplicate": duplicates.leaked_rows(dups, split),
    }


def correct_labels(
    dataset: AuditDataset,
    scores: ExampleScores,
    flag_result: Flags,
    config: AuditConfig,
    *,
    reviews_path: str | Path | None = None,
    strict_reviews: bool = True,
) -> Corrections:
    """Suggest a label for every example and decide which label the retrain uses.

    Human reviews (a file of ``example_id,label``) override every automatic decision; review
    rows with unknown ids or labels are listed in the review report, never silently dropped:
    with ``strict_reviews`` (the CLI's default) they stop the run with a `DataError` naming them.
    """
    data = _audited(dataset)
    labels = scores.table["given"].to_numpy()
    suggested, confidence = correction.suggest_labels(
        scores.probs,
        temperature=SUGGESTION_TEMPERATURE,
        knn_votes=flag_result.knn_votes,
        proselflc_targets=scores.proselflc_targets,
    )
    review_positions, review_report = None, None
    if reviews_path is not None:
        reviews = read_reviews(
            reviews_path,
            known_ids=data.example_ids,
            classes=dataset.classes,
            strict=strict_reviews,
        )
        review_report = reviews.report
        review_positions = reviews.to_positions(data.example_ids, dataset.classes)
    allowed, gate = correction.automatic_correction_gate(
        labels, scores.probs, scores.folds, dataset.classes
    )
    _warn_about_gate(gate, int((~allowed).sum()))
    plan = correction.decide_corrections(
        labels,
        suggested,
        confidence,
        flag_result.table["is_label_issue"].to_numpy(),
        flag_result.table["is_ood"].to_numpy(),
        min_confidence=config.min_correction_confidence,
        reviews=review_positions,
        ood_scores=flag_result.table["ood_score"].to_numpy(),
        max_ood_score=flag_result.ood_review_threshold,
        n_classes=dataset.n_classes,
        allowed=allowed,
    )
    classes = np.asarray(dataset.classes, dtype=object)
    corrected_names = np.where(plan.corrected >= 0, classes[np.maximum(plan.corrected, 0)], None)
    table = pd.DataFrame(
        {
            "example_id": scores.table["example_id"].to_numpy(),
            "suggested": suggested,
            "suggested_label": classes[suggested],
            "suggestion_confidence": confidence,
            "corrected": plan.corrected,
            "corrected_label": corrected_names,
            "correction_source": plan.source,
            "include_in_retrain": plan.include_in_retrain,
        }
    )
    return Corrections(table, plan, review_report, gate)


def _warn_about_gate(gate: dict[str, Any], n_held: int) -> None:
    if not gate["model_better_than_chance"]:
        log.warning(
            "the audit model is no better than chance on the given labels (balanced accuracy "
            "%.3f, chance up to %.3f): no label is corrected automatically, every suggestion "
            "goes to review",
            gate["balanced_accuracy"],
            gate["chance_limit"],
        )
    elif gate["unlearnable_classes"]:
        log.warning(
            "classes %s have too few rows for the model that scores them to have seen them: "
            "their %d row(s) are never corrected automatically (suggestions go to review)",
            gate["unlearnable_classes"],
            n_held,
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
    data = _audited(dataset)
    keep = corrections.table["include_in_retrain"].to_numpy(dtype=bool)
    if keep.sum() < 2:
        raise ConfigError("fewer than two examples are left to retrain on after the corrections")
    corrected = corrections.table["corrected"].to_numpy()
    labels = np.where(keep, corrected, scores.table["given"].to_numpy())
    residual = estimate.estimate_noise(
        scores.probs[keep], labels[keep], min_class_rows=CROSSFIT_FOLDS
    )
    if config.lam is not None:
        choice = estimate.EmphasisChoice(float(config.lam), float(config.beta), "fixed by the user")
    else:
        choice = estimate.choose_emphasis(residual.rate, dataset.n_classes)
    epochs = _epochs(config, int(keep.sum()))
    inputs = data.inputs()
    models = _crossfit(
        data,
        inputs,
        scores.folds,
        lambda k: _train_config(
            config,
            loss="dm",
            loss_params=_dm_params(choice),
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
    probs = _out_of_sample_probs(models, inputs, data.n_classes, config.device)
    return Retrained(models, choice, residual, time.perf_counter() - start, probs)


# ============================================================================================
# evaluation and reports


def compare_before_after(
    given: np.ndarray,
    before_probs: np.ndarray,
    after_probs: np.ndarray | None,
    corrections: Corrections,
) -> dict[str, Any]:
    """Out-of-sample accuracy of the audit models and of the retrained models, paired.

    Both are measured on the same rows against the same labels: the rows whose given label the
    audit kept, against that label, each row predicted by the models of its fold (which never
    trained on it). On clean data the two should agree within sampling error; the discordant
    counts (``paired``) let a check test whether the retrain is worse (McNemar).
    """
    source = corrections.table["correction_source"].to_numpy()
    kept = source == "kept"
    before_right = before_probs.argmax(axis=1)[kept] == given[kept]
    out: dict[str, Any] = {
        "measured_on": "rows whose given label was kept, out of sample",
        "n_compared": int(kept.sum()),
        "accuracy_before": accuracy(before_probs.argmax(axis=1)[kept], given[kept])
        if kept.any()
        else None,
        "accuracy_after": None,
        "paired": None,
        "retrain_worse": False,
    }
    if after_probs is not None and kept.any():
        after_right = after_probs.argmax(axis=1)[kept] == given[kept]
        out["accuracy_after"] = float(after_right.mean())
        before_only = int((before_right & ~after_right).sum())
        after_only = int((after_right & ~before_right).sum())
        p_worse = mcnemar_worse_p(before_only, after_only)
        out["paired"] = {
            "n": int(kept.sum()),
            "before_only": before_only,
            "after_only": after_only,
            "p_worse": p_worse,
        }
        out["retrain_worse"] = bool(p_worse <= RETRAIN_WORSE_ALPHA)
    return out


def _detection(truth: np.ndarray, flagged: np.ndarray, score_values: np.ndarray) -> dict[str, Any]:
    """Precision, recall, F1 and AUROC of flags against a known truth (bool arrays)."""
    # Imported here: scikit-learn's metrics cost seconds to import, and only runs with a
    # known truth (benchmarks, injected noise) need them.
    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

    out: dict[str, Any] = {
        "n_positive": int(truth.sum()),
        "n_flagged": int(flagged.sum()),
        "precision": float(precision_score(truth, flagged, zero_division=0)),
        "recall": float(recall_score(truth, flagged, zero_division=0)),
        "f1": float(f1_score(truth, flagged, zero_division=0)),
    }
    both = 0 < truth.sum() < truth.size
    out["auroc"] = float(roc_auc_score(truth, score_values)) if both else None
    return out


def evaluate_against_truth(
    given: np.ndarray,
    truth: np.ndarray,
    flag_table: pd.DataFrame,
    corrections: Corrections,
) -> dict[str, Any]:
    """Detection and correction quality when the true labels are known (synthetic noise).

    Label-issue detection is measured on in-distribution examples (true class known): an open-set
    example has no right label to detect. OOD detection is measured against all other examples and
    against the mislabelled ones only (the hard case: both have a wrong given label).
    """
    in_dist = truth >= 0
    mislabelled = in_dist & (given != truth)
    is_open = ~in_dist
    issue_score = flag_table["label_issue_score"].to_numpy()
    is_issue = flag_table["is_label_issue"].to_numpy(dtype=bool)
    result: dict[str, Any] = {
        "true_noise_rate": float(mislabelled[in_dist].mean()) if in_dist.any() else None,
        "label_issues": _detection(mislabelled[in_dist], is_issue[in_dist], issue_score[in_dist]),
    }
    corrected = corrections.table["corrected"].to_numpy()
    # An example left out of the retrain (OOD or sent to review) keeps its given label here.
    final = np.where(corrected >= 0, corrected, given)
    result["label_accuracy_before"] = float((given[in_dist] == truth[in_dist]).mean())
    result["label_accuracy_after"] = float((final[in_dist] == truth[in_dist]).mean())
    if is_open.any():
        from sklearn.metrics import roc_auc_score

        ood = flag_table["ood_score"].to_numpy()
        is_ood = flag_table["is_ood"].to_numpy(dtype=bool)
        vs_mislabelled = is_open | mislabelled
        source = corrections.table["correction_source"].to_numpy()
        result["ood"] = {
            "n_open_set": int(is_open.sum()),
            **_detection(is_open, is_ood, ood),
            "auroc_vs_mislabelled": float(
                roc_auc_score(is_open[vs_mislabelled], ood[vs_mislabelled])
            )
            if mislabelled.any()
            else None,
            "share_not_auto_corrected": float((source[is_open] != "auto_corrected").mean()),
        }
    return result


def _history_frame(stage: str, fit_result: CrossFit | None) -> pd.DataFrame:
    if fit_result is None or not fit_result.history:
        return pd.DataFrame(columns=["stage", "fold", "epoch"])
    frame = pd.DataFrame(fit_result.history)
    numeric = [
        c
        for c in frame.columns
        if c not in ("epoch", "fold")
        and pd.api.types.is_numeric_dtype(frame[c])
        and not pd.api.types.is_bool_dtype(frame[c])
    ]
    out = frame[["fold", "epoch", *numeric]].copy()
    out.insert(0, "stage", stage)
    return out


def _choice_dict(choice: estimate.EmphasisChoice | None) -> dict[str, Any] | None:
    if choice is None:
        return None
    return {"lam": float(choice.lam), "beta": float(choice.beta), "reason": choice.reason}


def build_report(
    dataset: AuditDataset,
    probe_result: ProbeResult,
    audit_fit: AuditFit,
    scores: ExampleScores,
    flag_result: Flags,
    corrections: Corrections,
    retrained: Retrained,
    config: AuditConfig,
) -> AuditReport:
    """Assemble the report tables, the summary and the plots of an audit."""
    data = _audited(dataset)
    classes = np.asarray(dataset.classes, dtype=object)
    given = scores.table["given"].to_numpy()
    examples = pd.DataFrame(
        {
            "example_id": scores.table["example_id"].to_numpy(),
            "split": data.table["split"].astype(str).to_numpy(),
            "fold": scores.table["fold"].to_numpy(),
            "given_label": classes[given],
            "p_given": scores.table["p_given"].to_numpy(),
            "mean_p": scores.table["mean_p"].to_numpy() if "mean_p" in scores.table else np.nan,
            "emphasis_weight": scores.table["emphasis_weight"].to_numpy(),
            "predicted_label": classes[scores.table["predicted"].to_numpy()],
            "predicted_prob": scores.table["predicted_prob"].to_numpy(),
        }
    )
    for column in (
        "knn_agreement",
        "label_issue_score",
        "is_label_issue",
        "ood_score",
        "is_ood",
        *DUPLICATE_COLUMNS,
    ):
        if column in flag_result.table:
            examples[column] = flag_result.table[column].to_numpy()
    for column in (
        "suggested_label",
        "suggestion_confidence",
        "corrected_label",
        "correction_source",
    ):
        examples[column] = corrections.table[column].to_numpy()
    truth = _truth(data)
    if truth is not None:
        examples["true_label"] = data.table["true_label"].to_numpy(dtype=object)
        examples["is_noisy"] = given != truth

    classes_frame, health = class_health.class_health(
        flag_result.noise_estimate.joint,
        list(dataset.classes),
        given,
        examples["is_label_issue"].to_numpy(dtype=bool),
        examples["is_ood"].to_numpy(dtype=bool),
    )
    quality = compare_before_after(given, scores.probs, retrained.probs, corrections)
    source = corrections.table["correction_source"].value_counts()
    audit_choice, retrain_choice = audit_fit.effective_choice, retrained.effective_choice
    summary: dict[str, Any] = {
        "source": dataset.source,
        "input": dataset.notes,
        "n_examples": len(data),
        "n_audited": len(examples),
        "cross_fitting": {
            "folds": CROSSFIT_FOLDS,
            "rows_per_fold": np.bincount(scores.folds, minlength=CROSSFIT_FOLDS).tolist(),
        },
        "n_classes": dataset.n_classes,
        "classes": list(dataset.classes),
        "config": config.to_dict(),
        "noise_estimate": {
            "probe_rate": float(probe_result.noise_rate),
            "audit_rate": float(flag_result.noise_rate),
            "confident_joint_rate": float(flag_result.noise_estimate.rate),
            "residual_rate": None
            if retrained.residual_estimate is None
            else float(retrained.residual_estimate.rate),
        },
        "emphasis": {
            "adaptive": probe_result.adaptive,
            "audit": _choice_dict(audit_choice),
            "retrain": _choice_dict(retrain_choice),
            "requested": {
                "audit": _choice_dict(audit_fit.choice),
                "retrain": _choice_dict(retrained.choice),
            },
        },
        "label_issue_weights": flag_result.issue_weights,
        "class_health": health,
        "duplicates": flag_result.duplicates,
        "thresholds": {
            "label_issue": flag_result.label_issue_threshold,
            "ood": flag_result.ood_threshold,
            "ood_review": flag_result.ood_review_threshold,
            "min_correction_confidence": config.min_correction_confidence,
        },
        "counts": {
            "label_issues": int(examples["is_label_issue"].sum()),
            "ood": int(examples["is_ood"].sum()),
            **{name: int(source.get(name, 0)) for name in correction.CORRECTION_SOURCES},
        },
        "quality": quality,
        "automatic_corrections": corrections.gate,
        "training_events": {
            "audit": audit_fit.models.events,
            "retrain": [] if retrained.models is None else retrained.models.events,
        },
        "seconds": {
            "probe": probe_result.seconds,
            "audit_training": audit_fit.seconds,
            "retrain": retrained.seconds,
        },
    }
    if corrections.review_report is not None:
        summary["reviews"] = dataclasses.asdict(corrections.review_report)
    if truth is not None:
        summary["against_truth"] = evaluate_against_truth(
            given, truth, flag_result.table, corrections
        )
        in_dist = truth >= 0
        summary["against_truth"]["accuracy_before"] = accuracy(
            scores.probs.argmax(axis=1)[in_dist], truth[in_dist]
        )
        summary["against_truth"]["accuracy_after"] = (
            None
            if retrained.probs is None
            else accuracy(retrained.probs.argmax(axis=1)[in_dist], truth[in_dist])
        )

    metrics = pd.concat(
        [_history_frame("audit", audit_fit.models), _history_frame("retrain", retrained.models)],
        ignore_index=True,
    )
    is_issue = examples["is_label_issue"].to_numpy(dtype=bool)
    from dm_audit import plots  # matplotlib: imported when the first figure is drawn

    figures: dict[str, Any] = {
        "p_distribution": plots.plot_p_distribution(examples["p_given"].to_numpy(), is_issue),
        "label_issue_scores": plots.plot_score_distribution(
            examples["label_issue_score"].to_numpy(),
            flag_result.label_issue_threshold,
            is_flagged=is_issue,
        ),
        "class_health": plots.plot_class_health(
            classes_frame["class"].tolist(),
            classes_frame["label_quality"].to_numpy(),
            classes_frame["rows"].to_numpy(),
        ),
        "noise_matrix": plots.plot_noise_matrix(
            flag_result.noise_estimate.matrix, list(dataset.classes)
        ),
        "weighting_curves": _weighting_figure(audit_choice, retrain_choice),
    }
    p_history = audit_fit.models.in_sample_p_history(len(examples))
    if p_history.shape[1] > 0:
        figures["training_dynamics"] = plots.plot_training_dynamics(
            np.asarray(p_history, dtype=np.float32), is_issue
        )
    return AuditReport(
        examples=examples,
        label_issues=reports.label_issues_frame(examples),
        corrected_labels=reports.corrected_labels_frame(examples),
        metrics=metrics,
        summary=summary,
        figures=figures,
        final_models=retrained.models or audit_fit.models,
        classes=classes_frame,
        html=_html_page(data, examples, classes_frame, summary, figures),
    )


def _html_page(
    data: AuditDataset,
    examples: pd.DataFrame,
    classes_frame: pd.DataFrame,
    summary: dict[str, Any],
    figures: dict[str, Any],
) -> str:
    """report.html; for image data with thumbnails of the suspects and their suggested class."""
    from dm_audit import html_report

    images = neighbour_rows = None
    if data.input_kind == "image":
        images = data.table["image"].tolist()
        flagged = examples["is_label_issue"].to_numpy(dtype=bool)
        score = examples["label_issue_score"].to_numpy()
        order = np.lexsort((examples["example_id"].to_numpy(dtype=str), -score))
        suspects = order[flagged[order]][: html_report.SUSPECTS_SHOWN]
        code = {name: k for k, name in enumerate(data.classes)}
        neighbour_rows = html_report.suggested_class_neighbours(
            duplicates.duplicate_space(data.images()),
            suspects,
            examples["suggested_label"].map(code).fillna(-1).to_numpy(dtype=np.int64),
            examples["given_label"].map(code).to_numpy(dtype=np.int64),
            ~flagged & ~examples["is_ood"].to_numpy(dtype=bool),
        )
    return html_report.render_report(
        summary, examples, classes_frame, figures, images=images, neighbours=neighbour_rows
    )


def _weighting_figure(audit: estimate.EmphasisChoice, final: estimate.EmphasisChoice | None) -> Any:
    curves = {
        f"audit: DM λ={audit.lam:g}, β={audit.beta:g}": create_weighting(
            "dm", lam=audit.lam, beta=audit.beta
        ),
        "CCE": create_weighting("cce"),
    }
    if final is not None:
        curves[f"retrain: DM λ={final.lam:g}, β={final.beta:g}"] = create_weighting(
            "dm", lam=final.lam, beta=final.beta
        )
    return plot_weighting_curves(curves, None, normalise=True)


def write_report(
    report: AuditReport, out_dir: str | Path, *, if_exists: str = "error"
) -> reports.ReportPaths:
    """Write the report tables, ``summary.json`` and the plots into `out_dir` atomically."""
    return reports.write_reports(
        out_dir,
        report.examples,
        report.label_issues,
        report.corrected_labels,
        report.metrics,
        report.summary,
        report.figures,
        classes_df=report.classes,
        html=report.html,
        if_exists=if_exists,
    )


def run_audit(
    dataset: AuditDataset,
    config: AuditConfig,
    out_dir: str | Path | None = None,
    *,
    reviews_path: str | Path | None = None,
    if_exists: str = "error",
    restart: bool = False,
) -> AuditReport:
    """Run every stage of the audit and write the reports to `out_dir` (when given).

    With an output folder the run is resumable: each training's checkpoint and each finished
    stage's result are kept in ``<out>/.dm-audit-work/`` (`dm_audit.workdir`) until the report is
    in place. Running again with the same dataset, options and reviews after a crash or a kill
    skips the finished stages and continues the interrupted training from its last epoch; the
    report equals that of an uninterrupted run in every table and summary field except timings
    (``seconds``, ``examples_per_s``), ``out_dir`` and ``resumed`` (the trainings that were
    continued, and from which epoch). Other inputs or options refuse, naming what differs.

    Parameters
    ----------
    dataset : AuditDataset
        The dataset; every row is audited (a ``split`` column only annotates the report).
    config : AuditConfig
    out_dir : path, optional
        Output folder; nothing is written when None.
    reviews_path : path, optional
        Human reviews (``example_id,label``) that override the automatic corrections.
    if_exists : {"error", "overwrite", "version"}
        What to do when `out_dir` already holds a previous run.
    restart : bool
        Discard the work of an unfinished run in `out_dir` instead of resuming it.

    Returns
    -------
    AuditReport

    Raises
    ------
    DataError, ConfigError
        Bad data, reviews or options; no report is written and the work folder is removed.
    """
    data = _audited(dataset)
    config.check_against(len(data))
    if reviews_path is not None:
        # A bad reviews file fails now, not after hours of training.
        read_reviews(reviews_path, known_ids=data.example_ids, classes=dataset.classes, strict=True)
    if out_dir is None:
        return _run_stages(dataset, config, None, reviews_path)
    # Fail before hours of training, not after, when the folder holds a previous run.
    check_output_location(out_dir, inputs=[dataset.source])
    target = resolve_output_dir(
        out_dir,
        if_exists=if_exists,
        names=reports.REPORT_FILES,
        owned=reports.REPORT_OWNED_FILES,
    )
    if restart:
        discard_work(target)
    # The folders this run creates (the output folder and any missing parents), deepest first:
    # removed again when the input turns out bad, so a refused run leaves nothing behind.
    created = [p for p in (target, *target.parents) if not p.exists()]
    identity = run_identity(config.to_dict(), dataset, reviews_path)
    work = WorkDir.open(target, identity)
    if work.resumed:
        log.info("resuming the unfinished run in %s", target)
    try:
        report = _run_stages(dataset, config, work, reviews_path)
        paths = write_report(
            report, target, if_exists="overwrite" if if_exists == "overwrite" else "error"
        )
    except DMAuditError:
        # Bad input or options: a resume would fail the same way, so leave nothing behind.
        work.remove()
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    except BaseException:
        work.release()  # e.g. Ctrl-C: the next run resumes it
        raise
    work.remove()
    report.summary["out_dir"] = str(paths.out_dir)
    return report


def _run_stages(
    dataset: AuditDataset,
    config: AuditConfig,
    work: WorkDir | None,
    reviews_path: str | Path | None,
) -> AuditReport:
    """The stages of `run_audit`, each kept in `work` (when given) once finished."""

    def training(name: str) -> dict[str, Any]:
        if work is None:
            return {}
        return {
            "checkpoint_dir": work.checkpoint_dir(name),
            "resume": True,
            "on_epoch_end": lambda entry: kill_point(f"{name}:epoch:{entry['epoch']}"),
        }

    def stage(name: str, compute: Callable[[], Any]) -> Any:
        return compute() if work is None else work.stage(name, compute)

    def scored() -> ExampleScores:
        # A resumed run reads the streamed scores back: they must live in the work folder.
        path = None if work is None else streamed_scores_path(dataset, work.path)
        result = score_examples(dataset, audit_fit, config, scores_path=path)
        kill_point("scoring")
        return result

    probe_result = stage("probe", lambda: probe(dataset, config, **training("probe")))
    audit_fit = train_audit_model(dataset, probe_result, config, **training("audit"))
    scores = stage("scores", scored)
    flag_result = stage("flags", lambda: flag_examples(dataset, scores, config))
    corrections = stage(
        "corrections",
        lambda: correct_labels(dataset, scores, flag_result, config, reviews_path=reviews_path),
    )
    retrained = retrain(dataset, scores, corrections, config, **training("retrain"))
    resumed = _take_resume_events("audit", audit_fit.models) + _take_resume_events(
        "retrain", retrained.models
    )
    report = build_report(
        dataset, probe_result, audit_fit, scores, flag_result, corrections, retrained, config
    )
    report.summary["resumed"] = resumed
    return report


def _take_resume_events(training: str, models: CrossFit | None) -> list[dict[str, Any]]:
    """Move a training's resume events out of its event list into the run's resume record.

    A resumed training's other events and history are those of an uninterrupted one; keeping
    the resumes apart keeps the report comparable to that of an uninterrupted run.
    """
    if models is None:
        return []
    out = []
    for k, fit_result in enumerate(models.fits):
        taken = [e for e in fit_result.events if e.get("event") == "resume"]
        fit_result.events[:] = [e for e in fit_result.events if e.get("event") != "resume"]
        out += [{"training": training, "fold": k, "epoch": int(e["epoch"])} for e in taken]
    return out
