"""Turn stage results into the metadata people read in the Dagster UI: tables and plots.

Presentation only: every number shown here was computed by `dm_audit`.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

__all__ = ["image_markdown", "markdown_table", "scalar_metadata"]

# Data-URI images larger than this are linked by path instead: the event log stores metadata in
# its database, and megabyte-sized rows slow the UI down.
MAX_INLINE_IMAGE_BYTES = 400_000


def _cell(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return "" if math.isnan(value) else f"{float(value):.4g}"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    # A pipe or newline inside a cell would break the Markdown row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    frame: pd.DataFrame, columns: Sequence[str] | None = None, max_rows: int = 20
) -> str:
    """A Markdown table of the first ``max_rows`` rows of ``frame``.

    Parameters
    ----------
    frame : pandas.DataFrame
        Rows to show, already in display order.
    columns : sequence of str, optional
        Columns to show, in order; names absent from ``frame`` are skipped.
    max_rows : int
        Rows shown; a final line says how many more there are.

    Returns
    -------
    str
        GitHub-flavoured Markdown.
    """
    cols = [c for c in (columns or list(frame.columns)) if c in frame.columns]
    if not cols or frame.empty:
        return "_no rows_"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame[cols].head(max_rows).itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    if len(frame) > max_rows:
        lines.append(f"\n_{len(frame) - max_rows} more rows not shown_")
    return "\n".join(lines)


def image_markdown(path: Path, title: str) -> dg.MetadataValue:
    """A PNG as Markdown metadata, embedded as a data URI so the UI shows it inline.

    Images above `MAX_INLINE_IMAGE_BYTES` are given as a path instead.
    """
    data = path.read_bytes()
    if len(data) > MAX_INLINE_IMAGE_BYTES:
        return dg.MetadataValue.path(str(path))
    encoded = base64.b64encode(data).decode("ascii")
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")


# A person reads 0.9940, not 0.9940378116478161; four digits still tell 0.9852 from 0.9814.
SIGNIFICANT_DIGITS = 4


def scalar_metadata(values: Mapping[str, Any]) -> dict[str, dg.MetadataValue]:
    """Typed metadata for plain numbers, flags and text; None and NaN become ``null``.

    Floats are shown to `SIGNIFICANT_DIGITS` significant digits (the exact values are in
    summary.json); nested values (lists, dicts) are shown as JSON.
    """
    out: dict[str, dg.MetadataValue] = {}
    for key, value in values.items():
        if value is None or (isinstance(value, float | np.floating) and math.isnan(value)):
            out[key] = dg.MetadataValue.null()
        elif isinstance(value, bool | np.bool_):
            out[key] = dg.MetadataValue.bool(bool(value))
        elif isinstance(value, int | np.integer):
            out[key] = dg.MetadataValue.int(int(value))
        elif isinstance(value, float | np.floating):
            out[key] = dg.MetadataValue.float(float(f"{float(value):.{SIGNIFICANT_DIGITS}g}"))
        elif isinstance(value, Mapping | list | tuple):
            out[key] = dg.MetadataValue.json(_jsonable(value))
        else:
            out[key] = dg.MetadataValue.text(str(value))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
