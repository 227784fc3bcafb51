"""Report stage: the report tables, summary, figures and HTML page of an audit, and how
its quality is measured (before and after the retrain, and against a known truth).

`build_report` assembles an ``AuditReport`` from the stage results; `write_report` writes it
with `dm_audit.reports` (schemas and atomic writers).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dm_audit import class_health, correction, duplicates, estimate, linear_reference, reports
from dm_audit.atomic import keep_png_renderings
from dm_audit.config import AuditConfig
from dm_audit.crossfit import CROSSFIT_FOLDS, audited, true_codes
from dm_audit.dataset import AuditDataset
from dm_audit.emphasis import create_weighting, plot_weighting_curves
from dm_audit.metrics import accuracy, mcnemar_worse_p
from dm_audit.stage_flags import DUPLICATE_COLUMNS
from dm_audit.stage_results import (
    AuditFit,
    AuditReport,
    Corrections,
    CrossFit,
    ExampleScores,
    Flags,
    ProbeResult,
    Retrained,
)

# The retrained models count as worse than the audit models when the one-sided exact McNemar
# test on the rows only one of them gets right says so at this conventional level (the
# Dagster check `retrain_not_worse` uses the same default); the CLI then exits with status 3.
RETRAIN_WORSE_ALPHA = 0.05


def build_report(
    dataset: AuditDataset,
    probe_result: ProbeResult,
    audit_fit: AuditFit,
    scores: ExampleScores,
    flag_result: Flags,
    corrections: Corrections,
    retrained: Retrained,
    config: AuditConfig,
) -> AuditReport:
    """Assemble the report tables, the summary and the plots of an audit."""
    data = audited(dataset)
    examples = _examples_frame(data, scores, flag_result, corrections)
    classes_frame, health = class_health.class_health(
        flag_result.noise_estimate.joint,
        list(dataset.classes),
        scores.table["given"].to_numpy(),
        examples["is_label_issue"].to_numpy(dtype=bool),
        examples["is_ood"].to_numpy(dtype=bool),
    )
    summary = _summary(
        data,
        examples,
        health,
        probe_result=probe_result,
        audit_fit=audit_fit,
        scores=scores,
        flag_result=flag_result,
        corrections=corrections,
        retrained=retrained,
        config=config,
    )
    metrics = pd.concat(
        [_history_frame("audit", audit_fit.models), _history_frame("retrain", retrained.models)],
        ignore_index=True,
    )
    figures = _figures(
        examples, classes_frame, list(dataset.classes), flag_result, audit_fit, retrained
    )
    return AuditReport(
        examples=examples,
        label_issues=reports.label_issues_frame(examples),
        corrected_labels=reports.corrected_labels_frame(examples),
        metrics=metrics,
        summary=summary,
        figures=figures,
        final_models=retrained.models or audit_fit.models,
        classes=classes_frame,
        render_html=functools.partial(_html_page, data, examples, classes_frame, summary, figures),
    )


def _examples_frame(
    data: AuditDataset, scores: ExampleScores, flag_result: Flags, corrections: Corrections
) -> pd.DataFrame:
    """examples.parquet: one row per input row, in dataset order."""
    classes = np.asarray(data.classes, dtype=object)
    given = scores.table["given"].to_numpy()
    ranking = scores.ensemble_probs()
    examples = pd.DataFrame(
        {
            "example_id": scores.table["example_id"].to_numpy(),
            "split": data.table["split"].astype(str).to_numpy(),
            "fold": scores.table["fold"].to_numpy(),
            "given_label": classes[given],
            "p_given": scores.table["p_given"].to_numpy(),
            "mean_p": scores.table["mean_p"].to_numpy() if "mean_p" in scores.table else np.nan,
            "emphasis_weight": scores.table["emphasis_weight"].to_numpy(),
            # The prediction the flags and the suggestions rank classes by: both networks of each
            # fold, mixed by skill with the linear reference's where there is one.
            "predicted_label": classes[ranking.argmax(axis=1)],
            "predicted_prob": ranking.max(axis=1),
        }
    )
    for column in (
        "knn_agreement",
        "label_issue_score",
        "is_label_issue",
        "ood_score",
        "is_ood",
        *DUPLICATE_COLUMNS,
    ):
        if column in flag_result.table:
            examples[column] = flag_result.table[column].to_numpy()
    for column in (
        "suggested_label",
        "suggestion_confidence",
        "corrected_label",
        "correction_source",
    ):
        examples[column] = corrections.table[column].to_numpy()
    truth = true_codes(data)
    if truth is not None:
        examples["true_label"] = data.table["true_label"].to_numpy(dtype=object)
        examples["is_noisy"] = given != truth
    return examples


def _summary(
    data: AuditDataset,
    examples: pd.DataFrame,
    health: dict[str, Any],
    *,
    probe_result: ProbeResult,
    audit_fit: AuditFit,
    scores: ExampleScores,
    flag_result: Flags,
    corrections: Corrections,
    retrained: Retrained,
    config: AuditConfig,
) -> dict[str, Any]:
    """summary.json: how the input was read, the estimates and choices, counts and quality."""
    given = scores.table["given"].to_numpy()
    source = corrections.table["correction_source"].value_counts()
    weights = scores.family_weights
    summary: dict[str, Any] = {
        "source": data.source,
        "input": data.notes,
        "n_examples": len(data),
        "n_audited": len(examples),
        "cross_fitting": {
            "folds": CROSSFIT_FOLDS,
            "rows_per_fold": np.bincount(scores.folds, minlength=CROSSFIT_FOLDS).tolist(),
        },
        # Whether the flags and suggestions mixed in the linear reference model's
        # out-of-sample probabilities (dm_audit.linear_reference), why not, and the classes too
        # small for it, whose rows the networks audit alone.
        "linear_reference": scores.reference_probs is not None,
        "linear_reference_skipped": scores.reference_skipped,
        "linear_reference_left_out": (
            linear_reference.classes_left_out(given, list(data.classes))
            if scores.reference_probs is not None
            else []
        ),
        # How the ensemble weighed the networks against the linear reference: by each family's
        # skill on the given labels out of sample (ExampleScores.family_weights).
        "ensemble_weights": None if weights is None else weights.to_dict(),
        "n_classes": data.n_classes,
        "classes": list(data.classes),
        "config": config.to_dict(),
        "noise_estimate": _noise_summary(probe_result, flag_result, retrained),
        "emphasis": _emphasis_summary(probe_result, audit_fit, retrained),
        "label_issue_weights": flag_result.issue_weights,
        "class_health": health,
        "duplicates": flag_result.duplicates,
        "thresholds": {
            "label_issue": flag_result.label_issue_threshold,
            "ood": flag_result.ood_threshold,
            "ood_review": flag_result.ood_review_threshold,
            "min_correction_confidence": config.min_correction_confidence,
        },
        "counts": {
            "label_issues": int(examples["is_label_issue"].sum()),
            "ood": int(examples["is_ood"].sum()),
            **{name: int(source.get(name, 0)) for name in correction.CORRECTION_SOURCES},
        },
        "quality": compare_before_after(given, scores.probs, retrained.probs, corrections),
        "retrain_skipped": retrained.skipped,
        "automatic_corrections": corrections.gate,
        "training_events": {
            "audit": audit_fit.models.events,
            "retrain": [] if retrained.models is None else retrained.models.events,
        },
        # The batch and learning rate each fold's model trained with: chosen from the fold's
        # size when the user left them unset (`crossfit.training_batch`); the probe trains on
        # the audit's folds, so with the audit's batch.
        "training": {
            "audit": _training_recipe(audit_fit.models),
            "retrain": [] if retrained.models is None else _training_recipe(retrained.models),
        },
        "seconds": {
            "probe": probe_result.seconds,
            "audit_training": audit_fit.seconds,
            "retrain": retrained.seconds,
        },
    }
    if corrections.review_report is not None:
        summary["reviews"] = dataclasses.asdict(corrections.review_report)
    truth = true_codes(data)
    if truth is not None:
        summary["against_truth"] = _truth_summary(
            given, truth, scores, flag_result, corrections, retrained
        )
    return summary


def _training_recipe(models: CrossFit) -> list[dict[str, Any]]:
    """Each fold model's batch size, peak learning rate and epochs."""
    return [
        {
            "fold": k,
            "batch_size": int(f.config.batch_size),
            "lr": float(f.config.peak_lr),
            "epochs": int(f.config.epochs),
        }
        for k, f in enumerate(models.fits)
    ]


