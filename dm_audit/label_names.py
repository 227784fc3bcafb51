"""Class names: how a label column is read, spelled and sorted.

Labels read from files are normalised by `normalize_labels`: strings are kept verbatim (in their
`canonical_label` spelling), integers become their decimal text (``3 -> "3"``), floats that are
integral become the integer's text (``3.0 -> "3"``, so a label column read as float because of
the file format still matches an integer one), and non-integral floats or a mix of strings and
numbers are refused (in a CSV, where everything reads as text, `dm_audit.sources` refuses labels
that are partly numbers). The same rules read example ids (``what="id"``).

Class names that differ only in surrounding spaces, invisible characters or Unicode form are one
class (`canonical_label`, `label_spellings`); names that are the same number written differently
(``"03"`` and ``"3"``) are kept apart with a warning (`numeric_label_spellings`). `sort_classes`
orders names numeric-aware, which fixes the integer code of each class.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from dm_audit.errors import DataError

# The warnings are about a dataset's labels: they keep the dataset's logger name.
log = logging.getLogger("dm_audit.dataset")


def _natural_key(name: str) -> tuple:
    """Sort key: integers by value first, then other names with digit runs compared as numbers."""
    if re.fullmatch(r"[+-]?\d+", name):
        return (0, int(name), name)
    chunks = re.split(r"(\d+)", name)
    # (kind, value) pairs never compare an int with a str: equal kinds hold equal types.
    return (1, tuple((0, int(c)) if c.isdigit() else (1, c) for c in chunks if c), name)


def sort_classes(names: Iterable[str]) -> list[str]:
    """Sort class names deterministically and numeric-aware.

    Pure integers come first, ordered by value (``"2" < "10"``); other names follow in natural
    order (``"cat2" < "cat10"``).

    Parameters
    ----------
    names : iterable of str
        Class names; duplicates are removed.

    Returns
    -------
    list of str
        The distinct names in sorted order.
    """
    return sorted(set(names), key=_natural_key)


def _value_kind(value: object) -> str:
    if isinstance(value, str):
        return "str"
    if isinstance(value, bool | np.bool_):
        return "bool"
    if isinstance(value, int | np.integer):
        return "int"
    if isinstance(value, float | np.floating):
        return "float"
    return type(value).__name__


def describe_row(row: int, ids: Sequence[str] | None) -> str:
    """``row 3 (example_id 'a')`` for messages, or ``row 3`` when the ids are not known."""
    if ids is not None and row < len(ids):
        return f"row {row} (example_id {ids[row]!r})"
    return f"row {row}"


def _number_to_name(value: object, column: str, row: int, what: str) -> str:
    """Text of an integral number; non-integral and non-finite numbers are refused."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    number = float(value)  # type: ignore[arg-type]
    if not np.isfinite(number) or number != np.floor(number):
        raise DataError(
            f"{what} column {column!r} holds the non-integral number {number!r} at row {row}; "
            f"{what}s must be names or integers (e.g. 3 or 3.0)"
        )
    return str(int(number))


def canonical_label(name: str) -> str:
    """The spelling a class name is kept under: surrounding spaces and invisible characters
    removed, Unicode NFC.

    ``" cat"``, ``"cat "`` and ``"cat"`` (or ``"café"`` typed as ``e`` + combining accent and as
    one ``é``) look the same to a person and are one class; reviews are read the same way, so
    every class can be reviewed.
    """
    return _strip_invisible(unicodedata.normalize("NFC", name))


def _strip_invisible(text: str) -> str:
    """Remove whitespace and invisible format characters (zero-width space, BOM, ...) at both
    ends: they make two names look the same on screen."""
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start]) == "Cf"):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1]) == "Cf"):
        end -= 1
    return text[start:end]


def label_spellings(names: np.ndarray) -> list[dict[str, Any]]:
    """Classes that were written several ways in `names` (see `canonical_label`).

    Returns
    -------
    list of dict
        ``{"class": canonical name, "spellings": {spelling: rows}}`` for every class written in
        more than one way, in class order.
    """
    counts = pd.Series(names, dtype=object).value_counts(sort=False)
    by_class: dict[str, dict[str, int]] = {}
    for spelling, n in counts.items():
        by_class.setdefault(canonical_label(str(spelling)), {})[str(spelling)] = int(n)
    return [
        {"class": name, "spellings": dict(sorted(spellings.items()))}
        for name, spellings in sorted(by_class.items())
        if len(spellings) > 1 or next(iter(spellings)) != name
    ]


def numeric_label_spellings(names: Sequence[str]) -> list[list[str]]:
    """Groups of distinct class names that are the same number (``"03"`` and ``"3"``)."""
    groups: dict[float, set[str]] = {}
    for name in set(names):
        try:
            number = float(name)
        except ValueError:
            continue
        if np.isfinite(number):
            groups.setdefault(number, set()).add(name)
    return [sorted(g, key=_natural_key) for _, g in sorted(groups.items()) if len(g) > 1]


