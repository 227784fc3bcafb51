"""Read a file of human-reviewed labels.

A review file is a CSV or Parquet table with the columns ``example_id`` and ``label``, where
``label`` is a class *name* (as in the reports), one row per reviewed example; other columns
(a reviewer's comment, a date) are ignored. Ids and labels are read as text and stripped of
surrounding spaces. The file is only read, never modified.

Rows whose id is not in the dataset, whose label is not a known class, or that are empty are
collected in a `ReviewReport` with their row numbers (1 = first data row, the header not
counted); ``strict=True`` raises `DataError` naming them instead. When an id appears more than
once the last row wins (a reviewer appending a second opinion) and the earlier rows are
reported as superseded; ``duplicates="error"`` raises instead.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from dm_audit.errors import ConfigError, DataError
from dm_audit.label_names import canonical_label

__all__ = ["REVIEW_COLUMNS", "ReviewProblem", "ReviewReport", "Reviews", "read_reviews"]

REVIEW_COLUMNS = ("example_id", "label")
# Names people commonly give these columns, to suggest the right rename.
_ALIASES = {
    "example_id": (
        "id",
        "example",
        "exampleid",
        "example-id",
        "sample_id",
        "image",
        "file",
        "path",
    ),
    "label": ("class", "class_name", "new_label", "corrected_label", "reviewed_label", "target"),
}


@dataclass(frozen=True)
class ReviewProblem:
    """One unusable row of a review file.

    Attributes
    ----------
    row : int
        1-based data row number (the header is not counted).
    example_id : str
    label : str
    problem : str
        ``"unknown_id"``, ``"unknown_label"``, ``"empty"`` or ``"superseded"`` (an earlier row
        for an id that appears again later).
    """

    row: int
    example_id: str
    label: str
    problem: str

    def __str__(self) -> str:
        what = {
            "unknown_id": f"example_id {self.example_id!r} is not in the dataset",
            "unknown_label": f"label {self.label!r} is not a known class",
            "empty": "example_id or label is empty",
            "superseded": f"example_id {self.example_id!r} is reviewed again in a later row",
        }[self.problem]
        return f"row {self.row}: {what}"


@dataclass(frozen=True)
class ReviewReport:
    """What happened to every row of a review file.

    Attributes
    ----------
    path : Path
    n_rows : int
        Data rows in the file.
    n_accepted : int
        Distinct examples whose review is used.
    problems : list of ReviewProblem
        Rows not used, in file order.
    """

    path: Path
    n_rows: int
    n_accepted: int
    problems: list[ReviewProblem] = field(default_factory=list)

    def _of(self, kind: str) -> list[ReviewProblem]:
        return [p for p in self.problems if p.problem == kind]

    @property
    def unknown_ids(self) -> list[ReviewProblem]:
        """Rows whose example_id is not in the dataset."""
        return self._of("unknown_id")

    @property
    def unknown_labels(self) -> list[ReviewProblem]:
        """Rows whose label is not a class name."""
        return self._of("unknown_label")

    @property
    def duplicates(self) -> list[ReviewProblem]:
        """Earlier rows superseded by a later row for the same example."""
        return self._of("superseded")

    @property
    def ok(self) -> bool:
        """True when every row was used."""
        return not self.problems

    def summary(self, limit: int = 10) -> str:
        """Human-readable account: counts, then up to `limit` problem rows."""
        head = f"{self.path}: {self.n_rows} rows, {self.n_accepted} reviews accepted"
        if self.ok:
            return head
        lines = [head + f", {len(self.problems)} rows not used:"]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form for summary.json."""
        return {
            "path": str(self.path),
            "n_rows": self.n_rows,
            "n_accepted": self.n_accepted,
            "problems": [
                {"row": p.row, "example_id": p.example_id, "label": p.label, "problem": p.problem}
                for p in self.problems
            ],
        }


@dataclass(frozen=True)
class Reviews:
    """Accepted human reviews.

    Attributes
    ----------
    labels : dict of str to str
        example_id -> reviewed class name, in file order of the accepted rows.
    report : ReviewReport
    """

    labels: dict[str, str]
    report: ReviewReport

    def __len__(self) -> int:
        return len(self.labels)

    def to_positions(self, example_ids: Sequence[str], classes: Sequence[str]) -> dict[int, int]:
        """Map the reviews onto row numbers and class codes for `decide_corrections`.

        Parameters
        ----------
        example_ids : sequence of str, length N
            Example ids in the row order of the arrays.
        classes : sequence of str, length C
            Class names; the code of a name is its position.

        Returns
        -------
        dict of int to int
            Row number -> class code, for every review whose id is in `example_ids`.
        """
        row_of = {str(e): i for i, e in enumerate(example_ids)}
        code_of = {str(c): j for j, c in enumerate(classes)}
        out: dict[int, int] = {}
        for eid, name in self.labels.items():
            if eid in row_of:
                if name not in code_of:
                    raise DataError(f"reviewed label {name!r} of {eid!r} is not in the classes")
                out[row_of[eid]] = code_of[name]
        return out


