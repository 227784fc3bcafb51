from __future__ import annotations

import numpy as np
import pytest

from dm_audit.dataset import AuditDataset
from dm_audit.errors import ConfigError, DataError
from dm_audit.noise import (
    add_noise,
    inject_instance_dependent,
    inject_pair,
    inject_symmetric,
    make_open_set,
    pair_mapping,
)

# -- arrays ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "rate"), [(1000, 0.3), (997, 0.29), (50, 0.0), (40, 1.0), (7, 0.5)])
def test_symmetric_flips_exactly_floor_rate_n(n, rate):
    labels = np.arange(n) % 4
    noisy = inject_symmetric(labels, 4, rate, seed=0)
    assert noisy.dtype == np.int64 and noisy.shape == (n,)
    assert (noisy != labels).sum() == int(np.floor(rate * n + 1e-9))
    assert noisy.min() >= 0 and noisy.max() <= 3


def test_symmetric_excludes_the_true_class_and_is_uniform_over_the_others():
    labels = np.zeros(30_000, dtype=np.int64)
    noisy = inject_symmetric(labels, 4, 1.0, seed=1)
    counts = np.bincount(noisy, minlength=4)
    assert counts[0] == 0
    # Each of the 3 other classes gets 10,000 in expectation (sd ~ 82).
    assert np.all(np.abs(counts[1:] - 10_000) < 400)


def test_symmetric_is_seeded():
    labels = np.arange(200) % 5
    a, b = inject_symmetric(labels, 5, 0.4, 7), inject_symmetric(labels, 5, 0.4, 7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, inject_symmetric(labels, 5, 0.4, 8))
    np.testing.assert_array_equal(labels, np.arange(200) % 5)  # input untouched


def test_injectors_validate_input():
    with pytest.raises(DataError, match=r"label 5 at position 1 is outside 0\.\.4"):
        inject_symmetric(np.array([0, 5]), 5, 0.1, 0)
    with pytest.raises(ConfigError, match="rate must be in"):
        inject_symmetric(np.array([0, 1]), 2, 1.5, 0)
    with pytest.raises(ConfigError, match="n_classes"):
        inject_pair(np.array([0, 0]), 1, 0.1, 0)
    with pytest.raises(ConfigError, match="one target per class"):
        inject_pair(np.array([0, 1]), 3, 0.1, 0, mapping=[1, 0])


def test_pair_flips_floor_rate_n_k_of_each_class_to_its_pair():
    labels = np.repeat(np.arange(3), [100, 51, 10])
    noisy = inject_pair(labels, 3, 0.3, seed=0)
    np.testing.assert_array_equal(pair_mapping(3), [1, 2, 0])
    for k, n_k in enumerate([100, 51, 10]):
        flipped = noisy[(labels == k) & (noisy != labels)]
        assert len(flipped) == int(np.floor(0.3 * n_k)) and np.all(flipped == (k + 1) % 3)


def test_pair_with_a_partial_mapping_leaves_other_classes_clean():
    labels = np.repeat(np.arange(4), 20)
    noisy = inject_pair(labels, 4, 0.5, seed=3, mapping={3: 1, 2: 2})
    changed = noisy != labels
    assert changed.sum() == 10 and np.all(labels[changed] == 3) and np.all(noisy[changed] == 1)
    np.testing.assert_array_equal(noisy, inject_pair(labels, 4, 0.5, seed=3, mapping={3: 1}))


