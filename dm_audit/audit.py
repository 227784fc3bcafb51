"""The audit end to end: probe, one DM training, flags, corrections, one retrain, reports.

Each stage is a function of the previous stages' results, so the CLI (`run_audit`) and the Dagster
assets (one asset per stage) run exactly the same code::

    probe -> train_audit_model -> score_examples -> flag_examples -> correct_labels -> retrain
          -> build_report -> write_report

Only the training split is audited; the test split, when there is one, measures the audit model
and the retrained model on data nobody corrected.
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
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from dm_audit import correction, estimate, flags, neighbours, plots, reports
from dm_audit.atomic import resolve_output_dir
from dm_audit.dataset import AuditDataset
from dm_audit.emphasis import create_weighting, plot_weighting_curves
from dm_audit.errors import ConfigError, DMAuditError
from dm_audit.faults import kill_point
from dm_audit.losses import create_loss
from dm_audit.metrics import accuracy
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

CORRECTION_SOURCES = ("model", "proselflc")
# Sharpens the audit model's prediction into a suggestion, as ProSelfLC's annealed temperature
# sharpens its self-knowledge (METHOD.md §3 uses T = 0.5 on image data).
SUGGESTION_TEMPERATURE = 0.5
# GR's all-round default emphasis: robust enough not to fit the noise during a short probe.
PROBE_EMPHASIS = {"lam": 0.5, "beta": 8.0}
# The OOD distance is to the nearest trusted example: the sharpest on digits (AUROC 0.91 at k=1,
# 0.90 at 3, 0.89 at 10).
OOD_NEIGHBOUR = 1
# A flagged example whose OOD score exceeds that of 75 % of the unflagged examples is sent to
# review instead of being corrected automatically.
OOD_REVIEW_FPR = 0.25
PROBE_DOUBT = 0.3  # = the lower bound of `flags.mixture_split`
# Below this many training examples the probe's noise estimate is unreliable: a network
# memorises a tiny table within a few steps, so a short probe has either not learnt the shared
# patterns yet or already fitted the noise (scikit-learn's wine, 124 training rows at 40 %
# symmetric noise: 0.58 with the default budget, 0.0 with ten times the epochs).
SMALL_TRAINING_SET = 500


@dataclass
class AuditConfig:
    """Options of one audit run; every field has a default that works on a feature table.

    Attributes
    ----------
    model : str
        Model name for `dm_audit.models.create_model` ("auto" picks one from the input).
    epochs : int or None
        Epochs of the audit training and of the retrain; None chooses from the dataset size.
    probe_epochs : int or None
        Epochs of the short probe training; None: a quarter of ``epochs``.
    batch_size : int
    lr : float or None
        Learning rate; None keeps the training engine's default for the optimizer.
    device : str
        "auto", "cpu", "cuda", "cuda:N" or "mps".
    seed : int
        Seeds every random choice: the same seed and data give the same report.
    lam, beta : float or None
        DM emphasis mode and spread. None (the default) chooses them from the estimated noise rate.
    label_issue_threshold : float or None
        Flag examples whose ``label_issue_score`` is at least this; None ties the threshold to the
        estimated noise rate.
    top_k : int or None
        Flag exactly the k most suspicious examples instead of thresholding.
    ood_threshold : float or None
        Flag examples whose ``ood_score`` is at least this; None chooses automatically.
    min_correction_confidence : float
        A suggested label is applied automatically only at this confidence or above; flagged
        examples below it go to review and are left out of the retrain.
    correction_source : {"model", "proselflc"}
        Where suggested labels come from: the audit model's tempered prediction, or the corrected
        targets of a ProSelfLC (annealed temperature) training.
    knn_k : int
        Neighbours per example for the embedding-space label agreement and OOD distance.
    retrain : bool
        Retrain on the corrected labels (the final model); False stops after the corrections.
    progress : bool
        Show progress bars.
    """

    model: str = "auto"
    epochs: int | None = None
    probe_epochs: int | None = None
    batch_size: int = 128
    lr: float | None = None
    device: str = "auto"
    seed: int = 0
    lam: float | None = None
    beta: float | None = None
    label_issue_threshold: float | None = None
    top_k: int | None = None
    ood_threshold: float | None = None
    min_correction_confidence: float = 0.8
    correction_source: str = "model"
    knn_k: int = 10
    retrain: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.correction_source not in CORRECTION_SOURCES:
            raise ConfigError(
                f"correction_source must be one of {CORRECTION_SOURCES}, "
                f"got {self.correction_source!r}"
            )
        if (self.lam is None) != (self.beta is None):
            raise ConfigError("give both lam and beta to fix the emphasis, or neither to adapt it")
        if self.lam is not None and self.lam < 0:
            raise ConfigError(f"lam must be >= 0, got {self.lam}")
        for name in ("label_issue_threshold", "ood_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {value}")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_correction_confidence <= 1.0:
            raise ConfigError(
                "min_correction_confidence must lie in [0, 1], "
                f"got {self.min_correction_confidence}"
            )
        if self.knn_k < 1:
            raise ConfigError(f"knn_k must be >= 1, got {self.knn_k}")
        for name in ("epochs", "probe_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-ready dict (recorded in ``summary.json``)."""
        return dataclasses.asdict(self)


