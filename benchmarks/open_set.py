"""Inputs of no known class: does the OOD score find them and leave clean data alone?

On every dataset of `generality.py` with at least three classes (its dev/test split kept), one
class is held out and 8 % of the resulting table are its rows, each labelled with a random
in-set class (`dm_audit.noise.make_open_set`): inputs of a class nobody told the audit about.
Settings:

* ``clean``: the dataset as it is; every OOD flag is a false alarm;
* ``open 8%``: the open-set rows alone;
* ``open 8% + symmetric 20%``: and 20 % of the other rows' labels flipped at random (skipped
  where the flips into the smallest remaining class would outnumber its own rows, so its label
  would mean nothing).

dm-audit runs with its defaults (``run_audit(dataset, AuditConfig(progress=False, seed=seed))``).
Measured: the AUROC of its ``ood_score`` for the open-set rows against all others, of the same
score before its group view (`dm_audit.ood.smooth_over_neighbours`: half each row's own score,
half its nearest rows' mean in the input space), and of the max-softmax score (1 − the top
out-of-sample probability) of the same audit model, the baseline an OOD score has to beat;
what the audit did with the open-set rows (set aside as OOD, sent to review, relabelled
automatically, kept); and the share of in-distribution rows flagged OOD.

    uv run --group bench python benchmarks/open_set.py                 # every split, seed 0
    uv run --group bench python benchmarks/open_set.py --split dev --datasets digits

Results: ``results/open_set.md`` and ``open_set.json``, rewritten after every dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import siblings  # benchmarks/siblings.py: the sibling scripts' loader
from sklearn.metrics import roc_auc_score

RESULTS = Path(__file__).parent / "results"
# Share of open-set rows in the audited table (the "unseen class injected at 8 %").
OPEN_FRACTION = 0.08
NOISE_RATE = 0.2
SETTINGS = ("clean", "open 8%", "open 8% + symmetric 20%")
# Targets of the open-set check: AUROC at least this and at least the max-softmax score's.
TARGET_AUROC = 0.95
# At most this share of an in-distribution table flagged OOD.
TARGET_CLEAN_OOD = 0.01


def generality_module() -> ModuleType:
    """``benchmarks/generality.py``: its datasets and split are shared."""
    return siblings.load("generality")


def held_out_classes(classes: Sequence[str], labels: np.ndarray) -> list[str] | None:
    """The class(es) to hold out: enough rows for `OPEN_FRACTION`, two or more classes left.

    The last class (in the dataset's order) that has enough rows on its own, never the largest
    (so an imbalanced table keeps its majority); else the last two other than the largest; None
    when that leaves fewer than two classes or still too few rows.
    """
    counts = np.bincount(labels, minlength=len(classes))
    n = int(counts.sum())

    def enough(held: list[int]) -> bool:
        rest = n - int(counts[held].sum())
        return int(counts[held].sum()) >= int(OPEN_FRACTION / (1 - OPEN_FRACTION) * rest)

    largest = int(np.argmax(counts))
    others = [k for k in range(len(classes)) if k != largest]
    for k in reversed(others):
        if enough([k]):
            return [classes[k]]
    pair = others[-2:]
    if len(classes) - 2 >= 2 and enough(pair):
        return [classes[k] for k in pair]
    return None


def noise_swamps_a_class(labels: np.ndarray, n_classes: int, rate: float) -> bool:
    """Whether symmetric flips into the smallest class would outnumber its own rows."""
    counts = np.bincount(labels, minlength=n_classes)
    flips_in = rate * (len(labels) - counts.min()) / (n_classes - 1)
    return bool(flips_in >= counts.min())


def audit(dataset: Any, seed: int) -> tuple[Any, dict[str, np.ndarray], float]:
    """dm-audit with its defaults: the report, the audit network's out-of-sample probabilities
    (``probs``, rows in dataset order) and the OOD score before its group view
    (``ood_alone``), and the seconds."""
    from dm_audit.audit import AuditConfig, run_audit

    captured: dict[str, Any] = {}

    def on_stage(name: str, result: Any) -> None:
        if name == "scores":
            captured["probs"] = np.asarray(result.probs)
        elif name == "flags":
            captured["ood_alone"] = np.asarray(result.ood_score_alone)

    start = time.perf_counter()
    report = run_audit(dataset, AuditConfig(progress=False, seed=seed), on_stage=on_stage)
    return report, captured, time.perf_counter() - start


def measure(report: Any, evidence: dict[str, np.ndarray], is_open: np.ndarray) -> dict[str, Any]:
    """OOD AUROC (with and without the group view), max-softmax AUROC, the fate of the
    open-set rows, clean rows flagged OOD."""
    probs = evidence["probs"]
    ex = report.examples
    is_ood = ex["is_ood"].to_numpy(dtype=bool)
    source = ex["correction_source"].astype(str).to_numpy()
    given = ex["given_label"].astype(str).to_numpy()
    corrected = ex["corrected_label"].astype(str).to_numpy()
    out: dict[str, Any] = {
        "rows": len(ex),
        "open_rows": int(is_open.sum()),
        "in_distribution_flagged_ood": float(is_ood[~is_open].mean()),
    }
    if is_open.any():
        msp = 1.0 - probs.max(axis=1)
        # What the audit did with each row is its correction source: an OOD-flagged row is
        # sent to review instead of set aside when the correction gate is closed.
        set_aside = source == "ood_set_aside"
        out |= {
            "ood_auroc": float(roc_auc_score(is_open, ex["ood_score"].to_numpy())),
            "ood_auroc_without_group_view": float(roc_auc_score(is_open, evidence["ood_alone"])),
            "max_softmax_auroc": float(roc_auc_score(is_open, msp)),
            "open_flagged_ood": float(is_ood[is_open].mean()),
            "open_set_aside": float(set_aside[is_open].mean()),
            "open_to_review": float((source == "needs_review")[is_open].mean()),
            "open_relabelled": float(
                ((source == "auto_corrected") & (corrected != given))[is_open].mean()
            ),
            "open_flagged_issue": float(ex["is_label_issue"].to_numpy(bool)[is_open].mean()),
        }
        out["open_kept"] = (
            1.0 - out["open_set_aside"] - out["open_to_review"] - out["open_relabelled"]
        )
    return out


def run_dataset(spec: Any, seed: int, workdir: Path) -> list[dict[str, Any]]:
    """Every setting of one dataset (none for a binary table or one without a class to spare)."""
    from dm_audit.noise import add_noise, make_open_set

    data = spec.build(workdir, seed)
    base = {"dataset": spec.name, "split": spec.split, "seed": seed}
    held = held_out_classes(list(data.dataset.classes), data.labels) if data.n_classes > 2 else None
    rows = []
    for setting in SETTINGS:
        row = base | {"setting": setting, "held_out": None if setting == "clean" else held}
        if setting == "clean":
            dataset, is_open = data.dataset, np.zeros(len(data.labels), dtype=bool)
        elif data.n_classes < 3:
            rows.append(row | {"skipped": "binary: one class left after holding one out"})
            continue
        elif held is None:
            rows.append(row | {"skipped": "no class to hold out with enough rows"})
            continue
        else:
            rate = NOISE_RATE if "symmetric" in setting else 0.0
            dataset = (
                add_noise(
                    data.dataset,
                    kind="symmetric",
                    rate=rate,
                    seed=seed,
                    open_set_classes=held,
                    open_set_fraction=OPEN_FRACTION,
                )
                if rate
                else make_open_set(data.dataset, held, OPEN_FRACTION, seed)
            )
            is_open = (dataset.table["noise"] == "open_set").to_numpy()
            true_codes = dataset.true_label_codes()[~is_open]
            if rate and noise_swamps_a_class(true_codes, dataset.n_classes, rate):
                rows.append(row | {"skipped": "20 % flips would outnumber a class's own rows"})
                continue
        report, evidence, seconds = audit(dataset, seed)
        rows.append(row | measure(report, evidence, is_open) | {"seconds": seconds})
        print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    text = f"{row['dataset']} · {row['setting']}: "
    if "ood_auroc" in row:
        text += f"OOD AUROC {row['ood_auroc']:.3f} (max-softmax {row['max_softmax_auroc']:.3f}), "
    return text + f"in-distribution flagged OOD {row['in_distribution_flagged_ood']:.1%}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def summary(rows: Sequence[dict[str, Any]], split: str) -> dict[str, Any]:
    """Means over a split's measured open-set runs, and how many meet the targets."""
    open_rows = [r for r in rows if r["split"] == split and "ood_auroc" in r]
    clean = [r for r in rows if r["split"] == split and r["setting"] == "clean" and "rows" in r]
    if not open_rows:
        return {}
    return {
        "runs": len(open_rows),
        "ood_auroc": float(np.mean([r["ood_auroc"] for r in open_rows])),
        "ood_auroc_without_group_view": float(
            np.mean([r["ood_auroc_without_group_view"] for r in open_rows])
        ),
        "lowest_ood_auroc": float(min(r["ood_auroc"] for r in open_rows)),
        "lowest_without_group_view": float(
            min(r["ood_auroc_without_group_view"] for r in open_rows)
        ),
        "max_softmax_auroc": float(np.mean([r["max_softmax_auroc"] for r in open_rows])),
        "at_least_max_softmax": sum(r["ood_auroc"] >= r["max_softmax_auroc"] for r in open_rows),
        "at_least_target": sum(r["ood_auroc"] >= TARGET_AUROC for r in open_rows),
        "open_set_aside": float(np.mean([r["open_set_aside"] for r in open_rows])),
        "open_relabelled": float(np.mean([r["open_relabelled"] for r in open_rows])),
        "clean_tables": len(clean),
        "clean_max_flagged_ood": max((r["in_distribution_flagged_ood"] for r in clean), default=0),
    }


def write_results(out: Path, provenance: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``open_set.json`` and ``open_set.md``."""
    summaries = {split: summary(rows, split) for split in ("dev", "test")}
    (out / "open_set.json").write_text(
        json.dumps({"provenance": provenance, "summary": summaries, "rows": rows}, indent=1)
    )
    lines = [
        "# Open set: inputs of no known class",
        "",
        f"Command: `{provenance['command']}`. Seeds {provenance['seeds']}; "
        f"{provenance['seconds'] / 60:.1f} min; load average (1/5/15 min) "
        f"{provenance['load']['start']} at the start, {provenance['load']['end']} at the end.",
        "",
        (sys.modules[__name__].__doc__ or "").split("\n\n    uv run")[0].strip(),
        "",
        "## Summary",
        "",
        f"Targets: OOD AUROC ≥ {TARGET_AUROC} and ≥ the max-softmax score's; in-distribution "
        f"rows flagged OOD ≤ {TARGET_CLEAN_OOD:.0%}.",
        "",
        "| split | open-set runs | OOD AUROC (lowest) | without the group view (lowest) | "
        f"max-softmax AUROC | runs ≥ max-softmax | runs ≥ {TARGET_AUROC} | open rows set aside "
        "| open rows relabelled | most flagged OOD on a clean table |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for split, s in summaries.items():
        if s:
            lines.append(
                f"| {split} | {s['runs']} | {s['ood_auroc']:.3f} ({s['lowest_ood_auroc']:.3f}) | "
                f"{s['ood_auroc_without_group_view']:.3f} "
                f"({s['lowest_without_group_view']:.3f}) | {s['max_softmax_auroc']:.3f} | "
                f"{s['at_least_max_softmax']} | {s['at_least_target']} | "
                f"{_pct(s['open_set_aside'])} | {_pct(s['open_relabelled'])} | "
                f"{_pct(s['clean_max_flagged_ood'])} |"
            )
    lines += [
        "",
        "## Every run",
        "",
        "Open rows: shares of the open-set rows set aside as OOD, sent to review, relabelled "
        "into a class automatically, and kept with their (random) label.",
        "",
        "| dataset | split | setting | held out | OOD AUROC | without the group view | "
        "max-softmax AUROC | set aside | review | relabelled | kept | in-distribution flagged "
        "OOD | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        held = ", ".join(r.get("held_out") or []) or "–"
        if "skipped" in r:
            lines.append(
                f"| {r['dataset']} | {r['split']} | {r['setting']} | {held} | "
                f"skipped: {r['skipped']} |  |  |  |  |  |  |  |  |"
            )
            continue
        auroc = (
            f"{r['ood_auroc']:.3f} | {r['ood_auroc_without_group_view']:.3f} | "
            f"{r['max_softmax_auroc']:.3f}"
            if "ood_auroc" in r
            else "– | – | –"
        )
        fates = ("open_set_aside", "open_to_review", "open_relabelled", "open_kept")
        fate = " | ".join(_pct(r.get(k)) for k in fates)
        lines.append(
            f"| {r['dataset']} | {r['split']} | {r['setting']} | {held} | {auroc} | {fate} | "
            f"{_pct(r['in_distribution_flagged_ood'])} | {r['seconds']:.1f} |"
        )
    (out / "open_set.md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--split", choices=["dev", "test", "all"], default="all")
    parser.add_argument("--datasets", nargs="+", default=None, help="default: every dataset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and faiss")
    args = parser.parse_args(argv)
    gen = generality_module()
    compare = gen.compare_module()
    compare.set_threads(args.threads)
    specs = gen._choose_datasets(args.datasets, args.split)
    if not specs:
        parser.error(f"no dataset of --datasets {args.datasets} is in the {args.split} split")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "uv run --group bench python benchmarks/open_set.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    load_start, started = compare._load(), time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dm-audit-open-set-") as tmp:
        for spec in specs:
            for seed in args.seeds:
                workdir = Path(tmp) / f"{spec.name}-{seed}"
                workdir.mkdir()
                rows += run_dataset(spec, seed, workdir)
                provenance = {
                    "command": command.strip(),
                    "seeds": list(args.seeds),
                    "threads": args.threads,
                    "seconds": time.perf_counter() - started,
                    "load": {"start": load_start, "end": compare._load()},
                    "machine": gen.machine_info(),
                }
                write_results(args.out, provenance, rows)
    print(f"wrote {args.out / 'open_set.md'} and open_set.json", flush=True)


if __name__ == "__main__":
    main()
