"""Per-class label health from the estimated joint distribution of true and given labels.

Everything here reads the calibrated confident joint ``Q[i, j] = P(true = i, given = j)`` that
the flags already estimated (`dm_audit.estimate.NoiseEstimate.joint`):

* **label quality of class j**: the share of rows labelled j whose label is right,
  ``Q[j, j] / sum_i Q[i, j]``; its noise rate is the rest;
* **confused with**: the classes the wrongly labelled rows of j truly belong to, largest first,
  each with its share of the rows labelled j;
* **overlapping classes**: pairs (a, b) ranked by ``Q[a, b] + Q[b, a]``, the share of all rows
  that sit on either side of the pair's confusion. A pair far above the others is two classes
  the annotators (or the data) cannot tell apart: merge them, or write a rule that separates
  them;
* **label health score**: the estimated share of right labels, ``trace(Q)`` in [0, 1].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["CONFUSED_WITH", "OVERLAPPING_PAIRS", "class_health", "overlapping_pairs"]

# Confusions listed per class, and overlapping pairs in summary.json: a reviewer reads the top
# few; the full matrix is in the noise-matrix plot.
CONFUSED_WITH = 3
OVERLAPPING_PAIRS = 10


def overlapping_pairs(
    joint: np.ndarray, classes: list[str], top: int = OVERLAPPING_PAIRS
) -> list[dict[str, Any]]:
    """Class pairs ranked by their share of rows on either side of their confusion.

    Parameters
    ----------
    joint : np.ndarray, shape (C, C)
        ``P(true = i, given = j)``.
    classes : list of str
        Class names in code order.
    top : int
        Pairs returned (those with a positive overlap only).
    """
    q = np.asarray(joint, dtype=np.float64)
    sym = q + q.T
    a, b = np.triu_indices(len(classes), k=1)
    overlap = sym[a, b]
    order = np.lexsort((b, a, -overlap))
    out = []
    for i in order[:top]:
        if overlap[i] <= 0:
            break
        out.append(
            {
                "classes": [classes[a[i]], classes[b[i]]],
                "overlap": float(overlap[i]),
                # Rows labelled b that are a, and labelled a that are b, as shares of all rows.
                "labelled_second_but_first": float(q[a[i], b[i]]),
                "labelled_first_but_second": float(q[b[i], a[i]]),
            }
        )
    return out


def class_health(
    joint: np.ndarray,
    classes: list[str],
    given: np.ndarray,
    is_label_issue: np.ndarray,
    is_ood: np.ndarray,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The classes report and the summary's ``class_health`` section.

    Parameters
    ----------
    joint : np.ndarray, shape (C, C)
        Estimated ``P(true = i, given = j)``.
    classes : list of str
        Class names in code order.
    given : np.ndarray of int, shape (N,)
        Given labels as codes.
    is_label_issue, is_ood : np.ndarray of bool, shape (N,)
        The audit's flags.

    Returns
    -------
    frame : pd.DataFrame
        One row per class (`dm_audit.reports.CLASSES_SCHEMA`), worst label quality first.
    summary : dict
        ``label_health_score``, ``worst_classes`` and ``overlapping_pairs``.
    """
    q = np.asarray(joint, dtype=np.float64)
    c = len(classes)
    given = np.asarray(given, dtype=np.int64)
    rows = np.bincount(given, minlength=c)
    column = q.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        quality = np.where(column > 0, np.diag(q) / column, 1.0)
        # Column j of Q spread over the true classes: where rows labelled j truly belong.
        spread = np.where(column > 0, q / column, 0.0)
    confused_names, confused_shares = [], []
    pairs = overlapping_pairs(q, classes, top=c * (c - 1) // 2)
    for j in range(c):
        share = spread[:, j].copy()
        share[j] = 0.0
        order = [i for i in np.argsort(-share, kind="stable")[:CONFUSED_WITH] if share[i] > 0]
        confused_names.append([classes[i] for i in order])
        confused_shares.append([float(share[i]) for i in order])
    frame = pd.DataFrame(
        {
            "class": classes,
            "rows": rows.astype(np.int64),
            "share": rows / max(int(rows.sum()), 1),
            "label_quality": np.clip(quality, 0.0, 1.0),
            "noise_rate": np.clip(1.0 - quality, 0.0, 1.0),
            "label_issues": np.bincount(given[is_label_issue], minlength=c).astype(np.int64),
            "ood": np.bincount(given[is_ood], minlength=c).astype(np.int64),
            "confused_with": confused_names,
            "confused_share": confused_shares,
            "overlaps_most_with": [_partner(pairs, name) for name in classes],
        }
    )
    frame = frame.sort_values(["label_quality", "class"], kind="stable").reset_index(drop=True)
    summary = {
        "label_health_score": float(np.clip(np.trace(q), 0.0, 1.0)),
        "worst_classes": frame["class"].head(CONFUSED_WITH).tolist(),
        "overlapping_pairs": pairs[:OVERLAPPING_PAIRS],
    }
    return frame, summary


def _partner(pairs: list[dict[str, Any]], name: str) -> str | None:
    """The class `name` overlaps most with (pairs come ranked), or None."""
    for pair in pairs:
        if name in pair["classes"]:
            first, second = pair["classes"]
            return second if first == name else first
    return None
