"""Checks of a dataset table against the canonical layout (`validate`).

Every check names what is at fault (the column, the row, the example id), because the person
reading the message has to find it in their own file. `check_feature_vectors` is shared with the
sources, which check a list column before the table is assembled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dm_audit.errors import DataError
from dm_audit.label_names import describe_row, sort_classes

if TYPE_CHECKING:
    from dm_audit.dataset import AuditDataset

#: Values of the ``split`` column.
SPLITS: tuple[str, ...] = ("train", "test")
#: Values of the ``noise`` column (present with ``true_label``).
NOISE_KINDS: tuple[str, ...] = ("clean", "flipped", "open_set")


def _check_ids(ids: pd.Series, source: str) -> None:
    where = f" in {source}" if source else ""
    if ids.isna().any():
        row = int(np.flatnonzero(ids.isna().to_numpy())[0])
        raise DataError(f"example_id is missing at row {row}{where}")
    duplicated = ids.duplicated(keep=False).to_numpy()
    if duplicated.any():
        text = ids.astype(str).to_numpy(dtype=object)
        rows_of: dict[str, list[int]] = {}
        for row in np.flatnonzero(duplicated):
            rows_of.setdefault(text[row], []).append(int(row))
        names = sort_classes(rows_of)
        shown = ", ".join(f"{n!r} (rows {', '.join(map(str, rows_of[n][:5]))})" for n in names[:10])
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        raise DataError(f"duplicate example ids{where}, column example_id: {shown}{more}")


def _check_values(column: pd.Series, allowed: Sequence[str], name: str, ids: np.ndarray) -> None:
    bad = ~column.isin(allowed).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"column {name!r} holds {column.iloc[row]!r} at {describe_row(row, ids)}; "
            f"allowed values are {list(allowed)}"
        )


def check_feature_vectors(
    values: Sequence[np.ndarray],
    column: str,
    ids: Sequence[str],
    *,
    matrix: np.ndarray | None = None,
) -> int:
    """Check that feature vectors share one length and are finite.

    Parameters
    ----------
    values : sequence of numpy.ndarray, each shape (D,)
        One vector per example.
    column : str
        Column the vectors came from, named in errors.
    ids : sequence of str, length N
        Example ids, named in errors.
    matrix : numpy.ndarray, shape (N, D), optional
        The vectors already stacked (rows of one matrix), checked without another copy.

    Returns
    -------
    int
        The common length D.

    Raises
    ------
    DataError
        On mixed lengths (listing examples of the minority lengths), an empty vector, or a
        NaN/inf value (naming the example and the position).
    """
    lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    if len(lengths) == 0:
        return 0
    counts = Counter(lengths.tolist())
    dim = max(counts, key=lambda d: (counts[d], d))
    if len(counts) > 1:
        odd = np.flatnonzero(lengths != dim)[:5]
        shown = ", ".join(f"{ids[i]!r} has {lengths[i]}" for i in odd)
        raise DataError(
            f"column {column!r} mixes feature dimensions {sorted(counts)}: most rows have {dim} "
            f"values but {shown}"
        )
    if dim == 0:
        raise DataError(f"column {column!r} holds empty feature vectors")
    if matrix is None:
        matrix = np.stack(values)
    # Block by block: a boolean mask of a million rows at once would cost 128 MB.
    for start in range(0, len(matrix), 65_536):
        finite = np.isfinite(matrix[start : start + 65_536])
        if finite.all():
            continue
        row, pos = (int(x) for x in np.argwhere(~finite)[0])
        row += start
        finite = np.isfinite(matrix)
        # A table's gaps are filled column by column (`dm_audit.missing_values`); a vector
        # column or an array is taken as the user's own encoding, whose gaps the user fills.
        hint = (
            "; fill the gaps, or pass the features as table columns (a DataFrame, CSV or "
            "Parquet file), whose gaps are filled from the nearest rows"
            if np.isnan(matrix[row, pos])
            else ""
        )
        raise DataError(
            f"column {column!r} has {int((~finite).sum())} non-finite value(s) (NaN or inf); "
            f"the first is {matrix[row, pos]} at position {pos} of row {row} "
            f"(example_id {ids[row]!r}){hint}"
        )
    return dim


def _check_truth(table: pd.DataFrame, classes: Sequence[str], ids: np.ndarray) -> None:
    """``noise`` must agree with ``true_label``: clean keeps it, flipped changes it, open-set
    examples (and only they) have a true class outside the class list."""
    noise = table["noise"].to_numpy(dtype=object)
    same = (table["label"] == table["true_label"]).to_numpy()
    known = table["true_label"].isin(classes).to_numpy()
    consistent = np.where(
        noise == "open_set", ~known, known & np.where(noise == "clean", same, ~same)
    )
    if not consistent.all():
        row = int(np.flatnonzero(~consistent)[0])
        raise DataError(
            f"{describe_row(row, ids)} has label {table['label'].iloc[row]!r}, true_label "
            f"{table['true_label'].iloc[row]!r} and noise {noise[row]!r}, which disagree: "
            "'clean' keeps the true label, 'flipped' changes it to another class, 'open_set' "
            "marks a true class outside the class list"
        )


def validate(dataset: AuditDataset) -> None:
    """Check a dataset's table against the canonical layout.

    Parameters
    ----------
    dataset : AuditDataset
        The dataset to check.

    Raises
    ------
    DataError
        Naming the column, row or example at fault (see `AuditDataset.validate`).
    """
    table = dataset.table
    if len(table) == 0:
        raise DataError(f"dataset {dataset.source!r} is empty")
    if len(dataset.classes) < 2:
        raise DataError(
            f"dataset {dataset.source!r} has {len(dataset.classes)} class(es) "
            f"{dataset.classes}; at least two are needed"
        )
    if len(set(dataset.classes)) != len(dataset.classes):
        raise DataError(f"the class list has duplicates: {dataset.classes}")
    _check_ids(table["example_id"], dataset.source)
    ids = table["example_id"].astype(str).to_numpy(dtype=object)
    _check_values(table["label"], dataset.classes, "label", ids)
    _check_values(table["split"], SPLITS, "split", ids)
    if dataset.has_truth:
        if "noise" not in table.columns:
            raise DataError("a dataset with a true_label column needs a noise column")
        _check_values(table["noise"], NOISE_KINDS, "noise", ids)
        _check_truth(table, dataset.classes, ids)
    if dataset.input_kind == "features":
        vectors = table["features"].to_numpy(dtype=object)
        if not all(isinstance(v, np.ndarray) and v.ndim == 1 for v in vectors):
            raise DataError("the features column must hold one 1-D array per row")
        check_feature_vectors(vectors, "features", ids, matrix=dataset._shared_features(vectors))
    else:
        blobs = table["image"].to_numpy(dtype=object)
        bad = [i for i, b in enumerate(blobs) if not isinstance(b, bytes | bytearray) or not b]
        if bad:
            raise DataError(
                f"the image column must hold encoded bytes; {describe_row(bad[0], ids)} does not"
            )
