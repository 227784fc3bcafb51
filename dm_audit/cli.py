"""The ``dm-audit`` command line: audit, demo, train and score.

Every subcommand calls the same library functions as the Dagster assets. Input problems and bad
options end with exit status 2 and one line naming the problem; nothing is written then.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dm_audit.errors import ConfigError, DataError, DMAuditError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
# The audit finished and wrote its reports, but its retrained model is worse than the audit
# model (summary.json ``quality.retrain_worse``): the corrections need a person's look.
EXIT_RETRAIN_WORSE = 3

TRAIN_FILES = ("model.pt", "history.parquet", "train_summary.json")
DEMO_NOISE_RATE = 0.4
DEMO_OPEN_SET_CLASS = "9"
DEMO_OPEN_SET_FRACTION = 0.03
# AuditConfig overrides of the demo (none: the demo shows the defaults a user gets).
DEMO_CONFIG: dict[str, Any] = {}


# ============================================================================================
# argument groups shared by several subcommands


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data source")
    group.add_argument(
        "--input",
        required=True,
        metavar="SOURCE",
        help="a .parquet/.csv table, an image folder (one sub-folder per class), 'digits' (built "
        "in), or cifar10:ROOT, cifar100:ROOT, mnist:ROOT, fashionmnist:ROOT",
    )
    group.add_argument(
        "--label-column", default="label", help="column of the given labels (default: label)"
    )
    group.add_argument(
        "--id-column",
        default=None,
        help="column of example ids (default: example_id when present, else the row number)",
    )
    group.add_argument(
        "--features",
        nargs="+",
        default=None,
        metavar="COLUMN",
        help="feature columns, or one list/embedding column (default: every numeric column "
        "that is not the label or id)",
    )
    group.add_argument("--image-column", default=None, help="column of image bytes or image paths")
    group.add_argument("--image-root", default=None, help="folder that image paths are relative to")
    group.add_argument(
        "--split-column",
        default=None,
        help="column of train/test values for your own split (default: 'split' when present); "
        "its test rows are audited too and the split is kept in the report",
    )
    group.add_argument(
        "--test-size",
        type=float,
        default=0.0,
        help="share of each class marked 'test' in the report's split column (default: 0; "
        "every row is audited either way, out of sample; a 'split' column in the table is "
        "honoured)",
    )
    group.add_argument(
        "--download",
        action="store_true",
        help="let torchvision datasets download into their ROOT when missing",
    )
    noise = parser.add_argument_group(
        "synthetic noise (to try dm-audit on data whose truth you know)"
    )
    noise.add_argument(
        "--inject-noise",
        choices=("none", "symmetric", "pair", "open_set"),
        default="none",
        help="corrupt the training labels before the audit, keeping the truth (default: none)",
    )
    noise.add_argument("--noise-rate", type=float, default=0.0, help="share of labels to flip")
    noise.add_argument(
        "--open-set-classes",
        nargs="+",
        default=None,
        metavar="CLASS",
        help="with --inject-noise open_set: classes to hold out as out-of-distribution",
    )
    noise.add_argument(
        "--open-set-fraction",
        type=float,
        default=None,
        help="with --inject-noise open_set: share of the training set made of held-out inputs",
    )


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--model",
        default="auto",
        help="mlp, resnet20/32/44/56, resnet18/50, or auto (mlp for features, a ResNet for "
        "images; default)",
    )
    group.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default: from the data size)"
    )
    group.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="examples per training step (default 128); larger is faster on a GPU",
    )
    group.add_argument("--lr", type=float, default=None, help="learning rate")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    group.add_argument("--seed", type=int, default=0, help="the same seed gives the same report")
    group.add_argument(
        "--quiet",
        action="store_true",
        help="no progress output (a bar on a terminal, else a line every 30 s)",
    )


def _folder_path(text: str) -> Path:
    """An --out value: a non-empty path (an empty one, e.g. an unset variable, would be ".")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the output folder is an empty path; name a folder")
    return Path(text)


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, type=_folder_path, help="output folder")
    exists = group.add_mutually_exclusive_group()
    exists.add_argument(
        "--overwrite", action="store_true", help="replace a previous run in the output folder"
    )
    exists.add_argument(
        "--new-version",
        action="store_true",
        help="when the output folder holds a previous run, write to OUT-2, OUT-3, ...",
    )


def _add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard the unfinished run in --out instead of resuming it. An interrupted audit "
        "keeps its checkpoints and finished stages in OUT/.dm-audit-work; running the same "
        "command again resumes from there (same data, options and reviews required)",
    )


