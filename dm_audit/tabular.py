"""Tabular columns as model inputs: numbers, booleans, categories and dates, encoded.

Users' tables mix column types. Each input column becomes one or more float features:

* numbers: as they are (the trainer standardises every feature by its own spread);
* booleans: 0 / 1;
* dates (a datetime column, or text that is all ISO-8601 dates): days since 1970-01-01;
* a missing number or date: filled from the nearest rows that have one
  (`dm_audit.missing_values`);
* categories (text, categorical or mixed columns whose values repeat): one-hot with
  scikit-learn's `OneHotEncoder`; missing values are a category of their own.

Two limits keep categorical columns useful rather than harmful:

* a column whose values are mostly distinct (more than half the rows) is an identifier or free
  text, not a category: no value repeats enough for a model to learn from it, and a one-hot of
  it would be as wide as the table. In auto-detection it is left out with a warning; named
  explicitly, it is refused.
* a category needs `_MIN_CATEGORY_ROWS` rows to get a column of its own, and a column keeps at
  most `_MAX_CATEGORIES` (the rarest are grouped as "infrequent"): a value seen once can only
  be memorised, and the width stays within a small multiple of the table's column count, so
  memory at a million rows stays bounded.

What each column became is returned for the report (summary.json ``input.inputs``).

Missing numbers and dates are filled, not refused: real tables have gaps, and a row with one is
still a row to audit (`dm_audit.missing_values.fill_gaps`: the mean of the column over the row's
nearest rows that have a value). An infinite value is not a gap but a broken one, and is refused
by column and row (`check_finite`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dm_audit.errors import DataError

__all__ = [
    "MISSING_NUMBER_MARKERS",
    "EncodedColumns",
    "apply_encoding",
    "check_finite",
    "encode_tabular",
    "numbers_with_missing_markers",
]

# A category seen in fewer rows than this goes to the shared "infrequent" column: with one row
# it can only be memorised, and under 2-fold cross-fitting it would sit in one fold only.
_MIN_CATEGORY_ROWS = 2
# At most this many one-hot columns per categorical column (the infrequent ones share one):
# 32 separates the values of typical categorical fields (states, product types, weekdays) while
# keeping a 1M-row table's one-hot block within 128 MB of float32 per column.
_MAX_CATEGORIES = 32
# A column whose distinct values exceed this share of its rows is an identifier or free text.
_ID_LIKE_SHARE = 0.5
_MISSING = "<missing>"
# Cells that mark a missing number in text files beyond the markers pandas already reads as
# missing ("", "NA", "N/A", "NaN", "null", ...): "?" is the UCI repository's convention (its
# breast-cancer, heart-disease, hepatitis and adult tables use it), "." is SAS's and Stata's,
# "-" and "--" are spreadsheets'. Only in an otherwise numeric column are they read as gaps;
# elsewhere they stay what they are (a category, a label).
MISSING_NUMBER_MARKERS = frozenset({"?", ".", "-", "--"})


@dataclass
class EncodedColumns:
    """The encoded feature matrix and what each column became.

    Attributes
    ----------
    matrix : ndarray (N, D) float64
    column_of_feature : list of str, length D
        The table column each feature came from (for messages naming a column).
    inputs : list of dict
        Per used column: ``column``, ``encoding`` and, for one-hot, ``categories``.
    ignored : list of dict
        Per column left out: ``column`` and ``reason``.
    """

    matrix: np.ndarray
    column_of_feature: list[str]
    inputs: list[dict[str, Any]] = field(default_factory=list)
    ignored: list[dict[str, Any]] = field(default_factory=list)


def _is_bool(column: pd.Series) -> bool:
    if pd.api.types.is_bool_dtype(column) and not column.isna().any():
        return True
    if column.dtype == object:
        values = column.dropna()
        return len(values) == len(column) and all(isinstance(v, bool | np.bool_) for v in values)
    return False


def _as_dates(column: pd.Series) -> pd.Series | None:
    """The column as datetimes when it is one, or text that is all ISO-8601 dates."""
    if pd.api.types.is_datetime64_any_dtype(column):
        return column
    if column.dtype != object and not pd.api.types.is_string_dtype(column):
        return None
    values = column.dropna()
    if values.empty or not all(isinstance(v, str) for v in values.head(50)):
        return None
    sample = values.head(50).astype(str)
    # Dates start with a 4-digit year; this keeps codes such as "2" or "10-3" from parsing.
    if not sample.str.fullmatch(r"\d{4}-\d{2}-\d{2}([ T][\d:.]+)?(Z|[+-]\d{2}:?\d{2})?").all():
        return None
    parsed = pd.to_datetime(column, format="ISO8601", errors="coerce", utc=True)
    return parsed if parsed.notna().sum() == column.notna().sum() else None


def numbers_with_missing_markers(column: pd.Series) -> pd.Series | None:
    """A text column of numbers whose other cells only mark gaps, as float numbers with NaN
    there; None when it holds no number, or any text that is not a `MISSING_NUMBER_MARKERS`."""
    present = column.notna()
    numbers = pd.to_numeric(column, errors="coerce")
    odd = present & numbers.isna()
    if not numbers.notna().any() or not odd.any():
        return None
    if not column[odd].astype(str).str.strip().isin(MISSING_NUMBER_MARKERS).all():
        return None
    return numbers.astype(np.float64)


def _text_numbers_share(column: pd.Series) -> float:
    present = column.dropna()
    if present.empty:
        return 0.0
    return float(pd.to_numeric(present, errors="coerce").notna().mean())


def encode_tabular(
    frame: pd.DataFrame,
    names: Sequence[str],
    ids: Sequence[str],
    source: str,
    *,
    strict: bool,
) -> EncodedColumns:
    """Encode the tabular columns `names` of `frame` into float features.

    Parameters
    ----------
    frame : DataFrame, N rows
    names : sequence of str
        Columns to encode, in order.
    ids : sequence of str
        Example ids, for messages naming a row.
    source : str
        The table's name, for messages.
    strict : bool
        The user named these columns: a column that cannot be encoded is refused rather than
        left out.

    Raises
    ------
    DataError
        A named column that is an identifier or free text, or a column of numbers with a text
        value among them (the message names the column, row and example id).
    """
    blocks: list[np.ndarray] = []
    origin: list[str] = []
    out = EncodedColumns(np.empty((len(frame), 0)), [])
    for name in names:
        block, entry = _encode_column(frame[name], name, ids, source, strict=strict)
        if block is None:
            out.ignored.append(entry)
            continue
        blocks.append(block)
        origin += [name] * block.shape[1]
        out.inputs.append(entry)
    if blocks:
        out.matrix = _filled(np.hstack(blocks))
    out.column_of_feature = origin
    return out


def _filled(matrix: np.ndarray) -> np.ndarray:
    """The encoded matrix with its gaps filled (`dm_audit.missing_values.fill_gaps`). A matrix
    holding an infinite value, or one beyond float32, is refused next by `check_finite`: its
    gaps are set to 0 instead, so that the refusal names that value rather than a gap."""
    gaps = np.isnan(matrix)
    if not gaps.any():
        return matrix
    # Beyond float32 a value becomes infinite in the model's input: refused as one.
    if (np.abs(matrix[~gaps]) > np.finfo(np.float32).max).any():
        return np.where(gaps, 0.0, matrix)
    from dm_audit.missing_values import fill_gaps

    return fill_gaps(matrix)


def _encode_column(
    column: pd.Series, name: str, ids: Sequence[str], source: str, *, strict: bool
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """One column's features (N, k) and what it became, or (None, why it was left out)."""
    entry: dict[str, Any] = {"column": name}
    if column.isna().all():
        if strict:
            raise DataError(f"feature column {name!r} of {source} holds no value at all")
        return None, {"column": name, "reason": "empty (no value in any row)"}
    if _is_bool(column):
        block = column.astype(bool).to_numpy(dtype=np.float64)[:, None]
        entry["encoding"] = "boolean (0/1)"
    elif pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        block = _record_gaps(column.to_numpy(dtype=np.float64, na_value=np.nan), entry)
        entry["encoding"] = "numeric"
    elif strict and (with_gaps := numbers_with_missing_markers(column)) is not None:
        # A named feature column of numbers with "?" or "." for its gaps (text files).
        block = _record_gaps(with_gaps.to_numpy(), entry)
        entry["encoding"] = "numeric"
    elif (dates := _as_dates(column)) is not None:
        block = _record_gaps(_days_since_epoch(dates)[:, 0], entry)
        entry["encoding"] = "date (days since 1970-01-01)"
    else:
        if strict and _text_numbers_share(column) >= 0.5:
            parsed = pd.to_numeric(column, errors="coerce")
            bad = (parsed.isna() & column.notna()).to_numpy()
            row = int(np.flatnonzero(bad)[0]) if bad.any() else 0
            raise DataError(
                f"feature column {name!r} is not numeric: row {row} (example_id "
                f"{ids[row]!r}) holds {column.iloc[row]!r}"
            )
        encoded = _one_hot(column, name, source, strict=strict)
        if encoded is None:
            n_distinct = int(column.nunique(dropna=False))
            reason = (
                f"{n_distinct} distinct values in {len(column)} rows: an identifier or free "
                "text, not a category"
            )
            return None, {"column": name, "reason": reason}
        block, categories = encoded
        entry["encoding"] = "one-hot"
        entry["categories"] = categories
    return block, entry


