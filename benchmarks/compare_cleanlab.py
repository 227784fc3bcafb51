"""dm-audit against confident learning (cleanlab) on data whose truth is known.

Every method uses the same model family and training recipe (`dm_audit.training.fit`, MLP):

* dm-audit: the whole audit with its defaults (probe, DM training, flags, corrections, retrain);
* cleanlab `find_label_issues` on 5-fold out-of-sample probabilities of the model trained with
  cross entropy (5 trainings), label quality scores for the AUROC;
* cleanlab `CleanLearning`: the same 5 folds, prune, then retrain (6 trainings);
* plain cross entropy on the noisy labels, for reference.

cleanlab is a benchmark-only dependency (the ``bench`` dependency group; `dm_audit` never imports
it)::

    uv run --group bench python benchmarks/compare_cleanlab.py            # 3 noise kinds, 3 seeds
    uv run --group bench python benchmarks/compare_cleanlab.py --quick    # 40 % symmetric, seed 0
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import f1_score, roc_auc_score

from dm_audit.audit import AuditConfig, run_audit
from dm_audit.noise import add_noise
from dm_audit.sources import load_source
from dm_audit.training import TrainConfig, fit, predict_proba

RESULTS = Path(__file__).parent / "results"
NOISE = {
    "symmetric 20%": {"kind": "symmetric", "rate": 0.2},
    "symmetric 40%": {"kind": "symmetric", "rate": 0.4},
    "pair 20%": {"kind": "pair", "rate": 0.2},
}


class RecipeClassifier(ClassifierMixin, BaseEstimator):
    """The audit's training recipe with cross entropy, as a scikit-learn classifier for cleanlab."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None):
        self.classes_ = np.unique(y)
        codes = np.searchsorted(self.classes_, y)
        config = TrainConfig(loss="cce", seed=self.seed, progress=False)
        self.model_ = fit(x.astype(np.float32), codes, config, num_classes=len(self.classes_)).model
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        probs, _ = predict_proba(self.model_, x.astype(np.float32), device="cpu")
        return probs

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(x).argmax(axis=1)]


def run(noise: str, seed: int) -> dict[str, dict[str, float]]:
    from cleanlab.classification import CleanLearning
    from cleanlab.count import estimate_cv_predicted_probabilities
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    dataset = add_noise(load_source("digits", seed=seed), seed=seed, **NOISE[noise])
    train, test = dataset.train(), dataset.test()
    x, y = train.inputs(), train.label_codes()
    xt, yt = test.inputs(), test.label_codes()
    noisy = y != train.true_label_codes()
    out: dict[str, dict[str, float]] = {}

    start = time.perf_counter()
    report = run_audit(dataset, AuditConfig(seed=seed, progress=False))
    truth = report.summary["against_truth"]
    out["dm-audit (flag, correct, retrain)"] = {
        "f1": truth["label_issues"]["f1"],
        "auroc": truth["label_issues"]["auroc"],
        "test": report.summary["quality"]["test_accuracy_after"],
        "seconds": time.perf_counter() - start,
        "trainings": 3,
    }

    start = time.perf_counter()
    pred_probs = estimate_cv_predicted_probabilities(
        x, y, clf=RecipeClassifier(seed), cv_n_folds=5, seed=seed
    )
    issues = find_label_issues(y, pred_probs)
    quality = get_label_quality_scores(y, pred_probs)
    out["cleanlab find_label_issues (5-fold CCE)"] = {
        "f1": float(f1_score(noisy, issues)),
        "auroc": float(roc_auc_score(noisy, -quality)),
        "test": float("nan"),
        "seconds": time.perf_counter() - start,
        "trainings": 5,
    }

    start = time.perf_counter()
    learner = CleanLearning(RecipeClassifier(seed), cv_n_folds=5, seed=seed).fit(x, y)
    out["cleanlab CleanLearning (prune, retrain)"] = {
        "f1": float(f1_score(noisy, learner.label_issues_df["is_label_issue"].to_numpy())),
        "auroc": float("nan"),
        "test": float(np.mean(learner.predict(xt) == yt)),
        "seconds": time.perf_counter() - start,
        "trainings": 6,
    }

    start = time.perf_counter()
    plain = RecipeClassifier(seed).fit(x, y)
    out["plain CCE"] = {
        "f1": float("nan"),
        "auroc": float("nan"),
        "test": float(np.mean(plain.predict(xt) == yt)),
        "seconds": time.perf_counter() - start,
        "trainings": 1,
    }
    return out


def _cell(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if not np.isnan(v)]
    if not values:
        return "–"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="symmetric 40 %, seed 0")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    args = parser.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    scenarios = ["symmetric 40%"] if args.quick else list(NOISE)
    lines = [
        "# dm-audit against cleanlab on digits",
        "",
        f"Command: `uv run --group bench python benchmarks/compare_cleanlab.py"
        f"{' --quick' if args.quick else ''}`. Seeds {seeds}; 70/30 stratified split; the same "
        "MLP and recipe for every method; mean ± std. Seconds include every training.",
        "",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} torch threads, "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}.",
        "",
    ]
    for noise in scenarios:
        runs = [run(noise, seed) for seed in seeds]
        lines += [
            f"## {noise}",
            "",
            "| method | trainings | detection F1 | detection AUROC | test accuracy | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for method in runs[0]:
            rows = [r[method] for r in runs]
            lines.append(
                f"| {method} | {rows[0]['trainings']} | {_cell([r['f1'] for r in rows])} | "
                f"{_cell([r['auroc'] for r in rows])} | {_cell([r['test'] for r in rows])} | "
                f"{_cell([r['seconds'] for r in rows], 1)} |"
            )
        lines.append("")
        print("\n".join(lines[-len(runs[0]) - 4 :]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("compare_cleanlab_quick.md" if args.quick else "compare_cleanlab.md")
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