def _if_exists(args: argparse.Namespace) -> str:
    if args.overwrite:
        return "overwrite"
    if args.new_version:
        return "version"
    return "error"


# ============================================================================================
# subcommands


def _load(args: argparse.Namespace):
    from dm_audit.noise import add_noise
    from dm_audit.sources import load_source

    dataset = load_source(
        args.input,
        label_column=args.label_column,
        id_column=args.id_column,
        feature_columns=args.features,
        image_column=args.image_column,
        image_root=args.image_root,
        split_column=args.split_column,
        test_size=args.test_size,
        seed=args.seed,
        download=args.download,
    )
    if args.inject_noise != "none":
        dataset = add_noise(
            dataset,
            kind=args.inject_noise,
            rate=args.noise_rate,
            seed=args.seed,
            open_set_classes=args.open_set_classes,
            open_set_fraction=args.open_set_fraction,
        )
    return dataset


def _audit_config(args: argparse.Namespace):
    from dm_audit.config import AuditConfig

    return AuditConfig(
        model=args.model,
        epochs=args.epochs,
        probe_epochs=args.probe_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        lam=args.lam,
        beta=args.beta,
        label_issue_threshold=args.threshold,
        top_k=args.top_k,
        ood_threshold=args.ood_threshold,
        min_correction_confidence=args.min_confidence,
        correction_source=args.correction_source,
        knn_k=args.knn_k,
        retrain=not args.no_retrain,
        progress=not args.quiet,
    )


def _add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("emphasis, flags and corrections")
    group.add_argument(
        "--lam",
        type=float,
        default=None,
        help="DM emphasis mode λ (with --beta); default: chosen from the estimated noise rate",
    )
    group.add_argument("--beta", type=float, default=None, help="DM emphasis spread β (with --lam)")
    group.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="flag label issues at or above this score in [0, 1] (default: automatic, tied to "
        "the estimated noise rate)",
    )
    group.add_argument(
        "--top-k", type=int, default=None, help="flag exactly the K most suspicious examples"
    )
    group.add_argument(
        "--ood-threshold",
        type=float,
        default=None,
        help="flag out-of-distribution examples at or above this score (default: automatic)",
    )
    group.add_argument(
        "--min-confidence",
        type=float,
        default=0.8,
        help="apply a suggested label automatically only at this confidence or above; the "
        "rest go to review (default: 0.8)",
    )
    group.add_argument(
        "--correction-source",
        choices=("model", "proselflc"),
        default="model",
        help="suggest labels from the audit model's tempered prediction (default) or from "
        "ProSelfLC's corrected targets",
    )
    group.add_argument(
        "--reviews",
        type=Path,
        default=None,
        help="CSV or Parquet file of human reviews (example_id,label) overriding suggestions",
    )
    group.add_argument(
        "--no-retrain", action="store_true", help="stop after the corrections (no final model)"
    )
    group.add_argument(
        "--probe-epochs",
        type=int,
        default=None,
        help="epochs of the short probe training that estimates the noise (default: a quarter "
        "of the audit's epochs)",
    )
    group.add_argument(
        "--knn-k",
        type=int,
        default=10,
        help="neighbours per example for the embedding-space label agreement (default 10)",
    )


