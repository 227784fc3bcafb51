"""The canonical dataset table that every source is ingested into.

An `AuditDataset` wraps one `pandas.DataFrame` with a fixed set of columns:

=============  ==========================================================================
column         meaning
=============  ==========================================================================
example_id     stable, unique string id of the example
label          the given class name (string), possibly noisy
split          "train" or "test"
features       float32 vector of fixed length D (when ``input_kind == "features"``)
image          PNG-encoded bytes (when ``input_kind == "image"``)
true_label     optional: the clean class name, when noise was injected synthetically
noise          optional: "clean" | "flipped" | "open_set", alongside ``true_label``
=============  ==========================================================================

Class names are kept as strings; integer codes ``0..C-1`` index `AuditDataset.classes` and are
an internal matter. Open-set examples carry a ``true_label`` that is not in ``classes``; their
true code is -1.

Labels read from files are normalised by `normalize_labels`: strings are kept verbatim, integers
become their decimal text (``3 -> "3"``), floats that are integral become the integer's text
(``3.0 -> "3"``, so a label column read as float because of the file format still matches an
integer one), and non-integral floats or a mix of strings and numbers are refused (in a CSV,
where everything reads as text, `dm_audit.sources` refuses labels that are partly numbers).

Images of different modes and sizes are accepted on purpose, as photographs usually are: they
are converted to one mode (grayscale when all are, else RGB, alpha dropped) and resized to the
most common size, and `AuditDataset.images` logs a warning naming how many and which.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from dm_audit.errors import DataError

InputKind = Literal["features", "image"]
INPUT_KINDS: tuple[str, ...] = ("features", "image")
SPLITS: tuple[str, ...] = ("train", "test")
NOISE_KINDS: tuple[str, ...] = ("clean", "flipped", "open_set")

log = logging.getLogger(__name__)

#: Version of the canonical Parquet layout written by `AuditDataset.to_parquet`.
FORMAT_VERSION = "1"
# Rows per Parquet row group of a dataset file: a reader decodes one row group at a time, so
# this bounds the decoding buffers (65,536 rows of 128 features: 32 MB of values).
ROW_GROUP_ROWS = 65_536
_META_PREFIX = "dm_audit."

# PIL modes holding a single intensity channel (alpha, where present, is dropped on decode).
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


# --------------------------------------------------------------------------------------------
# Labels and classes
# --------------------------------------------------------------------------------------------


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


def _describe_row(row: int, ids: Sequence[str] | None) -> str:
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
            f"the first at {_describe_row(row, ids)}"
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
            f"{what} column {column!r}{of} has a blank value at {_describe_row(row, ids)}"
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


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def encode_png(image: np.ndarray) -> bytes:
    """Encode one image as PNG.

    Parameters
    ----------
    image : numpy.ndarray of uint8, shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)
        Pixel values.

    Returns
    -------
    bytes
        The PNG file.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise DataError(f"an image must have shape (H, W[, 1|3|4]), got {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_compatible(image: Image.Image) -> Image.Image:
    """The image in a mode PNG can store without losing what the pixels show."""
    if image.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
        return image
    if image.mode in _GRAY_MODES:
        return Image.fromarray(_gray_to_uint8(image))
    return image.convert("RGBA" if "A" in image.getbands() else "RGB")


def to_png(data: bytes, where: str) -> bytes:
    """Check that ``data`` is a decodable image and return it as PNG bytes.

    PNG input is returned unchanged (after a full decode to prove it is readable); other formats
    are decoded and re-encoded losslessly.

    Parameters
    ----------
    data : bytes
        An encoded image in any format Pillow reads.
    where : str
        The file or row the bytes came from, named in the error message.

    Returns
    -------
    bytes
        PNG-encoded image.

    Raises
    ------
    DataError
        If the bytes are not a readable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format == "PNG":
                return bytes(data)
            buffer = io.BytesIO()
            _png_compatible(image).save(buffer, format="PNG")
            return buffer.getvalue()
    except UnidentifiedImageError:
        # Pillow's message names its in-memory buffer, not the file.
        raise DataError(
            f"cannot decode the image at {where}: not an image in a format Pillow reads"
        ) from None
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot decode the image at {where}: {exc}") from exc


def _gray_to_uint8(image: Image.Image) -> np.ndarray:
    """One intensity channel as uint8 (H, W); 16-bit and float images are rescaled, not clipped."""
    if image.mode in ("1", "L"):
        return np.asarray(image.convert("L"))
    if image.mode in ("LA", "La"):
        return np.asarray(image.getchannel(0))
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        return (array.astype(np.uint32) // 257).astype(np.uint8)
    # 32-bit integer and float images have no fixed range: 16-bit data is the common case.
    top = 65535.0 if array.max(initial=0) > 255 else 255.0
    return np.clip(np.round(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def decode_image(data: bytes, *, gray: bool) -> np.ndarray:
    """Decode one image to uint8 pixels.

    Parameters
    ----------
    data : bytes
        Encoded image (PNG in the canonical table).
    gray : bool
        Decode to one intensity channel (``L``) instead of RGB.

    Returns
    -------
    numpy.ndarray of uint8, shape (H, W, 1) if ``gray`` else (H, W, 3)
        Alpha channels are dropped.
    """
    with Image.open(io.BytesIO(data)) as image:
        if gray:
            if image.mode in _GRAY_MODES:
                return _gray_to_uint8(image)[:, :, None]
            return np.asarray(image.convert("L"))[:, :, None]
        if image.mode in _GRAY_MODES and image.mode not in ("1", "L", "LA"):
            return np.repeat(_gray_to_uint8(image)[:, :, None], 3, axis=2)
        return np.asarray(image.convert("RGB"))


def _image_header(data: bytes) -> tuple[str, tuple[int, int]]:
    """Mode and (H, W) of an encoded image, read from its header only."""
    with Image.open(io.BytesIO(data)) as image:
        return image.mode, (image.height, image.width)


def _common_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The most common (H, W); ties go to the larger area, then the larger height."""
    counts = Counter(sizes)
    return max(counts, key=lambda hw: (counts[hw], hw[0] * hw[1], hw[0]))


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


def _report_normalisation(
    headers: Sequence[tuple[str, tuple[int, int]]],
    size: tuple[int, int],
    why: str,
    gray: bool,
    ids: Sequence[str],
    source: str,
) -> None:
    """Warn, naming examples, when images are resized or converted to a common mode."""
    resized = [i for i, (_, hw) in enumerate(headers) if hw != size]
    target = "L" if gray else "RGB"
    converted = sorted({mode for mode, _ in headers} - {target})
    if resized:
        sizes = [(ids[i], *headers[i][1]) for i in resized[:3]]
        shown = ", ".join(f"{eid!r} ({h}x{w})" for eid, h, w in sizes)
        log.warning(
            "%s: resized %d of %d images to %dx%d (%s), e.g. %s",
            source,
            len(resized),
            len(headers),
            size[0],
            size[1],
            why,
            shown,
        )
    if converted:
        log.warning(
            "%s: converted images of mode(s) %s to %s (alpha dropped)",
            source,
            ", ".join(converted),
            target,
        )


def default_ids(n: int, prefix: str = "row") -> list[str]:
    """Stable ids derived from the row number: ``row-000000``, ``row-000001``, ...

    Parameters
    ----------
    n : int
        Number of rows.
    prefix : str
        Text before the zero-padded row number.

    Returns
    -------
    list of str, length n
    """
    width = max(6, len(str(max(n - 1, 0))))
    return [f"{prefix}-{i:0{width}d}" for i in range(n)]


def _as_row_mask(
    mask: np.ndarray | Sequence[bool] | Sequence[int] | pd.Series, n: int
) -> np.ndarray:
    array = np.asarray(mask)
    if array.dtype == bool:
        if array.shape != (n,):
            raise DataError(f"a boolean mask must have shape ({n},), got {array.shape}")
        return array
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"subset needs a boolean mask or integer positions, got {array.dtype}")
    return array.astype(np.int64)