# ============================================================================================
# stage results


@dataclass
class ProbeResult:
    """The noise estimate of the probe and the emphasis it chose.

    Attributes
    ----------
    noise_rate : float
        Estimated share of wrong labels (mixture weight of the high label-issue scores).
    estimate : NoiseEstimate
        Confident-joint estimate from the probe model (its class-to-class noise matrix).
    choice : EmphasisChoice
        λ and β for the audit training (fixed by the user, or chosen from the estimate).
    adaptive : bool
        Whether λ and β were chosen from the estimate (False when the user fixed them).
    seconds : float
    """

    noise_rate: float
    estimate: estimate.NoiseEstimate
    choice: estimate.EmphasisChoice
    adaptive: bool
    seconds: float


@dataclass
class AuditFit:
    """The DM-trained audit model of the training split."""

    fit: FitResult
    choice: estimate.EmphasisChoice
    seconds: float


@dataclass
class ExampleScores:
    """Per-example scores of the training split under the audit model.

    Attributes
    ----------
    table : DataFrame, N rows
        ``example_id``, ``given`` (code), ``p_given``, ``emphasis_weight``, ``predicted``
        (code), ``predicted_prob``, ``entropy``, ``margin`` and the training-dynamics summary.
    probs : ndarray (N, C) float32
    embeddings : ndarray (N, E) float32, or EmbeddingChunks
        In memory, or (at scale) the scores Parquet file read back chunk by chunk.
    proselflc_targets : ndarray (N, C) or None
        ProSelfLC's corrected targets at the end of training (``correction_source="proselflc"``).
    """

    table: pd.DataFrame
    probs: np.ndarray
    embeddings: np.ndarray | neighbours.EmbeddingChunks
    proselflc_targets: np.ndarray | None = None


@dataclass
class Flags:
    """Label-issue and out-of-distribution flags of the training split."""

    table: pd.DataFrame
    label_issue_threshold: float
    ood_threshold: float
    ood_review_threshold: float
    noise_rate: float
    noise_estimate: estimate.NoiseEstimate
    knn_votes: np.ndarray


@dataclass
class Corrections:
    """Suggested and decided labels, with provenance, of the training split."""

    table: pd.DataFrame
    plan: correction.CorrectionPlan
    review_report: Any | None = None


@dataclass
class Retrained:
    """The final model, trained on the corrected labels."""

    fit: FitResult | None
    choice: estimate.EmphasisChoice | None
    residual_estimate: estimate.NoiseEstimate | None
    seconds: float


@dataclass
class AuditReport:
    """Everything `write_report` writes: report tables, a summary and figures."""

    examples: pd.DataFrame
    label_issues: pd.DataFrame
    corrected_labels: pd.DataFrame
    metrics: pd.DataFrame
    summary: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)


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


