"""Choices about the label-issue score, scored on the real tables of the development pool.

The audit's flag rule was chosen on the generality benchmark's development datasets, which are
scikit-learn's and synthetic (benchmarks/evidence_choices.py). On real tables a linear model is
often as good as the audit's networks (benchmarks/results/real_tables.md), so the questions
that matter there are how much the networks' evidence should count against the linear
reference's. Each table of the development pool of benchmarks/real_tables.py runs once per
noise setting through `run_audit` with the library's defaults (its per-row evidence cached
under ``data/runs/evidence_real/``, with cleanlab + LR's flags on the same noisy labels), and
every alternative is scored on that same evidence:

* ``default``: the audit's rule (the ensemble of both networks of each fold and the linear
  reference, each family weighing by its skill; the in-sample trajectory weighing twice the
  prediction, scaled by its reliability; each class's highest scores up to the confident
  joint's count, if at least 0.5);
* ``dynamics 0`` / ``dynamics 1`` / ``dynamics 4``: the trajectory's weight instead of 2;
* ``linear only``: the prediction and the count read the linear reference alone, the
  trajectory kept; ``linear only, no dynamics``: the score is the linear reference's margin
  alone (cleanlab + LR's evidence under the audit's count and gate);
* ``linear if better``: ``linear only, no dynamics`` on a table where the linear reference
  predicts the given labels out of sample better than the networks (McNemar's z above 1 on the
  rows where exactly one of them is right), else the default;
* ``calibrated nets``: each network's probabilities temperature-scaled to the given labels
  (one temperature per network, fitted by log-loss) before the ensemble;
* ``accuracy-weighted``: the linear reference's share of the ensemble (0, 1/4, 1/2, 3/4 or 1;
  the networks hold the rest) chosen per table as the one whose out-of-sample prediction
  agrees most often with the given labels, ties going to 1/2 (the equal weights);
* ``equal weights``: the networks and the linear reference weigh half each in the ensemble
  (the default weighs each family by its skill, its balanced accuracy on the given labels out
  of sample above chance: `dm_audit.stage_results.FamilyWeights`);
* ``count from the networks``: the count reads the networks alone (the score the ensemble);
* ``every model doubts``: the default's flags plus every row that each out-of-sample model
  (the audit network, the probe, the linear reference) predicts as another class, whose
  ensemble margin leans away from its label and whose trajectory (where it weighs) never
  fitted it (mean p_i at most 0.5): annotator-like noise that the confident joint
  under-counts;
* ``gate: both lean`` / ``gate: argmax differs``: the default's flags, kept only where the
  ensemble margin and the trajectory both lean away from the given label, or where the
  ensemble predicts another class (cleanlab's last filter).

Test tables are never run here: benchmarks/real_tables.py reports on them.

    uv run --group bench --with pydataset python benchmarks/real_dev_choices.py
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from sklearn.metrics import f1_score, roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import siblings  # noqa: E402  (benchmarks/siblings.py: the sibling scripts' loader)

from dm_audit import flags  # noqa: E402

CACHE = ROOT / "data" / "runs" / "evidence_real"
RESULTS = ROOT / "benchmarks" / "results" / "real_dev_choices.md"
RATES = (0.0, 0.2, 0.4)
CACHE_VERSION = 1
KINDS = ("symmetric", "pair", "instance")
# The linear reference's shares of the ensemble `accuracy_weighted` chooses from: the
# equal weights' 1/2 and the quarters on either side, the networks alone and the reference alone.
ACCURACY_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def evidence(name: str, data: Any, setting: Any, noisy: np.ndarray) -> dict[str, np.ndarray]:
    """One default audit's evidence and cleanlab + LR's flags, from the cache when there."""
    ec = siblings.load("evidence_choices")
    g = siblings.load("generality")
    stem = f"{name}__{setting.name.replace(' ', '_')}__v{CACHE_VERSION}_{ec.code_key()}"
    path = CACHE / f"{stem}.npz"
    if (cached := ec.read_cached(path)) is not None:
        return cached
    out = ec.capture(data, noisy, 0) | {"given": noisy, "truth": data.labels}
    found: dict[str, np.ndarray] = {}

    def report(method: str, detection: Any, error: str | None) -> None:
        if detection is not None:
            found["lr_flags"] = np.asarray(detection.flags, dtype=bool)
            found["lr_scores"] = np.asarray(detection.scores, dtype=np.float64)

    g.run_methods(data, noisy, 0, ("cleanlab + LR",), report)
    out |= found
    ec.write_cached(path, out)
    return out


def temperature_scaled(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`probs` at the temperature that minimises the given labels' log-loss."""
    logp = np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0))
    rows = np.arange(labels.size)

    def scaled(log_t: float) -> np.ndarray:
        z = logp / np.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    best = minimize_scalar(
        lambda t: -scaled(t)[rows, labels].mean(),
        bounds=(np.log(0.05), np.log(100.0)),
        method="bounded",
    )
    return np.exp(scaled(float(best.x)))


