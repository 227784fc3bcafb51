"""The audit end to end: probe, cross-fitted DM training, flags, corrections, retrain, reports.

Each stage is a function of the previous stages' results, so the CLI (`run_audit`) and the Dagster
assets (one asset per stage) run exactly the same code::

    probe -> train_audit_model -> score_examples -> flag_examples -> correct_labels -> retrain
          -> build_report -> write_report

Every row is audited. The trainings are cross-fitted: the rows are dealt into `CROSSFIT_FOLDS`
stratified folds and model k trains on every row outside fold k, so each row has an in-sample
trajectory (p_i at every epoch under the model that trains on it: DM's signal) and an
out-of-sample prediction (the signal confident learning needs), and two halves cost as much as
one training on all rows. The audit and the retrained models are compared out of sample on the
same rows; a ``split`` column of the input only annotates the report.

The stages live in their own modules: `dm_audit.stage_results` (what each stage hands to the
next), `dm_audit.crossfit` (folds and cross-fitted training), `dm_audit.stage_training` (probe,
audit training, retrain), `dm_audit.stage_scoring`, `dm_audit.stage_flags`,
`dm_audit.stage_correction` and `dm_audit.report_builder`. This module chains them into a
resumable run (`run_audit`) and re-exports their public names.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dm_audit import reports
from dm_audit.atomic import check_output_location, resolve_output_dir
from dm_audit.config import AuditConfig
from dm_audit.crossfit import (
    CROSSFIT_FOLDS,
    audited,
    auto_epochs,
    fold_assignment,
    probe_epochs,
    training_epochs,
)
from dm_audit.dataset import AuditDataset
from dm_audit.errors import ConfigError, DMAuditError
from dm_audit.faults import kill_point
from dm_audit.report_builder import (
    RETRAIN_WORSE_ALPHA,
    build_report,
    compare_before_after,
    evaluate_against_truth,
    write_report,
)
from dm_audit.reviews import read_reviews
from dm_audit.stage_correction import SUGGESTION_TEMPERATURE, correct_labels
from dm_audit.stage_flags import (
    DUPLICATE_COLUMNS,
    OOD_FDR,
    OOD_NEIGHBOUR,
    OOD_REVIEW_FPR,
    flag_examples,
)
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
from dm_audit.stage_scoring import proselflc_targets, score_examples, streamed_scores_path
from dm_audit.stage_training import (
    PROBE_EMPHASIS,
    SMALL_TRAINING_SET,
    probe,
    retrain,
    train_audit_model,
)
from dm_audit.training import checkpoint_interval
from dm_audit.workdir import WorkDir, discard_work, run_identity

__all__ = [
    "CROSSFIT_FOLDS",
    "DUPLICATE_COLUMNS",
    "OOD_FDR",
    "OOD_NEIGHBOUR",
    "OOD_REVIEW_FPR",
    "PROBE_EMPHASIS",
    "RETRAIN_WORSE_ALPHA",
    "SMALL_TRAINING_SET",
    "STAGES",
    "SUGGESTION_TEMPERATURE",
    "AuditConfig",
    "AuditDataset",
    "AuditFit",
    "AuditReport",
    "ConfigError",
    "Corrections",
    "CrossFit",
    "ExampleScores",
    "Flags",
    "ProbeResult",
    "Retrained",
    "StageHook",
    "build_report",
    "compare_before_after",
    "correct_labels",
    "evaluate_against_truth",
    "flag_examples",
    "fold_assignment",
    "probe",
    "proselflc_targets",
    "retrain",
    "run_audit",
    "score_examples",
    "streamed_scores_path",
    "train_audit_model",
    "write_report",
]

log = logging.getLogger(__name__)

#: The stages `run_audit` runs, in order, as its `on_stage` hook names them.
STAGES = ("probe", "audit", "scores", "flags", "corrections", "retrain", "report")
#: ``on_stage(name, result)``: told as each stage ends.
StageHook = Callable[[str, Any], None]

# Earlier names of the epoch rules (`dm_audit.crossfit`), kept for scripts that import them.
_auto_epochs = auto_epochs
_epochs = training_epochs
_probe_epochs = probe_epochs


def run_audit(
    dataset: AuditDataset,
    config: AuditConfig,
    out_dir: str | Path | None = None,
    *,
    reviews_path: str | Path | None = None,
    if_exists: str = "error",
    restart: bool = False,
    on_stage: StageHook | None = None,
) -> AuditReport:
    """Run every stage of the audit and write the reports to `out_dir` (when given).

    With an output folder the run is resumable: each training's checkpoint and each finished
    stage's result are kept in ``<out>/.dm-audit-work/`` (`dm_audit.workdir`) until the report is
    in place. Running again with the same dataset, options and reviews after a crash or a kill
    skips the finished stages and continues the interrupted training from its last epoch; the
    report equals that of an uninterrupted run in every table and summary field except timings
    (``seconds``, ``examples_per_s``), ``out_dir`` and ``resumed`` (the trainings that were
    continued, and from which epoch). Other inputs or options refuse, naming what differs.

    Parameters
    ----------
    dataset : AuditDataset
        The dataset; every row is audited (a ``split`` column only annotates the report).
    config : AuditConfig
    out_dir : path, optional
        Output folder; nothing is written when None.
    reviews_path : path, optional
        Human reviews (``example_id,label``) that override the automatic corrections.
    if_exists : {"error", "overwrite", "version"}
        What to do when `out_dir` already holds a previous run.
    restart : bool
        Discard the work of an unfinished run in `out_dir` instead of resuming it.
    on_stage : callable, optional
        Called as ``on_stage(name, result)`` as each stage ends (`STAGES` in order): what a
        benchmark times and reads, so it runs this very chain rather than a copy of it.

    Returns
    -------
    AuditReport

    Raises
    ------
    DataError, ConfigError
        Bad data, reviews or options; no report is written and the work folder is removed.
    """
    data = audited(dataset)
    config.check_against(len(data))
    if reviews_path is not None:
        # A bad reviews file fails now, not after hours of training.
        read_reviews(reviews_path, known_ids=data.example_ids, classes=dataset.classes, strict=True)
    # The stages read the audited dataset (`audited`: heavy-tailed columns already mapped), so
    # none of them maps them again; the output folder and the run's identity name the input.
    if out_dir is None:
        return _run_stages(data, config, None, reviews_path, on_stage)
    # A bad checkpoint interval fails before an unfinished run is opened: the error path below
    # removes the work folder.
    checkpoint_interval()
    target, created = _output_folder(out_dir, dataset, if_exists=if_exists, restart=restart)
    identity = run_identity(config.to_dict(), dataset, reviews_path)
    work = WorkDir.open(target, identity)
    if work.resumed:
        log.info("resuming the unfinished run in %s", target)
    try:
        report = _run_stages(data, config, work, reviews_path, on_stage)
        paths = write_report(
            report, target, if_exists="overwrite" if if_exists == "overwrite" else "error"
        )
    except DMAuditError:
        # Bad input or options: a resume would fail the same way, so leave nothing behind.
        work.remove()
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    except BaseException:
        work.release()  # e.g. Ctrl-C: the next run resumes it
        raise
    work.remove()
    report.summary["out_dir"] = str(paths.out_dir)
    return report


def _output_folder(
    out_dir: str | Path, dataset: AuditDataset, *, if_exists: str, restart: bool
) -> tuple[Path, list[Path]]:
    """The run's output folder, checked before any training, and the folders the run creates
    (the output folder and any missing parents, deepest first)."""
    # Fail before hours of training, not after, when the folder holds a previous run.
    check_output_location(out_dir, inputs=[dataset.source])
    target = resolve_output_dir(
        out_dir,
        if_exists=if_exists,
        names=reports.REPORT_FILES,
        owned=reports.REPORT_OWNED_FILES,
    )
    if restart:
        discard_work(target)
    # Removed again when the input turns out bad, so a refused run leaves nothing behind.
    created = [p for p in (target, *target.parents) if not p.exists()]
    return target, created


def _run_stages(
    dataset: AuditDataset,
    config: AuditConfig,
    work: WorkDir | None,
    reviews_path: str | Path | None,
    on_stage: StageHook | None = None,
) -> AuditReport:
    """The stages of `run_audit`, each kept in `work` (when given) once finished."""
    hook = on_stage or (lambda name, result: None)
    # Wall seconds of each stage, measured between the ends of consecutive stages (a stage
    # read back from the work folder of a resumed run takes almost none).
    stage_seconds: dict[str, float] = {}
    last_end = time.perf_counter()

    def told(name: str, result: Any) -> None:
        nonlocal last_end
        now = time.perf_counter()
        stage_seconds[name] = round(now - last_end, 3)
        last_end = now
        hook(name, result)

    def training(name: str) -> dict[str, Any]:
        if work is None:
            return {}
        return {
            "checkpoint_dir": work.checkpoint_dir(name),
            "resume": True,
            "on_epoch_end": lambda entry: kill_point(f"{name}:epoch:{entry['epoch']}"),
        }

    def stage(name: str, compute: Callable[[], Any]) -> Any:
        return compute() if work is None else work.stage(name, compute)

    def scored() -> ExampleScores:
        # A resumed run reads the streamed scores back: they must live in the work folder.
        path = None if work is None else streamed_scores_path(dataset, work.path)
        result = score_examples(dataset, audit_fit, config, scores_path=path)
        kill_point("scoring")
        return result

    probe_result = stage("probe", lambda: probe(dataset, config, **training("probe")))
    told("probe", probe_result)
    audit_fit = train_audit_model(dataset, probe_result, config, **training("audit"))
    told("audit", audit_fit)
    scores = stage("scores", scored)
    told("scores", scores)
    flag_result = stage("flags", lambda: flag_examples(dataset, scores, config))
    told("flags", flag_result)
    corrections = stage(
        "corrections",
        lambda: correct_labels(dataset, scores, flag_result, config, reviews_path=reviews_path),
    )
    told("corrections", corrections)
    retrained = retrain(dataset, scores, corrections, config, **training("retrain"))
    told("retrain", retrained)
    resumed = _take_resume_events("audit", audit_fit.models) + _take_resume_events(
        "retrain", retrained.models
    )
    report = build_report(
        dataset, probe_result, audit_fit, scores, flag_result, corrections, retrained, config
    )
    report.summary["resumed"] = resumed
    stage_seconds["report"] = round(time.perf_counter() - last_end, 3)
    report.summary["seconds"]["stages"] = dict(stage_seconds)
    report.summary["seconds"]["to_flags"] = round(
        sum(stage_seconds[name] for name in STAGES[: STAGES.index("flags") + 1]), 3
    )
    hook("report", report)
    return report


def _take_resume_events(training: str, models: CrossFit | None) -> list[dict[str, Any]]:
    """Move a training's resume events out of its event list into the run's resume record.

    A resumed training's other events and history are those of an uninterrupted one; keeping
    the resumes apart keeps the report comparable to that of an uninterrupted run.
    """
    if models is None:
        return []
    out = []
    for k, fit_result in enumerate(models.fits):
        taken = [e for e in fit_result.events if e.get("event") == "resume"]
        fit_result.events[:] = [e for e in fit_result.events if e.get("event") != "resume"]
        out += [{"training": training, "fold": k, "epoch": int(e["epoch"])} for e in taken]
    return out
