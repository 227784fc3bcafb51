"""The ``dm-audit`` command line: audit, demo, train and score.

Every subcommand calls the same library functions as the Dagster assets. Input problems and bad
options end with exit status 2 and one line naming the problem; nothing is written then. The
options and exit statuses are defined in `dm_audit.cli_parser`; this module runs the commands.
Heavy modules (torch, pandas) are imported inside the commands, after the options, the output
folder and the data were checked.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dm_audit.cli_parser import (
    EXIT_BAD_INPUT,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_RETRAIN_WORSE,
    build_parser,
)
from dm_audit.errors import ConfigError, DataError, DMAuditError

TRAIN_FILES = ("model.pt", "history.parquet", "train_summary.json")
DEMO_NOISE_RATE = 0.4
DEMO_OPEN_SET_CLASS = "9"
DEMO_OPEN_SET_FRACTION = 0.03
# AuditConfig overrides of the demo (none: the demo shows the defaults a user gets).
DEMO_CONFIG: dict[str, Any] = {}


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
        linear_reference=not args.no_linear_reference,
        progress=not args.quiet,
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
    stages = summary.get("seconds", {}).get("stages")
    if stages:
        rows.append(
            (
                "time",
                " · ".join(f"{name} {seconds:.1f} s" for name, seconds in stages.items())
                + f" (flags after {summary['seconds']['to_flags']:.1f} s)",
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
    from dm_audit.progress import announce

    announce(text)


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
    from dm_audit import distributed
    from dm_audit.atomic import prepare_output_dir
    from dm_audit.training import fit

    config = _train_config(args)
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
    _write_train_outputs(out, result, config, dataset)
    last = result.history[-1]
    shown = {k: last[k] for k in ("epoch", "train_acc", "eval_acc") if last.get(k) is not None}
    print(
        "trained:",
        ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()),
    )
    print(f"model: {out / 'model.pt'}")
    return EXIT_OK


def _train_config(args: argparse.Namespace):
    """The `TrainConfig` of ``dm-audit train``: --lam/--beta apply to the DM emphasis only."""
    from dm_audit.training import TrainConfig

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
        "device": args.device,
        "seed": args.seed,
        "progress": not args.quiet,
    }
    if args.epochs is not None:
        options["epochs"] = args.epochs
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    if args.lr is not None:
        options["lr"] = args.lr
    return TrainConfig(**options)


def _write_train_outputs(out: Path, result, config, dataset) -> None:
    """model.pt, history.parquet and train_summary.json, moved into `out` together."""
    import pandas as pd

    from dm_audit.atomic import atomic_write_json, atomic_write_parquet, staged_output_dir
    from dm_audit.models import save_model

    history = pd.DataFrame(result.history)
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
                "final_epoch": result.history[-1],
                "classes": dataset.classes,
            },
        )


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

#: The function that runs each subcommand (``args.command``).
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "audit": cmd_audit,
    "demo": cmd_demo,
    "train": cmd_train,
    "score": cmd_score,
}


def _check_launcher(args: argparse.Namespace) -> None:
    """Refuse every command but ``train`` under torchrun.

    The other commands would run once per process, each writing the same output folder.
    """
    if "WORLD_SIZE" not in os.environ:
        return  # not under torchrun (and no torch import for the check)
    from dm_audit.distributed import env_world_size

    if env_world_size() > 1 and args.command != "train":
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
        return COMMANDS[args.command](args)
    except DMAuditError as error:
        print(f"dm-audit: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("dm-audit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_RETRAIN_WORSE",
    "build_parser",
    "main",
]
