"""The audit as Dagster assets, one per stage of `dm_audit.audit`.

Each asset calls one library stage and attaches what a person wants to see in the UI; all the
computing happens in `dm_audit`, so the CLI and Dagster produce the same results::

    dataset -> noise_probe -> audit_model -> example_scores -> flags -> corrected_labels
            -> retrained_model -> audit_reports -> mislabel_export

Results travel between assets through `pipelines.storage.AuditIOManager` (under
``<output_root>/<run_id>/stages``); the reports land in ``<output_root>/<run_id>/report`` and the
export for review in ``<output_root>/exports/label_issues.parquet``.
"""

# No `from __future__ import annotations`: Dagster reads the parameter annotations at
# definition time to find config classes, resources and inputs, and strings would not resolve.

import os
from pathlib import Path
from typing import Any

import dagster as dg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dm_audit import audit
from dm_audit.atomic import atomic_write_bytes, check_output_location
from dm_audit.dataset import AuditDataset
from dm_audit.noise import add_noise
from dm_audit.reports import ReportPaths, read_report
from dm_audit.sources import load_source
from pipelines.config import DatasetConfig, ReviewsConfig
from pipelines.metadata import image_markdown, markdown_table, scalar_metadata
from pipelines.resources import AuditRuntime, AuditSettings

__all__ = [
    "AUDIT_ASSETS",
    "audit_model",
    "audit_reports",
    "corrected_labels",
    "dataset",
    "example_scores",
    "flags",
    "mislabel_export",
    "noise_probe",
    "retrained_model",
]

GROUP = "dm_audit"


def _gpu_op_tags() -> dict[str, Any]:
    """Op tags asking Kubernetes for ``DM_AUDIT_K8S_GPUS`` GPUs per model-running step.

    Read by the ``k8s`` executor only (see `pipelines.definitions`); other executors ignore them.
    """
    gpus = os.environ.get("DM_AUDIT_K8S_GPUS", "").strip()
    if not gpus or gpus == "0":
        return {}
    limits = {"nvidia.com/gpu": gpus}
    return {"dagster-k8s/config": {"container_config": {"resources": {"limits": limits}}}}


#: Tags of the assets that train or run a network.
MODEL_OP_TAGS = _gpu_op_tags()
#: Concurrency pool of every step that runs a network: a pool limit applies to every run,
#: however it was launched (a job, "Materialize" in the UI, `dagster asset materialize`), where
#: a run-tag limit only reaches runs of the tagged jobs. See README "concurrency".
MODEL_POOL = "dm_audit_models"
TOP_SUSPECTS = 20
SUSPECT_COLUMNS = [
    "example_id",
    "given_label",
    "suggested_label",
    "label_issue_score",
    "suggestion_confidence",
    "p_given",
]


# Last-epoch history entries worth a glance in the UI (the full history is in metrics.parquet).
FIT_FIGURES = ("loss", "train_acc", "test_acc", "clean_fit", "noisy_fit", "noisy_correction")


def _fit_metadata(models: audit.CrossFit, seconds: float) -> dict[str, Any]:
    """Key last-epoch figures of each cross-fitted model, for the model assets."""
    meta: dict[str, Any] = {"training_seconds": seconds}
    for k, fit in enumerate(models.fits):
        last = fit.history[-1] if fit.history else {}
        meta[f"fold{k}_epochs_run"] = len(fit.history)
        meta |= {f"fold{k}_final_{n}": last[n] for n in FIT_FIGURES if last.get(n) is not None}
    return meta


@dg.asset(group_name=GROUP, kinds={"parquet"})
def dataset(
    config: DatasetConfig, audit_settings: AuditSettings, runtime: AuditRuntime
) -> dg.Output[AuditDataset]:
    """The canonical dataset table, with synthetic noise injected when configured."""
    # Reports written into an image folder would become part of its data.
    check_output_location(runtime.output_root, inputs=[config.source])
    seed = audit_settings.seed  # one seed, as on the command line
    data = load_source(config.source, **config.load_options(seed))
    if config.noise_kind != "none":
        data = add_noise(data, **config.noise_options(seed))
    table = data.table
    counts = table.groupby(["label", "split"]).size().unstack(fill_value=0).reset_index()
    meta: dict[str, Any] = {
        "dagster/row_count": len(table),
        "n_train": int((table["split"] == "train").sum()),
        "n_test": int((table["split"] == "test").sum()),
        "n_classes": data.n_classes,
        "input_kind": data.input_kind,
        "source": data.source,
    }
    if data.has_truth:
        meta["injected_noise"] = table["noise"].value_counts().to_dict()
    read_as = data.notes.get("inputs", [])
    if read_as:
        meta["inputs"] = ", ".join(f"{e['column']} ({e['encoding']})" for e in read_as)
    ignored = data.notes.get("ignored_columns", [])
    if ignored:
        meta["ignored_columns"] = ", ".join(f"{e['column']}: {e['reason']}" for e in ignored)
    return dg.Output(
        data,
        metadata={
            **scalar_metadata(meta),
            "class_counts": dg.MetadataValue.md(markdown_table(counts)),
        },
    )


