"""Flag stage: label issues, out-of-distribution examples and duplicates of every row.

`flag_examples` combines the array functions of `dm_audit.flags` (scores, counts, the OOD test)
and `dm_audit.duplicates` (copies in the input space) into the ``Flags`` of an audit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from dm_audit import duplicates, estimate, flags
from dm_audit.batches import augmentation
from dm_audit.config import AuditConfig
from dm_audit.crossfit import CROSSFIT_FOLDS, audited, make_train_config
from dm_audit.dataset import AuditDataset
from dm_audit.memory import release_unused_memory
from dm_audit.neighbours import NeighbourGraph
from dm_audit.stage_results import ExampleScores, Flags

# The OOD distance is to the nearest trusted example: the sharpest on digits (AUROC 0.91 at k=1,
# 0.90 at 3, 0.89 at 10).
OOD_NEIGHBOUR = 1
# False discovery rate of the OOD test (Benjamini-Hochberg on conformal p-values against the
# unflagged rows): the conventional 5 %; on in-distribution data the chance of any OOD flag is
# then at most about 5 %, whatever the size of the table.
OOD_FDR = 0.05
# A flagged example whose OOD score exceeds that of 75 % of the unflagged examples is sent to
# review instead of being corrected automatically.
OOD_REVIEW_FPR = 0.25
# A class given to fewer rows than this is learnt by each fold model from at most 5 rows: its
# rows that a nearest input neighbour's label supports are not counted as mislabelled
# (`_few_shot_supported`). The linear reference's floor (`linear_reference.MIN_CLASS_ROWS`), for
# the same reason. On benchmarks/long_tail.py's clean table (30 classes of 297 down to 7 rows),
# 74 % of the correct rows of such classes were flagged without it.
FEW_SHOT_ROWS = 10
# Neighbours searched per row in the input space, once for the duplicates (the first
# `duplicates.NEIGHBOURS`) and the OOD score's input view (the `flags.INPUT_NEIGHBOUR`-th nearest
# trusted row). Twice the input view's k, so that almost every row has that many trusted rows
# listed (in-distribution rows are mostly trusted) and only the others are searched again.
# The OOD score's group view reads the first `flags.GROUP_NEIGHBOURS` of them.
INPUT_GRAPH_NEIGHBOURS = max(
    duplicates.NEIGHBOURS, 2 * flags.INPUT_NEIGHBOUR, flags.GROUP_NEIGHBOURS
)
# Columns `flag_examples` adds from `dm_audit.duplicates`.
DUPLICATE_COLUMNS = (
    "near_duplicate_score",
    "is_near_duplicate",
    "near_duplicate_set",
    "is_leaked_duplicate",
)


def flag_examples(dataset: AuditDataset, scores: ExampleScores, config: AuditConfig) -> Flags:
    """Flag label issues and out-of-distribution examples of every row.

    * **Score**: `flags.label_issue_scores` of the out-of-sample prediction (normalised margin
      of `ExampleScores.ensemble_probs`: both networks and the linear reference),
      the in-sample training dynamics (mean p_i under DM, which learns clean examples early and
      mislabelled ones late or never) and the label agreement of the row's nearest neighbours
      among its fold in the fold model's embedding space. The dynamics weigh as much as the
      other two together, scaled down by `flags.dynamics_reliability` when the in-sample
      models memorised the rows their out-of-sample twins doubt. A row labelled against its
      duplicate set's consensus has that evidence averaged in (`duplicates.conflict_evidence`).
    * **How many**: confident learning's calibrated confident joint of the out-of-sample
      probabilities estimates, per given class, how many of its labels are wrong
      (`estimate.estimate_noise`); each class's most suspicious rows up to that count are
      flagged (`flags.flag_by_class_counts`), if their score leans towards another label
      (`flags.NEUTRAL_ISSUE_SCORE`), except the rows of a class of fewer than
      `FEW_SHOT_ROWS` rows that a nearest input neighbour of their label supports
      (`_few_shot_supported`). A fixed threshold or top k overrides all of these.
    * **OOD**: `flags.ood_scores` per fold against the fold's trusted rows (the model's view),
      with the distance to the trusted rows in the input space (the input's view); then half
      the row's score and half the mean of its 5 nearest rows' in the input space, ranked again
      among the unflagged rows (the group view, `flags.smooth_over_neighbours`: strangers come
      in groups); and a conformal
      test (`flags.conformal_ood_flags`): an example is flagged when its score is too high for
      the unflagged rows at a false discovery rate of `OOD_FDR`, so in-distribution data gets
      (almost) no OOD flags.
    """
    table = scores.table
    labels = table["given"].to_numpy()
    agreement, votes, graphs = _neighbour_agreement(scores, labels, config)
    # Both networks of each fold mixed with the linear reference by skill: what the score's
    # prediction, the duplicates' consensus and the noise count read (computed once: at 1M rows
    # every copy is N x C).
    ensemble = scores.ensemble_probs()
    issue_score, weights = _label_issue_score(scores, labels, agreement, ensemble)
    # How many rows to flag: the confident joint of two models of each fold, the probe's and
    # the audit's, averaged. Each fold model errs confidently on some rows it never saw; two
    # independently trained ones rarely agree on those, so the mean counts fewer model errors
    # as noise. Chosen on the development data (benchmarks/results/flag_rules.md): clean
    # tables flagged 1.2 -> 0.6 % (digits), 5.6 -> 4.0 % (raw binary), 16.7 -> 12.5 % (tiny
    # and wide); F1 at 20-40 % noise up on five of seven settings, within 0.011 on the others.
    # Counted before the input space exists, so their transient copies never coincide.
    noise = estimate.estimate_noise(ensemble, labels, min_class_rows=CROSSFIT_FOLDS)
    # The features as every model of the audit read them (heavy-tailed columns by rank).
    inputs = audited(dataset).inputs()
    steady_trajectories = not _augmented_trajectories(config, inputs.shape[1:])
    # One input space (standardised features, images averaged down) for the duplicates and the
    # OOD score's input view; features are standardised as each search reads them.
    space = duplicates.input_space(inputs)
    input_graph = duplicates.input_graph(
        space,
        INPUT_GRAPH_NEIGHBOURS,
        seed=config.seed,
        progress="flags: input neighbours" if config.progress else None,
        # Kept until the OOD score has asked it for the rows the graph leaves: at scale a
        # second index of the trusted rows would cost another k-means and its memory.
        keep_index=True,
    )
    dups = duplicates.find_duplicates(inputs, seed=config.seed, graph=input_graph)
    del inputs
    conflict = duplicates.conflict_evidence(dups, labels, ensemble)
    del ensemble
    has_conflict = ~np.isnan(conflict)
    # A copy of an input labelled otherwise is direct evidence that one of the two labels is
    # wrong, not a model's estimate: it weighs as much as all the other evidence together.
    issue_score[has_conflict] = (issue_score[has_conflict] + conflict[has_conflict]) / 2.0
    few_shot_supported = _few_shot_supported(labels, input_graph.positions)
    is_issue, threshold = _flag_label_issues(
        issue_score, labels, noise, conflict, few_shot_supported, config
    )
    trusted = flags.select_trusted(table["p_given"].to_numpy(), is_issue)
    input_distances = _input_distances(space, input_graph, trusted, config)
    # The group view reads each row's nearest rows in the input space; the rest of the graph
    # and its index are done with: freed, and their memory handed back, before the model
    # view's searches build their own indexes (at 1M x 128 the index is 256 MB).
    # int32 row numbers: 20 MB at a million rows instead of 40.
    group = input_graph.positions[:, : flags.GROUP_NEIGHBOURS].astype(np.int32)
    del space, input_graph
    release_unused_memory()
    ood, scored = _ood_scores(
        scores,
        labels,
        votes,
        is_issue,
        trusted,
        _ModelView(input_distances, graphs, of_images=dataset.input_kind == "image"),
        config,
        instability=steady_trajectories,
    )
    ood_alone = ood  # `_group_view` returns a new array: this one stays the score before it
    ood = _group_view(ood, scored, group, is_issue)
    del group
    is_ood, ood_threshold, review_threshold = _ood_flags(ood, is_issue, config)
    # The searches' indexes and result blocks are freed; give their memory back.
    release_unused_memory()
    ids = table["example_id"].to_numpy(dtype=object)
    out = pd.DataFrame(
        {
            "example_id": ids,
            "knn_agreement": agreement,
            "label_issue_score": issue_score,
            "is_label_issue": is_issue,
            "ood_score": ood,
            "is_ood": is_ood,
            **_duplicate_columns(dups, ids, dataset.table["split"].to_numpy()),
        }
    )
    return Flags(
        out,
        float(threshold),
        float(ood_threshold),
        float(review_threshold),
        float(noise.rate),
        noise,
        votes,
        weights,
        ood_score_alone=ood_alone,
        duplicates={
            **dups.summary(labels),
            "leaked_rows": int(out["is_leaked_duplicate"].sum()),
        },
    )


@dataclass(frozen=True)
class _ModelView:
    """What the OOD score reuses from the flag stage's searches: each row's distance to the
    trusted rows in the input space (None when too few rows are trusted), each fold's graph in
    its model's embedding space (None for a fold too small to search), and `of_images` when
    the input space is of images averaged down."""

    input_distances: np.ndarray | None
    fold_graphs: list[NeighbourGraph | None]
    of_images: bool = False


def _neighbour_agreement(
    scores: ExampleScores, labels: np.ndarray, config: AuditConfig
) -> tuple[np.ndarray, np.ndarray, list[NeighbourGraph | None]]:
    """Each row's kNN label agreement (N,) and votes (N, C) among its fold, in the fold model's
    embedding space, and each fold's neighbour graph; a fold too small for neighbours agrees
    with itself."""
    n, c = scores.probs.shape
    agreement = np.zeros(n)
    # float32, as `knn_label_agreement` counts them: a float64 copy is 160 MB at 1M x 20.
    votes = np.zeros((n, c), dtype=np.float32)
    graphs: list[NeighbourGraph | None] = []
    fold_rows = scores.fold_rows()
    for k, rows in enumerate(fold_rows):
        if rows.size < 2:
            agreement[rows], votes[rows, labels[rows]] = 1.0, 1.0
            graphs.append(None)
            continue
        knn = flags.knn_label_agreement(
            scores.embeddings[k],
            labels[rows],
            n_classes=c,
            k=min(config.knn_k, rows.size - 1),
            seed=config.seed,
            progress=f"flags: neighbours {k + 1}/{len(fold_rows)}" if config.progress else None,
        )
        agreement[rows], votes[rows] = knn.agreement, knn.votes
        graphs.append(knn.graph)
        # The fold's index was freed when the search returned; hand its memory back before the
        # next fold builds its own (at 1M rows each is a quarter of a gigabyte that malloc
        # would otherwise keep).
        del knn
        release_unused_memory()
    return agreement, votes, graphs


def _label_issue_score(
    scores: ExampleScores, labels: np.ndarray, agreement: np.ndarray, ensemble: np.ndarray
) -> tuple[np.ndarray, dict[str, float]]:
    """The label-issue score of every row from the model evidence (`ensemble`:
    `ExampleScores.ensemble_probs`), and the weights used.

    The trajectory's weight shrinks by `flags.dynamics_reliability`: a tiny, wide table is
    memorised and its in-sample trajectories carry no signal.
    """
    table = scores.table
    mean_p = table["mean_p"].to_numpy() if "mean_p" in table else None
    if mean_p is not None:
        # A row no model trained on (a singleton class) has no trajectory: use its p_i.
        mean_p = np.where(np.isnan(mean_p), table["p_given"].to_numpy(), mean_p)
    weights = dict(flags.DEFAULT_ISSUE_WEIGHTS)
    reliability = 1.0
    if mean_p is not None:
        reliability = flags.dynamics_reliability(mean_p, scores.probs, labels)
        weights["dynamics"] *= reliability
    # The prediction's evidence is what the noise count reads: both networks of each fold (the
    # audit's and the probe's, which stops before it memorises) mixed with the linear reference by
    # skill (`ExampleScores.family_weights`). The trajectory and its reliability are the audit
    # network's own. Chosen on the development datasets (benchmarks/evidence_choices.py: 42
    # settings, both variants scored on the same audits; figures when chosen, with the neighbours'
    # labels still in the score, the file holds today's): mean F1 at 20-40 % noise 0.672 -> 0.679,
    # AUROC 0.915 -> 0.919, the same flags on clean tables; the gain is largest where the audit
    # network memorised its rows (tiny, wide table: AUROC 0.79 -> 0.83 at 40 % symmetric noise).
    issue_score = flags.label_issue_scores(
        ensemble[np.arange(len(labels)), labels],
        ensemble,
        labels,
        mean_p=mean_p,
        knn_agreement=agreement,
        weights=weights,
    )
    return issue_score, weights


def _flag_label_issues(
    issue_score: np.ndarray,
    labels: np.ndarray,
    noise: estimate.NoiseEstimate,
    conflict: np.ndarray,
    few_shot_supported: np.ndarray,
    config: AuditConfig,
) -> tuple[np.ndarray, float]:
    """How many to flag: the rows flagged as label issues (N,) bool, and the lowest flagged
    score (1.0 when none is flagged, the user's threshold when one is fixed).
    `few_shot_supported` rows (`_few_shot_supported`) are not counted."""
    if config.top_k is not None:
        is_issue = flags.flag_label_issues(issue_score, top_k=config.top_k)
        threshold = float(np.min(issue_score[is_issue])) if is_issue.any() else 1.0
    elif config.label_issue_threshold is not None:
        threshold = float(config.label_issue_threshold)
        is_issue = issue_score >= threshold
    else:
        # The confident joint counts a weak model's errors as noise too: of each class's
        # counted rows, only those whose evidence leans towards another label are flagged.
        is_issue = (
            flags.flag_by_class_counts(
                issue_score, labels, flags.issue_counts_per_class(noise, labels)
            )
            & (issue_score >= flags.NEUTRAL_ISSUE_SCORE)
            & ~few_shot_supported
        )
        # The confident joint counts what the models doubt; a duplicate labelled against its
        # set's consensus is flagged on its own evidence, counted or not (its score, averaged
        # with that evidence of 1, is at least the neutral 0.5 already).
        is_issue |= conflict == 1.0
        threshold = float(np.min(issue_score[is_issue])) if is_issue.any() else 1.0
    return is_issue, threshold


def _few_shot_supported(labels: np.ndarray, input_neighbours: np.ndarray) -> np.ndarray:
    """Rows of a class given to fewer than `FEW_SHOT_ROWS` rows that share their label with one
    of their nearest rows in the input space, (N,) bool.

    Each fold model learns such a class from a handful of rows, too few to recognise it out of
    sample: its rows look mislabelled to the model whatever their label, and the confident
    joint counts them. A neighbour given the same rare label is evidence no model is needed
    for (a small class of its own); such rows are not counted as wrong (a duplicate labelled
    against its set still is). A row of such a class with no neighbour of its label (a label
    its surroundings do not support: a typo, a class of one row) is counted as any other.
    """
    given = np.bincount(labels, minlength=int(labels.max()) + 1 if labels.size else 0)
    few = given[labels] < FEW_SHOT_ROWS
    near = input_neighbours[few]
    same = (near >= 0) & (labels[np.where(near >= 0, near, 0)] == labels[few][:, None])
    supported = np.zeros(labels.size, dtype=bool)
    supported[few] = same.any(axis=1)
    return supported


def _ood_scores(
    scores: ExampleScores,
    labels: np.ndarray,
    votes: np.ndarray,
    is_issue: np.ndarray,
    trusted: np.ndarray,
    searched: _ModelView,
    config: AuditConfig,
    *,
    instability: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The OOD score of every row, per fold against the fold's trusted rows, and which rows
    were scored (a fold with nothing to compare with is not: its rows get 0); the input view's
    distances are to the trusted rows of every fold, as the input space is shared. Without
    `instability` the spread of p_i over the epochs is left out of the model's view."""
    table = scores.table
    std_p = table["std_p"].to_numpy() if instability and "std_p" in table else None
    input_distances = searched.input_distances
    ood = np.zeros(len(labels))
    scored = np.zeros(len(labels), dtype=bool)
    fold_rows = scores.fold_rows()
    for k, rows in enumerate(fold_rows):
        fold_trusted = trusted[rows]
        if fold_trusted.sum() <= OOD_NEIGHBOUR or (~is_issue[rows]).sum() == 0:
            continue  # nothing in this fold to compare with: no OOD evidence
        scored[rows] = True
        ood[rows] = flags.ood_scores(
            scores.probs[rows],
            scores.embeddings[k],
            labels[rows],
            trusted_mask=fold_trusted,
            k=OOD_NEIGHBOUR,
            knn_votes=votes[rows],
            p_std=None if std_p is None else np.nan_to_num(std_p[rows], nan=0.0),
            reference_mask=~is_issue[rows],
            input_distances=None if input_distances is None else input_distances[rows],
            input_weight=flags.IMAGE_INPUT_VIEW_WEIGHT
            if searched.of_images
            else flags.INPUT_VIEW_WEIGHT,
            neighbour_graph=searched.fold_graphs[k],
            seed=config.seed,
            progress=f"flags: OOD distance {k + 1}/{len(fold_rows)}" if config.progress else None,
        )
    return ood, scored


def _group_view(
    ood: np.ndarray, scored: np.ndarray, group: np.ndarray, is_issue: np.ndarray
) -> np.ndarray:
    """The OOD scores with the group view (`flags.smooth_over_neighbours`) among the scored
    rows: an unscored row (no OOD evidence) keeps its 0 and counts as no neighbour, so its 0
    pulls no one down; unchanged when no unflagged row was scored."""
    reference = scored & ~is_issue
    if not reference.any():
        return ood
    neighbours = np.where(scored[np.maximum(group, 0)] & (group >= 0), group, -1)
    smoothed = flags.smooth_over_neighbours(ood, neighbours, reference_mask=reference)
    return np.where(scored, smoothed, ood)


def _input_distances(
    space: np.ndarray | duplicates.StandardisedRows,
    input_graph: NeighbourGraph,
    trusted: np.ndarray,
    config: AuditConfig,
) -> np.ndarray | None:
    """Each row's distance to its nearest trusted rows in the input space (the OOD score's
    input view, trusted rows of every fold: the space is shared); None when too few rows are
    trusted."""
    if trusted.sum() <= flags.INPUT_NEIGHBOUR:
        return None
    return flags.input_space_distances(
        space,
        trusted,
        graph=input_graph,
        seed=config.seed,
        progress="flags: OOD input distance" if config.progress else None,
    )


def _augmented_trajectories(config: AuditConfig, input_shape: tuple[int, ...]) -> bool:
    """Whether the audit's p_i were recorded in augmented training passes.

    Then a row's p_i moves from epoch to epoch with the random crop or flip it was drawn with,
    and its spread over the epochs says more about the augmentation than about the row: on
    image data the spread ranked the unseen class's rows below the known ones (OOD AUROC 0.40
    and 0.56 on the development image folder with a held-out digit, alone and with 20 %
    symmetric noise; 0.45 on a 1,467-image folder of 28x28 digits at random offsets), where
    on feature tables it ranks them above (0.66-0.99 in 7 of the 8 development runs).
    Leaving it out of the OOD score raised those image folders' AUROC from 0.894 to 0.931,
    0.913 to 0.917 and 0.757 to 0.840 (one audit each with its components recombined, two
    threads; the 200-image folder's figures move by up to 0.05 between runs on one and two
    threads, the 1,467-image folder's are steadier).
    """
    train = make_train_config(config, loss="dm", loss_params={}, epochs=1)
    return train.dynamics_source == "train" and augmentation(train.augment, input_shape) is not None


def _ood_flags(
    ood: np.ndarray, is_issue: np.ndarray, config: AuditConfig
) -> tuple[np.ndarray, float, float]:
    """The OOD test: the rows flagged OOD, the OOD threshold, and the score above which a
    suggestion goes to review. With every row flagged as a label issue there is no
    in-distribution reference to test against: nothing is flagged OOD (or what the user's
    threshold flags) and no suggestion goes to review for its OOD score."""
    if (~is_issue).sum() == 0:
        if config.ood_threshold is None:
            return np.zeros(ood.size, dtype=bool), 1.0, 1.0
        threshold = float(config.ood_threshold)
        return flags.flag_ood(ood, threshold=threshold), threshold, threshold
    if config.ood_threshold is not None:
        ood_threshold = float(config.ood_threshold)
        is_ood = flags.flag_ood(ood, threshold=ood_threshold)
    else:
        is_ood, ood_threshold = flags.conformal_ood_flags(
            ood, reference_mask=~is_issue, fdr=OOD_FDR
        )
    # Suggestions for examples more atypical than most unflagged ones go to a person: an OOD
    # input the OOD test missed would otherwise be "corrected" into a class.
    review_threshold = min(
        ood_threshold,
        flags.auto_ood_threshold(ood, reference_mask=~is_issue, fpr=OOD_REVIEW_FPR),
    )
    return is_ood, ood_threshold, review_threshold


def _duplicate_columns(
    dups: duplicates.Duplicates, ids: np.ndarray, split: np.ndarray
) -> dict[str, np.ndarray]:
    """The duplicate columns of examples.parquet: a set is named by its first member's id."""
    set_names = np.full(len(ids), None, dtype=object)
    member = dups.set_id >= 0
    set_names[member] = ids[dups.set_id[member]]
    return {
        "near_duplicate_score": dups.score,
        "is_near_duplicate": dups.is_near_duplicate,
        "near_duplicate_set": set_names,
        "is_leaked_duplicate": duplicates.leaked_rows(dups, split),
    }
