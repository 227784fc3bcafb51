"""Label-issue thresholds read from the distribution of the scores.

Two ways to cut the label-issue scores of `dm_audit.flags.label_issue_scores` where the score
density says clean and mislabelled examples part:

* `auto_threshold` starts from the cut that flags the estimated noise rate and moves it to the
  valley of the smoothed score density nearby (`dm_audit.flags.flag_label_issues` uses it when
  given a noise rate and no threshold);
* `mixture_split` fits a two-component Gaussian mixture and reads both a threshold and a noise
  rate off it (compared with the audit's per-class counts in benchmarks/flag_rules.py).

The audit itself flags by the calibrated confident joint's per-class counts
(`dm_audit.flags.flag_by_class_counts`); these rules serve callers of the array functions and
the benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dm_audit.errors import ConfigError
from dm_audit.score_components import validate_unit_vector

__all__ = ["ScoreSplit", "auto_threshold", "mixture_split"]


def _smoothed_density(scores: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    """Gaussian kernel density of `scores` on `grid`, via a 512-bin histogram (O(N + grid))."""
    hist, edges = np.histogram(scores, bins=512, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    z = (grid[:, None] - centres[None, :]) / bandwidth
    return np.exp(-0.5 * z * z) @ hist


def auto_threshold(
    scores: np.ndarray,
    noise_rate: float | None = None,
    *,
    window: float = 0.3,
    min_score: float = 0.5,
    bandwidth: float = 0.02,
) -> float:
    """Choose a label-issue threshold from the estimated noise rate; flag ``scores > threshold``.

    1. Start from the cut that flags the top `noise_rate` fraction.
    2. Search the smoothed score density for its lowest point (the valley between the clean and
       the mislabelled mode) among the cuts that flag between ``(1 - window)`` and
       ``(1 + window)`` times that fraction. If it is an interior minimum (a real valley), move
       the cut to the valley: to the near-minimal point (density within 25 % of the minimum)
       closest to the quantile cut, since wide flat valleys have a noisy exact minimum. Else
       keep the quantile cut. This corrects a noise estimate that is off by a few points without
       trusting a valley far from it.
    3. Never go below `min_score`: an example is only flagged when the combined evidence leans
       towards another label (0.5 = the model is torn). On clean data this keeps the flags to the
       few examples the model really contradicts.

    Without a noise rate the threshold is `min_score`.

    Parameters
    ----------
    scores : np.ndarray, shape (N,)
        Label-issue scores in [0, 1].
    noise_rate : float, optional
        Estimated fraction of wrong labels (`estimate_noise`), in [0, 1].
    window : float
        Relative width of the valley search around the noise-rate cut, in [0, 1).
    min_score : float
        Lowest allowed threshold, in [0, 1].
    bandwidth : float
        Kernel bandwidth of the density, on the [0, 1] score scale.

    Returns
    -------
    float
        The threshold; 1.0 flags nothing.
    """
    s = validate_unit_vector(scores, "scores")
    if not 0.0 <= min_score <= 1.0:
        raise ConfigError(f"min_score must be in [0, 1], got {min_score!r}")
    if not 0.0 <= window < 1.0:
        raise ConfigError(f"window must be in [0, 1), got {window!r}")
    if not bandwidth > 0:
        raise ConfigError(f"bandwidth must be > 0, got {bandwidth!r}")
    if noise_rate is None:
        return float(min_score)
    if not 0.0 <= noise_rate <= 1.0:
        raise ConfigError(f"noise_rate must be in [0, 1], got {noise_rate!r}")
    m = round(noise_rate * s.size)
    if m == 0:
        return 1.0
    desc = np.sort(s)[::-1]
    t = _cut(desc, m)
    t_low, t_high = (
        _cut(desc, math.ceil(m * (1 + window))),
        _cut(desc, math.floor(m * (1 - window))),
    )
    if t_high - t_low > 1e-6:
        t = _valley_cut(s, t, t_low, t_high, bandwidth)
    return float(max(t, min_score))


def _cut(desc: np.ndarray, count: int) -> float:
    """The threshold that flags the `count` highest of the scores `desc` (sorted descending).

    Midway between the last flagged and the first unflagged score.
    """
    n = desc.size
    count = int(np.clip(count, 1, n))
    return (
        float(desc[count - 1] - 1e-9) if count >= n else float((desc[count - 1] + desc[count]) / 2)
    )


def _valley_cut(s: np.ndarray, t: float, t_low: float, t_high: float, bandwidth: float) -> float:
    """Move the cut `t` to the lowest point of the score density in [t_low, t_high], if interior."""
    grid = np.linspace(t_low, t_high, 201)
    density = _smoothed_density(s, grid, bandwidth)
    i = int(np.argmin(density))
    if 0 < i < grid.size - 1:
        # A valley between two well-fitted modes is often a wide, flat stretch whose exact
        # minimum is noise: among the near-minimal cuts keep the one closest to the
        # noise-rate cut.
        near = grid[density <= density[i] * 1.25]
        t = float(near[np.argmin(np.abs(near - t))])
    return t


@dataclass(frozen=True)
class ScoreSplit:
    """A two-component mixture fitted to label-issue scores.

    Attributes
    ----------
    threshold : float
        Flag scores at or above it.
    noise_rate : float
        Share of scores at or above the threshold: the estimated share of wrong labels. (The
        high component's weight is not used: on clean data it models the tail of the clean
        scores and reads 3-13 % on digits, where the share above the threshold reads 0-0.2 %.)
    means : tuple of float
        Component means, low then high.
    weights : tuple of float
        Component weights, low then high.
    """

    threshold: float
    noise_rate: float
    means: tuple[float, float]
    weights: tuple[float, float]


def mixture_split(
    scores: np.ndarray,
    *,
    bounds: tuple[float, float] = (0.3, 0.5),
    seed: int = 0,
) -> ScoreSplit:
    """Estimate the noise rate and a threshold from a two-component Gaussian mixture on scores.

    Clean examples form a low mode and mislabelled ones a high mode. The threshold is the lowest
    score (above the low mode) at which an example is at least as likely to belong to the high
    component, clipped to `bounds`:
    below the lower bound the model still favours the given label on average (clean data then
    flags almost nothing), and at the upper bound the given label was below one half on average,
    evidence enough even when the modes are far apart and the boundary drifts towards the high
    one. The share of scores at or above the threshold estimates the noise rate.

    Parameters
    ----------
    scores : np.ndarray, shape (N,)
        Label-issue scores in [0, 1].
    bounds : (float, float)
        Lowest and highest threshold allowed.
    seed : int
        Seeds the mixture's initialisation.

    Returns
    -------
    ScoreSplit
    """
    from sklearn.mixture import GaussianMixture

    s = validate_unit_vector(scores, "scores")
    low, high = bounds
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"bounds must satisfy 0 <= low <= high <= 1, got {bounds}")
    if s.size < 4 or np.ptp(s) < 1e-9:
        # Too few or identical scores: nothing to separate, keep the cautious upper bound.
        return ScoreSplit(high, float(np.mean(s >= high)), (float(s.mean()),) * 2, (1.0, 0.0))
    mixture = GaussianMixture(2, random_state=seed, reg_covar=1e-4).fit(s[:, None])
    order = np.argsort(mixture.means_.ravel())
    means = mixture.means_.ravel()[order]
    weights = mixture.weights_[order]
    grid = np.linspace(0.0, 1.0, 1001)
    posterior_high = mixture.predict_proba(grid[:, None])[:, order[1]]
    above = grid[(posterior_high >= 0.5) & (grid >= means[0])]
    threshold = float(np.clip(above[0] if above.size else 1.0, low, high))
    return ScoreSplit(
        threshold,
        float(np.mean(s >= threshold)),
        (float(means[0]), float(means[1])),
        (float(weights[0]), float(weights[1])),
    )