def _train_and_test(dataset: AuditDataset) -> tuple[AuditDataset, AuditDataset | None]:
    train = dataset.train()
    if len(train) == 0:
        raise ConfigError(f"dataset {dataset.source!r} has no training examples to audit")
    test = dataset.test()
    return train, (test if len(test) else None)


def _truth(train: AuditDataset) -> np.ndarray | None:
    return train.true_label_codes() if train.has_truth else None


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

    One short training with GR's all-round default emphasis (β = 8, λ = 0.5) scores every
    training example exactly as the audit does (mostly the mean of p_i over the epochs); the
    share of examples whose score reaches `PROBE_DOUBT` estimates the share of wrong labels.
    Networks learn the shared patterns of clean examples before they memorise noise, so a short
    run separates the two well and the estimate needs no out-of-sample cross-fitting (measured
    on digits: 0.41-0.43 at 40 % symmetric noise, 0.20 at 20 % pair noise, 0.002-0.008 clean).
    Concentrated (pair-like) noise, read off the probe's confident-joint noise matrix, counts as
    a higher rate (`estimate.noise_concentration`).

    `checkpoint_dir`, `resume` and `on_epoch_end` go to `dm_audit.training.fit`.
    """
    start = time.perf_counter()
    train, _ = _train_and_test(dataset)
    inputs, labels = train.inputs(), train.label_codes()
    result = fit(
        inputs,
        labels,
        _train_config(
            config,
            loss="dm",
            loss_params=dict(PROBE_EMPHASIS),
            epochs=_probe_epochs(config, len(labels)),
            seed_offset=1,
            label="1/3 probe",
        ),
        num_classes=dataset.n_classes,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        on_epoch_end=on_epoch_end,
    )
    _, probs, embeddings = _score_pass(
        result.model,
        inputs,
        labels,
        create_weighting("dm", **PROBE_EMPHASIS),
        config,
        batch_size=1024,
    )
    mean_p = result.dynamics.summary()["mean_p"].to_numpy()
    issue_score, _ = _label_issue_scores(
        probs, embeddings, labels, mean_p, dataset, config, stage="1/3 probe"
    )
    # The short probe has not yet separated the modes fully: count every example whose given
    # label it doubted (score at or above the lowest label-issue threshold), not only the
    # confident ones.
    noise_rate = float(np.mean(issue_score >= PROBE_DOUBT))
    if len(labels) < SMALL_TRAINING_SET:
        log.warning(
            "only %d training examples: the estimated noise rate (%.1f%%), and with it the "
            "chosen emphasis and the flags, are unreliable below %d; consider fixing --lam/--beta "
            "or reviewing by --top-k",
            len(labels),
            100 * noise_rate,
            SMALL_TRAINING_SET,
        )
    noise = estimate.estimate_noise(probs, labels)
    if config.lam is not None:
        choice = estimate.EmphasisChoice(
            lam=float(config.lam), beta=float(config.beta), reason="fixed by the user"
        )
        adaptive = False
    else:
        # Concentrated (pair-like) noise is harder than its rate: choose as for a higher rate.
        concentration = estimate.noise_concentration(noise.matrix)
        effective = min(1.0, noise_rate * (1.0 + concentration))
        choice = estimate.choose_emphasis(effective, dataset.n_classes)
        if effective > noise_rate:
            choice = dataclasses.replace(
                choice,
                reason=f"{choice.reason} (estimated rate {noise_rate:.1%} raised to "
                f"{effective:.1%}: noise concentration {concentration:.2f})",
            )
        adaptive = True
    log.info(
        "probe: estimated noise rate %.3f -> lam=%.2f beta=%.2f",
        noise_rate,
        choice.lam,
        choice.beta,
    )
    return ProbeResult(noise_rate, noise, choice, adaptive, time.perf_counter() - start)


def _label_issue_scores(
    probs: np.ndarray,
    embeddings: np.ndarray | neighbours.EmbeddingChunks,
    labels: np.ndarray,
    mean_p: np.ndarray | None,
    dataset: AuditDataset,
    config: AuditConfig,
    *,
    stage: str,
) -> tuple[np.ndarray, flags.KnnLabelAgreement]:
    knn = flags.knn_label_agreement(
        embeddings,
        labels,
        n_classes=dataset.n_classes,
        k=config.knn_k,
        seed=config.seed,
        progress=f"{stage}: neighbours" if config.progress else None,
    )
    scores = flags.label_issue_scores(
        probs[np.arange(len(labels)), labels],
        probs,
        labels,
        mean_p=mean_p,
        knn_agreement=knn.agreement,
    )
    return scores, knn


def train_audit_model(
    dataset: AuditDataset,
    probe_result: ProbeResult,
    config: AuditConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> AuditFit:
    """Train the audit model on the training split with the chosen DM emphasis.

    With ``correction_source="proselflc"`` the loss is ProSelfLC with annealed temperature whose
    gradient magnitude is rescaled by the same DM weights, so the run also yields corrected
    targets; otherwise plain DM.
    """
    start = time.perf_counter()
    train, test = _train_and_test(dataset)
    inputs, labels = train.inputs(), train.label_codes()
    choice = probe_result.choice
    if config.correction_source == "proselflc":
        loss, params = "proselflc", {"dm_lam": choice.lam, "dm_beta": choice.beta}
    else:
        loss, params = "dm", _dm_params(choice)
    result = fit(
        inputs,
        labels,
        _train_config(
            config,
            loss=loss,
            loss_params=params,
            epochs=_epochs(config, len(labels)),
            label="2/3 audit",
        ),
        num_classes=dataset.n_classes,
        eval_inputs=None if test is None else test.inputs(),
        eval_labels=None if test is None else test.label_codes(),
        true_labels=_truth(train),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        on_epoch_end=on_epoch_end,
    )
    return AuditFit(result, choice, time.perf_counter() - start)


def _score_pass(
    model: torch.nn.Module,
    inputs: np.ndarray,
    labels: np.ndarray,
    weighting: Any,
    config: AuditConfig,
    *,
    batch_size: int,
    example_ids: np.ndarray | None = None,
    chunk_rows: int | None = None,
    scores_path: str | Path | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray | neighbours.EmbeddingChunks]:
    """Score columns, probabilities and embeddings of one eval pass.

    Up to `STREAM_THRESHOLD` examples (and without `chunk_rows` or `scores_path`) the
    embeddings stay in memory as an array. Above it the pass streams chunk by chunk to a scores
    Parquet file (`scores_path`, else a temporary file removed with the returned handle) and the
    embeddings come back as `neighbours.ParquetEmbeddings`, which the flags read chunk by chunk.
    """
    n = len(labels)
    if chunk_rows is None and scores_path is None and n <= STREAM_THRESHOLD:
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
    """Score every training example under the audit model.

    The per-example table holds what `dm_audit.scoring.score` computes (p_i, emphasis weight,
    prediction, entropy, margin) and the training-dynamics summary (mean p_i over epochs, the
    epoch an example was first learned, ...).

    Above `dm_audit.scoring.STREAM_THRESHOLD` examples, or when `chunk_rows` or `scores_path`
    is given, scoring streams chunk by chunk to a scores Parquet file (`scores_path`, else a
    temporary one) and ``ExampleScores.embeddings`` reads it back chunk by chunk, so neither
    this stage nor the flags hold every embedding at once.
    """
    train, _ = _train_and_test(dataset)
    labels = train.label_codes()
    choice = audit_fit.choice
    weighting = create_weighting("dm", lam=choice.lam, beta=choice.beta)
    columns, probs, embeddings = _score_pass(
        audit_fit.fit.model,
        train.inputs(),
        labels,
        weighting,
        config,
        batch_size=1024,
        example_ids=train.example_ids,
        chunk_rows=chunk_rows,
        scores_path=scores_path,
    )
    table = pd.DataFrame({"example_id": list(train.example_ids), **columns})
    table = table.rename(columns={"label": "given", "predicted_label": "predicted"})
    dynamics = audit_fit.fit.dynamics.summary()
    for column in dynamics.columns:
        table[column] = dynamics[column].to_numpy()
    targets = None
    if config.correction_source == "proselflc":
        targets = proselflc_targets(audit_fit.fit, probs, labels)
    return ExampleScores(table, probs, embeddings, targets)


def streamed_scores_path(dataset: AuditDataset, folder: str | Path) -> Path | None:
    """Where `score_examples` should stream the scores of `dataset` so they outlive the process.

    Above `STREAM_THRESHOLD` training examples the scores (embeddings included) live in a
    Parquet file that later stages read back; by default that file is temporary and goes with
    the process. A run that resumes, or a pipeline whose stages run in separate processes, keeps
    it in `folder` instead. None (score in memory) for smaller datasets.
    """
    n = int((dataset.table["split"] == "train").sum())
    return Path(folder) / "scores.parquet" if n > STREAM_THRESHOLD else None


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


def flag_examples(
    dataset: AuditDataset, scores: ExampleScores, probe_result: ProbeResult, config: AuditConfig
) -> Flags:
    """Flag label issues and out-of-distribution examples of the training split.

    The label-issue score is mostly the mean of p_i over the audit training (a DM model learns
    clean examples early and mislabelled ones late or never), with the final prediction's
    margin and the embedding-space kNN label agreement. A two-component mixture on the scores
    estimates the noise rate again and sets the threshold (see `flags.mixture_split`), unless
    the user fixed a threshold or asked for the top k.
    """
    table = scores.table
    labels = table["given"].to_numpy()
    mean_p = table["mean_p"].to_numpy() if "mean_p" in table else None
    issue_score, knn = _label_issue_scores(
        scores.probs, scores.embeddings, labels, mean_p, dataset, config, stage="flags"
    )
    split = flags.mixture_split(issue_score, seed=config.seed)
    if config.top_k is not None:
        is_issue = flags.flag_label_issues(issue_score, top_k=config.top_k)
        threshold = float(np.min(issue_score[is_issue])) if is_issue.any() else 1.0
    else:
        threshold = (
            config.label_issue_threshold
            if config.label_issue_threshold is not None
            else split.threshold
        )
        is_issue = issue_score >= threshold

    trusted = flags.select_trusted(table["p_given"].to_numpy(), is_issue)
    ood = flags.ood_scores(
        scores.probs,
        scores.embeddings,
        labels,
        trusted_mask=trusted,
        k=OOD_NEIGHBOUR,
        knn_votes=knn.votes,
        p_std=table["std_p"].to_numpy() if "std_p" in table else None,
        reference_mask=~is_issue,
        seed=config.seed,
        progress="flags: OOD distance" if config.progress else None,
    )
    if config.ood_threshold is not None:
        ood_threshold = float(config.ood_threshold)
    else:
        ood_threshold = flags.auto_ood_threshold(ood, reference_mask=~is_issue)
    is_ood = flags.flag_ood(ood, threshold=ood_threshold)
    # Suggestions for examples more atypical than most unflagged ones go to a person: an OOD
    # input the strict OOD threshold missed would otherwise be "corrected" into a class.
    review_threshold = min(
        ood_threshold,
        flags.auto_ood_threshold(ood, reference_mask=~is_issue, fpr=OOD_REVIEW_FPR),
    )
    out = pd.DataFrame(
        {
            "example_id": table["example_id"].to_numpy(),
            "knn_agreement": knn.agreement,
            "label_issue_score": issue_score,
            "is_label_issue": is_issue,
            "ood_score": ood,
            "is_ood": is_ood,
        }
    )
    noise = estimate.estimate_noise(scores.probs, labels)
    return Flags(
        out,
        float(threshold),
        float(ood_threshold),
        float(review_threshold),
        split.noise_rate,
        noise,
        knn.votes,
    )


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
    train, _ = _train_and_test(dataset)
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
            known_ids=train.example_ids,
            classes=dataset.classes,
            strict=strict_reviews,
        )
        review_report = reviews.report
        review_positions = reviews.to_positions(train.example_ids, dataset.classes)
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
    return Corrections(table, plan, review_report)


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
    """Train the final model on the corrected labels, OOD and unresolved examples left out.

    The residual noise of the corrected labels is estimated with the audit model's probabilities
    and the emphasis is chosen again from it (less noise: a smaller λ), unless the user fixed it.
    `checkpoint_dir`, `resume` and `on_epoch_end` go to `dm_audit.training.fit`.
    """
    if not config.retrain:
        return Retrained(None, None, None, 0.0)
    start = time.perf_counter()
    train, test = _train_and_test(dataset)
    keep = corrections.table["include_in_retrain"].to_numpy(dtype=bool)
    if keep.sum() < 2:
        raise ConfigError("fewer than two examples are left to retrain on after the corrections")
    labels = corrections.table["corrected"].to_numpy()[keep]
    residual = estimate.estimate_noise(scores.probs[keep], labels)
    if config.lam is not None:
        choice = estimate.EmphasisChoice(float(config.lam), float(config.beta), "fixed by the user")
    else:
        choice = estimate.choose_emphasis(residual.rate, dataset.n_classes)
    truth = _truth(train)
    result = fit(
        train.inputs()[keep],
        labels,
        _train_config(
            config,
            loss="dm",
            loss_params=_dm_params(choice),
            epochs=_epochs(config, int(keep.sum())),
            seed_offset=100,
            label="3/3 retrain",
        ),
        num_classes=dataset.n_classes,
        eval_inputs=None if test is None else test.inputs(),
        eval_labels=None if test is None else test.label_codes(),
        true_labels=None if truth is None else truth[keep],
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        on_epoch_end=on_epoch_end,
    )
    return Retrained(result, choice, residual, time.perf_counter() - start)


# ============================================================================================
# evaluation and reports


def _test_accuracy(
    fit_result: FitResult | None, test: AuditDataset | None, device: str
) -> float | None:
    if fit_result is None or test is None:
        return None
    probs, _ = predict_proba(fit_result.model, test.inputs(), device=device, batch_size=1024)
    return accuracy(probs.argmax(axis=1), test.label_codes())


def _detection(truth: np.ndarray, flagged: np.ndarray, score_values: np.ndarray) -> dict[str, Any]:
    """Precision, recall, F1 and AUROC of flags against a known truth (bool arrays)."""
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


def _history_frame(stage: str, fit_result: FitResult | None) -> pd.DataFrame:
    if fit_result is None or not fit_result.history:
        return pd.DataFrame(columns=["stage", "epoch"])
    frame = pd.DataFrame(fit_result.history)
    numeric = [
        c
        for c in frame.columns
        if c != "epoch"
        and pd.api.types.is_numeric_dtype(frame[c])
        and not pd.api.types.is_bool_dtype(frame[c])
    ]
    out = frame[["epoch", *numeric]].copy()
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
    train, test = _train_and_test(dataset)
    classes = np.asarray(dataset.classes, dtype=object)
    given = scores.table["given"].to_numpy()
    examples = pd.DataFrame(
        {
            "example_id": scores.table["example_id"].to_numpy(),
            "split": "train",
            "given_label": classes[given],
            "p_given": scores.table["p_given"].to_numpy(),
            "mean_p": scores.table["mean_p"].to_numpy() if "mean_p" in scores.table else np.nan,
            "emphasis_weight": scores.table["emphasis_weight"].to_numpy(),
            "predicted_label": classes[scores.table["predicted"].to_numpy()],
            "predicted_prob": scores.table["predicted_prob"].to_numpy(),
        }
    )
    for column in ("knn_agreement", "label_issue_score", "is_label_issue", "ood_score", "is_ood"):
        examples[column] = flag_result.table[column].to_numpy()
    for column in (
        "suggested_label",
        "suggestion_confidence",
        "corrected_label",
        "correction_source",
    ):
        examples[column] = corrections.table[column].to_numpy()
    truth = _truth(train)
    if truth is not None:
        examples["true_label"] = train.table["true_label"].to_numpy(dtype=object)
        examples["is_noisy"] = given != truth

    audit_test = _test_accuracy(audit_fit.fit, test, config.device)
    final_test = _test_accuracy(retrained.fit, test, config.device)
    source = corrections.table["correction_source"].value_counts()
    summary: dict[str, Any] = {
        "source": dataset.source,
        "n_examples": len(train),
        "n_test_examples": 0 if test is None else len(test),
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
            "audit": _choice_dict(audit_fit.choice),
            "retrain": _choice_dict(retrained.choice),
        },
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
        "quality": {
            "test_accuracy_before": audit_test,
            "test_accuracy_after": final_test,
        },
        "training_events": {
            "audit": audit_fit.fit.events,
            "retrain": [] if retrained.fit is None else retrained.fit.events,
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

    metrics = pd.concat(
        [_history_frame("audit", audit_fit.fit), _history_frame("retrain", retrained.fit)],
        ignore_index=True,
    )
    is_issue = examples["is_label_issue"].to_numpy(dtype=bool)
    figures: dict[str, Any] = {
        "p_distribution": plots.plot_p_distribution(examples["p_given"].to_numpy(), is_issue),
        "label_issue_scores": plots.plot_score_distribution(
            examples["label_issue_score"].to_numpy(),
            flag_result.label_issue_threshold,
            is_flagged=is_issue,
        ),
        "noise_matrix": plots.plot_noise_matrix(
            flag_result.noise_estimate.matrix, list(dataset.classes)
        ),
        "weighting_curves": _weighting_figure(audit_fit.choice, retrained.choice),
    }
    p_history = audit_fit.fit.dynamics.p_matrix()
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
        The dataset; its training split is audited, its test split measures the models.
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
    train, _ = _train_and_test(dataset)
    if reviews_path is not None:
        # A bad reviews file fails now, not after hours of training.
        read_reviews(
            reviews_path, known_ids=train.example_ids, classes=dataset.classes, strict=True
        )
    if out_dir is None:
        return _run_stages(dataset, config, None, reviews_path)
    # Fail before hours of training, not after, when the folder holds a previous run.
    target = resolve_output_dir(out_dir, if_exists=if_exists, names=reports.REPORT_FILES)
    if restart:
        discard_work(target)
    created = not target.exists()
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
        if created:
            with contextlib.suppress(OSError):
                target.rmdir()
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
    flag_result = stage("flags", lambda: flag_examples(dataset, scores, probe_result, config))
    corrections = stage(
        "corrections",
        lambda: correct_labels(dataset, scores, flag_result, config, reviews_path=reviews_path),
    )
    retrained = retrain(dataset, scores, corrections, config, **training("retrain"))
    resumed = _take_resume_events("audit", audit_fit.fit) + _take_resume_events(
        "retrain", retrained.fit
    )
    report = build_report(
        dataset, probe_result, audit_fit, scores, flag_result, corrections, retrained, config
    )
    report.summary["resumed"] = resumed
    return report


def _take_resume_events(training: str, fit_result: FitResult | None) -> list[dict[str, Any]]:
    """Move a training's resume events out of its event list into the run's resume record.

    A resumed training's other events and history are those of an uninterrupted one; keeping
    the resumes apart keeps the report comparable to that of an uninterrupted run.
    """
    if fit_result is None:
        return []
    taken = [e for e in fit_result.events if e.get("event") == "resume"]
    fit_result.events[:] = [e for e in fit_result.events if e.get("event") != "resume"]
    return [{"training": training, "epoch": int(e["epoch"])} for e in taken]