@dg.asset(group_name=GROUP, kinds={"pytorch"}, op_tags=MODEL_OP_TAGS, pool=MODEL_POOL)
def noise_probe(
    dataset: AuditDataset, audit_settings: AuditSettings, runtime: AuditRuntime
) -> dg.Output[audit.ProbeResult]:
    """The probe: one short cross-fitted training, its noise estimate, the chosen DM (λ, β)."""
    result = audit.probe(dataset, audit_settings.audit_config(runtime.device))
    meta = {
        # The probe's estimate, which chose λ and β; flags reports the one that counts flags.
        "probe_noise_rate": result.estimate.rate,
        "lambda": result.choice.lam,
        "beta": result.choice.beta,
        "adaptive": result.adaptive,
        "choice_reason": result.choice.reason,
        "seconds": result.seconds,
    }
    return dg.Output(result, metadata=scalar_metadata(meta))


@dg.asset(group_name=GROUP, kinds={"pytorch"}, op_tags=MODEL_OP_TAGS, pool=MODEL_POOL)
def audit_model(
    context: dg.AssetExecutionContext,
    dataset: AuditDataset,
    noise_probe: audit.ProbeResult,
    audit_settings: AuditSettings,
    runtime: AuditRuntime,
) -> dg.Output[audit.AuditFit]:
    """The cross-fitted DM audit models: each row is scored by the one that never saw it.

    Checkpoints go under the root run's folder, so re-executing a failed run resumes training
    from its last checkpoint (`dm_audit.training.checkpoint_interval`) instead of starting over
    (the library refuses a checkpoint written with other options or data, so a changed
    re-execution fails loudly, never mixes).
    """
    root_run = context.run.root_run_id or context.run.run_id
    result = audit.train_audit_model(
        dataset,
        noise_probe,
        audit_settings.audit_config(runtime.device),
        checkpoint_dir=runtime.run_dir(root_run) / "checkpoints" / "audit_model",
        resume=True,
    )
    choice = result.effective_choice
    meta = {"lambda": choice.lam, "beta": choice.beta, "events": result.models.events}
    return dg.Output(
        result, metadata=scalar_metadata({**meta, **_fit_metadata(result.models, result.seconds)})
    )


@dg.asset(group_name=GROUP, op_tags=MODEL_OP_TAGS, pool=MODEL_POOL)
def example_scores(
    context: dg.AssetExecutionContext,
    dataset: AuditDataset,
    audit_model: audit.AuditFit,
    audit_settings: AuditSettings,
    runtime: AuditRuntime,
) -> dg.Output[audit.ExampleScores]:
    """Per-example p_i, emphasis weight, prediction, entropy, margin and dynamics summary."""
    # At scale the scores stream to a file that the flags asset, in another process, reads.
    scores_path = audit.streamed_scores_path(dataset, runtime.stage_dir(context.run.run_id))
    result = audit.score_examples(
        dataset, audit_model, audit_settings.audit_config(runtime.device), scores_path=scores_path
    )
    table = result.table
    meta = {
        "dagster/row_count": len(table),
        "mean_p_given": float(table["p_given"].mean()),
        "share_predicted_as_given": float((table["predicted"] == table["given"]).mean()),
    }
    if result.family_weights is not None:
        # How the flags will weigh the networks against the linear reference.
        meta["linear_reference_share"] = result.family_weights.reference_share
    return dg.Output(result, metadata=scalar_metadata(meta))


@dg.asset(group_name=GROUP)
def flags(
    dataset: AuditDataset,
    example_scores: audit.ExampleScores,
    audit_settings: AuditSettings,
    runtime: AuditRuntime,
) -> dg.Output[audit.Flags]:
    """Label-issue flags (in-distribution) and out-of-distribution flags."""
    config = audit_settings.audit_config(runtime.device)
    result = audit.flag_examples(dataset, example_scores, config)
    table = result.table
    suspects = _suspects_view(dataset, example_scores, table)
    meta = {
        "n_label_issues": int(table["is_label_issue"].sum()),
        "flagged_share": float(table["is_label_issue"].mean()),
        "n_ood": int(table["is_ood"].sum()),
        "label_issue_threshold": result.label_issue_threshold,
        "ood_threshold": result.ood_threshold,
        # The estimate that sets how many rows are flagged (the probe's and the audit models'
        # out-of-sample probabilities together); noise_probe's is the probe's alone.
        "estimated_noise_rate": result.noise_estimate.rate,
        "near_duplicate_rows": result.duplicates.get("near_duplicate_rows", 0),
        "conflicting_duplicate_sets": result.duplicates.get("conflicting_sets", 0),
        "leaked_duplicate_rows": result.duplicates.get("leaked_rows", 0),
    }
    return dg.Output(
        result,
        metadata={
            **scalar_metadata(meta),
            "top_suspects": dg.MetadataValue.md(markdown_table(suspects, max_rows=TOP_SUSPECTS)),
        },
    )


