"""The dataset file: an `AuditDataset` as one Parquet table, and back.

The file holds the canonical columns (features as list<float32>, images as PNG bytes) with the
class list, input kind, source and loading notes in the schema metadata (keys ``dm_audit.*``),
so `is_dataset_file` can tell it from any other Parquet table. It is written under a temporary
name and renamed, so a crash never leaves a partial file. Features are read back row group by
row group into one (N, D) matrix: decoding the whole column at once would hold it twice.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dm_audit.errors import DataError

if TYPE_CHECKING:
    from dm_audit.dataset import AuditDataset

#: Version of the canonical Parquet layout written by `AuditDataset.to_parquet`.
FORMAT_VERSION = "1"
# Rows per Parquet row group of a dataset file: a reader decodes one row group at a time, so
# this bounds the decoding buffers (65,536 rows of 128 features: 32 MB of values).
ROW_GROUP_ROWS = 65_536
_META_PREFIX = "dm_audit."


def write_dataset_file(dataset: AuditDataset, path: str | os.PathLike[str]) -> Path:
    """Write `dataset` to `path` under a temporary name, then rename it (see the module)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _to_arrow(dataset)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_dataset_file(
    path: Path,
) -> tuple[dict[str, Any], dict[str, Any], np.ndarray | None]:
    """The columns, the metadata and the feature matrix of a dataset file.

    Returns
    -------
    columns : dict
        Column name -> pandas Series, or a list of one float32 array per row for ``features``.
    meta : dict
        ``classes``, ``input_kind``, ``source`` and ``notes``, decoded.
    matrix : numpy.ndarray of float32, shape (N, D), or None
        The features as one matrix whose rows the ``features`` cells are views of; None for an
        image dataset, or when the rows do not all have the same length.

    Raises
    ------
    DataError
        If the file is unreadable, is not a dm-audit dataset file, or has another format
        version.
    """
    try:
        schema = pq.read_schema(path)
        others = [name for name in schema.names if name != "features"]
        arrow = pq.read_table(path, columns=others)
        matrix = _read_feature_matrix(path) if "features" in schema.names else None
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read the Parquet file {path}: {exc}") from exc
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    if _META_PREFIX + "classes" not in meta:
        raise DataError(f"{path} is not a dm-audit dataset file (no class list in its metadata)")
    version = meta.get(_META_PREFIX + "format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{path} has dataset format version {version!r}; expected {FORMAT_VERSION}")
    columns: dict[str, Any] = {}
    for name in schema.names:
        if name != "features":
            columns[name] = arrow.column(name).to_pandas()
        elif matrix is not None:
            columns[name] = list(matrix)
        else:
            # Rows of different lengths: one array per row, for `validate` to name them.
            columns[name], _ = _features_from_arrow(
                pq.read_table(path, columns=["features"]).column(0)
            )
    decoded = {
        "classes": json.loads(meta[_META_PREFIX + "classes"]),
        "input_kind": meta[_META_PREFIX + "input_kind"],
        "source": meta.get(_META_PREFIX + "source", str(path)),
        "notes": json.loads(meta.get(_META_PREFIX + "notes", "{}")),
    }
    return columns, decoded, matrix


def _to_arrow(dataset: AuditDataset) -> pa.Table:
    table = dataset.table
    arrays: dict[str, pa.Array] = {
        "example_id": pa.array(table["example_id"].astype(str).tolist(), type=pa.string()),
        "label": pa.array(table["label"].astype(str).tolist(), type=pa.string()),
        "split": pa.array(table["split"].astype(str).tolist(), type=pa.string()),
    }
    if dataset.input_kind == "features":
        arrays["features"] = _features_to_arrow(dataset.features())
    else:
        arrays["image"] = pa.array(
            [bytes(b) for b in table["image"].to_numpy(dtype=object)], type=pa.binary()
        )
    for name in ("true_label", "noise"):
        if name in table.columns:
            arrays[name] = pa.array(table[name].astype(str).tolist(), type=pa.string())
    metadata = {
        _META_PREFIX + "format_version": FORMAT_VERSION,
        _META_PREFIX + "classes": json.dumps(dataset.classes),
        _META_PREFIX + "input_kind": dataset.input_kind,
        _META_PREFIX + "source": dataset.source,
        _META_PREFIX + "notes": json.dumps(dataset.notes),
    }
    return pa.Table.from_pydict(arrays).replace_schema_metadata(metadata)