def _print_audit(report, out_dir: Path | None) -> None:
    summary = report.summary
    noise = summary["noise_estimate"]
    emphasis = summary["emphasis"]["audit"]
    counts = summary["counts"]
    quality = summary["quality"]
    rows: list[tuple[str, str]] = [
        ("examples audited", f"{summary['n_examples']}"),
        ("estimated noise rate", f"{noise['audit_rate']:.1%} (probe {noise['probe_rate']:.1%})"),
        ("emphasis λ, β", f"{emphasis['lam']:g}, {emphasis['beta']:g}"),
        ("label issues flagged", f"{counts['label_issues']}"),
        ("auto-corrected", f"{counts['auto_corrected']}"),
        ("sent to review", f"{counts['needs_review']}"),
        ("out-of-distribution", f"{counts['ood']}"),
    ]
    truth = summary.get("against_truth")
    if truth:
        issues = truth["label_issues"]
        rows += [
            ("detection precision", _fmt(issues["precision"])),
            ("detection recall", _fmt(issues["recall"])),
            ("detection F1", _fmt(issues["f1"])),
            ("detection AUROC", _fmt(issues["auroc"])),
        ]
        if "ood" in truth:
            rows.append(("OOD AUROC", _fmt(truth["ood"]["auroc"])))
        rows.append(
            (
                "label accuracy before/after",
                f"{_fmt(truth['label_accuracy_before'])} -> {_fmt(truth['label_accuracy_after'])}",
            )
        )
    rows.append(
        (
            "accuracy before/after",
            f"{_fmt(quality['accuracy_before'])} -> {_fmt(quality['accuracy_after'])} "
            f"(out of sample, {quality['n_compared']} rows whose label was kept)",
        )
    )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if out_dir is not None:
        folder = summary.get("out_dir", out_dir)
        print(f"\nreports: {folder}")
        waiting = counts["needs_review"]
        if waiting:
            print(
                f"next: {waiting} rows need a person's look: label_issues.parquet, rows whose "
                "correction_source is needs_review; write decisions as example_id,label to a "
                "CSV and re-run with --reviews FILE --overwrite"
            )


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def cmd_audit(args: argparse.Namespace) -> int:
    from dm_audit.atomic import check_output_location

    # Options, then the output folder, then the data: each refused before the next is touched,
    # and all of it before torch is imported (a second or more on a small machine).
    config = _audit_config(args)
    if args.out is not None:
        check_output_location(args.out, inputs=[args.input])
    dataset = _load(args)
    if args.out is not None:
        _refuse_previous_run(args)
    if not args.quiet:
        # The first line of a log, written before torch is imported (seconds on a small machine).
        _announce(f"auditing {len(dataset)} rows of {dataset.source} ({dataset.n_classes} classes)")
    from dm_audit.audit import run_audit

    report = run_audit(
        dataset,
        config,
        args.out,
        reviews_path=args.reviews,
        if_exists=_if_exists(args),
        restart=args.restart,
    )
    _print_audit(report, args.out)
    return _audit_status(report.summary)


def _audit_status(summary: dict[str, Any]) -> int:
    """EXIT_OK, or EXIT_RETRAIN_WORSE with a one-line warning when the retrain lost."""
    quality = summary.get("quality", {})
    if not quality.get("retrain_worse"):
        return EXIT_OK
    paired = quality["paired"]
    print(
        f"dm-audit: warning: the retrained model is worse than the audit model "
        f"({quality['accuracy_before']:.3f} -> {quality['accuracy_after']:.3f} on "
        f"{quality['n_compared']} kept rows, McNemar p = {paired['p_worse']:.3g}); review the "
        "corrections before using them",
        file=sys.stderr,
    )
    return EXIT_RETRAIN_WORSE


def _refuse_previous_run(args: argparse.Namespace) -> None:
    """Refuse an output folder holding a previous run now, before torch is imported."""
    from dm_audit.atomic import resolve_output_dir
    from dm_audit.reports import REPORT_FILES, REPORT_OWNED_FILES

    resolve_output_dir(
        args.out, if_exists=_if_exists(args), names=REPORT_FILES, owned=REPORT_OWNED_FILES
    )


