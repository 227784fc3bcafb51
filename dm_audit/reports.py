"""The writer and reader of a run's report folder.

Other tools and our own checks read these files, so every schema is defined once
(`dm_audit.report_schemas`, re-exported here).

`write_reports` validates the tables against the schemas (naming the missing or bad column),
then writes ``examples.parquet``, ``label_issues.parquet``, ``corrected_labels.parquet``,
``metrics.parquet``, ``classes.parquet``, ``report.html``, ``summary.json`` and
``plots/<name>.png`` into a staging folder and moves
them into place together (`dm_audit.atomic.staged_output_dir`), so a crash never leaves a
half-written report visible.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dm_audit.atomic import (
    IfExists,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_png,
    atomic_write_text,
    staged_output_dir,
)
from dm_audit.correction import CORRECTION_SOURCES
from dm_audit.errors import DataError
from dm_audit.faults import kill_point
from dm_audit.report_schemas import (
    CLASSES_SCHEMA,
    CORRECTED_LABELS_SCHEMA,
    EXAMPLES_SCHEMA,
    LABEL_ISSUES_SCHEMA,
    METRICS_SCHEMA,
    REPORT_FILES,
    REPORT_OWNED_FILES,
    SCHEMA_VERSION,
    SCHEMAS,
    TABLE_KEY,
    UNIT_COLUMNS,
    VERSION_KEY,
)

__all__ = [
    "CLASSES_SCHEMA",
    "CORRECTED_LABELS_SCHEMA",
    "EXAMPLES_SCHEMA",
    "LABEL_ISSUES_SCHEMA",
    "METRICS_SCHEMA",
    "REPORT_FILES",
    "REPORT_OWNED_FILES",
    "SCHEMAS",
    "SCHEMA_VERSION",
    "ReportPaths",
    "corrected_labels_frame",
    "label_issues_frame",
    "read_report",
    "table_from_frame",
    "write_reports",
]


def _column(df: pd.DataFrame, field: pa.Field, table: str) -> pa.Array:
    values = df[field.name]
    try:
        if pa.types.is_list(field.type):
            arr = pa.array([None if v is None else list(v) for v in values], type=field.type)
        elif pa.types.is_string(field.type) and isinstance(values.dtype, pd.StringDtype):
            # Already strings (pandas' string dtype, Arrow-backed by default): converted
            # without a Python object per row, which at 1M rows costs more than the column.
            arr = pa.array(values, from_pandas=True).cast(pa.string())
        elif pa.types.is_string(field.type):
            # Class names may arrive as categoricals or objects; keep nulls, stringify the rest.
            obj = values.astype(object)
            arr = pa.array(
                [
                    None if v is None or v is pd.NA or (isinstance(v, float) and v != v) else str(v)
                    for v in obj
                ],
                type=pa.string(),
            )
        elif pa.types.is_boolean(field.type) and values.dtype == np.bool_:
            arr = pa.array(values.to_numpy(), type=pa.bool_())
        elif pa.types.is_boolean(field.type):
            obj = values.astype(object)
            bad = [
                v
                for v in obj
                if v is not None
                and not (isinstance(v, float) and v != v)
                and not isinstance(v, bool | np.bool_)
                and v not in (0, 1)
            ]
            if bad:
                raise DataError(f"{table}: column {field.name!r} must be boolean, found {bad[0]!r}")
            arr = pa.array(values, type=pa.bool_(), from_pandas=True)
        else:
            arr = pa.array(values, from_pandas=True)
            if not (
                pa.types.is_integer(arr.type)
                or pa.types.is_floating(arr.type)
                or pa.types.is_boolean(arr.type)
                or pa.types.is_null(arr.type)
            ):
                raise DataError(f"{table}: column {field.name!r} must be numeric, got {arr.type}")
            arr = arr.cast(field.type, safe=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(
            f"{table}: column {field.name!r} cannot be stored as {field.type}: {exc}"
        ) from exc
    if not field.nullable and arr.null_count:
        first = int(np.flatnonzero(pd.isna(values).to_numpy())[0])
        raise DataError(f"{table}: column {field.name!r} has a missing value at row {first}")
    return arr


def table_from_frame(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """Validate a DataFrame against a report schema and convert it to a pyarrow table.

    Required (non-nullable) columns must be present and non-null; nullable columns missing
    from `df` are filled with nulls; a column the schema does not know is an error (schemas are
    exact). Numbers are cast to the schema's type (e.g. float64 -> float32), scores and
    probabilities must lie in [0, 1], example ids must be unique, and ``correction_source`` /
    ``source`` must be a known provenance.

    For `METRICS_SCHEMA` the extra columns are kept as float64 after ``stage`` and ``epoch``.

    Parameters
    ----------
    df : pd.DataFrame
    schema : pa.Schema
        One of `SCHEMAS`.

    Returns
    -------
    pa.Table
        With exactly `schema` (metadata included).

    Raises
    ------
    DataError
        Naming the table, column and, where it applies, the row.
    """
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"expected a pandas DataFrame, got {type(df).__name__}")
    table = (schema.metadata or {}).get(TABLE_KEY, b"report").decode()
    columns = [str(c) for c in df.columns]
    if len(set(columns)) != len(columns):
        raise DataError(f"{table}: duplicate column names in {columns}")
    df = df.reset_index(drop=True)
    df.columns = columns
    names = set(schema.names)
    missing = [f.name for f in schema if not f.nullable and f.name not in columns]
    if missing:
        raise DataError(
            f"{table}: missing required column(s) {missing}; required: "
            f"{[f.name for f in schema if not f.nullable]}"
        )
    fields = list(schema)
    extra = [c for c in columns if c not in names]
    if table == "metrics":
        fields += [pa.field(c, pa.float64(), nullable=True) for c in extra]
        schema = pa.schema(fields, metadata=schema.metadata)
    elif extra:
        raise DataError(f"{table}: unknown column(s) {extra}; the schema has {schema.names}")
    arrays = []
    for field in fields:
        if field.name in columns:
            arrays.append(_column(df, field, table))
        else:
            arrays.append(pa.nulls(len(df), type=field.type))
    out = pa.Table.from_arrays(arrays, schema=schema)
    _check_values(out, table)
    return out


def _check_values(t: pa.Table, table: str) -> None:
    for name in UNIT_COLUMNS:
        if name in t.column_names:
            v = t.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
            bad = ~np.isnan(v) & ((v < 0) | (v > 1))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(f"{table}: column {name!r} row {i} = {v[i]:.6g} is outside [0, 1]")
    if table in ("examples", "label_issues", "corrected_labels"):
        ids = t.column("example_id")
        # Counted in Arrow: a million ids as Python strings would cost more than the table.
        if pc.count_distinct(ids, mode="all").as_py() < len(ids):
            dup = ids.to_pandas()
            dup = dup[dup.duplicated()]
            raise DataError(f"{table}: example_id {dup.iloc[0]!r} appears more than once")
    source = {"examples": "correction_source", "corrected_labels": "source"}.get(table)
    if source:
        values = set(t.column(source).drop_null().to_pylist())
        unknown = values - set(CORRECTION_SOURCES)
        if unknown:
            raise DataError(
                f"{table}: column {source!r} has unknown value(s) {sorted(unknown)}; "
                f"allowed: {list(CORRECTION_SOURCES)}"
            )


def label_issues_frame(examples: pd.DataFrame) -> pd.DataFrame:
    """The review export: flagged examples of an examples frame, most suspicious first.

    Ties in the score are ordered by example_id so the file is reproducible.

    Parameters
    ----------
    examples : pd.DataFrame
        Frame with at least the `EXAMPLES_SCHEMA` required columns.

    Returns
    -------
    pd.DataFrame
        Columns of `LABEL_ISSUES_SCHEMA`.
    """
    need = ["example_id", "given_label", "suggested_label", "label_issue_score", "is_label_issue"]
    missing = [c for c in need if c not in examples.columns]
    if missing:
        raise DataError(f"examples: missing column(s) {missing} needed for the label-issue export")
    # Only the exported columns of the flagged rows are copied, not the whole examples table.
    keep = [c for c in LABEL_ISSUES_SCHEMA.names if c in examples.columns]
    flagged = examples.loc[examples["is_label_issue"].astype(bool).to_numpy(), keep].copy()
    for opt in ("suggestion_confidence", "p_given"):
        if opt not in flagged.columns:
            flagged[opt] = np.nan
    if "correction_source" not in flagged.columns:
        flagged["correction_source"] = None
    flagged = flagged.sort_values(
        ["label_issue_score", "example_id"], ascending=[False, True], kind="stable"
    )
    return flagged[LABEL_ISSUES_SCHEMA.names].reset_index(drop=True)


def corrected_labels_frame(examples: pd.DataFrame, *, changed_only: bool = False) -> pd.DataFrame:
    """Corrected labels of an examples frame (all rows, or only those not ``"kept"``).

    Parameters
    ----------
    examples : pd.DataFrame
        Frame with ``example_id``, ``given_label``, ``corrected_label`` and
        ``correction_source``.
    changed_only : bool
        Keep only rows whose source is not ``"kept"``.

    Returns
    -------
    pd.DataFrame
        Columns of `CORRECTED_LABELS_SCHEMA`.
    """
    need = ["example_id", "given_label", "corrected_label", "correction_source"]
    missing = [c for c in need if c not in examples.columns]
    if missing:
        raise DataError(f"examples: missing column(s) {missing} needed for corrected labels")
    # The columns' own arrays: string columns stay in Arrow instead of becoming one Python
    # object per row and back (at 1M rows that round trip cost more than the frame).
    out = pd.DataFrame(
        {
            "example_id": examples["example_id"].array,
            "original_label": examples["given_label"].array,
            "corrected_label": examples["corrected_label"].array,
            "source": examples["correction_source"].array,
        }
    )
    if changed_only:
        out = out[out["source"] != "kept"].reset_index(drop=True)
    return out


@dataclass(frozen=True)
class ReportPaths:
    """Where `write_reports` put each file (``plots`` maps plot names to PNG paths)."""

    out_dir: Path
    examples: Path
    label_issues: Path
    corrected_labels: Path
    metrics: Path
    summary: Path
    plots: dict[str, Path]
    classes: Path | None = None
    html: Path | None = None

    @classmethod
    def in_folder(cls, final: Path, plot_paths: Mapping[str, Path]) -> ReportPaths:
        """The report files in `final`; `plot_paths` are relative to it."""
        return cls(
            out_dir=final,
            examples=final / "examples.parquet",
            label_issues=final / "label_issues.parquet",
            corrected_labels=final / "corrected_labels.parquet",
            metrics=final / "metrics.parquet",
            summary=final / "summary.json",
            plots={k: final / v for k, v in plot_paths.items()},
            classes=final / "classes.parquet",
            html=final / "report.html",
        )


_PLOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def write_reports(
    out_dir: str | os.PathLike[str],
    examples_df: pd.DataFrame,
    label_issues_df: pd.DataFrame | None = None,
    corrected_df: pd.DataFrame | None = None,
    metrics_df: pd.DataFrame | None = None,
    summary: Mapping[str, Any] | None = None,
    plots: Mapping[str, Any] | None = None,
    *,
    classes_df: pd.DataFrame | None = None,
    html: str | None = None,
    if_exists: IfExists = "error",
) -> ReportPaths:
    """Validate and write all reports of a run into `out_dir`, atomically as a set.

    Every table is validated before anything is written, so a bad column fails fast and
    leaves `out_dir` untouched.

    Parameters
    ----------
    out_dir : path-like
        Output folder.
    examples_df : pd.DataFrame
        One row per example (`EXAMPLES_SCHEMA`).
    label_issues_df : pd.DataFrame, optional
        Review export (`LABEL_ISSUES_SCHEMA`); default `label_issues_frame(examples_df)`.
        Always written most suspicious first.
    corrected_df : pd.DataFrame, optional
        `CORRECTED_LABELS_SCHEMA`; default `corrected_labels_frame(examples_df)` when
        `examples_df` has ``corrected_label`` and ``correction_source``, else every example with
        its label kept.
    metrics_df : pd.DataFrame, optional
        Per-epoch metrics (`METRICS_SCHEMA`: ``stage``, ``epoch`` and numeric columns);
        default empty.
    summary : mapping, optional
        Written as ``summary.json`` with ``dm_audit_schema_version`` added; numpy values and
        NaN are converted (NaN -> null).
    plots : mapping of str to Figure or path, optional
        Plot name -> matplotlib Figure (saved as PNG) or an existing PNG file (copied), written
        to ``plots/<name>.png``.
    classes_df : pd.DataFrame, optional
        Class health (`CLASSES_SCHEMA`, `dm_audit.class_health`); default an empty table.
    html : str, optional
        The self-contained ``report.html``; default one rendered from the tables, the summary
        and the plots (`dm_audit.html_report.render_report`).
    if_exists : {"error", "overwrite", "version"}
        What to do if `out_dir` already holds a run (`dm_audit.atomic.prepare_output_dir`).

    Returns
    -------
    ReportPaths
        Final paths (with ``if_exists="version"`` the folder may differ from `out_dir`).
    """
    tables = _validated_tables(examples_df, label_issues_df, corrected_df, metrics_df, classes_df)
    summary_out = {"dm_audit_schema_version": SCHEMA_VERSION, **dict(summary or {})}
    plot_items = _checked_plots(plots or {})
    if html is None:
        from dm_audit.html_report import render_report

        frames = (tables["examples"].to_pandas(), tables["classes"].to_pandas())
        html = render_report(summary_out, *frames, dict(plot_items))

    with staged_output_dir(
        out_dir, if_exists=if_exists, names=REPORT_FILES, owned=REPORT_OWNED_FILES
    ) as stage:
        root = stage.path
        atomic_write_parquet(root / "examples.parquet", tables["examples"])
        kill_point("report")
        for name in ("label_issues", "corrected_labels", "metrics", "classes"):
            atomic_write_parquet(root / f"{name}.parquet", tables[name])
        atomic_write_text(root / "report.html", html)
        plot_paths = _write_plots(root, plot_items)
        # summary.json last: readers that poll for it find the tables already in place.
        summary_out["files"] = [*REPORT_FILES, *(p.as_posix() for p in plot_paths.values())]
        atomic_write_json(root / "summary.json", summary_out)
        stage.commit()
    return ReportPaths.in_folder(stage.final_dir, plot_paths)


def _validated_tables(
    examples_df: pd.DataFrame,
    label_issues_df: pd.DataFrame | None,
    corrected_df: pd.DataFrame | None,
    metrics_df: pd.DataFrame | None,
    classes_df: pd.DataFrame | None,
) -> dict[str, pa.Table]:
    """Each report table (keyed by its name) checked against its schema, defaults filled in."""
    examples = table_from_frame(examples_df, EXAMPLES_SCHEMA)
    if label_issues_df is None:
        label_issues_df = label_issues_frame(examples_df)
    issues = table_from_frame(label_issues_df, LABEL_ISSUES_SCHEMA)
    # Enforce the contract "most suspicious first" whatever order the caller used.
    issues = issues.sort_by([("label_issue_score", "descending"), ("example_id", "ascending")])
    if corrected_df is None:
        corrected_df = _default_corrected(examples_df)
    corrected = table_from_frame(corrected_df, CORRECTED_LABELS_SCHEMA)
    if metrics_df is None:
        metrics_df = pd.DataFrame(
            {"stage": pd.Series([], dtype=str), "epoch": pd.Series([], dtype="int32")}
        )
    metrics = table_from_frame(metrics_df, METRICS_SCHEMA)
    if classes_df is None:
        classes_df = pd.DataFrame({f.name: pd.Series([], dtype=object) for f in CLASSES_SCHEMA})
    classes = table_from_frame(classes_df, CLASSES_SCHEMA)
    return {
        "examples": examples,
        "label_issues": issues,
        "corrected_labels": corrected,
        "metrics": metrics,
        "classes": classes,
    }


def _default_corrected(examples_df: pd.DataFrame) -> pd.DataFrame:
    """The corrected labels of `examples_df`, or every example with its label kept."""
    if {"corrected_label", "correction_source"} <= set(examples_df.columns):
        return corrected_labels_frame(examples_df)
    return pd.DataFrame(
        {
            "example_id": examples_df["example_id"].to_numpy(),
            "original_label": examples_df["given_label"].to_numpy(),
            "corrected_label": examples_df["given_label"].to_numpy(),
            "source": "kept",
        }
    )


def _checked_plots(plots: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(file stem, Figure or PNG path) of each plot, refusing bad names and missing files."""
    plot_items: list[tuple[str, Any]] = []
    for name, fig in plots.items():
        stem = name[:-4] if name.lower().endswith(".png") else name
        if not _PLOT_NAME.match(stem):
            raise DataError(f"plot name {name!r} must be letters, digits, '_', '-' or '.'")
        if isinstance(fig, str | os.PathLike):
            if not Path(fig).is_file():
                raise DataError(f"plot {name!r}: file {fig} does not exist")
        elif not hasattr(fig, "savefig"):
            raise DataError(f"plot {name!r} must be a matplotlib Figure or a PNG path")
        plot_items.append((stem, fig))
    return plot_items


