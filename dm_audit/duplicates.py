"""Exact and near-duplicate rows, conflicting duplicates and train/test leakage.

Duplicates are found in the *input* space, not in a model's embedding space: two rows are the
same example when their inputs are (nearly) the same, whatever a model makes of them, and the
cross-fitted models' embeddings of different folds are not comparable anyway.

* **Space**: feature tables standardised per feature (each by its own spread, as the trainer
  sees them); images reduced by area averaging to at most `IMAGE_SIDE` pixels a side, in [0, 1].
* **Exact duplicates**: rows whose input bytes are identical (a hash per row).
* **Near duplicates**: each row's nearest other row (faiss, Euclidean). A pair is a near
  duplicate when its distance is below `RELATIVE_RADIUS` times the median nearest-neighbour
  distance of the dataset, the rule cleanlab's Datalab uses, so the two tools call the same
  pairs duplicates; the score is ``exp(-d / median)`` (1 for an exact copy).
* **Sets**: connected components of the near-duplicate pairs (a row and its copies).
* **Conflicting duplicates**: sets whose members carry different given labels. Identical inputs
  cannot all be labelled right, so this is direct evidence of a label issue; which member is
  wrong is decided by the set's consensus, the class the model's out-of-sample probabilities
  summed over the members favour (`conflict_evidence`).
* **Leakage**: with a split column, rows outside the training split that share a set with a
  training row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dm_audit import neighbours
from dm_audit.errors import DataError
from dm_audit.neighbours import EmbeddingChunks, NeighbourGraph

__all__ = [
    "IMAGE_SIDE",
    "NEIGHBOURS",
    "RELATIVE_RADIUS",
    "Duplicates",
    "StandardisedRows",
    "conflict_evidence",
    "duplicate_space",
    "find_duplicates",
    "input_graph",
    "input_space",
    "leaked_rows",
]

# cleanlab Datalab's near-duplicate radius (0.13 of the median nearest-neighbour distance).
# Kept so that a user comparing the two tools sees the same pairs called duplicates; measured
# on the development tables (tests/test_duplicates.py): clean continuous tables have no pair
# that close, copies with noise of 1 % of each feature's spread sit below 0.05.
RELATIVE_RADIUS = 0.13
# Neighbours looked at per row: enough to join a row to a few copies of itself in one pass
# (a set of up to NEIGHBOURS + 1 members is found whole; larger ones join through chains).
NEIGHBOURS = 5
# Images are compared after area-averaging to at most 16 x 16 pixels: small shifts of noise
# or re-encoding vanish, while different images of one class stay apart; 16 x 16 x 3 = 768
# numbers per row keeps the search cheap at a million images.
IMAGE_SIDE = 16
# IVF lists visited per query. A near duplicate lies in the query's own list or one beside it,
# so a few probes find it; the search for label evidence uses 16 for general neighbours.
DUPLICATE_NPROBE = 4


@dataclass(frozen=True)
class Duplicates:
    """Duplicate structure of a dataset.

    Attributes
    ----------
    score : np.ndarray, shape (N,)
        ``exp(-d / median)`` of the distance d to the nearest other row, in [0, 1]; 1 for an
        exact copy.
    is_near_duplicate : np.ndarray of bool, shape (N,)
        The row has an exact or near copy.
    set_id : np.ndarray of int64, shape (N,)
        Id shared by the members of one duplicate set (its smallest row number); -1 alone.
    is_exact : np.ndarray of bool, shape (N,)
        The row has a byte-identical copy.
    nearest : np.ndarray of int64, shape (N,)
        Row number of the nearest other row (-1 when the dataset has one row).
    median_distance : float
        Median distance of a row to its nearest other row.
    radius : float
        Distance at or below which two rows are near duplicates.
    """

    score: np.ndarray
    is_near_duplicate: np.ndarray
    set_id: np.ndarray
    is_exact: np.ndarray
    nearest: np.ndarray
    median_distance: float
    radius: float

    @property
    def n_sets(self) -> int:
        """Number of duplicate sets."""
        return int(np.unique(self.set_id[self.set_id >= 0]).size)

    def conflicting_sets(self, labels: np.ndarray) -> np.ndarray:
        """Per row: whether its set holds more than one given label."""
        labels = np.asarray(labels)
        out = np.zeros(self.set_id.shape[0], dtype=bool)
        members = np.flatnonzero(self.set_id >= 0)
        if members.size == 0:
            return out
        sets, inverse = np.unique(self.set_id[members], return_inverse=True)
        lo = np.full(sets.size, np.iinfo(np.int64).max)
        hi = np.full(sets.size, np.iinfo(np.int64).min)
        np.minimum.at(lo, inverse, labels[members].astype(np.int64))
        np.maximum.at(hi, inverse, labels[members].astype(np.int64))
        out[members] = (lo != hi)[inverse]
        return out

    def summary(self, labels: np.ndarray) -> dict[str, float | int]:
        """Counts for summary.json."""
        conflicting = self.conflicting_sets(labels)
        return {
            "near_duplicate_rows": int(self.is_near_duplicate.sum()),
            "exact_duplicate_rows": int(self.is_exact.sum()),
            "sets": self.n_sets,
            "conflicting_sets": int(np.unique(self.set_id[conflicting]).size),
            "rows_in_conflicting_sets": int(conflicting.sum()),
            "median_nearest_distance": float(self.median_distance),
            "radius": float(self.radius),
            "relative_radius": RELATIVE_RADIUS,
        }


@dataclass(frozen=True)
class StandardisedRows:
    """A feature table standardised per column, computed a chunk of rows at a time.

    Reads as `neighbours.EmbeddingChunks`, so the flag stage's searches take it where they take
    an array and the standardised table (N x D float32: 512 MB at 1M x 128) is never held
    whole. Each chunk is computed as `duplicate_space` computes it, value for value.
    """

    inputs: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    chunk_rows: int = neighbours.DEFAULT_CHUNK_ROWS

    @property
    def n_rows(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def dim(self) -> int:
        return int(self.inputs.shape[1])

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.n_rows, self.chunk_rows):
            # In float64: a float64 copy of a million-row table would cost several times the
            # float32 result's memory. In place, so one float64 chunk is alive, not three (the
            # flag stage's peak at 1M x 128 falls in this search).
            chunk = self.inputs[start : start + self.chunk_rows].astype(np.float64)
            chunk -= self.mean
            chunk /= self.scale
            yield start, chunk.astype(np.float32)


def input_space(inputs: np.ndarray) -> np.ndarray | StandardisedRows:
    """The rows as compared for duplicates, (N, D): images averaged down (an array), or features
    standardised per column (`StandardisedRows`, computed as they are read).

    Parameters
    ----------
    inputs : np.ndarray
        Features (N, D) or uint8 images (N, H, W, C).
    """
    x = np.asarray(inputs)
    if x.ndim == 4:
        return _small_images(x)
    x = x.reshape(len(x), -1)
    if len(x) == 0:
        return StandardisedRows(x, np.zeros(x.shape[1]), np.ones(x.shape[1]))
    mean, std = _column_moments(x)
    # A constant column carries no distance; dividing by 1 keeps it at 0.
    return StandardisedRows(x, mean, np.where(std > 0, std, 1.0))


def duplicate_space(inputs: np.ndarray) -> np.ndarray:
    """The rows as compared for duplicates (`input_space`) as one float32 array, (N, D).

    Parameters
    ----------
    inputs : np.ndarray
        Features (N, D) or uint8 images (N, H, W, C).
    """
    space = input_space(inputs)
    if isinstance(space, np.ndarray):
        return space
    out = np.empty((space.n_rows, space.dim), dtype=np.float32)
    for start, block in space.chunks():
        out[start : start + len(block)] = block
    return out


def _column_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) standard deviation, computed chunk by chunk with the
    pairwise update of Chan et al., so no full-size float64 copy is made."""
    count = 0
    mean = np.zeros(x.shape[1])
    m2 = np.zeros(x.shape[1])
    for start in range(0, len(x), neighbours.DEFAULT_CHUNK_ROWS):
        chunk = x[start : start + neighbours.DEFAULT_CHUNK_ROWS].astype(np.float64)
        n_b = len(chunk)
        mean_b = chunk.mean(axis=0)
        m2_b = ((chunk - mean_b) ** 2).sum(axis=0)
        delta = mean_b - mean
        total = count + n_b
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta**2 * (count * n_b / total)
        count = total
    return mean, np.sqrt(m2 / count)


