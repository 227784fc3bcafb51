"""How the audit turns its per-row evidence into flags: the choices, measured on development data.

The audit's evidence for each row is its out-of-sample probabilities (the cross-fitted model
that never saw it), its in-sample trajectory (mean p_i under the DM model that trains on it) and
its neighbours' labels. This benchmark runs the audit's stages once per development dataset,
keeps that evidence, and scores candidate rules on it offline: how to combine the components
into `label_issue_score` and how many rows to flag. The chosen rule is the library's default;
the results table records why.

Only development datasets are used here (digits and synthetic tables); the generality benchmark
reports on held-out datasets that no choice was made on.

    uv run python benchmarks/flag_rules.py            # runs the audits (cached), evaluates
    uv run python benchmarks/flag_rules.py --quick    # two small datasets
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits, make_classification
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dm_audit import audit, estimate, flags  # noqa: E402
from dm_audit.dataset import AuditDataset  # noqa: E402
from dm_audit.noise import (  # noqa: E402
    inject_instance_dependent,
    inject_pair,
    inject_symmetric,
)

CACHE = ROOT / "data" / "runs" / "flag_rules"


def _digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64)


def _imbalanced() -> tuple[np.ndarray, np.ndarray]:
    # Geometric class shares: the largest class is ~30x the smallest.
    shares = 0.6 ** np.arange(8)
    x, y = make_classification(
        n_samples=5000,
        n_features=20,
        n_informative=12,
        n_classes=8,
        n_clusters_per_class=1,
        weights=list(shares / shares.sum()),
        class_sep=1.5,
        random_state=11,
    )
    return x.astype(np.float32), y.astype(np.int64)


def _binary_raw() -> tuple[np.ndarray, np.ndarray]:
    x, y = make_classification(
        n_samples=800, n_features=12, n_informative=6, class_sep=1.2, random_state=5
    )
    # Raw, unscaled columns of very different magnitudes and offsets.
    scale = np.logspace(-3, 4, x.shape[1])
    return (x * scale + 10 * scale).astype(np.float32), y.astype(np.int64)


def _tiny_wide() -> tuple[np.ndarray, np.ndarray]:
    # 240 rows of 60 features: each cross-fitted half can memorise its 120 rows.
    x, y = make_classification(
        n_samples=240,
        n_features=60,
        n_informative=10,
        n_redundant=12,
        n_classes=3,
        class_sep=1.5,
        flip_y=0.0,
        random_state=7,
    )
    return x.astype(np.float32), y.astype(np.int64)


DATASETS = {
    "digits": _digits,
    "imbalanced8": _imbalanced,
    "binary_raw": _binary_raw,
    "tiny_wide": _tiny_wide,
}
SETTINGS = {
    "digits": [
        ("symmetric", 0.4),
        ("pair", 0.2),
        ("symmetric", 0.2),
        ("instance", 0.2),
        ("instance", 0.4),
        ("none", 0.0),
    ],
    "imbalanced8": [("symmetric", 0.2), ("instance", 0.2), ("none", 0.0)],
    "binary_raw": [("symmetric", 0.2), ("instance", 0.2), ("none", 0.0)],
    "tiny_wide": [("symmetric", 0.2), ("symmetric", 0.4), ("instance", 0.2), ("none", 0.0)],
}
QUICK = {"binary_raw": [("symmetric", 0.2)], "digits": [("pair", 0.2)]}


def _noisy(x: np.ndarray, y: np.ndarray, kind: str, rate: float, seed: int) -> np.ndarray:
    c = int(y.max()) + 1
    if kind == "instance":
        # As in the generality benchmark: the rows a logistic regression trained on the clean
        # labels finds most confusable, each flipped to the class it confuses them with.
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_predict
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2_000))
        folds = StratifiedKFold(5, shuffle=True, random_state=seed)
        probs = cross_val_predict(model, x, y, cv=folds, method="predict_proba")
        return inject_instance_dependent(y, probs, rate, seed)
    if kind == "symmetric":
        return inject_symmetric(y, c, rate, seed)
    if kind == "pair":
        return inject_pair(y, c, rate, seed)
    return y.copy()


def evidence(name: str, kind: str, rate: float, seed: int) -> dict[str, np.ndarray]:
    """Run the audit's stages up to the flags and keep every row's evidence (cached)."""
    path = CACHE / f"{name}_{kind}_{rate:g}_seed{seed}_v2.npz"
    if path.is_file():
        return dict(np.load(path))
    x, y = DATASETS[name]()
    given = _noisy(x, y, kind, rate, seed)
    data = AuditDataset.from_arrays(
        [str(v) for v in given], features=x, classes=[str(c) for c in range(int(y.max()) + 1)]
    )
    config = audit.AuditConfig(seed=seed, progress=False)
    start = time.perf_counter()
    probe = audit.probe(data, config)
    fitted = audit.train_audit_model(data, probe, config)
    scores = audit.score_examples(data, fitted, config)
    flagged = audit.flag_examples(data, scores, config)
    seconds = time.perf_counter() - start
    out = {
        "given": given,
        "truth": y,
        "probs": scores.probs,
        "probe_probs": probe.probs,
        "mean_p": scores.table["mean_p"].to_numpy(),
        "knn": flagged.table["knn_agreement"].to_numpy(),
        "probe_rate": np.float64(probe.noise_rate),
        "seconds": np.float64(seconds),
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


WEIGHTS = {
    "1:6:1": {"prediction": 1.0, "dynamics": 6.0, "knn": 1.0},
    "1:1:1": {"prediction": 1.0, "dynamics": 1.0, "knn": 1.0},
    "1:1:0": {"prediction": 1.0, "dynamics": 1.0, "knn": 0.0},
    "2:1:1": {"prediction": 2.0, "dynamics": 1.0, "knn": 1.0},
    "1:2:1": {"prediction": 1.0, "dynamics": 2.0, "knn": 1.0},
    "0:1:0": {"prediction": 0.0, "dynamics": 1.0, "knn": 0.0},
    "1:0:0": {"prediction": 1.0, "dynamics": 0.0, "knn": 0.0},
    # The default: dynamics weighted 2 (1 - m), m the share of out-of-sample-doubted rows fitted
    # in sample (`flags.dynamics_reliability`).
    "1:2(1-m):1": None,
}


def rules(ev: dict[str, np.ndarray], score: np.ndarray) -> dict[str, np.ndarray]:
    """Candidate flag rules on one score vector."""
    given, probs = ev["given"], ev["probs"]
    noise = estimate.estimate_noise(probs, given)
    cj = flags.flag_by_class_counts(score, given, flags.issue_counts_per_class(noise, given))
    neutral = score >= 0.5
    disagrees = probs.argmax(axis=1) != given
    forgotten = ev["mean_p"] < 0.5
    # The count from the mean of the probe's and the audit's out-of-sample probabilities.
    both = estimate.estimate_noise((probs + ev["probe_probs"]) / 2.0, given)
    cj2 = flags.flag_by_class_counts(score, given, flags.issue_counts_per_class(both, given))
    ens = (probs + ev["probe_probs"]) / 2.0
    ens_disagrees = ens.argmax(axis=1) != given
    both_disagree = (probs.argmax(axis=1) == ev["probe_probs"].argmax(axis=1)) & disagrees
    return {
        "cj2&s>=.5 | (both models disagree & mean_p<0.5)": (cj2 & neutral)
        | (both_disagree & forgotten),
        "cj2&s>=.5 | (ens argmax!=given & mean_p<0.5 & s>=.5)": (cj2 & neutral)
        | (ens_disagrees & forgotten & neutral),
        "cj2&s>=.5 | (both disagree & s>=.5)": (cj2 & neutral) | (both_disagree & neutral),
        "cj_count(probe+audit) & score>=0.5": cj2 & neutral,
        "cj_count & score>=0.5 & argmax!=given": cj & neutral & disagrees,
        "cj_count & argmax!=given & mean_p<0.5": cj & disagrees & forgotten,
        "cj_count & (argmax!=given | mean_p<0.5)": cj & (disagrees | forgotten),
        "cj_count": cj,
        "score>=0.5": neutral,
        "cj_count & score>=0.5": cj & neutral,
        "mixture[0.3,0.5]": score >= flags.mixture_split(score).threshold,
        "argmax!=given": probs.argmax(axis=1) != given,
    }


def evaluate(quick: bool, seeds: list[int]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for name, settings in (QUICK if quick else SETTINGS).items():
        for kind, rate in settings:
            for seed in seeds:
                ev = evidence(name, kind, rate, seed)
                noisy = ev["given"] != ev["truth"]
                for wname, weights in WEIGHTS.items():
                    if weights is None:
                        reliability = flags.dynamics_reliability(
                            ev["mean_p"], ev["probs"], ev["given"]
                        )
                        weights = {"prediction": 1.0, "dynamics": 2.0 * reliability, "knn": 1.0}
                    score = flags.label_issue_scores(
                        ev["probs"][np.arange(noisy.size), ev["given"]],
                        ev["probs"],
                        ev["given"],
                        mean_p=ev["mean_p"],
                        knn_agreement=ev["knn"],
                        weights=weights,
                    )
                    auroc = roc_auc_score(noisy, score) if 0 < noisy.sum() < noisy.size else None
                    for rname, flagged in rules(ev, score).items():
                        rows.append(
                            {
                                "dataset": name,
                                "noise": f"{kind} {rate:.0%}",
                                "seed": seed,
                                "weights": wname,
                                "rule": rname,
                                "flagged": float(flagged.mean()),
                                "precision": precision_score(noisy, flagged, zero_division=0),
                                "recall": recall_score(noisy, flagged, zero_division=0),
                                "f1": f1_score(noisy, flagged, zero_division=0),
                                "auroc": auroc,
                                "true_rate": float(noisy.mean()),
                                "probe_rate": float(ev["probe_rate"]),
                            }
                        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    import pandas as pd

    load = os.getloadavg()[0]
    frame = pd.DataFrame(evaluate(args.quick, args.seeds))
    noisy = frame[frame["true_rate"] > 0]
    clean = frame[frame["true_rate"] == 0]
    f1 = noisy.pivot_table(index=["weights", "rule"], values="f1", aggfunc="mean")
    worst = noisy.pivot_table(index=["weights", "rule"], values="f1", aggfunc="min")
    flagged_clean = clean.pivot_table(index=["weights", "rule"], values="flagged", aggfunc="max")
    table = f1.rename(columns={"f1": "mean F1 (noisy)"})
    table["worst F1 (noisy)"] = worst["f1"]
    table["max share flagged (clean)"] = flagged_clean["flagged"]
    auroc = noisy.groupby("weights")["auroc"].mean().rename("mean AUROC")
    per_setting = noisy.pivot_table(
        index=["dataset", "noise"], columns=["weights", "rule"], values="f1", aggfunc="mean"
    )
    lines = [
        "# Flag rules on the development datasets",
        "",
        f"Command: `uv run python benchmarks/flag_rules.py {' '.join(argv or sys.argv[1:])}`; "
        f"seeds {args.seeds}; {platform.machine()}, {os.cpu_count()} cores, load {load:.2f}.",
        "",
        "Score weights are prediction : dynamics : knn (see `flags.label_issue_scores`).",
        "",
        "The library's default is weights `1:2(1-m):1` with `cj_count(probe+audit) & "
        "score>=0.5`. Rules that flag more than the confident joint counts (`score>=0.5`, or "
        "adding rows that both out-of-sample models put in another class) find more of the "
        "instance-dependent noise, which the confident joint under-counts, but they flag more "
        "rows of the clean tables (last column), and clean data must be left alone.",
        "",
        table.sort_values("mean F1 (noisy)", ascending=False).round(3).to_markdown(),
        "",
        auroc.round(4).to_markdown(),
        "",
        "## F1 per setting",
        "",
        per_setting.round(3).T.to_markdown(),
        "",
        "## Noise-rate estimates (probe, confident joint) against the truth",
        "",
        frame.drop_duplicates(["dataset", "noise", "seed"])[
            ["dataset", "noise", "seed", "true_rate", "probe_rate"]
        ]
        .round(3)
        .to_markdown(index=False),
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    name = "flag_rules_quick.md" if args.quick else "flag_rules.md"
    (args.out / name).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
