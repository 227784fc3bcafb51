"""The heavy-tails benchmark's tables and its results table (nothing is trained)."""

from __future__ import annotations

import numpy as np
import pytest

from dm_audit.heavy_tails import heavy_tailed_columns
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def heavy_tails():
    yield from load_benchmark("heavy_tails")


def test_the_tables_have_the_heavy_columns_they_are_built_for(heavy_tails) -> None:
    x, y = heavy_tails.exp_outliers(0)
    assert x.shape == (1500, 10) and np.bincount(y).size == 3
    assert heavy_tailed_columns(x).tolist() == list(range(10))
    x, y = heavy_tails.zero_inflated(0)
    assert x.shape == (2000, 12) and np.bincount(y).size == 4
    # The incomes (every other column) and nothing else.
    assert heavy_tailed_columns(x).tolist() == list(range(0, 12, 2))
    assert (x[:, 0] == 0).mean() == pytest.approx(heavy_tails.NO_INCOME_SHARE, abs=0.05)
    np.testing.assert_array_equal(heavy_tails.zero_inflated(0)[0], x)  # seeded


def test_the_results_table_lists_every_method_and_errors(heavy_tails, tmp_path) -> None:
    rows = [
        {
            "table": "exp-outliers",
            "columns": 10,
            "mapped": 10,
            "setting": "clean",
            "method": "dm-audit",
            "f1": None,
            "auroc": None,
            "flagged_share": 0.011,
            "seconds": 4.0,
        },
        {
            "table": "exp-outliers",
            "columns": 10,
            "mapped": 10,
            "setting": "symmetric 20%",
            "method": heavy_tails.RAW,
            "f1": 0.654,
            "auroc": 0.915,
            "flagged_share": 0.328,
            "seconds": 5.0,
        },
        {
            "table": "zero-inflated",
            "columns": 12,
            "mapped": 6,
            "setting": "pair 20%",
            "method": "cleanlab + HGB",
            "error": "boom",
        },
    ]
    out = tmp_path / "heavy_tails.md"
    heavy_tails.write(rows, out, "cmd", seed=2, load=0.5, seconds=120.0)
    text = out.read_text()
    assert "`cmd` (seed 2," in text and "load average 0.50" in text and "2.0 min" in text
    assert "| exp-outliers | 10 of 10 | clean | dm-audit | – | – | 1.10% | 4.0 |" in text
    assert (
        "| exp-outliers | 10 of 10 | symmetric 20% | dm-audit, raw columns | 0.654 | 0.915 | "
        "32.80% | 5.0 |" in text
    )
    assert "| zero-inflated | 6 of 12 | pair 20% | cleanlab + HGB | error: boom |" in text