def normalize_labels(
    values: pd.Series | Sequence[object] | np.ndarray,
    column: str = "label",
    *,
    what: str = "label",
    record: dict[str, Any] | None = None,
    source: str = "",
    ids: Sequence[str] | None = None,
) -> np.ndarray:
    """Turn a column of labels (or ids) into class-name strings.

    Strings are kept verbatim (labels: in their `canonical_label` spelling, with a warning
    naming the spellings merged); integers become their decimal text; integral floats become
    the integer's text (``3.0 -> "3"``); booleans become ``"True"``/``"False"``.

    Parameters
    ----------
    values : pandas.Series or sequence, shape (N,)
        Raw values as read from a file.
    column : str
        Column name, used in error messages.
    what : str
        What the values are ("label" or "id"), used in error messages.
    record : dict, optional
        Receives ``label_spellings`` (classes written several ways, merged) and
        ``numeric_label_spellings`` (classes that are the same number, kept apart), for the
        report's summary.
    source : str
        The file the values come from, for messages.
    ids : sequence of str, optional
        Example ids, for messages naming a row.

    Returns
    -------
    numpy.ndarray of object, shape (N,)
        Python strings.

    Raises
    ------
    DataError
        On a missing or blank value, a non-integral float, or a mix of strings and numbers; the
        message names the column and the first offending row.
    """
    series = pd.Series(values).reset_index(drop=True)
    missing = series.isna().to_numpy()
    of = f" of {source}" if source else ""
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise DataError(
            f"{what} column {column!r}{of} has {int(missing.sum())} missing value(s), "
            f"the first at {describe_row(row, ids)}"
        )
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        names = np.array([str(bool(v)) for v in series], dtype=object)
    elif pd.api.types.is_integer_dtype(dtype):
        names = series.astype(str).to_numpy(dtype=object)
    elif pd.api.types.is_float_dtype(dtype):
        names = _float_names(series.to_numpy(dtype=np.float64), column, what)
    elif isinstance(dtype, pd.StringDtype):
        names = series.to_numpy(dtype=object)
    else:
        names = _object_names(series.to_numpy(dtype=object), column, what)
    blank = pd.Series(names, dtype=object).str.strip().eq("").to_numpy()
    if blank.any():
        row = int(np.flatnonzero(blank)[0])
        raise DataError(
            f"{what} column {column!r}{of} has a blank value at {describe_row(row, ids)}"
        )
    if what == "label":
        names = _canonical_spelling(names, column, {} if record is None else record)
    return names


def _canonical_spelling(names: np.ndarray, column: str, record: dict[str, Any]) -> np.ndarray:
    merged = label_spellings(names)
    for entry in merged:
        # ascii(): spellings that differ only in invisible ways (NFD vs NFC) print differently.
        shown = ", ".join(f"{s!a} ({n} rows)" for s, n in entry["spellings"].items())
        log.warning(
            "label column %r: %s are read as the one class %r (surrounding spaces, invisible "
            "characters and Unicode form are not part of a class name)",
            column,
            shown,
            entry["class"],
        )
    if merged:
        names = np.array([canonical_label(n) for n in names], dtype=object)
    numeric = numeric_label_spellings(names)
    record.update(label_spellings=merged, numeric_label_spellings=numeric)
    for group in numeric:
        log.warning(
            "label column %r: the classes %s are the same number written differently; they are "
            "kept apart (fix the labels if they are one class)",
            column,
            " and ".join(repr(g) for g in group),
        )
    return names


def _float_names(values: np.ndarray, column: str, what: str) -> np.ndarray:
    integral = np.isfinite(values) & (values == np.floor(values))
    if not integral.all():
        row = int(np.flatnonzero(~integral)[0])
        _number_to_name(values[row], column, row, what)  # raises with the message
    return np.array([str(int(v)) for v in values], dtype=object)


def _object_names(raw: np.ndarray, column: str, what: str) -> np.ndarray:
    """Names from a column of Python objects, refusing mixed or unsupported types."""
    kinds = [_value_kind(v) for v in raw]
    distinct = set(kinds)
    unsupported = distinct - {"str", "bool", "int", "float"}
    if unsupported:
        row = next(i for i, k in enumerate(kinds) if k in unsupported)
        raise DataError(
            f"{what} column {column!r} holds a value of type {kinds[row]} at row {row} "
            f"({raw[row]!r}); {what}s must be strings or integers"
        )
    if "str" in distinct and len(distinct) > 1:
        row_num = next(i for i, k in enumerate(kinds) if k != "str")
        row_str = kinds.index("str")
        raise DataError(
            f"{what} column {column!r} mixes text and numbers: row {row_str} is "
            f"{raw[row_str]!r} but row {row_num} is {raw[row_num]!r}; use one type"
        )
    if "bool" in distinct and len(distinct) > 1:
        row = kinds.index("bool")
        raise DataError(
            f"{what} column {column!r} mixes booleans and other values (row {row} is "
            f"{raw[row]!r}); use one type"
        )
    if distinct == {"str"}:
        return raw
    return np.array([_number_to_name(v, column, i, what) for i, v in enumerate(raw)], dtype=object)
