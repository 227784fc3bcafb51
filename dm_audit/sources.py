"""Ingest data sources into the canonical `AuditDataset` table.

Supported sources (``spec`` of `load_source`):

* ``"digits"``: scikit-learn's 8x8 digits (1,797 examples, 64 features scaled to [0, 1]), the
  built-in default.
* a ``.parquet``, ``.csv`` or ``.tsv`` table (CSV/TSV also compressed: ``.gz``, ``.bz2``,
  ``.xz``, ``.zip``; a CSV's delimiter is detected) with a label column and an input: tabular
  columns (numbers, booleans, categories or text with repeated values, ISO dates; encoded by
  `encode_tabular`), one list/embedding column (in CSV a text like ``"[0.1, 0.2]"``), an
  image-bytes column (raw bytes, or ``{"bytes": ...}`` structs as Hugging Face datasets write
  them), or an image-path column (paths relative to ``image_root``, else to the table's folder).
  A Parquet file written by `AuditDataset.to_parquet` is read back as is.
* an image folder: one sub-folder per class (``root/<class>/<file>``), or ``root/train/<class>``
  and ``root/test/<class>`` to fix the split.
* torchvision datasets from a local root: ``"cifar10:ROOT"``, ``"cifar100:ROOT"``,
  ``"mnist:ROOT"``, ``"fashionmnist:ROOT"`` (fetched only when ``download=True``); their
  official train/test split is kept.

Source files are only ever read. Tables and folders without a split get a stratified split
(`stratified_split`); a table's ``split`` column (values ``train``/``test``) is honoured.
"""

from __future__ import annotations

import csv
import difflib
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dm_audit.dataset import (
    AuditDataset,
    check_feature_vectors,
    default_ids,
    encode_png,
    is_dataset_file,
    normalize_labels,
    sort_classes,
    to_png,
)
from dm_audit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: File suffixes read as images (image folders, and sniffing image-path columns).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
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
# Columns of the canonical table that a user's table may carry (e.g. exported from a report):
# never inputs, since the truth read as a feature would make every audit perfect.
_CANONICAL_NON_INPUTS = frozenset({"true_label", "noise"})
SPLIT_COLUMN = "split"
ID_COLUMN = "example_id"
# How many values are inspected to guess what a column holds.
_SNIFF_ROWS = 50


