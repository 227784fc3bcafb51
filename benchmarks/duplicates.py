"""Injected duplicates on the generality datasets: are the copies found, and the mislabelled
copies flagged?

For every dataset of `generality.DATASETS` (clean labels), 1 % of the rows (at least
`MIN_COPIES`) are copied with a little noise (1 % of each feature's spread; images: a
pixel-level change of the same size), and every other copy is given another class. On those
labels:

* **dm-audit**, defaults: ``is_near_duplicate`` of the copies, ``is_label_issue`` of the
  wrongly labelled copies, and the false alarms (duplicate flags on rows that were neither
  copied nor a copy);
* **cleanlab** ``find_label_issues`` on 5-fold out-of-sample probabilities of a logistic
  regression, for the wrongly labelled copies (tables only). Its Datalab finds duplicates with
  the same radius rule dm-audit uses but needs the ``cleanlab[datalab]`` extra (Hugging Face
  ``datasets``), which the benchmark group does not install.

    uv run --group bench python benchmarks/duplicates.py            # every dataset, seed 0
    uv run --group bench python benchmarks/duplicates.py --datasets wine digits

Writes ``results/duplicates.md`` and ``results/duplicates.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import siblings  # benchmarks/siblings.py: the sibling scripts' loader

from dm_audit.atomic import to_jsonable
from dm_audit.dataset import AuditDataset

RESULTS = Path(__file__).parent / "results"
SHARE_COPIED = 0.01
# On the tiny tables 1 % is one or two rows: at least 10 copies keep the shares readable.
MIN_COPIES = 10
COPY_NOISE = 0.01  # of each feature's spread


def _generality() -> Any:
    return siblings.load("generality")


def inject_copies(
    x: np.ndarray, labels: np.ndarray, n_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inputs and labels with copies appended.

    Returns
    -------
    x, labels : the extended inputs and labels
    source : row copied by each copy
    is_copy, is_wrong_copy : bool masks over the extended rows
    """
    rng = np.random.default_rng(seed)
    n = len(x)
    m = max(MIN_COPIES, round(SHARE_COPIED * n))
    source = np.sort(rng.choice(n, m, replace=False))
    flat = x.reshape(n, -1).astype(np.float64)
    spread = flat.std(axis=0)
    noised = flat[source] + rng.normal(0.0, COPY_NOISE, size=(m, flat.shape[1])) * spread
    if x.dtype == np.uint8:
        copies = np.clip(np.round(noised), 0, 255).astype(np.uint8).reshape(m, *x.shape[1:])
    else:
        copies = noised.astype(x.dtype).reshape(m, *x.shape[1:])
    copy_labels = labels[source].copy()
    wrong = np.arange(m) % 2 == 1
    shift = rng.integers(1, n_classes, size=int(wrong.sum()))
    copy_labels[wrong] = (copy_labels[wrong] + shift) % n_classes
    is_copy = np.r_[np.zeros(n, dtype=bool), np.ones(m, dtype=bool)]
    return (
        np.concatenate([x, copies]),
        np.r_[labels, copy_labels],
        source,
        is_copy,
        np.r_[np.zeros(n, dtype=bool), wrong],
    )


def _dataset(base: AuditDataset, x: np.ndarray, labels: np.ndarray) -> AuditDataset:
    names = np.asarray(base.classes, dtype=object)[labels]
    kind = "images" if x.ndim == 4 else "features"
    return AuditDataset.from_arrays(
        names, classes=list(base.classes), **{kind: x}, source=f"{base.source} + copies"
    )


def run_dm_audit(data: AuditDataset, seed: int) -> tuple[pd.DataFrame, float]:
    from dm_audit.audit import AuditConfig, run_audit

    start = time.perf_counter()
    report = run_audit(data, AuditConfig(progress=False, seed=seed))
    return report.examples, time.perf_counter() - start