def _noise_summary(
    probe_result: ProbeResult, flag_result: Flags, retrained: Retrained
) -> dict[str, Any]:
    """The noise rate estimated by the probe, by the audit's flags and after correction."""
    return {
        "probe_rate": float(probe_result.noise_rate),
        "audit_rate": float(flag_result.noise_rate),
        "confident_joint_rate": float(flag_result.noise_estimate.rate),
        "residual_rate": None
        if retrained.residual_estimate is None
        else float(retrained.residual_estimate.rate),
    }


def _emphasis_summary(
    probe_result: ProbeResult, audit_fit: AuditFit, retrained: Retrained
) -> dict[str, Any]:
    """λ and β that trained the models, and those requested before any collapse guard."""
    return {
        "adaptive": probe_result.adaptive,
        "audit": _choice_dict(audit_fit.effective_choice),
        "retrain": _choice_dict(retrained.effective_choice),
        "requested": {
            "audit": _choice_dict(audit_fit.choice),
            "retrain": _choice_dict(retrained.choice),
        },
    }


def _truth_summary(
    given: np.ndarray,
    truth: np.ndarray,
    scores: ExampleScores,
    flag_result: Flags,
    corrections: Corrections,
    retrained: Retrained,
) -> dict[str, Any]:
    """``against_truth``: detection and correction quality, and the models' accuracy on the
    in-distribution rows against their true labels."""
    out = evaluate_against_truth(given, truth, flag_result.table, corrections)
    in_dist = truth >= 0
    out["accuracy_before"] = accuracy(scores.probs.argmax(axis=1)[in_dist], truth[in_dist])
    out["accuracy_after"] = (
        None
        if retrained.probs is None
        else accuracy(retrained.probs.argmax(axis=1)[in_dist], truth[in_dist])
    )
    return out


