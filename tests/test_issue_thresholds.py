"""Tests of dm_audit.issue_thresholds: the noise-rate cut and the two-component mixture split."""

from __future__ import annotations

import numpy as np
import pytest

from dm_audit.errors import ConfigError
from dm_audit.issue_thresholds import auto_threshold, mixture_split


def test_auto_threshold_without_a_rate_nothing_to_flag_and_a_bad_rate() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.6])
    assert auto_threshold(scores) == 0.5  # no rate: the floor
    assert auto_threshold(scores, 0.0) == 1.0  # nothing to flag
    with pytest.raises(ConfigError, match="noise_rate"):
        auto_threshold(scores, 1.2)


def test_mixture_split_estimates_the_noise_rate_and_separates_the_modes() -> None:
    rng = np.random.default_rng(0)
    clean = np.clip(rng.normal(0.1, 0.05, 700), 0, 1)
    noisy = np.clip(rng.normal(0.9, 0.05, 300), 0, 1)
    split = mixture_split(np.concatenate([clean, noisy]))
    assert split.noise_rate == pytest.approx(0.3, abs=0.01)
    assert split.means == pytest.approx((0.1, 0.9), abs=0.01)
    # The boundary lies between the modes, clipped to the default bounds.
    assert 0.3 <= split.threshold <= 0.5
    assert (clean >= split.threshold).mean() < 0.01
    assert (noisy >= split.threshold).mean() > 0.99


def test_mixture_split_on_clean_scores_flags_almost_nothing() -> None:
    rng = np.random.default_rng(1)
    scores = np.clip(rng.gamma(2.0, 0.03, 2000), 0, 1)
    split = mixture_split(scores)
    assert (scores >= split.threshold).mean() <= 0.03


def test_mixture_split_rejects_bad_bounds_and_handles_constant_scores() -> None:
    with pytest.raises(ConfigError):
        mixture_split(np.linspace(0, 1, 10), bounds=(0.6, 0.4))
    split = mixture_split(np.full(10, 0.2))
    assert split.threshold == 0.5 and split.noise_rate == 0.0
