"""Out-of-distribution (OOD) examples: inputs of no class the table knows.

Kept apart from the label-issue score (`dm_audit.flags`) because an OOD input has no right label
to suggest: it is set aside, not corrected. `ood_scores` turns each of these components into its
rank among in-distribution reference examples and averages the ranks:

* ``"distance"``: cosine distance to the k-th nearest *trusted* example (`select_trusted`, self
  excluded) in the embedding space. A mislabelled example is near trusted examples of its true
  class; an OOD input is far from all. With ``per_class=True`` only trusted examples labelled
  with the predicted class are searched (stricter, but it depends on the prediction being right).
* ``"uncertainty"``: the energy ``-logsumexp(logits)`` when logits are given, else the
  normalised entropy ``H(p) / log C``. A mislabelled example is still confidently predicted.
* ``"instability"`` (with `p_std`): the standard deviation of p_i over the training epochs.
  DM down-weights a mislabelled example steadily; an OOD input's p_i wanders.
* ``"neighbours"`` (with `knn_votes`): normalised entropy of the neighbours' given labels.
  OOD inputs cluster with other OOD inputs, whose labels are arbitrary.

These make up the model's view. With `input_distances` (`input_space_distances`: the distance
to the k-th nearest trusted row in the input space, where the duplicates are searched too) the
input's view is ranked the same way and weighs `INPUT_VIEW_WEIGHT` of the score
(`IMAGE_INPUT_VIEW_WEIGHT` for images). The network
was trained on the OOD rows too (under labels picked at random) and may place them among a
known class; the input space was never fitted to anything, so the two views err on different
rows.

Inputs of an unknown class seldom come alone: `smooth_over_neighbours` (the group view, applied
by the audit's flag stage after `ood_scores`) gives half the weight to a row's own score and half
to the mean score of its nearest rows in the input space, and ranks the result again among the
unflagged rows, so a row among other strangers scores higher than a hard in-distribution row
among typical rows of its class.

How many to flag: `conformal_ood_flags` (a conformal test at a false discovery rate, the audit's
rule), or `auto_ood_threshold` / `flag_ood` (a quantile of the reference's scores).

Nearest neighbours use faiss (`dm_audit.neighbours`); embeddings may be an array or chunks read
back from a scores Parquet file, so at millions of rows only the index and one chunk are in
memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from dm_audit import neighbours
from dm_audit.array_checks import validate_labels, validate_mask, validate_probs
from dm_audit.errors import ConfigError, DataError
from dm_audit.neighbours import IVF_THRESHOLD, EmbeddingChunks, IndexKind, NeighbourGraph
from dm_audit.score_components import combine_components, validate_unit_vector, validate_vector

__all__ = [
    "DEFAULT_OOD_WEIGHTS",
    "GROUP_NEIGHBOURS",
    "GROUP_VIEW_WEIGHT",
    "IMAGE_INPUT_VIEW_WEIGHT",
    "INPUT_NEIGHBOUR",
    "INPUT_VIEW_WEIGHT",
    "auto_ood_threshold",
    "conformal_ood_flags",
    "flag_ood",
    "input_space_distances",
    "ood_scores",
    "select_trusted",
    "smooth_over_neighbours",
]

# Measured on digits (classes 8, 9 held out as 8 % open set, plus 30 % symmetric noise), AUROC
# against all / against mislabelled examples: distance (k=1) 0.91 / 0.81, entropy 0.93 / 0.84,
# neighbours' label entropy 0.64 / 0.60, std of p_i over epochs 0.72 / 0.85; distance + entropy
# + instability 0.92 / 0.90. Mislabelled examples sit near their true class and DM ignores them
# steadily; an OOD input's p_i wanders, as nothing in the data supports or contradicts it.
# The audit leaves the instability out when p_i was recorded in augmented training passes
# (images), whose spread is the augmentation's (`dm_audit.stage_flags`).
DEFAULT_OOD_WEIGHTS: dict[str, float] = {
    "distance": 1.0,
    "uncertainty": 1.0,
    "neighbours": 0.0,
    "instability": 1.0,
}

# Share of the OOD score that comes from the input space (the rest is the model's view above).
# Half: neither view is trusted over the other. Chosen on the development datasets with a held-out
# class as 8 % open-set rows, alone and with 20 % symmetric noise (benchmarks/open_set.py; 5
# datasets x 2 settings, mean AUROC): model's view alone 0.793, input weight 1/4 0.844, 1/2
# 0.870. The model's view alone is better only on digits (0.990 against 0.968 without noise).
INPUT_VIEW_WEIGHT = 0.5
# The input view's share for images (pixels averaged down): a third. A pixel distance measures
# novelty only where objects sit still; where they move within the frame it mostly measures
# position. Chosen on two development image folders with a held-out digit (benchmarks/
# open_set.py's 8x8 centred digits, alone and with 20 % symmetric noise, and
# benchmarks/image_folder.py's 28x28 digits at random offsets, 150 per class). OOD AUROC
# centred / centred + noise / offset, from each folder's audit with its components recombined
# (the instability left out, as for all images): weight 0: 0.80 / 0.80 / 0.95; 1/4:
# 0.88 / 0.87 / 0.93; 1/3: 0.90 / 0.89 / 0.91; 1/2: 0.93 / 0.92 / 0.84. A third has the best
# worst case and mean; `image_folder.py --open-set --per-class 150` measures 0.911 with it.
# The 200 centred digits are few: their AUROC moves by up to 0.05 between runs on one and two
# threads (open_set.py runs one: 0.882 / 0.842 at a third).
IMAGE_INPUT_VIEW_WEIGHT = 1.0 / 3.0
# The input-space distance is to the 5th nearest trusted row: raw inputs carry features that are
# noise to the task, and one chance close row should not make an input look familiar (same
# development runs: k = 1 0.834, 5 0.870, 10 0.857).
INPUT_NEIGHBOUR = 5
# The group view (`smooth_over_neighbours`): half a row's own score, half the mean of its 5
# nearest rows' in the input space. Half: the row's own evidence and its neighbourhood's are
# trusted alike; 5 rows: as many as the input view's distance reads (INPUT_NEIGHBOUR). Chosen on
# the development open-set runs (benchmarks/open_set.py, 9 runs on 5 datasets, each audit's
# score recombined; mean / lowest AUROC): without 0.894 / 0.758; 5 rows at half 0.938 / 0.855;
# 10 rows 0.933 / 0.833; 20 rows 0.924 / 0.799; 5 rows at weight 1/4 0.919, 3/4 0.943, the
# neighbours alone 0.925; clean tables then flagged at most 0.06 % of rows OOD (none without
# it). A lone stranger keeps half its excess and still ranks above typical rows. Images at
# random offsets gain nothing, as their pixel neighbours share a position more than a class
# (benchmarks/image_folder.py --open-set --per-class 150: 0.901 with it, 0.910 without); the
# centred dev images gain (0.967 -> 0.992, with 20 % noise 0.902 -> 0.984).
GROUP_NEIGHBOURS = INPUT_NEIGHBOUR
GROUP_VIEW_WEIGHT = 0.5


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
    pg = validate_unit_vector(p_given, "p_given")
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
    input_distances: np.ndarray | None = None,
    input_weight: float = INPUT_VIEW_WEIGHT,
    neighbour_graph: NeighbourGraph | None = None,
    per_class: bool = False,
    index: IndexKind = "auto",
    ivf_threshold: int = IVF_THRESHOLD,
    nprobe: int = 16,
    batch_size: int = 16_384,
    seed: int = 0,
    progress: str | None = None,
) -> np.ndarray:
    """Score how likely each example is out-of-distribution, in [0, 1] (higher = more likely).

    Each component (see the module docstring) becomes its rank among the reference examples
    (`reference_mask`, by default `trusted_mask`), so 0.99 means "more atypical than 99 % of the
    examples whose label we trust"; the ranks are averaged with `weights`. With
    `input_distances`, their rank weighs `input_weight` and that average the rest.

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
    input_distances : np.ndarray, shape (N,), optional
        Each row's distance to its k-th nearest trusted row in the input space
        (`input_space_distances`); without them the score is the model's view alone.
    input_weight : float
        Share of the score the input view weighs, in [0, 1]: `INPUT_VIEW_WEIGHT` for features,
        `IMAGE_INPUT_VIEW_WEIGHT` for images.
    neighbour_graph : NeighbourGraph, optional
        The rows' nearest neighbours among themselves in the same embedding space (the kNN
        label agreement's search, `KnnLabelAgreement.graph`): the nearest trusted row is read
        from it, and only rows with fewer than k trusted rows listed are searched again.
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
    source = neighbours.checked_embeddings(embeddings, n)
    y = validate_labels(labels, n, c)
    trusted = validate_mask(trusted_mask, "trusted_mask", n)
    _check_ood_options(trusted, k, weights, batch_size)
    search = _Search(k, index, ivf_threshold, nprobe, batch_size, seed, progress)
    components = {
        "distance": _trusted_distance(source, p, y, trusted, per_class, search, neighbour_graph),
        "uncertainty": _uncertainty(p, logits),
        **_dynamics_and_neighbours(p, knn_votes, p_std),
    }
    ref = trusted if reference_mask is None else validate_mask(reference_mask, "reference_mask", n)
    if not ref.any():
        raise DataError("reference_mask selects no example")
    ranked = {name: _ecdf(v, v[ref]) for name, v in components.items()}
    model_view = combine_components(ranked, DEFAULT_OOD_WEIGHTS if weights is None else weights)
    if input_distances is None:
        return model_view
    if not 0.0 <= input_weight <= 1.0:
        raise ConfigError(f"input_weight must be in [0, 1], got {input_weight!r}")
    d = validate_vector(input_distances, "input_distances", n)
    input_view = _ecdf(d, d[ref])
    return (1.0 - input_weight) * model_view + input_weight * input_view