def _figures(
    examples: pd.DataFrame,
    classes_frame: pd.DataFrame,
    class_names: list[Any],
    flag_result: Flags,
    audit_fit: AuditFit,
    retrained: Retrained,
) -> dict[str, Any]:
    """The report's plots, by name (written as plots/<name>.png)."""
    is_issue = examples["is_label_issue"].to_numpy(dtype=bool)
    from dm_audit import plots  # matplotlib: imported when the first figure is drawn

    figures: dict[str, Any] = {
        "p_distribution": plots.plot_p_distribution(examples["p_given"].to_numpy(), is_issue),
        "label_issue_scores": plots.plot_score_distribution(
            examples["label_issue_score"].to_numpy(),
            flag_result.label_issue_threshold,
            is_flagged=is_issue,
        ),
        "class_health": plots.plot_class_health(
            classes_frame["class"].tolist(),
            classes_frame["label_quality"].to_numpy(),
            classes_frame["rows"].to_numpy(),
        ),
        "noise_matrix": plots.plot_noise_matrix(flag_result.noise_estimate.matrix, class_names),
        "weighting_curves": _weighting_figure(
            audit_fit.effective_choice, retrained.effective_choice
        ),
    }
    p_history = audit_fit.models.in_sample_p_history(len(examples))
    if p_history.shape[1] > 0:
        figures["training_dynamics"] = plots.plot_training_dynamics(
            np.asarray(p_history, dtype=np.float32), is_issue
        )
    # Finished: report.html and plots/*.png share one rendering of each.
    return {name: keep_png_renderings(figure) for name, figure in figures.items()}


