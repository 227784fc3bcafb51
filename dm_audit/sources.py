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

Each kind of source has its module: table files (`dm_audit.table_files`), a table's input
columns (`dm_audit.table_inputs`), a table made into a dataset (`dm_audit.table_source`), image
folders (`dm_audit.image_folder`), the built-in datasets (`dm_audit.builtin_sources`), and the
split and assembly they share (`dm_audit.source_assembly`). Their public names are importable
from here too.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path

from dm_audit.builtin_sources import (
    TORCHVISION_SOURCES,
    TorchvisionSource,
    load_digits,
    load_torchvision,
)
from dm_audit.dataset import AuditDataset, is_dataset_file
from dm_audit.errors import ConfigError, DataError
from dm_audit.image_folder import load_image_folder
from dm_audit.images import IMAGE_EXTENSIONS
from dm_audit.memory import release_unused_memory
from dm_audit.source_assembly import stratified_split
from dm_audit.table_files import (
    COMPRESSION_SUFFIXES,
    ID_COLUMN,
    TABLE_SUFFIXES,
    TableOptions,
    read_table,
    require_column,
    table_kind,
)
from dm_audit.table_inputs import parse_vector, read_tabular
from dm_audit.table_source import SPLIT_COLUMN, table_to_dataset

__all__ = [
    "COMPRESSION_SUFFIXES",
    "ID_COLUMN",
    "IMAGE_EXTENSIONS",
    "SPLIT_COLUMN",
    "TABLE_SUFFIXES",
    "TORCHVISION_SOURCES",
    "TableOptions",
    "TorchvisionSource",
    "load_digits",
    "load_image_folder",
    "load_source",
    "load_torchvision",
    "parse_vector",
    "read_table",
    "read_tabular",
    "require_column",
    "stratified_split",
    "table_kind",
    "table_to_dataset",
]


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
    options = _table_options(
        label_column, id_column, feature_columns, image_column, image_root, split_column
    )
    prefix, sep, rest = spec.partition(":")
    if sep and prefix.lower() in TORCHVISION_SOURCES:
        _refuse_table_options(options, spec)
        return load_torchvision(prefix.lower(), rest, download=download)
    if spec == "digits":
        _refuse_table_options(options, spec)
        return load_digits(test_size=test_size, seed=seed)
    dataset = _load_path(spec, options, test_size=test_size, seed=seed)
    # The file's decoded buffers are garbage now; Arrow would otherwise keep their pages.
    release_unused_memory()
    return dataset


def _table_options(
    label_column: str,
    id_column: str | None,
    feature_columns: str | Sequence[str] | None,
    image_column: str | None,
    image_root: str | os.PathLike[str] | None,
    split_column: str | None,
) -> TableOptions:
    if isinstance(feature_columns, str):
        feature_columns = [feature_columns]
    return TableOptions(
        label_column=label_column,
        id_column=id_column,
        feature_columns=list(feature_columns) if feature_columns is not None else None,
        image_column=image_column,
        image_root=Path(image_root).expanduser() if image_root is not None else None,
        split_column=split_column,
    )


def _load_path(spec: str, options: TableOptions, *, test_size: float, seed: int) -> AuditDataset:
    """A source named by a path: an image folder, a saved dataset file, or a table."""
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