def _small_images(images: np.ndarray) -> np.ndarray:
    n, h, w, c = images.shape
    fh, fw = max(1, math.ceil(h / IMAGE_SIDE)), max(1, math.ceil(w / IMAGE_SIDE))
    hh, ww = h // fh * fh, w // fw * fw  # crop the remainder rows/columns of the blocks
    blocks = images[:, :hh, :ww, :].reshape(n, hh // fh, fh, ww // fw, fw, c)
    return (blocks.mean(axis=(2, 4), dtype=np.float32) / 255.0).reshape(n, -1)


# Rows whose bytes are compared at a time when the exact groups are checked.
_CHECK_ROWS = 65_536


def _exact_groups(inputs: np.ndarray) -> np.ndarray:
    """Per row the first row with byte-identical input (itself when unique).

    Rows are hashed column by column (64-bit xor-multiply-shift over each value's bits), grouped by
    hash, and each row's bytes are checked against its group's first row: memory stays at a few
    arrays of N, where sorting the rows as byte strings would copy the whole table. A row whose
    hash collides with a different row's counts as unique.
    """
    n = len(inputs)
    raw = np.ascontiguousarray(inputs).reshape(n, -1).view(np.uint8)
    # Each row's bytes as words of the widest size that divides them: fewer passes.
    width = next(w for w in (8, 4, 2, 1) if raw.shape[1] % w == 0)
    bits = raw.view(np.dtype(f"u{width}"))
    h = np.full(n, 0xCBF29CE484222325, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in range(bits.shape[1]):
            h ^= bits[:, column].astype(np.uint64)
            h *= np.uint64(0x9E3779B97F4A7C15)
            # A multiply only carries bits upwards: fold the high half down, or values that
            # differ only in high bits (floats' exponents) would collide.
            h ^= h >> np.uint64(31)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    root = first[inverse.ravel()].astype(np.int64)
    for lo in range(0, n, _CHECK_ROWS):
        part = slice(lo, min(n, lo + _CHECK_ROWS))
        same = (bits[part] == bits[root[part]]).all(axis=1)
        root[part] = np.where(same, root[part], np.arange(part.start, part.stop))
    return root


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest row number of each row's connected component over the edges (a, b)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1, n, dtype=np.int64)
    np.minimum.at(smallest, component, np.arange(n, dtype=np.int64))
    return smallest[component]


def find_duplicates(
    inputs: np.ndarray,
    *,
    relative_radius: float = RELATIVE_RADIUS,
    k: int = NEIGHBOURS,
    seed: int = 0,
    progress: str | None = None,
    graph: NeighbourGraph | None = None,
) -> Duplicates:
    """Find exact and near-duplicate rows.

    Parameters
    ----------
    inputs : np.ndarray
        Features (N, D) or uint8 images (N, H, W, C), as the dataset holds them.
    relative_radius : float
        Near-duplicate radius as a share of the median nearest-neighbour distance.
    k : int
        Neighbours searched per row.
    seed : int
        Seeds the approximate index used above `neighbours.IVF_THRESHOLD` rows.
    progress : str, optional
        Label of the search's progress bar.
    graph : NeighbourGraph, optional
        `input_graph(duplicate_space(inputs), ...)` of at least `k` neighbours when the caller
        has it already (the audit's flag stage also reads it for the OOD score's input view);
        its first `k` neighbours are read.

    Returns
    -------
    Duplicates
    """
    n = len(inputs)
    exact_root = _exact_groups(inputs)
    is_exact = np.zeros(n, dtype=bool)
    copies = exact_root != np.arange(n)
    is_exact[copies] = True
    is_exact[exact_root[copies]] = True
    if n < 2:
        return Duplicates(
            np.zeros(n), np.zeros(n, bool), np.full(n, -1), is_exact, np.full(n, -1), 0.0, 0.0
        )
    kk = min(k, n - 1)
    if graph is None:
        graph = input_graph(input_space(inputs), kk, seed=seed, progress=progress)
    elif graph.positions.shape[0] != n or graph.positions.shape[1] < kk:
        raise DataError(f"graph must list {kk} neighbours of each of the {n} inputs")
    neg_sq, nearest = graph.similarities[:, :kk], graph.positions[:, :kk]
    found = nearest >= 0
    dist = np.sqrt(np.clip(-np.where(found, neg_sq, -np.inf), 0.0, None))
    # Byte-identical rows are at distance 0 whatever rounding faiss' expansion of |x - y|^2 did.
    dist[found & (exact_root[np.where(found, nearest, 0)] == exact_root[:, None])] = 0.0
    nn = dist[:, 0]
    finite = np.isfinite(nn)
    median = float(np.median(nn[finite])) if finite.any() else 0.0
    radius = relative_radius * median
    close = found & (dist <= radius)
    rows = np.repeat(np.arange(n), kk).reshape(n, kk)
    a = np.concatenate([rows[close], np.flatnonzero(copies)])
    b = np.concatenate([nearest[close], exact_root[copies]])
    root = _components(n, a, b)
    is_dup = np.zeros(n, dtype=bool)
    is_dup[a], is_dup[b] = True, True
    score = np.where(finite, np.exp(-nn / median) if median > 0 else (nn == 0), 0.0)
    score = np.where(is_exact, 1.0, score)
    return Duplicates(
        score=np.clip(score, 0.0, 1.0),
        is_near_duplicate=is_dup,
        set_id=np.where(is_dup, root, -1),
        is_exact=is_exact,
        nearest=np.where(found[:, 0], nearest[:, 0], -1),
        median_distance=median,
        radius=float(radius),
    )


def input_graph(
    space: np.ndarray | EmbeddingChunks,
    k: int,
    *,
    seed: int = 0,
    progress: str | None = None,
    keep_index: bool = False,
) -> NeighbourGraph:
    """Each row's k nearest other rows in the input space (Euclidean).

    The search `find_duplicates` reads; the OOD score's input view reads the same graph for the
    distance to trusted rows, and its group view for each row's nearest rows.

    Parameters
    ----------
    space : np.ndarray, shape (N, D), or EmbeddingChunks
        `input_space` (or `duplicate_space`) of the inputs.
    k : int
        Neighbours per row (at most N - 1).
    seed, progress
        Seed of the approximate index used above `neighbours.IVF_THRESHOLD` rows (with
        `DUPLICATE_NPROBE` lists visited); label of the search's progress bar.
    keep_index : bool
        Keep the index in the graph (`NeighbourGraph.index`), to ask it for further
        neighbours of some rows later instead of building another.

    Returns
    -------
    NeighbourGraph
    """
    source = neighbours.as_chunks(space)
    n = source.n_rows
    index = neighbours.build_index(source, metric="l2", nprobe=DUPLICATE_NPROBE, seed=seed)
    neg_sq, nearest = neighbours.search(
        index, source, min(k, n - 1), self_positions=np.arange(n), progress=progress, metric="l2"
    )
    return NeighbourGraph(nearest, neg_sq, "l2", index if keep_index else None)


def conflict_evidence(dups: Duplicates, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Label-issue evidence from conflicting duplicates, NaN where there is none.

    In a set whose members carry different labels, the consensus is the class the members'
    out-of-sample probabilities favour together; a member labelled otherwise gets 1, a member
    labelled with the consensus 0. Rows in no set, or in a set that agrees, get NaN.
    """
    labels = np.asarray(labels, dtype=np.int64)
    out = np.full(labels.shape[0], np.nan)
    conflicting = dups.conflicting_sets(labels)
    rows = np.flatnonzero(conflicting)
    if rows.size == 0:
        return out
    sets, inverse = np.unique(dups.set_id[rows], return_inverse=True)
    summed = np.zeros((sets.size, probs.shape[1]))
    np.add.at(summed, inverse, np.asarray(probs, dtype=np.float64)[rows])
    consensus = summed.argmax(axis=1)[inverse]
    out[rows] = (labels[rows] != consensus).astype(np.float64)
    return out


def leaked_rows(dups: Duplicates, split: np.ndarray, train: str = "train") -> np.ndarray:
    """Rows outside the `train` split that share a duplicate set with a training row."""
    split = np.asarray(split).astype(str)
    out = np.zeros(split.shape[0], dtype=bool)
    in_train = dups.set_id[(split == train) & (dups.set_id >= 0)]
    if in_train.size:
        out = (split != train) & np.isin(dups.set_id, np.unique(in_train))
    return out
