"""``report.html``: one self-contained page a reviewer opens (no network, no scripts).

It shows the summary, class health, the plots (PNG inlined as data URIs), the most suspicious
rows with their given and suggested labels and, for image data, a thumbnail of each suspect next
to the closest few rows labelled with the suggested class, and the duplicate sets whose members
disagree. Everything interpolated into the page is escaped; images are the dataset's own PNG
bytes (decoded and re-encoded on loading), base64-encoded.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from dm_audit.atomic import figure_png

__all__ = ["SUSPECTS_SHOWN", "render_report"]

# Rows listed in the suspects table: a reviewer's session; the full list is label_issues.parquet.
SUSPECTS_SHOWN = 100
# Rows of the suggested class shown beside an image suspect: enough to judge the suggestion.
NEIGHBOURS_SHOWN = 3
DUPLICATE_SETS_SHOWN = 20

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:72em;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:middle}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:.75em}.card{border:1px solid #ddd;border-radius:6px;
padding:.5em 1em;min-width:9em}.card b{display:block;font-size:1.4em}
img.thumb{width:64px;height:64px;image-rendering:pixelated;border:1px solid #ccc}
figure{display:inline-block;margin:.5em}figure img{max-width:34em}
.bad{color:#b00}.muted{color:#777}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    return f"{float(value):.{digits}f}"


def _text_or_dash(value: Any) -> str:
    """A cell's text; a missing value (None, or NaN after a Parquet round trip) as a dash."""
    return "–" if value is None or (isinstance(value, float) and value != value) else str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_png(fig: Any) -> bytes:
    if isinstance(fig, str | os.PathLike):
        with open(fig, "rb") as f:
            return f.read()
    # At plots/*.png's resolution, so a report figure is rendered once for both
    # (`atomic.keep_png_renderings`); the page's style scales it down.
    return figure_png(fig)


def _cards(summary: Mapping[str, Any]) -> str:
    counts = summary.get("counts", {})
    health = summary.get("class_health", {})
    quality = summary.get("quality", {}) or {}
    noise = summary.get("noise_estimate", {})
    dups = summary.get("duplicates", {})
    items = [
        ("rows audited", _num(int(summary.get("n_audited", 0)))),
        ("classes", _num(int(summary.get("n_classes", 0)))),
        ("label health", _num(health.get("label_health_score"), 3)),
        ("estimated noise", _num(noise.get("confident_joint_rate"), 3)),
        ("label issues", _num(int(counts.get("label_issues", 0)))),
        ("auto-corrected", _num(int(counts.get("auto_corrected", 0)))),
        ("need review", _num(int(counts.get("needs_review", 0)))),
        ("set aside (OOD)", _num(int(counts.get("ood", 0)))),
        ("duplicate rows", _num(int(dups.get("near_duplicate_rows", 0)))),
        ("held-out rows leaked", _num(int(dups.get("leaked_rows", 0)))),
        ("accuracy before", _num(quality.get("accuracy_before"), 3)),
        ("accuracy after", _num(quality.get("accuracy_after"), 3)),
    ]
    return (
        '<div class="cards">'
        + "".join(f'<div class="card"><b>{value}</b>{_e(name)}</div>' for name, value in items)
        + "</div>"
    )


def _classes_section(classes: pd.DataFrame, health: Mapping[str, Any]) -> str:
    rows = []
    for r in classes.itertuples(index=False):
        confused = ", ".join(
            f"{_e(name)} ({share:.0%})"
            for name, share in zip(r.confused_with, r.confused_share, strict=True)
        )
        quality = (
            f'<span class="bad">{r.label_quality:.3f}</span>'
            if r.label_quality < 0.9
            else (f"{r.label_quality:.3f}")
        )
        rows.append(
            [_e(r[0]), _num(int(r.rows)), quality, _num(int(r.label_issues)), _num(int(r.ood)),
             confused or '<span class="muted">–</span>', _e(_text_or_dash(r.overlaps_most_with))]
        )  # fmt: skip
    table = _table(
        ["class", "rows", "label quality", "label issues", "OOD", "confused with", "overlaps most"],
        rows,
        numeric={1, 2, 3, 4},
    )
    pairs = health.get("overlapping_pairs", [])
    pair_rows = [
        [_e(" ↔ ".join(p["classes"])), _num(p["overlap"], 4)] for p in pairs if p["overlap"] > 0
    ]
    pair_table = (
        _table(["classes", "share of rows confused between them"], pair_rows, numeric={1})
        if pair_rows
        else '<p class="muted">No two classes overlap.</p>'
    )
    return (
        "<h2>Class health</h2><p>Estimated share of right labels per class (worst first) and "
        "where its wrongly labelled rows belong.</p>"
        + table
        + "<h3>Overlapping classes</h3>"
        + pair_table
    )


def _thumb(blob: bytes | None, title: str) -> str:
    if blob is None:
        return ""
    return f'<img class="thumb" alt="{_e(title)}" title="{_e(title)}" src="{_png_uri(blob)}">'


