"""Correction stage: a suggested label for every row, and the label the retrain uses.

`dm_audit.correction` holds the rules (suggestions, the automatic-correction gate, decisions);
human reviews (`dm_audit.reviews`) override them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dm_audit import correction
from dm_audit.config import AuditConfig
from dm_audit.crossfit import audited
from dm_audit.dataset import AuditDataset
from dm_audit.reviews import read_reviews
from dm_audit.stage_results import Corrections, ExampleScores, Flags

log = logging.getLogger(__name__)

# Sharpens the out-of-sample prediction (the network's, mixed by skill with the linear
# reference's where there is one) into a suggestion, as ProSelfLC's annealed temperature
# sharpens its self-knowledge (METHOD.md §3 uses T = 0.5 on image data).
SUGGESTION_TEMPERATURE = 0.5


def correct_labels(
    dataset: AuditDataset,
    scores: ExampleScores,
    flag_result: Flags,
    config: AuditConfig,
    *,
    reviews_path: str | Path | None = None,
    strict_reviews: bool = True,
) -> Corrections:
    """Suggest a label for every example and decide which label the retrain uses.

    Human reviews (a file of ``example_id,label``) override every automatic decision; review
    rows with unknown ids or labels are listed in the review report, never silently dropped:
    with ``strict_reviews`` (the CLI's default) they stop the run with a `DataError` naming them.
    """
    data = audited(dataset)
    labels = scores.table["given"].to_numpy()
    evidence = {
        "temperature": SUGGESTION_TEMPERATURE,
        "knn_votes": flag_result.knn_votes,
        "proselflc_targets": scores.proselflc_targets,
    }
    combined = scores.combined_probs()
    # Which class: the evidence the flags read (both networks of each fold and the linear
    # reference); how sure: the audit network with the reference, whose probabilities the
    # automatic-correction floor (`AuditConfig.min_correction_confidence`) was set for (the
    # probe's network stops early and is softer: with its probabilities averaged in, fewer
    # right corrections pass the floor). Chosen on the development datasets
    # (benchmarks/evidence_choices.py): correctly flagged rows at 20 % noise suggested their
    # true label 94.1 % of the time against 93.3 % with the audit network's ranking, no setting
    # worse; the labels right after the automatic corrections unchanged (82.9 %).
    ranking = scores.ensemble_probs()
    # The class the evidence ranks first, the given label included: a flagged row whose own
    # label comes first is suggested the runner-up, which is never applied automatically.
    first, _ = correction.suggest_labels(ranking, **evidence)
    suggested, confidence = correction.suggest_labels(
        ranking,
        **evidence,
        given=labels,
        flagged=flag_result.table["is_label_issue"].to_numpy(dtype=bool),
        confidence_probs=combined,
    )
    del ranking
    review_positions, review_report = None, None
    if reviews_path is not None:
        reviews = read_reviews(
            reviews_path,
            known_ids=data.example_ids,
            classes=dataset.classes,
            strict=strict_reviews,
        )
        review_report = reviews.report
        review_positions = reviews.to_positions(data.example_ids, dataset.classes)
    allowed, gate = correction.automatic_correction_gate(
        labels, combined, scores.folds, dataset.classes
    )
    _warn_about_gate(gate, int((~allowed).sum()))
    plan = correction.decide_corrections(
        labels,
        suggested,
        confidence,
        flag_result.table["is_label_issue"].to_numpy(),
        flag_result.table["is_ood"].to_numpy(),
        min_confidence=config.min_correction_confidence,
        reviews=review_positions,
        ood_scores=flag_result.table["ood_score"].to_numpy(),
        max_ood_score=flag_result.ood_review_threshold,
        n_classes=dataset.n_classes,
        allowed=allowed,
        favours_given=first == labels,
    )
    classes = np.asarray(dataset.classes, dtype=object)
    corrected_names = np.where(plan.corrected >= 0, classes[np.maximum(plan.corrected, 0)], None)
    table = pd.DataFrame(
        {
            "example_id": scores.table["example_id"].to_numpy(),
            "suggested": suggested,
            "suggested_label": classes[suggested],
            "suggestion_confidence": confidence,
            "corrected": plan.corrected,
            "corrected_label": corrected_names,
            "correction_source": plan.source,
            "include_in_retrain": plan.include_in_retrain,
        }
    )
    return Corrections(table, plan, review_report, gate)


def _warn_about_gate(gate: dict[str, Any], n_held: int) -> None:
    if not gate["model_better_than_chance"]:
        log.warning(
            "the audit model is no better than chance on the given labels (balanced accuracy "
            "%.3f, chance up to %.3f): no label is corrected automatically, every suggestion "
            "goes to review",
            gate["balanced_accuracy"],
            gate["chance_limit"],
        )
    elif gate["unlearnable_classes"]:
        log.warning(
            "classes %s have too few rows for the model that scores them to have seen them: "
            "their %d row(s) are never corrected automatically (suggestions go to review)",
            gate["unlearnable_classes"],
            n_held,
        )
