"""The long-tail benchmark's table shape, its small-class measure and its results table (nothing
is trained)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def long_tail():
    yield from load_benchmark("long_tail")


def test_the_table_is_long_tailed_down_to_classes_of_fewer_than_ten_rows(
    long_tail, tmp_path
) -> None:
    shares = long_tail.class_shares()
    assert shares.sum() == pytest.approx(1.0) and (np.diff(shares) < 0).all()
    data = long_tail.build(tmp_path, 0)
    counts = np.bincount(data.labels, minlength=long_tail.CLASSES)
    assert len(data.labels) == long_tail.ROWS and counts.min() >= 5
    assert counts.max() > 250 and (counts < long_tail.SMALL_CLASS_ROWS).sum() >= 5
    np.testing.assert_array_equal(long_tail.build(tmp_path, 0).labels, data.labels)  # seeded


def test_small_class_false_flags_count_correct_rows_of_small_classes_only(long_tail) -> None:
    truth = np.array([0] * 12 + [1] * 3)
    noisy = truth.copy()
    noisy[0] = 1  # a wrong label: not a correct row, whatever its class
    flags = np.zeros(15, dtype=bool)
    flags[[0, 1, 12]] = True  # the wrong row, a correct row of the big class, one small-class row
    # Class 1 holds 4 given rows (< 10), 3 of them correct, one of those flagged.
    assert long_tail.small_class_false_flags(flags, noisy, truth) == pytest.approx(1 / 3)
    big = np.zeros(30, dtype=np.int64)
    assert math.isnan(long_tail.small_class_false_flags(np.zeros(30, bool), big, big))


def test_the_results_table_lists_every_method_and_errors(long_tail, tmp_path) -> None:
    rows = [
        {
            "setting": "clean",
            "rate": 0.0,
            "method": "dm-audit",
            "f1": None,
            "auroc": None,
            "flagged_share": 0.05,
            "small_false_flags": 0.25,
            "seconds": 3.0,
        },
        {
            "setting": "pair 20%",
            "rate": 0.2,
            "method": "cleanlab + LR",
            "f1": 0.7,
            "auroc": 0.9,
            "flagged_share": 0.2,
            "small_false_flags": 0.5,
            "seconds": 0.2,
        },
        {"setting": "pair 20%", "rate": 0.2, "method": "cleanlab + HGB", "error": "boom"},
    ]
    out = tmp_path / "long_tail.md"
    long_tail.write(rows, [20, 7], out, "cmd", seed=1, load=0.3, seconds=90.0)
    text = out.read_text()
    assert "`cmd` (seed 1," in text and "load average 0.30" in text and "1.5 min" in text
    assert "27 rows of 20 features in 2 classes of 20, 7 rows" in text
    assert "| clean | dm-audit | – | – | 5.00% | 25.00% | 3.0 |" in text
    assert "| pair 20% | cleanlab + LR | 0.700 | 0.900 | 20.00% | 50.00% | 0.2 |" in text
    assert "| pair 20% | cleanlab + HGB | error: boom |" in text
