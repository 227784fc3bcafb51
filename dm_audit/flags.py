"""Flag mislabelled (in-distribution) examples: the label-issue score and how many to flag.

Arrays in, arrays out. The inputs come from out-of-sample predictions and a DM-trained model,
which does not memorise noisy labels:

* `label_issue_scores` combines the model's disagreement with the given label and the training
  dynamics (mean p_i over epochs), and can weigh in the disagreement of nearest neighbours in
  the embedding space (`dm_audit.neighbour_labels.knn_label_agreement`; weight 0 by default);
  `dynamics_reliability` says how far the dynamics can be trusted.
* how many to flag: in each given class, as many as the calibrated confident joint counts
  (`issue_counts_per_class`, `flag_by_class_counts`: the audit's rule), or `flag_label_issues`
  by a threshold, a top k, or a noise rate (`dm_audit.issue_thresholds.auto_threshold`).

The neighbouring concepts live in their own modules and are re-exported here: the OOD score and
flags (`dm_audit.ood`), the neighbour-label statistics (`dm_audit.neighbour_labels`) and the
thresholds read from the score density (`dm_audit.issue_thresholds`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from dm_audit.array_checks import validate_labels, validate_probs
from dm_audit.errors import ConfigError, DataError
from dm_audit.estimate import NoiseEstimate
from dm_audit.issue_thresholds import ScoreSplit, auto_threshold, mixture_split
from dm_audit.neighbour_labels import KnnLabelAgreement, knn_label_agreement
from dm_audit.neighbours import IVF_THRESHOLD
from dm_audit.ood import (
    DEFAULT_OOD_WEIGHTS,
    GROUP_NEIGHBOURS,
    GROUP_VIEW_WEIGHT,
    IMAGE_INPUT_VIEW_WEIGHT,
    INPUT_NEIGHBOUR,
    INPUT_VIEW_WEIGHT,
    auto_ood_threshold,
    conformal_ood_flags,
    flag_ood,
    input_space_distances,
    ood_scores,
    select_trusted,
    smooth_over_neighbours,
)
from dm_audit.score_components import combine_components, validate_unit_vector

__all__ = [
    "DEFAULT_ISSUE_WEIGHTS",
    "DEFAULT_OOD_WEIGHTS",
    "GROUP_NEIGHBOURS",
    "GROUP_VIEW_WEIGHT",
    "IMAGE_INPUT_VIEW_WEIGHT",
    "INPUT_NEIGHBOUR",
    "INPUT_VIEW_WEIGHT",
    "IVF_THRESHOLD",
    "NEUTRAL_ISSUE_SCORE",
    "KnnLabelAgreement",
    "ScoreSplit",
    "auto_ood_threshold",
    "auto_threshold",
    "conformal_ood_flags",
    "dynamics_reliability",
    "flag_by_class_counts",
    "flag_label_issues",
    "flag_ood",
    "input_space_distances",
    "issue_counts_per_class",
    "knn_label_agreement",
    "label_issue_scores",
    "mixture_split",
    "ood_scores",
    "select_trusted",
    "smooth_over_neighbours",
]

# The in-sample DM trajectory (mean p_i under the model that trains on the row: DM learns clean
# rows early and mislabelled ones late or never) weighs twice the out-of-sample prediction of the
# models that never saw the row; the audit scales the dynamics weight by `dynamics_reliability`:
# a model that memorised its rows (a tiny, wide table) has no trajectory signal left. Chosen on
# the development datasets of benchmarks/flag_rules.py (results/flag_rules.md).
# The neighbours' labels weigh 0: they repeat what the prediction already reads (the neighbours
# are found in the embedding the prediction is made from) with each neighbour's label as noisy as
# the row's own. Scored on the same audits of the six development datasets
# (benchmarks/results/evidence_choices.md): weight 1 -> 0 moved the mean F1 at 20-40 % noise
# 0.696 -> 0.699 (higher on four datasets, within 0.002 on the other two) and the AUROC
# 0.928 -> 0.931 (higher on five), the mean share flagged on clean data 2.00 -> 1.98 %. The
# agreement is still computed: reported per row, and its votes rank the suggested labels.
DEFAULT_ISSUE_WEIGHTS: dict[str, float] = {"prediction": 1.0, "dynamics": 2.0, "knn": 0.0}
# Every component is 0.5 where its evidence is neutral (the model torn between the given label
# and another, mean p_i = 0.5, half of the neighbours agreeing), so a weighted score at or
# above it leans towards another label.
NEUTRAL_ISSUE_SCORE = 0.5


def _rank01(x: np.ndarray) -> np.ndarray:
    """Average ranks scaled to [0, 1] (ties share a rank)."""
    if x.size == 1:
        return np.zeros(1)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    # Average the ranks of tied values so equal inputs get equal scores.
    uniq, inverse = np.unique(x, return_inverse=True)
    if uniq.size < x.size:
        ranks = np.bincount(inverse, weights=ranks) / np.bincount(inverse)
        ranks = ranks[inverse]
    return ranks / (x.size - 1)


def label_issue_scores(
    p_given: np.ndarray,
    probs: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    mean_p: np.ndarray | None = None,
    knn_agreement: np.ndarray | None = None,
    weights: Mapping[str, float] | None = None,
    normalize: Literal["none", "rank"] = "none",
) -> np.ndarray:
    """Score how likely each given label is wrong, in [0, 1] (higher = more suspicious).

    The score is a weighted mean of the available components, each in [0, 1]:

    * ``"prediction"``: with `probs` and `labels`, the normalised margin
      ``(1 + max_{j != y} p_j - p_given) / 2`` (0.5 where the model is torn between the given
      label and another class; it also uses the *alternative* class's strength, which separates
      noise better than ``1 - p_given`` alone); without them, ``1 - p_given``.
    * ``"dynamics"``: ``1 - mean_p``, the mean over epochs of p_i (a DM model learns clean
      examples early and mislabelled ones late or never, so the mean is steadier than the last
      epoch's value).
    * ``"knn"``: ``1 - knn_agreement`` (see `knn_label_agreement`).

    The default keeps each component's natural scale, so the score stays bimodal (clean
    examples near 0, mislabelled near 1) and `auto_threshold` can find the valley between the
    modes. ``normalize="rank"`` replaces each component by its rank in [0, 1] first, which
    equalises components whose scales differ (e.g. a weak kNN signal) but makes the scores
    uniform, so thresholds must then come from a noise rate or top-k.

    Parameters
    ----------
    p_given : np.ndarray, shape (N,)
        Probability of the given label under the audit model.
    probs : np.ndarray, shape (N, C), optional
        Class probabilities of the audit model (rows sum to 1); needs `labels`.
    labels : np.ndarray, shape (N,), optional
        Given labels as integer codes.
    mean_p : np.ndarray, shape (N,), optional
        Mean of p_i over training epochs.
    knn_agreement : np.ndarray, shape (N,), optional
        Fraction of nearest neighbours sharing the given label.
    weights : mapping, optional
        Component weights by name; missing names weigh 0, absent components are skipped and
        the rest renormalised. Default `DEFAULT_ISSUE_WEIGHTS` (dynamics 2, prediction 1, knn 0).
    normalize : {"none", "rank"}
        Rank-normalise components before combining.

    Returns
    -------
    np.ndarray, shape (N,)
        Scores in [0, 1], float64.
    """
    pg = validate_unit_vector(p_given, "p_given")
    n = pg.shape[0]
    if normalize not in ("none", "rank"):
        raise ConfigError(f"normalize must be 'none' or 'rank', got {normalize!r}")
    components = {"prediction": _prediction_component(pg, probs, labels)}
    if mean_p is not None:
        components["dynamics"] = 1.0 - validate_unit_vector(mean_p, "mean_p", n)
    if knn_agreement is not None:
        components["knn"] = 1.0 - validate_unit_vector(knn_agreement, "knn_agreement", n)
    if normalize == "rank":
        components = {name: _rank01(v) for name, v in components.items()}
    unknown = set(weights or {}) - set(DEFAULT_ISSUE_WEIGHTS)
    if unknown:
        raise ConfigError(
            f"unknown label-issue weight(s) {sorted(unknown)}; use {sorted(DEFAULT_ISSUE_WEIGHTS)}"
        )
    return combine_components(components, DEFAULT_ISSUE_WEIGHTS if weights is None else weights)


def _prediction_component(
    pg: np.ndarray, probs: np.ndarray | None, labels: np.ndarray | None
) -> np.ndarray:
    """The normalised margin ``(1 + max_{j != y} p_j - p_given) / 2``, or ``1 - p_given``."""
    if probs is None:
        return 1.0 - pg
    n = pg.shape[0]
    if labels is None:
        raise ConfigError("label_issue_scores: probs needs labels to find the given class")
    p = validate_probs(probs)
    if p.shape[0] != n:
        raise DataError(f"probs has {p.shape[0]} rows but p_given has {n}")
    y = validate_labels(labels, n, p.shape[1])
    other = p.copy()
    other[np.arange(n), y] = -np.inf
    return np.clip((1.0 + other.max(axis=1) - pg) / 2.0, 0.0, 1.0)


def flag_label_issues(
    scores: np.ndarray,
    *,
    threshold: float | None = None,
    top_k: int | None = None,
    noise_rate: float | None = None,
    min_score: float = 0.5,
) -> np.ndarray:
    """Boolean mask of flagged label issues.

    Give at most one of `threshold` (flag ``scores > threshold``) and `top_k` (flag the k
    highest scores, ties broken by position). Otherwise the threshold comes from
    `auto_threshold(scores, noise_rate, min_score=min_score)`.

    Parameters
    ----------
    scores : np.ndarray, shape (N,)
        Label-issue scores in [0, 1].
    threshold : float, optional
        Fixed threshold.
    top_k : int, optional
        Number of examples to flag.
    noise_rate : float, optional
        Estimated noise rate for the automatic threshold.
    min_score : float
        Floor of the automatic threshold.

    Returns
    -------
    np.ndarray, shape (N,), bool
    """
    s = validate_unit_vector(scores, "scores")
    if threshold is not None and top_k is not None:
        raise ConfigError("give either threshold or top_k, not both")
    if top_k is not None:
        if int(top_k) != top_k or top_k < 0:
            raise ConfigError(f"top_k must be a non-negative integer, got {top_k!r}")
        mask = np.zeros(s.size, dtype=bool)
        mask[np.argsort(-s, kind="stable")[: int(top_k)]] = True
        return mask
    if threshold is None:
        threshold = auto_threshold(s, noise_rate, min_score=min_score)
    return s > float(threshold)


def dynamics_reliability(mean_p: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> float:
    """How far the in-sample trajectory can be trusted: 1 - the share of doubted rows it fitted.

    The rows whose out-of-sample prediction is another class than their given label are the
    ones the trajectory should single out. When the model that trained on them fitted most of
    them anyway (mean p_i of at least 0.5), it memorised its rows and its trajectory no longer
    separates wrong labels from right ones; when it left them unfitted, as DM does with noise it
    does not memorise, the trajectory carries the signal.

    Parameters
    ----------
    mean_p : np.ndarray, shape (N,)
        Mean p_i over the epochs under the model that trained on each row.
    probs : np.ndarray, shape (N, C)
        Out-of-sample class probabilities.
    labels : np.ndarray, shape (N,)
        Given labels as integer codes.

    Returns
    -------
    float
        In [0, 1]; 1 when no row is doubted.
    """
    p = validate_probs(probs)
    y = validate_labels(labels, p.shape[0], p.shape[1])
    mp = validate_unit_vector(mean_p, "mean_p", p.shape[0])
    doubted = p.argmax(axis=1) != y
    if not doubted.any():
        return 1.0
    return float(1.0 - np.mean(mp[doubted] >= 0.5))


def issue_counts_per_class(noise: NoiseEstimate, labels: np.ndarray) -> np.ndarray:
    """How many rows of each given class carry a wrong label, by the calibrated confident joint.

    ``noise.joint[true, given]`` is calibrated so each given-label column sums to that label's
    share of the rows; the off-diagonal part of column j times N is the estimated number of rows
    labelled j whose true class is another one (confident learning's ``prune_by_class`` count).

    Parameters
    ----------
    noise : NoiseEstimate
        `dm_audit.estimate.estimate_noise` of out-of-sample probabilities and `labels`.
    labels : np.ndarray, shape (N,)
        Given labels as integer codes.

    Returns
    -------
    np.ndarray, shape (C,), int64
        Estimated number of wrong labels per given class, at most the class's size.
    """
    joint = np.asarray(noise.joint, dtype=np.float64)
    c = joint.shape[0]
    y = validate_labels(labels, np.asarray(labels).shape[0], c)
    counts = np.bincount(y, minlength=c)
    wrong = (joint.sum(axis=0) - np.diag(joint)) * y.size
    return np.clip(np.rint(wrong), 0, counts).astype(np.int64)


def flag_by_class_counts(scores: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flag, in each given class j, the ``counts[j]`` rows with the highest scores.

    Ties at the cut are broken by position, so exactly ``counts[j]`` rows of class j are
    flagged (or all of them when the class is smaller).

    Parameters
    ----------
    scores : np.ndarray, shape (N,)
        Label-issue scores in [0, 1].
    labels : np.ndarray, shape (N,)
        Given labels as integer codes.
    counts : np.ndarray, shape (C,)
        Number of rows to flag per given class (`issue_counts_per_class`).

    Returns
    -------
    np.ndarray, shape (N,), bool
    """
    s = validate_unit_vector(scores, "scores")
    want = np.asarray(counts)
    if want.ndim != 1 or (want < 0).any():
        raise ConfigError(f"counts must be a vector of non-negative integers, got {want!r}")
    y = validate_labels(labels, s.size, want.size)
    mask = np.zeros(s.size, dtype=bool)
    for cls in range(want.size):
        rows = np.flatnonzero(y == cls)
        take = min(int(want[cls]), rows.size)
        if take:
            mask[rows[np.argsort(-s[rows], kind="stable")[:take]]] = True
    return mask