@dataclass(frozen=True)
class TableOptions:
    """How to read a table source.

    Attributes
    ----------
    label_column : str
        Column holding the given labels.
    id_column : str or None
        Column holding example ids; default ``example_id`` when the table has one, else ids
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


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load_source(
    spec: str,
    *,
    label_column: str = "label",
    id_column: str | None = None,
    feature_columns: str | Sequence[str] | None = None,
    image_column: str | None = None,
    image_root: str | os.PathLike[str] | None = None,
    test_size: float = 0.0,
    seed: int = 0,
    download: bool = False,
    split_column: str | None = None,
) -> AuditDataset:
    """Load a data source into the canonical table.

    Parameters
    ----------
    spec : str
        ``"digits"``, a path to a ``.parquet``/``.csv``/``.tsv`` table, an image folder, or
        ``"cifar10:ROOT"``, ``"cifar100:ROOT"``, ``"mnist:ROOT"``, ``"fashionmnist:ROOT"``.
    label_column : str
        Label column of a table.
    id_column : str, optional
        Id column of a table (see `TableOptions`).
    feature_columns : str or sequence of str, optional
        Numeric feature columns of a table, or the name of its one list/embedding column.
    image_column : str, optional
        Image-bytes or image-path column of a table.
    image_root : path-like, optional
        Folder that image paths are relative to (default: the table's folder); paths that leave
        it are refused.
    test_size : float
        Fraction of each class marked ``test``, in [0, 1); 0 (the default) marks every row
        ``train``. The audit covers every row either way; the split annotates its report.
        Ignored when the source fixes the split (a split column, a train/test folder layout, a
        torchvision dataset, a saved dataset file).
    seed : int
        Seed of the split.
    download : bool
        Let torchvision fetch a missing dataset.
    split_column : str, optional
        Table column of ``train``/``test`` values (default: ``split`` when present).

    Returns
    -------
    AuditDataset
        Validated, with the ``split`` column filled.

    Raises
    ------
    DataError
        When the source is missing or its contents are unusable (the message names the file,
        column, row or label).
    ConfigError
        When the options are invalid or do not apply to this kind of source.
    """
    if not 0.0 <= test_size < 1.0:
        raise ConfigError(f"test_size must be in [0, 1), got {test_size}")
    if isinstance(feature_columns, str):
        feature_columns = [feature_columns]
    options = TableOptions(
        label_column=label_column,
        id_column=id_column,
        feature_columns=list(feature_columns) if feature_columns is not None else None,
        image_column=image_column,
        image_root=Path(image_root).expanduser() if image_root is not None else None,
        split_column=split_column,
    )
    prefix, sep, rest = spec.partition(":")
    if sep and prefix.lower() in TORCHVISION_SOURCES:
        _refuse_table_options(options, spec)
        return load_torchvision(prefix.lower(), rest, download=download)
    if spec == "digits":
        _refuse_table_options(options, spec)
        return load_digits(test_size=test_size, seed=seed)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"no data source {spec!r}: no such file or folder{_suggest_spec(spec)}")
    if path.is_dir():
        _refuse_table_options(options, spec)
        return load_image_folder(path, test_size=test_size, seed=seed)
    if path.suffix.lower() in (".parquet", ".pq") and is_dataset_file(path):
        _refuse_table_options(options, spec)
        return AuditDataset.from_parquet(path)
    frame = read_table(path, options)
    return table_to_dataset(
        frame,
        options,
        base_dir=path.parent,
        test_size=test_size,
        seed=seed,
        source=str(path),
        types_inferred=table_kind(path) != "parquet",
    )


def _refuse_table_options(options: TableOptions, spec: str) -> None:
    given = [
        name
        for name, value, default in (
            ("label_column", options.label_column, "label"),
            ("id_column", options.id_column, None),
            ("feature_columns", options.feature_columns, None),
            ("image_column", options.image_column, None),
            ("image_root", options.image_root, None),
            ("split_column", options.split_column, None),
        )
        if value != default
    ]
    if given:
        raise ConfigError(f"{', '.join(given)} only apply to table sources, not to {spec!r}")


def _suggest_spec(spec: str) -> str:
    candidates = ["digits", *(f"{name}:" for name in TORCHVISION_SOURCES)]
    parent = Path(spec).expanduser().parent
    if parent.is_dir():
        candidates += [
            str(parent / p.name) if str(parent) != "." else p.name for p in parent.iterdir()
        ]
    close = difflib.get_close_matches(spec, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def stratified_split(labels: Sequence[str] | np.ndarray, test_size: float, seed: int) -> np.ndarray:
    """Assign each example to train or test, class by class.

    Each class with n examples puts ``round(test_size * n)`` of them (at most n - 1, so that
    every class keeps a training example) into test, chosen at random.

    Parameters
    ----------
    labels : array, shape (N,)
        Class of each example (names or codes).
    test_size : float
        Fraction in [0, 1).
    seed : int
        Seed of the random choice.

    Returns
    -------
    numpy.ndarray of object, shape (N,)
        ``"train"`` or ``"test"``.
    """
    labels = np.asarray(labels)
    split = np.full(len(labels), "train", dtype=object)
    if test_size <= 0 or len(labels) == 0:
        return split
    rng = np.random.default_rng(seed)
    for name in sort_classes(str(x) for x in np.unique(labels)):
        members = np.flatnonzero(labels.astype(str) == name)
        n_test = min(int(np.floor(test_size * len(members) + 0.5)), len(members) - 1)
        split[rng.permutation(members)[:n_test]] = "test"
    return split


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


def _finish(
    ids: Sequence[str],
    labels: np.ndarray,
    split: np.ndarray | None,
    inputs: tuple[str, list],
    *,
    test_size: float,
    seed: int,
    source: str,
    classes: Sequence[str] | None = None,
    notes: dict[str, Any] | None = None,
) -> AuditDataset:
    """Assemble, split and validate a canonical dataset."""
    if len(labels) == 0:
        raise DataError(f"data source {source!r} holds no examples")
    kind, values = inputs
    if split is None:
        split = stratified_split(labels, test_size, seed)
    table = pd.DataFrame({"example_id": list(ids), "label": labels, "split": split})
    table[kind] = values
    dataset = AuditDataset(
        table=table,
        classes=list(classes) if classes is not None else sort_classes(labels),
        input_kind=kind,
        source=source,
        notes=dict(notes or {}),
    ).validate()
    if not (table["split"] == "train").any():
        raise DataError(f"data source {source!r} has no example in the train split")
    return dataset


# --------------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------------


def load_digits(*, test_size: float = 0.0, seed: int = 0) -> AuditDataset:
    """scikit-learn's digits as feature vectors.

    Parameters
    ----------
    test_size, seed
        See `stratified_split`.

    Returns
    -------
    AuditDataset
        1,797 examples, ids ``digits-00000``..., classes ``"0"``..``"9"``, features float32
        (N, 64) in [0, 1] (pixel intensities divided by 16).
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    features = (bunch.data / 16.0).astype(np.float32)
    labels = np.array([str(int(t)) for t in bunch.target], dtype=object)
    ids = [f"digits-{i:05d}" for i in range(len(labels))]
    return _finish(
        ids,
        labels,
        None,
        ("features", list(features)),
        test_size=test_size,
        seed=seed,
        source="digits (scikit-learn)",
    )


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _closest(name: str, columns: Sequence[str]) -> str:
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
            f"{what} {name!r} not found in {where}{_closest(name, columns)} "
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
            f"label column 'label' not found in {source}{_closest('label', columns)}; name "
            f"yours with --label-column (label_column from Python) (columns: {columns})"
        )
    require_column(columns, options.label_column, "label column", source)
    frame = frame.reset_index(drop=True)
    id_column = options.id_column
    if id_column is not None:
        require_column(columns, id_column, "id column", source)
    elif ID_COLUMN in columns:
        id_column = ID_COLUMN
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
    inputs = _read_inputs(frame, options, roles, ids, base_dir, source, types_inferred, notes)
    return _finish(
        ids, labels, split, inputs, test_size=test_size, seed=seed, source=source, notes=notes
    )


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


