"""A class too small for the linear reference: left to the networks against no reference at all.

The linear reference (`dm_audit.linear_reference`) fits five fold models, so it cannot learn a
class of fewer than 10 rows. It is fitted on the other classes and abstains on that class's
rows, where the networks audit alone; before, one such class switched it off for the whole
table, which is what ``linear_reference=False`` still gives. Real tables hold such classes: a
typo in one label, a class added by hand, the tail of a long-tailed label set.

Each development dataset of benchmarks/generality.py runs with the noise of its settings
(symmetric, pair and instance-dependent at 20 and 40 %, and the table as it is), and then
`STRAY_ROWS` rows, chosen at random, get a label of a class of their own (``stray``): wrong
labels the audit should flag. Both modes audit the same labels with ``retrain=False``:

* **left to the networks**: the defaults;
* **no reference**: ``linear_reference=False``.

Measured: detection F1 and AUROC against every wrong label (the stray rows included), the share
of correct rows flagged, and how many stray rows were flagged. Test datasets are never run.

    uv run --group bench python benchmarks/small_classes.py
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import results_file  # benchmarks/results_file.py: provenance and writing
import siblings  # benchmarks/siblings.py: the sibling scripts' loader

from dm_audit.config import AuditConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "small_classes.md"
DATASETS = ("digits", "synth-mixed-scale", "synth-tiny-wide", "synth-imbalanced-small")
RATES = (0.0, 0.2, 0.4)
STRAY_ROWS = 1
STRAY_CLASS = "stray"
MODES = ("left to the networks", "no reference")


def with_stray_class(data: Any, noisy: np.ndarray, seed: int) -> tuple[Any, np.ndarray]:
    """`data` with one more class, ``stray``, and `noisy` with `STRAY_ROWS` random rows given it."""
    dataset = dataclasses.replace(data.dataset, classes=[*data.dataset.classes, STRAY_CLASS])
    codes = noisy.copy()
    rows = np.random.default_rng(seed).choice(codes.size, STRAY_ROWS, replace=False)
    codes[rows] = len(dataset.classes) - 1
    return dataclasses.replace(data, dataset=dataset), codes


def audit_config(mode: str, seed: int) -> AuditConfig:
    """The defaults, or the same without the linear reference."""
    return AuditConfig(progress=False, seed=seed, retrain=False, linear_reference=mode == MODES[0])


def run(names: Sequence[str], seed: int, workdir: Path) -> list[dict[str, Any]]:
    g = siblings.load("generality")
    rows: list[dict[str, Any]] = []
    for name in names:
        spec = g.SPECS[name]
        if spec.split != "dev":
            raise SystemExit(f"{name} is a test dataset; this benchmark runs development ones")
        data = spec.build(workdir, seed)
        confusion = None
        for setting in g.settings(g.NOISE_KINDS, RATES):
            if setting.kind == "instance" and confusion is None:
                confusion = g.confusion_probs(data, seed)
            stray_data, noisy = with_stray_class(
                data, g.make_noisy(data, setting, seed, confusion), seed
            )
            wrong = noisy != data.labels
            stray = noisy == len(stray_data.dataset.classes) - 1
            for mode in MODES:
                detection = g.run_dm_audit(stray_data, noisy, seed, audit_config(mode, seed))
                measured = g.measure(detection, noisy, data.labels)
                row = {
                    "dataset": name,
                    "setting": setting.name,
                    "rate": setting.rate,
                    "mode": mode,
                    "f1": measured["f1"],
                    "auroc": measured["auroc"],
                    "false_flags": float(detection.flags[~wrong].mean()),
                    "stray_flagged": int(detection.flags[stray].sum()),
                }
                rows.append(row)
                print(
                    f"{name:24s} {setting.name:14s} {mode:20s} F1 {row['f1']:.3f} "
                    f"false flags {row['false_flags']:.4f} stray {row['stray_flagged']}",
                    flush=True,
                )
    return rows


def write(
    rows: list[dict[str, Any]], out: Path, command: str, seed: int, load: float, seconds: float
) -> None:
    _fmt = siblings.load("generality")._fmt
    lines = [
        "# A class too small for the linear reference",
        "",
        results_file.provenance(command, "small_classes.py", seed, load, seconds),
        "",
        f"Each setting's noisy labels, plus {STRAY_ROWS} row(s) given a class of their own "
        f"(`{STRAY_CLASS}`), audited twice with `retrain=False`: **{MODES[0]}** (the defaults: "
        f"the reference fitted on the other classes, abstaining on the stray rows) and "
        f"**{MODES[1]}** (`linear_reference=False`, what such a table got when one small "
        "class switched the reference off). F1 and AUROC count the stray rows as wrong labels; "
        "false flags: the share of correct rows flagged.",
        "",
        f"| dataset | setting | F1 | AUROC | false flags | stray flagged | {MODES[1]}: F1 | "
        "AUROC | false flags | stray flagged |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["dataset"], r["setting"], r["mode"]): r for r in rows}
    for dataset, setting in dict.fromkeys((r["dataset"], r["setting"]) for r in rows):
        left, off = (by_key[(dataset, setting, mode)] for mode in MODES)
        lines.append(
            f"| {dataset} | {setting} | {_fmt(left['f1'])} | {_fmt(left['auroc'])} | "
            f"{left['false_flags']:.2%} | {left['stray_flagged']} | {_fmt(off['f1'])} | "
            f"{_fmt(off['auroc'])} | {off['false_flags']:.2%} | {off['stray_flagged']} |"
        )
    lines += [
        "",
        "Means (F1 and AUROC at 20-40 % noise; false flags on the tables as they are, where "
        "every other row is correct):",
        "",
        "| mode | F1 | AUROC | false flags (clean) | stray rows flagged |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        noisy = [r for r in mine if r["rate"] >= 0.2]
        clean = [r["false_flags"] for r in mine if r["rate"] == 0.0]
        lines.append(
            f"| {mode} | {np.mean([r['f1'] for r in noisy]):.3f} | "
            f"{np.mean([r['auroc'] for r in noisy]):.3f} | "
            f"{_fmt(float(np.mean(clean)) if clean else None, 4)} | "
            f"{sum(r['stray_flagged'] for r in mine)} of {STRAY_ROWS * len(mine)} |"
        )
    results_file.write_markdown(out, lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = results_file.arguments(__doc__, RESULTS)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    args = parser.parse_args(argv)
    clock = results_file.start()
    with tempfile.TemporaryDirectory(prefix="dm-audit-small-classes-") as workdir:
        rows = run(args.datasets, args.seed, Path(workdir))
    command = results_file.command_line(
        "uv run --group bench python benchmarks/small_classes.py", argv
    )
    write(rows, args.out, command, args.seed, clock.load, clock.seconds())


if __name__ == "__main__":
    main()
