"""The canonical dataset table that every source is ingested into: `AuditDataset`.

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

The concepts around the table live in their own modules: class names and how labels are read
(`dm_audit.label_names`), images (`dm_audit.images`), the checks (`dm_audit.dataset_validation`)
and the Parquet file (`dm_audit.dataset_file`). Their public names are importable from here too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from dm_audit.dataset_file import (
    FORMAT_VERSION,
    ROW_GROUP_ROWS,
    is_dataset_file,
    read_dataset_file,
    write_dataset_file,
)
from dm_audit.dataset_validation import NOISE_KINDS, SPLITS, check_feature_vectors, validate
from dm_audit.errors import DataError
from dm_audit.images import decode_image, encode_png, normalise_images, to_png
from dm_audit.label_names import (
    canonical_label,
    label_spellings,
    normalize_labels,
    numeric_label_spellings,
    sort_classes,
)

__all__ = [
    "FORMAT_VERSION",
    "INPUT_KINDS",
    "NOISE_KINDS",
    "ROW_GROUP_ROWS",
    "SPLITS",
    "AuditDataset",
    "InputKind",
    "canonical_label",
    "check_feature_vectors",
    "decode_image",
    "default_ids",
    "encode_png",
    "is_dataset_file",
    "label_spellings",
    "normalize_labels",
    "numeric_label_spellings",
    "sort_classes",
    "to_png",
    "validate",
]

InputKind = Literal["features", "image"]
INPUT_KINDS: tuple[str, ...] = ("features", "image")


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
    # The target sizes `images` has already warned about: every stage of an audit decodes the
    # images again, and the resize and conversion warnings are said once per dataset.
    _told_image_sizes: set[tuple[int, int] | None] = field(
        default_factory=set, init=False, repr=False, compare=False
    )
    # The map of heavy-tailed feature columns onto normal scores this dataset's features went
    # through (`dm_audit.heavy_tails.tame_heavy_tails`), None when none did: kept with the
    # final models so that new rows are read the same way.
    heavy_tail_map: Any = field(default=None, init=False, repr=False, compare=False)

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

    def with_features(
        self, matrix: np.ndarray, *, notes: dict[str, Any] | None = None
    ) -> AuditDataset:
        """A dataset of the same rows reading ``matrix`` as their features.

        Parameters
        ----------
        matrix : ndarray (N, D)
            The new features, row i for row i; when it is this dataset's own feature matrix
            the table is shared, not copied.
        notes : dict, optional
            The new dataset's notes; default: a copy of these.

        Returns
        -------
        AuditDataset
        """
        if self.input_kind != "features":
            raise DataError(f"dataset {self.source!r} holds images, not feature vectors")
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        if matrix.ndim != 2 or len(matrix) != len(self.table):
            raise DataError(f"features must have shape ({len(self.table)}, D), got {matrix.shape}")
        shared = self._shared_features(self.table["features"].to_numpy(dtype=object))
        same = (
            shared is not None
            and shared.shape == matrix.shape
            and shared.strides == matrix.strides
            and shared.__array_interface__["data"][0] == matrix.__array_interface__["data"][0]
        )
        # A shallow copy either way: the new dataset never aliases this one's table object.
        table = self.table.copy(deep=False)
        if not same:
            table["features"] = list(matrix)
        out = AuditDataset(
            table=table,
            classes=list(self.classes),
            input_kind=self.input_kind,
            source=self.source,
            notes=dict(self.notes) if notes is None else notes,
        )
        return out._with_matrix(matrix, slice(0, len(matrix)))

    def _with_matrix(self, matrix: np.ndarray, rows: slice | np.ndarray) -> AuditDataset:
        if matrix.ndim == 2 and matrix.dtype == np.float32:
            self._matrix = (matrix, rows)
        return self

    def images(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """Decode every image to one uint8 array (see `dm_audit.images.normalise_images`).

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
        key = None if size is None else (int(size[0]), int(size[1]))
        warn = key not in self._told_image_sizes
        self._told_image_sizes.add(key)
        return normalise_images(blobs, self.example_ids, self.source, size, warn=warn)

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
        # The rows' features went through the same map (if any): it stays with them.
        out.heavy_tail_map = self.heavy_tail_map
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
        return write_dataset_file(self, path)

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
        columns, meta, matrix = read_dataset_file(Path(path))
        dataset = cls(table=pd.DataFrame(columns), **meta)
        if matrix is not None:
            dataset._with_matrix(matrix, slice(0, len(matrix)))
        del columns  # every column is copied out: free Arrow's buffers before validating
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
            # C order: each row a contiguous view, and the trainings read rows without a copy
            # (a DataFrame's to_numpy() is column-major).
            matrix = np.ascontiguousarray(features, dtype=np.float32)
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
