"""End-to-end audit quality on digits whose truth is known, one row per noise scenario.

Each scenario corrupts the training split (70/30 stratified split) of scikit-learn's digits,
runs the whole audit with its defaults (probe, DM training, flags, corrections, retrain) and
compares the flags and corrections with the truth; "CCE" trains plain cross entropy on the same
noisy labels for reference. Mean ± std over seeds.

    uv run python benchmarks/audit_quality.py              # 4 scenarios, seeds 0 1 2
    uv run python benchmarks/audit_quality.py --quick      # 2 scenarios, seed 0
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dm_audit.audit import AuditConfig, run_audit
from dm_audit.dataset import AuditDataset
from dm_audit.metrics import accuracy
from dm_audit.noise import add_noise
from dm_audit.sources import load_source
from dm_audit.training import TrainConfig, fit, predict_proba

RESULTS = Path(__file__).parent / "results"

SCENARIOS: dict[str, Callable[[AuditDataset, int], AuditDataset]] = {
    "symmetric 40%": lambda d, s: add_noise(d, kind="symmetric", rate=0.4, seed=s),
    "pair 20% (k→k+1)": lambda d, s: add_noise(d, kind="pair", rate=0.2, seed=s),
    "no noise": lambda d, s: d,
    "open set 8% (8, 9) + symmetric 30%": lambda d, s: add_noise(
        d, kind="symmetric", rate=0.3, seed=s, open_set_classes=["8", "9"], open_set_fraction=0.08
    ),
}


def cce_test_accuracy(dataset: AuditDataset, seed: int) -> float:
    """Plain cross entropy on the noisy labels, the reference a user would otherwise train."""
    train, test = dataset.train(), dataset.test()
    result = fit(
        train.inputs(),
        train.label_codes(),
        TrainConfig(loss="cce", seed=seed, progress=False),
        num_classes=dataset.n_classes,
    )
    probs, _ = predict_proba(result.model, test.inputs(), device="cpu")
    return accuracy(probs.argmax(axis=1), test.label_codes())


def run_scenario(name: str, seed: int) -> dict[str, float | None]:
    dataset = SCENARIOS[name](load_source("digits", seed=seed), seed)
    start = time.perf_counter()
    report = run_audit(dataset, AuditConfig(seed=seed, progress=False))
    seconds = time.perf_counter() - start
    summary = report.summary
    row: dict[str, float | None] = {
        "seconds": seconds,
        "flagged_share": summary["counts"]["label_issues"] / summary["n_examples"],
        "noise_estimate": summary["noise_estimate"]["audit_rate"],
        "test_before": summary["quality"]["test_accuracy_before"],
        "test_after": summary["quality"]["test_accuracy_after"],
        "cce_test": cce_test_accuracy(dataset, seed),
    }
    truth = summary.get("against_truth")
    if truth:
        issues = truth["label_issues"]
        row |= {
            "precision": issues["precision"],
            "recall": issues["recall"],
            "f1": issues["f1"],
            "auroc": issues["auroc"],
            "label_acc_before": truth["label_accuracy_before"],
            "label_acc_after": truth["label_accuracy_after"],
        }
        if "ood" in truth:
            ood = truth["ood"]
            row |= {
                "ood_auroc": ood["auroc"],
                "ood_auroc_vs_mislabelled": ood["auroc_vs_mislabelled"],
                "ood_not_auto_corrected": ood["share_not_auto_corrected"],
            }
    return row


COLUMNS = [
    ("noise_estimate", "noise est."),
    ("flagged_share", "flagged"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("f1", "F1"),
    ("auroc", "AUROC"),
    ("ood_auroc", "OOD AUROC"),
    ("ood_auroc_vs_mislabelled", "OOD AUROC vs mislabelled"),
    ("ood_not_auto_corrected", "OOD not auto-corrected"),
    ("label_acc_before", "label acc. before"),
    ("label_acc_after", "label acc. after"),
    ("cce_test", "test acc. CCE"),
    ("test_before", "test acc. audit model"),
    ("test_after", "test acc. retrained"),
    ("seconds", "seconds"),
]


def _cell(values: list[float | None], key: str) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    mean, std = float(np.mean(present)), float(np.std(present))
    if key == "seconds":
        return f"{mean:.0f}"
    return f"{mean:.3f} ± {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two scenarios, seed 0")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--scenarios", nargs="+", default=None, help="names (substring match)")
    args = parser.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    names = list(SCENARIOS)
    if args.quick:
        names = names[:1] + names[2:3]
    if args.scenarios:
        names = [n for n in names if any(s in n for s in args.scenarios)]
    results: dict[str, list[dict]] = {}
    for name in names:
        results[name] = []
        for seed in seeds:
            row = run_scenario(name, seed)
            results[name].append(row)
            print(name, seed, json.dumps({k: round(v, 4) for k, v in row.items() if v is not None}))
            sys.stdout.flush()
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Audit quality on digits (truth known)",
        "",
        f"Command: `uv run python benchmarks/audit_quality.py{' --quick' if args.quick else ''}`. "
        f"Seeds {seeds}; 70/30 stratified split; the audit's defaults (adaptive emphasis, "
        "automatic thresholds); mean ± std. Detection is measured on in-distribution examples; "
        "OOD AUROC against all other examples and against the mislabelled ones.",
        "",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}.",
        "",
    ]
    header = ["scenario"] + [title for _, title in COLUMNS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, rows in results.items():
        cells = [_cell([r.get(key) for r in rows], key) for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out = RESULTS / ("audit_quality_quick.md" if args.quick else "audit_quality.md")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
