"""The batch-size benchmark's two modes and its results table (nothing is trained)."""

from __future__ import annotations

import pytest

from dm_audit.crossfit import training_batch
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def batch_size():
    yield from load_benchmark("batch_size")


def test_the_modes_are_the_defaults_and_a_fixed_128_at_the_default_rate(batch_size) -> None:
    automatic = batch_size.audit_config("automatic", seed=3)
    fixed = batch_size.audit_config("batch 128", seed=3)
    for config in (automatic, fixed):
        assert config.seed == 3 and config.retrain is False and config.lr is None
    # A 10,000-row table's folds train on 5,000 rows: 256 automatically, 128 when fixed.
    assert training_batch(automatic, 5_000, "features") == (256, 2.0)
    assert training_batch(fixed, 5_000, "features") == (128, 1.0)


def test_only_development_tables_run(batch_size, tmp_path) -> None:
    assert set(batch_size.TABLES) == {"synth-binary-mid", "HI"}
    batch_size.TABLES["iris"] = "generality"  # a test-split dataset of the generality benchmark
    try:
        with pytest.raises(SystemExit, match="test dataset"):
            batch_size.load_table("iris", tmp_path)
    finally:
        del batch_size.TABLES["iris"]


def test_the_results_table_pairs_the_modes_and_means_the_noisy_settings(
    batch_size, tmp_path
) -> None:
    def row(setting, rate, mode, batch, f1, auroc, flagged, seconds):
        return {
            "dataset": "t",
            "rows": 10_000,
            "setting": setting,
            "rate": rate,
            "mode": mode,
            "batch": batch,
            "f1": f1,
            "auroc": auroc,
            "flagged_share": flagged,
            "seconds_to_flags": seconds,
        }

    auto, fixed = batch_size.MODES
    rows = [
        row("clean", 0.0, auto, 256, None, None, 0.01, 4.0),
        row("clean", 0.0, fixed, 128, None, None, 0.02, 8.0),
        row("pair 20%", 0.2, auto, 256, 0.8, 0.9, 0.2, 6.0),
        row("pair 20%", 0.2, fixed, 128, 0.7, 0.95, 0.2, 10.0),
        row("pair 40%", 0.4, auto, 256, 0.6, 0.7, 0.4, 8.0),
        row("pair 40%", 0.4, fixed, 128, 0.5, 0.85, 0.4, 12.0),
    ]
    out = tmp_path / "batch_size.md"
    batch_size.write(rows, out, "cmd", seed=7, load=1.25, seconds=120.0)
    text = out.read_text()
    assert "`cmd` (seed 7," in text and "load average 1.25" in text and "2.0 min" in text
    assert (
        "| t | pair 20% | 256 | 0.800 | 0.900 | 20.00% | 6.0 | 0.700 | 0.950 | 20.00% | 10.0 |"
        in text
    )
    assert "| t | clean | 256 | – | – | 1.00% | 4.0 | – | – | 2.00% | 8.0 |" in text
    # Means: F1 and AUROC over the noisy settings, flagged on the clean table, seconds over all.
    assert "| t | automatic | 0.700 | 0.800 | 0.0100 | 6.0 |" in text
    assert "| t | batch 128 | 0.600 | 0.900 | 0.0200 | 10.0 |" in text
