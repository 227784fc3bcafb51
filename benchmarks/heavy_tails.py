"""Heavy-tailed columns: tables whose few extreme values hold most of a column's variance.

Incomes, counts, prices and a sensor's glitches arrive with tails that standardising by the
standard deviation cannot tame: the bulk of the rows is squeezed into a sliver of the range. None
of benchmarks/generality.py's datasets has such a column (breast cancer has one), so this
benchmark builds two development tables for the shape, from `make_classification` features:

* ``exp-outliers``: 1,500 rows, 3 classes, 10 columns, each exp() of a feature in its own unit
  (log-normal factors), and 1 % of the values 100 times too large (a broken sensor);
* ``zero-inflated``: 2,000 rows, 4 classes, 12 columns, half of them incomes: exp(2 x feature)
  where a row earns, 0 in 40 % of the rows.

Each is run clean and at 20 % symmetric, pair and instance-dependent noise (benchmarks/
generality.py's noise), with dm-audit's defaults (heavy-tailed columns read by the normal scores
of their ranks, `dm_audit.heavy_tails`), dm-audit reading the raw columns (the dataset marked as
examined, so nothing is mapped: what the audit did before), cleanlab + LR and cleanlab + HGB, all
on the same labels.

    uv run --group bench python benchmarks/heavy_tails.py
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import results_file  # benchmarks/results_file.py: provenance and writing
import siblings  # benchmarks/siblings.py: the sibling scripts' loader
from sklearn.datasets import make_classification

from dm_audit.heavy_tails import NOTES_KEY, heavy_tailed_columns

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "heavy_tails.md"
SETTINGS = (("none", 0.0), ("symmetric", 0.2), ("pair", 0.2), ("instance", 0.2))
RAW = "dm-audit, raw columns"
# A broken sensor: this share of the values, this many times too large.
BROKEN_SHARE = 0.01
BROKEN_FACTOR = 100.0
# The zero-inflated table's share of rows without an income.
NO_INCOME_SHARE = 0.4


def _features(rows: int, columns: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return make_classification(
        n_samples=rows,
        n_features=columns,
        n_informative=columns // 2 + 1,
        n_redundant=0,
        n_classes=classes,
        n_clusters_per_class=1,
        class_sep=1.5,
        flip_y=0.0,
        random_state=seed,
    )


def exp_outliers(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """1,500 rows of 10 exp()-distorted columns in their own units, 1 % of the values broken."""
    x, y = _features(1_500, 10, 3, seed)
    rng = np.random.default_rng(seed)
    x = np.exp(x) * rng.lognormal(0.0, 1.0, size=x.shape[1])
    broken = rng.random(x.shape) < BROKEN_SHARE
    x[broken] *= BROKEN_FACTOR
    return x, y


def zero_inflated(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """2,000 rows of 12 columns, every other one an income: 0 for 40 % of the rows."""
    x, y = _features(2_000, 12, 4, seed)
    rng = np.random.default_rng(seed + 1)
    for column in range(0, x.shape[1], 2):
        earns = rng.random(len(x)) >= NO_INCOME_SHARE
        x[:, column] = np.where(earns, np.exp(2.0 * x[:, column]), 0.0)
    return x, y


TABLES: dict[str, Callable[[int], tuple[np.ndarray, np.ndarray]]] = {
    "exp-outliers": exp_outliers,
    "zero-inflated": zero_inflated,
}


def run(seed: int) -> list[dict[str, Any]]:
    """Every method's row per table and setting."""
    g = siblings.load("generality")
    rows: list[dict[str, Any]] = []
    for table, make in TABLES.items():
        x, y = make(seed)
        classes = [f"k{c}" for c in range(int(y.max()) + 1)]
        data = g._from_matrix(x, y, classes, table)
        mapped = int(heavy_tailed_columns(x).size)
        confusion = g.confusion_probs(data, seed)
        for kind, rate in SETTINGS:
            setting = g.Setting(kind, rate)
            noisy = g.make_noisy(data, setting, seed, confusion)
            results: dict[str, tuple[Any, str | None]] = {}

            g.run_methods(
                data,
                noisy,
                seed,
                [g.DM_AUDIT, g.CL_LR, g.CL_HGB],
                lambda m, d, e, into=results: into.__setitem__(m, (d, e)),
            )
            # The same audit of the raw columns: a dataset already examined is not mapped.
            notes = {**data.dataset.notes, NOTES_KEY: []}
            raw = replace(data, dataset=data.dataset.with_features(x, notes=notes))
            results[RAW] = _attempt(lambda raw=raw, noisy=noisy: g.run_dm_audit(raw, noisy, seed))
            for method in (g.DM_AUDIT, RAW, g.CL_LR, g.CL_HGB):
                detection, error = results[method]
                row: dict[str, Any] = {
                    "table": table,
                    "columns": x.shape[1],
                    "mapped": mapped,
                    "setting": setting.name,
                    "method": method,
                }
                if detection is None:
                    row["error"] = error
                else:
                    measured = g.measure(detection, noisy, data.labels)
                    row |= {k: measured[k] for k in ("f1", "auroc", "flagged_share", "seconds")}
                rows.append(row)
                print(f"{table:14s} {setting.name:14s} {method:22s} {row}", flush=True)
    return rows


def _attempt(compute: Callable[[], Any]) -> tuple[Any, str | None]:
    try:
        return compute(), None
    except Exception as error:  # recorded in the table; the other methods still count
        return None, f"{type(error).__name__}: {error}"


def write(
    rows: list[dict[str, Any]], out: Path, command: str, seed: int, load: float, seconds: float
) -> None:
    _fmt = siblings.load("generality")._fmt
    lines = [
        "# Heavy-tailed columns",
        "",
        results_file.provenance(command, "heavy_tails.py", seed, load, seconds),
        "",
        "Mapped: the table's columns read by the normal scores of their ranks "
        f"(`dm_audit.heavy_tails`). `{RAW}`: the same audit with the dataset marked as "
        "examined, so every column is read as it is.",
        "",
        "| table | mapped | setting | method | F1 | AUROC | flagged | seconds |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        head = f"| {row['table']} | {row['mapped']} of {row['columns']} | {row['setting']} | "
        if row.get("error"):
            lines.append(head + f"{row['method']} | error: {row['error']} ||||")
            continue
        lines.append(
            head + f"{row['method']} | {_fmt(row['f1'])} | {_fmt(row['auroc'])} | "
            f"{row['flagged_share']:.2%} | {row['seconds']:.1f} |"
        )
    results_file.write_markdown(out, lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = results_file.arguments(__doc__, RESULTS).parse_args(argv)
    clock = results_file.start()
    rows = run(args.seed)
    command = results_file.command_line(
        "uv run --group bench python benchmarks/heavy_tails.py", argv
    )
    write(rows, args.out, command, args.seed, clock.load, clock.seconds())


if __name__ == "__main__":
    main()
