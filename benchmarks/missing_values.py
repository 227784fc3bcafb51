"""Tables with gaps: how dm-audit fills them, measured against the alternatives and cleanlab.

Every column of a table loses values, either 15 % at random (MCAR) or among its largest values
(MNAR: a value above the column's 70th percentile goes missing half the time, the way a sensor
saturates or a high income goes unreported: up to 15 % of a column, less where many values tie at
the percentile, as digits' blank pixels do); then 20 or 40 % of the labels are flipped
(symmetric). Each way of filling the gaps feeds the same default audit:

* **neighbours** (the library's, `dm_audit.missing_values.fill_gaps`, reached through a
  DataFrame as a user's table is): the mean of the column over the row's 5 nearest rows that
  have it;
* **median + marker**: scikit-learn's ``SimpleImputer(strategy="median", add_indicator=True)``;
* **median**: the column's median alone;
* **KNNImputer**: scikit-learn's (5 neighbours, NaN-aware Euclidean distance on standardised
  columns), the exact version of what the library approximates with two stages of faiss
  searches.

Side by side, cleanlab's ``find_label_issues`` on 5-fold out-of-sample probabilities of a
``HistGradientBoostingClassifier`` (which takes gaps as they are) and of a logistic regression
after ``SimpleImputer(median, add_indicator=True)`` and a ``StandardScaler``.

The choice was made on the ``choice`` datasets (wine, breast cancer, digits); the ``check``
datasets (iris and two synthetic tables of benchmarks/generality.py, one with raw columns of
mixed scale, one imbalanced) were run afterwards with the chosen fill only.

    uv run --group bench python benchmarks/missing_values.py
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import KNNImputer, SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import siblings  # noqa: E402  (benchmarks/siblings.py: the sibling scripts' loader)

from dm_audit.noise import inject_symmetric  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "missing_values.md"
GAP_SHARE = 0.15
RATES = (0.2, 0.4)
MECHANISMS = ("MCAR", "MNAR")
FILLS = ("neighbours", "median + marker", "median", "KNNImputer")
CHOSEN = "neighbours"


def _sklearn(loader: Callable) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def build() -> tuple[np.ndarray, np.ndarray]:
        bunch = loader()
        return bunch.data.astype(np.float64), bunch.target.astype(np.int64)

    return build


def _generality(name: str) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def build() -> tuple[np.ndarray, np.ndarray]:
        data = siblings.load("generality").SPECS[name].build(Path("."), 0)
        return data.x_table.astype(np.float64), data.labels

    return build


DATASETS: dict[str, tuple[str, Callable[[], tuple[np.ndarray, np.ndarray]]]] = {
    "wine": ("choice", _sklearn(load_wine)),
    "breast-cancer": ("choice", _sklearn(load_breast_cancer)),
    "digits": ("choice", _sklearn(load_digits)),
    "iris": ("check", _sklearn(load_iris)),
    "synth-mixed-scale": ("check", _generality("synth-mixed-scale")),
    "synth-imbalanced-small": ("check", _generality("synth-imbalanced-small")),
}


def with_gaps(x: np.ndarray, mechanism: str, seed: int) -> np.ndarray:
    """`x` with a share of each column's values removed (NaN), seeded."""
    rng = np.random.default_rng(seed)
    if mechanism == "MCAR":
        mask = rng.random(x.shape) < GAP_SHARE
    else:  # half of the values above the 70th percentile: at most 15 % of the column
        mask = (x > np.quantile(x, 0.7, axis=0)) & (rng.random(x.shape) < 0.5)
    return np.where(mask, np.nan, x)


def filled(x: np.ndarray, how: str) -> np.ndarray:
    """`x`'s gaps filled by one of the alternatives (not the library's: it runs in the audit)."""
    if how == "median + marker":
        return SimpleImputer(strategy="median", add_indicator=True).fit_transform(x)
    if how == "median":
        return SimpleImputer(strategy="median").fit_transform(x)
    if how == "KNNImputer":
        scaler = StandardScaler().fit(x)  # ignores NaN when fitting
        z = KNNImputer(n_neighbors=5).fit_transform(scaler.transform(x))
        return scaler.inverse_transform(z)
    raise ValueError(how)


def fill_errors(names: list[str], seed: int) -> list[dict[str, object]]:
    """Root-mean-square error of each fill at the removed values, in standard deviations of the
    column (the label-free half of the comparison)."""
    from dm_audit.missing_values import fill_gaps

    rows: list[dict[str, object]] = []
    for name in names:
        x, _ = DATASETS[name][1]()
        spread = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
        for mechanism in MECHANISMS:
            gapped = with_gaps(x, mechanism, seed)
            gaps = np.isnan(gapped)
            row: dict[str, object] = {"dataset": name, "gaps": mechanism}
            for how in FILLS:
                if how == "median + marker":
                    continue  # the same values as the median, and a column more
                done = fill_gaps(gapped, seed=seed) if how == CHOSEN else filled(gapped, how)
                row[how] = float(np.sqrt(np.mean(((done - x) / spread)[gaps] ** 2)))
            rows.append(row)
    return rows


