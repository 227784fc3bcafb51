"""Diagnostic plots: valid PNGs, figures, input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from dm_audit.errors import DataError
from dm_audit.plots import (
    plot_noise_matrix,
    plot_p_distribution,
    plot_score_distribution,
    plot_training_dynamics,
    save_figure,
)

RNG = np.random.default_rng(0)
P = np.concatenate([RNG.beta(8, 1, 900), RNG.beta(1, 8, 100)])
FLAGGED = np.arange(1000) >= 900


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.width > 200 and img.height > 200


def test_each_plot_returns_a_figure_or_writes_a_png(tmp_path: Path) -> None:
    history = np.clip(P[:, None] * (1 - np.exp(-np.arange(1, 16) / 3))[None], 0, 1)
    matrix = 0.8 * np.eye(4) + 0.2 * np.roll(np.eye(4), 1, axis=1)
    calls = {
        "p": lambda path: plot_p_distribution(P, FLAGGED, path=path),
        "dynamics": lambda path: plot_training_dynamics(
            history.astype(np.float16), FLAGGED, path=path, n_curves=10
        ),
        "matrix": lambda path: plot_noise_matrix(matrix, ["a", "b", "c", "d"], path=path),
        "scores": lambda path: plot_score_distribution(1 - P, 0.5, is_flagged=FLAGGED, path=path),
        "ood": lambda path: plot_score_distribution(1 - P, name="OOD score", path=path),
    }
    for name, call in calls.items():
        fig = call(None)
        assert isinstance(fig, Figure) and fig.axes
        path = call(tmp_path / "nested" / f"{name}.png")
        assert path == tmp_path / "nested" / f"{name}.png"
        _assert_png(path)
    assert not [p for p in (tmp_path / "nested").iterdir() if ".tmp-" in p.name]


def test_large_matrix_and_no_flags(tmp_path: Path) -> None:
    fig = plot_noise_matrix(np.eye(100))  # no per-cell text or ticks at 100 classes
    _assert_png(save_figure(fig, tmp_path / "m.png"))
    fig = plot_training_dynamics(np.full((5, 3), 0.5), np.zeros(5, bool))
    assert len(fig.axes[0].lines) == 6  # 5 curves + the unflagged mean


def test_plots_validate_inputs() -> None:
    with pytest.raises(DataError, match="is_flagged"):
        plot_p_distribution(P, FLAGGED[:10])
    with pytest.raises(DataError, match="p_history"):
        plot_training_dynamics(np.zeros(5), np.zeros(5, bool))
    with pytest.raises(DataError, match="square"):
        plot_noise_matrix(np.zeros((2, 3)))
    with pytest.raises(DataError, match="3 names"):
        plot_noise_matrix(np.eye(2), ["a", "b", "c"])
    with pytest.raises(DataError, match="scores"):
        plot_score_distribution(np.array([]))


def test_training_dynamics_bands_are_the_groups_epoch_statistics() -> None:
    """The mean line and the 25-75 % band are each epoch's statistics over the group's rows,
    computed one epoch at a time from the float16 history as from its float64 copy."""
    rng = np.random.default_rng(3)
    history = rng.random((500, 6)).astype(np.float16)
    history[rng.random(history.shape) < 0.05] = np.nan  # epochs a row was not recorded
    flagged = rng.random(500) < 0.3
    fig = plot_training_dynamics(history, flagged)
    ax = fig.axes[0]
    full = history.astype(np.float64)
    means = [line for line in ax.lines if line.get_linewidth() > 2]
    assert len(means) == 2
    for group, line in zip((~flagged, flagged), means, strict=True):
        np.testing.assert_allclose(line.get_ydata(), np.nanmean(full[group], axis=0))
    bands = ax.collections
    assert len(bands) == 2
    for group, band in zip((~flagged, flagged), bands, strict=True):
        vertices = band.get_paths()[0].vertices[:, 1]
        for q in (25, 75):
            expected = np.nanpercentile(full[group], q, axis=0)
            assert np.isclose(vertices[:, None], expected[None, :]).any(axis=0).all()


def test_labels_the_font_cannot_draw_give_one_warning_per_plot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    with caplog.at_level("WARNING", logger="dm_audit.plots"):
        path = plot_noise_matrix(np.eye(3), ["猫", "犬", "鳥"], path=tmp_path / "m.png")
    _assert_png(Path(path))
    assert not [w for w in recwarn if "missing from font" in str(w.message)]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "m.png: the plot font has no glyph for 3 character(s) of the labels; they show as boxes"
    ]
