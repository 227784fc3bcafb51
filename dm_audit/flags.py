"""Flag mislabelled (in-distribution) and out-of-distribution examples.

Arrays in, arrays out. The inputs come from one DM-trained model, which does not memorise noisy
labels, so its probabilities behave like out-of-sample probabilities:

* **label issues**: `label_issue_scores` combines the model's disagreement with the given label,
  the training dynamics (mean p_i over epochs) and the disagreement of nearest neighbours in the
  embedding space (`knn_label_agreement`); `auto_threshold` ties the cut to the estimated noise
  rate and refines it at the valley of the score density.
* **out-of-distribution (OOD)**: `ood_scores` combines the distance to the nearest *trusted*
  examples in the embedding space, the prediction's uncertainty (entropy, or energy when logits
  are given) and the label disorder of the neighbourhood. A mislabelled example is still close
  to trusted examples of its true class and confidently predicted; an OOD input is far from every
  class, uncertain, and its neighbours (other OOD inputs) carry random labels.

Nearest neighbours use faiss on L2-normalised embeddings (inner product = cosine similarity):
an exact `IndexFlatIP` up to `ivf_threshold` rows and above it an IVF index with about 4 sqrt(N)
lists and float16 vectors (`dm_audit.neighbours`). Embeddings may be an array or chunks read
back from a scores Parquet file, so at millions of rows only the index and one chunk are in
memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dm_audit import neighbours
from dm_audit.errors import ConfigError, DataError
from dm_audit.estimate import NoiseEstimate, validate_labels, validate_mask, validate_probs
from dm_audit.neighbours import IVF_THRESHOLD, ArrayEmbeddings, EmbeddingChunks, IndexKind

__all__ = [
    "DEFAULT_ISSUE_WEIGHTS",
    "DEFAULT_OOD_WEIGHTS",
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
    "issue_counts_per_class",
    "knn_label_agreement",
    "label_issue_scores",
    "mixture_split",
    "ood_scores",
    "select_trusted",
]

# At most half the weight on the in-sample DM trajectory (mean p_i under the model that trains on
# the row: DM learns clean rows early and mislabelled ones late or never), the rest on
# out-of-sample evidence (the prediction of the model that never saw the row, and its
# neighbours' labels). The audit scales the dynamics weight by `dynamics_reliability`: a model
# that memorised its rows (a tiny, wide table) has no trajectory signal left. Chosen on the
# development datasets of benchmarks/flag_rules.py (results/flag_rules.md).
DEFAULT_ISSUE_WEIGHTS: dict[str, float] = {"prediction": 1.0, "dynamics": 2.0, "knn": 1.0}
# Every component is 0.5 where its evidence is neutral (the model torn between the given label
# and another, mean p_i = 0.5, half of the neighbours agreeing), so a weighted score at or
# above it leans towards another label.
NEUTRAL_ISSUE_SCORE = 0.5
# Measured on digits (classes 8, 9 held out as 8 % open set, plus 30 % symmetric noise), AUROC
# against all / against mislabelled examples: distance (k=1) 0.91 / 0.81, entropy 0.93 / 0.84,
# neighbours' label entropy 0.64 / 0.60, std of p_i over epochs 0.72 / 0.85; distance + entropy
# + instability 0.92 / 0.90. Mislabelled examples sit near their true class and DM ignores them
# steadily; an OOD input's p_i wanders, as nothing in the data supports or contradicts it.
DEFAULT_OOD_WEIGHTS: dict[str, float] = {
    "distance": 1.0,
    "uncertainty": 1.0,
    "neighbours": 0.0,
    "instability": 1.0,
}


# ----------------------------------------------------------------------------- validation


def _vector(x: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        want = f"({n},)" if n is not None else "(N,)"
        raise DataError(f"{name} must have shape {want}, got {arr.shape}")
    if arr.size == 0:
        raise DataError(f"{name} is empty")
    if not np.isfinite(arr).all():
        raise DataError(f"{name}[{int(np.flatnonzero(~np.isfinite(arr))[0])}] is not finite")
    return arr


def _unit_vector(x: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    arr = _vector(x, name, n)
    bad = (arr < -1e-6) | (arr > 1 + 1e-6)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{name}[{i}] = {arr[i]:.6g} is outside [0, 1]")
    return np.clip(arr, 0.0, 1.0)


def _embedding_source(x: np.ndarray | EmbeddingChunks, n: int | None = None) -> EmbeddingChunks:
    """An array (checked whole, as before) or a chunked source (checked chunk by chunk)."""
    if isinstance(x, np.ndarray) or not hasattr(x, "chunks"):
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] < 1 or (n is not None and arr.shape[0] != n):
            want = f"({n}, E)" if n is not None else "(N, E)"
            raise DataError(f"embeddings must have shape {want}, got {arr.shape}")
        return ArrayEmbeddings(arr)
    if n is not None and x.n_rows != n:
        raise DataError(f"embeddings must have shape ({n}, E), got {x.n_rows} rows")
    return x


# ----------------------------------------------------------------------------- faiss kNN


def _knn(
    base: EmbeddingChunks,
    queries: EmbeddingChunks,
    k: int,
    *,
    base_rows: np.ndarray | None,
    self_ids: np.ndarray | None,
    index: IndexKind,
    ivf_threshold: int,
    nprobe: int,
    batch_size: int,
    seed: int,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest base rows of each query, excluding the query itself.

    `base_rows` selects the indexed rows of `base` (default all); `self_ids[q]` is the index
    position of query q (or -1 when the query is not in the base). Missing neighbours (IVF with
    too few candidates) come back with id -1 and similarity -inf. Ids are index positions.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    idx = neighbours.build_index(
        base, base_rows, kind=index, ivf_threshold=ivf_threshold, nprobe=nprobe, seed=seed
    )
    return neighbours.search(
        idx, queries, k, self_positions=self_ids, batch_size=batch_size, progress=progress
    )


@dataclass(frozen=True)
class KnnLabelAgreement:
    """Neighbourhood label statistics of every example.

    Attributes
    ----------
    agreement : np.ndarray, shape (N,)
        Fraction of the k neighbours (self excluded) whose given label equals the example's.
    votes : np.ndarray, shape (N, C), float32
        Distribution of the neighbours' given labels; rows sum to 1.
    indices : np.ndarray, shape (N, k)
        Row numbers of the neighbours, nearest first (-1 where none was found).
    similarities : np.ndarray, shape (N, k)
        Cosine similarities to the neighbours (-inf where none was found).
    """

    agreement: np.ndarray
    votes: np.ndarray
    indices: np.ndarray
    similarities: np.ndarray


def knn_label_agreement(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    n_classes: int | None = None,
    k: int = 10,
    index: IndexKind = "auto",
    ivf_threshold: int = IVF_THRESHOLD,
    nprobe: int = 16,
    batch_size: int = 16_384,
    seed: int = 0,
    progress: str | None = None,
) -> KnnLabelAgreement:
    """How many nearest neighbours in the embedding space share each example's given label.

    A mislabelled example sits among examples of its true class, so few neighbours share its
    (wrong) given label; a clean one mostly agrees with its neighbours, up to the noise rate.

    Parameters
    ----------
    embeddings : np.ndarray, shape (N, E), or EmbeddingChunks
        Penultimate-layer embeddings; L2-normalised here (cosine similarity). A chunked source
        (`dm_audit.neighbours.ParquetEmbeddings`) is read chunk by chunk, so only the index and
        one chunk are in memory.
    labels : np.ndarray, shape (N,)
        Given labels as integer codes.
    n_classes : int, optional
        Number of classes C (default: ``labels.max() + 1``).
    k : int
        Neighbours per example, the example itself excluded.
    index : {"auto", "flat", "ivf"}
        faiss index: exact ``IndexFlatIP``; IVF with about 4 sqrt(N) lists and float16 vectors
        (approximate, for millions of rows); ``"auto"`` uses IVF above `ivf_threshold` rows.
    ivf_threshold : int
        Row count above which ``"auto"`` switches to IVF.
    nprobe : int
        IVF lists visited per query (more = more exact, slower).
    batch_size : int
        Queries per faiss call.
    seed : int
        Seed of the IVF training sample and k-means.
    progress : str, optional
        Label of the search's progress bar, shown when the search takes more than a moment
        (see `dm_audit.neighbours.search`); None shows none.

    Returns
    -------
    KnnLabelAgreement
        ``agreement`` (N,), ``votes`` (N, C), ``indices`` and ``similarities`` (N, k).
    """
    source = _embedding_source(embeddings)
    n = source.n_rows
    if n < 2:
        raise DataError("knn_label_agreement needs at least 2 examples")
    c = int(n_classes) if n_classes is not None else int(np.max(np.asarray(labels))) + 1
    y = validate_labels(labels, n, c)
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    sims, ids = _knn(
        source,
        source,
        min(k, n - 1),
        base_rows=None,
        self_ids=np.arange(n),
        index=index,
        ivf_threshold=ivf_threshold,
        nprobe=nprobe,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    valid = ids >= 0
    found = valid.sum(axis=1, keepdims=True)
    votes: np.ndarray | None = None
    # One bincount over flat (row, label) cells per block of rows: much faster than np.add.at,
    # and blocks keep its count array small at millions of rows.
    step = 65_536
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        ok, near = valid[lo:hi], ids[lo:hi]
        rows = np.broadcast_to(np.arange(hi - lo, dtype=np.int64)[:, None], near.shape)
        cells = rows[ok] * c + y[near[ok]]
        counts = np.bincount(cells, minlength=(hi - lo) * c).reshape(hi - lo, c)
        f = found[lo:hi]
        block = np.where(f > 0, counts.astype(np.float32) / np.maximum(f, 1), np.float32(1.0 / c))
        if votes is None:
            votes = np.empty((n, c), dtype=block.dtype)
        votes[lo:hi] = block
    assert votes is not None
    agreement = votes[np.arange(n), y].astype(np.float64)
    return KnnLabelAgreement(agreement=agreement, votes=votes, indices=ids, similarities=sims)


# ----------------------------------------------------------------------------- label issues


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


def _combine(components: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    used = {name: float(weights.get(name, 0.0)) for name in components}
    if any(w < 0 or not math.isfinite(w) for w in used.values()):
        raise ConfigError(f"weights must be finite and >= 0, got {dict(weights)}")
    total = sum(used.values())
    if total <= 0:
        raise ConfigError(
            f"the weights {dict(weights)} give every available component "
            f"{sorted(components)} weight zero"
        )
    out = sum(used[name] * comp for name, comp in components.items()) / total
    return np.clip(np.asarray(out, dtype=np.float64), 0.0, 1.0)


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
        the rest renormalised. Default `DEFAULT_ISSUE_WEIGHTS` (dynamics 2, the others 1).
    normalize : {"none", "rank"}
        Rank-normalise components before combining.

    Returns
    -------
    np.ndarray, shape (N,)
        Scores in [0, 1], float64.
    """
    pg = _unit_vector(p_given, "p_given")
    n = pg.shape[0]
    if normalize not in ("none", "rank"):
        raise ConfigError(f"normalize must be 'none' or 'rank', got {normalize!r}")
    components: dict[str, np.ndarray] = {}
    if probs is not None:
        if labels is None:
            raise ConfigError("label_issue_scores: probs needs labels to find the given class")
        p = validate_probs(probs)
        if p.shape[0] != n:
            raise DataError(f"probs has {p.shape[0]} rows but p_given has {n}")
        y = validate_labels(labels, n, p.shape[1])
        other = p.copy()
        other[np.arange(n), y] = -np.inf
        components["prediction"] = np.clip((1.0 + other.max(axis=1) - pg) / 2.0, 0.0, 1.0)
    else:
        components["prediction"] = 1.0 - pg
    if mean_p is not None:
        components["dynamics"] = 1.0 - _unit_vector(mean_p, "mean_p", n)
    if knn_agreement is not None:
        components["knn"] = 1.0 - _unit_vector(knn_agreement, "knn_agreement", n)
    if normalize == "rank":
        components = {name: _rank01(v) for name, v in components.items()}
    unknown = set(weights or {}) - set(DEFAULT_ISSUE_WEIGHTS)
    if unknown:
        raise ConfigError(
            f"unknown label-issue weight(s) {sorted(unknown)}; use {sorted(DEFAULT_ISSUE_WEIGHTS)}"
        )
    return _combine(components, DEFAULT_ISSUE_WEIGHTS if weights is None else weights)