def _suggest(missing: str, columns: list[str]) -> str:
    lowered = {c.strip().lower(): c for c in columns}
    if missing in lowered and lowered[missing] != missing:
        return f"rename the column {lowered[missing]!r} to {missing!r} (names are case-sensitive)"
    for alias in _ALIASES[missing]:
        if alias in lowered:
            return f"rename the column {lowered[alias]!r} to {missing!r}"
    close = difflib.get_close_matches(missing, columns, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}? rename it to {missing!r}"
    return f"add a column {missing!r}"


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            # Everything as text: ids such as "007" must not become 7, and "NA" is a valid id.
            return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pandas()
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read review file {path}: {exc}") from exc
    raise DataError(
        f"review file {path} must be .csv or .parquet, got {suffix or 'no extension'!r}"
    )


def _as_text(series: pd.Series) -> list[str]:
    return [
        "" if v is None or (isinstance(v, float) and v != v) else str(v).strip() for v in series
    ]


def read_reviews(
    path: str | os.PathLike[str],
    *,
    known_ids: Iterable[str],
    classes: Sequence[str],
    strict: bool = False,
    duplicates: Literal["last", "error"] = "last",
) -> Reviews:
    """Read human-reviewed labels from a CSV or Parquet file.

    Parameters
    ----------
    path : path-like
        ``.csv`` or ``.parquet`` file with columns ``example_id`` and ``label`` (class names).
    known_ids : iterable of str
        Example ids of the dataset.
    classes : sequence of str
        Valid class names.
    strict : bool
        Raise `DataError` listing the rows with an unknown id, unknown label or empty value,
        instead of reporting them.
    duplicates : {"last", "error"}
        An id reviewed in several rows: use the last row (earlier ones are reported as
        superseded) or raise `DataError`.

    Returns
    -------
    Reviews
        Accepted reviews and a `ReviewReport` of every row not used.

    Raises
    ------
    DataError
        Missing file, unreadable file, missing column (with the rename to make), and in strict
        mode unknown ids or labels.
    """
    if duplicates not in ("last", "error"):
        raise ConfigError(f"duplicates must be 'last' or 'error', got {duplicates!r}")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"review file {p} does not exist")
    df = _read_table(p)
    _require_columns(p, [str(c) for c in df.columns])
    ids = _as_text(df["example_id"])
    # Labels in the dataset's spelling: spaces around and the Unicode form are no part of a name.
    labels = [canonical_label(v) for v in _as_text(df["label"])]
    known = {str(i) for i in known_ids}
    class_set = {str(c) for c in classes}

    problems, valid_rows, last_row = _sort_rows(ids, labels, known, class_set)
    bad = [q for q in problems if q.problem != "superseded"]
    if strict and bad:
        listed = "; ".join(str(q) for q in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"review file {p}: {listed}{more}")

    superseded = [i for i in valid_rows if last_row[ids[i]] != i]
    if superseded and duplicates == "error":
        dup_ids = sorted({ids[i] for i in superseded})
        raise DataError(
            f"review file {p} reviews {len(dup_ids)} example(s) more than once: "
            f"{', '.join(repr(d) for d in dup_ids[:10])}"
        )
    problems += [ReviewProblem(i + 1, ids[i], labels[i], "superseded") for i in superseded]
    problems.sort(key=lambda q: q.row)
    accepted = {ids[i]: labels[i] for i in valid_rows if last_row[ids[i]] == i}
    report = ReviewReport(path=p, n_rows=len(ids), n_accepted=len(accepted), problems=problems)
    return Reviews(labels=accepted, report=report)


def _require_columns(path: Path, columns: list[str]) -> None:
    """Refuse a review file without the columns ``example_id`` and ``label``, naming the rename."""
    for col in REVIEW_COLUMNS:
        if col not in columns:
            raise DataError(
                f"review file {path} has no column {col!r} (columns: "
                f"{', '.join(columns) or 'none'}); {_suggest(col, columns)}"
            )


def _sort_rows(
    ids: list[str], labels: list[str], known: set[str], class_set: set[str]
) -> tuple[list[ReviewProblem], list[int], dict[str, int]]:
    """Each row's fate: a problem (empty, unknown id or label), or a valid review.

    Returns the problems, the valid rows (0-based) and the last valid row of each id.
    """
    problems: list[ReviewProblem] = []
    last_row: dict[str, int] = {}
    valid_rows: list[int] = []
    for i, (eid, lab) in enumerate(zip(ids, labels, strict=True)):
        row = i + 1
        if not eid or not lab:
            problems.append(ReviewProblem(row, eid, lab, "empty"))
        elif eid not in known:
            problems.append(ReviewProblem(row, eid, lab, "unknown_id"))
        elif lab not in class_set:
            problems.append(ReviewProblem(row, eid, lab, "unknown_label"))
        else:
            valid_rows.append(i)
            last_row[eid] = i
    return problems, valid_rows, last_row
