"""Long-tailed classes: a table whose smallest classes hold fewer than 10 rows.

Real label sets are often long-tailed: a few large classes and many small ones. None of
benchmarks/generality.py's datasets has a class of fewer than 10 rows, where the linear
reference leaves a class to the networks (`dm_audit.linear_reference.MIN_CLASS_ROWS`) and each
fold model of the audit learns from four or five rows of it. This benchmark is a development
table for that shape: 30 classes of `make_classification` whose shares fall as 1 / k^1.1
(about 300 rows down to 7; 1,030 rows, 20 features), clean and at 20 % symmetric, pair and
instance-dependent noise (benchmarks/generality.py's noise). dm-audit with its defaults, cleanlab
+ LR and cleanlab + HGB run on the same labels. Measured: detection F1 and AUROC, the share of
rows flagged, and the share of correct rows flagged among the rows given a class of fewer than
10 rows (`small-class false flags`): on the clean table every flag there is a false alarm.

    uv run --group bench python benchmarks/long_tail.py
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import results_file  # benchmarks/results_file.py: provenance and writing
import siblings  # benchmarks/siblings.py: the sibling scripts' loader

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "long_tail.md"
CLASSES = 30
ROWS = 1_030
FEATURES = 20
TAIL_EXPONENT = 1.1
SMALL_CLASS_ROWS = 10
SETTINGS = (("none", 0.0), ("symmetric", 0.2), ("pair", 0.2), ("instance", 0.2))


def class_shares() -> np.ndarray:
    """Each class's share of the rows, falling as 1 / k^`TAIL_EXPONENT`."""
    weights = 1.0 / np.arange(1, CLASSES + 1) ** TAIL_EXPONENT
    return weights / weights.sum()


def build(workdir: Path, seed: int) -> Any:
    """The long-tailed table as generality's BenchData."""
    g = siblings.load("generality")
    make = g._synthetic(
        ROWS, FEATURES, CLASSES, informative=12, clusters=1, separation=2.5, weights=class_shares()
    )
    return make(workdir, seed)


def small_class_false_flags(flags: np.ndarray, noisy: np.ndarray, truth: np.ndarray) -> float:
    """Share of the correct rows given a class of fewer than `SMALL_CLASS_ROWS` rows that are
    flagged (nan when there is none)."""
    counts = np.bincount(noisy, minlength=int(max(noisy.max(), truth.max())) + 1)
    rows = (counts[noisy] < SMALL_CLASS_ROWS) & (noisy == truth)
    return float(flags[rows].mean()) if rows.any() else float("nan")


def run(seed: int, workdir: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Every method's row per setting, and the clean table's class sizes."""
    g = siblings.load("generality")
    data = build(workdir, seed)
    confusion = g.confusion_probs(data, seed)
    methods = [g.DM_AUDIT, g.CL_LR, g.CL_HGB]
    rows: list[dict[str, Any]] = []
    for kind, rate in SETTINGS:
        setting = g.Setting(kind, rate)
        noisy = g.make_noisy(data, setting, seed, confusion)
        results: dict[str, tuple[Any, str | None]] = {}
        g.run_methods(
            data, noisy, seed, methods, lambda m, d, e, into=results: into.__setitem__(m, (d, e))
        )
        for method, (detection, error) in results.items():
            row: dict[str, Any] = {"setting": setting.name, "rate": rate, "method": method}
            if detection is None:
                row["error"] = error
            else:
                measured = g.measure(detection, noisy, data.labels)
                row |= {
                    "f1": measured["f1"],
                    "auroc": measured["auroc"],
                    "flagged_share": measured["flagged_share"],
                    "small_false_flags": small_class_false_flags(
                        detection.flags, noisy, data.labels
                    ),
                    "seconds": measured["seconds"],
                }
            rows.append(row)
            print(f"{setting.name:14s} {method:16s} {row}", flush=True)
    return rows, np.bincount(data.labels, minlength=CLASSES).tolist()


def write(
    rows: list[dict[str, Any]],
    sizes: Sequence[int],
    out: Path,
    command: str,
    seed: int,
    load: float,
    seconds: float,
) -> None:
    _fmt = siblings.load("generality")._fmt
    lines = [
        "# Long-tailed classes",
        "",
        results_file.provenance(command, "long_tail.py", seed, load, seconds),
        "",
        f"{sum(sizes):,} rows of {FEATURES} features in {len(sizes)} classes of "
        f"{', '.join(str(s) for s in sizes)} rows (clean labels). Small-class false flags: the "
        f"share of the correct rows given a class of fewer than {SMALL_CLASS_ROWS} rows that "
        "are flagged.",
        "",
        "| setting | method | F1 | AUROC | flagged | small-class false flags | seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['setting']} | {row['method']} | error: {row['error']} |||||")
            continue
        lines.append(
            f"| {row['setting']} | {row['method']} | {_fmt(row['f1'])} | {_fmt(row['auroc'])} | "
            f"{row['flagged_share']:.2%} | {row['small_false_flags']:.2%} | "
            f"{row['seconds']:.1f} |"
        )
    results_file.write_markdown(out, lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = results_file.arguments(__doc__, RESULTS).parse_args(argv)
    clock = results_file.start()
    with tempfile.TemporaryDirectory(prefix="dm-audit-long-tail-") as workdir:
        rows, sizes = run(args.seed, Path(workdir))
    command = results_file.command_line("uv run --group bench python benchmarks/long_tail.py", argv)
    write(rows, sizes, args.out, command, args.seed, clock.load, clock.seconds())


if __name__ == "__main__":
    main()