def _html_page(
    data: AuditDataset,
    examples: pd.DataFrame,
    classes_frame: pd.DataFrame,
    summary: dict[str, Any],
    figures: dict[str, Any],
) -> str:
    """report.html; for image data with thumbnails of the suspects and their suggested class."""
    from dm_audit import html_report

    images = neighbour_rows = None
    if data.input_kind == "image":
        images = data.table["image"].tolist()
        flagged = examples["is_label_issue"].to_numpy(dtype=bool)
        score = examples["label_issue_score"].to_numpy()
        order = np.lexsort((examples["example_id"].to_numpy(dtype=str), -score))
        suspects = order[flagged[order]][: html_report.SUSPECTS_SHOWN]
        code = {name: k for k, name in enumerate(data.classes)}
        neighbour_rows = html_report.suggested_class_neighbours(
            duplicates.duplicate_space(data.images()),
            suspects,
            examples["suggested_label"].map(code).fillna(-1).to_numpy(dtype=np.int64),
            examples["given_label"].map(code).to_numpy(dtype=np.int64),
            ~flagged & ~examples["is_ood"].to_numpy(dtype=bool),
        )
    return html_report.render_report(
        summary, examples, classes_frame, figures, images=images, neighbours=neighbour_rows
    )


def _weighting_figure(audit: estimate.EmphasisChoice, final: estimate.EmphasisChoice | None) -> Any:
    same = final is not None and (final.lam, final.beta) == (audit.lam, audit.beta)
    # One line for both trainings when they used the same emphasis: a second, identical curve
    # would hide the first.
    who = "audit and retrain" if same else "audit"
    curves = {
        f"{who}: DM λ={audit.lam:g}, β={audit.beta:g}": create_weighting(
            "dm", lam=audit.lam, beta=audit.beta
        ),
        "CCE": create_weighting("cce"),
    }
    if final is not None and not same:
        curves[f"retrain: DM λ={final.lam:g}, β={final.beta:g}"] = create_weighting(
            "dm", lam=final.lam, beta=final.beta
        )
    return plot_weighting_curves(curves, None, normalise=True)


def write_report(
    report: AuditReport, out_dir: str | Path, *, if_exists: str = "error"
) -> reports.ReportPaths:
    """Write the report tables, ``summary.json`` and the plots into `out_dir` atomically."""
    return reports.write_reports(
        out_dir,
        report.examples,
        report.label_issues,
        report.corrected_labels,
        report.metrics,
        report.summary,
        report.figures,
        classes_df=report.classes,
        html=report.html,
        if_exists=if_exists,
    )


def compare_before_after(
    given: np.ndarray,
    before_probs: np.ndarray,
    after_probs: np.ndarray | None,
    corrections: Corrections,
) -> dict[str, Any]:
    """Out-of-sample accuracy of the audit models and of the retrained models, paired.

    Both are measured on the same rows against the same labels: the rows whose given label the
    audit kept, against that label, each row predicted by the models of its fold (which never
    trained on it). On clean data the two should agree within sampling error; the discordant
    counts (``paired``) let a check test whether the retrain is worse (McNemar).
    """
    source = corrections.table["correction_source"].to_numpy()
    kept = source == "kept"
    before_right = before_probs.argmax(axis=1)[kept] == given[kept]
    out: dict[str, Any] = {
        "measured_on": "rows whose given label was kept, out of sample",
        "n_compared": int(kept.sum()),
        "accuracy_before": accuracy(before_probs.argmax(axis=1)[kept], given[kept])
        if kept.any()
        else None,
        "accuracy_after": None,
        "paired": None,
        "retrain_worse": False,
    }
    if after_probs is not None and kept.any():
        after_right = after_probs.argmax(axis=1)[kept] == given[kept]
        out["accuracy_after"] = float(after_right.mean())
        before_only = int((before_right & ~after_right).sum())
        after_only = int((after_right & ~before_right).sum())
        p_worse = mcnemar_worse_p(before_only, after_only)
        out["paired"] = {
            "n": int(kept.sum()),
            "before_only": before_only,
            "after_only": after_only,
            "p_worse": p_worse,
        }
        out["retrain_worse"] = bool(p_worse <= RETRAIN_WORSE_ALPHA)
    return out


