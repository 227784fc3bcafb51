"""Heavy-tailed feature columns, read by the audit through the normal scores of their ranks.

Every model and search of the audit standardises a feature by its mean and standard deviation:
the networks (`dm_audit.batches.prepare_batch`), the linear reference, the input-space
neighbours of the duplicates and the OOD score. When a few extreme values hold most of a
column's variance (incomes, counts, prices, a sensor's glitches), that standard deviation is
theirs, and every other row of the column is squeezed into a sliver of it: the column then
separates the extreme rows from the rest and little else, and rows that differ only there look
like strangers to their class. Tree ensembles do not notice (they split on ranks); a network and
a linear model do.

A column counts as heavy-tailed when its `HEAVY_TAIL_ROWS` share of rows farthest from the mean
holds more than `HEAVY_TAIL_SHARE` of its variance, and so do those of its rows away from its most
common value (`heavy_tailed_columns`: a spike of zeros is not a tail). Such a column is
replaced by the normal scores of its ranks (`fit_heavy_tail_map`: tied rows share the score of
their mean rank, so a column of few values keeps few values, and the map is monotone, so the
order of the rows and any exact duplicate are kept). Every other column is left as it is: on a
table without such a column (of the benchmarks' datasets, all but breast cancer, glass
fragments, College and Caravan) the audit reads exactly what it read before.

Measured on a development table made for this (1,500 rows, 3 classes, 10 columns exp() of
Gaussian features times log-normal units, 1 % of the values 100 times too large): on the clean
table 9.5 % of the rows were flagged with the raw columns and 1.1 % with their normal scores; at
20 % symmetric noise F1 0.654 -> 0.895 (cleanlab with HistGradientBoosting 0.845;
benchmarks/heavy_tails.py). The map is kept with the models trained on the mapped columns
(`dm_audit.stage_results.CrossFit.input_map`), so that their predictions of new rows read them
the same way.

Cost: one pass over the features per audit. A table with a heavy-tailed column holds a second,
mapped copy of its features for the audit (512 MB at a million rows of 128 float32 features);
a table without one shares its features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import ndtri

from dm_audit.dataset import AuditDataset

__all__ = [
    "HEAVY_TAIL_ROWS",
    "HEAVY_TAIL_SHARE",
    "NOTES_KEY",
    "TAIL_MIN_ROWS",
    "HeavyTailMap",
    "fit_heavy_tail_map",
    "heavy_tailed_columns",
    "tame_heavy_tails",
]

log = logging.getLogger(__name__)

# The extreme rows: the 1 % of a column's rows farthest from its mean (at least one row).
HEAVY_TAIL_ROWS = 0.01
# The test needs this many rows (away from the most common value): with fewer, its extreme 1 %
# rounds up to one row of fewer than a hundred, and a handful of values is no tail. On digits,
# three edge pixels of 1,788-1,793 zeros and 4-9 other values were read by rank without it,
# and the mean F1 at 20-40 % noise moved 0.867 -> 0.859 (benchmarks/generality.py, dev).
TAIL_MIN_ROWS = round(1 / HEAVY_TAIL_ROWS)
# A column is heavy-tailed when those rows hold more than half its variance: the other 99 % of
# the rows then lie within 0.71 standard deviations of the mean (root mean square). A Gaussian
# column's extreme 1 % hold 9 % of its variance, a uniform one's 3 %, a log-normal one's 21 %
# (sigma 0.5), 49 % (sigma 1) and nearly all of it (sigma 2). On the benchmarks' tables
# (benchmarks/generality.py, real_tables.py's two pools) the share is below 0.5 in most
# columns. It is above it in columns of rare counts (digits' edge pixels, 27 of Caravan's),
# which the spike rule and `TAIL_MIN_ROWS` leave as they are but for one of Caravan's, and in a
# few measurements with outliers: one column each of breast cancer, glass fragments and College
# is mapped (Khan's two, of 83 rows, are not).
HEAVY_TAIL_SHARE = 0.5
# Where the audited dataset's notes (summary.json ``input``) list the columns it read by rank.
NOTES_KEY = "heavy_tailed_features"
# Columns examined per block: one block's float64 copy, its squared deviations and their
# partition are held at a time (at a million rows, 32 MB each).
_BLOCK_COLUMNS = 4


def _tail_heavy(block: np.ndarray) -> np.ndarray:
    """Per column of ``block`` (N, k): whether its extreme rows hold most of its variance."""
    n = len(block)
    if n < TAIL_MIN_ROWS:
        return np.zeros(block.shape[1], dtype=bool)
    extreme = int(np.ceil(HEAVY_TAIL_ROWS * n))
    # An infinite value is refused later, naming it (`dm_audit.tabular.check_finite`); here it
    # only makes its column's variance undefined, and such a column is not mapped.
    with np.errstate(invalid="ignore", over="ignore"):
        squared = (block - block.mean(axis=0)) ** 2
        total = squared.sum(axis=0)
    top = np.partition(squared, n - extreme, axis=0)[n - extreme :].sum(axis=0)
    return np.isfinite(total) & (total > 0) & (top > HEAVY_TAIL_SHARE * total)


def heavy_tailed_columns(features: np.ndarray) -> np.ndarray:
    """Positions of the columns whose extreme rows hold more than half of their variance.

    A spike of rows at one value (the zeros of a column of rare counts, a sparse pixel) is not a
    tail: standardising cannot squeeze rows that are all alike. The test is therefore made again
    on the rows away from the column's most common value, and the column is heavy-tailed only
    when those rows' extremes too hold most of their variance (a zero-inflated income is; an
    edge pixel of digits, mostly 0 and otherwise 1 to 16, is not). So a column of two values is
    never listed (its rows off the mode are all alike): its normal scores would be an affine
    image of it, which every reader standardises to the same feature.

    Parameters
    ----------
    features : ndarray (N, D)

    Returns
    -------
    ndarray of int64
        Ascending column positions; empty when no column is heavy-tailed.
    """
    return np.asarray([column for column, _, _ in _heavy_columns(features)], dtype=np.int64)


def _heavy_columns(features: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Each heavy-tailed column's position, distinct values (ascending) and their counts."""
    x = np.asarray(features)
    heavy: list[tuple[int, np.ndarray, np.ndarray]] = []
    for start in range(0, x.shape[1], _BLOCK_COLUMNS):
        block = x[:, start : start + _BLOCK_COLUMNS].astype(np.float64)
        for j in np.flatnonzero(_tail_heavy(block)):
            column = block[:, j]
            values, counts = np.unique(column, return_counts=True)
            # Two values: the rows off the mode are all alike, and fail the test.
            off_mode = column[column != values[counts.argmax()]]
            if _tail_heavy(off_mode[:, None])[0]:
                heavy.append((start + int(j), values, counts))
    return heavy


