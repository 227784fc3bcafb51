"""What each stage of the audit hands to the next: plain dataclasses, stored as data.

The stages (`dm_audit.stage_training`, `dm_audit.stage_scoring`, `dm_audit.stage_flags`,
`dm_audit.stage_correction`, `dm_audit.report_builder`) pass these results along; a resumable
run and the Dagster assets keep them on disk with `dm_audit.stage_store`, which stores their
fields by name, so the fields' order and defaults are part of the stored format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from dm_audit import correction, estimate, neighbours
from dm_audit.inference import predict_class_probs
from dm_audit.metrics import skill_above_chance
from dm_audit.training import FitResult


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
    epoch_seconds : float or None
        Seconds one epoch of all the probe's fold models took together (each model's median
        epoch, start-up excluded): what the audit's expected training time is read from.
    """

    noise_rate: float
    estimate: estimate.NoiseEstimate
    choice: estimate.EmphasisChoice
    adaptive: bool
    seconds: float
    folds: np.ndarray | None = None
    probs: np.ndarray | None = None
    epoch_seconds: float | None = None


@dataclass
class CrossFit:
    """K models of one training, model k trained on every row outside fold k.

    Attributes
    ----------
    fits : list of FitResult
        ``fits[k]`` never saw the rows of fold k, so its predictions for them are out of sample.
    folds : ndarray (N,) int
        The fold of every row of the dataset.
    input_map : HeavyTailMap or None
        The map of heavy-tailed feature columns the training rows went through
        (`dm_audit.heavy_tails`), applied to new inputs by `predict_proba`; None: none.
    """

    fits: list[FitResult]
    folds: np.ndarray
    input_map: Any = None

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
        if self.input_map is not None:
            inputs = self.input_map.apply(inputs)
        total: np.ndarray | None = None
        for f in self.fits:
            probs = predict_class_probs(f.model, inputs, device=device, batch_size=1024)
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
        return emphasis_in_force(self.choice, self.models)


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
    reference_probs : ndarray (N, C) or None
        Out-of-sample probabilities of the linear reference model (`dm_audit.linear_reference`),
        a second model family; None when the audit went without one, a row of NaN where it
        abstains (a row of a class too small for it).
    reference_skipped : str or None
        Why the audit went without the linear reference (None when it used one).
    """

    table: pd.DataFrame
    probs: np.ndarray
    embeddings: list[np.ndarray | neighbours.EmbeddingChunks]
    proselflc_targets: np.ndarray | None = None
    probe_probs: np.ndarray | None = None
    reference_probs: np.ndarray | None = None
    reference_skipped: str | None = None

    def combined_probs(self) -> np.ndarray:
        """The audit network's out-of-sample probabilities mixed with the linear reference's
        by `family_weights` (the network's alone without one): what a suggestion's confidence
        and the automatic-correction gate read."""
        return mix_families(self.probs, self.reference_probs, self.family_weights)

    def ensemble_probs(self) -> np.ndarray:
        """The network family's probabilities (the audit's and the probe's, averaged) mixed
        with the linear reference's by `family_weights`: what the noise count, the label-issue
        score's prediction and the suggested class read. A missing member is left out."""
        return mix_families(
            mean_of(self.probs, self.probe_probs), self.reference_probs, self.family_weights
        )

    @cached_property
    def family_weights(self) -> FamilyWeights | None:
        """How the two model families weigh, by the network family's skill (the audit's and
        the probe's networks, averaged) and the reference's; None without a reference. Found
        once: the flags, the corrections and the report all read the same weights."""
        return family_weights(
            mean_of(self.probs, self.probe_probs),
            self.reference_probs,
            self.table["given"].to_numpy(),
        )

    @property
    def folds(self) -> np.ndarray:
        return self.table["fold"].to_numpy()

    def fold_rows(self) -> list[np.ndarray]:
        """Row numbers of each fold, in the order of that fold's embeddings."""
        folds = self.folds
        return [np.flatnonzero(folds == k) for k in range(len(self.embeddings))]


@dataclass(frozen=True)
class FamilyWeights:
    """The share of the linear reference in the ensemble and the skills it follows from.

    A family's skill is its balanced accuracy on the given labels out of sample above chance
    (`dm_audit.metrics.skill_above_chance`), measured on the rows where the reference does not
    abstain (`judged_rows`); each family weighs in proportion to its skill. A family that
    learned nothing (a network that memorised a few dozen noisy rows and predicts new ones at
    chance) then weighs nothing, where an equal share let it halve the evidence of the other
    and lifted the noise count to what chance predictions imply; two equally good families
    weigh half each, and so do two with no skill (nothing to choose by). Chosen against equal
    weights on development tables only, scored on the same audits
    (benchmarks/results/family_weights.md; the real development tables:
    benchmarks/results/real_dev_choices.md, "equal weights").
    """

    reference_share: float
    networks_skill: float
    reference_skill: float
    judged_rows: int

    def to_dict(self) -> dict[str, float]:
        return {
            "networks_share": 1.0 - self.reference_share,
            "linear_reference_share": self.reference_share,
            "networks_skill": self.networks_skill,
            "linear_reference_skill": self.reference_skill,
            "judged_rows": self.judged_rows,
        }


def family_weights(
    networks: np.ndarray, reference: np.ndarray | None, labels: np.ndarray
) -> FamilyWeights | None:
    """The two families' weights by their skill (see `FamilyWeights`); None without a
    reference of the networks' shape or where it abstains on every row."""
    if reference is None or reference.shape != networks.shape:
        return None
    judged = ~np.isnan(reference[:, 0])
    if not judged.any():
        return None
    # Predictions first, then the judged rows: no N x C copy when the reference abstains.
    labels = np.asarray(labels)[judged]
    s_networks = skill_above_chance(networks.argmax(axis=1)[judged], labels)
    s_reference = skill_above_chance(reference.argmax(axis=1)[judged], labels)
    total = s_networks + s_reference
    share = 0.5 if total == 0.0 else s_reference / total
    return FamilyWeights(share, s_networks, s_reference, int(judged.sum()))


def mix_families(
    networks: np.ndarray, reference: np.ndarray | None, weights: FamilyWeights | None
) -> np.ndarray:
    """`networks` and `reference` mixed by `weights` (`family_weights`), as float32;
    `networks` as they are without weights and on the rows where the reference abstains (a
    row of NaN)."""
    if weights is None or reference is None:
        return networks
    share = weights.reference_share
    mixed = ((1.0 - share) * networks.astype(np.float64) + share * reference).astype(np.float32)
    abstains = np.isnan(reference[:, 0])
    if abstains.any():
        mixed[abstains] = networks[abstains]
    return mixed


def skill_weighted(
    networks: np.ndarray, reference: np.ndarray | None, labels: np.ndarray
) -> np.ndarray:
    """`networks` and `reference` mixed by their own `family_weights` on `labels`."""
    return mix_families(networks, reference, family_weights(networks, reference, labels))


def mean_of(a: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """Equal-weight mean of two probability matrices as float32; `a` alone when `b` is missing
    or of another shape, and on the rows where `b` abstains (a row of NaN: the linear
    reference on a class too small for it)."""
    if b is None or b.shape != a.shape:
        return a
    mean = ((a.astype(np.float64) + b) / 2.0).astype(np.float32)
    abstains = np.isnan(b[:, 0])
    if abstains.any():
        mean[abstains] = a[abstains]
    return mean


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
    # The OOD score before the group view (`flags.smooth_over_neighbours`), for benchmarks that
    # measure what the group view adds; not written to the reports.
    ood_score_alone: np.ndarray | None = None
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
    skipped : str or None
        Why the retrain did not run although it was asked for (too few rows kept to train a
        model of every fold); None when it ran or was switched off.
    """

    models: CrossFit | None
    choice: estimate.EmphasisChoice | None
    residual_estimate: estimate.NoiseEstimate | None
    seconds: float
    probs: np.ndarray | None = None
    skipped: str | None = None

    @property
    def effective_choice(self) -> estimate.EmphasisChoice | None:
        if self.choice is None or self.models is None:
            return self.choice
        return emphasis_in_force(self.choice, self.models)


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
    # The final cross-fitted models (the retrained ones, or the audit's without a retrain), for
    # predictions on new inputs (`dm_audit.api.LabelAuditor`); not written to disk.
    final_models: CrossFit | None = None
    # Renders report.html when `html` is first read. The page embeds every plot as a PNG: on a
    # 150-row table it cost a second, more than the audit's training, which an audit whose
    # report is never written (the Python API, a benchmark) should not pay.
    render_html: Callable[[], str] | None = field(default=None, repr=False, compare=False)
    # The rendered page; an init field so `dataclasses.replace` carries it.
    _html: str | None = field(default=None, repr=False, compare=False)

    @property
    def html(self) -> str | None:
        """The self-contained report.html (`html_report.render_report`), rendered once."""
        if self._html is None and self.render_html is not None:
            self._html = self.render_html()
            self.render_html = None  # the renderer holds the dataset: let it go
        return self._html


def emphasis_in_force(
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
