"""Tests of dm_audit.neighbour_labels: neighbours' label agreement and votes, exact and IVF."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_clusters import make_clusters

from dm_audit.errors import ConfigError, DataError
from dm_audit.neighbour_labels import knn_label_agreement


def test_knn_agreement_clean_and_noisy_clusters() -> None:
    clean = make_clusters(rate=0.0, separation=3.0)
    knn = knn_label_agreement(clean.embeddings, clean.given, k=10)
    assert knn.agreement.shape == (3000,) and knn.votes.shape == (3000, 10)
    assert knn.indices.shape == (3000, 10) and knn.similarities.shape == (3000, 10)
    np.testing.assert_allclose(knn.votes.sum(axis=1), 1.0)
    assert knn.agreement.mean() > 0.99
    assert not (knn.indices == np.arange(3000)[:, None]).any()  # self excluded
    assert (np.diff(knn.similarities, axis=1) <= 1e-6).all()  # nearest first

    noisy = make_clusters(rate=0.3, separation=3.0)
    knn = knn_label_agreement(noisy.embeddings, noisy.given, k=10)
    wrong = noisy.given != noisy.true
    # Clean examples agree with the ~70 % correct labels of their cluster; mislabelled ones only
    # with the few neighbours flipped to the same wrong class. Measured 0.70 and 0.04.
    assert knn.agreement[~wrong].mean() == pytest.approx(0.70, abs=0.03)
    assert knn.agreement[wrong].mean() < 0.06
    # The neighbour vote recovers the true class of most mislabelled examples.
    assert (knn.votes[wrong].argmax(axis=1) == noisy.true[wrong]).mean() > 0.97


def test_knn_excludes_self_even_with_duplicates() -> None:
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    knn = knn_label_agreement(emb, np.array([0, 1, 1, 1, 1]), k=1)
    np.testing.assert_array_equal(knn.indices[:2, 0], [1, 0])  # each sees its twin, not itself
    np.testing.assert_array_equal(knn.agreement, [0, 0, 1, 1, 1])


def test_ivf_and_chunked_search_match_exact_search() -> None:
    data = make_clusters(n=6000, rate=0.2, separation=2.0, seed=3)
    flat = knn_label_agreement(data.embeddings, data.given, k=10, index="flat")
    chunked = knn_label_agreement(data.embeddings, data.given, k=10, index="flat", batch_size=257)
    np.testing.assert_array_equal(flat.indices, chunked.indices)
    np.testing.assert_allclose(flat.agreement, chunked.agreement)
    ivf = knn_label_agreement(data.embeddings, data.given, k=10, index="ivf", nprobe=16)
    # IVF is approximate; on these clusters 16 of 77 lists find the exact neighbours (measured
    # mean |difference| 0.000).
    assert np.abs(ivf.agreement - flat.agreement).mean() < 0.02
    assert (ivf.indices != np.arange(6000)[:, None]).all()
    # "auto" switches to IVF above the threshold.
    auto = knn_label_agreement(data.embeddings, data.given, k=10, ivf_threshold=1000, nprobe=16)
    np.testing.assert_array_equal(auto.indices, ivf.indices)


def test_knn_validates_inputs() -> None:
    emb = np.zeros((4, 3))
    with pytest.raises(DataError, match="embeddings"):
        knn_label_agreement(np.zeros(4), np.zeros(4, int))
    with pytest.raises(DataError, match="labels"):
        knn_label_agreement(emb, np.zeros(3, int))
    with pytest.raises(DataError, match="non-finite"):
        knn_label_agreement(np.array([[0.0, np.inf], [1, 1]]), np.zeros(2, int))
    with pytest.raises(ConfigError, match="k must"):
        knn_label_agreement(emb, np.zeros(4, int), k=0)
    with pytest.raises(ConfigError, match="index"):
        knn_label_agreement(emb, np.zeros(4, int), index="hnsw")  # type: ignore[arg-type]