def _one_hot(
    column: pd.Series, name: str, source: str, *, strict: bool
) -> tuple[np.ndarray, list[str]] | None:
    from sklearn.preprocessing import OneHotEncoder

    text = _category_text(column)
    n_distinct = len(set(text))
    if n_distinct > _ID_LIKE_SHARE * len(text):
        if strict:
            raise DataError(
                f"feature column {name!r} of {source} has {n_distinct} distinct values in "
                f"{len(text)} rows: an identifier or free text, not a category; leave it out"
            )
        return None
    encoder = OneHotEncoder(
        handle_unknown="infrequent_if_exist",
        min_frequency=_MIN_CATEGORY_ROWS,
        max_categories=_MAX_CATEGORIES,
        sparse_output=False,
        dtype=np.float64,
    )
    block = encoder.fit_transform(text[:, None])
    categories = [str(c) for c in encoder.get_feature_names_out([name])]
    # Feature names read "<column>_<value>"; the report lists the values.
    values = [c[len(name) + 1 :] for c in categories]
    return block, values


def _record_gaps(values: np.ndarray, entry: dict[str, Any]) -> np.ndarray:
    """A number or date column's values (N,) as one feature (N, 1), gaps left as NaN for
    `encode_tabular` to fill; where there are gaps, their count and the column's median are
    recorded in `entry` (``missing``, ``fill``): the median is what `apply_encoding` fills new
    rows' gaps with."""
    missing = np.isnan(values)
    if missing.any():
        entry["missing"] = int(missing.sum())
        entry["fill"] = float(np.median(values[~missing & np.isfinite(values)]))
    return values[:, None]


