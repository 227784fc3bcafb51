"""The generality benchmark's dataset table, noise grid and measures (nothing is trained)."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_benchmark

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "generality.py"


@pytest.fixture(scope="module")
def generality():
    yield from load_benchmark("generality")


def _top_level_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        alias.name if isinstance(node, ast.Import) else node.module
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [None])
    ]


def test_cleanlab_is_imported_only_where_it_is_used():
    # cleanlab lives in the bench dependency group; the library's test environment lacks it.
    top_level = _top_level_imports(HARNESS)
    assert top_level and not any(name.startswith("cleanlab") for name in top_level)


def test_the_dataset_table_covers_the_splits_sizes_and_shapes(generality):
    specs = generality.DATASETS
    assert [s.name for s in specs] == _dataset_names()
    assert len(specs) >= 12
    assert len({s.name for s in specs}) == len(specs)
    assert {s.split for s in specs} == set(generality.SPLITS) == {"dev", "test"}
    assert generality.SPECS["wine"].split == "test"
    assert {s.size for s in specs} == set(generality.SIZES) == {"tiny", "small", "mid"}
    tags = {t for s in specs for t in s.tags}
    assert tags == set(generality.TAGS)
    assert {"binary", "many-classes", "imbalanced", "raw-scale", "embedding", "images"} <= tags
    # Each split holds at least one dataset, and the test split more than a token one.
    assert sum(s.split == "test" for s in specs) >= 6
    assert sum(s.split == "dev" for s in specs) >= 6


def _dataset_names() -> list[str]:
    """The names in the dataset table, read from the source so collection imports nothing."""
    return [
        node.args[0].value
        for node in ast.walk(ast.parse(HARNESS.read_text()))
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "DatasetSpec"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ]


@pytest.mark.parametrize("name", _dataset_names())
def test_every_dataset_builds_deterministically_and_has_its_shape(generality, name, tmp_path):
    spec = generality.SPECS[name]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    data = spec.build(tmp_path / "a", 0)
    again = spec.build(tmp_path / "b", 0)
    np.testing.assert_array_equal(data.labels, again.labels)
    np.testing.assert_array_equal(data.x_model, again.x_model)
    np.testing.assert_array_equal(data.x_table, again.x_table)
    assert list(data.dataset.example_ids) == list(again.dataset.example_ids)

    n = len(data.labels)
    assert generality.size_category(n) == spec.size
    assert (data.dataset.table["split"] == "train").all() and len(data.dataset) == n
    np.testing.assert_array_equal(data.dataset.label_codes(), data.labels)
    assert data.x_table.dtype == np.float32 and data.x_table.shape[0] == n
    assert np.isfinite(data.x_table).all()
    counts = np.bincount(data.labels, minlength=data.n_classes)
    # Stratified 5-fold cross-validation needs 5 examples of every class.
    assert counts.min() >= generality.CV_FOLDS
    assert ("binary" in spec.tags) == (data.n_classes == 2)
    assert ("many-classes" in spec.tags) == (data.n_classes >= 20)
    assert ("imbalanced" in spec.tags) == (counts.max() / counts.min() >= 20)
    assert ("images" in spec.tags) == data.is_image
    if data.is_image:
        assert data.x_model.dtype == np.uint8 and data.x_model.ndim == 4
    if "embedding" in spec.tags:
        assert data.x_model.shape == (n, generality.EMBEDDING_DIM)
    if "raw-scale" in spec.tags:
        spread = data.x_table.std(axis=0)
        assert spread.max() / spread[spread > 0].min() >= 1e3
    if "wide" in spec.tags:
        assert data.x_table.shape[1] * 5 >= n
    if name.startswith("synth-"):
        (tmp_path / "c").mkdir()
        other = spec.build(tmp_path / "c", 1)
        assert not np.array_equal(other.x_table, data.x_table)


def test_the_noise_grid(generality):
    grid = generality.settings(["symmetric", "pair", "instance"], [0.0, 0.2, 0.4])
    assert [s.name for s in grid] == [
        "clean",
        "symmetric 20%",
        "symmetric 40%",
        "pair 20%",
        "pair 40%",
        "instance 20%",
        "instance 40%",
    ]
    assert [s.name for s in generality.settings(["pair"], [0.4])] == ["pair 40%"]


def test_noisy_labels_per_kind(generality, tmp_path):
    data = generality.SPECS["iris"].build(tmp_path, 0)
    setting = generality.Setting
    clean = generality.make_noisy(data, setting("none", 0.0), 0)
    np.testing.assert_array_equal(clean, data.labels)
    for kind in ("symmetric", "instance"):
        probs = generality.confusion_probs(data, 0) if kind == "instance" else None
        noisy = generality.make_noisy(data, setting(kind, 0.2), 0, probs)
        assert (noisy != data.labels).sum() == 30  # floor(0.2 * 150)
        again = generality.make_noisy(data, setting(kind, 0.2), 0, probs)
        np.testing.assert_array_equal(noisy, again)
    pair = generality.make_noisy(data, setting("pair", 0.4), 0)
    moved = pair != data.labels
    assert moved.sum() == 60 and np.all(pair[moved] == (data.labels[moved] + 1) % 3)
    with pytest.raises(ValueError, match="confusion probabilities"):
        generality.make_noisy(data, setting("instance", 0.2), 0)


def test_with_labels_relabels_a_copy(generality, tmp_path):
    data = generality.SPECS["iris"].build(tmp_path, 0)
    codes = (data.labels + 1) % 3
    relabelled = generality.with_labels(data.dataset, codes)
    np.testing.assert_array_equal(relabelled.label_codes(), codes)
    np.testing.assert_array_equal(relabelled.features(), data.dataset.features())
    assert list(relabelled.example_ids) == list(data.dataset.example_ids)
    np.testing.assert_array_equal(data.dataset.label_codes(), data.labels)  # input untouched


def test_measure_counts_missing_rows_as_unflagged(generality):
    # 8 rows, rows 1 and 4 mislabelled; the method returned rows 0-5 only (coverage 6/8).
    truth = np.array([0, 0, 2, 0, 1, 1, 2, 1])
    noisy = np.array([0, 1, 2, 0, 2, 1, 2, 0])  # rows 1, 4 and 7 differ
    detection = generality.Detection(
        flags=np.array([False, True, True, False, False, False, False, True]),
        scores=np.array([0.1, 0.9, 0.6, 0.2, 0.5, 0.3, 0.0, 0.95]),
        suggested=np.array([0, 0, 1, 0, 1, 1, 2, 1]),
        covered=np.array([True] * 6 + [False] * 2),
        seconds=1.5,
    )
    m = generality.measure(detection, noisy, truth)
    assert m["coverage"] == pytest.approx(0.75)
    # Flags: row 1 (right) and row 2 (wrong); row 7's flag is outside the coverage.
    assert m["flagged"] == 2 and m["flagged_share"] == pytest.approx(0.25)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(0.4)
    # Scores of the mislabelled rows (0.9, 0.5, and 0 for the missing row 7) against the clean
    # rows (0.1, 0.6, 0.2, 0.3, 0 for the missing row 6): 0.9 beats 5, 0.5 beats 4, 0 ties one.
    assert m["auroc"] == pytest.approx((5 + 4 + 0.5) / 15)
    assert m["suggestion_acc"] == 1.0  # row 1: suggested 0, true 0
    assert m["seconds"] == 1.5
    assert m["seconds_to_flags"] == 1.5  # no separate time to the flags: the whole run
    early = generality.measure(dataclasses.replace(detection, seconds_to_flags=0.5), noisy, truth)
    assert early["seconds_to_flags"] == 0.5 and early["seconds"] == 1.5
    clean = generality.measure(detection, truth, truth)
    assert clean["f1"] is None and clean["auroc"] is None and clean["suggestion_acc"] is None
    assert clean["flagged_share"] == pytest.approx(0.25)


def _row(dataset, setting, rate, method, f1, split="test", error=None):
    return {
        "dataset": dataset,
        "split": split,
        "setting": setting,
        "rate": rate,
        "method": method,
        "f1": f1,
        "auroc": None,
        "seconds": 1.0,
        "error": error,
    }


def test_summary_and_wins(generality):
    audit, lr = generality.DM_AUDIT, generality.CL_LR
    rows = [
        _row("a", "clean", 0.0, audit, None),
        _row("a", "symmetric 20%", 0.2, audit, 0.9),
        _row("a", "symmetric 20%", 0.2, lr, 0.7),
        _row("a", "pair 40%", 0.4, audit, 0.5),
        _row("a", "pair 40%", 0.4, lr, 0.5),
        _row("b", "symmetric 20%", 0.2, audit, 0.2, split="dev"),
        _row("b", "symmetric 20%", 0.2, lr, 0.6, split="dev"),
        _row("b", "symmetric 20%", 0.2, generality.CL_HGB, None, split="dev", error="boom"),
    ]
    test = generality.summary_f1(rows, "test")
    assert test[audit]["f1"] == pytest.approx(0.7) and test[audit]["cells"] == 2
    assert test[lr]["f1"] == pytest.approx(0.6)
    assert generality.CL_HGB not in generality.summary_f1(rows, "dev")
    wins = generality.wins(rows)
    assert wins["a"]["settings"] == 2
    assert wins["a"]["wins"][audit] == 2 and wins["a"]["wins"][lr] == 1  # a tie credits both
    assert wins["a"]["best"] == audit
    assert wins["b"]["best"] == lr and wins["b"]["wins"][audit] == 0
    assert math.isclose(wins["b"]["mean_f1"][lr], 0.6)


def test_merge_keeps_every_row_once_and_a_later_run_replaces_an_earlier_one(
    generality, tmp_path, monkeypatch
):
    import json

    audit, lr = generality.DM_AUDIT, generality.CL_LR

    def document(command, rows):
        for row in rows:
            row["seed"] = 0
        return {
            "command": command,
            "seeds": [0],
            "threads": 1,
            "machine": {"cpu": "x"},
            "seconds": 10.0,
            "load_average": {"start": 1.0, "end": 1.5},
            "datasets": [{"name": "a"}, {"name": "b"}],
            "rows": rows,
        }

    first = document(
        "run all",
        [
            _row("a", "pair 20%", 0.2, audit, 0.5),
            _row("a", "pair 20%", 0.2, lr, 0.4),
            _row("b", "pair 20%", 0.2, audit, 0.6),
        ],
    )
    later = document("run a", [_row("a", "pair 20%", 0.2, audit, 0.7)])
    paths = []
    for name, doc in (("first.json", first), ("later.json", later)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(doc))
    written = {}
    monkeypatch.setattr(
        generality, "write_results", lambda out, prov, rows: written.update(prov=prov, rows=rows)
    )
    generality.merge_results(paths, tmp_path / "out")
    f1 = {(r["dataset"], r["method"]): r["f1"] for r in written["rows"]}
    assert f1 == {("a", audit): 0.7, ("a", lr): 0.4, ("b", audit): 0.6}
    assert written["prov"]["command"].startswith("run all & run a ; then ")
    assert written["prov"]["datasets"] == first["datasets"]


def test_time_to_flags_pairs_each_setting_with_cleanlab_on_the_same_model(generality):
    audit, torch_cl = generality.DM_AUDIT, generality.CL_TORCH
    rows = [
        {**_row("a", "symmetric 20%", 0.2, audit, 0.9), "seconds_to_flags": 2.0},
        {**_row("a", "symmetric 20%", 0.2, torch_cl, 0.7), "seconds": 10.0},
        {**_row("a", "pair 20%", 0.2, audit, 0.9), "seconds_to_flags": 3.0},
        {**_row("a", "pair 20%", 0.2, torch_cl, 0.7), "seconds": 5.0},
        {**_row("b", "pair 20%", 0.2, audit, 0.9), "seconds_to_flags": 3.0},  # no cleanlab
    ]
    times = generality.time_to_flags(rows)
    assert set(times) == {"a"}
    assert times["a"]["ratio"] == pytest.approx((0.2 + 0.6) / 2)
    assert times["a"]["dm_audit_to_flags"] == pytest.approx(2.5)
    assert times["a"]["cleanlab_torch"] == pytest.approx(7.5)
