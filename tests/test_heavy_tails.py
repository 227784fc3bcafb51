"""Heavy-tailed feature columns: which ones, their normal scores, and the audit reading them."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata

import dm_audit
from dm_audit.audit import AuditConfig, run_audit
from dm_audit.crossfit import audited
from dm_audit.dataset import AuditDataset
from dm_audit.errors import DataError
from dm_audit.heavy_tails import (
    NOTES_KEY,
    fit_heavy_tail_map,
    heavy_tailed_columns,
    tame_heavy_tails,
)
from dm_audit.table_files import TableOptions
from dm_audit.table_source import table_to_dataset


def _columns(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    glitches = rng.normal(size=n)
    glitches[rng.choice(n, size=n // 100, replace=False)] *= 1000.0  # 1 % of the rows broken
    columns = {
        "gaussian": rng.normal(size=n),
        "uniform": rng.uniform(size=n),
        "binary": (rng.random(n) < 0.3).astype(float),
        "rare flag": (np.arange(n) % 200 == 0).astype(float),  # 0.5 % of the rows
        "lognormal 0.5": rng.lognormal(0.0, 0.5, size=n),
        "lognormal 2": rng.lognormal(0.0, 2.0, size=n),
        "glitches": glitches,
        "constant": np.full(n, 3.0),
    }
    return np.column_stack(list(columns.values())).astype(np.float32), list(columns)


def test_only_columns_whose_extreme_rows_hold_most_of_the_variance_are_heavy() -> None:
    x, names = _columns()
    heavy = [names[j] for j in heavy_tailed_columns(x)]
    # A log-normal of sigma 0.5 holds about a fifth of its variance in its top 1 %: kept as it is.
    assert heavy == ["lognormal 2", "glitches"]


def test_a_tail_needs_a_hundred_rows() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 2))
    x[7, 1] = 60.0  # one row of 150 (its extreme 1 % are two rows)
    assert heavy_tailed_columns(x).tolist() == [1]
    assert heavy_tailed_columns(x[:99]).size == 0  # a handful of values is no tail
    assert heavy_tailed_columns(x[:1]).size == 0


def test_the_map_gives_normal_scores_of_the_ranks_and_keeps_the_order() -> None:
    x, _ = _columns()
    mapping = fit_heavy_tail_map(x)
    assert mapping is not None
    out = mapping.apply(x)
    untouched = [j for j in range(x.shape[1]) if j not in mapping.columns]
    np.testing.assert_array_equal(out[:, untouched], x[:, untouched])
    for j in mapping.columns:
        # Continuous columns: the scores of the ranks 1..N, standard normal in shape.
        expected_order = rankdata(x[:, j], method="average")
        np.testing.assert_allclose(rankdata(out[:, j], method="average"), expected_order)
        assert abs(out[:, j].mean()) < 1e-3 and 0.95 < out[:, j].std() < 1.0
        assert np.abs(out[:, j]).max() < 3.6
    assert x[0, 0] == _columns()[0][0, 0]  # the input is not modified


def test_a_spike_at_one_value_is_not_a_tail() -> None:
    rng = np.random.default_rng(6)
    sparse = np.zeros(1000)
    sparse[:30] = rng.integers(1, 17, size=30)  # an edge pixel: mostly 0, else 1 to 16
    sparse[30] = 1000.0  # and one of them broken: 31 rows off the spike are too few to judge
    income = np.zeros(1000)
    income[:400] = rng.lognormal(10.0, 2.0, size=400)  # zero-inflated and heavy-tailed
    assert heavy_tailed_columns(np.column_stack([sparse, income])).tolist() == [1]


def test_ties_share_one_score_and_new_values_are_interpolated_within_the_fitted_range() -> None:
    rng = np.random.default_rng(2)
    counts = np.zeros(1000)
    counts[:150] = rng.lognormal(3.0, 2.0, size=150).round() + 1  # heavy-tailed counts
    x = np.column_stack([counts, rng.normal(size=1000)])
    mapping = fit_heavy_tail_map(x)
    assert mapping is not None and mapping.columns.tolist() == [0]
    out = mapping.apply(x)[:, 0]
    # 850 zeros hold ranks 1..850: one score, that of their mean rank.
    assert np.unique(out[counts == 0]).size == 1
    assert np.all(out[counts > 0] > out[counts == 0][0])
    new = mapping.apply(np.array([[-5.0, 0.0], [1e6, 0.0]]))[:, 0]
    assert new[0] == pytest.approx(out.min()) and new[1] == pytest.approx(out.max())


def test_a_table_without_heavy_columns_is_read_as_it_is() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    data = AuditDataset.from_arrays(rng.integers(0, 2, size=300), features=x, classes=["a", "b"])
    tamed = tame_heavy_tails(data)
    assert tamed.notes[NOTES_KEY] == [] and tamed.heavy_tail_map is None
    assert NOTES_KEY not in data.notes
    assert np.shares_memory(tamed.features(), data.features())
    assert tame_heavy_tails(tamed) is tamed  # examined once


def test_a_tabular_dataset_names_the_columns_it_reads_by_rank(
    caplog: pytest.LogCaptureFixture,
) -> None:
    x, names = _columns(n=600, seed=4)
    frame = pd.DataFrame(x, columns=names)
    frame["colour"] = np.array(["red", "blue", "green"])[np.arange(600) % 3]
    frame["label"] = np.where(x[:, 0] > 0, "up", "down")
    data = table_to_dataset(frame, TableOptions(), source="frame")
    before = data.features().copy()
    with caplog.at_level(logging.INFO, logger="dm_audit.heavy_tails"):
        tamed = audited(data)
    assert "2 heavy-tailed feature column(s) (lognormal 2, glitches)" in caplog.text
    assert tamed.notes[NOTES_KEY] == [
        {"feature": 5, "column": "lognormal 2"},
        {"feature": 6, "column": "glitches"},
    ]
    np.testing.assert_array_equal(data.features(), before)  # the input dataset is unchanged
    assert tamed.example_ids.tolist() == data.example_ids.tolist()
    assert tamed.label_codes().tolist() == data.label_codes().tolist()
    assert np.abs(tamed.features()[:, 6]).max() < 4.0
    # A subset's rows went through the same map, which stays with them.
    assert tamed.subset([0, 1]).heavy_tail_map is tamed.heavy_tail_map is not None


def test_new_features_must_match_the_rows() -> None:
    data = AuditDataset.from_arrays([0, 1, 0], features=np.zeros((3, 2)), classes=["a", "b"])
    with pytest.raises(DataError, match=r"shape \(3, D\)"):
        data.with_features(np.zeros((2, 2)))


@pytest.mark.slow
def test_an_audit_of_heavy_tailed_columns_leaves_the_clean_table_alone_and_predicts_alike() -> None:
    # Blobs seen through exp() in units of very different sizes, 1 % of the values broken.
    rng = np.random.default_rng(5)
    truth = np.repeat(np.arange(3), 200)
    blobs = 2.5 * np.eye(3, 6)[truth] + rng.normal(0.0, 0.6, size=(600, 6))
    x = np.exp(2.0 * blobs) * np.logspace(-2, 3, 6)
    broken = rng.random(x.shape) < 0.01
    x[broken] *= 100.0
    auditor = dm_audit.LabelAuditor(seed=0, device="cpu").fit(x, truth)
    assert auditor.summary_["input"][NOTES_KEY]  # read by rank
    assert auditor.is_label_issue_.mean() <= 0.01  # measured 0.2 %; 0.8 % with raw columns
    # New rows are read through the same map: the final models predict them as well (measured
    # 0.997; 0.927 for models trained on the raw columns).
    assert (auditor.predict(x) == truth).mean() >= 0.98


def test_every_copy_of_the_models_carries_the_map() -> None:
    x, _ = _columns(n=400, seed=7)
    labels = (x[:, 0] > 0).astype(np.int64)
    data = AuditDataset.from_arrays(labels, features=x, classes=["down", "up"])
    stages: dict[str, object] = {}
    report = run_audit(
        data,
        AuditConfig(seed=0, epochs=3, progress=False, device="cpu"),
        on_stage=stages.__setitem__,
    )
    mapping = report.final_models.input_map
    assert mapping is not None and mapping.columns.tolist() == [5, 6]
    # The audit's models and the retrained ones (what the Dagster assets hand on) alike.
    assert stages["audit"].models.input_map is mapping
    assert stages["retrain"].models.input_map is mapping
    assert report.summary["input"][NOTES_KEY] == [{"feature": 5}, {"feature": 6}]