# -- input columns ---------------------------------------------------------------------------


def _non_null(column: pd.Series) -> list[object]:
    return [v for v in column.head(_SNIFF_ROWS * 4).tolist() if not _is_null(v)][:_SNIFF_ROWS]


def _is_null(value: object) -> bool:
    if isinstance(value, np.ndarray | list | tuple | bytes | bytearray):
        return False
    return bool(pd.isna(value))


def _is_numeric(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _sniff(column: pd.Series) -> str | None:
    """What a non-numeric column holds: "list", "bytes", "path" or None."""
    values = _non_null(column)
    if not values:
        return None
    if all(_image_payload(v) is not None for v in values):
        return "bytes"
    if all(isinstance(v, np.ndarray | list | tuple) for v in values):
        return "list"
    if all(isinstance(v, str) for v in values):
        texts = [v.strip() for v in values]  # type: ignore[union-attr]
        if all(t.startswith(("[", "(")) for t in texts):
            return "list"
        if all(Path(t).suffix.lower() in IMAGE_EXTENSIONS for t in texts):
            return "path"
    return None


def _image_payload(value: object) -> bytes | None:
    """Encoded image bytes held by a cell: raw bytes, or a ``{"bytes": ...}`` struct as written
    by Hugging Face datasets."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes | bytearray):
        return bytes(value["bytes"])
    return None


def _check_text_numbers(frame: pd.DataFrame, names: Sequence[str], source: str) -> None:
    """A text column of mostly numbers is a numeric column with a typo: say so."""
    for name in names:
        column = frame[name]
        if not pd.api.types.is_string_dtype(column) and column.dtype != object:
            continue
        present = column.notna().to_numpy()
        parsed = pd.to_numeric(column, errors="coerce").notna().to_numpy()
        n_present = int(present.sum())
        if n_present and 0.5 <= parsed[present].mean() < 1.0:
            row = int(np.flatnonzero(present & ~parsed)[0])
            raise DataError(
                f"column {name!r} of {source} looks numeric but row {row} holds "
                f"{column.iloc[row]!r}; fix the value, or choose the inputs with --features "
                "(feature_columns from Python)"
            )


def _refuse_role(name: str, roles: dict[str, str], what: str) -> None:
    if name in roles:
        why = (
            "a label read as a feature makes every prediction trivially right"
            if roles[name] == "the label column"
            else "it names or assigns rows, it does not describe them"
        )
        raise ConfigError(f"{what} {name!r} is {roles[name]}: it cannot also be an input ({why})")


def _read_inputs(
    frame: pd.DataFrame,
    options: TableOptions,
    roles: dict[str, str],
    ids: Sequence[str],
    base_dir: Path | None,
    source: str,
    types_inferred: bool,
    notes: dict[str, Any],
) -> tuple[str, list]:
    """Pick and read the input column(s): ("features", vectors) or ("image", PNG bytes).

    `roles` maps the label, id and split columns to what they are: never inputs. What was
    chosen, and how each column was encoded, goes into `notes`.
    """
    columns = list(frame.columns)
    if options.feature_columns is not None and options.image_column is not None:
        raise ConfigError("give feature_columns or image_column, not both")
    if options.feature_columns is not None:
        names = list(options.feature_columns)
        if not names:
            raise ConfigError("feature_columns is empty")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"feature column(s) {repeated} named more than once")
        for name in names:
            require_column(columns, name, "feature column", source)
            _refuse_role(name, roles, "feature column")
        if len(names) == 1 and _sniff(frame[names[0]]) == "list":
            notes["inputs"] = [{"column": names[0], "encoding": "vector"}]
            return "features", _read_vector_column(frame[names[0]], names[0], ids)
        return "features", read_tabular(frame, names, ids, source, notes, strict=True)
    if options.image_column is not None:
        require_column(columns, options.image_column, "image column", source)
        _refuse_role(options.image_column, roles, "image column")
        kind = _sniff(frame[options.image_column])
        if kind not in ("bytes", "path"):
            raise DataError(
                f"image column {options.image_column!r} of {source} holds neither image bytes "
                "nor image file paths"
            )
        notes["inputs"] = [{"column": options.image_column, "encoding": f"image {kind}"}]
        return _read_image_column(frame, options.image_column, kind, options, ids, base_dir)

    candidates = [c for c in columns if c not in roles and c not in _CANONICAL_NON_INPUTS]
    ignored = [
        {"column": c, "reason": "a dm-audit truth column, never an input"}
        for c in columns
        if c in _CANONICAL_NON_INPUTS and c not in roles
    ]
    numeric = [c for c in candidates if _is_numeric(frame[c])]
    if types_inferred:
        _check_text_numbers(frame, [c for c in candidates if c not in numeric], source)
    sniffed = {c: _sniff(frame[c]) for c in candidates if c not in numeric}
    found = [(kind, c) for c, kind in sniffed.items() if kind is not None]
    tabular = [c for c in candidates if c in numeric or sniffed.get(c) is None]
    if found and not numeric:
        # Text, boolean or date columns next to an embedding or image column are metadata
        # (notes, file names, dates taken), as before tables had categorical inputs.
        ignored += [
            {"column": c, "reason": f"metadata next to the {found[0][0]} column {found[0][1]!r}"}
            for c in tabular
        ]
        tabular = []
    choices = ([("tabular", tabular)] if tabular else []) + found
    if len(choices) != 1:
        described = [f"tabular columns {tabular}"] if tabular else []
        described += [f"{kind} column {c!r}" for kind, c in found]
        problem = (
            f"several possible inputs ({'; '.join(described)})"
            if choices
            else "no input column (numeric or categorical features, a list/embedding column, "
            "image bytes or image paths)"
        )
        raise DataError(
            f"{source} has {problem}; choose with --features or --image-column "
            f"(feature_columns or image_column from Python; columns: {columns})"
        )
    kind, chosen = choices[0]
    if ignored:
        notes["ignored_columns"] = ignored
    if kind == "tabular":
        return "features", read_tabular(frame, chosen, ids, source, notes, strict=False)  # type: ignore[arg-type]
    notes["inputs"] = [
        {"column": chosen, "encoding": "vector" if kind == "list" else f"image {kind}"}
    ]
    if kind == "list":
        return "features", _read_vector_column(frame[chosen], chosen, ids)  # type: ignore[arg-type]
    return _read_image_column(frame, chosen, kind, options, ids, base_dir)  # type: ignore[arg-type]


def read_tabular(
    frame: pd.DataFrame,
    names: Sequence[str],
    ids: Sequence[str],
    source: str,
    notes: dict[str, Any],
    *,
    strict: bool,
) -> list:
    """Encode tabular columns (see `encode_tabular`) into one float32 vector per row.

    With `strict` (columns the user named) a column that cannot be encoded is refused; in
    auto-detection it is left out, with a warning and a record in `notes`.
    """
    from dm_audit.tabular import encode_tabular

    encoded = encode_tabular(frame, names, ids, source, strict=strict)
    notes["inputs"] = encoded.inputs
    if encoded.ignored:
        notes.setdefault("ignored_columns", []).extend(encoded.ignored)
        for entry in encoded.ignored:
            log.warning("%s: column %r left out: %s", source, entry["column"], entry["reason"])
    if encoded.matrix.shape[1] == 0:
        raise DataError(
            f"{source} has no usable input column: "
            + "; ".join(f"{e['column']!r} {e['reason']}" for e in encoded.ignored)
        )
    return _finite_rows(encoded.matrix, encoded.column_of_feature, ids)


def _finite_rows(matrix: np.ndarray, column_of_feature: Sequence[str], ids: Sequence[str]) -> list:
    """One float32 vector per row, refusing a missing or non-finite value by column and row."""
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
    return list(matrix32)


_VECTOR_SPLIT = re.compile(r"[,;\s]+")


def parse_vector(text: str) -> np.ndarray:
    """Parse a vector written as text: ``"[0.1, 0.2]"``, ``"(1 2 3)"`` or ``"0.1;0.2"``.

    Parameters
    ----------
    text : str
        Numbers separated by commas, semicolons or spaces, optionally in brackets.

    Returns
    -------
    numpy.ndarray of float64, shape (D,)

    Raises
    ------
    ValueError
        If a token is not a number.
    """
    body = text.strip()
    if body[:1] in "[(" and body[-1:] in "])":
        body = body[1:-1]
    tokens = [t for t in _VECTOR_SPLIT.split(body) if t]
    return np.array([float(t) for t in tokens], dtype=np.float64)


def _read_vector_column(column: pd.Series, name: str, ids: Sequence[str]) -> list:
    vectors = []
    for row, value in enumerate(column.tolist()):
        where = f"row {row} (example_id {ids[row]!r})"
        if _is_null(value):
            raise DataError(f"list column {name!r} is missing a value at {where}")
        try:
            if isinstance(value, str):
                vector = parse_vector(value)
            elif isinstance(value, np.ndarray | list | tuple):
                vector = np.asarray(value, dtype=np.float64).reshape(-1)
            else:
                raise ValueError(f"a {type(value).__name__} is not a list of numbers")
        except (ValueError, TypeError) as exc:
            shown = value if not isinstance(value, str) or len(value) < 60 else value[:57] + "..."
            raise DataError(f"list column {name!r} holds {shown!r} at {where}: {exc}") from exc
        with np.errstate(over="ignore"):
            vectors.append(vector.astype(np.float32))
    check_feature_vectors(vectors, name, ids)
    return vectors


def _read_image_column(
    frame: pd.DataFrame,
    name: str,
    kind: str,
    options: TableOptions,
    ids: Sequence[str],
    base_dir: Path | None,
) -> tuple[str, list]:
    values = frame[name].tolist()
    if kind == "bytes":
        images = []
        for row, value in enumerate(values):
            where = f"row {row} (example_id {ids[row]!r}) of column {name!r}"
            payload = _image_payload(value)
            if payload is None:
                raise DataError(f"the image at {where} is not bytes: {type(value).__name__}")
            images.append(to_png(payload, where))
        return "image", images
    root = options.image_root or base_dir
    if root is None:
        raise ConfigError(f"image paths in column {name!r} need image_root")
    return "image", [
        to_png(_read_image_file(root, value, row, ids[row], name), f"{value!r} (row {row})")
        for row, value in enumerate(values)
    ]


def _read_image_file(root: Path, value: object, row: int, example_id: str, column: str) -> bytes:
    where = f"row {row} (example_id {example_id!r}) of column {column!r}"
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"the image path at {where} is missing")
    root_resolved = root.resolve()
    candidate = Path(value)
    full = candidate if candidate.is_absolute() else root / candidate
    resolved = full.resolve()
    # resolve() follows symlinks and "..", so a link out of the root is refused as well.
    if not resolved.is_relative_to(root_resolved):
        raise DataError(f"the image path {value!r} at {where} escapes the image root {root}")
    if not resolved.is_file():
        raise DataError(f"the image file {full} named at {where} does not exist")
    try:
        return resolved.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the image file {full} named at {where}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _inside(path: Path, root: Path) -> Path:
    """`path`, refused when it is a link that leads outside the image folder `root`.

    An image-path column refuses paths that leave its root; a folder gets the same rule, so a
    link planted in a shared folder cannot make the audit read (and copy into its reports)
    files from elsewhere.
    """
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise DataError(
            f"the image folder {root} holds {path.relative_to(root).as_posix()!r}, a link to "
            f"{real} outside the folder; copy the file in, or remove the link"
        )
    return path


def _class_dirs(root: Path, top: Path | None = None) -> list[Path]:
    top = root if top is None else top
    return [
        _inside(p, top) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
    ]


def _image_files(class_dir: Path, root: Path) -> list[Path]:
    return [
        _inside(p, root)
        for p in sorted(class_dir.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and _visible(p, root)
    ]


def load_image_folder(
    root: str | os.PathLike[str], *, test_size: float = 0.0, seed: int = 0
) -> AuditDataset:
    """Images in one sub-folder per class.

    ``root/<class>/**/<file>`` (files sorted by path), or ``root/train/<class>/...`` and
    ``root/test/<class>/...`` when the root holds exactly the folders ``train`` and ``test``.
    Files whose suffix is not an image suffix, hidden files and files directly in the root are
    ignored.

    Parameters
    ----------
    root : path-like
        The folder.
    test_size, seed
        See `stratified_split` (unused with a train/test layout).

    Returns
    -------
    AuditDataset
        Ids are the files' paths relative to ``root`` (with ``/``); labels are the class
        folders' names.
    """
    root = Path(root)
    top = _class_dirs(root)
    layout = {p.name for p in top} == {"train", "test"}
    groups = [(p.name, p) for p in top] if layout else [(None, root)]
    ids, labels, splits, images = [], [], [], []
    for split_name, group_dir in groups:
        for class_dir in _class_dirs(group_dir, root):
            for file in _image_files(class_dir, root):
                try:
                    data = file.read_bytes()
                except OSError as exc:
                    raise DataError(f"cannot read the image file {file}: {exc}") from exc
                images.append(to_png(data, str(file)))
                ids.append(file.relative_to(root).as_posix())
                labels.append(class_dir.name)
                splits.append(split_name)
    if not top:
        raise DataError(f"the image folder {root} has no class sub-folders (root/<class>/<image>)")
    if not ids:
        raise DataError(
            f"the image folder {root} holds no image files ({sorted(IMAGE_EXTENSIONS)})"
        )
    return _finish(
        ids,
        np.array(labels, dtype=object),
        np.array(splits, dtype=object) if layout else None,
        ("image", images),
        test_size=test_size,
        seed=seed,
        source=str(root),
    )


# --------------------------------------------------------------------------------------------
# torchvision datasets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchvisionSource:
    """A torchvision dataset class and how its targets become class names."""

    class_name: str
    title: str
    # Name of each target: MNIST's torchvision names ("0 - zero") are shortened to the digit.
    name_of: Callable[[object, int], str]


def _named_class(dataset: object, target: int) -> str:
    return str(dataset.classes[target])  # type: ignore[attr-defined]


def _digit_class(dataset: object, target: int) -> str:
    return str(target)


TORCHVISION_SOURCES: dict[str, TorchvisionSource] = {
    "cifar10": TorchvisionSource("CIFAR10", "CIFAR-10", _named_class),
    "cifar100": TorchvisionSource("CIFAR100", "CIFAR-100", _named_class),
    "mnist": TorchvisionSource("MNIST", "MNIST", _digit_class),
    "fashionmnist": TorchvisionSource("FashionMNIST", "FashionMNIST", _named_class),
}


def load_torchvision(
    name: str, root: str | os.PathLike[str], *, download: bool = False
) -> AuditDataset:
    """A torchvision dataset from a local root, with its official train/test split.

    Parameters
    ----------
    name : {"cifar10", "cifar100", "mnist", "fashionmnist"}
        Dataset.
    root : path-like
        torchvision root folder (e.g. the one holding ``cifar-10-batches-py``).
    download : bool
        Let torchvision fetch the files when they are missing.

    Returns
    -------
    AuditDataset
        PNG images; ids ``<name>-train-00000`` and ``<name>-test-00000``...; class names from
        torchvision (MNIST: ``"0"``..``"9"``).

    Notes
    -----
    The CIFAR files are Python pickles, which can run code when read: load only roots you
    trust.
    """
    import torchvision.datasets

    spec = TORCHVISION_SOURCES.get(name)
    if spec is None:
        raise ConfigError(
            f"unknown torchvision dataset {name!r}; known: {sorted(TORCHVISION_SOURCES)}"
        )
    if not str(root):
        raise ConfigError(f"{name}: needs a root folder, e.g. '{name}:./data'")
    root = Path(root).expanduser()
    dataset_class = getattr(torchvision.datasets, spec.class_name)
    ids, labels, splits, images = [], [], [], []
    for split in ("train", "test"):
        try:
            dataset = dataset_class(str(root), train=split == "train", download=download)
        except (RuntimeError, OSError) as exc:
            hint = "" if download else "; pass download=True to fetch it"
            raise DataError(
                f"{spec.title} not found or incomplete under {root}: {exc}{hint}"
            ) from exc
        data = np.asarray(dataset.data)
        targets = np.asarray(dataset.targets, dtype=np.int64)
        names = {t: spec.name_of(dataset, int(t)) for t in np.unique(targets)}
        for i, (pixels, target) in enumerate(zip(data, targets, strict=True)):
            ids.append(f"{name}-{split}-{i:05d}")
            labels.append(names[target])
            splits.append(split)
            images.append(encode_png(pixels))
    return _finish(
        ids,
        np.array(labels, dtype=object),
        np.array(splits, dtype=object),
        ("image", images),
        test_size=0.0,
        seed=0,
        source=f"{name}:{root}",
    )
