"""Per-example scores of a trained model: p_i, emphasis weight, prediction, entropy, margin.

One eval-mode pass over the examples gives every score the anomaly flags and reports need:
``p_given`` (p_i, the probability of the given label: small for mislabelled and
out-of-distribution examples under a DM-trained model), the emphasis weight the training loss's
curve gives it, the predicted class and its probability, the normalised entropy, the margin
p_i − max_{j≠y_i} p_j, and the penultimate embedding (for faiss nearest neighbours).

The Parquet layout is :data:`SCORES_SCHEMA`, versioned in its metadata; :func:`write_scores`
writes it atomically. At millions of rows :func:`write_scores_stream` scores chunk by chunk and
writes each chunk's rows straight to the file, so the embeddings are never all in memory; the
flags read them back chunk by chunk (`dm_audit.neighbours.ParquetEmbeddings`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dm_audit.atomic import atomic_write_parquet
from dm_audit.batches import RowSubset
from dm_audit.errors import ConfigError, DataError
from dm_audit.metrics import given_probability, margin, normalised_entropy
from dm_audit.models import AuditModel
from dm_audit.neighbours import DEFAULT_CHUNK_ROWS
from dm_audit.training import predict_proba

__all__ = [
    "SCORES_SCHEMA",
    "SCORES_SCHEMA_VERSION",
    "STREAM_THRESHOLD",
    "read_scores",
    "score",
    "score_columns",
    "scores_from_probs",
    "write_scores",
    "write_scores_stream",
]

SCORES_SCHEMA_VERSION = "1"
# Above this many examples the audit streams scores to Parquet instead of holding every
# embedding: 200k rows of 256-d float32 embeddings are 200 MB (plus the normalised copy faiss
# needs), which is where holding them starts to dominate the audit's memory.
STREAM_THRESHOLD = 200_000

SCORES_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.string(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("p_given", pa.float32(), nullable=False),
        pa.field("emphasis_weight", pa.float32(), nullable=False),
        pa.field("predicted_label", pa.int64(), nullable=False),
        pa.field("predicted_prob", pa.float32(), nullable=False),
        pa.field("entropy", pa.float32(), nullable=False),
        pa.field("margin", pa.float32(), nullable=False),
        # "element" is the child name Parquet writes (and reads back) for a list.
        pa.field("embedding", pa.list_(pa.field("element", pa.float32())), nullable=False),
    ],
    metadata={
        b"dm_audit.schema": b"scores",
        b"dm_audit.schema_version": SCORES_SCHEMA_VERSION.encode(),
    },
)
"""Per-example scores: ``example_id`` (row position as text unless ids are given), ``label``
(the given label's code), ``p_given``, ``emphasis_weight``, ``predicted_label``,
``predicted_prob``, ``entropy`` (H(p)/log C), ``margin``, ``embedding`` (list<float32>)."""

WeightFn = Callable[[np.ndarray], np.ndarray]


def scores_from_probs(
    probs: np.ndarray,
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    weighting: WeightFn,
    example_ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Build the scores table from probabilities already computed.

    Parameters
    ----------
    probs : array (N, C) float
        Class probabilities (rows sum to 1).
    embeddings : array (N, E) float
        Penultimate embeddings.
    labels : array (N,) int
        Given labels, codes ``0..C-1``.
    weighting : callable
        Maps p_i ``(N,)`` to emphasis weights ``(N,)`` (e.g. a
        :class:`dm_audit.emphasis.Weighting`).
    example_ids : sequence of str, optional
        Stable ids; default: the row positions as strings.

    Returns
    -------
    pandas.DataFrame
        Columns of :data:`SCORES_SCHEMA`, ``N`` rows in input order.
    """
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim != 2:
        raise DataError(f"probs must have shape (N, C), got {p.shape}")
    n = p.shape[0]
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise DataError(f"embeddings must have shape ({n}, E), got {emb.shape}")
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be integer codes of shape ({n},), got {y.dtype} {y.shape}")
    bad = np.flatnonzero((y < 0) | (y >= p.shape[1]))
    if bad.size:
        raise DataError(f"labels: row {bad[0]} has label {y[bad[0]]}, outside 0..{p.shape[1] - 1}")
    ids = [str(i) for i in range(n)] if example_ids is None else [str(i) for i in example_ids]
    if len(ids) != n:
        raise DataError(f"example_ids has {len(ids)} entries for {n} examples")
    return pd.DataFrame(
        {"example_id": ids, **score_columns(p, y, weighting=weighting), "embedding": list(emb)}
    )


def score_columns(probs: np.ndarray, labels: np.ndarray, *, weighting: WeightFn) -> dict[str, Any]:
    """The per-example score columns computed from probabilities (all but id and embedding).

    Parameters
    ----------
    probs : array (N, C) float32
        Class probabilities, already validated.
    labels : array (N,) int
        Given label codes in ``0..C-1``.
    weighting : callable
        Maps p_i to emphasis weights.

    Returns
    -------
    dict of str to array (N,)
        ``label``, ``p_given``, ``emphasis_weight``, ``predicted_label``, ``predicted_prob``,
        ``entropy``, ``margin`` with the dtypes of :data:`SCORES_SCHEMA`.
    """
    n = probs.shape[0]
    p_given = given_probability(probs, labels)
    weights = np.asarray(weighting(p_given.astype(np.float64)), dtype=np.float32)
    if weights.shape != (n,):
        raise DataError(f"weighting returned shape {weights.shape}, expected ({n},)")
    return {
        "label": labels.astype(np.int64),
        "p_given": p_given,
        "emphasis_weight": weights,
        "predicted_label": probs.argmax(axis=1).astype(np.int64),
        "predicted_prob": probs.max(axis=1).astype(np.float32),
        "entropy": normalised_entropy(probs),
        "margin": margin(probs, labels),
    }


def _chunk_table(ids: Sequence[str], columns: dict[str, Any], embeddings: np.ndarray) -> pa.Table:
    """One chunk of the scores table as Arrow, the embeddings as a list column without copies."""
    m, width = embeddings.shape
    offsets = pa.array(np.arange(m + 1, dtype=np.int32) * width, type=pa.int32())
    values = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    arrays = [pa.array([str(i) for i in ids], type=pa.string())]
    for f in SCORES_SCHEMA:
        if f.name == "embedding":
            arrays.append(pa.ListArray.from_arrays(offsets, values, type=f.type))
        elif f.name != "example_id":
            arrays.append(pa.array(columns[f.name], type=f.type))
    return pa.Table.from_arrays(arrays, schema=SCORES_SCHEMA)


def write_scores_stream(
    model: AuditModel,
    inputs: np.ndarray | RowSubset,
    labels: np.ndarray,
    path: str | os.PathLike[str],
    *,
    weighting: WeightFn,
    device: str | torch.device = "auto",
    batch_size: int = 1024,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    example_ids: Sequence[str] | None = None,
) -> tuple[Path, np.ndarray]:
    """Score every example chunk by chunk, writing each chunk's rows straight to Parquet.

    Only one chunk's embeddings are in memory at a time; the probabilities of every example
    (N x C, small next to N x E embeddings) are returned because the flags and corrections need
    them. The file has :data:`SCORES_SCHEMA` and the same rows as :func:`write_scores` of
    :func:`score` would write; it appears atomically (written under a temporary name, then
    renamed), so a crash leaves no partial file.

    Parameters
    ----------
    model : AuditModel
        Trained model.
    inputs : array or RowSubset
        float features ``(N, D)`` or uint8 images ``(N, H, W, C)``; a `RowSubset` is read a
        chunk at a time.
    labels : array (N,) int
        Given labels.
    path : path-like
        Destination ``.parquet`` file; its folder is created if needed.
    weighting : callable
        Emphasis curve for ``emphasis_weight``.
    device : str or torch.device
        See :func:`dm_audit.training.resolve_device`.
    batch_size : int
        Examples per forward pass.
    chunk_rows : int
        Examples per chunk (one Parquet row group each). Rounded up to a multiple of
        `batch_size`, so the forward passes see the same batches as one whole pass.
    example_ids : sequence of str, optional
        Ids for the ``example_id`` column (default: row positions).

    Returns
    -------
    path : Path
        The written file.
    probs : array (N, C) float32
        Class probabilities of every example.
    """
    y = np.asarray(labels)
    n = len(inputs)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be integer codes of shape ({n},), got {y.dtype} {y.shape}")
    if example_ids is not None and len(example_ids) != n:
        raise DataError(f"example_ids has {len(example_ids)} entries for {n} examples")
    if chunk_rows < 1 or batch_size < 1:
        raise ConfigError(f"chunk_rows and batch_size must be >= 1, got {chunk_rows}, {batch_size}")
    chunk = -(-chunk_rows // batch_size) * batch_size
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, SCORES_SCHEMA) as writer:
            probs = _score_chunks(
                writer, model, inputs, y, weighting, device, batch_size, chunk, example_ids
            )
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out, probs


def _score_chunks(
    writer: pq.ParquetWriter,
    model: AuditModel,
    inputs: np.ndarray | RowSubset,
    y: np.ndarray,
    weighting: WeightFn,
    device: str | torch.device,
    batch_size: int,
    chunk: int,
    example_ids: Sequence[str] | None,
) -> np.ndarray:
    """Score `chunk` rows at a time, writing each chunk to `writer`; return every row's probs."""
    n = len(inputs)
    probs: np.ndarray | None = None
    for start in range(0, max(n, 1), chunk):
        stop = min(n, start + chunk)
        p, emb = predict_proba(model, inputs[start:stop], device, batch_size)
        if probs is None:
            probs = np.empty((n, p.shape[1]), dtype=np.float32)
        probs[start:stop] = p
        yc = y[start:stop]
        bad = np.flatnonzero((yc < 0) | (yc >= p.shape[1]))
        if bad.size:
            row = start + int(bad[0])
            raise DataError(f"labels: row {row} has label {y[row]}, outside 0..{p.shape[1] - 1}")
        ids = range(start, stop) if example_ids is None else example_ids[start:stop]
        columns = score_columns(p, yc, weighting=weighting)
        writer.write_table(_chunk_table(ids, columns, emb))
        if stop >= n:
            break
    assert probs is not None
    return probs


def score(
    model: AuditModel,
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    weighting: WeightFn,
    device: str | torch.device = "auto",
    batch_size: int = 1024,
    example_ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Score every example with a trained model (one eval-mode pass).

    Parameters
    ----------
    model : AuditModel
        Trained model (e.g. ``fit(...).model``).
    inputs : array
        float features ``(N, D)`` or uint8 images ``(N, H, W, C)``.
    labels : array (N,) int
        Given labels.
    weighting : callable
        Emphasis curve for ``emphasis_weight`` (usually the training loss's DM weighting).
    device : str or torch.device
        See :func:`dm_audit.training.resolve_device`.
    batch_size : int
        Examples per forward pass.
    example_ids : sequence of str, optional
        Ids for the ``example_id`` column (default: row positions).

    Returns
    -------
    pandas.DataFrame
        Columns of :data:`SCORES_SCHEMA`.
    """
    probs, embeddings = predict_proba(model, inputs, device, batch_size)
    return scores_from_probs(
        probs, embeddings, labels, weighting=weighting, example_ids=example_ids
    )


def _to_table(df: pd.DataFrame) -> pa.Table:
    missing = [f.name for f in SCORES_SCHEMA if f.name not in df.columns]
    if missing:
        raise DataError(f"scores table lacks column(s) {', '.join(missing)}")
    n = len(df)
    arrays: list[pa.Array] = []
    for f in SCORES_SCHEMA:
        col = df[f.name]
        if f.name == "embedding":
            rows = [np.asarray(v, dtype=np.float32).ravel() for v in col]
            lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=n)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            flat = np.concatenate(rows) if rows else np.zeros(0, np.float32)
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), type=f.type))
            continue
        if col.isna().any():
            row = int(np.flatnonzero(col.isna().to_numpy())[0])
            raise DataError(f"scores column {f.name!r} has a missing value at row {row}")
        if pa.types.is_string(f.type):
            arrays.append(pa.array(col.astype(str).tolist(), type=f.type))
        else:
            arrays.append(pa.array(col.to_numpy().astype(f.type.to_pandas_dtype()), type=f.type))
    return pa.Table.from_arrays(arrays, schema=SCORES_SCHEMA)


def write_scores(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a scores table to Parquet with :data:`SCORES_SCHEMA`, atomically.

    Parameters
    ----------
    df : pandas.DataFrame
        Output of :func:`score` (extra columns are dropped; dtypes are cast to the schema).
    path : path-like
        Destination ``.parquet`` file; its folder is created if needed.

    Returns
    -------
    Path
        The written file.
    """
    table = _to_table(df)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_parquet(out, table)


def read_scores(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a file written by :func:`write_scores`, checking its schema version.

    Raises
    ------
    DataError
        Not a scores file, or a different schema version.
    """
    table = pq.read_table(path)
    meta: dict[bytes, Any] = table.schema.metadata or {}
    if meta.get(b"dm_audit.schema") != b"scores":
        raise DataError(f"{path} is not a dm-audit scores file")
    version = meta.get(b"dm_audit.schema_version", b"?").decode()
    if version != SCORES_SCHEMA_VERSION:
        raise DataError(
            f"{path} has scores schema version {version}; this dm-audit reads "
            f"{SCORES_SCHEMA_VERSION}"
        )
    return table.to_pandas()