def _suspects_view(
    dataset: AuditDataset, scores: audit.ExampleScores, table: pd.DataFrame
) -> pd.DataFrame:
    """The flagged rows as a reviewer reads them: most suspicious first, labels by name
    (numbers to four significant digits, as in every table)."""
    classes = np.asarray(dataset.classes, dtype=object)
    given = scores.table["given"].to_numpy()
    ranking = scores.ensemble_probs()
    view = table.assign(
        given_label=classes[given],
        predicted_label=classes[ranking.argmax(axis=1)],
        predicted_prob=ranking.max(axis=1),
        p_given=scores.table["p_given"].to_numpy(),
    )
    view = view[view["is_label_issue"]].sort_values("label_issue_score", ascending=False)
    columns = [
        "example_id",
        "given_label",
        "predicted_label",
        "label_issue_score",
        "p_given",
        "predicted_prob",
    ]
    return view[columns]


@dg.asset(group_name=GROUP)
def corrected_labels(
    context: dg.AssetExecutionContext,
    config: ReviewsConfig,
    dataset: AuditDataset,
    example_scores: audit.ExampleScores,
    flags: audit.Flags,
    audit_settings: AuditSettings,
    runtime: AuditRuntime,
) -> dg.Output[audit.Corrections]:
    """Suggested labels, the label each example keeps, and why (provenance).

    Reviews override automatic corrections. Review rows that cannot be applied (unknown id or
    label) do not stop the run: they are logged, listed in the metadata and fail the
    reviews_applied check, so they are visible without discarding the valid reviews.
    """
    result = audit.correct_labels(
        dataset,
        example_scores,
        flags,
        audit_settings.audit_config(runtime.device),
        reviews_path=config.reviews_path,
        strict_reviews=False,
    )
    provenance = result.table["correction_source"].value_counts().to_dict()
    meta: dict[str, Any] = {
        "provenance": provenance,
        "reviews_path": config.reviews_path,
        "automatic_corrections_allowed": result.gate.get("model_better_than_chance", True),
    }
    changed = result.table[result.table["correction_source"] != "kept"].copy()
    changed["given_label"] = np.asarray(dataset.classes, dtype=object)[
        example_scores.table["given"].to_numpy()
    ][changed.index]
    changed = changed.sort_values("suggestion_confidence", ascending=False)
    extra: dict[str, dg.MetadataValue] = {
        "decisions": dg.MetadataValue.md(
            markdown_table(
                changed.round(3),
                columns=[
                    "example_id",
                    "given_label",
                    "suggested_label",
                    "suggestion_confidence",
                    "correction_source",
                ],
                max_rows=TOP_SUSPECTS,
            )
        )
    }
    report = result.review_report
    if report is not None:
        meta |= {
            "reviews_accepted": report.n_accepted,
            "review_rows_not_used": len(report.problems),
        }
        if report.problems:
            context.log.warning(report.summary(limit=50))
            rows = [vars(p) for p in report.problems]
            extra["review_problems"] = dg.MetadataValue.json(rows[:200])
        else:
            context.log.info(report.summary())
    return dg.Output(result, metadata={**scalar_metadata(meta), **extra})


@dg.asset(group_name=GROUP, kinds={"pytorch"}, op_tags=MODEL_OP_TAGS, pool=MODEL_POOL)
def retrained_model(
    dataset: AuditDataset,
    example_scores: audit.ExampleScores,
    corrected_labels: audit.Corrections,
    audit_settings: AuditSettings,
    runtime: AuditRuntime,
) -> dg.Output[audit.Retrained]:
    """The final models, cross-fitted on the corrected labels with the emphasis chosen again."""
    result = audit.retrain(
        dataset, example_scores, corrected_labels, audit_settings.audit_config(runtime.device)
    )
    residual, choice = result.residual_estimate, result.effective_choice
    meta: dict[str, Any] = {
        "n_retrain_examples": int(corrected_labels.table["include_in_retrain"].sum()),
        "residual_noise_rate": residual.rate if residual is not None else None,
        "lambda": choice.lam if choice is not None else None,
        "beta": choice.beta if choice is not None else None,
        "retrain_skipped": result.skipped,
    }
    if result.models is not None:
        meta |= _fit_metadata(result.models, result.seconds)
    return dg.Output(result, metadata=scalar_metadata(meta))