def _features_to_arrow(matrix: np.ndarray) -> pa.ChunkedArray:
    """(N, D) float32 as list<float32>, chunked so that int32 list offsets never overflow."""
    n, dim = matrix.shape
    rows_per_chunk = max(1, (2**31 - 1) // max(dim, 1))
    chunks = []
    for start in range(0, max(n, 1), rows_per_chunk):
        block = matrix[start : start + rows_per_chunk]
        offsets = pa.array(np.arange(len(block) + 1, dtype=np.int32) * dim, type=pa.int32())
        values = pa.array(np.ascontiguousarray(block).reshape(-1), type=pa.float32())
        chunks.append(pa.ListArray.from_arrays(offsets, values))
    return pa.chunked_array(chunks, type=pa.list_(pa.float32()))


def _read_feature_matrix(path: Path) -> np.ndarray | None:
    """The list<float32> ``features`` column as one (N, D) float32 matrix, row group by row group.

    Reading the whole column at once decodes it into Arrow buffers next to the matrix (about
    2 GB at a million 128-d rows); batch by batch only one row group is decoded at a time.
    Returns None when the rows do not all have the same length.
    """
    # Without pre-buffering: a pre-buffering reader keeps every row group read so far.
    file = pq.ParquetFile(path, pre_buffer=False)
    n = file.metadata.num_rows
    matrix: np.ndarray | None = None
    start = 0
    for batch in file.iter_batches(batch_size=ROW_GROUP_ROWS, columns=["features"]):
        lists = batch.column(0)
        if lists.null_count:
            return None
        offsets = lists.offsets.to_numpy()
        lengths = np.diff(offsets)
        width = int(lengths[0]) if len(lengths) else 0
        if width < 1 or (lengths != width).any():
            return None
        if matrix is None:
            matrix = np.empty((n, width), dtype=np.float32)
        elif width != matrix.shape[1]:
            return None
        values = lists.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
        matrix[start : start + len(lists)] = values.reshape(len(lists), width)
        start += len(lists)
    return matrix if matrix is not None and start == n else None


def _features_from_arrow(column: pa.ChunkedArray) -> tuple[list[np.ndarray], np.ndarray | None]:
    """list<float32> column as one float32 array per row (lengths are checked by `validate`).

    When every row has the same length the rows are views of one (N, D) matrix, also returned
    (None otherwise), so `AuditDataset.features` need not copy them.
    """
    chunks = [c for c in column.chunks if len(c)]
    if chunks:
        flats, width = [], None
        for chunk in chunks:
            offsets = chunk.offsets.to_numpy()
            lengths = np.diff(offsets)
            if width is None:
                width = int(lengths[0])
            if width < 1 or (lengths != width).any():
                break
            flat = chunk.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
            # A writable copy, as the stacked matrix used to be (Arrow's buffer is read-only).
            flats.append(np.array(flat, dtype=np.float32))
        else:
            matrix = np.concatenate(flats) if len(flats) > 1 else flats[0]
            matrix = matrix.reshape(-1, width)
            return list(matrix), matrix
    rows: list[np.ndarray] = []
    for chunk in column.chunks:
        offsets = chunk.offsets.to_numpy()
        flat = chunk.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        rows.extend(flat[offsets[i] : offsets[i + 1]] for i in range(len(chunk)))
    return rows, None


def is_dataset_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a Parquet file written by `AuditDataset.to_parquet`.

    Parameters
    ----------
    path : path-like
        A ``.parquet`` file.

    Returns
    -------
    bool
    """
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException):
        return False
    return (_META_PREFIX + "classes").encode() in (schema.metadata or {})
