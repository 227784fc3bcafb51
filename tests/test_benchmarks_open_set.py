"""The open-set benchmark: held-out classes, its skip rule, and one dataset end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def open_set():
    yield from load_benchmark("open_set")


def test_the_held_out_class_is_the_last_with_enough_rows_never_the_largest(open_set):
    # 8 % of the table needs floor(0.08 / 0.92 * rows left) rows of the held-out class.
    balanced = np.repeat(np.arange(3), 50)
    assert open_set.held_out_classes(["a", "b", "c"], balanced) == ["c"]
    # "c" has 10 rows (needs 22): "b" (200 rows) is held out; "a" is the largest, never.
    imbalanced = np.repeat(np.arange(3), [300, 200, 10])
    assert open_set.held_out_classes(["a", "b", "c"], imbalanced) == ["b"]
    # 20 classes of 30 rows: none suffices alone (needs 49), the last two do.
    many = np.repeat(np.arange(20), 30)
    names = [f"c{k}" for k in range(20)]
    assert open_set.held_out_classes(names, many) == ["c18", "c19"]
    # 19 classes of 40 rows and a last one of 200: no class alone suffices (needs 80), the pair
    # skips the largest.
    skewed = np.repeat(np.arange(20), [40] * 19 + [200])
    assert open_set.held_out_classes(names, skewed) == ["c17", "c18"]
    # Three classes where no single one suffices and two would leave one class: none.
    assert open_set.held_out_classes(["a", "b", "c"], np.repeat(np.arange(3), [500, 5, 5])) is None


def test_noise_that_would_outnumber_a_class_skips_the_setting(open_set):
    # 2 classes of 1,500 and 70 rows: 20 % flips move 300 rows into the small one.
    assert open_set.noise_swamps_a_class(np.repeat([0, 1], [1500, 70]), 2, 0.2)
    assert not open_set.noise_swamps_a_class(np.repeat([0, 1, 2], 100), 3, 0.2)


def test_one_dataset_end_to_end(open_set, tmp_path: Path):
    spec = open_set.generality_module().SPECS["iris"]
    rows = open_set.run_dataset(spec, seed=0, workdir=tmp_path)
    assert [r["setting"] for r in rows] == list(open_set.SETTINGS)
    clean, alone, noisy = rows
    assert clean["held_out"] is None and clean["in_distribution_flagged_ood"] <= 0.01
    for row in (alone, noisy):
        assert row["held_out"] == ["virginica"] and row["open_rows"] == 8
        assert 0.0 <= row["max_softmax_auroc"] <= 1.0
        fates = ("open_set_aside", "open_to_review", "open_relabelled", "open_kept")
        assert sum(row[k] for k in fates) == pytest.approx(1.0)
        assert all(row[k] >= 0 for k in fates)
    # Iris's held-out class sits apart in the input space: the score ranks it high.
    assert alone["ood_auroc"] >= 0.85
    provenance = {
        "command": "test",
        "seeds": [0],
        "seconds": 1.0,
        "load": {"start": "0", "end": "0"},
    }
    open_set.write_results(tmp_path, provenance, rows)
    saved = json.loads((tmp_path / "open_set.json").read_text())
    assert saved["summary"]["test"]["runs"] == 2
    text = (tmp_path / "open_set.md").read_text()
    assert "| iris | test | open 8% | virginica |" in text