def _announce(text: str) -> None:
    """One timestamped line on stderr, like the progress lines that follow it."""
    from datetime import datetime

    print(f"{datetime.now():%Y-%m-%d %H:%M:%S} dm-audit: {text}", file=sys.stderr, flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from dm_audit.audit import AuditConfig, run_audit
    from dm_audit.noise import add_noise
    from dm_audit.sources import load_source

    dataset = load_source("digits", test_size=0.0, seed=args.seed)
    dataset = add_noise(
        dataset,
        kind="symmetric",
        rate=DEMO_NOISE_RATE,
        seed=args.seed,
        open_set_classes=[DEMO_OPEN_SET_CLASS],
        open_set_fraction=DEMO_OPEN_SET_FRACTION,
    )
    print(
        f"demo: scikit-learn digits, {DEMO_NOISE_RATE:.0%} of the labels flipped at "
        f"random, plus {DEMO_OPEN_SET_FRACTION:.0%} images of a held-out digit "
        f"({DEMO_OPEN_SET_CLASS}) labelled as other digits\n"
    )
    config = AuditConfig(seed=args.seed, device=args.device, progress=not args.quiet, **DEMO_CONFIG)
    report = run_audit(dataset, config, args.out, if_exists=_if_exists(args), restart=args.restart)
    _print_audit(report, args.out)
    return _audit_status(report.summary)


def cmd_train(args: argparse.Namespace) -> int:
    from dm_audit import distributed

    # Under torchrun (WORLD_SIZE > 1) this starts the process group: data-parallel training,
    # rank 0 writes the outputs.
    with distributed.process_group(args.device):
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    import pandas as pd

    from dm_audit import distributed
    from dm_audit.atomic import (
        atomic_write_json,
        atomic_write_parquet,
        prepare_output_dir,
        staged_output_dir,
    )
    from dm_audit.models import save_model
    from dm_audit.training import TrainConfig, fit

    params: dict[str, Any] = {}
    if args.lam is not None or args.beta is not None:
        if args.loss not in ("dm", "proselflc"):
            raise ConfigError(
                "--lam/--beta set the DM emphasis: use them with --loss dm or proselflc"
            )
        key = "" if args.loss == "dm" else "dm_"
        params = {
            f"{key}lam": args.lam if args.lam is not None else 0.5,
            f"{key}beta": args.beta if args.beta is not None else 8.0,
        }
    options: dict[str, Any] = {
        "model": args.model,
        "loss": args.loss,
        "loss_params": params,
        "batch_size": args.batch_size,
        "device": args.device,
        "seed": args.seed,
        "progress": not args.quiet,
    }
    if args.epochs is not None:
        options["epochs"] = args.epochs
    if args.lr is not None:
        options["lr"] = args.lr
    config = TrainConfig(**options)
    dataset = _load(args)
    train, test = dataset.train(), dataset.test()
    out = distributed.on_main(
        lambda: prepare_output_dir(
            args.out, if_exists="overwrite" if args.resume else _if_exists(args), names=TRAIN_FILES
        )
    )
    try:
        result = fit(
            train.inputs(),
            train.label_codes(),
            config,
            num_classes=dataset.n_classes,
            eval_inputs=test.inputs() if len(test) else None,
            eval_labels=test.label_codes() if len(test) else None,
            true_labels=train.true_label_codes() if train.has_truth else None,
            checkpoint_dir=out / "checkpoints",
            resume=args.resume,
        )
    except DMAuditError:
        # Refused before the first checkpoint: leave no empty folder behind.
        if distributed.is_main() and not any(out.iterdir()):
            out.rmdir()
        raise
    if not distributed.is_main():
        return EXIT_OK
    history = pd.DataFrame(result.history)
    last = result.history[-1]
    # The three files appear together: a kill while writing them leaves the previous ones.
    with staged_output_dir(out, if_exists="overwrite", names=TRAIN_FILES) as stage:
        save_model(
            result.model,
            stage.path / "model.pt",
            num_classes=dataset.n_classes,
            classes=dataset.classes,
            model_params=config.model_params,
        )
        atomic_write_parquet(stage.path / "history.parquet", _arrow_table(history))
        atomic_write_json(
            stage.path / "train_summary.json",
            {
                "source": dataset.source,
                "config": config.to_dict(),
                "events": result.events,
                "final_epoch": last,
                "classes": dataset.classes,
            },
        )
    shown = {k: last[k] for k in ("epoch", "train_acc", "eval_acc") if last.get(k) is not None}
    print(
        "trained:",
        ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()),
    )
    print(f"model: {out / 'model.pt'}")
    return EXIT_OK


def _arrow_table(frame):
    import pyarrow as pa

    return pa.Table.from_pandas(frame, preserve_index=False)


def cmd_score(args: argparse.Namespace) -> int:
    import numpy as np

    from dm_audit.emphasis import create_weighting
    from dm_audit.models import load_model
    from dm_audit.scoring import score, write_scores

    model, classes = load_model(args.model_file)
    dataset = _load(args)
    if list(dataset.classes) != classes:
        raise DataError(
            f"the model was trained on the classes {classes}, but {args.input} has "
            f"{list(dataset.classes)}"
        )
    if args.out.exists() and not args.overwrite:
        raise ConfigError(f"{args.out} exists; pass --overwrite to replace it")
    part = (
        dataset
        if args.split == "all"
        else dataset.subset(dataset.table["split"].to_numpy() == args.split)
    )
    table = score(
        model,
        part.inputs(),
        part.label_codes(),
        weighting=create_weighting("dm", lam=args.lam, beta=args.beta),
        device=args.device,
        example_ids=list(part.example_ids),
    )
    write_scores(table, args.out)
    accuracy = float(np.mean(table["predicted_label"].to_numpy() == part.label_codes()))
    print(f"scored {len(table)} examples (agreement with the given labels {accuracy:.3f})")
    print(f"scores: {args.out}")
    return EXIT_OK


# ============================================================================================
# entry point


_EXIT_CODES = f"""exit status:
  {EXIT_OK}  the reports are written
  {EXIT_ERROR}  an unexpected failure (a bug, or out of memory); the message says where
  {EXIT_BAD_INPUT}  bad input or options: one line names the file, column, row or label;
     nothing is written
  {EXIT_RETRAIN_WORSE}  the reports are written, but the retrained model is worse than the
     audit model: review the corrections before using them"""