@dg.asset(group_name=GROUP, kinds={"parquet"}, op_tags=MODEL_OP_TAGS, pool=MODEL_POOL)
def audit_reports(
    context: dg.AssetExecutionContext,
    dataset: AuditDataset,
    noise_probe: audit.ProbeResult,
    audit_model: audit.AuditFit,
    example_scores: audit.ExampleScores,
    flags: audit.Flags,
    corrected_labels: audit.Corrections,
    retrained_model: audit.Retrained,
    audit_settings: AuditSettings,
    runtime: AuditRuntime,
) -> dg.Output[ReportPaths]:
    """The report folder: examples, label_issues, corrected_labels, metrics and classes as
    Parquet, report.html (open it in a browser), summary.json and the plots."""
    config = audit_settings.audit_config(runtime.device)
    report = audit.build_report(
        dataset, noise_probe, audit_model, example_scores, flags, corrected_labels,
        retrained_model, config,
    )  # fmt: skip
    try:
        # "overwrite": a retried step replaces its own run's half-finished attempt.
        paths = audit.write_report(
            report, runtime.report_dir(context.run.run_id), if_exists="overwrite"
        )
    finally:
        for figure in report.figures.values():
            if isinstance(figure, Figure):  # plots may also be given as PNG paths
                plt.close(figure)  # pyplot keeps every figure alive until closed
    return dg.Output(paths, metadata=_report_metadata(report, paths))


def _report_metadata(report: audit.AuditReport, paths: ReportPaths) -> dict[str, Any]:
    summary = report.summary
    quality = summary.get("quality", {})
    meta: dict[str, Any] = {
        "report_dir": dg.MetadataValue.path(str(paths.out_dir)),
        "summary_json": dg.MetadataValue.path(str(paths.summary)),
        "report_html": dg.MetadataValue.path(str(paths.html)),
        **scalar_metadata(
            {
                "dagster/row_count": len(report.examples),
                "label_health_score": summary["class_health"]["label_health_score"],
                "probe_noise_rate": summary["noise_estimate"]["probe_rate"],
                "estimated_noise_rate": summary["noise_estimate"]["confident_joint_rate"],
                "residual_noise_rate": summary["noise_estimate"]["residual_rate"],
                "lambda": summary["emphasis"]["audit"]["lam"],
                "beta": summary["emphasis"]["audit"]["beta"],
                "counts": summary["counts"],
                "accuracy_before": quality.get("accuracy_before"),
                "accuracy_after": quality.get("accuracy_after"),
            }
        ),
        "top_suspects": dg.MetadataValue.md(
            markdown_table(report.label_issues, SUSPECT_COLUMNS, max_rows=TOP_SUSPECTS)
        ),
    }
    if report.classes is not None:
        classes = report.classes[["class", "rows", "label_quality", "label_issues", "ood"]]
        meta["class_health"] = dg.MetadataValue.md(markdown_table(classes.round(3)))
    truth = summary.get("against_truth")
    if truth is not None:
        detection = truth["label_issues"]
        meta |= scalar_metadata(
            {
                "true_noise_rate": truth["true_noise_rate"],
                "detection_precision": detection["precision"],
                "detection_recall": detection["recall"],
                "detection_f1": detection["f1"],
                "detection_auroc": detection["auroc"],
                "label_accuracy_before": truth["label_accuracy_before"],
                "label_accuracy_after": truth["label_accuracy_after"],
            }
        )
    for name, path in sorted(paths.plots.items()):
        meta[f"plot_{name}"] = image_markdown(path, name)
    return meta


@dg.asset(group_name=GROUP, kinds={"parquet"})
def mislabel_export(audit_reports: ReportPaths, runtime: AuditRuntime) -> dg.MaterializeResult:
    """The suspected mislabels, most suspicious first, published for human review.

    Published at the stable path <output_root>/exports/label_issues.parquet (replaced
    atomically), only after the retrain_not_worse check passed on the reports.
    """
    target = runtime.export_dir() / "label_issues.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, Path(audit_reports.label_issues).read_bytes())
    issues = read_report(target)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(target)),
            "source_report": dg.MetadataValue.path(str(audit_reports.out_dir)),
            "dagster/row_count": len(issues),
            "top_suspects": dg.MetadataValue.md(
                markdown_table(issues, SUSPECT_COLUMNS, max_rows=TOP_SUSPECTS)
            ),
        }
    )


AUDIT_ASSETS = [
    dataset,
    noise_probe,
    audit_model,
    example_scores,
    flags,
    corrected_labels,
    retrained_model,
    audit_reports,
    mislabel_export,
]