def _smoothed_density(scores: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    """Gaussian kernel density of `scores` on `grid`, via a 512-bin histogram (O(N + grid))."""
    hist, edges = np.histogram(scores, bins=512, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    z = (grid[:, None] - centres[None, :]) / bandwidth
    return np.exp(-0.5 * z * z) @ hist


def auto_threshold(
    scores: np.ndarray,
    noise_rate: float | None = None,
    *,
    window: float = 0.3,
    min_score: float = 0.5,
    bandwidth: float = 0.02,
) -> float:
    """Choose a label-issue threshold from the estimated noise rate; flag ``scores > threshold``.

    1. Start from the cut that flags the top `noise_rate` fraction.
    2. Search the smoothed score density for its lowest point (the valley between the clean and
       the mislabelled mode) among the cuts that flag between ``(1 - window)`` and
       ``(1 + window)`` times that fraction. If it is an interior minimum (a real valley), move
       the cut to the valley: to the near-minimal point (density within 25 % of the minimum)
       closest to the quantile cut, since wide flat valleys have a noisy exact minimum. Else
       keep the quantile cut. This corrects a noise estimate that is off by a few points without
       trusting a valley far from it.
    3. Never go below `min_score`: an example is only flagged when the combined evidence leans
       towards another label (0.5 = the model is torn). On clean data this keeps the flags to the
       few examples the model really contradicts.

    Without a noise rate the threshold is `min_score`.

    Parameters
    ----------
    scores : np.ndarray, shape (N,)
        Label-issue scores in [0, 1].
    noise_rate : float, optional
        Estimated fraction of wrong labels (`estimate_noise`), in [0, 1].
    window : float
        Relative width of the valley search around the noise-rate cut, in [0, 1).
    min_score : float
        Lowest allowed threshold, in [0, 1].
    bandwidth : float
        Kernel bandwidth of the density, on the [0, 1] score scale.

    Returns
    -------
    float
        The threshold; 1.0 flags nothing.
    """
    s = _unit_vector(scores, "scores")
    if not 0.0 <= min_score <= 1.0:
        raise ConfigError(f"min_score must be in [0, 1], got {min_score!r}")
    if not 0.0 <= window < 1.0:
        raise ConfigError(f"window must be in [0, 1), got {window!r}")
    if not bandwidth > 0:
        raise ConfigError(f"bandwidth must be > 0, got {bandwidth!r}")
    if noise_rate is None:
        return float(min_score)
    if not 0.0 <= noise_rate <= 1.0:
        raise ConfigError(f"noise_rate must be in [0, 1], got {noise_rate!r}")
    n = s.size
    m = round(noise_rate * n)
    if m == 0:
        return 1.0
    desc = np.sort(s)[::-1]

    def cut(count: int) -> float:
        # Midway between the last flagged and the first unflagged score.
        count = int(np.clip(count, 1, n))
        return (
            float(desc[count - 1] - 1e-9)
            if count >= n
            else float((desc[count - 1] + desc[count]) / 2)
        )

    t = cut(m)
    t_low, t_high = cut(math.ceil(m * (1 + window))), cut(math.floor(m * (1 - window)))
    if t_high - t_low > 1e-6:
        grid = np.linspace(t_low, t_high, 201)
        density = _smoothed_density(s, grid, bandwidth)
        i = int(np.argmin(density))
        if 0 < i < grid.size - 1:
            # A valley between two well-fitted modes is often a wide, flat stretch whose exact
            # minimum is noise: among the near-minimal cuts keep the one closest to the
            # noise-rate cut.
            near = grid[density <= density[i] * 1.25]
            t = float(near[np.argmin(np.abs(near - t))])
    return float(max(t, min_score))


@dataclass(frozen=True)
class ScoreSplit:
    """A two-component mixture fitted to label-issue scores.

    Attributes
    ----------
    threshold : float
        Flag scores at or above it.
    noise_rate : float
        Share of scores at or above the threshold: the estimated share of wrong labels. (The
        high component's weight is not used: on clean data it models the tail of the clean
        scores and reads 3-13 % on digits, where the share above the threshold reads 0-0.2 %.)
    means : tuple of float
        Component means, low then high.
    weights : tuple of float
        Component weights, low then high.
    """

    threshold: float
    noise_rate: float
    means: tuple[float, float]
    weights: tuple[float, float]


def mixture_split(
    scores: np.ndarray,
    *,
    bounds: tuple[float, float] = (0.3, 0.5),
    seed: int = 0,
) -> ScoreSplit:
    """Estimate the noise rate and a threshold from a two-component Gaussian mixture on scores.

    Clean examples form a low mode and mislabelled ones a high mode. The threshold is the lowest
    score (above the low mode) at which an example is at least as likely to belong to the high
    component, clipped to `bounds`:
    below the lower bound the model still favours the given label on average (clean data then
    flags almost nothing), and at the upper bound the given label was below one half on average,
    evidence enough even when the modes are far apart and the boundary drifts towards the high
    one. The share of scores at or above the threshold estimates the noise rate.

    Parameters
    ----------
    scores : np.ndarray, shape (N,)
        Label-issue scores in [0, 1].
    bounds : (float, float)
        Lowest and highest threshold allowed.
    seed : int
        Seeds the mixture's initialisation.

    Returns
    -------
    ScoreSplit
    """
    from sklearn.mixture import GaussianMixture

    s = _unit_vector(scores, "scores")
    low, high = bounds
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"bounds must satisfy 0 <= low <= high <= 1, got {bounds}")
    if s.size < 4 or np.ptp(s) < 1e-9:
        # Too few or identical scores: nothing to separate, keep the cautious upper bound.
        return ScoreSplit(high, float(np.mean(s >= high)), (float(s.mean()),) * 2, (1.0, 0.0))
    mixture = GaussianMixture(2, random_state=seed, reg_covar=1e-4).fit(s[:, None])
    order = np.argsort(mixture.means_.ravel())
    means = mixture.means_.ravel()[order]
    weights = mixture.weights_[order]
    grid = np.linspace(0.0, 1.0, 1001)
    posterior_high = mixture.predict_proba(grid[:, None])[:, order[1]]
    above = grid[(posterior_high >= 0.5) & (grid >= means[0])]
    threshold = float(np.clip(above[0] if above.size else 1.0, low, high))
    return ScoreSplit(
        threshold,
        float(np.mean(s >= threshold)),
        (float(means[0]), float(means[1])),
        (float(weights[0]), float(weights[1])),
    )


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
    s = _unit_vector(scores, "scores")
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
    mp = _unit_vector(mean_p, "mean_p", p.shape[0])
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
    s = _unit_vector(scores, "scores")
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


# ----------------------------------------------------------------------------- OOD


def select_trusted(
    p_given: np.ndarray, is_label_issue: np.ndarray, *, min_p: float = 0.5
) -> np.ndarray:
    """Examples whose label the audit trusts: not flagged and ``p_given >= min_p``.

    They are the examples `ood_scores` measures distances to: confidently learned examples of
    the known classes, which out-of-distribution inputs are far from.

    Parameters
    ----------
    p_given : np.ndarray, shape (N,)
    is_label_issue : np.ndarray, shape (N,), bool
    min_p : float
        Minimum probability of the given label.

    Returns
    -------
    np.ndarray, shape (N,), bool
    """
    pg = _unit_vector(p_given, "p_given")
    flagged = validate_mask(is_label_issue, "is_label_issue", pg.size)
    return (~flagged) & (pg >= min_p)


def _ecdf(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Fraction of `reference` at or below each value: a rank against in-distribution examples."""
    ref = np.sort(reference)
    return np.searchsorted(ref, values, side="right") / ref.size


def ood_scores(
    probs: np.ndarray,
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    trusted_mask: np.ndarray,
    k: int = 3,
    logits: np.ndarray | None = None,
    knn_votes: np.ndarray | None = None,
    p_std: np.ndarray | None = None,
    weights: Mapping[str, float] | None = None,
    reference_mask: np.ndarray | None = None,
    per_class: bool = False,
    index: IndexKind = "auto",
    ivf_threshold: int = IVF_THRESHOLD,
    nprobe: int = 16,
    batch_size: int = 16_384,
    seed: int = 0,
    progress: str | None = None,
) -> np.ndarray:
    """Score how likely each example is out-of-distribution, in [0, 1] (higher = more likely).

    Components, each turned into its rank among in-distribution reference examples (the
    fraction of reference examples with a smaller or equal value, so 0.99 means "more atypical
    than 99 % of the examples whose label we trust"; the reference is `reference_mask`, by
    default `trusted_mask`), then averaged with `weights`:

    * ``"distance"``: cosine distance to the k-th nearest trusted example (self excluded). A
      mislabelled example is near trusted examples of its true class; an OOD input is far from
      all. With ``per_class=True`` only trusted examples labelled with the predicted class are
      searched (stricter, but it depends on the prediction being right).
    * ``"uncertainty"``: the energy ``-logsumexp(logits)`` when logits are given, else the
      normalised entropy ``H(p) / log C``.
    * ``"instability"`` (with `p_std`): the standard deviation of p_i over the training epochs.
      DM down-weights a mislabelled example steadily; an OOD input's p_i wanders.
    * ``"neighbours"`` (with `knn_votes`): normalised entropy of the neighbours' given labels.
      OOD inputs cluster with other OOD inputs, whose labels are arbitrary.

    Parameters
    ----------
    probs : np.ndarray, shape (N, C)
        Class probabilities of the audit model.
    embeddings : np.ndarray, shape (N, E), or EmbeddingChunks
        Penultimate-layer embeddings (a chunked source is read chunk by chunk).
    labels : np.ndarray, shape (N,)
        Given labels as integer codes (used by ``per_class``).
    trusted_mask : np.ndarray, shape (N,), bool
        In-distribution reference, e.g. `select_trusted`; needs more than `k` examples.
    k : int
        Which nearest trusted neighbour's distance to use (small k is sharper; measured best
        at 1-5).
    logits : np.ndarray, shape (N, C), optional
        Raw model outputs, for the energy score.
    knn_votes : np.ndarray, shape (N, C), optional
        Neighbour label distribution from `knn_label_agreement`.
    p_std : np.ndarray, shape (N,), optional
        Standard deviation of p_i over the training epochs (`TrainingDynamics.summary`).
    weights : mapping, optional
        Component weights; default `DEFAULT_OOD_WEIGHTS` (distance, uncertainty and
        instability 1, neighbours 0); absent components are skipped and the rest renormalised.
    reference_mask : np.ndarray, shape (N,), bool, optional
        Examples whose component values define the ranks (default: `trusted_mask`). Passing
        all unflagged examples (``~is_label_issue``) makes the reference cover hard but correct
        in-distribution examples too, which keeps `auto_ood_threshold`'s false-positive rate
        near its target when the model is unsure of many clean examples.
    per_class : bool
        Search only trusted examples of the predicted class.
    index, ivf_threshold, nprobe, batch_size, seed, progress
        faiss options and the search's progress bar, see `knn_label_agreement`.

    Returns
    -------
    np.ndarray, shape (N,)
        Scores in [0, 1], float64.
    """
    p = validate_probs(probs)
    n, c = p.shape
    source = _embedding_source(embeddings, n)
    y = validate_labels(labels, n, c)
    trusted = validate_mask(trusted_mask, "trusted_mask", n)
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if trusted.sum() <= k:
        raise DataError(
            f"ood_scores needs more than k={k} trusted examples, got {int(trusted.sum())}; "
            "lower k or loosen the trusted selection"
        )
    unknown = set(weights or {}) - set(DEFAULT_OOD_WEIGHTS)
    if unknown:
        raise ConfigError(
            f"unknown OOD weight(s) {sorted(unknown)}; use {sorted(DEFAULT_OOD_WEIGHTS)}"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")

    def kth_distance(base_rows: np.ndarray, query_rows: np.ndarray) -> np.ndarray:
        # Base row numbers of the queries that are themselves in the base (to exclude them).
        pos = np.full(n, -1, dtype=np.int64)
        pos[base_rows] = np.arange(base_rows.size)
        idx = neighbours.build_index(
            source,
            base_rows,
            kind=index,
            ivf_threshold=ivf_threshold,
            nprobe=nprobe,
            seed=seed,
        )
        every = query_rows.size == n
        sims, _ = neighbours.search(
            idx,
            source,
            k,
            query_rows=None if every else query_rows,
            self_positions=pos[query_rows],
            batch_size=batch_size,
            progress=progress,
        )
        kth = sims[:, k - 1].astype(np.float64)
        return 1.0 - np.where(np.isfinite(kth), kth, -1.0)  # missing neighbour: farthest (2)

    trusted_rows = np.flatnonzero(trusted)
    if per_class:
        pred = p.argmax(axis=1)
        # A predicted class with k or fewer trusted examples offers no reference: its examples
        # keep the largest cosine distance (2), i.e. count as far from every known class.
        distance = np.full(n, 2.0)
        for cls in range(c):
            queries = np.flatnonzero(pred == cls)
            base = np.flatnonzero(trusted & (y == cls))
            if queries.size and base.size > k:
                distance[queries] = kth_distance(base, queries)
    else:
        distance = kth_distance(trusted_rows, np.arange(n))

    if logits is not None:
        z = np.asarray(logits, dtype=np.float64)
        if z.shape != (n, c) or not np.isfinite(z).all():
            raise DataError(f"logits must be finite with shape ({n}, {c}), got {z.shape}")
        zmax = z.max(axis=1)
        uncertainty = -(zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1)))  # energy
    else:
        uncertainty = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1) / math.log(c)

    components = {"distance": distance, "uncertainty": uncertainty}
    if knn_votes is not None:
        v = validate_probs(knn_votes, name="knn_votes")
        if v.shape != (n, c):
            raise DataError(f"knn_votes must have shape ({n}, {c}), got {v.shape}")
        components["neighbours"] = -(v * np.log(np.clip(v, 1e-12, 1.0))).sum(axis=1) / math.log(c)
    if p_std is not None:
        components["instability"] = np.nan_to_num(_vector(p_std, "p_std", n), nan=0.0)
    ref = trusted if reference_mask is None else validate_mask(reference_mask, "reference_mask", n)
    if not ref.any():
        raise DataError("reference_mask selects no example")
    ranked = {name: _ecdf(v, v[ref]) for name, v in components.items()}
    return _combine(ranked, DEFAULT_OOD_WEIGHTS if weights is None else weights)


def auto_ood_threshold(
    scores: np.ndarray, *, reference_mask: np.ndarray, fpr: float = 0.01
) -> float:
    """OOD threshold at the ``1 - fpr`` quantile of the in-distribution reference's scores.

    The reference examples are in-distribution by construction, so about `fpr` of them end
    above the threshold; flag ``scores > threshold``. Use the same mask as the reference of
    `ood_scores` (its `reference_mask`, else its `trusted_mask`). OOD inputs left unflagged
    are still protected from relabelling: they are uncertain and their neighbours disagree, so
    `correction.suggest_labels` gives them a low confidence and they go to review.

    Parameters
    ----------
    scores : np.ndarray, shape (N,)
        OOD scores in [0, 1] (`ood_scores`).
    reference_mask : np.ndarray, shape (N,), bool
        The in-distribution reference used for `ood_scores`.
    fpr : float
        Tolerated false-positive rate on the reference, in (0, 1).

    Returns
    -------
    float
    """
    s = _unit_vector(scores, "scores")
    ref = validate_mask(reference_mask, "reference_mask", s.size)
    if not ref.any():
        raise DataError("auto_ood_threshold needs at least one reference example")
    if not 0.0 < fpr < 1.0:
        raise ConfigError(f"fpr must be in (0, 1), got {fpr!r}")
    return float(np.quantile(s[ref], 1.0 - fpr, method="higher"))


def conformal_ood_flags(
    scores: np.ndarray, *, reference_mask: np.ndarray, fdr: float = 0.05
) -> tuple[np.ndarray, float]:
    """Flag OOD examples by a conformal test against in-distribution references, at an FDR.

    The reference rows calibrate; every other row is tested. A tested row's p-value is the
    share of reference scores at least as high as its own, ``(1 + #{ref >= s}) / (n_ref + 1)``,
    valid when the reference rows are exchangeable with in-distribution rows. The
    Benjamini-Hochberg procedure over the m tested rows then flags those whose p-values are too
    small for the false discovery rate `fdr`; reference rows are never flagged. There is no
    quota: on in-distribution data the p-values are near uniform and, with probability about
    1 - fdr, nothing is flagged; a cluster of inputs of no known class, scored above almost
    every reference row, is flagged whatever share of the table it is, from about
    ``m / (fdr * (n_ref + 1))`` rows on (the smallest possible p-value is ``1 / (n_ref + 1)``).
    A few isolated strangers are left to the review threshold.

    Parameters
    ----------
    scores : np.ndarray, shape (N,)
        OOD scores in [0, 1] (`ood_scores`).
    reference_mask : np.ndarray, shape (N,), bool
        In-distribution reference rows (e.g. those not flagged as label issues); the others
        are tested.
    fdr : float
        Target false discovery rate, in (0, 1).

    Returns
    -------
    (np.ndarray of bool, shape (N,), float)
        The flags, and the threshold they correspond to (``scores > threshold``).
    """
    s = _unit_vector(scores, "scores")
    ref = validate_mask(reference_mask, "reference_mask", s.size)
    if not ref.any():
        raise DataError("conformal_ood_flags needs at least one reference example")
    if not 0.0 < fdr < 1.0:
        raise ConfigError(f"fdr must be in (0, 1), got {fdr!r}")
    reference = np.sort(s[ref])
    tested = np.flatnonzero(~ref)
    flagged = np.zeros(s.size, dtype=bool)
    if tested.size:
        at_least = reference.size - np.searchsorted(reference, s[tested], side="left")
        p_values = (1.0 + at_least) / (reference.size + 1.0)
        m = tested.size
        ordered = np.sort(p_values)
        passed = ordered <= fdr * np.arange(1, m + 1) / m
        if passed.any():
            flagged[tested] = p_values <= ordered[np.flatnonzero(passed).max()]
    # A reference row scoring as high as a flagged one stays unflagged: the threshold is the
    # lowest flagged score (flags are ``scores > threshold`` for every tested row).
    threshold = float(np.nextafter(s[flagged].min(), -np.inf)) if flagged.any() else 1.0
    return flagged, threshold


def flag_ood(
    scores: np.ndarray,
    *,
    threshold: float | None = None,
    reference_mask: np.ndarray | None = None,
    fpr: float = 0.01,
) -> np.ndarray:
    """Boolean mask of OOD examples: ``scores > threshold``.

    Without `threshold`, it comes from `auto_ood_threshold` (which needs `reference_mask`).

    Returns
    -------
    np.ndarray, shape (N,), bool
    """
    s = _unit_vector(scores, "scores")
    if threshold is None:
        if reference_mask is None:
            raise ConfigError("flag_ood needs a threshold or a reference_mask")
        threshold = auto_ood_threshold(s, reference_mask=reference_mask, fpr=fpr)
    return s > float(threshold)
