"""Nearest neighbours over embeddings read chunk by chunk (faiss, cosine similarity).

Embeddings reach the flags either as one in-memory array or as the ``embedding`` column of a
scores Parquet file written chunk by chunk (`dm_audit.scoring.write_scores_stream`). Both are
seen through the same `EmbeddingChunks` interface, so one code path builds the index and queries
it, and at millions of rows no more than one chunk of embeddings is held besides the index:

* the base rows are L2-normalised chunk by chunk and added to a faiss index: an exact
  ``IndexFlatIP`` up to `IVF_THRESHOLD` rows, above it an inverted-file index with about
  4 sqrt(N) lists that stores the vectors as float16 (``IndexIVFScalarQuantizer``, ``QT_fp16``:
  half the memory of float32, and faster to scan); its coarse quantizer is trained on a seeded
  sample gathered in a first pass;
* the queries are read again chunk by chunk and searched in batches.

Normalising a row does not depend on the other rows of its chunk, an index assigns each added
vector on its own and the queries reach faiss in the same batches whatever the chunks, so the
neighbours do not depend on the chunk size. The exception is the last bits: a chunk of a few
rows (a table's remainder) may be multiplied by a different kernel and round otherwise, which
can only matter for two neighbours at the same distance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from dm_audit.errors import ConfigError, DataError
from dm_audit.memory import release_unused_memory
from dm_audit.progress import progress_bar

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "EXACT_SEARCH_BUDGET",
    "IVF_THRESHOLD",
    "PARQUET_READ_BUFFER",
    "PARQUET_READ_ROWS",
    "ArrayEmbeddings",
    "EmbeddingChunks",
    "IndexKind",
    "Metric",
    "NeighbourGraph",
    "ParquetEmbeddings",
    "as_chunks",
    "build_index",
    "checked_embeddings",
    "exact_is_cheap",
    "search",
    "search_few",
]

IndexKind = Literal["auto", "flat", "ivf"]
# "cosine": inner product of L2-normalised rows (model embeddings, whose length carries
# confidence rather than position); "l2": Euclidean distance of the rows as they are (input
# space, where two rows on one ray from the origin are not the same row).
Metric = Literal["cosine", "l2"]
# An exact search costs N^2 E: at 200k rows of 256-d embeddings about 10^13 multiply-adds, a few
# minutes on two cores, which is where an approximate IVF index (4 sqrt(N) lists, 16 visited,
# so about 4 / sqrt(N) of that work) starts to pay; below it exact search is fast and free of
# approximation.
IVF_THRESHOLD = 200_000
# An exact search of a few queries (the rows a reused neighbour graph could not answer) costs
# queries x base rows x dimensions multiply-adds; up to 10^11, about two seconds on two cores, it
# is cheaper than training an IVF index of a large base (k-means over 64 rows per list).
EXACT_SEARCH_BUDGET = 10**11
# Lists per sqrt(N) rows. Measured on 1M audit embeddings (256-d, nprobe 16): 1,000 lists found
# 99.5 % of the exact 10 nearest at an estimated 630 s per 1M queries on two cores, 4,000 lists
# 99.3 % at 180 s (99.0 % and 105 s with float16 storage); the neighbours' label agreement moved
# by 0.002-0.003 on average.
IVF_LISTS_PER_SQRT_N = 4
# k-means training points per list: above faiss' minimum of 39, a sample of 256k rows at 1M.
IVF_TRAIN_PER_LIST = 64
# A search bar appears only when the search outlasts this many seconds: the small tables'
# searches finish before it and leave no line behind.
PROGRESS_DELAY_S = 2.0
# 65,536 rows of 256-d float32 embeddings are 64 MB: small next to the index of a million rows,
# large enough that per-chunk overheads (Parquet decoding, faiss calls) vanish.
DEFAULT_CHUNK_ROWS = 65_536
# Rows per chunk read back from a Parquet embedding file, and the reader's buffer. Decoding a
# list<float32> column costs several times the chunk it yields (pages, repetition and
# definition levels, values): one pass over 510k 256-d rows peaked at +390 MB above the
# process with 65,536-row chunks read whole, +130 MB with 16,384-row chunks through a 1 MiB
# buffered stream, at the same speed (0.9 s per pass; 8,192 rows: +80 MB, 0.8 s).
PARQUET_READ_ROWS = 16_384
PARQUET_READ_BUFFER = 1 << 20


class EmbeddingChunks(Protocol):
    """Row-ordered embeddings that can be read several times, one chunk at a time."""

    @property
    def n_rows(self) -> int:
        """Number of rows N."""
        ...

    @property
    def dim(self) -> int:
        """Embedding width E."""
        ...

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, block)`` with ``block`` float32 of shape (m, E), in row order."""
        ...


