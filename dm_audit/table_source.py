"""A table of labelled examples made into the canonical dataset: `table_to_dataset`.

The label column is read as class names (`dm_audit.label_names.normalize_labels`; in a text file
``3.0`` names the class ``"3"`` and labels that are partly numbers are refused), the id column as
text (default ``example_id``, else a column named ``id`` whose values are distinct, else the row
number), a ``split`` column of ``train``/``test`` is honoured, and the input is picked and read
by `dm_audit.table_inputs`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dm_audit.dataset import AuditDataset, default_ids
from dm_audit.errors import DataError
from dm_audit.label_names import normalize_labels
from dm_audit.source_assembly import assemble_dataset
from dm_audit.table_files import ID_COLUMN, TableOptions, did_you_mean, require_column
from dm_audit.table_inputs import read_inputs

#: The split column read when the options name none.
SPLIT_COLUMN = "split"

# The sources' warnings and notes keep the sources' logger name.
log = logging.getLogger("dm_audit.sources")


def table_to_dataset(
    frame: pd.DataFrame,
    options: TableOptions | None = None,
    *,
    base_dir: Path | None = None,
    test_size: float = 0.0,
    seed: int = 0,
    source: str = "table",
    types_inferred: bool = False,
) -> AuditDataset:
    """Turn a table of labelled examples into the canonical dataset.

    Parameters
    ----------
    frame : pandas.DataFrame, N rows
        The table.
    options : TableOptions, optional
        Column choices; default `TableOptions()`.
    base_dir : pathlib.Path, optional
        Folder that image paths are relative to when ``options.image_root`` is unset.
    test_size, seed
        See `stratified_split`; unused when the table has a ``split`` column.
    source : str
        Name of the table, used in messages and stored with the dataset.
    types_inferred : bool
        Column types were guessed from text (CSV): a text column that is mostly numbers is then
        reported instead of silently ignored.

    Returns
    -------
    AuditDataset
    """
    options = options or TableOptions()
    columns = list(frame.columns)
    if len(frame) == 0:
        raise DataError(f"the table {source} has no rows")
    if options.label_column not in columns and options.label_column == "label":
        # The default name is missing: say how to name the table's own label column.
        raise DataError(
            f"label column 'label' not found in {source}{did_you_mean('label', columns)}; name "
            f"yours with --label-column (label_column from Python) (columns: {columns})"
        )
    require_column(columns, options.label_column, "label column", source)
    frame = frame.reset_index(drop=True)
    id_column = options.id_column
    if id_column is not None:
        require_column(columns, id_column, "id column", source)
    elif ID_COLUMN in columns:
        id_column = ID_COLUMN
    else:
        named = {options.label_column, options.split_column, options.image_column}
        id_column = _identifier_column(frame, taken=named | set(options.feature_columns or ()))
        if id_column is not None:
            log.info("%s: column %r names the rows (example_id), not an input", source, id_column)
    ids = (
        list(normalize_labels(frame[id_column], id_column, what="id", source=source))
        if id_column is not None
        else default_ids(len(frame))
    )
    raw_labels = frame[options.label_column]
    if types_inferred:
        raw_labels = _numbers_from_text(raw_labels)
    notes: dict[str, Any] = {}
    labels = normalize_labels(
        raw_labels, options.label_column, record=notes, source=source, ids=ids
    )
    if types_inferred:
        _refuse_numbers_mixed_with_text(labels, options.label_column, source)
    split_column = options.split_column
    if split_column is not None:
        require_column(columns, split_column, "split column", source)
    elif SPLIT_COLUMN in columns:
        split_column = SPLIT_COLUMN
    split = _read_split_column(frame[split_column], ids, split_column) if split_column else None
    roles = {options.label_column: "the label column"}
    roles |= {id_column: "the id column"} if id_column else {}
    roles |= {split_column: "the split column"} if split_column else {}
    inputs = read_inputs(frame, options, roles, ids, base_dir, source, types_inferred, notes)
    return assemble_dataset(
        ids, labels, split, inputs, test_size=test_size, seed=seed, source=source, notes=notes
    )


def _identifier_column(frame: pd.DataFrame, taken: set[str | None]) -> str | None:
    """The one column named ``id`` (in any case) whose values are all present and distinct: the
    rows' names, as ``example_id`` would be, or None.

    Read as a feature, a row number lets the model learn the label from a row's position
    wherever the table was written class by class, and the audit then trusts labels it should
    doubt. A column of that name with repeated or missing values names no rows and stays an
    input, as does one the user named in another role (`taken`: a feature, say).
    """
    names = [
        c
        for c in frame.columns
        if isinstance(c, str) and c.strip().lower() == "id" and c not in taken
    ]
    if len(names) != 1:
        return None
    values = frame[names[0]]
    if values.isna().any() or not values.is_unique:
        return None
    return names[0]


def _numbers_from_text(labels: pd.Series) -> pd.Series:
    """A text file's label column of numbers written as floats (``3.0``) read as those numbers,
    so that integral ones name the same classes as in a Parquet file of numbers (``"3"``).

    Other texts stay as written: ``"03"`` is the class ``"03"``, as a Parquet string would be.
    """
    text = labels.astype(str).str.strip()
    if (
        labels.isna().any()
        or not text.str.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+[eE][+-]?\d+)").any()
    ):
        return labels
    numbers = pd.to_numeric(text, errors="coerce")
    return numbers if numbers.notna().all() else labels


def _refuse_numbers_mixed_with_text(labels: np.ndarray, column: str, source: str) -> None:
    """Refuse a text file's label column where some labels are numbers and others are not.

    In a CSV both read as text, so ``1`` next to ``cat`` would silently become a class of its own;
    it is far more often a code left among names (or the reverse) than a real class.
    """
    numeric = pd.to_numeric(pd.Series(labels, dtype=object), errors="coerce").notna().to_numpy()
    if numeric.any() and not numeric.all():
        row_num, row_text = int(np.flatnonzero(numeric)[0]), int(np.flatnonzero(~numeric)[0])
        raise DataError(
            f"label column {column!r} in {source} mixes numbers and text: row {row_num} is "
            f"{labels[row_num]!r} but row {row_text} is {labels[row_text]!r}; use one type"
        )


def _read_split_column(column: pd.Series, ids: Sequence[str], name: str) -> np.ndarray:
    missing = column.isna().to_numpy()
    values = column.astype(str).str.strip().str.lower().to_numpy(dtype=object)
    bad = missing | ~np.isin(values, ["train", "test"])
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"column {name!r} holds {column.iloc[row]!r} at row {row} "
            f"(example_id {ids[row]!r}); allowed values are 'train' and 'test'"
        )
    return values
