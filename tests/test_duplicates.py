"""Exact and near duplicates, conflicting duplicates as label evidence, and leakage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits, make_classification

from dm_audit import duplicates
from dm_audit.audit import AuditConfig, run_audit
from dm_audit.dataset import AuditDataset
from dm_audit.errors import DataError


def _with_copies(
    x: np.ndarray, labels: np.ndarray, n_classes: int, seed: int, share: float = 0.01
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Append copies of `share` of the rows, noised by 1 % of each feature's spread; every
    other copy carries another label. Returns inputs, labels, is_copy, is_wrong_copy."""
    rng = np.random.default_rng(seed)
    n = len(x)
    m = max(2, int(share * n))
    source = rng.choice(n, m, replace=False)
    spread = x.reshape(n, -1).std(axis=0).reshape(x.shape[1:])
    copies = x[source] + rng.normal(0.0, 0.01, size=(m, *x.shape[1:])) * spread
    copy_labels = labels[source].copy()
    wrong = np.arange(m) % 2 == 1
    copy_labels[wrong] = (copy_labels[wrong] + rng.integers(1, n_classes, wrong.sum())) % n_classes
    is_copy = np.r_[np.zeros(n, bool), np.ones(m, bool)]
    return (
        np.concatenate([x, copies.astype(x.dtype)]),
        np.r_[labels, copy_labels],
        is_copy,
        np.r_[np.zeros(n, bool), wrong],
    )


def _tables() -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    digits = load_digits()
    binary = make_classification(1500, 20, n_informative=8, random_state=3)
    imbalanced = make_classification(
        3000, 16, n_informative=8, n_classes=3, weights=[0.75, 0.2, 0.05], random_state=4
    )
    return {
        "digits": (digits.data.astype(np.float32), digits.target, 10),
        "binary": (binary[0].astype(np.float32), binary[1], 2),
        "imbalanced": (imbalanced[0].astype(np.float32), imbalanced[1], 3),
    }


@pytest.mark.parametrize("name", ["digits", "binary", "imbalanced"])
def test_clean_tables_have_no_near_duplicates(name: str) -> None:
    x, _, _ = _tables()[name]
    found = duplicates.find_duplicates(x)
    assert found.is_near_duplicate.sum() == 0
    assert found.n_sets == 0
    assert ((found.score >= 0) & (found.score <= 1)).all()


@pytest.mark.parametrize("name", ["digits", "binary", "imbalanced"])
def test_noised_copies_are_found_as_sets(name: str) -> None:
    x, y, c = _tables()[name]
    xx, _, is_copy, _ = _with_copies(x, y, c, seed=1)
    found = duplicates.find_duplicates(xx)
    assert found.is_near_duplicate[is_copy].mean() >= 0.95
    # Each copy shares its set with exactly its original, and nothing else is a duplicate.
    assert found.is_near_duplicate.sum() == 2 * is_copy.sum()
    assert found.n_sets == is_copy.sum()
    assert (found.score[found.is_near_duplicate] > np.exp(-duplicates.RELATIVE_RADIUS)).all()


def test_exact_copies_score_one_and_join_one_set() -> None:
    x = np.random.default_rng(0).normal(size=(200, 6)).astype(np.float32)
    xx = np.concatenate([x, x[[5, 5, 9]]])  # row 5 three times, row 9 twice
    found = duplicates.find_duplicates(xx)
    assert found.is_exact[[5, 200, 201, 9, 202]].all()
    assert found.is_exact.sum() == 5
    assert found.score[found.is_exact].min() == 1.0
    assert found.set_id[[5, 200, 201]].tolist() == [5, 5, 5]
    assert found.set_id[[9, 202]].tolist() == [9, 9]
    assert found.n_sets == 2


def test_images_with_copies(make_colour_images) -> None:
    images, labels = make_colour_images(n_per_class=40, size=24, seed=2)
    clean = duplicates.find_duplicates(images)
    assert clean.is_near_duplicate.sum() == 0
    xx, _, is_copy, _ = _with_copies(images.astype(np.float32), labels, 3, seed=2, share=0.05)
    found = duplicates.find_duplicates(np.clip(xx, 0, 255).astype(np.uint8))
    assert found.is_near_duplicate[is_copy].all()


def test_conflict_evidence_follows_the_sets_consensus() -> None:
    x = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    xx = np.concatenate([x, x[[0, 1]]])
    labels = np.zeros(102, dtype=np.int64)
    labels[101] = 1  # the copy of row 1 labelled otherwise
    probs = np.tile([0.8, 0.2], (102, 1))
    found = duplicates.find_duplicates(xx)
    evidence = duplicates.conflict_evidence(found, labels, probs)
    assert evidence[101] == 1.0 and evidence[1] == 0.0
    # Rows in agreeing sets or in none carry no evidence.
    assert np.isnan(evidence[[0, 100, 2, 50]]).all()
    assert found.summary(labels)["conflicting_sets"] == 1


def test_leaked_rows_are_held_out_rows_with_a_copy_in_training() -> None:
    x = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32)
    xx = np.concatenate([x, x[[3, 7]]])
    split = np.array(["train"] * 100 + ["test", "train"])
    found = duplicates.find_duplicates(xx)
    leaked = duplicates.leaked_rows(found, split)
    assert np.flatnonzero(leaked).tolist() == [100]