def input_space_distances(
    space: np.ndarray | EmbeddingChunks,
    trusted_mask: np.ndarray,
    *,
    k: int = INPUT_NEIGHBOUR,
    graph: NeighbourGraph | None = None,
    nprobe: int = 4,
    seed: int = 0,
    progress: str | None = None,
) -> np.ndarray:
    """Euclidean distance of every row to its k-th nearest trusted row (itself excluded).

    Parameters
    ----------
    space : np.ndarray, shape (N, D), or EmbeddingChunks
        The rows in a space where distances mean something without a model: standardised
        features, or images averaged down (`duplicates.input_space`).
    trusted_mask : np.ndarray, shape (N,), bool
        Rows whose labels the audit trusts (`select_trusted`); more than k of them.
    k : int
        Which nearest trusted row.
    graph : NeighbourGraph, optional
        The rows' nearest rows in `space` (``metric="l2"``, e.g. the duplicate search's): rows
        with k trusted rows listed are answered from it, only the others are searched.
    nprobe, seed, progress
        Options of the approximate index used above `neighbours.IVF_THRESHOLD` trusted rows
        (the same few probes as the duplicate search: ranks, not exact distances, matter) and
        the search's progress bar.

    Returns
    -------
    np.ndarray, shape (N,), float64
        A row left without k trusted candidates by the approximate index gets the largest
        distance found, counting as far from everything.
    """
    if not hasattr(space, "chunks"):
        space = np.asarray(space)
        if space.ndim != 2:
            raise DataError(f"space must be a 2-d array, got shape {space.shape}")
    source = neighbours.as_chunks(space)
    n = source.n_rows
    trusted = validate_mask(trusted_mask, "trusted_mask", n)
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if trusted.sum() <= k:
        raise DataError(f"input_space_distances needs more than k={k} trusted rows")
    if graph is not None and (graph.positions.shape[0] != n or graph.metric != "l2"):
        raise DataError(f"graph must be an l2 graph of the {n} rows")
    squared = np.full(n, np.nan) if graph is None else -graph.kth_among(trusted, k)
    unlisted = np.flatnonzero(np.isnan(squared))
    base = np.flatnonzero(trusted)
    few = graph is not None and neighbours.exact_is_cheap(unlisted.size, base.size, source.dim)
    if unlisted.size and not few and graph is not None and graph.index is not None:
        squared[unlisted] = _kth_trusted_further(graph, source, trusted, unlisted, k, progress)
        unlisted = np.flatnonzero(np.isnan(squared))
        few = neighbours.exact_is_cheap(unlisted.size, base.size, source.dim)
    if unlisted.size and few:
        # The few rows left: searched exactly, without an index of the trusted rows.
        neg_sq = neighbours.search_few(source, base, unlisted, k, metric="l2")
        squared[unlisted] = -neg_sq[:, k - 1].astype(np.float64)
    elif unlisted.size:
        pos = np.full(n, -1, dtype=np.int64)
        pos[base] = np.arange(base.size)
        idx = neighbours.build_index(source, base, metric="l2", nprobe=nprobe, seed=seed)
        neg_sq, _ = neighbours.search(
            idx,
            source,
            k,
            query_rows=None if unlisted.size == n else unlisted,
            self_positions=pos[unlisted],
            progress=progress,
            metric="l2",
        )
        squared[unlisted] = -neg_sq[:, k - 1].astype(np.float64)
    found = np.isfinite(squared)
    squared = np.where(found, squared, np.max(squared[found]) if found.any() else 0.0)
    return np.sqrt(np.clip(squared, 0.0, None))


