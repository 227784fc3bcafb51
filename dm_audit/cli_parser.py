"""The ``dm-audit`` argument parser: every option of every subcommand, and the exit statuses.

Only the standard library is imported here: ``dm-audit --help`` and the check of the options
run before any heavy module (torch, pandas) is loaded. The commands themselves are in
`dm_audit.cli`, which runs the one named by ``args.command``.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
# The audit finished and wrote its reports, but its retrained model is worse than the audit
# model (summary.json ``quality.retrain_worse``): the corrections need a person's look.
EXIT_RETRAIN_WORSE = 3


_EXIT_CODES = f"""exit status:
  {EXIT_OK}  the reports are written
  {EXIT_ERROR}  an unexpected failure (a bug, or out of memory); the message says where
  {EXIT_BAD_INPUT}  bad input or options: one line names the file, column, row or label;
     nothing is written
  {EXIT_RETRAIN_WORSE}  the reports are written, but the retrained model is worse than the
     audit model: review the corrections before using them"""


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
        help="column of example ids (default: example_id when present, else a column named id "
        "whose values are distinct, else the row number)",
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
        default=None,
        help="examples per training step (default 128; an audit gives a conv net on a small "
        "training set fewer: 8 steps per epoch where batches of at least 16 allow, the default "
        "learning rate scaled alike); larger is faster on a GPU",
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
        help="flag out-of-distribution examples scoring above this (ood_score is the share of "
        "unflagged rows scoring lower; default: a conformal test)",
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
    group.add_argument(
        "--no-linear-reference",
        action="store_true",
        help="score with the DM networks alone: no cross-fitted logistic regression mixed "
        "into the flags and suggestions of a feature table",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``dm-audit`` argument parser with its subcommands (``args.command`` names the one)."""
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
    _add_audit_command(sub)
    _add_demo_command(sub)
    _add_train_command(sub)
    _add_score_command(sub)
    return parser


def _add_audit_command(sub: argparse._SubParsersAction) -> None:
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


def _add_demo_command(sub: argparse._SubParsersAction) -> None:
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


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="train one model with any loss (DM by default) and save it",
        description="Train a model on the training split and write model.pt (a state dict), "
        "history.parquet (per-epoch metrics) and train_summary.json into --out, with a "
        "checkpoint after an epoch at most every 30 s (DM_AUDIT_CHECKPOINT_SECONDS; 0: every "
        "epoch) and after the last. Example: dm-audit train --input digits --loss dm --lam 1 "
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


def _add_score_command(sub: argparse._SubParsersAction) -> None:
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