def _detection(truth: np.ndarray, flagged: np.ndarray, score_values: np.ndarray) -> dict[str, Any]:
    """Precision, recall, F1 and AUROC of flags against a known truth (bool arrays)."""
    # Imported here: scikit-learn's metrics cost seconds to import, and only runs with a
    # known truth (benchmarks, injected noise) need them.
    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

    out: dict[str, Any] = {
        "n_positive": int(truth.sum()),
        "n_flagged": int(flagged.sum()),
        "precision": float(precision_score(truth, flagged, zero_division=0)),
        "recall": float(recall_score(truth, flagged, zero_division=0)),
        "f1": float(f1_score(truth, flagged, zero_division=0)),
    }
    both = 0 < truth.sum() < truth.size
    out["auroc"] = float(roc_auc_score(truth, score_values)) if both else None
    return out


def evaluate_against_truth(
    given: np.ndarray,
    truth: np.ndarray,
    flag_table: pd.DataFrame,
    corrections: Corrections,
) -> dict[str, Any]:
    """Detection and correction quality when the true labels are known (synthetic noise).

    Label-issue detection is measured on in-distribution examples (true class known): an open-set
    example has no right label to detect. OOD detection is measured against all other examples and
    against the mislabelled ones only (the hard case: both have a wrong given label).
    """
    in_dist = truth >= 0
    mislabelled = in_dist & (given != truth)
    is_open = ~in_dist
    issue_score = flag_table["label_issue_score"].to_numpy()
    is_issue = flag_table["is_label_issue"].to_numpy(dtype=bool)
    result: dict[str, Any] = {
        "true_noise_rate": float(mislabelled[in_dist].mean()) if in_dist.any() else None,
        "label_issues": _detection(mislabelled[in_dist], is_issue[in_dist], issue_score[in_dist]),
    }
    corrected = corrections.table["corrected"].to_numpy()
    # An example left out of the retrain (OOD or sent to review) keeps its given label here.
    final = np.where(corrected >= 0, corrected, given)
    result["label_accuracy_before"] = float((given[in_dist] == truth[in_dist]).mean())
    result["label_accuracy_after"] = float((final[in_dist] == truth[in_dist]).mean())
    if is_open.any():
        from sklearn.metrics import roc_auc_score

        ood = flag_table["ood_score"].to_numpy()
        is_ood = flag_table["is_ood"].to_numpy(dtype=bool)
        vs_mislabelled = is_open | mislabelled
        source = corrections.table["correction_source"].to_numpy()
        result["ood"] = {
            "n_open_set": int(is_open.sum()),
            **_detection(is_open, is_ood, ood),
            "auroc_vs_mislabelled": float(
                roc_auc_score(is_open[vs_mislabelled], ood[vs_mislabelled])
            )
            if mislabelled.any()
            else None,
            "share_not_auto_corrected": float((source[is_open] != "auto_corrected").mean()),
        }
    return result


def _history_frame(stage: str, fit_result: CrossFit | None) -> pd.DataFrame:
    if fit_result is None or not fit_result.history:
        return pd.DataFrame(columns=["stage", "fold", "epoch"])
    frame = pd.DataFrame(fit_result.history)
    numeric = [
        c
        for c in frame.columns
        if c not in ("epoch", "fold")
        and pd.api.types.is_numeric_dtype(frame[c])
        and not pd.api.types.is_bool_dtype(frame[c])
    ]
    out = frame[["fold", "epoch", *numeric]].copy()
    out.insert(0, "stage", stage)
    return out


def _choice_dict(choice: estimate.EmphasisChoice | None) -> dict[str, Any] | None:
    if choice is None:
        return None
    return {"lam": float(choice.lam), "beta": float(choice.beta), "reason": choice.reason}
