"""The comparison harness's pure helpers: measures against the truth, aggregation, tables."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_benchmark

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"


@pytest.fixture(scope="module")
def compare():
    yield from load_benchmark("compare")


def test_cleanlab_is_imported_only_inside_the_cleanlab_runner():
    tree = ast.parse(HARNESS.read_text())
    top_level = [
        alias.name if isinstance(node, ast.Import) else node.module
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [None])
    ]
    assert top_level and not any(name.startswith("cleanlab") for name in top_level)


def test_aggregate_mean_std_and_missing_values(compare):
    records = [
        {"f1": 0.8, "test": None, "auroc": 0.9},
        {"f1": 0.6, "test": None, "auroc": math.nan},
        {"f1": 1.0, "test": None},
    ]
    stats = compare.aggregate(records)
    mean, std, n = stats["f1"]
    assert mean == pytest.approx(0.8)
    assert std == pytest.approx(np.std([0.8, 0.6, 1.0]))
    assert n == 3
    assert stats["auroc"] == (pytest.approx(0.9), 0.0, 1)
    assert math.isnan(stats["test"][0]) and stats["test"][2] == 0


def test_cell_formats_mean_std_and_dash(compare):
    assert compare.cell((0.81234, 0.0123, 3)) == "0.812 ± 0.012"
    assert compare.cell((12.345, 1.0, 3), digits=1) == "12.3 ± 1.0"
    assert compare.cell((0.5, 0.0, 1)) == "0.500"
    assert compare.cell((math.nan, math.nan, 0)) == "–"
    assert compare.cell(None) == "–"


def test_markdown_table_layout_and_row_check(compare):
    text = compare.markdown_table(["a", "b"], [[1, "x|y"], ["2", 3]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |", "| 2 | 3 |"]
    with pytest.raises(ValueError, match="3 cells for 2 headers"):
        compare.markdown_table(["a", "b"], [[1, 2, 3]])


def test_measure_against_known_truth(compare):
    # 6 in-distribution examples (2 mislabelled: rows 1 and 4) and 2 open-set rows.
    given = np.array([0, 1, 2, 0, 2, 1, 0, 2])
    truth = np.array([0, 0, 2, 0, 1, 1, -1, -1])
    run = compare.Run(
        flags=np.array([False, True, True, False, False, False, True, False]),
        issue_score=np.array([0.1, 0.9, 0.6, 0.2, 0.5, 0.3, 0.8, 0.0]),
        ood_score=np.array([0.1, 0.2, 0.3, 0.1, 0.2, 0.1, 0.9, 0.25]),
        corrected=np.array([0, 0, 2, 0, 2, 1, 1, 2]),
        test_accuracy=0.75,
        seconds=2.5,
        trainings=3,
    )
    m = compare.measure(run, given, truth)
    # Flags among in-distribution rows: 1 (right) and 2 (wrong); row 4 missed.
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)
    # Scores of the mislabelled rows (0.9, 0.5) against the clean ones (0.1, 0.6, 0.2, 0.3):
    # 7 of the 8 pairs ordered right.
    assert m["auroc"] == pytest.approx(7 / 8)
    # Open-set scores 0.9 and 0.25 against the others (0.1, 0.2, 0.3, 0.1, 0.2, 0.1): 0.9 beats
    # all 6, 0.25 beats 5.
    assert m["ood_auroc"] == pytest.approx(11 / 12)
    assert m["label_acc_before"] == pytest.approx(4 / 6)
    assert m["label_acc_after"] == pytest.approx(5 / 6)
    assert m["flagged_share"] == pytest.approx(3 / 8)
    assert (m["test"], m["seconds"], m["trainings"]) == (0.75, 2.5, 3.0)
    # Without a separate clock for the flags, the method's seconds are its seconds to flags.
    assert m["detection_seconds"] == 2.5
    timed = compare.measure(dataclasses.replace(run, detection_seconds=1.5), given, truth)
    assert (timed["detection_seconds"], timed["seconds"]) == (1.5, 2.5)


def test_measure_without_noise_or_correction_leaves_gaps(compare):
    labels = np.array([0, 1, 0, 1])
    run = compare.Run(
        flags=np.zeros(4, dtype=bool),
        issue_score=None,
        ood_score=None,
        corrected=None,
        test_accuracy=None,
        seconds=1.0,
        trainings=1,
    )
    m = compare.measure(run, labels, labels)
    assert m["f1"] is None and m["auroc"] is None and m["ood_auroc"] is None
    assert m["label_acc_before"] == 1.0 and m["label_acc_after"] is None
    assert m["flagged_share"] == 0.0


def test_results_from_records_groups_by_dataset_noise_method(compare):
    records = [
        {"dataset": "d", "noise": "n", "seed": s, "method": m, "f1": f1, "seconds": sec}
        for s, m, f1, sec in [(0, "a", 0.5, 1.0), (1, "a", 0.7, 3.0), (0, "b", 0.9, 2.0)]
    ]
    results = compare.results_from_records(records)
    assert list(results) == ["d"] and list(results["d"]) == ["n"]
    assert results["d"]["n"]["a"]["f1"] == (pytest.approx(0.6), pytest.approx(0.1), 2)
    assert results["d"]["n"]["a"]["seconds"][0] == pytest.approx(2.0)
    assert results["d"]["n"]["b"]["f1"] == (pytest.approx(0.9), 0.0, 1)
    assert "seed" not in results["d"]["n"]["a"]