def _check_block(block: np.ndarray, start: int, where: str) -> np.ndarray:
    if not np.isfinite(block).all():
        row = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
        raise DataError(f"embeddings row {row} holds a non-finite value{where}")
    return block


@dataclass(frozen=True)
class ArrayEmbeddings:
    """An in-memory (N, E) array seen as chunks (views, no copies)."""

    array: np.ndarray
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    def __post_init__(self) -> None:
        arr = np.asarray(self.array, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] < 1:
            raise DataError(f"embeddings must have shape (N, E), got {arr.shape}")
        if self.chunk_rows < 1:
            raise ConfigError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        object.__setattr__(self, "array", arr)

    @property
    def n_rows(self) -> int:
        return int(self.array.shape[0])

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.n_rows, self.chunk_rows):
            yield start, _check_block(self.array[start : start + self.chunk_rows], start, "")


@dataclass(frozen=True)
class ParquetEmbeddings:
    """The list<float32> embedding column of a Parquet file, read in chunks.

    Attributes
    ----------
    path : Path
        A file written by `dm_audit.scoring.write_scores_stream` (or `write_scores`).
    column : str
        Name of the embedding column.
    chunk_rows : int
        Rows per chunk read (default `PARQUET_READ_ROWS`).
    """

    path: Path
    column: str = "embedding"
    chunk_rows: int = PARQUET_READ_ROWS

    def __post_init__(self) -> None:
        import pyarrow.parquet as pq

        object.__setattr__(self, "path", Path(self.path))
        if self.chunk_rows < 1:
            raise ConfigError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        file = pq.ParquetFile(self.path)
        if self.column not in file.schema_arrow.names:
            raise DataError(f"{self.path} has no column {self.column!r}")
        object.__setattr__(self, "_n", int(file.metadata.num_rows))
        object.__setattr__(self, "_dim", self._first_width())

    def _first_width(self) -> int:
        for _, block in self._blocks(check=False):
            return int(block.shape[1])
        raise DataError(f"{self.path} holds no embeddings")

    @property
    def n_rows(self) -> int:
        return self._n  # type: ignore[attr-defined]

    @property
    def dim(self) -> int:
        return self._dim  # type: ignore[attr-defined]

    def _blocks(self, *, check: bool) -> Iterator[tuple[int, np.ndarray]]:
        import pyarrow.parquet as pq

        start = 0
        width: int | None = None
        # pre_buffer=False: with pre-buffering the reader keeps every row group it has read
        # until the file is closed, so a pass over 1M 256-d rows held about 1 GB of Arrow
        # buffers at its end; without it one row group is held at a time. A buffered stream
        # reads that row group's pages as the chunks need them, not its whole column at once.
        file = pq.ParquetFile(self.path, pre_buffer=False, buffer_size=PARQUET_READ_BUFFER)
        for batch in file.iter_batches(batch_size=self.chunk_rows, columns=[self.column]):
            lists = batch.column(0)
            m = len(lists)
            offsets = lists.offsets.to_numpy()
            lengths = np.diff(offsets)
            width = int(lengths[0]) if width is None and m else width
            if m and (lengths != width).any():
                first = int(np.flatnonzero(lengths != width)[0])
                raise DataError(
                    f"{self.path}: column {self.column!r} row {start + first} has "
                    f"{lengths[first]} values, expected {width}"
                )
            flat = lists.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
            block = np.asarray(flat, dtype=np.float32).reshape(m, width or 0)
            yield start, (_check_block(block, start, f" in {self.path}") if check else block)
            start += m
        # A whole pass read every row group through Arrow, which keeps the freed pages.
        release_unused_memory()

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        yield from self._blocks(check=True)