@dataclass
class AuditDataset:
    """A labelled dataset in canonical form.

    Attributes
    ----------
    table : pandas.DataFrame, N rows
        Columns ``example_id``, ``label``, ``split`` and ``features`` or ``image``; optionally
        ``true_label`` and ``noise`` (see the module docstring).
    classes : list of str, length C
        Class names in code order; ``label_codes()`` indexes this list.
    input_kind : {"features", "image"}
        Which input column the table holds.
    source : str
        Human-readable description of where the data came from.
    notes : dict
        What loading decided, for the report's summary: the input columns used and how each
        was encoded (``inputs``), columns left out and why (``ignored_columns``), class names
        written several ways (``label_spellings``). JSON values only.
    """

    table: pd.DataFrame
    classes: list[str]
    input_kind: InputKind
    source: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
    # Where the table was built from one (rows, D) float32 matrix whose rows the "features"
    # cells are views of: the matrix and the rows of it this table holds (a slice, or positions
    # after a scattered subset). `features` then slices it instead of stacking N small arrays,
    # which at a million rows saves a 512 MB copy per call.
    _matrix: tuple[np.ndarray, slice | np.ndarray] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # Cheap structural checks only: full validation (`validate`) scans every value.
        if self.input_kind not in INPUT_KINDS:
            raise DataError(f"input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")
        self.classes = [str(c) for c in self.classes]
        required = ["example_id", "label", "split", self.input_column]
        missing = [c for c in required if c not in self.table.columns]
        if missing:
            raise DataError(f"the dataset table lacks the column(s) {missing}")

    # -- basic properties ---------------------------------------------------------------------

    @property
    def input_column(self) -> str:
        """Name of the input column: ``"features"`` or ``"image"``."""
        return "features" if self.input_kind == "features" else "image"

    @property
    def n_classes(self) -> int:
        """Number of classes C."""
        return len(self.classes)

    @property
    def has_truth(self) -> bool:
        """Whether the table carries injected-noise truth (``true_label`` and ``noise``)."""
        return "true_label" in self.table.columns

    @property
    def example_ids(self) -> np.ndarray:
        """Example ids, object array of str, shape (N,)."""
        return self.table["example_id"].to_numpy(dtype=object)

    def __len__(self) -> int:
        return len(self.table)

    # -- arrays -------------------------------------------------------------------------------

    def _codes(self, names: pd.Series, *, unknown: int | None) -> np.ndarray:
        index = {name: code for code, name in enumerate(self.classes)}
        codes = names.map(index)
        if codes.isna().any():
            if unknown is None:
                row = int(np.flatnonzero(codes.isna().to_numpy())[0])
                raise DataError(
                    f"label {names.iloc[row]!r} of example {self.table['example_id'].iloc[row]!r}"
                    f" is not one of the classes {self.classes}"
                )
            codes = codes.fillna(unknown)
        return codes.to_numpy(dtype=np.int64)

    def label_codes(self) -> np.ndarray:
        """Given labels as codes.

        Returns
        -------
        numpy.ndarray of int64, shape (N,)
            Values in ``0..C-1``.
        """
        return self._codes(self.table["label"], unknown=None)

    def true_label_codes(self) -> np.ndarray:
        """True labels as codes, -1 for open-set examples (true class not in ``classes``).

        Returns
        -------
        numpy.ndarray of int64, shape (N,)

        Raises
        ------
        DataError
            If the dataset carries no ``true_label`` column (no noise was injected).
        """
        if not self.has_truth:
            raise DataError(
                f"dataset {self.source!r} has no true_label column: the truth is only known when "
                "noise was injected synthetically"
            )
        return self._codes(self.table["true_label"], unknown=-1)

    def features(self) -> np.ndarray:
        """Feature matrix.

        Returns
        -------
        numpy.ndarray of float32, shape (N, D)
        """
        if self.input_kind != "features":
            raise DataError(f"dataset {self.source!r} holds images, not feature vectors")
        values = self.table["features"].to_numpy(dtype=object)
        if len(values) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        shared = self._shared_features(values)
        if shared is not None:
            return shared
        return np.stack(values).astype(np.float32, copy=False)

    def _shared_features(self, values: np.ndarray) -> np.ndarray | None:
        """The rows of `_matrix` this table holds, if its cells still are views of them.

        A slice of rows comes back as a view (shared memory: do not modify it), positions as a
        copy. Cells replaced since (another column assigned) fail the spot check of their
        addresses, and the caller stacks the cells instead.
        """
        if self._matrix is None:
            return None
        matrix, rows = self._matrix
        n = len(values)
        picked = matrix[rows]
        if len(picked) != n or picked.ndim != 2:
            return None
        base = matrix.__array_interface__["data"][0]
        row_bytes = matrix.strides[0]
        positions = np.arange(matrix.shape[0])[rows]
        for i in np.unique(np.linspace(0, n - 1, num=min(n, 65)).astype(np.int64)):
            cell = values[i]
            if not isinstance(cell, np.ndarray) or cell.shape != (matrix.shape[1],):
                return None
            if cell.__array_interface__["data"][0] != base + int(positions[i]) * row_bytes:
                return None
        return picked

    def _with_matrix(self, matrix: np.ndarray, rows: slice | np.ndarray) -> AuditDataset:
        if matrix.ndim == 2 and matrix.dtype == np.float32:
            self._matrix = (matrix, rows)
        return self

    def images(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """Decode every image to one uint8 array.

        Images are converted to one intensity channel when all of them are grayscale, and to RGB
        otherwise (alpha is dropped). They are then brought to a common size: ``size`` when
        given, else the most common (H, W) in the dataset (ties: the larger area). Images of a
        different size are resized (bilinear, aspect ratio not kept).

        Parameters
        ----------
        size : (int, int), optional
            Target (H, W).

        Returns
        -------
        numpy.ndarray of uint8, shape (N, H, W, C)
            C is 1 (grayscale) or 3 (RGB).
        """
        if self.input_kind != "image":
            raise DataError(f"dataset {self.source!r} holds feature vectors, not images")
        blobs = self.table["image"].to_numpy(dtype=object)
        if len(blobs) == 0:
            return np.zeros((0, 0, 0, 3), dtype=np.uint8)
        headers = [_image_header(b) for b in blobs]
        gray = all(mode in _GRAY_MODES for mode, _ in headers)
        height, width = size if size is not None else _common_size([hw for _, hw in headers])
        why = "as asked" if size is not None else "the most common size"
        _report_normalisation(headers, (height, width), why, gray, self.example_ids, self.source)
        out = np.empty((len(blobs), height, width, 1 if gray else 3), dtype=np.uint8)
        for i, (blob, (_, hw)) in enumerate(zip(blobs, headers, strict=True)):
            pixels = decode_image(blob, gray=gray)
            if hw != (height, width):
                resized = Image.fromarray(pixels[:, :, 0] if gray else pixels).resize(
                    (width, height), Image.Resampling.BILINEAR
                )
                pixels = np.asarray(resized).reshape(height, width, -1)
            out[i] = pixels
        return out

    def inputs(self) -> np.ndarray:
        """`features` for feature datasets, `images` for image datasets.

        Returns
        -------
        numpy.ndarray
            float32 (N, D) or uint8 (N, H, W, C).
        """
        return self.features() if self.input_kind == "features" else self.images()

    # -- selection ----------------------------------------------------------------------------

    def subset(self, mask: np.ndarray | Sequence[bool] | Sequence[int] | pd.Series) -> AuditDataset:
        """Rows selected by a boolean mask or by integer positions.

        Parameters
        ----------
        mask : array of bool, shape (N,), or array of int
            Rows to keep.

        Returns
        -------
        AuditDataset
            Same classes, input kind and source; the table index is reset.
        """
        selection = _as_row_mask(mask, len(self.table))
        table = self.table.iloc[selection]
        out = AuditDataset(
            table=table.reset_index(drop=True),
            classes=list(self.classes),
            input_kind=self.input_kind,
            source=self.source,
            notes=dict(self.notes),
        )
        if self._matrix is not None and self.input_kind == "features":
            matrix, rows = self._matrix
            held = np.arange(matrix.shape[0])[rows]
            positions = np.arange(len(self.table))[selection]
            chosen = held[positions]
            consecutive = chosen.size > 0 and (np.diff(chosen) == 1).all()
            out._with_matrix(
                matrix, slice(int(chosen[0]), int(chosen[-1]) + 1) if consecutive else chosen
            )
        return out

    def train(self) -> AuditDataset:
        """The rows whose split is ``"train"``."""
        return self.subset((self.table["split"] == "train").to_numpy())

    def test(self) -> AuditDataset:
        """The rows whose split is ``"test"``."""
        return self.subset((self.table["split"] == "test").to_numpy())

    # -- validation ---------------------------------------------------------------------------

    def validate(self) -> AuditDataset:
        """Check every column and value; return ``self`` so calls can be chained.

        Raises
        ------
        DataError
            Naming the problem: an empty table, fewer than two classes, duplicate ids, a label
            outside ``classes``, a bad split or noise value, features of mixed length or with
            NaN/inf (column and example named), an image cell that is not bytes.
        """
        validate(self)
        return self

    # -- persistence --------------------------------------------------------------------------

    def to_parquet(self, path: str | os.PathLike[str]) -> Path:
        """Write the canonical table, with classes and input kind in the schema metadata.

        The file is written to a temporary name and renamed, so a crash never leaves a partial
        file behind.

        Parameters
        ----------
        path : path-like
            Destination ``.parquet`` file.

        Returns
        -------
        pathlib.Path
            The written path.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = _to_arrow(self)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def from_parquet(cls, path: str | os.PathLike[str]) -> AuditDataset:
        """Read a table written by `to_parquet`.

        Parameters
        ----------
        path : path-like
            A ``.parquet`` file.

        Returns
        -------
        AuditDataset
            Validated.

        Raises
        ------
        DataError
            If the file is unreadable or is not a dm-audit dataset file.
        """
        path = Path(path)
        try:
            schema = pq.read_schema(path)
            others = [name for name in schema.names if name != "features"]
            arrow = pq.read_table(path, columns=others)
            matrix = _read_feature_matrix(path) if "features" in schema.names else None
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"cannot read the Parquet file {path}: {exc}") from exc
        meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        if _META_PREFIX + "classes" not in meta:
            raise DataError(
                f"{path} is not a dm-audit dataset file (no class list in its metadata)"
            )
        version = meta.get(_META_PREFIX + "format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"{path} has dataset format version {version!r}; expected {FORMAT_VERSION}"
            )
        input_kind = meta[_META_PREFIX + "input_kind"]
        columns = {}
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
        dataset = cls(
            table=pd.DataFrame(columns),
            classes=json.loads(meta[_META_PREFIX + "classes"]),
            input_kind=input_kind,
            source=meta.get(_META_PREFIX + "source", str(path)),
            notes=json.loads(meta.get(_META_PREFIX + "notes", "{}")),
        )
        if matrix is not None:
            dataset._with_matrix(matrix, slice(0, len(matrix)))
        del arrow, columns  # every column is copied out: free Arrow's buffers before validating
        return dataset.validate()

    @classmethod
    def from_arrays(
        cls,
        labels: Sequence[object] | np.ndarray,
        *,
        features: np.ndarray | None = None,
        images: np.ndarray | Sequence[np.ndarray] | None = None,
        classes: Sequence[str] | None = None,
        example_ids: Sequence[str] | None = None,
        split: Sequence[str] | np.ndarray | None = None,
        source: str = "arrays",
    ) -> AuditDataset:
        """Build a dataset from in-memory arrays.

        Parameters
        ----------
        labels : array, shape (N,)
            Class names, or integer codes into ``classes`` when ``classes`` is given.
        features : numpy.ndarray, shape (N, D), optional
            Feature vectors (exactly one of ``features`` and ``images``).
        images : numpy.ndarray of uint8, shape (N, H, W[, C]), or a list of such arrays
            Images, PNG-encoded into the table.
        classes : sequence of str, optional
            Class names in code order; default: the sorted distinct labels.
        example_ids : sequence of str, optional
            Default ``row-000000``, ...
        split : sequence of {"train", "test"}, optional
            Default: every row is ``"train"``.
        source : str
            Description stored with the dataset.

        Returns
        -------
        AuditDataset
            Validated.
        """
        if (features is None) == (images is None):
            raise DataError("give exactly one of features and images")
        raw = np.asarray(labels)
        if classes is not None and np.issubdtype(raw.dtype, np.integer):
            class_list = [str(c) for c in classes]
            if raw.size and (raw.min() < 0 or raw.max() >= len(class_list)):
                raise DataError(f"label codes must lie in 0..{len(class_list) - 1}")
            names = np.array([class_list[c] for c in raw], dtype=object)
        else:
            names = normalize_labels(raw)
            class_list = [str(c) for c in classes] if classes is not None else sort_classes(names)
        n = len(names)
        ids = default_ids(n) if example_ids is None else [str(i) for i in example_ids]
        splits = ["train"] * n if split is None else [str(s) for s in split]
        table = pd.DataFrame({"example_id": ids, "label": names, "split": splits})
        if features is not None:
            matrix = np.asarray(features, dtype=np.float32)
            if matrix.ndim != 2 or len(matrix) != n:
                raise DataError(f"features must have shape ({n}, D), got {matrix.shape}")
            table["features"] = list(matrix)
            kind = "features"
            dataset = cls(table=table, classes=class_list, input_kind=kind, source=source)
            return dataset._with_matrix(matrix, slice(0, n)).validate()
        else:
            if len(images) != n:  # type: ignore[arg-type]
                raise DataError(f"got {len(images)} images for {n} labels")  # type: ignore[arg-type]
            table["image"] = [encode_png(np.asarray(im)) for im in images]  # type: ignore[union-attr]
            kind = "image"
        return cls(table=table, classes=class_list, input_kind=kind, source=source).validate()


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


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
            f"column {name!r} holds {column.iloc[row]!r} at {_describe_row(row, ids)}; "
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
        raise DataError(
            f"column {column!r} has {int((~finite).sum())} non-finite value(s) (NaN or inf); "
            f"the first is {matrix[row, pos]} at position {pos} of row {row} "
            f"(example_id {ids[row]!r})"
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
            f"{_describe_row(row, ids)} has label {table['label'].iloc[row]!r}, true_label "
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
                f"the image column must hold encoded bytes; {_describe_row(bad[0], ids)} does not"
            )


# --------------------------------------------------------------------------------------------
# Arrow conversion
# --------------------------------------------------------------------------------------------


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