def _fill_recorded(values: np.ndarray, gaps: np.ndarray, entry: dict[str, Any]) -> np.ndarray:
    """New rows of a column, (N, 1): the `gaps` (N,) filled with the median recorded for a column
    the table had gaps in (new rows have no table rows near them to read); left as NaN, for
    `check_finite` to refuse, in a column the table had none in. A value that could not be read
    (text in a numeric column) is not a gap and stays NaN either way."""
    if "fill" not in entry:
        return values[:, None]
    return np.where(gaps, entry["fill"], values)[:, None]


def _days_since_epoch(dates: pd.Series) -> np.ndarray:
    """Datetimes as days since 1970-01-01 (UTC for zoned ones), shape (N, 1)."""
    days = (dates - pd.Timestamp(0, tz=dates.dt.tz)).dt.total_seconds() / 86400.0
    return days.to_numpy(dtype=np.float64)[:, None]


def _category_text(column: pd.Series) -> np.ndarray:
    """A categorical column as text, a missing value being a category of its own."""
    return column.astype(object).where(column.notna(), _MISSING).astype(str).to_numpy()


def check_finite(
    matrix: np.ndarray, column_of_feature: Sequence[str], ids: Sequence[str]
) -> np.ndarray:
    """The matrix as float32, refusing a missing or non-finite value by column and row."""
    with np.errstate(over="ignore"):
        matrix32 = matrix.astype(np.float32)
    finite = np.isfinite(matrix32)
    if not finite.all():
        row, col = (int(x) for x in np.argwhere(~finite)[0])
        n_bad = int((~finite[:, col]).sum())
        raise DataError(
            f"feature column {column_of_feature[col]!r} has {n_bad} missing or non-finite "
            f"value(s) (NaN, inf, or beyond float32); the first is {matrix[row, col]} at row "
            f"{row} (example_id {ids[row]!r})"
        )
    return matrix32