@dataclass(frozen=True)
class NeighbourGraph:
    """Each row's nearest other rows, nearest first: a `search` result kept so that a later
    question about the same rows (the nearest *trusted* row, once the flags say which rows are
    trusted) is answered without a second search.

    Attributes
    ----------
    positions : np.ndarray of int64, shape (N, k)
        Row numbers of the neighbours; -1 where none was found.
    similarities : np.ndarray of float32, shape (N, k)
        As `search` returns them: cosine similarities, or minus the squared distances with
        ``metric="l2"``; -inf where none was found.
    metric : {"cosine", "l2"}
    index : faiss.Index or None
        The index of every row the graph was searched with, when the caller kept it to ask it
        again for the rows the graph cannot answer (further neighbours); None otherwise.
    """

    positions: np.ndarray
    similarities: np.ndarray
    metric: Metric
    index: object | None = field(default=None, repr=False, compare=False)

    def kth_among(self, members: np.ndarray, k: int) -> np.ndarray:
        """Similarity of each row's k-th nearest neighbour among `members`, NaN where the
        graph lists fewer than k of them (ask `search` for those rows).

        Parameters
        ----------
        members : np.ndarray of bool, shape (N,)
            The rows that count, e.g. the trusted ones.
        k : int
            Which of them, from 1.

        Returns
        -------
        np.ndarray of float64, shape (N,)
        """
        pos = self.positions
        if pos.shape[1] == 0:
            return np.full(pos.shape[0], np.nan)
        listed = pos >= 0
        counts = listed & np.asarray(members, dtype=bool)[np.where(listed, pos, 0)]
        hit = counts & (np.cumsum(counts, axis=1) == k)
        found = hit.any(axis=1)
        out = np.full(pos.shape[0], np.nan)
        rows = np.flatnonzero(found)
        out[rows] = self.similarities[rows, hit[rows].argmax(axis=1)]
        return out


def exact_is_cheap(n_queries: int, n_base: int, dim: int) -> bool:
    """Whether an exact search of `n_queries` rows against `n_base` rows stays within
    `EXACT_SEARCH_BUDGET` (then `search_few` beats training an index)."""
    return n_queries * n_base * dim <= EXACT_SEARCH_BUDGET


# Query rows per block of `search_few`: a block's similarities to one chunk of base rows
# (64 x 65,536 float32 for an array, a quarter of that for a streamed file) are 16 MB, and
# their merge with the best so far (a copy, its negation and argpartition's int64 positions)
# about 5 times that. At 256 rows the block's transient was about 350 MB, the flag stage's
# peak at 1M rows.
_FEW_QUERY_BLOCK = 64


