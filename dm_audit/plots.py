"""Diagnostic plots of an audit (matplotlib, Agg canvas, no pyplot global state).

Each function returns a `matplotlib.figure.Figure`, or, given `path`, saves it as PNG atomically
and returns the path. Figures are built on their own Agg canvas, so they work headless, in
threads and in Dagster workers, and need no ``plt.close``.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dm_audit.atomic import atomic_write_png
from dm_audit.errors import DataError

__all__ = [
    "plot_class_health",
    "plot_noise_matrix",
    "plot_p_distribution",
    "plot_score_distribution",
    "plot_training_dynamics",
    "save_figure",
]

log = logging.getLogger(__name__)

# matplotlib warns once per character its font lacks (class names in CJK script, emoji): one
# line per plot says so instead.
_MISSING_GLYPH = re.compile(r"Glyph \d+ .* missing from font")

_FLAGGED = "#d62728"
_UNFLAGGED = "#1f77b4"


def _figure(width: float = 6.4, height: float = 4.2) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 100) -> Path:
    """Save `fig` as PNG at `path` atomically (the folder is created) and return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # Warnings are process-wide: one raised by another thread while this figure is drawn is
    # caught here too, and passed on below unchanged unless it is a missing glyph.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saved = atomic_write_png(p, fig, dpi=dpi)
    missing = [w for w in caught if _MISSING_GLYPH.search(str(w.message))]
    if missing:
        log.warning(
            "%s: the plot font has no glyph for %d character(s) of the labels; they show as boxes",
            p.name,
            len({str(w.message) for w in missing}),
        )
    for w in caught:
        if w not in missing:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return saved


def _finish(fig: Figure, path: str | os.PathLike[str] | None) -> Figure | Path:
    return fig if path is None else save_figure(fig, path)


def _values(x: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n) or arr.size == 0:
        raise DataError(f"{name} must be a non-empty 1-D array{f' of length {n}' if n else ''}")
    return arr