# How many more neighbours than the graph lists are asked of its index for the rows the graph
# cannot answer: 8 times the graph's width (80 rows for the flag stage's graph of 10). The rows
# still short of trusted neighbours then are few, or a cluster of untrusted rows (strays of one
# unknown class) worth an exact search.
FURTHER_NEIGHBOURS = 8


def _kth_trusted_further(
    graph: NeighbourGraph,
    source: EmbeddingChunks,
    trusted: np.ndarray,
    rows: np.ndarray,
    k: int,
    progress: str | None,
) -> np.ndarray:
    """Squared distance of `rows` to their k-th nearest trusted row, read from further
    neighbours asked of the graph's own index (no index of the trusted rows is built); NaN
    where those still hold fewer than k trusted rows (inside a cluster of untrusted rows)."""
    wide = min(source.n_rows - 1, FURTHER_NEIGHBOURS * graph.positions.shape[1])
    neg_sq, pos = neighbours.search(
        graph.index,
        source,
        wide,
        query_rows=rows,
        self_positions=rows,
        progress=progress,
        metric="l2",
    )
    return -NeighbourGraph(pos, neg_sq, "l2").kth_among(trusted, k)


@dataclass(frozen=True)
class _Search:
    """The nearest-neighbour options of `ood_scores`."""

    k: int
    kind: IndexKind
    ivf_threshold: int
    nprobe: int
    batch_size: int
    seed: int
    progress: str | None


