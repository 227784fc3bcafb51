"""Choices the flag and correction stages make from each row's evidence, measured offline.

Every development dataset of benchmarks/generality.py runs once per noise setting through
`run_audit` with the library's defaults; each row's evidence is kept (cached under
``data/runs/evidence/``) and the alternatives are scored on that same evidence, so a difference
between two of them is the choice's alone, not a retraining's:

* **Which probabilities the label-issue score's prediction reads**: the audit network mixed
  with the linear reference (`ExampleScores.combined_probs`), or both networks of each fold,
  the probe's too, mixed with it (`ensemble_probs`, what the noise count reads: the default);
  either family weighs by its skill (`ExampleScores.family_weights`; benchmarks/family_weights.py
  compares that with equal weights).
  Flags follow the audit's rule: each class's highest scores up to the confident joint's count,
  if at least 0.5.
* **Whether a flagged row may be suggested its own given label**: the default leaves it out
  (`correction.suggest_labels(given=..., flagged=...)`). Measured at 20 % noise: the share of
  correctly flagged rows whose suggestion is the true label (leaving the given label out can
  only raise it: it is wrong on those rows), and the same share over every flagged row (the
  wrongly flagged ones included, whose own label was right); and the label accuracy after the
  automatic corrections (confidence at least the default, never a runner-up to the given
  label; the correction gate and the OOD review limit are not applied here).
* **How many to flag**: the confident joint's count per class (the default), or every row whose
  score leans towards another label (at least 0.5, what ``--threshold 0.5`` asks for): the
  count holds the flags on clean tables down, the threshold finds the instance-dependent noise
  that the confident joint under-counts.
* **Whether the neighbours' labels weigh in the score**: the default leaves the kNN label
  agreement out of `label_issue_score` (weight 0); ``knn 1`` gives it the weight of the
  prediction, as before. The count is the same either way; only the ranking within each class
  (and the score's AUROC) moves.
* **Which probabilities rank a flagged row's suggested class**: the combined prediction, or the
  ensemble the score reads (the default); the suggestion's confidence, which the automatic
  corrections compare with their floor, is the combined prediction's either way.

Test datasets are never run here: the generality benchmark reports on them.

    uv run --group bench python benchmarks/evidence_choices.py
    uv run --group bench python benchmarks/evidence_choices.py --datasets digits synth-tiny-wide
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import siblings  # noqa: E402  (benchmarks/siblings.py: the sibling scripts' loader)

from dm_audit import correction, estimate, flags  # noqa: E402
from dm_audit.config import AuditConfig  # noqa: E402
from dm_audit.crossfit import CROSSFIT_FOLDS  # noqa: E402
from dm_audit.stage_correction import SUGGESTION_TEMPERATURE  # noqa: E402

CACHE = ROOT / "data" / "runs" / "evidence"
RESULTS = ROOT / "benchmarks" / "results" / "evidence_choices.md"
RATES = (0.0, 0.2, 0.4)
# The cache's format; a change of what is kept bumps it so stale files are not read.
CACHE_VERSION = 2
SOURCES = ("combined", "ensemble")


def generality_module() -> ModuleType:
    """``benchmarks/generality.py``: its datasets, noise and split are shared."""
    return siblings.load("generality")


def _mean_of(a: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """As `ExampleScores` averages (`dm_audit.stage_results.mean_of`); an empty `b` (a model the
    cached audit went without) counts as missing."""
    from dm_audit.stage_results import mean_of

    return mean_of(a, None if b is None or b.size == 0 else b)


def code_key() -> str:
    """What the cached audits depend on besides the data: the library's code and the thread
    count (small tables' trainings differ between one and two threads)."""
    import torch

    digest = hashlib.sha256()
    for path in sorted((ROOT / "dm_audit").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(f"threads={torch.get_num_threads()}".encode())
    return digest.hexdigest()[:12]


def capture(data: Any, noisy: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """One default audit's per-row evidence, up to the flags (no retrain, no report)."""
    from dm_audit.audit import AuditConfig, run_audit

    dataset = generality_module().with_labels(data.dataset, noisy)
    kept: dict[str, np.ndarray] = {}

    def on_stage(name: str, result: Any) -> None:
        if name == "scores":
            table = result.table
            kept["probs"] = np.asarray(result.probs)
            kept["probe"] = _array(result.probe_probs)
            kept["reference"] = _array(result.reference_probs)
            kept["mean_p"] = table["mean_p"].to_numpy() if "mean_p" in table else np.zeros(0)
            kept["p_given"] = table["p_given"].to_numpy()
        elif name == "flags":
            kept["knn"] = result.table["knn_agreement"].to_numpy()
            kept["votes"] = np.asarray(result.knn_votes)
            kept["score"] = result.table["label_issue_score"].to_numpy()
            kept["is_issue"] = result.table["is_label_issue"].to_numpy(dtype=bool)
            weights = result.issue_weights
            kept["issue_weights"] = np.array(
                [weights.get(name, 0.0) for name in ("prediction", "dynamics", "knn")]
            )

    run_audit(dataset, AuditConfig(progress=False, seed=seed, retrain=False), on_stage=on_stage)
    return kept


def _array(value: np.ndarray | None) -> np.ndarray:
    return np.zeros(0) if value is None else np.asarray(value)


def evidence(spec: Any, setting: Any, seed: int, workdir: Path) -> dict[str, np.ndarray]:
    """The evidence of one dataset and setting, from the cache when it is there."""
    name = f"{spec.name}__{setting.name.replace(' ', '_')}__seed{seed}"
    path = CACHE / f"{name}__v{CACHE_VERSION}_{code_key()}.npz"
    if (cached := read_cached(path)) is not None:
        return cached
    g = generality_module()
    data = spec.build(workdir, seed)
    probs = g.confusion_probs(data, seed) if setting.kind == "instance" else None
    noisy = g.make_noisy(data, setting, seed, probs)
    start = time.perf_counter()
    out = capture(data, noisy, seed) | {
        "given": noisy,
        "truth": data.labels,
        "seconds": np.float64(time.perf_counter() - start),
    }
    write_cached(path, out)
    return out


def read_cached(path: Path) -> dict[str, np.ndarray] | None:
    """A cached audit's evidence (plain arrays, never pickles), or None when not cached."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as stored:
        return dict(stored)


def write_cached(path: Path, evidence: dict[str, np.ndarray]) -> None:
    """Keep an audit's evidence at `path`, written whole, then renamed: a run killed mid-write
    leaves no torn file to read back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as handle:
        np.savez(handle, **evidence)
    os.replace(partial, path)


def prediction_probs(ev: dict[str, np.ndarray], source: str) -> np.ndarray:
    """The probabilities a score variant reads: ``combined`` or ``ensemble``, each network
    family mixed with the linear reference by their skill, as `ExampleScores` mixes them."""
    from dm_audit.stage_results import skill_weighted

    reference = ev["reference"] if ev["reference"].size else None
    if source == "combined":
        return skill_weighted(ev["probs"], reference, ev["given"])
    if source == "ensemble":
        return skill_weighted(_mean_of(ev["probs"], ev["probe"]), reference, ev["given"])
    raise ValueError(f"unknown source {source!r} (choose from {list(SOURCES)})")


def issue_flags(
    ev: dict[str, np.ndarray], source: str, knn_weight: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The label-issue score with its prediction read from `source`, and the audit's flags on it.

    `knn_weight` replaces the audit's weight of the neighbours' label agreement. The count is
    the confident joint of the ensemble, as in the audit; rows flagged only by a
    duplicate conflict are not reproduced (none of the development tables has one; `measure`
    checks that the default reproduces the audit's flags).
    """
    weights = audit_weights(ev)
    if knn_weight is not None:
        weights["knn"] = knn_weight
    return flag_rule(ev, prediction_probs(ev, source), prediction_probs(ev, "ensemble"), weights)


def audit_weights(ev: dict[str, np.ndarray]) -> dict[str, float]:
    """The component weights the audit used (the trajectory's already scaled by its
    reliability)."""
    return dict(zip(("prediction", "dynamics", "knn"), ev["issue_weights"].tolist(), strict=True))


def flag_rule(
    ev: dict[str, np.ndarray],
    probs: np.ndarray,
    count_probs: np.ndarray,
    weights: dict[str, float],
) -> tuple[np.ndarray, np.ndarray]:
    """The audit's rule on one audit's evidence: the label-issue score with its prediction read
    from `probs` and these component `weights`, and in each class the highest scores up to the
    confident joint's count of `count_probs`, if at least 0.5."""
    given = ev["given"]
    rows = np.arange(given.size)
    mean_p = ev["mean_p"] if ev["mean_p"].size else None
    if mean_p is not None:
        mean_p = np.where(np.isnan(mean_p), ev["p_given"], mean_p)
    score = flags.label_issue_scores(
        probs[rows, given], probs, given, mean_p=mean_p, knn_agreement=ev["knn"], weights=weights
    )
    noise = estimate.estimate_noise(count_probs, given, min_class_rows=CROSSFIT_FOLDS)
    counts = flags.issue_counts_per_class(noise, given)
    flagged = flags.flag_by_class_counts(score, given, counts) & (
        score >= flags.NEUTRAL_ISSUE_SCORE
    )
    return score, flagged


def suggestions(
    ev: dict[str, np.ndarray], flagged: np.ndarray, exclude_given: bool, ranking: str = "ensemble"
) -> tuple[np.ndarray, np.ndarray]:
    """The audit's suggestions: the class ranked first by `ranking`'s prediction (tempered,
    with the neighbours' votes), its confidence read from the combined prediction."""
    return correction.suggest_labels(
        prediction_probs(ev, ranking),
        temperature=SUGGESTION_TEMPERATURE,
        knn_votes=ev["votes"],
        given=ev["given"] if exclude_given else None,
        flagged=flagged if exclude_given else None,
        confidence_probs=prediction_probs(ev, "combined"),
    )


def measure(ev: dict[str, np.ndarray]) -> dict[str, float]:
    """Every variant's figures on one dataset and setting."""
    wrong = ev["given"] != ev["truth"]
    out: dict[str, float] = {"noise": float(wrong.mean())}
    for source in SOURCES:
        score, flagged = issue_flags(ev, source)
        out[f"flagged {source}"] = float(flagged.mean())
        if wrong.any():
            out[f"f1 {source}"] = float(f1_score(wrong, flagged))
            out[f"auroc {source}"] = float(roc_auc_score(wrong, score))
    knn_score, knn_flagged = issue_flags(ev, "ensemble", knn_weight=1.0)
    out["flagged knn 1"] = float(knn_flagged.mean())
    if wrong.any():
        out["f1 knn 1"] = float(f1_score(wrong, knn_flagged))
        out["auroc knn 1"] = float(roc_auc_score(wrong, knn_score))
    score, flagged = issue_flags(ev, "ensemble")
    leaning = score >= flags.NEUTRAL_ISSUE_SCORE
    out["flagged leaning"] = float(leaning.mean())
    if wrong.any():
        out["f1 leaning"] = float(f1_score(wrong, leaning))
    if not np.array_equal(flagged, ev["is_issue"]):
        raise SystemExit(
            "the default rule no longer reproduces the audit's flags: update issue_flags"
        )
    caught = flagged & wrong
    floor = AuditConfig().min_correction_confidence
    for ranking in SOURCES:
        first, _ = suggestions(ev, flagged, exclude_given=False, ranking=ranking)
        for exclude in (False, True):
            if ranking == "combined" and not exclude:
                continue  # the ranking is compared with the default exclusion only
            name = ("excluded" if exclude else "allowed") + (
                "" if ranking == "ensemble" else " combined"
            )
            suggested, confidence = suggestions(ev, flagged, exclude, ranking)
            right = suggested == ev["truth"]
            if caught.any():
                out[f"suggestion acc {name}"] = float(right[caught].mean())
            if flagged.any():
                out[f"suggestion acc all flagged {name}"] = float(right[flagged].mean())
            changed = (suggested != ev["given"]) & (first != ev["given"])
            auto = flagged & changed & (confidence >= floor)
            after = np.where(auto, suggested, ev["given"])
            out[f"labels right after {name}"] = float((after == ev["truth"]).mean())
    return out


def summary(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The results table's lines: one row per setting, then the means."""

    def fmt(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.3f}" if key in row else "–"

    keys = [
        "flagged combined",
        "flagged ensemble",
        "f1 combined",
        "f1 ensemble",
        "flagged leaning",
        "f1 leaning",
        "f1 knn 1",
        "auroc combined",
        "auroc knn 1",
        "auroc ensemble",
        "suggestion acc excluded combined",
        "suggestion acc allowed",
        "suggestion acc excluded",
        "suggestion acc all flagged allowed",
        "suggestion acc all flagged excluded",
        "labels right after excluded combined",
        "labels right after allowed",
        "labels right after excluded",
    ]
    lines = [
        "| dataset | noise | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for row in rows:
        cells = [fmt(row, key) for key in keys]
        lines.append(f"| {row['dataset']} | {row['setting']} | " + " | ".join(cells) + " |")
    noisy = [r for r in rows if r["noise"] > 0]
    clean = [r for r in rows if r["noise"] == 0]
    at20 = [r for r in noisy if r["setting"].endswith("20%")]

    def mean(group: Sequence[dict[str, Any]], key: str) -> str:
        values = [r[key] for r in group if key in r]
        return f"{np.mean(values):.4f}" if values else "–"

    def least(group: Sequence[dict[str, Any]], key: str) -> str:
        values = [r[key] for r in group if key in r]
        return f"{np.min(values):.4f}" if values else "–"

    def most(group: Sequence[dict[str, Any]], key: str) -> str:
        values = [r[key] for r in group if key in r]
        return f"{np.max(values):.4f}" if values else "–"

    lines += [
        "",
        "| measure | combined / allowed | ensemble / excluded |",
        "|---|---|---|",
        f"| mean F1, 20-40 % noise | {mean(noisy, 'f1 combined')} | {mean(noisy, 'f1 ensemble')} |",
        f"| mean AUROC, 20-40 % noise | {mean(noisy, 'auroc combined')} | "
        f"{mean(noisy, 'auroc ensemble')} |",
        f"| mean share flagged, clean | {mean(clean, 'flagged combined')} | "
        f"{mean(clean, 'flagged ensemble')} |",
        f"| mean suggestion accuracy, 20 % noise | {mean(at20, 'suggestion acc allowed')} | "
        f"{mean(at20, 'suggestion acc excluded')} |",
        "| the same over every flagged row, 20 % noise | "
        f"{mean(at20, 'suggestion acc all flagged allowed')} | "
        f"{mean(at20, 'suggestion acc all flagged excluded')} |",
        f"| mean labels right after the corrections | {mean(rows, 'labels right after allowed')}"
        f" | {mean(rows, 'labels right after excluded')} |",
        "",
        "Which prediction ranks a flagged row's suggested class (its own label excluded; the "
        "confidence always read from the combined prediction):",
        "",
        "| measure | combined | ensemble |",
        "|---|---|---|",
        f"| mean suggestion accuracy, 20 % noise | "
        f"{mean(at20, 'suggestion acc excluded combined')} | "
        f"{mean(at20, 'suggestion acc excluded')} |",
        f"| lowest suggestion accuracy, 20 % noise | "
        f"{least(at20, 'suggestion acc excluded combined')} | "
        f"{least(at20, 'suggestion acc excluded')} |",
        f"| mean labels right after the corrections | "
        f"{mean(rows, 'labels right after excluded combined')} | "
        f"{mean(rows, 'labels right after excluded')} |",
        "",
        "Whether the neighbours' label agreement weighs in the score: weight 0 (the default) or "
        "1 (as much as the prediction), on the same audits, per dataset:",
        "",
        "| dataset | mean F1 knn 0 | mean F1 knn 1 | mean AUROC knn 0 | mean AUROC knn 1 | "
        "mean share flagged clean, knn 0 / 1 |",
        "|---|---|---|---|---|---|",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        group = [r for r in noisy if r["dataset"] == dataset]
        plain = [r for r in clean if r["dataset"] == dataset]
        lines.append(
            f"| {dataset} | {mean(group, 'f1 ensemble')} | {mean(group, 'f1 knn 1')} | "
            f"{mean(group, 'auroc ensemble')} | {mean(group, 'auroc knn 1')} | "
            f"{mean(plain, 'flagged ensemble')} / {mean(plain, 'flagged knn 1')} |"
        )
    lines += [
        f"| all | {mean(noisy, 'f1 ensemble')} | {mean(noisy, 'f1 knn 1')} | "
        f"{mean(noisy, 'auroc ensemble')} | {mean(noisy, 'auroc knn 1')} | "
        f"{mean(clean, 'flagged ensemble')} / {mean(clean, 'flagged knn 1')} |",
        "",
        "How many to flag: each class's most suspicious rows up to the confident joint's count "
        "(the default), or every row whose score is at least 0.5 (``--threshold 0.5``):",
        "",
        "| measure | confident joint's count | score at least 0.5 |",
        "|---|---|---|",
    ]
    for kind in ("symmetric", "pair", "instance"):
        group = [r for r in noisy if r["setting"].startswith(kind)]
        lines.append(
            f"| mean F1, {kind} 20-40 % | {mean(group, 'f1 ensemble')} | "
            f"{mean(group, 'f1 leaning')} |"
        )
    lines += [
        f"| mean F1, 20-40 % noise | {mean(noisy, 'f1 ensemble')} | {mean(noisy, 'f1 leaning')} |",
        f"| mean share flagged, clean | {mean(clean, 'flagged ensemble')} | "
        f"{mean(clean, 'flagged leaning')} |",
        f"| largest share flagged, clean | {most(clean, 'flagged ensemble')} | "
        f"{most(clean, 'flagged leaning')} |",
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=None, help="development datasets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    g = generality_module()
    specs = [s for s in g.DATASETS if s.split == "dev"]
    if args.datasets:
        unknown = sorted(set(args.datasets) - {s.name for s in specs})
        if unknown:
            raise SystemExit(f"not development datasets: {unknown}")
        specs = [s for s in specs if s.name in args.datasets]
    load = os.getloadavg()
    start = time.perf_counter()
    rows = []
    workdir = CACHE / "inputs"
    workdir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        for setting in g.settings(g.NOISE_KINDS, RATES):
            ev = evidence(spec, setting, args.seed, workdir)
            rows.append({"dataset": spec.name, "setting": setting.name} | measure(ev))
            print(f"{spec.name:24s} {setting.name:14s} done", flush=True)
    header = [
        "# Evidence choices on the development datasets",
        "",
        f"Command: `uv run --group bench python benchmarks/evidence_choices.py"
        f"{' --datasets ' + ' '.join(args.datasets) if args.datasets else ''}` (seed "
        f"{args.seed}); {platform.machine()}, {os.cpu_count()} cores; load average "
        f"{load[0]:.2f} at the start; {time.perf_counter() - start:.0f} s (audits cached under "
        "`data/runs/evidence/` are read back, not rerun).",
        "",
        "Each setting is one default audit of a development dataset of "
        "`benchmarks/generality.py`; every variant is scored on that audit's evidence. "
        "`combined`: the label-issue score's prediction reads the audit network with the linear "
        "reference; `ensemble` (the default): both networks of each fold with it. "
        "Suggestions: `allowed` lets a flagged row be suggested its own label, `excluded` (the "
        "default) does not; the class is ranked by the ensemble (the default) or, in the columns "
        "ending `combined`, by the combined prediction; the confidence is the combined "
        "prediction's either way. Labels right after: the share of rows whose label is the true "
        "one after the automatic corrections.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header + summary(rows)) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
