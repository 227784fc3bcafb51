"""A table's input: which column(s) it is, and how each is read into features or images.

The input is the columns the user named (`TableOptions.feature_columns` or `image_column`), or
else the one kind of input the table holds besides its label, id and split columns: tabular
columns (numbers, booleans, categories, dates; encoded by `dm_audit.tabular.encode_tabular`),
one list/embedding column (in CSV a text like ``"[0.1, 0.2]"``), an image-bytes column (raw
bytes or Hugging Face ``{"bytes": ...}`` structs) or an image-path column. A table with several
possible inputs, or none, is refused with the choices named. What was chosen, and how each
column was encoded, is recorded in the dataset's notes for the report.

Image paths are read relative to ``image_root`` (else the table's folder) and may not leave it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dm_audit.dataset_validation import check_feature_vectors
from dm_audit.errors import ConfigError, DataError
from dm_audit.images import IMAGE_EXTENSIONS, to_png
from dm_audit.table_files import TableOptions, require_column
from dm_audit.tabular import MISSING_NUMBER_MARKERS, numbers_with_missing_markers

# The warnings are about loading a source: they keep the sources' logger name.
log = logging.getLogger("dm_audit.sources")

# Columns of the canonical table that a user's table may carry (e.g. exported from a report):
# never inputs, since the truth read as a feature would make every audit perfect.
_CANONICAL_NON_INPUTS = frozenset({"true_label", "noise"})
# How many values are inspected to guess what a column holds.
_SNIFF_ROWS = 50


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


def _check_text_numbers(
    frame: pd.DataFrame, names: Sequence[str], source: str, notes: dict[str, Any]
) -> list[str]:
    """A text column of mostly numbers is a numeric column with gaps or a typo.

    Its cells that only mark a missing value (`MISSING_NUMBER_MARKERS`) become gaps, filled
    later like any other: the column is made numeric in `frame` and its name returned. Any
    other text in it is a typo: refused, naming the row.
    """
    converted: list[str] = []
    for name in names:
        column = frame[name]
        if not pd.api.types.is_string_dtype(column) and column.dtype != object:
            continue
        present = column.notna().to_numpy()
        parsed = pd.to_numeric(column, errors="coerce").notna().to_numpy()
        odd = present & ~parsed
        with_gaps = numbers_with_missing_markers(column)
        if with_gaps is not None:
            # However many gaps: a column of numbers and "?" has no category to one-hot.
            frame[name] = with_gaps
            converted.append(name)
            found = sorted(set(column[odd].astype(str).str.strip()))
            notes.setdefault("missing_markers", []).append(
                {"column": name, "markers": found, "rows": int(odd.sum())}
            )
            log.warning(
                "column %r of %s: %d cell(s) holding %s read as missing numbers",
                name,
                source,
                int(odd.sum()),
                " or ".join(repr(m) for m in found),
            )
            continue
        n_present = int(present.sum())
        if not n_present or not 0.5 <= parsed[present].mean() < 1.0:
            continue
        typo = odd & ~column.astype(str).str.strip().isin(MISSING_NUMBER_MARKERS).to_numpy()
        row = int(np.flatnonzero(typo)[0])
        raise DataError(
            f"column {name!r} of {source} looks numeric but row {row} holds "
            f"{column.iloc[row]!r}; fix the value, or choose the inputs with --features "
            "(feature_columns from Python)"
        )
    return converted


def _refuse_role(name: str, roles: dict[str, str], what: str) -> None:
    if name in roles:
        why = (
            "a label read as a feature makes every prediction trivially right"
            if roles[name] == "the label column"
            else "it names or assigns rows, it does not describe them"
        )
        raise ConfigError(f"{what} {name!r} is {roles[name]}: it cannot also be an input ({why})")


def read_inputs(
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
    if options.feature_columns is not None and options.image_column is not None:
        raise ConfigError("give feature_columns or image_column, not both")
    if options.feature_columns is not None:
        return _named_features(frame, list(options.feature_columns), roles, ids, source, notes)
    if options.image_column is not None:
        return _named_image(
            frame, options.image_column, options, roles, ids, base_dir, source, notes
        )
    kind, chosen = _detect_input(frame, roles, source, types_inferred, notes)
    if kind == "tabular":
        return "features", read_tabular(frame, chosen, ids, source, notes, strict=False)  # type: ignore[arg-type]
    notes["inputs"] = [
        {"column": chosen, "encoding": "vector" if kind == "list" else f"image {kind}"}
    ]
    if kind == "list":
        return "features", _read_vector_column(frame[chosen], chosen, ids)  # type: ignore[arg-type]
    return _read_image_column(frame, chosen, kind, options, ids, base_dir)  # type: ignore[arg-type]


def _named_features(
    frame: pd.DataFrame,
    names: list[str],
    roles: dict[str, str],
    ids: Sequence[str],
    source: str,
    notes: dict[str, Any],
) -> tuple[str, list]:
    """The feature columns the user named: one list column, or tabular columns."""
    columns = list(frame.columns)
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


def _named_image(
    frame: pd.DataFrame,
    name: str,
    options: TableOptions,
    roles: dict[str, str],
    ids: Sequence[str],
    base_dir: Path | None,
    source: str,
    notes: dict[str, Any],
) -> tuple[str, list]:
    """The image column the user named: image bytes or image paths."""
    require_column(list(frame.columns), name, "image column", source)
    _refuse_role(name, roles, "image column")
    kind = _sniff(frame[name])
    if kind not in ("bytes", "path"):
        raise DataError(
            f"image column {name!r} of {source} holds neither image bytes nor image file paths"
        )
    notes["inputs"] = [{"column": name, "encoding": f"image {kind}"}]
    return _read_image_column(frame, name, kind, options, ids, base_dir)


def _detect_input(
    frame: pd.DataFrame,
    roles: dict[str, str],
    source: str,
    types_inferred: bool,
    notes: dict[str, Any],
) -> tuple[str, list[str] | str]:
    """The one kind of input the table holds: ("tabular", columns), or ("list" | "bytes" |
    "path", column); refused, naming the choices, when there are several or none."""
    columns = list(frame.columns)
    candidates = [c for c in columns if c not in roles and c not in _CANONICAL_NON_INPUTS]
    ignored = [
        {"column": c, "reason": "a dm-audit truth column, never an input"}
        for c in columns
        if c in _CANONICAL_NON_INPUTS and c not in roles
    ]
    numeric = [c for c in candidates if _is_numeric(frame[c])]
    if types_inferred:
        text = [c for c in candidates if c not in numeric]
        numeric += _check_text_numbers(frame, text, source, notes)
        numeric = [c for c in candidates if c in numeric]  # the table's column order
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
    choices: list[tuple[str, list[str] | str]] = [("tabular", tabular)] if tabular else []
    choices += found
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
    if ignored:
        notes["ignored_columns"] = ignored
    return choices[0]


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
    gapped = [e for e in encoded.inputs if e.get("missing")]
    if gapped:
        shown = ", ".join(f"{e['column']!r} {e['missing']}" for e in gapped[:5])
        more = f" and {len(gapped) - 5} more" if len(gapped) > 5 else ""
        log.warning(
            "%s: %d missing value(s) in %d column(s) (%s%s), each filled with the mean of the "
            "column over the nearest rows that have it (summary.json input.inputs lists them)",
            source,
            sum(e["missing"] for e in gapped),
            len(gapped),
            shown,
            more,
        )
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
    from dm_audit.tabular import check_finite

    return list(check_finite(matrix, column_of_feature, ids))


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
