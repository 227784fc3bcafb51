"""The small-class benchmark's stray labels, its two modes and its results table (nothing is
trained)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def small_classes():
    yield from load_benchmark("small_classes")


@pytest.fixture(scope="module")
def generality():
    yield from load_benchmark("generality")


def test_stray_rows_get_a_class_of_their_own(small_classes, generality, tmp_path) -> None:
    data = generality.SPECS["synth-tiny-wide"].build(tmp_path, 0)
    noisy = data.labels.copy()
    stray_data, codes = small_classes.with_stray_class(data, noisy, seed=4)
    assert stray_data.dataset.classes == [*data.dataset.classes, "stray"]
    assert data.dataset.classes[-1] != "stray"  # the input is not changed
    changed = np.flatnonzero(codes != noisy)
    assert changed.size == small_classes.STRAY_ROWS
    assert (codes[changed] == len(stray_data.dataset.classes) - 1).all()
    # Seeded, and the relabelled table is one the audit accepts.
    again = small_classes.with_stray_class(data, noisy, seed=4)[1]
    np.testing.assert_array_equal(codes, again)
    relabelled = generality.with_labels(stray_data.dataset, codes)
    assert (relabelled.table["label"] == "stray").sum() == small_classes.STRAY_ROWS


def test_the_modes_are_the_defaults_and_no_reference(small_classes) -> None:
    left, off = (small_classes.audit_config(mode, seed=2) for mode in small_classes.MODES)
    assert left.linear_reference is True and off.linear_reference is False
    for config in (left, off):
        assert config.seed == 2 and config.retrain is False


def test_only_development_datasets_run(small_classes, tmp_path) -> None:
    with pytest.raises(SystemExit, match="test dataset"):
        small_classes.run(["iris"], 0, tmp_path)


def test_the_results_table_pairs_the_modes(small_classes, tmp_path) -> None:
    left, off = small_classes.MODES

    def row(setting, rate, mode, f1, auroc, false_flags, stray):
        return {
            "dataset": "t",
            "setting": setting,
            "rate": rate,
            "mode": mode,
            "f1": f1,
            "auroc": auroc,
            "false_flags": false_flags,
            "stray_flagged": stray,
        }

    rows = [
        row("clean", 0.0, left, 0.5, 1.0, 0.01, 1),
        row("clean", 0.0, off, 0.2, 1.0, 0.04, 1),
        row("pair 20%", 0.2, left, 0.8, 0.9, 0.02, 1),
        row("pair 20%", 0.2, off, 0.9, 0.8, 0.05, 0),
    ]
    out = tmp_path / "small_classes.md"
    small_classes.write(rows, out, "cmd", seed=5, load=0.5, seconds=60.0)
    text = out.read_text()
    assert "`cmd` (seed 5," in text and "load average 0.50" in text and "1.0 min" in text
    assert "| t | pair 20% | 0.800 | 0.900 | 2.00% | 1 | 0.900 | 0.800 | 5.00% | 0 |" in text
    # Means: F1 and AUROC over the noisy settings, false flags on the clean table.
    assert f"| {left} | 0.800 | 0.900 | 0.0100 | 2 of 2 |" in text
    assert f"| {off} | 0.900 | 0.800 | 0.0400 | 1 of 2 |" in text