def _flags(x: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if x is None:
        return np.zeros(n, dtype=bool)
    arr = np.asarray(x)
    if arr.shape != (n,):
        raise DataError(f"{name} must have shape ({n},), got {arr.shape}")
    return arr.astype(bool)


def plot_p_distribution(
    p_given: np.ndarray,
    is_flagged: np.ndarray,
    *,
    path: str | os.PathLike[str] | None = None,
    bins: int = 40,
    title: str = "p(given label): flagged vs unflagged",
) -> Figure | Path:
    """Histogram of p_i for flagged and unflagged examples.

    Parameters
    ----------
    p_given : np.ndarray, shape (N,)
        Probability of the given label.
    is_flagged : np.ndarray, shape (N,), bool
        Label-issue flags.
    path : path-like, optional
        Save as PNG here and return the path.
    bins : int
        Histogram bins over [0, 1].
    title : str

    Returns
    -------
    Figure or Path
    """
    p = _values(p_given, "p_given")
    flagged = _flags(is_flagged, p.size, "is_flagged")
    fig = _figure()
    ax = fig.add_subplot()
    edges = np.linspace(0.0, 1.0, bins + 1)
    ax.hist(
        p[~flagged],
        bins=edges,
        alpha=0.7,
        color=_UNFLAGGED,
        label=f"unflagged ({(~flagged).sum()})",
    )
    ax.hist(p[flagged], bins=edges, alpha=0.7, color=_FLAGGED, label=f"flagged ({flagged.sum()})")
    ax.set_xlabel("p_i (probability of the given label)")
    ax.set_ylabel("examples")
    ax.set_yscale("log" if p.size > 2000 else "linear")
    ax.set_title(title)
    ax.legend()
    return _finish(fig, path)


def plot_training_dynamics(
    p_history: np.ndarray,
    is_flagged: np.ndarray,
    *,
    path: str | os.PathLike[str] | None = None,
    n_curves: int = 30,
    seed: int = 0,
    title: str = "training dynamics: p_i over epochs",
) -> Figure | Path:
    """Mean p_i per epoch (with the 25-75 % band) of flagged and unflagged examples.

    A sample of `n_curves` individual curves per group is drawn faintly behind the means: a DM
    model raises clean examples' p_i early and keeps mislabelled ones low.

    Parameters
    ----------
    p_history : np.ndarray, shape (N, E)
        p_i of each example at the end of each epoch (float16 is fine).
    is_flagged : np.ndarray, shape (N,), bool
    path : path-like, optional
    n_curves : int
        Individual curves drawn per group.
    seed : int
        Seed of the curve sample.
    title : str

    Returns
    -------
    Figure or Path
    """
    # Read in its own dtype, one epoch's column at a time: a float64 copy of the whole history
    # (and of each group's rows) is several times the N x E matrix.
    h = np.asarray(p_history)
    if h.ndim != 2 or h.shape[0] == 0 or h.shape[1] == 0:
        raise DataError(f"p_history must have shape (N, E) with N, E >= 1, got {h.shape}")
    flagged = _flags(is_flagged, h.shape[0], "is_flagged")
    epochs = np.arange(1, h.shape[1] + 1)
    rng = np.random.default_rng(seed)
    fig = _figure()
    ax = fig.add_subplot()
    for mask, colour, name in ((~flagged, _UNFLAGGED, "unflagged"), (flagged, _FLAGGED, "flagged")):
        rows = np.flatnonzero(mask)
        if rows.size == 0:
            continue
        sample = rng.choice(rows, size=min(n_curves, rows.size), replace=False)
        for r in sample:
            ax.plot(epochs, h[r].astype(np.float64), color=colour, alpha=0.12, linewidth=0.8)
        low, middle, high = _epoch_statistics(h, rows)
        ax.fill_between(epochs, low, high, color=colour, alpha=0.2, linewidth=0)
        ax.plot(
            epochs,
            middle,
            color=colour,
            linewidth=2.2,
            label=f"{name} mean ({rows.size})",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("p_i")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title)
    ax.legend(loc="best")
    return _finish(fig, path)


def _epoch_statistics(
    history: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 25th percentile, mean and 75th percentile of each epoch's p_i over `rows`.

    One epoch's column at a time in float64, so the transient is one column, not the rows'
    whole history.
    """
    out = np.empty((3, history.shape[1]))
    for e in range(history.shape[1]):
        column = history[rows, e].astype(np.float64)
        out[:, e] = (
            np.nanpercentile(column, 25),
            np.nanmean(column),
            np.nanpercentile(column, 75),
        )
    return out[0], out[1], out[2]


def plot_noise_matrix(
    matrix: np.ndarray,
    classes: Sequence[str] | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    title: str = "estimated noise: P(given label | true class)",
) -> Figure | Path:
    """Heat map of a noise transition matrix, rows = true class, columns = given label.

    Parameters
    ----------
    matrix : np.ndarray, shape (C, C)
        ``matrix[i, j] = P(given = j | true = i)`` (`estimate.NoiseEstimate.matrix`).
    classes : sequence of str, optional
        Class names for the axes (default: codes).
    path : path-like, optional
    title : str

    Returns
    -------
    Figure or Path
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise DataError(f"matrix must be square (C, C), got {m.shape}")
    c = m.shape[0]
    names = [str(x) for x in (classes if classes is not None else range(c))]
    if len(names) != c:
        raise DataError(f"classes has {len(names)} names for a {c}x{c} matrix")
    size = min(12.0, 3.0 + 0.45 * c)
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
    fig.colorbar(im, ax=ax, shrink=0.8)
    if c <= 30:
        ax.set_xticks(range(c), names, rotation=90 if c > 10 else 0)
        ax.set_yticks(range(c), names)
    if c <= 15:
        for i in range(c):
            for j in range(c):
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if m[i, j] < 0.5 else "black",
                )
    ax.set_xlabel("given label")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return _finish(fig, path)


def plot_score_distribution(
    scores: np.ndarray,
    threshold: float | None = None,
    *,
    is_flagged: np.ndarray | None = None,
    path: str | os.PathLike[str] | None = None,
    bins: int = 50,
    name: str = "label-issue score",
) -> Figure | Path:
    """Histogram of scores in [0, 1] with the threshold as a vertical line.

    Parameters
    ----------
    scores : np.ndarray, shape (N,)
        Label-issue or OOD scores.
    threshold : float, optional
        Drawn as a dashed line.
    is_flagged : np.ndarray, shape (N,), bool, optional
        Colour flagged examples separately.
    path : path-like, optional
    bins : int
    name : str
        What the scores are, for the axis label and title.

    Returns
    -------
    Figure or Path
    """
    s = _values(scores, "scores")
    fig = _figure()
    ax = fig.add_subplot()
    edges = np.linspace(0.0, 1.0, bins + 1)
    if is_flagged is None:
        ax.hist(s, bins=edges, color=_UNFLAGGED, alpha=0.8, label=f"all ({s.size})")
    else:
        flagged = _flags(is_flagged, s.size, "is_flagged")
        ax.hist(
            s[~flagged],
            bins=edges,
            color=_UNFLAGGED,
            alpha=0.7,
            label=f"unflagged ({(~flagged).sum()})",
        )
        ax.hist(
            s[flagged], bins=edges, color=_FLAGGED, alpha=0.7, label=f"flagged ({flagged.sum()})"
        )
    if threshold is not None:
        ax.axvline(
            float(threshold), color="black", linestyle="--", label=f"threshold {threshold:.3f}"
        )
    ax.set_xlabel(name)
    ax.set_ylabel("examples")
    ax.set_title(f"{name} distribution")
    ax.legend()
    return _finish(fig, path)


def plot_class_health(
    classes: Sequence[str],
    label_quality: np.ndarray,
    rows: np.ndarray,
    *,
    path: str | os.PathLike[str] | None = None,
    max_classes: int = 40,
) -> Figure | Path:
    """Horizontal bars of each class's estimated label quality, worst first.

    Parameters
    ----------
    classes : sequence of str
        Class names.
    label_quality : np.ndarray, shape (C,)
        Estimated share of right labels among the rows given each class.
    rows : np.ndarray, shape (C,)
        Rows given each class (written next to each bar).
    path : path-like, optional
    max_classes : int
        Only the worst this many classes are drawn (the table has them all).

    Returns
    -------
    Figure or Path
    """
    quality = _values(label_quality, "label_quality")
    counts = np.asarray(rows, dtype=np.int64)
    names = [str(x) for x in classes]
    if len(names) != quality.size or counts.shape != quality.shape:
        raise DataError("classes, label_quality and rows must have one entry per class")
    order = np.argsort(quality, kind="stable")[:max_classes]
    fig = _figure(6.4, min(12.0, 1.2 + 0.32 * order.size))
    ax = fig.add_subplot()
    y = np.arange(order.size)
    colours = [_FLAGGED if quality[i] < 0.9 else _UNFLAGGED for i in order]
    ax.barh(y, quality[order], color=colours)
    ax.set_yticks(y, [names[i] for i in order])
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.08)
    for yi, i in zip(y, order, strict=True):
        ax.text(
            min(quality[i] + 0.01, 1.0),
            yi,
            f"{quality[i]:.2f} · {counts[i]:,} rows",
            va="center",
            fontsize=7,
        )
    ax.set_xlabel("estimated share of right labels (red: below 0.9)")
    ax.set_title("label quality per class")
    return _finish(fig, path)
