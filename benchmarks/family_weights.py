"""How the ensemble weighs the networks against the linear reference: by skill, or half each.

The flags, the noise count and the suggested labels read an ensemble of two model families: the
cross-fitted networks (the audit's and the probe's) and the linear reference
(`dm_audit.linear_reference`). The default weighs each family by its skill, its balanced
accuracy on the given labels out of sample above chance (`dm_audit.stage_results.FamilyWeights`);
the alternative is half each, the rule before. Both are scored on the same audits (each row's
evidence, cached by benchmarks/evidence_choices.py), so a difference is the weighting's alone:

* ``dev datasets``: the feature tables of benchmarks/generality.py's development split, clean
  and at 20 / 40 % symmetric, pair and instance-dependent noise;
* ``small, one cluster`` and ``small, two clusters``: `make_classification` tables of 80 to 200
  rows, six seeds each, clean and at 20 % of each noise: the size where a network that learns
  from half of the rows is least sure to learn anything (two clusters per class: classes no
  single line separates, which costs the linear reference more than the networks).

Besides the flags (F1, AUROC, share of a clean table flagged), each weighting's suggestions:
the share of correctly flagged rows whose suggested label is the true one, and the share of
labels right after the automatic corrections (a suggestion at least as confident as the
default floor, read from the audit network mixed with the reference by the same weights; the
correction gate is not applied here).

cleanlab + LR runs on the same noisy labels for scale. Test datasets are never run here.

    uv run --group bench python benchmarks/family_weights.py
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import results_file  # benchmarks/results_file.py: provenance and writing
import siblings  # benchmarks/siblings.py: the sibling scripts' loader
from sklearn.datasets import make_classification
from sklearn.metrics import f1_score, roc_auc_score

from dm_audit import correction
from dm_audit.config import AuditConfig
from dm_audit.stage_correction import SUGGESTION_TEMPERATURE
from dm_audit.stage_results import family_weights, mean_of, mix_families

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "family_weights.md"
WEIGHTINGS = ("skill", "equal")
# (rows, features, classes, informative features, class separation) of the small tables.
SMALL_SHAPES = ((80, 4, 2, 3, 1.5), (80, 10, 3, 5, 1.5), (150, 8, 2, 4, 1.0), (200, 20, 4, 8, 1.5))
SMALL_SEEDS = 6


def small_table(shape: Sequence[float], clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One seeded `make_classification` table of `shape` (see `SMALL_SHAPES`)."""
    rows, features, classes, informative, separation = shape
    return make_classification(
        n_samples=int(rows),
        n_features=int(features),
        n_informative=int(informative),
        n_redundant=0,
        n_classes=int(classes),
        n_clusters_per_class=clusters,
        class_sep=float(separation),
        flip_y=0.0,
        random_state=seed,
    )


def _small_spec(shape: Sequence[float], clusters: int) -> SimpleNamespace:
    """A dataset spec as evidence_choices caches by: a name and ``build(workdir, seed)``."""
    g = siblings.load("generality")
    rows, features, classes = (int(v) for v in shape[:3])

    def build(workdir: Path, seed: int) -> Any:
        x, y = small_table(shape, clusters, seed)
        return g._from_matrix(x, y, [f"k{c}" for c in range(classes)], "small")

    return SimpleNamespace(name=f"small-{rows}x{features}-{classes}c-{clusters}k", build=build)