def run_cleanlab(x_table: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """find_label_issues flags on 5-fold out-of-sample probabilities of a logistic regression."""
    from cleanlab.filter import find_label_issues

    generality = _generality()
    start = time.perf_counter()
    probs, _ = generality.cross_val_probs(generality.logistic(), x_table, labels, seed)
    issues = np.asarray(find_label_issues(labels, probs), dtype=bool)
    return issues, time.perf_counter() - start


def measure(
    duplicate: np.ndarray | None,
    issue: np.ndarray | None,
    source: np.ndarray,
    is_copy: np.ndarray,
    wrong: np.ndarray,
) -> dict[str, Any]:
    involved = is_copy.copy()
    involved[source] = True
    return {
        "copies_found": None if duplicate is None else float(duplicate[is_copy].mean()),
        "wrong_copies_flagged": None if issue is None else float(issue[wrong].mean()),
        "false_duplicate_rows": None if duplicate is None else int(duplicate[~involved].sum()),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    generality = _generality()
    specs = [generality.SPECS[n] for n in args.datasets] if args.datasets else generality.DATASETS
    load = os.getloadavg()
    started = time.perf_counter()
    rows = []
    with generality.tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            data = spec.build(Path(tmp), args.seed)
            x, labels, source, is_copy, wrong = inject_copies(
                data.x_model, data.labels, data.n_classes, args.seed
            )
            examples, seconds = run_dm_audit(_dataset(data.dataset, x, labels), args.seed)
            row = {
                "dataset": spec.name,
                "split": spec.split,
                "rows": len(labels),
                "copies": int(is_copy.sum()),
                "wrong_copies": int(wrong.sum()),
                "method": "dm-audit",
                "seconds": seconds,
                **measure(
                    examples["is_near_duplicate"].to_numpy(dtype=bool),
                    examples["is_label_issue"].to_numpy(dtype=bool),
                    source,
                    is_copy,
                    wrong,
                ),
            }
            rows.append(row)
            print(json.dumps(to_jsonable(row)), flush=True)
            if data.is_image:
                continue
            x_table = np.concatenate([data.x_table, x[len(data.labels) :].reshape(len(source), -1)])
            issues, seconds = run_cleanlab(x_table.astype(np.float32), labels, args.seed)
            row = {
                **{k: row[k] for k in ("dataset", "split", "rows", "copies", "wrong_copies")},
                "method": "cleanlab + LR (find_label_issues)",
                "seconds": seconds,
                **measure(None, issues, source, is_copy, wrong),
            }
            rows.append(row)
            print(json.dumps(to_jsonable(row)), flush=True)
    provenance = {
        "command": "uv run --group bench python benchmarks/duplicates.py"
        + (f" --datasets {' '.join(args.datasets)}" if args.datasets else ""),
        "seed": args.seed,
        "load_average_start": [round(v, 2) for v in load],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "seconds": time.perf_counter() - started,
    }
    write_results(args.out, provenance, rows)


def write_results(out: Path, provenance: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "duplicates.json").write_text(
        json.dumps(to_jsonable({**provenance, "rows": rows}), indent=2) + "\n"
    )
    frame = pd.DataFrame(rows)
    lines = [
        "# Injected duplicates: copies found, mislabelled copies flagged",
        "",
        f"Command: `{provenance['command']}`; seed {provenance['seed']}; load average "
        f"{provenance['load_average_start']} at the start, {provenance['load_average_end']} at "
        f"the end; {provenance['seconds'] / 60:.1f} min.",
        "",
        f"{SHARE_COPIED:.0%} of the rows (at least {MIN_COPIES}) copied with noise of "
        f"{COPY_NOISE:.0%} of each feature's spread, every other copy labelled with another "
        "class; the base labels are clean. *copies found*: share of the copies flagged as "
        "duplicates; *wrong copies flagged*: share of the wrongly labelled copies flagged as "
        "label issues; *other duplicates*: rows flagged as duplicates that were neither copied nor "
        "a copy: duplicates the data held already (scikit-learn's iris has one identical pair) "
        "or false alarms.",
        "",
        "| dataset | split | rows | copies | method | copies found | wrong copies flagged "
        "| other duplicates | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(value: Any, fmt: str) -> str:
        return "–" if value is None or value != value else format(value, fmt)

    for r in frame.to_dict("records"):
        lines.append(
            f"| {r['dataset']} | {r['split']} | {r['rows']:,} | {r['copies']} | {r['method']} "
            f"| {cell(r['copies_found'], '.2f')} | {cell(r['wrong_copies_flagged'], '.2f')} "
            f"| {cell(r['false_duplicate_rows'], '.0f')} | {r['seconds']:.1f} |"
        )
    dm = frame[frame["method"] == "dm-audit"]
    lines += [
        "",
        f"dm-audit over {len(dm)} datasets: copies found {dm['copies_found'].mean():.3f} (min "
        f"{dm['copies_found'].min():.2f}), wrongly labelled copies flagged "
        f"{dm['wrong_copies_flagged'].mean():.3f} (min {dm['wrong_copies_flagged'].min():.2f}), "
        f"{int(dm['false_duplicate_rows'].sum())} other duplicate rows in all.",
        "",
    ]
    (out / "duplicates.md").write_text("\n".join(lines))
    print(f"wrote {out / 'duplicates.md'}", flush=True)


if __name__ == "__main__":
    main()