def _write_plots(root: Path, plot_items: list[tuple[str, Any]]) -> dict[str, Path]:
    """Write each plot to ``root/plots/<stem>.png``; return the paths relative to `root`."""
    plot_paths: dict[str, Path] = {}
    if plot_items:
        (root / "plots").mkdir()
    for stem, fig in plot_items:
        target = root / "plots" / f"{stem}.png"
        if isinstance(fig, str | os.PathLike):
            shutil.copyfile(fig, target)
        else:
            atomic_write_png(target, fig)
        plot_paths[stem] = Path("plots") / f"{stem}.png"
    return plot_paths


def read_report(path: str | os.PathLike[str], schema: pa.Schema | None = None) -> pd.DataFrame:
    """Read a report written by `write_reports`, checking its schema version.

    Parameters
    ----------
    path : path-like
        A ``.parquet`` report.
    schema : pa.Schema, optional
        Expected schema; its columns must be present with the same types.

    Returns
    -------
    pd.DataFrame

    Raises
    ------
    DataError
        If the file lacks the version metadata, has another version, or misses a column.
    """
    p = Path(path)
    try:
        table = pq.read_table(p)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"cannot read report {p}: {exc}") from exc
    meta = table.schema.metadata or {}
    version = meta.get(VERSION_KEY)
    if version is None:
        raise DataError(f"{p} is not a dm-audit report (no {VERSION_KEY.decode()} metadata)")
    if version.decode() != SCHEMA_VERSION:
        raise DataError(
            f"{p} has report schema version {version.decode()}, "
            f"this dm-audit reads version {SCHEMA_VERSION}"
        )
    if schema is not None:
        for field in schema:
            if field.name not in table.column_names:
                raise DataError(f"{p}: missing column {field.name!r}")
            if not table.schema.field(field.name).type.equals(field.type):
                raise DataError(
                    f"{p}: column {field.name!r} is {table.schema.field(field.name).type}, "
                    f"expected {field.type}"
                )
    return table.to_pandas()