def _suspects_section(
    examples: pd.DataFrame, images: Sequence[bytes] | None, neighbours: Mapping[int, list[int]]
) -> str:
    shown_columns = [
        "example_id",
        "given_label",
        "suggested_label",
        "label_issue_score",
        "suggestion_confidence",
        "correction_source",
    ]
    # Only the shown columns of the flagged rows are copied and sorted; a column the frame
    # lacks is shown empty.
    present = [c for c in shown_columns if c in examples.columns]
    flagged = examples.loc[examples["is_label_issue"].to_numpy(dtype=bool), present]
    flagged = flagged.reindex(columns=shown_columns)
    top = flagged.sort_values(["label_issue_score", "example_id"], ascending=[False, True])
    top = top.head(SUSPECTS_SHOWN)
    headers = ["example", "given", "suggested", "score", "confidence", "decision"]
    if images is not None:
        headers = ["image", *headers, "rows of the suggested class"]
        ids = examples["example_id"].to_numpy(dtype=object)
    rows = []
    for position, r in zip(top.index, top.itertuples(index=False), strict=True):
        cells = [
            _e(r.example_id),
            _e(r.given_label),
            _e(r.suggested_label),
            _num(r.label_issue_score),
            _num(r.suggestion_confidence),
            _e(r.correction_source),
        ]
        if images is not None:
            near = "".join(
                _thumb(images[j], f"{ids[j]}: {r.suggested_label}")
                for j in neighbours.get(int(position), [])
            )
            cells = [_thumb(images[int(position)], str(r.example_id)), *cells, near]
        rows.append(cells)
    numeric = {3, 4} if images is None else {4, 5}
    shown = f"the {len(top):,} most suspicious of {len(flagged):,}"
    return (
        f"<h2>Suspected label issues</h2><p>{_e(shown)}; all are in label_issues.parquet.</p>"
        + (_table(headers, rows, numeric) if rows else '<p class="muted">None flagged.</p>')
    )


def _duplicates_section(examples: pd.DataFrame) -> str:
    if "near_duplicate_set" not in examples:
        return ""
    members = examples[examples["near_duplicate_set"].notna()]
    if members.empty:
        return "<h2>Duplicates</h2><p class='muted'>No exact or near-duplicate rows.</p>"
    groups = members.groupby("near_duplicate_set", sort=True)["given_label"]
    conflicting = [(name, group) for name, group in groups if group.nunique() > 1][
        :DUPLICATE_SETS_SHOWN
    ]
    rows = [
        [
            _e(name),
            _num(len(group)),
            _e(", ".join(f"{i}: {label}" for i, label in zip(
                members.loc[group.index, "example_id"], group, strict=True))),
        ]
        for name, group in conflicting
    ]  # fmt: skip
    text = (
        f"{len(members):,} rows in {members['near_duplicate_set'].nunique():,} duplicate sets; "
        f"sets whose members carry different labels:"
    )
    return (
        "<h2>Duplicates</h2><p>"
        + _e(text)
        + "</p>"
        + (
            _table(["set", "rows", "members: given label"], rows, numeric={1})
            if rows
            else '<p class="muted">None: every set agrees on its label.</p>'
        )
    )


def render_report(
    summary: Mapping[str, Any],
    examples: pd.DataFrame,
    classes: pd.DataFrame,
    figures: Mapping[str, Any],
    *,
    images: Sequence[bytes] | None = None,
    neighbours: Mapping[int, list[int]] | None = None,
) -> str:
    """The HTML page.

    Parameters
    ----------
    summary : mapping
        The summary.json content.
    examples : pd.DataFrame
        The examples report.
    classes : pd.DataFrame
        The classes report.
    figures : mapping of str to matplotlib Figure or PNG path
        Plots, inlined in order.
    images : sequence of bytes, optional
        PNG bytes of every row, for image data.
    neighbours : mapping of int to list of int, optional
        For a suspect's row number, rows of its suggested class to show beside it.
    """
    plots = "".join(
        f'<figure><img alt="{_e(name)}" src="{_png_uri(_figure_png(fig))}">'
        f"<figcaption>{_e(name.replace('_', ' '))}</figcaption></figure>"
        for name, fig in figures.items()
    )
    title = f"dm-audit report: {summary.get('source', '')}"
    body = (
        f"<h1>{_e(title)}</h1>"
        + _cards(summary)
        + _classes_section(classes, summary.get("class_health", {}))
        + _suspects_section(examples, images, neighbours or {})
        + _duplicates_section(examples)
        + "<h2>Plots</h2>"
        + plots
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def suggested_class_neighbours(
    space: np.ndarray,
    suspects: np.ndarray,
    suggested: np.ndarray,
    given: np.ndarray,
    trusted: np.ndarray,
    k: int = NEIGHBOURS_SHOWN,
) -> dict[int, list[int]]:
    """For each suspect row, the k closest trusted rows labelled with its suggested class.

    Parameters
    ----------
    space : np.ndarray, shape (N, D)
        Rows as compared (`dm_audit.duplicates.duplicate_space`).
    suspects : np.ndarray of int
        Row numbers to find neighbours for.
    suggested, given : np.ndarray of int, shape (N,)
        Suggested and given class codes.
    trusted : np.ndarray of bool, shape (N,)
        Rows that may be shown as examples of a class (not flagged).
    """
    out: dict[int, list[int]] = {}
    for i in np.asarray(suspects, dtype=np.int64).tolist():
        pool = np.flatnonzero(trusted & (given == suggested[i]))
        pool = pool[pool != i]
        if pool.size == 0:
            out[i] = []
            continue
        d = ((space[pool] - space[i]) ** 2).sum(axis=1)
        out[i] = pool[np.argsort(d, kind="stable")[:k]].tolist()
    return out