def dm_audit_flags(x: np.ndarray, labels: np.ndarray, how: str, seed: int) -> np.ndarray:
    import dm_audit

    auditor = dm_audit.LabelAuditor(seed=seed)
    if how == CHOSEN:
        frame = pd.DataFrame(x, columns=[f"c{j}" for j in range(x.shape[1])])
        auditor.fit(frame, labels)
    else:
        auditor.fit(filled(x, how).astype(np.float32), labels)
    return auditor.is_label_issue_


def cleanlab_flags(model: object, x: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    from cleanlab.filter import find_label_issues

    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    probs = cross_val_predict(model, x, labels, cv=folds, method="predict_proba")
    return find_label_issues(labels, probs)


def run(names: list[str], seed: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for name in names:
        role, build = DATASETS[name]
        x, truth = build()
        classes = int(truth.max()) + 1
        for mechanism in MECHANISMS:
            gapped = with_gaps(x, mechanism, seed)
            for rate in RATES:
                noisy = inject_symmetric(truth, classes, rate, seed)
                wrong = noisy != truth
                row: dict[str, object] = {
                    "dataset": name,
                    "role": role,
                    "gaps": mechanism,
                    "noise": f"symmetric {rate:.0%}",
                }
                for how in FILLS if role == "choice" else (CHOSEN,):
                    start = time.perf_counter()
                    flags = dm_audit_flags(gapped, noisy, how, seed)
                    row[f"dm-audit, {how}"] = f1_score(wrong, flags)
                    row[f"seconds, {how}"] = time.perf_counter() - start
                hgb = HistGradientBoostingClassifier(random_state=seed)
                row["cleanlab + HGB"] = f1_score(wrong, cleanlab_flags(hgb, gapped, noisy, seed))
                lr = make_pipeline(
                    SimpleImputer(strategy="median", add_indicator=True),
                    StandardScaler(),
                    LogisticRegression(max_iter=2_000),
                )
                row["cleanlab + LR"] = f1_score(wrong, cleanlab_flags(lr, gapped, noisy, seed))
                rows.append(row)
                print(f"{name:24s} {mechanism} {rate:.0%} done", flush=True)
    return rows


def write(
    rows: list[dict[str, object]],
    errors: list[dict[str, object]],
    out: Path,
    load: float,
    seconds: float,
) -> None:
    frame = pd.DataFrame(rows)
    f1_columns = [c for c in frame.columns if c.startswith("dm-audit") or c.startswith("clean")]
    lines = [
        "# Tables with gaps: filling them for the audit, and cleanlab",
        "",
        f"Command: `uv run --group bench python benchmarks/missing_values.py`; seed 0; "
        f"{platform.machine()}, {os.cpu_count()} cores, load {load:.2f} at the start; "
        f"{seconds / 60:.1f} min.",
        "",
        f"Values removed from every column (MCAR: {GAP_SHARE:.0%} at random; MNAR: half of the "
        "values above the column's 70th percentile), then symmetric label noise. Cells: F1 of "
        "the label-issue flags. `dm-audit, neighbours` is the library's default (the table "
        "given as a DataFrame); the other dm-audit columns fill the gaps first and give the "
        "audit an array. `choice` datasets decided the default; `check` datasets ran "
        "afterwards with it only.",
        "",
    ]
    lines += [
        "## How close the fills come to the removed values",
        "",
        "Root-mean-square error at the removed values, in standard deviations of the column.",
        "",
        pd.DataFrame(errors).round(3).to_markdown(index=False),
        "",
    ]
    for role in ("choice", "check"):
        part = frame[frame["role"] == role].dropna(axis=1, how="all")
        if part.empty:
            continue
        shown = ["dataset", "gaps", "noise"] + [c for c in f1_columns if c in part.columns]
        lines += [f"## {role} datasets", "", part[shown].round(3).to_markdown(index=False), ""]
        means = part[[c for c in f1_columns if c in part.columns]].mean().round(3)
        lines += ["Mean F1:", "", means.to_frame("mean F1").to_markdown(), ""]
        if role == "choice":
            dm = [c for c in part.columns if c.startswith("dm-audit")]
            # Ties count for every tied fill.
            scores = part[dm].round(3)
            best = scores.eq(scores.max(axis=1), axis=0).sum()
            worst = scores.eq(scores.min(axis=1), axis=0).sum()
            lines += [
                f"Settings where each fill gave the best / the worst dm-audit F1 (of {len(part)}; "
                "ties count for each tied fill):",
                "",
                pd.DataFrame({"best": best, "worst": worst}).fillna(0).astype(int).to_markdown(),
                "",
            ]
        secs = part[[c for c in part.columns if c.startswith("seconds")]].mean().round(1)
        secs.index = [c.removeprefix("seconds, ") for c in secs.index]
        lines += [
            "Mean seconds per audit (the fill included):",
            "",
            secs.to_frame("seconds").to_markdown(),
            "",
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # the audits' warnings (gaps filled, small tables)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    rows = run(args.datasets, args.seed)
    errors = fill_errors(args.datasets, args.seed)
    write(rows, errors, args.out, load, time.perf_counter() - start)


if __name__ == "__main__":
    main()