def search_few(
    source: EmbeddingChunks,
    base_rows: np.ndarray,
    query_rows: np.ndarray,
    k: int,
    *,
    metric: Metric = "cosine",
) -> np.ndarray:
    """Exact similarities of a few query rows to their k nearest base rows, themselves
    excluded, nearest first; the base is streamed chunk by chunk and no index is built.

    For the rows a reused `NeighbourGraph` could not answer: a faiss index of the whole base
    would hold a copy of it (or train k-means) for a handful of queries.

    Parameters
    ----------
    source : EmbeddingChunks
        The rows (queries and base alike).
    base_rows, query_rows : np.ndarray of int
        Sorted row numbers of the base and of the queries.
    k : int
        Neighbours per query.
    metric : {"cosine", "l2"}
        As `search`: cosine similarities, or minus the squared Euclidean distances.

    Returns
    -------
    np.ndarray of float32, shape (len(query_rows), k)
        -inf where fewer than k base rows exist.
    """
    queries_at = np.asarray(query_rows, dtype=np.int64)
    in_base = np.zeros(source.n_rows, dtype=bool)
    in_base[np.asarray(base_rows, dtype=np.int64)] = True
    queries = np.empty((queries_at.size, source.dim), dtype=np.float32)
    for start, block in source.chunks():
        lo, hi = np.searchsorted(queries_at, [start, start + len(block)])
        queries[lo:hi] = _prepared(block[queries_at[lo:hi] - start], metric)
    best = np.full((queries_at.size, k), -np.inf, dtype=np.float32)
    for start, block in source.chunks():
        rows = np.arange(start, start + len(block))[in_base[start : start + len(block)]]
        if rows.size == 0:
            continue
        base = _prepared(block[rows - start], metric)
        base_sq = (base * base).sum(axis=1)
        for lo in range(0, queries_at.size, _FEW_QUERY_BLOCK):
            q = queries[lo : lo + _FEW_QUERY_BLOCK]
            sims = q @ base.T
            if metric == "l2":
                sims = 2.0 * sims - (q * q).sum(axis=1)[:, None] - base_sq[None, :]
            # A query that is itself a base row in this chunk does not count as its neighbour.
            own = queries_at[lo : lo + len(q)]
            at = np.searchsorted(rows, own)
            mine = (at < rows.size) & (rows[np.minimum(at, rows.size - 1)] == own)
            sims[np.flatnonzero(mine), at[mine]] = -np.inf
            both = np.concatenate([best[lo : lo + len(q)], sims], axis=1)
            top = np.argpartition(-both, k - 1, axis=1)[:, :k] if both.shape[1] > k else None
            if top is not None:
                both = np.take_along_axis(both, top, axis=1)
            best[lo : lo + len(q)] = -np.sort(-both, axis=1)
    return best


def as_chunks(
    embeddings: np.ndarray | EmbeddingChunks, chunk_rows: int | None = None
) -> EmbeddingChunks:
    """Wrap an array as `ArrayEmbeddings`; pass chunked sources through."""
    if hasattr(embeddings, "chunks") and hasattr(embeddings, "n_rows"):
        return embeddings  # type: ignore[return-value]
    if chunk_rows is None:
        return ArrayEmbeddings(np.asarray(embeddings))
    return ArrayEmbeddings(np.asarray(embeddings), chunk_rows)


def checked_embeddings(x: np.ndarray | EmbeddingChunks, n: int | None = None) -> EmbeddingChunks:
    """An (N, E) array, checked whole, or a chunked source, checked chunk by chunk when read.

    Parameters
    ----------
    x : np.ndarray, shape (N, E), or EmbeddingChunks
        The embeddings.
    n : int, optional
        Required number of rows N.

    Returns
    -------
    EmbeddingChunks
        `ArrayEmbeddings` of the array, or `x` itself.
    """
    if isinstance(x, np.ndarray) or not hasattr(x, "chunks"):
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] < 1 or (n is not None and arr.shape[0] != n):
            want = f"({n}, E)" if n is not None else "(N, E)"
            raise DataError(f"embeddings must have shape {want}, got {arr.shape}")
        return ArrayEmbeddings(arr)
    if n is not None and x.n_rows != n:
        raise DataError(f"embeddings must have shape ({n}, E), got {x.n_rows} rows")
    return x


def normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows (zero rows stay zero) as C-contiguous float32, as faiss wants."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def _prepared(block: np.ndarray, metric: Metric) -> np.ndarray:
    """Rows as faiss takes them: normalised for cosine, contiguous float32 for L2."""
    if metric == "cosine":
        return normalise(block)
    return np.ascontiguousarray(block, dtype=np.float32)


def _selected(block: np.ndarray, start: int, positions: np.ndarray | None) -> np.ndarray:
    """Rows of `block` (rows ``start..``) whose row numbers are in sorted `positions`."""
    if positions is None:
        return block
    lo, hi = np.searchsorted(positions, [start, start + len(block)])
    return block[positions[lo:hi] - start]


def build_index(
    source: EmbeddingChunks,
    base_rows: np.ndarray | None = None,
    *,
    kind: IndexKind = "auto",
    ivf_threshold: int = IVF_THRESHOLD,
    nprobe: int = 16,
    seed: int = 0,
    metric: Metric = "cosine",
) -> object:
    """A faiss inner-product index of the normalised embeddings of `base_rows`.

    Parameters
    ----------
    source : EmbeddingChunks
        The embeddings, read chunk by chunk (twice for IVF: sample, then add).
    base_rows : np.ndarray of int, optional
        Sorted row numbers to index (default: every row). Index position j is ``base_rows[j]``.
    kind : {"auto", "flat", "ivf"}
        Exact ``IndexFlatIP``; IVF with about 4 sqrt(n) lists and float16 vectors
        (``IndexIVFScalarQuantizer``); or IVF above `ivf_threshold` indexed rows.
    ivf_threshold : int
        Indexed rows above which ``"auto"`` uses IVF.
    nprobe : int
        IVF lists visited per query (capped at the number of lists; equal to it is exact).
    seed : int
        Seeds the IVF training sample and its k-means.
    metric : {"cosine", "l2"}
        Inner product of normalised rows, or Euclidean distance of the rows as they are.

    Returns
    -------
    faiss.Index
    """
    if kind not in ("auto", "flat", "ivf"):
        raise ConfigError(f"index must be 'auto', 'flat' or 'ivf', got {kind!r}")
    if metric not in ("cosine", "l2"):
        raise ConfigError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    rows = None if base_rows is None else np.asarray(base_rows, dtype=np.int64)
    n = source.n_rows if rows is None else int(rows.size)
    if kind == "ivf" or (kind == "auto" and n > ivf_threshold):
        return _ivf_index(source, rows, n, nprobe=nprobe, seed=seed, metric=metric)
    index = _flat_index(metric)(source.dim)
    for start, block in source.chunks():
        part = _selected(block, start, rows)
        if len(part):
            index.add(_prepared(part, metric))
    return index


def _flat_index(metric: Metric) -> type:
    """The exact faiss index class of `metric`."""
    import faiss

    return faiss.IndexFlatIP if metric == "cosine" else faiss.IndexFlatL2