def test_one_row_and_constant_columns() -> None:
    one = duplicates.find_duplicates(np.ones((1, 3), dtype=np.float32))
    assert one.set_id.tolist() == [-1] and one.nearest.tolist() == [-1]
    same = duplicates.find_duplicates(np.ones((4, 3), dtype=np.float32))
    assert same.is_exact.all() and same.n_sets == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "imbalanced"])
def test_audit_flags_wrongly_labelled_copies(name: str) -> None:
    x, y, c = _tables()[name]
    xx, yy, is_copy, wrong = _with_copies(x, y, c, seed=5)
    names = [f"c{k}" for k in range(c)]
    split = np.where(np.arange(len(xx)) % 10 == 0, "test", "train")
    data = AuditDataset.from_arrays(
        [names[k] for k in yy], classes=names, features=xx, split=split, source=name
    )
    report = run_audit(data, AuditConfig(seed=0, progress=False, device="cpu"))
    ex = report.examples
    assert ex["is_near_duplicate"].to_numpy()[is_copy].mean() >= 0.95
    assert ex["is_label_issue"].to_numpy()[wrong].mean() >= 0.9
    # Sets are named by a member's id, shared by original and copy.
    sets = ex.loc[is_copy, "near_duplicate_set"]
    assert sets.notna().all() and set(sets) <= set(ex["example_id"])
    summary = report.summary["duplicates"]
    assert summary["conflicting_sets"] == wrong.sum()
    # Held-out rows with a copy in training are reported as leaked.
    member = ex["near_duplicate_set"].notna().to_numpy()
    by_set = pd.Series(split[member]).groupby(ex.loc[member, "near_duplicate_set"].to_numpy())
    expected = sum(
        int((s == "test").sum()) for _, s in by_set if (s == "train").any() and (s == "test").any()
    )
    assert summary["leaked_rows"] == expected == int(ex["is_leaked_duplicate"].sum())


def test_the_duplicate_space_standardises_chunk_by_chunk_as_in_one_pass() -> None:
    # Rows across several chunks, columns of very different scale and offset, one constant.
    rng = np.random.default_rng(0)
    n = 2 * duplicates.neighbours.DEFAULT_CHUNK_ROWS + 123
    x = rng.normal(size=(n, 4)) * [1e-3, 1.0, 1e4, 0.0] + [5.0, -2.0, 1e6, 7.0]
    x = x.astype(np.float32)
    space = duplicates.duplicate_space(x)
    wide = x.astype(np.float64)
    std = wide.std(axis=0)
    expected = (wide - wide.mean(axis=0)) / np.where(std > 0, std, 1.0)
    assert space.dtype == np.float32 and space.shape == x.shape
    np.testing.assert_allclose(space, expected, atol=1e-4)
    assert np.all(space[:, 3] == 0.0)


def test_the_input_space_read_in_chunks_is_the_duplicate_space_and_searches_alike() -> None:
    from dm_audit.ood import input_space_distances

    rng = np.random.default_rng(3)
    x = (rng.normal(size=(700, 6)) * [1e-3, 1.0, 1e4, 2.0, 0.0, 5.0]).astype(np.float32)
    space = duplicates.input_space(x)
    assert isinstance(space, duplicates.StandardisedRows)
    assert (space.n_rows, space.dim) == x.shape
    chunked = duplicates.StandardisedRows(x, space.mean, space.scale, chunk_rows=64)
    array = duplicates.duplicate_space(x)
    np.testing.assert_array_equal(np.vstack([b for _, b in chunked.chunks()]), array)
    from_chunks, from_array = duplicates.input_graph(chunked, 5), duplicates.input_graph(array, 5)
    np.testing.assert_array_equal(from_chunks.positions, from_array.positions)
    trusted = rng.random(700) < 0.7
    np.testing.assert_array_equal(
        input_space_distances(chunked, trusted, k=2), input_space_distances(array, trusted, k=2)
    )
    # Images are averaged down to an array, as before.
    images = rng.integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    assert isinstance(duplicates.input_space(images), np.ndarray)


def test_find_duplicates_reads_a_reused_input_graph_as_its_own_search() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    xx = np.vstack([x, x[:20] + 0.001 * rng.normal(size=(20, 8)).astype(np.float32)])
    space = duplicates.duplicate_space(xx)
    fresh = duplicates.find_duplicates(xx)
    reused = duplicates.find_duplicates(xx, graph=duplicates.input_graph(space, 10))
    for name in ("score", "is_near_duplicate", "set_id", "is_exact", "nearest"):
        np.testing.assert_array_equal(getattr(reused, name), getattr(fresh, name))
    assert reused.radius == pytest.approx(fresh.radius)
    with pytest.raises(DataError, match="graph"):
        duplicates.find_duplicates(xx, graph=duplicates.input_graph(space, 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_exact_groups_by_hash_equal_grouping_the_rows_as_bytes(dtype) -> None:
    rng = np.random.default_rng(8)
    x = rng.integers(0, 4, size=(3_000, 3)).astype(dtype)  # many byte-identical rows
    x[::7, 0] = np.asarray(-0.0 if dtype != np.uint8 else 0, dtype=dtype)  # -0.0 differs from 0.0
    rows = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    expected = first[inverse.ravel()]
    np.testing.assert_array_equal(duplicates._exact_groups(x), expected)