def _check_ood_options(
    trusted: np.ndarray, k: int, weights: Mapping[str, float] | None, batch_size: int
) -> None:
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


def _trusted_distance(
    source: EmbeddingChunks,
    p: np.ndarray,
    y: np.ndarray,
    trusted: np.ndarray,
    per_class: bool,
    search: _Search,
    graph: NeighbourGraph | None = None,
) -> np.ndarray:
    """The "distance" component: to the k-th nearest trusted row (of the predicted class)."""
    n, c = p.shape
    if not per_class:
        if graph is None:
            return _kth_distance(source, np.flatnonzero(trusted), np.arange(n), search)
        if graph.positions.shape[0] != n or graph.metric != "cosine":
            raise DataError(f"neighbour_graph must be a cosine graph of the {n} rows")
        distance = 1.0 - graph.kth_among(trusted, search.k)
        unlisted = np.flatnonzero(np.isnan(distance))
        if unlisted.size:
            distance[unlisted] = _kth_distance(
                source, np.flatnonzero(trusted), unlisted, search, few=True
            )
        return distance
    pred = p.argmax(axis=1)
    # A predicted class with k or fewer trusted examples offers no reference: its examples keep
    # the largest cosine distance (2), i.e. count as far from every known class.
    distance = np.full(n, 2.0)
    for cls in range(c):
        queries = np.flatnonzero(pred == cls)
        base = np.flatnonzero(trusted & (y == cls))
        if queries.size and base.size > search.k:
            distance[queries] = _kth_distance(source, base, queries, search)
    return distance


def _kth_distance(
    source: EmbeddingChunks,
    base_rows: np.ndarray,
    query_rows: np.ndarray,
    search: _Search,
    few: bool = False,
) -> np.ndarray:
    """Cosine distance of each query row to its k-th nearest base row, itself excluded.

    A missing neighbour (IVF with too few candidates) counts as the farthest, distance 2. With
    `few` (the rows a reused neighbour graph left), queries within the exact-search budget are
    searched without an index.
    """
    if (
        few
        and search.kind == "auto"
        and neighbours.exact_is_cheap(query_rows.size, base_rows.size, source.dim)
    ):
        sims = neighbours.search_few(source, base_rows, query_rows, search.k)
    else:
        n = source.n_rows
        # Base row numbers of the queries that are themselves in the base (to exclude them).
        pos = np.full(n, -1, dtype=np.int64)
        pos[base_rows] = np.arange(base_rows.size)
        idx = neighbours.build_index(
            source,
            base_rows,
            kind=search.kind,
            ivf_threshold=search.ivf_threshold,
            nprobe=search.nprobe,
            seed=search.seed,
        )
        every = query_rows.size == n
        sims, _ = neighbours.search(
            idx,
            source,
            search.k,
            query_rows=None if every else query_rows,
            self_positions=pos[query_rows],
            batch_size=search.batch_size,
            progress=search.progress,
        )
    kth = sims[:, search.k - 1].astype(np.float64)
    return 1.0 - np.where(np.isfinite(kth), kth, -1.0)


