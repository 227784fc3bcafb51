"""Tests of dm_audit.ood: OOD scores against mislabelled examples, thresholds, conformal test."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from synthetic_clusters import Synthetic, make_clusters

from dm_audit.duplicates import input_graph
from dm_audit.errors import ConfigError, DataError
from dm_audit.estimate import estimate_noise
from dm_audit.flags import flag_label_issues, label_issue_scores
from dm_audit.neighbour_labels import knn_label_agreement
from dm_audit.neighbours import NeighbourGraph
from dm_audit.ood import (
    IMAGE_INPUT_VIEW_WEIGHT,
    INPUT_VIEW_WEIGHT,
    auto_ood_threshold,
    conformal_ood_flags,
    flag_ood,
    input_space_distances,
    ood_scores,
    select_trusted,
    smooth_over_neighbours,
)

# The synthetic data has no training dynamics (no p_std) and OOD clusters whose neighbours carry
# mixed labels, so these tests weigh the three components available there explicitly.
SYNTHETIC_OOD_WEIGHTS = {"distance": 2.0, "uncertainty": 1.0, "neighbours": 1.0}


def _ood_setup(data: Synthetic, **kwargs: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    kwargs.setdefault("weights", SYNTHETIC_OOD_WEIGHTS)
    knn = knn_label_agreement(data.embeddings, data.given, k=10)
    scores = label_issue_scores(data.p_given, data.probs, data.given, knn_agreement=knn.agreement)
    is_issue = flag_label_issues(scores, noise_rate=estimate_noise(data.probs, data.given).rate)
    trusted = select_trusted(data.p_given, is_issue)
    ood = ood_scores(
        data.probs,
        data.embeddings,
        data.given,
        trusted_mask=trusted,
        knn_votes=knn.votes,
        reference_mask=~is_issue,
        **kwargs,  # type: ignore[arg-type]
    )
    return ood, is_issue, trusted


@pytest.mark.parametrize(
    ("use_logits", "min_all", "min_mislabelled"),
    # Measured AUROC vs all / vs mislabelled: entropy 0.966 / 0.972, energy 0.982 / 0.985.
    [(False, 0.955, 0.96), (True, 0.975, 0.978)],
)
def test_ood_scores_separate_ood_from_mislabelled(
    use_logits: bool, min_all: float, min_mislabelled: float
) -> None:
    data = make_clusters(rate=0.3, n_ood=240, separation=1.0)
    ood, is_issue, _ = _ood_setup(data, logits=data.logits if use_logits else None)
    assert ood.min() >= 0 and ood.max() <= 1
    is_open = data.true < 0
    mislabelled = (data.true >= 0) & (data.given != data.true)
    assert roc_auc_score(is_open, ood) >= min_all
    both = is_open | mislabelled
    assert roc_auc_score(is_open[both], ood[both]) >= min_mislabelled
    flagged = flag_ood(ood, reference_mask=~is_issue)
    # A conservative threshold: few false alarms (precision measured 0.84 / 0.96) and a part of
    # the OOD inputs caught (recall 0.225 / 0.375); the rest are left to low-confidence review.
    assert flagged[is_open].mean() >= 0.2
    assert (flagged & is_open).sum() / flagged.sum() >= 0.8


def test_ood_flags_little_without_ood() -> None:
    data = make_clusters(rate=0.0, separation=1.0, seed=5)
    ood, is_issue, _ = _ood_setup(data)
    threshold = auto_ood_threshold(ood, reference_mask=~is_issue, fpr=0.01)
    assert flag_ood(ood, threshold=threshold).mean() <= 0.015  # measured 0.010


def test_ood_per_class_search() -> None:
    data = make_clusters(rate=0.3, n_ood=240, separation=1.0)
    ood, _, _ = _ood_setup(data, per_class=True)
    assert roc_auc_score(data.true < 0, ood) >= 0.95  # measured 0.969


def test_ood_on_digits_with_held_out_classes() -> None:
    # Digits 8 and 9 are held out: 8 % of the training split is added as 8/9 images with random
    # labels 0-7, on top of 30 % symmetric noise. Raw pixels stand in for the embedding and
    # out-of-fold logistic regression for the audit model. Measured AUROC 0.956 vs all and
    # 0.951 vs mislabelled examples.
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    inside = np.flatnonzero(y < 8)
    train = rng.choice(inside, int(0.7 * inside.size), replace=False)
    n_ood = int(0.08 * train.size)
    extra = rng.choice(np.flatnonzero(y >= 8), n_ood, replace=False)
    given = y[train].copy()
    flip = rng.choice(train.size, int(0.3 * train.size), replace=False)
    given[flip] = (given[flip] + rng.integers(1, 8, flip.size)) % 8
    xs = np.vstack([x[train], x[extra]])
    given = np.concatenate([given, rng.integers(0, 8, n_ood)])
    true = np.concatenate([y[train], np.full(n_ood, -1)])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    probs = cross_val_predict(model, xs, given, cv=5, method="predict_proba")
    emb = StandardScaler().fit_transform(xs)
    data = Synthetic(emb, given, true, probs, np.log(probs), np.zeros(given.size))
    ood, _, _ = _ood_setup(data)
    is_open = true < 0
    mislabelled = (true >= 0) & (given != true)
    both = is_open | mislabelled
    assert roc_auc_score(is_open, ood) >= 0.93
    assert roc_auc_score(is_open[both], ood[both]) >= 0.92


def test_ood_validates_inputs() -> None:
    data = make_clusters(n=50, rate=0.0, separation=3.0)
    few = np.zeros(50, dtype=bool)
    few[:3] = True
    with pytest.raises(DataError, match="more than k=3 trusted"):
        ood_scores(data.probs, data.embeddings, data.given, trusted_mask=few)
    ok = np.ones(50, dtype=bool)
    with pytest.raises(DataError, match="embeddings"):
        ood_scores(data.probs, data.embeddings[:10], data.given, trusted_mask=ok)
    with pytest.raises(DataError, match="logits"):
        ood_scores(
            data.probs, data.embeddings, data.given, trusted_mask=ok, logits=np.zeros((5, 2))
        )
    with pytest.raises(ConfigError, match="unknown OOD weight"):
        ood_scores(data.probs, data.embeddings, data.given, trusted_mask=ok, weights={"x": 1.0})
    with pytest.raises(ConfigError, match="reference_mask"):
        flag_ood(np.zeros(50))
    with pytest.raises(ConfigError, match="fpr"):
        auto_ood_threshold(np.zeros(50), reference_mask=ok, fpr=0.0)


# ----------------------------------------------------------------------------- input view


def test_input_space_distances_are_to_the_kth_nearest_other_trusted_row() -> None:
    # Points on a line; rows 0-3 trusted, 4 not. Row 0's trusted neighbours (itself excluded)
    # are at 1, 3 and 6; row 4 (untrusted, at 10) sees all four trusted rows.
    space = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    trusted = np.array([True, True, True, True, False])
    np.testing.assert_allclose(input_space_distances(space, trusted, k=1), [1, 1, 2, 3, 4])
    np.testing.assert_allclose(input_space_distances(space, trusted, k=2), [3, 2, 3, 5, 7])
    with pytest.raises(DataError, match="more than k=4 trusted"):
        input_space_distances(space, trusted, k=4)
    with pytest.raises(DataError, match="2-d"):
        input_space_distances(space.ravel(), trusted, k=1)
    with pytest.raises(ConfigError, match="k must be"):
        input_space_distances(space, trusted, k=0)


def test_the_input_view_weighs_its_share_of_the_score() -> None:
    data = make_clusters(n=300, rate=0.0, separation=3.0)
    trusted = np.ones(300, dtype=bool)

    def score(**options: object) -> np.ndarray:
        return ood_scores(data.probs, data.embeddings, data.given, trusted_mask=trusted, **options)

    model_view = score()
    distances = np.arange(300, dtype=float)  # row i more atypical than i others
    both = score(input_distances=distances)
    input_rank = (np.arange(300) + 1) / 300
    np.testing.assert_allclose(
        both, (1 - INPUT_VIEW_WEIGHT) * model_view + INPUT_VIEW_WEIGHT * input_rank
    )
    third = score(input_distances=distances, input_weight=IMAGE_INPUT_VIEW_WEIGHT)
    np.testing.assert_allclose(third, (2 * model_view + input_rank) / 3)
    with pytest.raises(ConfigError, match="input_weight"):
        score(input_distances=distances, input_weight=1.5)
    with pytest.raises(DataError, match="input_distances"):
        score(input_distances=distances[:10])


def test_the_input_view_finds_inputs_the_model_placed_in_a_known_class() -> None:
    # The model has absorbed the OOD rows: they sit inside class 0's embedding cluster and are
    # predicted as confidently as its own rows. In the input space they are a cluster of their
    # own, far from every trusted row.
    rng = np.random.default_rng(0)
    data = make_clusters(n=600, rate=0.0, separation=3.0)
    n_ood = 48
    of_class_0 = np.flatnonzero(data.given == 0)[:n_ood]
    probs = np.vstack([data.probs, data.probs[of_class_0]])
    embeddings = np.vstack([data.embeddings, data.embeddings[of_class_0]])
    given = np.concatenate([data.given, np.zeros(n_ood, dtype=data.given.dtype)])
    inputs = np.vstack([rng.normal(size=(600, 8)), rng.normal(loc=6.0, size=(n_ood, 8))])
    is_ood = np.r_[np.zeros(600, bool), np.ones(n_ood, bool)]
    trusted = select_trusted(probs[np.arange(given.size), given], np.zeros(given.size, bool))
    model_view = ood_scores(probs, embeddings, given, trusted_mask=trusted)
    both = ood_scores(
        probs,
        embeddings,
        given,
        trusted_mask=trusted,
        input_distances=input_space_distances(inputs, trusted),
    )
    # Measured: 0.40 for the model's view alone (worse than chance: the copies are as typical as
    # their twins), 0.76 with the input view at half weight.
    assert roc_auc_score(is_ood, model_view) < 0.5
    assert roc_auc_score(is_ood, both) >= 0.7


# ------------------------------------------------------------------- reused neighbour graphs


def test_the_kth_neighbour_among_members_is_read_from_the_graph() -> None:
    graph = NeighbourGraph(
        positions=np.array([[1, 2, 3], [0, 3, -1], [3, 0, 1]]),
        similarities=np.array([[0.9, 0.8, 0.7], [0.9, 0.6, -np.inf], [0.5, 0.4, 0.3]]),
        metric="cosine",
    )
    members = np.array([True, False, True, True])
    np.testing.assert_array_equal(graph.kth_among(members, 1), [0.8, 0.9, 0.5])
    np.testing.assert_array_equal(graph.kth_among(members, 2), [0.7, 0.6, 0.4])
    assert np.isnan(graph.kth_among(members, 3)).all()  # nobody lists three members
    empty = NeighbourGraph(np.zeros((2, 0), np.int64), np.zeros((2, 0), np.float32), "l2")
    assert np.isnan(empty.kth_among(np.ones(2, bool), 1)).all()


def test_ood_scores_from_a_reused_graph_equal_a_fresh_search() -> None:
    # A graph of 3 neighbours leaves the rows whose 3 nearest rows are all untrusted to a second
    # search: both paths must give the scores of one search against the trusted rows.
    data = make_clusters(n=400, rate=0.2, n_ood=40, separation=2.0)
    knn = knn_label_agreement(data.embeddings, data.given, k=3)
    scores = label_issue_scores(data.p_given, data.probs, data.given, knn_agreement=knn.agreement)
    is_issue = flag_label_issues(scores, noise_rate=0.2)
    trusted = select_trusted(data.p_given, is_issue)
    assert np.isnan(knn.graph.kth_among(trusted, 1)).any()
    options = {"trusted_mask": trusted, "k": 1, "reference_mask": ~is_issue}
    fresh = ood_scores(data.probs, data.embeddings, data.given, **options)
    reused = ood_scores(
        data.probs, data.embeddings, data.given, neighbour_graph=knn.graph, **options
    )
    # The second search is exact without faiss: a distance may differ in its last float bit, and
    # two rows that tie may swap ranks (one rank step is 1 / reference rows, weighed 1/3).
    assert np.abs(reused - fresh).max() <= 1.0 / (~is_issue).sum()
    assert np.mean(reused != fresh) <= 0.01
    with pytest.raises(DataError, match="neighbour_graph"):
        ood_scores(
            data.probs,
            data.embeddings,
            data.given,
            neighbour_graph=input_graph(data.embeddings, 3),
            **options,
        )


def test_input_space_distances_from_a_reused_graph_equal_a_fresh_search() -> None:
    rng = np.random.default_rng(3)
    space = np.vstack([rng.normal(size=(300, 6)), rng.normal(loc=5.0, size=(30, 6))])
    trusted = np.r_[rng.uniform(size=300) < 0.9, np.zeros(30, bool)]
    graph = input_graph(space, 10)
    assert np.isnan(graph.kth_among(trusted, 5)).any()  # the far cluster lists no trusted row
    np.testing.assert_allclose(
        input_space_distances(space, trusted, graph=graph),
        input_space_distances(space, trusted),
        rtol=1e-5,
    )
    with pytest.raises(DataError, match="graph"):
        input_space_distances(space[:100], trusted[:100], graph=graph)


def test_rows_a_graph_leaves_are_asked_of_its_kept_index(monkeypatch) -> None:
    # Above the exact-search budget the rows the graph cannot answer get further neighbours
    # from the graph's own index; those still short (the far cluster) are searched against the
    # trusted rows. Every distance is the one a fresh search finds.
    rng = np.random.default_rng(3)
    space = np.vstack([rng.normal(size=(300, 6)), rng.normal(loc=5.0, size=(30, 6))])
    trusted = np.r_[rng.uniform(size=300) < 0.9, np.zeros(30, bool)]
    monkeypatch.setattr("dm_audit.neighbours.EXACT_SEARCH_BUDGET", 0)
    kept = input_graph(space, 3, keep_index=True)  # 3 neighbours: many rows are left
    assert kept.index is not None
    fresh = input_space_distances(space, trusted)
    further = input_space_distances(space, trusted, graph=kept)
    np.testing.assert_allclose(further, fresh, rtol=1e-5)


def test_select_trusted() -> None:
    p = np.array([0.9, 0.9, 0.3, 0.6])
    np.testing.assert_array_equal(select_trusted(p, np.array([0, 1, 0, 0])), [1, 0, 0, 1])
    np.testing.assert_array_equal(select_trusted(p, np.zeros(4, bool), min_p=0.7), [1, 1, 0, 0])


# ----------------------------------------------------------------------------- group view


def test_the_group_view_averages_each_row_with_its_neighbours_and_ranks_again() -> None:
    scores = np.array([0.125, 0.875, 0.5, 0.25])
    rows = np.array([[1, 2], [0, -1], [-1, -1], [0, 1]])
    # Own score and the neighbours' mean at half each: 0.125/2 + 0.6875/2, 0.875/2 + 0.125/2,
    # 0.5 (no neighbour found: its own score), 0.25/2 + 0.5/2 -> 0.40625, 0.5, 0.5, 0.375.
    reference = np.array([True, True, True, False])
    smoothed = smooth_over_neighbours(scores, rows, reference_mask=reference)
    # Ranked among the reference's 0.40625, 0.5, 0.5: the share strictly lower.
    np.testing.assert_allclose(smoothed, [0.0, 1 / 3, 1 / 3, 0.0])
    # Without the neighbours' share the ranks are those of the scores themselves.
    alone = smooth_over_neighbours(scores, rows, reference_mask=reference, weight=0.0)
    np.testing.assert_allclose(alone, [0.0, 2 / 3, 1 / 3, 1 / 3])


def test_the_group_views_ranks_flag_what_its_combined_scores_flag() -> None:
    # Re-ranking must not blunt the conformal test: a row above every reference row keeps the
    # smallest p-value, 1 / (n_ref + 1), so a cluster of 15 strangers among 1,500 rows is
    # flagged on the ranks exactly as on the combined scores.
    rng = np.random.default_rng(5)
    n_ref, n_tested, n_out = 1_000, 500, 15
    scores = np.r_[rng.uniform(0, 0.8, n_ref + n_tested), rng.uniform(0.97, 1.0, n_out)]
    reference = np.r_[np.ones(n_ref, bool), np.zeros(n_tested + n_out, bool)]
    none = np.full((scores.size, 1), -1)
    ranked = smooth_over_neighbours(scores, none, reference_mask=reference, weight=0.0)
    on_ranks, _ = conformal_ood_flags(ranked, reference_mask=reference)
    on_scores, _ = conformal_ood_flags(scores, reference_mask=reference)
    np.testing.assert_array_equal(on_ranks, on_scores)
    assert on_ranks[-n_out:].all()
    assert ranked[-n_out:].min() == 1.0 and ranked[reference].max() == 1.0 - 1.0 / n_ref
    np.testing.assert_array_equal(
        flag_ood(ranked, reference_mask=reference), flag_ood(scores, reference_mask=reference)
    )


def test_the_group_view_lifts_a_cluster_of_strangers_above_lone_hard_rows() -> None:
    rng = np.random.default_rng(3)
    # 600 rows of two known classes, 40 strangers in a cluster of their own; every row's own
    # score is noisy: the strangers' a little higher on average, 60 known rows high by chance.
    known = np.r_[rng.normal(-4, 1, (300, 2)), rng.normal(4, 1, (300, 2))]
    strangers = rng.normal((0, 8), 0.5, (40, 2))
    space = np.r_[known, strangers].astype(np.float32)
    is_stranger = np.r_[np.zeros(600, bool), np.ones(40, bool)]
    scores = np.clip(rng.normal(0.4, 0.15, 640) + 0.35 * is_stranger, 0, 1)
    scores[rng.choice(600, 60, replace=False)] = 0.99
    graph = input_graph(space, 5)
    smoothed = smooth_over_neighbours(scores, graph.positions, reference_mask=~is_stranger)
    before = roc_auc_score(is_stranger, scores)
    after = roc_auc_score(is_stranger, smoothed)
    # Measured: 0.852 -> 0.946.
    assert before < 0.87 and after > 0.93 and after - before > 0.07, (before, after)


def test_the_group_view_validates_its_inputs() -> None:
    scores, rows, ref = np.full(3, 0.5), np.array([[1], [2], [0]]), np.ones(3, bool)
    with pytest.raises(ConfigError, match="weight"):
        smooth_over_neighbours(scores, rows, reference_mask=ref, weight=1.5)
    with pytest.raises(DataError, match="neighbour_rows"):
        smooth_over_neighbours(scores, np.array([[1], [3], [0]]), reference_mask=ref)
    with pytest.raises(DataError, match="neighbour_rows"):
        smooth_over_neighbours(scores, rows[:2], reference_mask=ref)
    with pytest.raises(DataError, match="reference"):
        smooth_over_neighbours(scores, rows, reference_mask=np.zeros(3, bool))


# ----------------------------------------------------------------------------- conformal test


def test_conformal_ood_flags_nothing_on_in_distribution_scores() -> None:
    rng = np.random.default_rng(0)
    flagged_any = 0
    reference = np.r_[np.ones(2_000, bool), np.zeros(500, bool)]
    for _ in range(40):
        scores = rng.uniform(size=2_500)  # the tested rows come from the reference's law
        flagged, threshold = conformal_ood_flags(scores, reference_mask=reference)
        flagged_any += bool(flagged.any())
        assert not flagged[reference].any()  # reference rows calibrate, they are not tested
        tested = scores[~reference]
        assert (flagged[~reference] == (tested > threshold)).all()
    # Benjamini-Hochberg under the global null: any flag at all with probability <= 5 %.
    assert flagged_any <= 4


def test_conformal_ood_flags_an_outlying_cluster_of_any_size() -> None:
    rng = np.random.default_rng(1)
    # From m / (fdr (n_ref + 1)) rows on (m tested rows): a p-value cannot go below
    # 1 / (n_ref + 1), so Benjamini-Hochberg needs k outliers with 1 / (n_ref + 1) <= fdr k / m.
    for n_out in (25, 200):
        # 1,000 reference rows, 300 tested in-distribution rows and n_out outliers.
        inliers = rng.uniform(0.0, 0.8, size=1_300)
        outliers = rng.uniform(0.95, 1.0, size=n_out)
        scores = np.concatenate([inliers, outliers])
        reference = np.r_[np.ones(1_000, bool), np.zeros(300 + n_out, bool)]
        flagged, _ = conformal_ood_flags(scores, reference_mask=reference)
        assert flagged[1_300:].all()
        # False discoveries stay a small share of the flags (5 % in expectation).
        assert flagged[:1_300].sum() <= 0.1 * flagged.sum()
    with pytest.raises(ConfigError, match="fdr"):
        conformal_ood_flags(scores, reference_mask=reference, fdr=0.0)
    with pytest.raises(DataError, match="reference"):
        conformal_ood_flags(scores, reference_mask=np.zeros(scores.size, bool))


@pytest.mark.parametrize("kind", ["images", "features"])
def test_the_spread_of_augmented_trajectories_stays_out_of_the_ood_score(
    kind: str, colour_image_dataset, make_colour_images
) -> None:
    from dm_audit import audit
    from dm_audit.dataset import AuditDataset

    if kind == "images":
        dataset = colour_image_dataset
    else:
        images, labels = make_colour_images(n_per_class=12)
        features = images.reshape(len(images), -1)[:, :6].astype(np.float32)
        dataset = AuditDataset.from_arrays(labels, features=features, classes=["r", "g", "b"])
    config = audit.AuditConfig(epochs=3, probe_epochs=1, progress=False, device="cpu")
    scores = audit.score_examples(
        dataset, audit.train_audit_model(dataset, audit.probe(dataset, config), config), config
    )
    first = audit.flag_examples(dataset, scores, config).table["ood_score"].to_numpy()
    rng = np.random.default_rng(0)
    scores.table["std_p"] = rng.uniform(0.0, 0.5, len(scores.table))
    second = audit.flag_examples(dataset, scores, config).table["ood_score"].to_numpy()
    # Images train on random crops: their p_i's spread is the augmentation's and is not read.
    # Features train unaugmented: the spread is one of the model view's components.
    assert np.array_equal(first, second) == (kind == "images")