@dataclass(frozen=True)
class HeavyTailMap:
    """Monotone maps of some feature columns onto the normal scores of their ranks.

    Attributes
    ----------
    columns : ndarray of int64
        The mapped columns' positions.
    knots : list of ndarray
        Per mapped column, its distinct values in the rows it was fitted on, ascending.
    scores : list of ndarray
        Per mapped column, the normal score of each of those values: ``Φ⁻¹`` of the mean of
        its rows' ranks, ``(rank - 0.5) / N``.
    """

    columns: np.ndarray
    knots: list[np.ndarray]
    scores: list[np.ndarray]

    def apply(self, features: np.ndarray) -> np.ndarray:
        """A float32 copy of ``features`` with the mapped columns replaced by their scores.

        Values between two knots are interpolated linearly; values beyond the fitted range get
        the score of the nearest end.
        """
        out = np.array(features, dtype=np.float32, copy=True)
        for column, knots, scores in zip(self.columns, self.knots, self.scores, strict=True):
            out[:, column] = np.interp(out[:, column], knots, scores).astype(np.float32)
        return out

    def describe(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """What the report says: each mapped feature's position, and its column when known."""
        out: list[dict[str, Any]] = []
        for column in self.columns:
            entry: dict[str, Any] = {"feature": int(column)}
            if names is not None and int(column) < len(names):
                entry["column"] = names[int(column)]
            out.append(entry)
        return out


def fit_heavy_tail_map(features: np.ndarray) -> HeavyTailMap | None:
    """The normal-score map of the heavy-tailed columns of ``features``; None when there are none.

    Parameters
    ----------
    features : ndarray (N, D)

    Returns
    -------
    HeavyTailMap or None
    """
    heavy = _heavy_columns(features)
    if not heavy:
        return None
    n = len(features)
    knots: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    for _, values, counts in heavy:
        # Tied rows share the mean of their ranks: the k-th distinct value's rows hold ranks
        # first+1 .. first+count.
        first = np.cumsum(counts) - counts
        mean_rank = first + (counts + 1) / 2.0
        knots.append(values)
        scores.append(ndtri((mean_rank - 0.5) / n))
    columns = np.asarray([column for column, _, _ in heavy], dtype=np.int64)
    return HeavyTailMap(columns, knots, scores)


def _feature_names(dataset: AuditDataset, width: int) -> list[str] | None:
    """The input column of each feature, when the dataset's notes say (tabular inputs)."""
    names: list[str] = []
    for entry in dataset.notes.get("inputs", []):
        encoding = str(entry.get("encoding", ""))
        if encoding == "one-hot":
            names += [str(entry["column"])] * len(entry.get("categories", []))
        elif encoding == "numeric" or encoding.startswith(("boolean", "date")):
            names.append(str(entry["column"]))
        else:
            return None
    return names if len(names) == width else None


def tame_heavy_tails(dataset: AuditDataset) -> AuditDataset:
    """The dataset as the audit reads it: heavy-tailed feature columns by their normal scores.

    The result's notes list the mapped columns under `NOTES_KEY` (an empty list: none), which
    also marks it as examined, so calling this again returns it as it is. Image datasets and
    datasets already examined are returned unchanged; the input is never modified.

    Parameters
    ----------
    dataset : AuditDataset

    Returns
    -------
    AuditDataset
        A new dataset with the same rows (sharing the features themselves when no column is
        mapped); its `heavy_tail_map` is the map used (None when no column was mapped).
    """
    if dataset.input_kind != "features" or NOTES_KEY in dataset.notes:
        return dataset
    features = dataset.features()
    mapping = fit_heavy_tail_map(features) if len(features) else None
    notes = dict(dataset.notes)
    if mapping is None:
        notes[NOTES_KEY] = []
        return dataset.with_features(features, notes=notes)
    notes[NOTES_KEY] = mapping.describe(_feature_names(dataset, features.shape[1]))
    shown = ", ".join(str(e.get("column", f"feature {e['feature']}")) for e in notes[NOTES_KEY][:5])
    more = f" and {len(notes[NOTES_KEY]) - 5} more" if len(notes[NOTES_KEY]) > 5 else ""
    log.info(
        "%s: %d heavy-tailed feature column(s) (%s%s) read by the normal scores of their ranks "
        "(summary.json input.heavy_tailed_features)",
        dataset.source,
        len(notes[NOTES_KEY]),
        shown,
        more,
    )
    tamed = dataset.with_features(mapping.apply(features), notes=notes)
    tamed.heavy_tail_map = mapping
    return tamed