def _ivf_index(
    source: EmbeddingChunks,
    rows: np.ndarray | None,
    n: int,
    *,
    nprobe: int,
    seed: int,
    metric: Metric,
) -> object:
    """A trained IVF index of float16 vectors holding the `n` indexed rows (`build_index`)."""
    import faiss

    d = source.dim
    # About 4 sqrt(N) lists, but at least 39 training points per centroid (faiss' minimum).
    nlist = int(max(1, min(round(IVF_LISTS_PER_SQRT_N * math.sqrt(n)), n // 39)))
    quantizer = _flat_index(metric)(d)
    # float16 keeps cosine similarities of unit vectors to about 1e-4 (8-bit codes found
    # only 75 % of the exact neighbours of 1M audit embeddings, which lie very close).
    index = faiss.IndexIVFScalarQuantizer(
        quantizer,
        d,
        nlist,
        faiss.ScalarQuantizer.QT_fp16,
        faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2,
    )
    index.cp.seed = seed
    n_train = min(n, IVF_TRAIN_PER_LIST * nlist)
    log.info(
        "building an IVF index of %d rows: %d lists trained on %d rows, %d probed per query",
        n,
        nlist,
        n_train,
        min(nlist, max(1, nprobe)),
    )
    sample = _training_sample(source, rows, n, n_train, seed=seed, metric=metric)
    index.train(sample)
    del sample
    index.nprobe = int(min(nlist, max(1, nprobe)))
    _add_to_reserved_lists(index, source, rows, n, metric)
    return index


def _training_sample(
    source: EmbeddingChunks,
    rows: np.ndarray | None,
    n: int,
    n_train: int,
    *,
    seed: int,
    metric: Metric,
) -> np.ndarray:
    """A seeded sample of `n_train` of the indexed rows, prepared for faiss, (n_train, E)."""
    rng = np.random.default_rng(seed)
    # Positions among the indexed rows, then the row numbers they stand for.
    picked = np.arange(n) if n_train == n else np.sort(rng.choice(n, n_train, replace=False))
    sample_rows = picked if rows is None else rows[picked]
    sample = np.empty((n_train, source.dim), dtype=np.float32)
    filled = 0
    for start, block in source.chunks():
        part = _prepared(_selected(block, start, sample_rows), metric)
        sample[filled : filled + len(part)] = part
        filled += len(part)
    return sample


def _add_to_reserved_lists(
    index: object, source: EmbeddingChunks, rows: np.ndarray | None, n: int, metric: Metric
) -> None:
    """Add the rows to a trained IVF index, each inverted list sized exactly beforehand.

    Added chunk by chunk, each list's storage grows by doubling and ends up to twice its size
    (measured +20 % over the vectors at 200k rows). A first pass assigns every row to its list
    (n int64: 8 MB at 1M), the lists are given their final capacity, and the second pass adds
    the rows with those assignments, so the coarse quantizer runs once per row and the index
    holds just the codes (1M x 256 float16: 512 MB).
    """
    import faiss

    quantizer = index.quantizer  # type: ignore[attr-defined]
    assigned = np.empty(n, dtype=np.int64)
    filled = 0
    for start, block in source.chunks():
        part = _selected(block, start, rows)
        if len(part):
            _, nearest = quantizer.search(_prepared(part, metric), 1)
            assigned[filled : filled + len(part)] = nearest.ravel()
            filled += len(part)
    counts = np.bincount(assigned, minlength=index.nlist)  # type: ignore[attr-defined]
    lists = faiss.downcast_InvertedLists(index.invlists)  # type: ignore[attr-defined]
    if hasattr(lists, "resize"):
        for list_no, count in enumerate(counts.tolist()):
            if count:
                # Growing to the final size and back to empty keeps the capacity.
                lists.resize(list_no, count)
                lists.resize(list_no, 0)
    filled = 0
    for start, block in source.chunks():
        part = _selected(block, start, rows)
        m = len(part)
        if m:
            vectors = _prepared(part, metric)
            ids = np.arange(filled, filled + m, dtype=np.int64)
            where = np.ascontiguousarray(assigned[filled : filled + m])
            # The Python wrapper has no add with precomputed lists; the C++ call takes them.
            index.add_core(  # type: ignore[attr-defined]
                m, faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(where)
            )
            filled += m


def search(
    index: object,
    queries: EmbeddingChunks,
    k: int,
    *,
    query_rows: np.ndarray | None = None,
    self_positions: np.ndarray | None = None,
    batch_size: int = 16_384,
    progress: str | None = None,
    metric: Metric = "cosine",
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest index entries of every query row, optionally excluding the query itself.

    Parameters
    ----------
    index : faiss.Index
        From `build_index`.
    queries : EmbeddingChunks
        Query rows, normalised chunk by chunk here.
    k : int
        Neighbours per query (after the exclusion).
    query_rows : np.ndarray of int, optional
        Sorted row numbers of `queries` to search (default: every row); results are in their
        order, N = their count.
    self_positions : np.ndarray of int, shape (N,), optional
        Index position of each query, -1 for queries not in the index. Wherever a query's own
        position is returned it is dropped; where it is not, the farthest neighbour is dropped,
        so every query keeps k.
    batch_size : int
        Queries per faiss call (bounds faiss' scratch memory and the result buffers).
    progress : str, optional
        Label of a progress bar (queries/s, ETA) shown once the search outlasts
        `PROGRESS_DELAY_S`; None shows none.
    metric : {"cosine", "l2"}
        The index's metric (`build_index`).

    Returns
    -------
    similarities : np.ndarray, shape (N, k), float32
        Cosine similarities, nearest first; -inf where no neighbour was found. With
        ``metric="l2"``: minus the squared Euclidean distances, so nearest is still first.
    positions : np.ndarray, shape (N, k), int64
        Index positions of the neighbours; -1 where none was found.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    n_base = int(index.ntotal)  # type: ignore[attr-defined]
    rows = None if query_rows is None else np.asarray(query_rows, dtype=np.int64)
    n = queries.n_rows if rows is None else int(rows.size)
    kk = min(k + (1 if self_positions is not None else 0), n_base)
    width = kk - (1 if self_positions is not None else 0)
    sims = np.empty((n, width), dtype=np.float32)
    ids = np.empty((n, width), dtype=np.int64)
    bar = progress_bar(
        total=n,
        desc=progress,
        unit="query",
        unit_scale=True,
        disable=progress is None,
        delay=PROGRESS_DELAY_S,
        dynamic_ncols=True,
    )
    done = 0  # queries answered so far
    with bar:
        for batch in _query_batches(queries, rows, batch_size, metric):
            lo, hi = done, done + len(batch)
            own = None if self_positions is None else self_positions[lo:hi, None]
            sims[lo:hi], ids[lo:hi] = _search_batch(index, batch, kk, own, metric)
            done = hi
            bar.update(hi - lo)
    sims = np.where(ids >= 0, sims, -np.inf).astype(np.float32)
    if sims.shape[1] < k:  # fewer indexed rows than k: pad as missing neighbours
        pad = k - sims.shape[1]
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return sims, ids


def _query_batches(
    queries: EmbeddingChunks, rows: np.ndarray | None, batch_size: int, metric: Metric
) -> Iterator[np.ndarray]:
    """The selected query rows, prepared for faiss, in batches of `batch_size` (the last fewer).

    Batches are filled across chunk boundaries, so faiss sees the same batches whatever the
    chunk size (its BLAS kernels may round differently for different batch shapes).
    """
    pending: list[np.ndarray] = []
    n_pending = 0
    for start, block in queries.chunks():
        block = _selected(block, start, rows)
        pos = 0
        while pos < len(block):
            take = min(batch_size - n_pending, len(block) - pos)
            pending.append(_prepared(block[pos : pos + take], metric))
            n_pending += take
            pos += take
            if n_pending == batch_size:
                yield np.concatenate(pending)
                pending, n_pending = [], 0
    if n_pending:
        yield np.concatenate(pending)


def _search_batch(
    index: object, batch: np.ndarray, kk: int, own: np.ndarray | None, metric: Metric
) -> tuple[np.ndarray, np.ndarray]:
    """Search one batch for `kk` neighbours; with `own` (m, 1), drop each query's own position.

    Where a query's own position is not among its neighbours the farthest one is dropped, so
    every query keeps ``kk - 1``.
    """
    s, i = index.search(batch, kk)  # type: ignore[attr-defined]
    if metric == "l2":
        s = -s
    if own is not None:
        m = len(batch)
        hit = (i == own) & (own >= 0)
        hit[~hit.any(axis=1), -1] = True
        keep = ~hit
        s = s[keep].reshape(m, kk - 1)
        i = i[keep].reshape(m, kk - 1)
    return s, i