def _uncertainty(p: np.ndarray, logits: np.ndarray | None) -> np.ndarray:
    """Energy ``-logsumexp(logits)`` with logits, else the normalised entropy of `p`."""
    n, c = p.shape
    if logits is not None:
        z = np.asarray(logits, dtype=np.float64)
        if z.shape != (n, c) or not np.isfinite(z).all():
            raise DataError(f"logits must be finite with shape ({n}, {c}), got {z.shape}")
        zmax = z.max(axis=1)
        return -(zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1)))
    return -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1) / math.log(c)


def _dynamics_and_neighbours(
    p: np.ndarray, knn_votes: np.ndarray | None, p_std: np.ndarray | None
) -> dict[str, np.ndarray]:
    """The optional components: "neighbours" with `knn_votes`, "instability" with `p_std`."""
    n, c = p.shape
    components: dict[str, np.ndarray] = {}
    if knn_votes is not None:
        v = validate_probs(knn_votes, name="knn_votes")
        if v.shape != (n, c):
            raise DataError(f"knn_votes must have shape ({n}, {c}), got {v.shape}")
        components["neighbours"] = -(v * np.log(np.clip(v, 1e-12, 1.0))).sum(axis=1) / math.log(c)
    if p_std is not None:
        components["instability"] = np.nan_to_num(validate_vector(p_std, "p_std", n), nan=0.0)
    return components


def smooth_over_neighbours(
    scores: np.ndarray,
    neighbour_rows: np.ndarray,
    *,
    reference_mask: np.ndarray,
    weight: float = GROUP_VIEW_WEIGHT,
) -> np.ndarray:
    """OOD scores with the group view: ``(1 - weight) * own + weight * mean of the neighbours'``,
    ranked again among the reference rows (the share of them scoring strictly lower).

    Inputs of a class the table does not know come as a group (a held-out class, a batch from
    another source), and their nearest rows are mostly other such inputs, which score high too;
    a hard in-distribution row that scores high by chance sits among typical rows of its class.
    The result is ranked again: the share of reference rows whose combined score is strictly
    lower, so 0.99 means "more atypical than 99 % of the unflagged rows", and a row above every
    reference row gets 1 while the highest reference row gets ``1 - 1/n_ref``. Counting strictly
    lower keeps every comparison with a reference row as it was, so `conformal_ood_flags` and
    `auto_ood_threshold` flag the same rows on the ranks as on the combined scores.

    Parameters
    ----------
    scores : np.ndarray, shape (N,)
        OOD scores in [0, 1] (`ood_scores`).
    neighbour_rows : np.ndarray of int, shape (N, k)
        Each row's nearest other rows (e.g. `NeighbourGraph.positions` of the input space), -1
        where none was found or the neighbour is to be left out; a row with none keeps its own
        score.
    reference_mask : np.ndarray, shape (N,), bool
        The in-distribution reference the result is ranked among (the unflagged rows).
    weight : float
        The neighbours' share, in [0, 1].

    Returns
    -------
    np.ndarray, shape (N,), float64, in [0, 1]
    """
    s = validate_unit_vector(scores, "scores")
    ref = validate_mask(reference_mask, "reference_mask", s.size)
    if not ref.any():
        raise DataError("smooth_over_neighbours needs at least one reference row")
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"weight must be in [0, 1], got {weight!r}")
    rows = np.asarray(neighbour_rows)
    if rows.ndim != 2 or rows.shape[0] != s.size or not np.issubdtype(rows.dtype, np.integer):
        raise DataError(f"neighbour_rows must be integer row numbers of shape ({s.size}, k)")
    if rows.size and (rows.max() >= s.size or rows.min() < -1):
        raise DataError(f"neighbour_rows must hold row numbers below {s.size}, or -1")
    # Column by column: at a million rows a whole (N, k) float64 temporary is 40 MB per copy.
    total = np.zeros(s.size)
    count = np.zeros(s.size, dtype=np.int64)
    for column in rows.T:
        found = column >= 0
        total[found] += s[column[found]]
        count += found
    mean = np.where(count > 0, total / np.maximum(count, 1), s)
    combined = (1.0 - weight) * s + weight * mean
    reference = np.sort(combined[ref])
    return np.searchsorted(reference, combined, side="left") / reference.size


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
    s = validate_unit_vector(scores, "scores")
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
    s = validate_unit_vector(scores, "scores")
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
    s = validate_unit_vector(scores, "scores")
    if threshold is None:
        if reference_mask is None:
            raise ConfigError("flag_ood needs a threshold or a reference_mask")
        threshold = auto_ood_threshold(s, reference_mask=reference_mask, fpr=fpr)
    return s > float(threshold)
