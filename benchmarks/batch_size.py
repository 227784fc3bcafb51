"""Automatic batches on large feature tables: the size rule against a fixed batch of 128.

A feature table of more than 5,118 rows trains its folds in batches larger than 128, doubled
while an epoch keeps at least 10 steps, up to 512, with the learning rate scaled alike
(`dm_audit.crossfit.training_batch`). This benchmark audits the development tables the rule
changes, once with the defaults and once with ``batch_size=128`` (the batch kept as given, at
the default rate 0.1: the training every table had before the rule), on the same noisy labels:
symmetric, pair and instance-dependent noise at 20 and 40 % and the table as it is
(benchmarks/generality.py's settings). Measured: detection F1 and AUROC, the share flagged,
and the seconds to the flags (the audit stops there: ``retrain=False``).

The tables are development ones: ``synth-binary-mid`` (benchmarks/generality.py, 10,000 rows,
batches of 256) and ``HI`` (benchmarks/real_tables.py's development pool, 22,272 rows, 512;
needs ``--with pydataset``). Test tables are never run here.

    uv run --group bench --with pydataset python benchmarks/batch_size.py
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import results_file  # benchmarks/results_file.py: provenance and writing
import siblings  # benchmarks/siblings.py: the sibling scripts' loader

from dm_audit.config import AuditConfig
from dm_audit.crossfit import CROSSFIT_FOLDS, training_batch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "batch_size.md"
TABLES = {"synth-binary-mid": "generality", "HI": "real_tables"}
RATES = (0.0, 0.2, 0.4)
FIXED_BATCH = 128
MODES = ("automatic", f"batch {FIXED_BATCH}")


def load_table(name: str, workdir: Path) -> Any:
    """A development table as generality's BenchData."""
    if TABLES[name] == "generality":
        spec = siblings.load("generality").SPECS[name]
        if spec.split != "dev":
            raise SystemExit(f"{name} is a test dataset; this benchmark runs development ones")
        return spec.build(workdir, 0)
    data, _frame = siblings.load("real_tables").build(name)
    return data


def audit_config(mode: str, seed: int) -> AuditConfig:
    """The defaults, or the same with the batch fixed at 128 (kept as given: the rate stays)."""
    batch = None if mode == "automatic" else FIXED_BATCH
    return AuditConfig(progress=False, seed=seed, retrain=False, batch_size=batch)


def run(names: Sequence[str], seed: int, workdir: Path) -> list[dict[str, Any]]:
    g = siblings.load("generality")
    rows: list[dict[str, Any]] = []
    for name in names:
        data = load_table(name, workdir)
        n_train = len(data.labels) - len(data.labels) // CROSSFIT_FOLDS
        confusion = None
        for setting in g.settings(g.NOISE_KINDS, RATES):
            if setting.kind == "instance" and confusion is None:
                confusion = g.confusion_probs(data, seed)
            noisy = g.make_noisy(data, setting, seed, confusion)
            for mode in MODES:
                config = audit_config(mode, seed)
                detection = g.run_dm_audit(data, noisy, seed, config)
                measured = g.measure(detection, noisy, data.labels)
                row = {
                    "dataset": name,
                    "rows": len(data.labels),
                    "setting": setting.name,
                    "rate": setting.rate,
                    "mode": mode,
                    "batch": training_batch(config, n_train, data.dataset.input_kind)[0],
                    "f1": measured["f1"],
                    "auroc": measured["auroc"],
                    "flagged_share": measured["flagged_share"],
                    "seconds_to_flags": measured["seconds_to_flags"],
                }
                rows.append(row)
                f1 = "–" if row["f1"] is None else f"{row['f1']:.3f}"
                print(
                    f"{name:18s} {setting.name:14s} {mode:10s} batch {row['batch']:4d} F1 {f1} "
                    f"flagged {row['flagged_share']:.4f} {row['seconds_to_flags']:.1f} s",
                    flush=True,
                )
    return rows


def write(
    rows: list[dict[str, Any]], out: Path, command: str, seed: int, load: float, seconds: float
) -> None:
    _fmt = siblings.load("generality")._fmt
    lines = [
        "# Automatic batches on large feature tables",
        "",
        results_file.provenance(command, "batch_size.py", seed, load, seconds),
        "",
        f"Each setting audited twice on the same noisy labels: **automatic** (the defaults) and "
        f"**batch {FIXED_BATCH}** (`batch_size={FIXED_BATCH}`, the default rate 0.1), both "
        "with `retrain=False`. Seconds: to the flags.",
        "",
        "| dataset | setting | batch | F1 | AUROC | flagged | seconds | batch 128: F1 | AUROC "
        "| flagged | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["dataset"], r["setting"], r["mode"]): r for r in rows}
    cells = dict.fromkeys((r["dataset"], r["setting"]) for r in rows)
    for dataset, setting in cells:
        auto = by_key[(dataset, setting, MODES[0])]
        fixed = by_key[(dataset, setting, MODES[1])]
        lines.append(
            f"| {dataset} | {setting} | {auto['batch']} | {_fmt(auto['f1'])} | "
            f"{_fmt(auto['auroc'])} | {auto['flagged_share']:.2%} | "
            f"{auto['seconds_to_flags']:.1f} | {_fmt(fixed['f1'])} | {_fmt(fixed['auroc'])} | "
            f"{fixed['flagged_share']:.2%} | {fixed['seconds_to_flags']:.1f} |"
        )
    lines += [
        "",
        "Means per table (F1 and AUROC at 20-40 % noise; flagged: the table as it is):",
        "",
        "| dataset | mode | F1 | AUROC | flagged (clean) | seconds to the flags |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for mode in MODES:
            mine = [r for r in rows if r["dataset"] == dataset and r["mode"] == mode]
            noisy = [r for r in mine if r["rate"] >= 0.2]
            clean = [r["flagged_share"] for r in mine if r["rate"] == 0.0]
            lines.append(
                f"| {dataset} | {mode} | {np.mean([r['f1'] for r in noisy]):.3f} | "
                f"{np.mean([r['auroc'] for r in noisy]):.3f} | "
                f"{_fmt(float(np.mean(clean)) if clean else None, 4)} | "
                f"{np.mean([r['seconds_to_flags'] for r in mine]):.1f} |"
            )
    results_file.write_markdown(out, lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = results_file.arguments(__doc__, RESULTS)
    parser.add_argument("--datasets", nargs="+", choices=list(TABLES), default=list(TABLES))
    args = parser.parse_args(argv)
    clock = results_file.start()
    with tempfile.TemporaryDirectory(prefix="dm-audit-batch-") as workdir:
        rows = run(args.datasets, args.seed, Path(workdir))
    command = results_file.command_line(
        "uv run --group bench --with pydataset python benchmarks/batch_size.py", argv
    )
    write(rows, args.out, command, args.seed, clock.load, clock.seconds())


if __name__ == "__main__":
    main()