def build_parser() -> argparse.ArgumentParser:
    """The ``dm-audit`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="dm-audit",
        description=textwrap.fill(
            "Find and fix bad labels: a derivative-manipulation (DM) training scores every "
            "example, flags mislabelled and out-of-distribution ones, corrects labels, "
            "retrains and writes Parquet reports."
        ),
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each stage")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    audit = sub.add_parser(
        "audit",
        help="audit a dataset: flags, corrections, retrain, reports",
        description=textwrap.fill(
            "Audit every row of a dataset (a split column only annotates the report) and "
            "write examples.parquet (one row per input row), label_issues.parquet, "
            "corrected_labels.parquet, metrics.parquet, classes.parquet (class health), "
            "report.html (open it in a browser), summary.json and plots into --out. "
            "Each row is scored by a model that never trained on it (2-fold cross-fitting). "
            "The input files are only read. An interrupted run (crash, kill) resumes when the "
            "same command is run again."
        )
        + "\n\nexample:\n  dm-audit audit --input data.csv --label-column label --out runs/first",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_source_arguments(audit)
    _add_training_arguments(audit)
    _add_audit_arguments(audit)
    _add_output_arguments(audit)
    _add_resume_arguments(audit)
    audit.set_defaults(handler=cmd_audit)

    demo = sub.add_parser(
        "demo",
        help="run the whole audit on digits with synthetic noise and print how well it did",
        description="Audit scikit-learn's digits with 40%% of the training labels flipped and a "
        "few images of a held-out digit, then print detection and correction quality.",
    )
    demo.add_argument("--device", default="auto")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_output_arguments(demo)
    _add_resume_arguments(demo)
    demo.set_defaults(handler=cmd_demo)

    train = sub.add_parser(
        "train",
        help="train one model with any loss (DM by default) and save it",
        description="Train a model on the training split and write model.pt (a state dict), "
        "history.parquet (per-epoch metrics) and train_summary.json into --out, with a "
        "checkpoint every epoch. Example: dm-audit train --input digits --loss dm --lam 1 "
        "--beta 16 --out runs/model",
    )
    _add_source_arguments(train)
    _add_training_arguments(train)
    loss = train.add_argument_group("loss")
    loss.add_argument(
        "--loss",
        default="dm",
        help="dm (default), cce, mae, mse, gce, imae, proselflc, ls, cp, boot-soft, boot-hard",
    )
    loss.add_argument("--lam", type=float, default=None, help="DM emphasis mode λ (default 0.5)")
    loss.add_argument("--beta", type=float, default=None, help="DM emphasis spread β (default 8)")
    train.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in --out"
    )
    _add_output_arguments(train)
    train.set_defaults(handler=cmd_train)

    score_parser = sub.add_parser(
        "score",
        help="score every example with a trained model (p_i, weight, prediction, embedding)",
        description="Write one Parquet row per example: p_given, emphasis_weight, "
        "predicted_label, predicted_prob, entropy, margin and the embedding. Example: "
        "dm-audit score --input digits --model-file runs/model/model.pt --out scores.parquet",
    )
    _add_source_arguments(score_parser)
    score_parser.add_argument(
        "--model-file", required=True, type=Path, help="model.pt written by dm-audit train"
    )
    score_parser.add_argument(
        "--split", choices=("train", "test", "all"), default="all", help="which examples"
    )
    score_parser.add_argument("--lam", type=float, default=0.5, help="λ of the emphasis weight")
    score_parser.add_argument("--beta", type=float, default=8.0, help="β of the emphasis weight")
    score_parser.add_argument("--device", default="auto")
    score_parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    score_parser.add_argument("--out", required=True, type=Path, help="output .parquet file")
    score_parser.add_argument("--overwrite", action="store_true")
    score_parser.set_defaults(handler=cmd_score)

    return parser


def _check_launcher(args: argparse.Namespace) -> None:
    """Refuse every command but ``train`` under torchrun.

    The other commands would run once per process, each writing the same output folder.
    """
    if "WORLD_SIZE" not in os.environ:
        return  # not under torchrun (and no torch import for the check)
    from dm_audit.distributed import env_world_size

    if env_world_size() > 1 and args.handler is not cmd_train:
        raise ConfigError(
            f"WORLD_SIZE={env_world_size()}: only `dm-audit train` runs under torchrun; "
            "start other commands as one process"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input or options, 1 other failure)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        # The same shape as the progress lines: time, "dm-audit:", the message.
        format="%(asctime)s dm-audit: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    try:
        _check_launcher(args)
        return args.handler(args)
    except DMAuditError as error:
        print(f"dm-audit: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("dm-audit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