def _confusable_probs(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and random probability rows (Dirichlet), so every example has its own confusion."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    return labels, rng.dirichlet(np.ones(n_classes), size=n)


@pytest.mark.parametrize(("n", "rate"), [(500, 0.2), (997, 0.29), (50, 0.0), (40, 1.0), (7, 0.5)])
def test_instance_dependent_flips_exactly_floor_rate_n(n, rate):
    labels, probs = _confusable_probs(n, 4, seed=0)
    noisy = inject_instance_dependent(labels, probs, rate, seed=0)
    assert noisy.dtype == np.int64 and noisy.shape == (n,)
    assert (noisy != labels).sum() == int(np.floor(rate * n + 1e-9))


def test_instance_dependent_flips_the_most_confusable_to_their_most_confused_class():
    labels, probs = _confusable_probs(400, 5, seed=1)
    noisy = inject_instance_dependent(labels, probs, 0.25, seed=0)
    others = probs.copy()
    others[np.arange(400), labels] = -1.0
    confusion = others.max(axis=1)
    flipped = noisy != labels
    assert flipped.sum() == 100
    # The 100 flipped examples are exactly the 100 with the largest non-true probability ...
    np.testing.assert_array_equal(np.sort(np.argsort(-confusion)[:100]), np.flatnonzero(flipped))
    assert confusion[flipped].min() > confusion[~flipped].max()
    # ... and each went to that most-confused class, never to its own.
    np.testing.assert_array_equal(noisy[flipped], others.argmax(axis=1)[flipped])
    np.testing.assert_array_equal(noisy[~flipped], labels[~flipped])


def test_instance_dependent_hand_checked_example():
    labels = np.array([0, 1, 2, 0])
    probs = np.array(
        [
            [0.9, 0.05, 0.05],  # confident: max other 0.05
            [0.5, 0.1, 0.4],  # true class 1, most confused with 0 (0.5): flipped first
            [0.1, 0.45, 0.45],  # true class 2, confused with 1 (0.45): flipped second
            [0.6, 0.1, 0.3],  # max other 0.3
        ]
    )
    np.testing.assert_array_equal(inject_instance_dependent(labels, probs, 0.5, 0), [0, 0, 1, 0])
    np.testing.assert_array_equal(inject_instance_dependent(labels, probs, 0.75, 0), [0, 0, 1, 2])


def test_instance_dependent_breaks_ties_with_the_seed():
    # Every example is equally confusable: the seed alone decides which are flipped.
    labels = np.arange(200) % 2
    probs = np.full((200, 2), 0.5)
    a = inject_instance_dependent(labels, probs, 0.3, seed=3)
    np.testing.assert_array_equal(a, inject_instance_dependent(labels, probs, 0.3, seed=3))
    b = inject_instance_dependent(labels, probs, 0.3, seed=4)
    assert (a != labels).sum() == (b != labels).sum() == 60
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(labels, np.arange(200) % 2)  # inputs untouched
    assert np.all(probs == 0.5)


@pytest.mark.parametrize(
    ("labels", "probs", "rate", "error", "message"),
    [
        ([0, 1, 0], np.full((2, 2), 0.5), 0.1, DataError, "2 rows for 3 labels"),
        (
            [0, 1],
            np.full(2, 0.5),
            0.1,
            DataError,
            r"shape \(N, C\) with C >= 2 classes, got \(2,\)",
        ),
        ([0, 0], np.ones((2, 1)), 0.1, DataError, r"C >= 2 classes, got \(2, 1\)"),
        (
            [0, 3],
            np.full((2, 3), 1 / 3),
            0.1,
            DataError,
            r"label 3 at position 1 is outside 0\.\.2",
        ),
        ([0.5, 1], np.full((2, 2), 0.5), 0.1, DataError, "1-D integer array"),
        ([0, 1], np.array([[0.5, 0.5], [np.nan, 1.0]]), 0.1, DataError, "row 1"),
        ([0, 1], np.array([[0.5, 0.5], [-0.1, 1.1]]), 0.1, DataError, "non-negative; row 1"),
        ([0, 1], np.full((2, 2), 0.5), 1.5, ConfigError, "rate must be in"),
        ([0, 1], np.full((2, 2), 0.5), -0.1, ConfigError, "rate must be in"),
    ],
)
def test_instance_dependent_validates_input(labels, probs, rate, error, message):
    with pytest.raises(error, match=message):
        inject_instance_dependent(np.asarray(labels), probs, rate, seed=0)


# -- datasets --------------------------------------------------------------------------------


def test_add_noise_corrupts_only_the_train_split(digits_dataset):
    noisy = add_noise(digits_dataset, "symmetric", 0.3, seed=0)
    table = noisy.table
    train, test = table["split"] == "train", table["split"] == "test"
    assert noisy.classes == digits_dataset.classes and len(noisy) == len(digits_dataset)
    assert (table.loc[test, "noise"] == "clean").all()
    assert (table.loc[test, "label"] == table.loc[test, "true_label"]).all()
    assert (table.loc[train, "noise"] == "flipped").sum() == int(np.floor(0.3 * train.sum()))
    flipped = table["noise"] == "flipped"
    assert (table.loc[flipped, "label"] != table.loc[flipped, "true_label"]).all()
    assert (table["true_label"] == digits_dataset.table["label"]).all()
    np.testing.assert_array_equal(noisy.features(), digits_dataset.features())
    # Same flips as the array function on the train labels with the same seed.
    codes = digits_dataset.label_codes()[train.to_numpy()]
    expected = inject_symmetric(codes, 10, 0.3, seed=0)
    np.testing.assert_array_equal(noisy.label_codes()[train.to_numpy()], expected)
    np.testing.assert_array_equal(noisy.true_label_codes(), digits_dataset.label_codes())
    assert "symmetric noise 0.3" in noisy.source
    assert not digits_dataset.has_truth  # the input dataset is left alone


def test_add_noise_is_seeded(digits_dataset):
    a = add_noise(digits_dataset, "symmetric", 0.2, seed=4).table["label"]
    b = add_noise(digits_dataset, "symmetric", 0.2, seed=4).table["label"]
    c = add_noise(digits_dataset, "symmetric", 0.2, seed=5).table["label"]
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_add_pair_noise_with_class_names(blobs_dataset):
    noisy = add_noise(blobs_dataset, "pair", 0.5, seed=0, mapping={"a": "c"})
    table = noisy.table
    flipped = table[table["noise"] == "flipped"]
    n_train_a = (blobs_dataset.table["split"] == "train") & (blobs_dataset.table["label"] == "a")
    assert len(flipped) == int(np.floor(0.5 * n_train_a.sum())) == 15
    assert set(flipped["true_label"]) == {"a"} and set(flipped["label"]) == {"c"}
    default = add_noise(blobs_dataset, "pair", 0.2, seed=0).table
    moved = default[default["noise"] == "flipped"]
    assert {(t, g) for t, g in zip(moved["true_label"], moved["label"], strict=True)} == {
        ("a", "b"),
        ("b", "c"),
        ("c", "a"),
    }
    assert len(moved) == 3 * int(np.floor(0.2 * 30))


def test_make_open_set(digits_dataset):
    open_set = make_open_set(digits_dataset, ["8", "9"], 0.1, seed=0)
    table = open_set.table
    assert open_set.classes == [str(d) for d in range(8)]
    train = table[table["split"] == "train"]
    n_in = int((train["noise"] == "clean").sum())
    n_open = int((train["noise"] == "open_set").sum())
    assert n_open == int(np.floor(0.1 / 0.9 * n_in + 1e-9))
    assert abs(n_open / len(train) - 0.1) < 1e-3
    outsiders = table[table["noise"] == "open_set"]
    assert set(outsiders["true_label"]) == {"8", "9"}
    assert set(outsiders["label"]) <= set(open_set.classes)
    assert len(set(outsiders["label"])) == 8  # random in-set labels cover the classes
    # Every other example of a held-out class is gone, test split included.
    assert not table.loc[table["noise"] != "open_set", "true_label"].isin(["8", "9"]).any()
    assert not table.loc[table["split"] == "test", "true_label"].isin(["8", "9"]).any()
    kept_in_set = digits_dataset.table["label"].isin([str(d) for d in range(8)])
    assert len(table) == kept_in_set.sum() + n_open
    assert (open_set.true_label_codes() == -1).sum() == n_open
    original_order = digits_dataset.table["example_id"].tolist()
    positions = [original_order.index(i) for i in table["example_id"]]
    assert positions == sorted(positions)


def test_open_set_plus_symmetric(digits_dataset, tmp_path):
    noisy = add_noise(
        digits_dataset,
        "symmetric",
        0.3,
        seed=0,
        open_set_classes=["8", "9"],
        open_set_fraction=0.08,
    )
    train = noisy.table[noisy.table["split"] == "train"]
    counts = train["noise"].value_counts().to_dict()
    n_in = counts["clean"] + counts["flipped"]
    assert counts["open_set"] == int(np.floor(0.08 / 0.92 * n_in + 1e-9))
    assert counts["flipped"] == int(np.floor(0.3 * n_in))
    assert noisy.classes == [str(d) for d in range(8)]
    again = add_noise(
        digits_dataset,
        "symmetric",
        0.3,
        seed=0,
        open_set_classes=["8", "9"],
        open_set_fraction=0.08,
    )
    assert again.table["label"].tolist() == noisy.table["label"].tolist()
    loaded = AuditDataset.from_parquet(noisy.to_parquet(tmp_path / "noisy.parquet"))
    assert loaded.table["noise"].tolist() == noisy.table["noise"].tolist()
    np.testing.assert_array_equal(loaded.true_label_codes(), noisy.true_label_codes())


def test_open_set_kind_uses_rate_as_the_fraction(blobs_dataset):
    noisy = add_noise(blobs_dataset, "open_set", 0.1, seed=0, open_set_classes=["c"])
    train = noisy.table[noisy.table["split"] == "train"]
    assert (train["noise"] == "open_set").sum() == 6 and len(train) == 66
    assert noisy.classes == ["a", "b"]


def test_add_noise_none_returns_the_dataset_unchanged(blobs_dataset):
    same = add_noise(blobs_dataset, "none")
    assert not same.has_truth
    assert same.table["label"].tolist() == blobs_dataset.table["label"].tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "symetric"}, "did you mean 'symmetric'"),
        ({"kind": "open_set", "rate": 0.1}, "needs open_set_classes"),
        ({"kind": "open_set", "rate": 0.1, "open_set_classes": ["z"]}, "unknown class(es) ['z']"),
        (
            {"kind": "open_set", "rate": 0.6, "open_set_classes": ["c"]},
            "needs 90 training examples of ['c'], but there are only 30",
        ),
        ({"kind": "open_set", "rate": 0.1, "open_set_classes": ["b", "c"]}, "leaves 1 class"),
        ({"kind": "symmetric", "rate": 0.1, "open_set_classes": ["c"]}, "needs open_set_fraction"),
        ({"kind": "symmetric", "rate": 0.1, "mapping": {"a": "b"}}, "does not apply"),
        ({"kind": "none", "open_set_fraction": 0.1}, "takes no open-set options"),
    ],
)
def test_add_noise_refuses_bad_options(blobs_dataset, kwargs, message):
    with pytest.raises(ConfigError) as info:
        add_noise(blobs_dataset, **kwargs)
    assert message in str(info.value)


def test_noise_is_not_added_twice(blobs_dataset):
    noisy = add_noise(blobs_dataset, "symmetric", 0.1, seed=0)
    with pytest.raises(ConfigError, match="already carries injected noise"):
        add_noise(noisy, "symmetric", 0.1, seed=0)
