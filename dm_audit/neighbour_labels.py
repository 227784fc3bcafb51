"""Neighbourhood label statistics: how many nearest neighbours share each example's label.

A mislabelled example sits among examples of its true class in the embedding space of a model
that did not memorise the noise, so few of its neighbours share its (wrong) given label; a clean
one mostly agrees with its neighbours, up to the noise rate. `knn_label_agreement` measures that
agreement and the distribution of the neighbours' labels (the votes), which feed the label-issue
score (`dm_audit.flags`), the OOD score (`dm_audit.ood`) and the suggested labels
(`dm_audit.correction`).

Nearest neighbours use faiss on L2-normalised embeddings (inner product = cosine similarity):
an exact `IndexFlatIP` up to `ivf_threshold` rows and above it an IVF index with about 4 sqrt(N)
lists and float16 vectors (`dm_audit.neighbours`). Embeddings may be an array or chunks read
back from a scores Parquet file, so at millions of rows only the index and one chunk are in
memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dm_audit import neighbours
from dm_audit.array_checks import validate_labels
from dm_audit.errors import ConfigError, DataError
from dm_audit.neighbours import IVF_THRESHOLD, IndexKind, NeighbourGraph

__all__ = ["KnnLabelAgreement", "knn_label_agreement"]

# Rows per bincount of `_label_votes`: one flat count array of (rows x classes) cells stays small
# at millions of rows.
_VOTE_BLOCK_ROWS = 65_536


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

    @property
    def graph(self) -> NeighbourGraph:
        """The neighbours as a `NeighbourGraph` (the OOD score reads the nearest trusted row
        from it instead of searching again)."""
        return NeighbourGraph(self.indices, self.similarities, "cosine")


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
    source = neighbours.checked_embeddings(embeddings)
    n = source.n_rows
    if n < 2:
        raise DataError("knn_label_agreement needs at least 2 examples")
    c = int(n_classes) if n_classes is not None else int(np.max(np.asarray(labels))) + 1
    y = validate_labels(labels, n, c)
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    idx = neighbours.build_index(
        source, None, kind=index, ivf_threshold=ivf_threshold, nprobe=nprobe, seed=seed
    )
    sims, ids = neighbours.search(
        idx,
        source,
        min(k, n - 1),
        self_positions=np.arange(n),
        batch_size=batch_size,
        progress=progress,
    )
    votes = _label_votes(ids, y, c)
    agreement = votes[np.arange(n), y].astype(np.float64)
    return KnnLabelAgreement(agreement=agreement, votes=votes, indices=ids, similarities=sims)


def _label_votes(ids: np.ndarray, y: np.ndarray, c: int) -> np.ndarray:
    """Distribution of the neighbours' labels, (N, C) float32; uniform where none was found.

    One bincount over flat (row, label) cells per block of rows: much faster than np.add.at,
    and blocks keep its count array small at millions of rows.
    """
    n = ids.shape[0]
    valid = ids >= 0
    found = valid.sum(axis=1, keepdims=True)
    votes: np.ndarray | None = None
    for lo in range(0, n, _VOTE_BLOCK_ROWS):
        hi = min(n, lo + _VOTE_BLOCK_ROWS)
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
    return votes