def apply_encoding(
    frame: pd.DataFrame, inputs: Sequence[dict[str, Any]], source: str
) -> np.ndarray:
    """Encode new rows the way `encode_tabular` encoded the table it recorded `inputs` for.

    Each column is encoded as recorded: numbers and booleans as they are, dates as days since
    1970 (a gap filled with the median recorded where the table had gaps), one-hot over the
    recorded categories, a value the table never had (or had too rarely)
    going to the ``infrequent`` column when there is one, else to no column (as scikit-learn's
    ``handle_unknown="infrequent_if_exist"`` does).

    Parameters
    ----------
    frame : DataFrame
        New rows holding every recorded column.
    inputs : sequence of dict
        ``EncodedColumns.inputs`` of the table the model was trained on.
    source : str
        The rows' name, for messages.

    Returns
    -------
    ndarray (N, D) float32

    Raises
    ------
    DataError
        A recorded column is missing, or a value cannot be encoded (text in a numeric column,
        a gap in a column that had none in the table), naming the column and the row.
    """
    missing = [e["column"] for e in inputs if e["column"] not in frame.columns]
    if missing:
        raise DataError(f"{source} lacks the input column(s) {missing} the audit was trained on")
    blocks: list[np.ndarray] = []
    origin: list[str] = []
    for entry in inputs:
        name, encoding = entry["column"], entry["encoding"]
        column = frame[name]
        if encoding == "numeric":
            values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
            gaps = column.isna().to_numpy()
            if not pd.api.types.is_numeric_dtype(column):
                # "?" or "." where a text file had no number: a gap, as in the table.
                gaps = gaps | column.astype(str).str.strip().isin(MISSING_NUMBER_MARKERS).to_numpy()
            block = _fill_recorded(values, gaps, entry)
        elif encoding.startswith("boolean"):
            block = column.astype(bool).to_numpy(dtype=np.float64)[:, None]
        elif encoding.startswith("date"):
            dates = pd.to_datetime(column, format="ISO8601", errors="coerce", utc=True)
            block = _fill_recorded(_days_since_epoch(dates)[:, 0], column.isna().to_numpy(), entry)
        else:
            block = _one_hot_known(column, entry["categories"])
        blocks.append(block)
        origin += [name] * block.shape[1]
    matrix = np.hstack(blocks) if blocks else np.empty((len(frame), 0))
    return check_finite(matrix, origin, [str(i) for i in frame.index])


# scikit-learn names the shared column of rare categories "<column>_infrequent_sklearn".
_INFREQUENT = "infrequent_sklearn"


def _one_hot_known(column: pd.Series, categories: Sequence[str]) -> np.ndarray:
    text = _category_text(column)
    known = [c for c in categories if c != _INFREQUENT]
    block = np.stack([text == c for c in known], axis=1).astype(np.float64)
    if _INFREQUENT in categories:
        rare = ~np.isin(text, known)
        block = np.insert(block, list(categories).index(_INFREQUENT), rare, axis=1)
    return block
