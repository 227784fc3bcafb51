"""Table files: which files are tables, how a CSV's dialect is found, and `TableOptions`.

A table is a Parquet, CSV or TSV file (CSV/TSV also compressed). `read_table` reads ids and
labels of a CSV as text (``"007"`` stays ``"007"``, as in a Parquet file of strings), detects
the delimiter among ``, ; tab |`` and the decimal comma of many locales. `TableOptions` names
the columns the rest of the ingest reads; `require_column` refuses a name that is not there,
suggesting the closest one.
"""

from __future__ import annotations

import csv
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dm_audit.errors import DataError

TABLE_SUFFIXES: dict[str, str] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
}
#: Compressions a CSV or TSV may have (pandas decompresses them while reading).
COMPRESSION_SUFFIXES: frozenset[str] = frozenset({".gz", ".bz2", ".xz", ".zip"})
# Delimiters a CSV is sniffed for, most common first.
_DELIMITERS = ",;\t|"
#: The id column read when the options name none.
ID_COLUMN = "example_id"


@dataclass(frozen=True)
class TableOptions:
    """How to read a table source.

    Attributes
    ----------
    label_column : str
        Column holding the given labels.
    id_column : str or None
        Column holding example ids; default ``example_id`` when the table has one, else a column
        named ``id`` (any case) whose values are all present and distinct, else ids
        ``row-000000``, ... derived from the row number.
    feature_columns : sequence of str or None
        Numeric feature columns, or the one list/embedding column; default: detected.
    image_column : str or None
        Column of image bytes or image paths; default: detected.
    image_root : path or None
        Folder that image paths are relative to; default: the table's folder.
    split_column : str or None
        Column of ``train``/``test`` values annotating each row (every row is audited either
        way); default ``split`` when the table has one.
    """

    label_column: str = "label"
    id_column: str | None = None
    feature_columns: Sequence[str] | None = None
    image_column: str | None = None
    image_root: Path | None = None
    split_column: str | None = None


def did_you_mean(name: str, columns: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` naming the column closest to `name`, or ``""``."""
    lowered = {c.lower(): c for c in columns}
    if name.lower() in lowered:
        return f"; did you mean {lowered[name.lower()]!r}?"
    close = difflib.get_close_matches(name, list(columns), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def require_column(columns: Sequence[str], name: str, what: str, where: str) -> None:
    """Raise a `DataError` naming the closest column when ``name`` is not among ``columns``.

    Parameters
    ----------
    columns : sequence of str
        The table's columns.
    name : str
        The column asked for.
    what : str
        Its role ("label column", ...), for the message.
    where : str
        The table's file name, for the message.
    """
    if name not in columns:
        raise DataError(
            f"{what} {name!r} not found in {where}{did_you_mean(name, columns)} "
            f"(columns: {list(columns)})"
        )


def table_kind(path: Path) -> str | None:
    """``"parquet"``, ``"csv"`` or ``"tsv"`` from a file name (``t.csv.gz`` is a CSV); None if
    the name is not a table's."""
    suffixes = [x.lower() for x in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSION_SUFFIXES:
        kind = TABLE_SUFFIXES.get(suffixes[-2])
        return kind if kind in ("csv", "tsv") else None
    return TABLE_SUFFIXES.get(suffixes[-1]) if suffixes else None


def _sniff_delimiter(path: Path) -> str:
    """The delimiter of a CSV: the one of ``, ; tab |`` that splits its header line into the most
    columns and every sampled line into as many (a ``;``-separated CSV read with ``,`` would
    show one column, and the label column would seem missing)."""
    raw = pd.read_csv(
        path,
        sep="\x1f",
        header=None,
        nrows=20,
        dtype=str,
        engine="python",
        quoting=csv.QUOTE_NONE,
        skip_blank_lines=True,
    )
    lines = [str(v) for v in raw.iloc[:, 0].tolist() if isinstance(v, str)]
    if not lines:
        return ","
    best, best_width = ",", 1
    for delimiter in _DELIMITERS:
        # csv.reader honours quotes: "a, b" is one field whatever the delimiter.
        widths = {len(row) for row in csv.reader(lines, delimiter=delimiter)}
        if len(widths) == 1 and (width := widths.pop()) > best_width:
            best, best_width = delimiter, width
    return best


_DECIMAL_COMMA = re.compile(r"[+-]?\d+(,\d+)?")


def _decimal_commas(frame: pd.DataFrame, text_columns: Sequence[str]) -> bool:
    """Whether some text column holds only numbers written with a decimal comma."""
    for name in frame.columns:
        column = frame[name]
        if name in text_columns or not (
            column.dtype == object or pd.api.types.is_string_dtype(column)
        ):
            continue
        values = frame[name].dropna().astype(str).str.strip()
        if (
            len(values)
            and values.str.contains(",", regex=False).any()
            and values.str.fullmatch(_DECIMAL_COMMA.pattern).all()
        ):
            return True
    return False


def read_table(path: Path, options: TableOptions) -> pd.DataFrame:
    """Read a Parquet, CSV or TSV file (CSV/TSV possibly compressed), ids and labels as text.

    Parameters
    ----------
    path : pathlib.Path
        The file.
    options : TableOptions
        Used to read the id and label columns of a CSV as text (``"007"`` stays ``"007"``, as
        in a Parquet file of strings).

    Returns
    -------
    pandas.DataFrame
    """
    kind = table_kind(path)
    if kind is None:
        raise DataError(
            f"cannot read {path}: unknown table format {''.join(path.suffixes[-2:])!r} "
            f"(use one of {sorted(TABLE_SUFFIXES)}, CSV/TSV compressed with "
            f"{sorted(COMPRESSION_SUFFIXES)}, or an image folder)"
        )
    try:
        if kind == "parquet":
            frame = pd.read_parquet(path)
        else:
            sep = "\t" if kind == "tsv" else _sniff_delimiter(path)
            header = pd.read_csv(path, sep=sep, nrows=0).columns
            text = [options.id_column or ID_COLUMN, options.label_column]
            frame = pd.read_csv(path, sep=sep, dtype={c: str for c in text if c in header})
            if sep != "," and _decimal_commas(frame, text):
                # "1,5" under a ";" or tab delimiter: the decimal comma of many locales.
                frame = pd.read_csv(
                    path, sep=sep, decimal=",", dtype={c: str for c in text if c in header}
                )
            if len(frame.columns) == 1 and any(d in str(frame.columns[0]) for d in ";|\t"):
                raise DataError(
                    f"{path} reads as one column {str(frame.columns[0])[:80]!r}: no delimiter "
                    f"among {[*_DELIMITERS]!r} splits its lines into the same number of fields"
                )
    except (OSError, ValueError, ImportError, EOFError) as exc:
        raise DataError(f"cannot read the table {path}: {exc}") from exc
    frame.columns = [str(c) for c in frame.columns]
    return frame