def weightings(ev: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each weighting's (ensemble, confidence) probabilities: the ensemble the flags, the
    count and the suggested class read (both networks with the reference), and the audit
    network with the reference, which a suggestion's confidence reads."""
    ec = siblings.load("evidence_choices")
    networks = ec._mean_of(ev["probs"], ev["probe"])
    reference = ev["reference"] if ev["reference"].size else None
    weights = family_weights(networks, reference, ev["given"])
    return {
        "skill": (
            mix_families(networks, reference, weights),
            mix_families(ev["probs"], reference, weights),
        ),
        "equal": (mean_of(networks, reference), mean_of(ev["probs"], reference)),
    }


def reference_share(ev: dict[str, np.ndarray]) -> float | None:
    ec = siblings.load("evidence_choices")
    reference = ev["reference"] if ev["reference"].size else None
    weights = family_weights(ec._mean_of(ev["probs"], ev["probe"]), reference, ev["given"])
    return None if weights is None else weights.reference_share


def measure(ev: dict[str, np.ndarray]) -> dict[str, Any]:
    """Each weighting's flags and suggestions on one audit's evidence."""
    ec = siblings.load("evidence_choices")
    given, truth = ev["given"], ev["truth"]
    wrong = given != truth
    floor = AuditConfig().min_correction_confidence
    out: dict[str, Any] = {"reference_share": reference_share(ev)}
    for name, (ensemble, confident) in weightings(ev).items():
        score, flagged = ec.flag_rule(ev, ensemble, ensemble, ec.audit_weights(ev))
        out[f"flagged {name}"] = float(flagged.mean())
        suggested, confidence = correction.suggest_labels(
            ensemble,
            temperature=SUGGESTION_TEMPERATURE,
            knn_votes=ev["votes"],
            given=given,
            flagged=flagged,
            confidence_probs=confident,
        )
        applied = flagged & (suggested != given) & (confidence >= floor)
        out[f"right after {name}"] = float((np.where(applied, suggested, given) == truth).mean())
        if wrong.any():
            out[f"f1 {name}"] = float(f1_score(wrong, flagged))
            out[f"auroc {name}"] = float(roc_auc_score(wrong, score))
            if (caught := flagged & wrong).any():
                out[f"suggestion {name}"] = float((suggested[caught] == truth[caught]).mean())
    return out


def _cleanlab_lr(data: Any, noisy: np.ndarray, seed: int) -> dict[str, Any]:
    g = siblings.load("generality")
    found: dict[str, Any] = {}
    g.run_methods(data, noisy, seed, [g.CL_LR], lambda m, d, e: found.__setitem__(m, d))
    if found.get(g.CL_LR) is None:
        return {}
    measured = g.measure(found[g.CL_LR], noisy, data.labels)
    return {"f1 cleanlab + LR": measured["f1"], "flagged cleanlab + LR": measured["flagged_share"]}


def jobs(seed: int) -> list[tuple[str, Any, Any, int]]:
    """(group, spec, setting, seed) of every audit scored here."""
    g = siblings.load("generality")
    dev = [s for s in g.DATASETS if s.split == "dev" and "images" not in s.tags]
    wide = [g.Setting("none", 0.0), *g.settings(g.NOISE_KINDS, (0.2, 0.4))]
    small = [g.Setting("none", 0.0), *g.settings(g.NOISE_KINDS, (0.2,))]
    out = [("dev datasets", spec, setting, seed) for spec in dev for setting in wide]
    for clusters, group in ((1, "small, one cluster"), (2, "small, two clusters")):
        for shape in SMALL_SHAPES:
            spec = _small_spec(shape, clusters)
            out += [(group, spec, s, seed + k) for k in range(SMALL_SEEDS) for s in small]
    return out


def run(seed: int) -> list[dict[str, Any]]:
    ec = siblings.load("evidence_choices")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for group, spec, setting, table_seed in jobs(seed):
            ev = ec.evidence(spec, setting, table_seed, Path(workdir))
            data = spec.build(Path(workdir), table_seed)
            row = {"group": group, "table": spec.name, "setting": setting.name}
            row |= {"seed": table_seed, "noise": float((ev["given"] != ev["truth"]).mean())}
            row |= measure(ev) | _cleanlab_lr(data, ev["given"], table_seed)
            rows.append(row)
            share = row["reference_share"]
            print(
                f"{group:20s} {spec.name:28s} {setting.name:14s} s{table_seed} reference share "
                f"{'-' if share is None else f'{share:.2f}'} "
                + " ".join(f"F1 {w} {row.get(f'f1 {w}', float('nan')):.3f}" for w in WEIGHTINGS),
                flush=True,
            )
    return rows


def _mean(rows: Sequence[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{np.mean(values):.4f}" if values else "–"


def summary_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per group: mean F1 and AUROC at 20-40 % noise, share flagged on clean tables, the
    suggestions' accuracy at 20 % noise and the labels right after the corrections."""
    lines = [
        "| group | audits | F1 skill | F1 equal | F1 cleanlab + LR | AUROC skill | AUROC equal "
        "| flagged clean, skill | flagged clean, equal | flagged clean, cleanlab + LR "
        "| settings where skill / equal is higher | suggestion right, skill / equal "
        "| labels right after, skill / equal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for group in dict.fromkeys(r["group"] for r in rows):
        part = [r for r in rows if r["group"] == group]
        noisy = [r for r in part if r["noise"] > 0]
        clean = [r for r in part if r["noise"] == 0]
        at20 = [r for r in noisy if r["setting"].endswith("20%")]
        better = sum(r["f1 skill"] > r["f1 equal"] + 1e-9 for r in noisy)
        worse = sum(r["f1 skill"] < r["f1 equal"] - 1e-9 for r in noisy)
        lines.append(
            f"| {group} | {len(part)} | {_mean(noisy, 'f1 skill')} | {_mean(noisy, 'f1 equal')} "
            f"| {_mean(noisy, 'f1 cleanlab + LR')} | {_mean(noisy, 'auroc skill')} "
            f"| {_mean(noisy, 'auroc equal')} | {_mean(clean, 'flagged skill')} "
            f"| {_mean(clean, 'flagged equal')} | {_mean(clean, 'flagged cleanlab + LR')} "
            f"| {better} / {worse} "
            f"| {_mean(at20, 'suggestion skill')} / {_mean(at20, 'suggestion equal')} "
            f"| {_mean(part, 'right after skill')} / {_mean(part, 'right after equal')} |"
        )
    return lines


def table_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per table: the reference's mean share and each weighting's mean F1 at 20-40 % noise."""
    lines = [
        "| group | table | mean reference share | F1 skill | F1 equal | F1 cleanlab + LR |",
        "|---|---|---:|---:|---:|---:|",
    ]
    keys = dict.fromkeys((r["group"], r["table"]) for r in rows)
    for group, table in keys:
        part = [r for r in rows if r["group"] == group and r["table"] == table]
        noisy = [r for r in part if r["noise"] > 0]
        lines.append(
            f"| {group} | {table} | {_mean(part, 'reference_share')} | {_mean(noisy, 'f1 skill')} "
            f"| {_mean(noisy, 'f1 equal')} | {_mean(noisy, 'f1 cleanlab + LR')} |"
        )
    return lines


def write(rows: list[dict[str, Any]], out: Path, command: str, seed: int, clock: Any) -> None:
    lines = [
        "# How the ensemble weighs the networks against the linear reference",
        "",
        results_file.provenance(command, "family_weights.py", seed, clock.load, clock.seconds()),
        "",
        "`skill`: each family weighs by its balanced accuracy on the given labels out of sample "
        "above chance (the default); `equal`: half each. Both read the same audits; F1 and AUROC "
        "are means over the settings with noise, `flagged clean` the mean share of a clean "
        "table's rows flagged, `suggestion right` the share of correctly flagged rows at 20 % "
        "noise whose suggestion is the true label, `labels right after` the share of labels "
        "right after the automatic corrections (every setting). The reference share is the "
        "linear reference's weight under `skill` (0.5 is the `equal` rule).",
        "",
        *summary_lines(rows),
        "",
        *table_lines(rows),
    ]
    results_file.write_markdown(out, lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = results_file.arguments(__doc__, RESULTS).parse_args(argv)
    clock = results_file.start()
    rows = run(args.seed)
    command = results_file.command_line(
        "uv run --group bench python benchmarks/family_weights.py", argv
    )
    write(rows, args.out, command, args.seed, clock)


if __name__ == "__main__":
    main()