def flag_rule(
    ev: dict[str, np.ndarray], probs: np.ndarray, dynamics_factor: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """The audit's score and flags with the prediction and the count read from `probs`, and
    the trajectory's weight times `dynamics_factor`."""
    ec = siblings.load("evidence_choices")
    weights = ec.audit_weights(ev)
    weights["dynamics"] *= dynamics_factor
    return ec.flag_rule(ev, probs, probs, weights)


def linear_probs(ev: dict[str, np.ndarray]) -> np.ndarray:
    """The linear reference's probabilities, float64; on the rows where it abstains (a class too
    small for it) the networks' mean, which is what the audit reads there."""
    ec = siblings.load("evidence_choices")
    linear = ev["reference"].astype(np.float64)
    abstains = np.isnan(linear[:, 0])
    if abstains.any():
        linear[abstains] = ec._mean_of(ev["probs"], ev["probe"])[abstains]
    return linear


def linear_better(ev: dict[str, np.ndarray]) -> bool:
    """Whether the linear reference predicts the given labels out of sample better than the
    networks: McNemar's z above 1 on the rows where exactly one of them is right."""
    ec = siblings.load("evidence_choices")
    given = ev["given"]
    nets_right = ec._mean_of(ev["probs"], ev["probe"]).argmax(axis=1) == given
    linear_right = linear_probs(ev).argmax(axis=1) == given
    only_linear = int((linear_right & ~nets_right).sum())
    only_nets = int((nets_right & ~linear_right).sum())
    return (only_linear - only_nets) / np.sqrt(max(only_linear + only_nets, 1)) > 1.0


def variants(ev: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every alternative's (score, flags) on one audit's evidence."""
    ec = siblings.load("evidence_choices")
    ensemble = ec.prediction_probs(ev, "ensemble").astype(np.float64)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {"default": flag_rule(ev, ensemble)}
    # The audit's trajectory weight is 2 (before the reliability scaling): factor w/2.
    for weight in (0.0, 1.0, 4.0):
        out[f"dynamics {weight:g}"] = flag_rule(ev, ensemble, weight / 2.0)
    given = ev["given"]
    networks = ec._mean_of(ev["probs"], ev["probe"]).astype(np.float64)
    out["count from the networks"] = ec.flag_rule(ev, ensemble, networks, ec.audit_weights(ev))
    score, flagged = out["default"]
    leaning = margin_leans(ensemble, given)
    unfitted = trajectory_unfitted(ev)
    out["every model doubts"] = (score, flagged | (every_model_doubts(ev) & leaning & unfitted))
    out["gate: both lean"] = (score, flagged & leaning & unfitted)
    out["gate: argmax differs"] = (score, flagged & (ensemble.argmax(axis=1) != given))
    if ev["reference"].size == 0:
        # No linear reference (a class too small for its folds): every variant that reads it
        # is the audit's own rule, as the audit would run it.
        return out | {name: out["default"] for name in VARIANTS if name not in out}
    linear = linear_probs(ev)
    out["linear only"] = flag_rule(ev, linear)
    out["linear only, no dynamics"] = flag_rule(ev, linear, 0.0)
    out["linear if better"] = (
        out["linear only, no dynamics"] if linear_better(ev) else out["default"]
    )
    nets = [temperature_scaled(ev["probs"], given)]
    if ev["probe"].size:
        nets.append(temperature_scaled(ev["probe"], given))
    calibrated = (np.mean(nets, axis=0) + linear) / 2.0
    out["calibrated nets"] = flag_rule(ev, calibrated)
    out["accuracy-weighted"] = flag_rule(ev, accuracy_weighted(networks, linear, given))
    out["equal weights"] = flag_rule(ev, (networks + linear) / 2.0)
    return out


def accuracy_weighted(
    networks: np.ndarray,
    linear: np.ndarray,
    given: np.ndarray,
    shares: Sequence[float] = ACCURACY_SHARES,
) -> np.ndarray:
    """The networks and the linear reference mixed with the linear reference's share in
    `shares` that predicts the given labels best out of sample (ties: the one nearest 1/2)."""
    right = {
        w: float(np.mean(((1 - w) * networks + w * linear).argmax(axis=1) == given)) for w in shares
    }
    best = max(right.values())
    share = min((w for w in shares if right[w] == best), key=lambda w: abs(w - 0.5))
    return (1 - share) * networks + share * linear


def margin_leans(probs: np.ndarray, given: np.ndarray) -> np.ndarray:
    """Rows whose label-issue score from `probs` alone (the normalised margin) leans towards
    another label: at least `flags.NEUTRAL_ISSUE_SCORE`."""
    rows = np.arange(given.size)
    margin = flags.label_issue_scores(probs[rows, given], probs, given, weights={"prediction": 1})
    return margin >= flags.NEUTRAL_ISSUE_SCORE


def trajectory_unfitted(ev: dict[str, np.ndarray]) -> np.ndarray:
    """Rows the in-sample trajectory never fitted (mean p_i at most 0.5, a row without one
    read at its p_i, as the audit does); every row when the audit gave the trajectory no
    weight (it then says nothing)."""
    mean_p = ev["mean_p"]
    if not mean_p.size or ev["issue_weights"][1] <= 0:
        return np.ones(ev["given"].size, dtype=bool)
    return np.where(np.isnan(mean_p), ev["p_given"], mean_p) <= 0.5


def every_model_doubts(ev: dict[str, np.ndarray]) -> np.ndarray:
    """Rows that every out-of-sample model of the audit predicts as another class."""
    given = ev["given"]
    models = [ev[name] for name in ("probs", "probe") if ev[name].ndim == 2]
    if ev["reference"].ndim == 2:
        models.append(linear_probs(ev))
    return np.all([p.argmax(axis=1) != given for p in models], axis=0)


VARIANTS = (
    "default",
    "dynamics 0",
    "dynamics 1",
    "dynamics 4",
    "linear only",
    "linear only, no dynamics",
    "linear if better",
    "calibrated nets",
    "accuracy-weighted",
    "equal weights",
    "count from the networks",
    "every model doubts",
    "gate: both lean",
    "gate: argmax differs",
)


def measure(ev: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    wrong = ev["given"] != ev["truth"]
    found = variants(ev)
    if "lr_flags" in ev:
        found["cleanlab + LR"] = (ev["lr_scores"], ev["lr_flags"].astype(bool))
    rows = []
    for name, (score, flagged) in found.items():
        row: dict[str, Any] = {"variant": name, "flagged": float(flagged.mean())}
        if wrong.any():
            row["f1"] = float(f1_score(wrong, flagged))
            row["auroc"] = float(roc_auc_score(wrong, score))
        rows.append(row)
    return rows


def run(names: Sequence[str], progress: Callable[[str], None]) -> pd.DataFrame:
    g = siblings.load("generality")
    rt = siblings.load("real_tables")
    records = []
    for name in names:
        data, _ = rt.build(name)
        confusion = None
        for setting in g.settings(g.NOISE_KINDS, RATES):
            if setting.kind == "instance" and confusion is None:
                confusion = g.confusion_probs(data, 0)
            noisy = g.make_noisy(data, setting, 0, confusion)
            ev = evidence(name, data, setting, noisy)
            for row in measure(ev):
                records.append({"dataset": name, "noise": setting.name, **row})
            progress(f"{name:10s} {setting.name:14s} done")
    return pd.DataFrame(records)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    order = [*VARIANTS, "cleanlab + LR"]
    noisy = frame[frame["noise"] != "clean"].copy()
    noisy["kind"] = noisy["noise"].str.split().str[0]
    columns: dict[str, pd.Series] = {}
    for kind in KINDS:
        part = noisy[noisy["kind"] == kind].groupby("variant")
        columns[f"F1 {kind}"] = part["f1"].mean()
    grouped = noisy.groupby("variant")
    columns["F1 all"] = grouped["f1"].mean()
    columns["AUROC all"] = grouped["auroc"].mean()
    columns["flagged, as given"] = (
        frame[frame["noise"] == "clean"].groupby("variant")["flagged"].mean()
    )
    return pd.DataFrame(columns).reindex(order).round(4)


def synthetic_dev(progress: Callable[[str], None]) -> pd.DataFrame:
    """The same variants on the generality benchmark's development datasets: the audits that
    benchmarks/evidence_choices.py cached for the current code (none: an empty frame)."""
    ec = siblings.load("evidence_choices")
    records = []
    for path in sorted(ec.CACHE.glob(f"*__v{ec.CACHE_VERSION}_{ec.code_key()}.npz")):
        dataset, noise = path.name.split("__")[:2]
        with np.load(path, allow_pickle=False) as stored:
            ev = dict(stored)
        for row in measure(ev):
            records.append({"dataset": dataset, "noise": noise.replace("_", " "), **row})
    progress(f"{len(records) // max(len(VARIANTS), 1)} cached synthetic-dev audits scored")
    return pd.DataFrame(records)


def write(
    frame: pd.DataFrame, synthetic: pd.DataFrame, out: Path, load: float, seconds: float
) -> None:
    table = frame[frame["noise"] != "clean"].pivot_table(
        index=["dataset", "noise"], columns="variant", values="f1", sort=False
    )
    table = table.reindex(columns=[c for c in [*VARIANTS, "cleanlab + LR"] if c in table])
    lines = [
        "# Label-issue score choices on the real development tables",
        "",
        "Command: `uv run --group bench --with pydataset python benchmarks/real_dev_choices.py` "
        f"(seed 0); {platform.machine()}, {os.cpu_count()} cores; load average {load:.2f} at "
        f"the start; {seconds:.0f} s (audits cached under `data/runs/evidence_real/` are read "
        "back, not rerun).",
        "",
        "Each setting is one default audit of a table of the development pool of "
        "`benchmarks/real_tables.py` (`--split dev`); every variant is scored on that audit's "
        "evidence (see the script's docstring), beside cleanlab + LR on the same noisy labels. "
        "The truth is the table's own label: on the table as given every flag counts as a "
        "false alarm, though some of those labels are wrong.",
        "",
        "## Means over the tables (20-40 % noise; share flagged on the tables as given)",
        "",
        summary(frame).to_markdown(),
        "",
        "The same variants on the generality benchmark's development datasets (scikit-learn's "
        "and synthetic; the audits `benchmarks/evidence_choices.py` cached for this code), "
        "where the defaults were chosen:",
        "",
        summary(synthetic).drop(index="cleanlab + LR").to_markdown()
        if len(synthetic)
        else "(none cached: run `benchmarks/evidence_choices.py` first)",
        "",
        "<details><summary>F1 of every setting</summary>",
        "",
        table.round(3).to_markdown(),
        "",
        "</details>",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> None:
    rt = siblings.load("real_tables")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets", nargs="+", default=list(rt.DEV_TABLES), choices=list(rt.DEV_TABLES)
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # the audits' notes on small tables and filled gaps
    load = os.getloadavg()[0]
    start = time.perf_counter()
    progress = lambda line: print(line, flush=True)  # noqa: E731
    frame = run(args.datasets, progress)
    write(frame, synthetic_dev(progress), args.out, load, time.perf_counter() - start)


if __name__ == "__main__":
    main()
