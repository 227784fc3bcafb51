"""dm-audit against confident learning (cleanlab) and the robust-loss family, one harness.

Every method on a dataset trains the same model family (the one the audit picks automatically:
an MLP for features, a CIFAR ResNet-20 for small images) with the same recipe and the same
number of epochs per training (`dm_audit.training.fit`, SGD, cosine schedule, the audit's
automatic batch: 128, smaller for a conv net on a small training set, `make_train_config`):

* loss-only methods, one training each: plain CCE, GCE (q = 0.7), MAE, IMAE (T = 8), DM with
  GR's fixed default (β = 8, λ = 0.5), ProSelfLC with annealed temperature (its defaults);
* DM adaptive: the audit's probe and its DM training with the emphasis the probe chose
  (2 trainings; the first two stages of the pipeline below, timed on their own);
* dm-audit: the whole pipeline with its defaults (probe, DM training, flags, corrections,
  retrain: 3 trainings), and on digits also with ``correction_source="proselflc"``;
* cleanlab ``find_label_issues`` on 5-fold out-of-sample probabilities of the model trained with
  CCE (5 trainings), and cleanlab ``CleanLearning`` given those probabilities: prune, then
  retrain (6 trainings; its seconds include the 5 folds).

Detection is measured on in-distribution training examples (an open-set input has no right label
to detect); the same definition holds for every loss-only method and is written into the results.

cleanlab is a benchmark-only dependency (the ``bench`` group; `dm_audit` never imports it)::

    uv run --group bench python benchmarks/compare.py                        # full grid
    uv run --group bench python benchmarks/compare.py --quick --out /tmp/q   # CI, < 5 min
    uv run --group bench python benchmarks/compare.py --device cuda          # mixed precision
    uv run --group bench python benchmarks/compare.py --render a.json b.json # merge saved runs

Results are written after every noise setting, so an interrupted grid keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from dm_audit.audit import AuditConfig, proselflc_targets, run_audit
from dm_audit.crossfit import make_train_config
from dm_audit.dataset import AuditDataset
from dm_audit.metrics import accuracy
from dm_audit.noise import add_noise
from dm_audit.sources import load_source
from dm_audit.training import TrainConfig, fit, predict_proba

RESULTS = Path(__file__).parent / "results"

# ============================================================================================
# noise settings and datasets


@dataclass(frozen=True)
class Noise:
    """One synthetic noise setting (see `dm_audit.noise.add_noise`)."""

    name: str
    kind: str
    rate: float
    open_set: bool = False

    @property
    def label_noise(self) -> float:
        """Share of wrong in-distribution labels the setting injects."""
        return self.rate


NOISES = [
    Noise("clean", "none", 0.0),
    Noise("symmetric 20%", "symmetric", 0.2),
    Noise("symmetric 40%", "symmetric", 0.4),
    Noise("symmetric 60%", "symmetric", 0.6),
    Noise("pair 20%", "pair", 0.2),
    Noise("pair 40%", "pair", 0.4),
    # Open-set inputs alone leave nothing mislabelled to detect: 20 % symmetric noise on the
    # remaining examples keeps both detection tasks measurable in one setting.
    Noise("open-set 8% + symmetric 20%", "symmetric", 0.2, open_set=True),
]
OPEN_SET_FRACTION = 0.08


@dataclass
class DatasetSpec:
    """A benchmark dataset: how to load it, its training budget and the settings run on it."""

    name: str
    load: Callable[[int], AuditDataset]
    epochs: int
    model: str
    noises: list[str]
    open_set_classes: list[str] = field(default_factory=list)
    note: str = ""


def _digits_png_folder(root: Path, per_class: int) -> Path:
    """Render scikit-learn's digits as 8x8 grayscale PNG files, one sub-folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    folder = root / "digits_png"
    counts: dict[int, int] = {}
    for i, (image, target) in enumerate(zip(bunch.images, bunch.target, strict=True)):
        if counts.get(int(target), 0) >= per_class:
            continue
        counts[int(target)] = counts.get(int(target), 0) + 1
        class_dir = folder / str(int(target))
        class_dir.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * 255.0 / 16.0).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(class_dir / f"{i:05d}.png")
    return folder


def _wine_csv(root: Path) -> Path:
    """scikit-learn's wine table written as a CSV file with a ``label`` column."""
    from sklearn.datasets import load_wine

    bunch = load_wine(as_frame=True)
    frame = bunch.data.copy()
    frame["label"] = [bunch.target_names[t] for t in bunch.target]
    path = root / "wine.csv"
    frame.to_csv(path, index=False)
    return path


IMAGE_PER_CLASS = 80
IMAGE_EPOCHS = 20


# Every method trains on the 70 % training split; the 30 % test split measures its final model.
TEST_SIZE = 0.3


def dataset_specs(workdir: Path) -> dict[str, DatasetSpec]:
    """The benchmark datasets; files a user would have are written under `workdir` first."""
    all_noises = [n.name for n in NOISES]
    wine = _wine_csv(workdir)
    images = _digits_png_folder(workdir, IMAGE_PER_CLASS)
    return {
        "digits": DatasetSpec(
            "digits",
            lambda seed: load_source("digits", test_size=TEST_SIZE, seed=seed),
            epochs=60,  # the audit's own default for fewer than 5,000 examples
            model="MLP",
            noises=all_noises,
            open_set_classes=["8", "9"],
        ),
        "wine": DatasetSpec(
            "wine",
            lambda seed: load_source(
                str(wine), label_column="label", test_size=TEST_SIZE, seed=seed
            ),
            epochs=60,
            model="MLP",
            noises=all_noises,
            open_set_classes=["class_2"],
            note="178 rows, 13 features, 3 classes, read from a CSV file; the open set holds out "
            "`class_2` (2 classes remain).",
        ),
        "digits images": DatasetSpec(
            "digits images",
            lambda seed: load_source(str(images), test_size=TEST_SIZE, seed=seed),
            epochs=IMAGE_EPOCHS,
            model="ResNet-20",
            noises=["symmetric 40%"],
            note=f"an image folder of {IMAGE_PER_CLASS} digits per class rendered as 8x8 PNG "
            f"files, loaded with `load_source(folder)`; {IMAGE_EPOCHS} epochs per training for "
            "every method (the audit included) and one noise setting, so the full grid fits "
            "its time budget on two CPU cores.",
        ),
    }


def noisy_dataset(spec: DatasetSpec, noise: Noise, seed: int) -> AuditDataset:
    """The dataset's train split corrupted by `noise`, seeded (split and noise)."""
    base = spec.load(seed)
    if noise.kind == "none":
        return base
    options: dict[str, Any] = {}
    if noise.open_set:
        options = {
            "open_set_classes": spec.open_set_classes,
            "open_set_fraction": OPEN_SET_FRACTION,
        }
    return add_noise(base, kind=noise.kind, rate=noise.rate, seed=seed, **options)


# ============================================================================================
# method runs


@dataclass
class Run:
    """What one method produced on one training split, before it is compared with the truth.

    Attributes
    ----------
    flags : ndarray (N,) bool
        Examples the method calls mislabelled.
    issue_score : ndarray (N,) float or None
        Higher = more likely mislabelled (for the AUROC).
    ood_score : ndarray (N,) float or None
        Higher = more likely out-of-distribution.
    corrected : ndarray (N,) int or None
        The label each example ends with (codes), None when the method corrects nothing.
    test_accuracy : float or None
        Accuracy of the method's final model on the test split.
    seconds : float
        Wall time, every training and scoring pass included.
    trainings : int
    detection_seconds : float or None
        Wall time until the flags exist, for methods that go on to correct and retrain (the
        dm-audit pipeline, CleanLearning); None: the same as ``seconds``.
    examples_per_s : float or None
        Mean training throughput over the method's epochs.
    """

    flags: np.ndarray
    issue_score: np.ndarray | None
    ood_score: np.ndarray | None
    corrected: np.ndarray | None
    test_accuracy: float | None
    seconds: float
    trainings: int
    examples_per_s: float | None = None
    detection_seconds: float | None = None


@dataclass
class Context:
    """The data and the shared recipe every method of one (dataset, noise, seed) cell uses."""

    dataset: AuditDataset
    seed: int
    epochs: int
    device: str

    def __post_init__(self) -> None:
        train, test = self.dataset.train(), self.dataset.test()
        self.x, self.y = train.inputs(), train.label_codes()
        self.x_test, self.y_test = test.inputs(), test.label_codes()
        self.truth = train.true_label_codes() if train.has_truth else self.y.copy()
        self.n_classes = self.dataset.n_classes

    def train_config(self, loss: str, params: dict[str, Any] | None = None) -> TrainConfig:
        # The audit's batch for this training set (`dm_audit.crossfit.training_batch`).
        return make_train_config(
            AuditConfig(seed=self.seed, device=self.device, progress=False),
            loss=loss,
            loss_params=dict(params or {}),
            epochs=self.epochs,
            n_train=len(self.y),
            input_kind=self.dataset.input_kind,
        )


def _throughput(*histories: Iterable[dict[str, Any]]) -> float | None:
    rates = [h["examples_per_s"] for hist in histories for h in hist if "examples_per_s" in h]
    return float(np.mean(rates)) if rates else None


def run_loss(ctx: Context, loss: str, params: dict[str, Any]) -> Run:
    """One training with `loss`; flags = prediction ≠ given label, score = 1 − p_given."""
    start = time.perf_counter()
    result = fit(ctx.x, ctx.y, ctx.train_config(loss, params), num_classes=ctx.n_classes)
    probs, _ = predict_proba(result.model, ctx.x, device=ctx.device)
    test_probs, _ = predict_proba(result.model, ctx.x_test, device=ctx.device)
    predicted = probs.argmax(axis=1)
    corrected = predicted
    if loss == "proselflc":
        corrected = proselflc_targets(result, probs, ctx.y).argmax(axis=1)
    return Run(
        flags=predicted != ctx.y,
        issue_score=1.0 - probs[np.arange(len(ctx.y)), ctx.y],
        ood_score=1.0 - probs.max(axis=1),
        corrected=corrected,
        test_accuracy=accuracy(test_probs, ctx.y_test),
        seconds=time.perf_counter() - start,
        trainings=1,
        examples_per_s=_throughput(result.history),
    )


def run_dm_audit(ctx: Context, correction_source: str = "model") -> dict[str, Run]:
    """The whole audit with its defaults, stage by stage as `run_audit` runs them.

    Also returns "DM adaptive": the audit model itself (probe + DM training with the chosen
    emphasis), read with the loss-only definition and timed without the later stages.
    """
    config = AuditConfig(
        seed=ctx.seed,
        device=ctx.device,
        epochs=ctx.epochs,
        correction_source=correction_source,
        progress=False,
    )
    # The audit sees the training split only, like every other method; the test split
    # measures its final models (the mean of the cross-fitted retrained models).
    data = ctx.dataset.train()
    results: dict[str, Any] = {}
    ended: dict[str, float] = {}

    def told(name: str, result: Any) -> None:
        results[name], ended[name] = result, time.perf_counter() - start

    start = time.perf_counter()
    run_audit(data, config, on_stage=told)  # the library's own chain of stages
    audit_fit, scores, flag_result, corrections, retrained = (
        results[name] for name in ("audit", "scores", "flags", "corrections", "retrain")
    )
    adaptive_seconds = ended["audit"]
    detection_seconds = ended["flags"]
    # The report's tables and plots are left out of the clock: cleanlab writes none.
    seconds = ended["retrain"]

    def test_accuracy(models: Any) -> float | None:
        if models is None or len(ctx.y_test) == 0:
            return None
        return accuracy(models.predict_proba(ctx.x_test, device=ctx.device), ctx.y_test)

    table = flag_result.table
    corrected = corrections.table["corrected"].to_numpy()
    pipeline = Run(
        flags=table["is_label_issue"].to_numpy(dtype=bool),
        issue_score=table["label_issue_score"].to_numpy(),
        ood_score=table["ood_score"].to_numpy(),
        # Examples set aside (OOD) or sent to review keep their given label here.
        corrected=np.where(corrected >= 0, corrected, ctx.y),
        test_accuracy=test_accuracy(retrained.models),
        seconds=seconds,
        trainings=3,
        detection_seconds=detection_seconds,
        examples_per_s=_throughput(
            audit_fit.models.history,
            [] if retrained.models is None else retrained.models.history,
        ),
    )
    probs = scores.probs
    adaptive = Run(
        flags=probs.argmax(axis=1) != ctx.y,
        issue_score=1.0 - probs[np.arange(len(ctx.y)), ctx.y],
        ood_score=1.0 - probs.max(axis=1),
        corrected=probs.argmax(axis=1),
        test_accuracy=test_accuracy(audit_fit.models),
        seconds=adaptive_seconds,
        trainings=2,
        examples_per_s=_throughput(audit_fit.models.history),
    )
    return {"pipeline": pipeline, "adaptive": adaptive}


class RecipeClassifier(ClassifierMixin, BaseEstimator):
    """The shared training recipe with cross entropy, as a scikit-learn classifier."""

    def __init__(self, seed: int = 0, epochs: int = 60, device: str = "cpu") -> None:
        self.seed = seed
        self.epochs = epochs
        self.device = device

    def fit(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None):
        self.classes_ = np.unique(y)
        codes = np.searchsorted(self.classes_, y)
        # The audit's batch for this training set (a conv net on few images gets smaller
        # batches at a scaled rate), so that both train the same recipe.
        config = make_train_config(
            AuditConfig(seed=self.seed, device=self.device, progress=False),
            loss="cce",
            loss_params={},
            epochs=self.epochs,
            n_train=len(x),
            input_kind="image" if np.ndim(x) == 4 else "features",
        )
        self.model_ = fit(x, codes, config, num_classes=len(self.classes_)).model
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        probs, _ = predict_proba(self.model_, x, device=self.device)
        return probs

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(x).argmax(axis=1)]


def run_cleanlab(ctx: Context) -> dict[str, Run]:
    """cleanlab's two paths on 5-fold out-of-sample probabilities of the CCE model."""
    from cleanlab.classification import CleanLearning
    from cleanlab.count import estimate_cv_predicted_probabilities
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    clf = RecipeClassifier(ctx.seed, ctx.epochs, ctx.device)
    start = time.perf_counter()
    pred_probs = estimate_cv_predicted_probabilities(
        ctx.x, ctx.y, clf=clf, cv_n_folds=5, seed=ctx.seed
    )
    issues = find_label_issues(ctx.y, pred_probs)
    quality = get_label_quality_scores(ctx.y, pred_probs)
    find_seconds = time.perf_counter() - start
    find = Run(
        flags=np.asarray(issues, dtype=bool),
        issue_score=1.0 - quality,
        ood_score=1.0 - pred_probs.max(axis=1),
        # cleanlab flags only: relabelling the flagged examples with the out-of-sample
        # prediction is the correction a user would make from its output.
        corrected=np.where(issues, pred_probs.argmax(axis=1), ctx.y),
        test_accuracy=None,
        seconds=find_seconds,
        trainings=5,
    )
    start = time.perf_counter()
    learner = CleanLearning(clf, cv_n_folds=5, seed=ctx.seed)
    learner.fit(ctx.x, ctx.y, pred_probs=pred_probs)
    test_accuracy = accuracy(learner.predict(ctx.x_test), ctx.y_test)
    clean = Run(
        flags=learner.label_issues_df["is_label_issue"].to_numpy(dtype=bool),
        issue_score=1.0 - learner.label_issues_df["label_quality"].to_numpy(),
        ood_score=None,
        corrected=None,
        test_accuracy=test_accuracy,
        seconds=find_seconds + time.perf_counter() - start,
        trainings=6,
        detection_seconds=find_seconds,
    )
    return {"find": find, "clean": clean}


LOSS_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("CCE", "cce", {}),
    ("GCE (q=0.7)", "gce", {"q": 0.7}),
    ("MAE", "mae", {}),
    ("IMAE (T=8)", "imae", {"T": 8.0}),
    ("DM fixed (β=8, λ=0.5)", "dm", {"lam": 0.5, "beta": 8.0}),
    ("ProSelfLC-AT", "proselflc", {}),
]
DM_ADAPTIVE = "DM adaptive (probe + DM)"
DM_AUDIT = "dm-audit (flag, correct, retrain)"
DM_AUDIT_PSLC = "dm-audit, ProSelfLC correction"
CL_FIND = "cleanlab find_label_issues (5-fold CCE)"
CL_LEARN = "cleanlab CleanLearning (prune, retrain)"
METHODS = [*(m[0] for m in LOSS_METHODS), DM_ADAPTIVE, DM_AUDIT, DM_AUDIT_PSLC, CL_FIND, CL_LEARN]


def run_cell(ctx: Context, with_proselflc_source: bool) -> dict[str, Run]:
    """Every method on one (dataset, noise, seed) cell."""
    runs: dict[str, Run] = {}
    for label, loss, params in LOSS_METHODS:
        runs[label] = run_loss(ctx, loss, params)
    audit = run_dm_audit(ctx)
    runs[DM_ADAPTIVE], runs[DM_AUDIT] = audit["adaptive"], audit["pipeline"]
    if with_proselflc_source:
        runs[DM_AUDIT_PSLC] = run_dm_audit(ctx, "proselflc")["pipeline"]
    cleanlab = run_cleanlab(ctx)
    runs[CL_FIND], runs[CL_LEARN] = cleanlab["find"], cleanlab["clean"]
    return runs


# ============================================================================================
# measures and aggregation (pure: no training, no cleanlab)


def measure(run: Run, given: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    """Compare one run with the truth.

    Parameters
    ----------
    run : Run
    given : ndarray (N,) int
        The (noisy) labels the method saw.
    truth : ndarray (N,) int
        True labels, -1 for open-set examples.

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f1``, ``auroc`` (label issues among in-distribution
        examples; None without mislabelled or without clean examples), ``ood_auroc`` (open-set
        against every other example; None without open-set examples or OOD score),
        ``label_acc_before``/``label_acc_after`` (in-distribution), ``flagged_share``,
        ``test``, ``seconds``, ``trainings``, ``examples_per_s``.
    """
    in_dist = truth >= 0
    wrong = (given != truth)[in_dist]
    flags = np.asarray(run.flags, dtype=bool)[in_dist]
    out: dict[str, float | None] = dict.fromkeys(
        ("precision", "recall", "f1", "auroc", "ood_auroc")
    )
    if wrong.any():
        out["precision"] = float(precision_score(wrong, flags, zero_division=0))
        out["recall"] = float(recall_score(wrong, flags, zero_division=0))
        out["f1"] = float(f1_score(wrong, flags, zero_division=0))
        if not wrong.all() and run.issue_score is not None:
            out["auroc"] = float(roc_auc_score(wrong, np.asarray(run.issue_score)[in_dist]))
    is_open = ~in_dist
    if run.ood_score is not None and is_open.any() and in_dist.any():
        out["ood_auroc"] = float(roc_auc_score(is_open, run.ood_score))
    out["label_acc_before"] = float(np.mean(given[in_dist] == truth[in_dist]))
    out["label_acc_after"] = (
        None
        if run.corrected is None
        else float(np.mean(np.asarray(run.corrected)[in_dist] == truth[in_dist]))
    )
    out["flagged_share"] = float(np.mean(run.flags))
    out["test"] = run.test_accuracy
    out["seconds"] = float(run.seconds)
    out["detection_seconds"] = float(
        run.seconds if run.detection_seconds is None else run.detection_seconds
    )
    out["trainings"] = float(run.trainings)
    out["examples_per_s"] = run.examples_per_s
    return out


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def aggregate(records: Sequence[dict[str, float | None]]) -> dict[str, tuple[float, float, int]]:
    """Mean, standard deviation (population, as NumPy) and count of each measure over seeds.

    Missing (None) and non-finite values are left out; a measure with no value gets
    ``(nan, nan, 0)``.
    """
    keys: list[str] = []
    for record in records:
        keys += [k for k in record if k not in keys]
    out: dict[str, tuple[float, float, int]] = {}
    for key in keys:
        values = _finite(r.get(key) for r in records)
        if values:
            out[key] = (float(np.mean(values)), float(np.std(values)), len(values))
        else:
            out[key] = (math.nan, math.nan, 0)
    return out


def cell(stat: tuple[float, float, int] | None, digits: int = 3, scale: float = 1.0) -> str:
    """``mean ± std`` for a table cell; an en dash when there is no value."""
    if stat is None or stat[2] == 0:
        return "–"
    mean, std, n = stat
    if n == 1:
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; every row must have one cell per header."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)} has {len(row)} cells for {len(headers)} headers")

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *(line(r) for r in rows)])


# ============================================================================================
# reporting

MEASURE_COLUMNS = [
    ("trainings", "trainings", 0, 1.0),
    ("precision", "precision", 3, 1.0),
    ("recall", "recall", 3, 1.0),
    ("f1", "F1", 3, 1.0),
    ("auroc", "AUROC", 3, 1.0),
    ("ood_auroc", "OOD AUROC", 3, 1.0),
    ("label_acc_after", "label acc. after", 3, 1.0),
    ("test", "test acc.", 3, 1.0),
    ("flagged_share", "flagged", 3, 1.0),
    ("detection_seconds", "seconds to flags", 1, 1.0),
    ("seconds", "seconds", 1, 1.0),
    ("examples_per_s", "train ex/s", 0, 1.0),
]


def setting_table(stats: dict[str, dict[str, tuple[float, float, int]]]) -> str:
    """Per-method table of one (dataset, noise) setting."""
    rows = [
        [
            method,
            *(
                # Trainings are a count, the same in every seed.
                f"{stats[method][key][0]:.0f}"
                if key == "trainings"
                else cell(stats[method].get(key), d, s)
                for key, _, d, s in MEASURE_COLUMNS
            ),
        ]
        for method in METHODS
        if method in stats
    ]
    return markdown_table(["method", *(h for _, h, _, _ in MEASURE_COLUMNS)], rows)


def _mean(stats: dict[str, tuple[float, float, int]], key: str) -> float:
    return stats.get(key, (math.nan, math.nan, 0))[0]


def headline(
    results: dict[str, dict[str, dict[str, dict[str, tuple[float, float, int]]]]],
) -> tuple[str, list[str]]:
    """The headline table (settings with at least 20 % noise) and the target checks."""
    noise_by_name = {n.name: n for n in NOISES}
    rows, checks = [], []
    for dataset, by_noise in results.items():
        for noise, stats in by_noise.items():
            if noise_by_name[noise].label_noise < 0.2:
                continue
            audit, find = stats[DM_AUDIT], stats[CL_FIND]
            short = {"CCE": "CCE", "GCE (q=0.7)": "GCE", CL_LEARN: "CleanLearning"}
            best_name, best = max(
                ((name, _mean(stats[m], "test")) for m, name in short.items()),
                key=lambda item: -math.inf if math.isnan(item[1]) else item[1],
            )
            rows.append(
                [
                    dataset,
                    noise,
                    cell(audit.get("f1")),
                    cell(find.get("f1")),
                    cell(audit.get("auroc")),
                    cell(find.get("auroc")),
                    cell(audit.get("test")),
                    f"{best:.3f} ({best_name})",
                    f"{_mean(audit, 'detection_seconds'):.1f} / {_mean(find, 'seconds'):.1f}",
                    f"{_mean(audit, 'seconds'):.1f} / {_mean(stats[CL_LEARN], 'seconds'):.1f}",
                ]
            )
            f1_ok = _mean(audit, "f1") >= _mean(find, "f1")
            time_ok = _mean(audit, "detection_seconds") <= 0.5 * _mean(find, "seconds")
            checks.append(
                f"* {dataset}, {noise}: F1 {_mean(audit, 'f1'):.3f} vs cleanlab "
                f"{_mean(find, 'f1'):.3f} ({'met' if f1_ok else 'MISSED'}); seconds to the flags "
                f"{_mean(audit, 'detection_seconds'):.1f} vs half of find_label_issues' "
                f"{0.5 * _mean(find, 'seconds'):.1f} ({'met' if time_ok else 'MISSED'}); whole "
                f"pipeline {_mean(audit, 'seconds'):.1f} vs CleanLearning "
                f"{_mean(stats[CL_LEARN], 'seconds'):.1f}"
            )
            if noise == "symmetric 40%":
                test_ok = _mean(audit, "test") >= best
                checks[-1] += (
                    f"; test acc. {_mean(audit, 'test'):.3f} vs best of CCE/GCE/CleanLearning "
                    f"{best:.3f} ({'met' if test_ok else 'MISSED'})"
                )
    table = markdown_table(
        [
            "dataset",
            "noise",
            "dm-audit F1",
            "cleanlab F1",
            "dm-audit AUROC",
            "cleanlab AUROC",
            "dm-audit test acc.",
            "best of CCE / GCE / CleanLearning",
            "seconds to flags dm-audit / find_label_issues",
            "seconds dm-audit pipeline / CleanLearning",
        ],
        rows,
    )
    return table, checks


def correction_source_table(by_noise: dict[str, dict[str, dict[str, tuple[float, float, int]]]]):
    """dm-audit with the model's and with ProSelfLC's suggestions, side by side."""
    rows = []
    for noise, stats in by_noise.items():
        if DM_AUDIT_PSLC not in stats:
            continue
        model, pslc = stats[DM_AUDIT], stats[DM_AUDIT_PSLC]
        rows.append(
            [
                noise,
                cell(model.get("label_acc_before")),
                cell(model.get("label_acc_after")),
                cell(pslc.get("label_acc_after")),
                cell(model.get("test")),
                cell(pslc.get("test")),
                cell(model.get("f1")),
                cell(pslc.get("f1")),
            ]
        )
    return markdown_table(
        [
            "noise",
            "label acc. before",
            "after, model",
            "after, proselflc",
            "test acc., model",
            "test acc., proselflc",
            "F1, model",
            "F1, proselflc",
        ],
        rows,
    )


def plot(results: dict, noise_order: Sequence[str], path: Path) -> None:
    """Detection F1 and final test accuracy per noise setting, per method, per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(results)
    fig, axes = plt.subplots(
        len(datasets), 2, figsize=(13, 3.6 * len(datasets)), squeeze=False, layout="constrained"
    )
    markers = "osD^v<>xP*h"
    colours = [plt.get_cmap("tab20")(2 * i % 20 + (2 * i >= 20)) for i in range(len(METHODS))]
    for row, dataset in enumerate(datasets):
        noises = [n for n in noise_order if n in results[dataset]]
        for col, (key, title) in enumerate((("f1", "detection F1"), ("test", "test accuracy"))):
            ax = axes[row][col]
            for i, method in enumerate(METHODS):
                means = [_mean(results[dataset][n].get(method, {}), key) for n in noises]
                if all(math.isnan(m) for m in means):
                    continue
                width = 2.5 if method.startswith("dm-audit (") else 1.0
                ax.plot(
                    range(len(noises)),
                    means,
                    marker=markers[i % len(markers)],
                    color=colours[i % len(colours)],
                    linewidth=width,
                    label=method,
                )
            ax.set_xticks(range(len(noises)))
            ax.set_xticklabels([n.replace(" + ", "\n+ ") for n in noises], fontsize=7)
            ax.set_title(f"{dataset}: {title}")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    labels = [m for m in METHODS if m in legend]
    fig.legend([legend[m] for m in labels], labels, loc="outside lower center", ncol=4, fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(device: str) -> dict[str, Any]:
    """Versions and machine, recorded with the results."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {
            name: _version(name)
            for name in ("dm-audit", "torch", "numpy", "scikit-learn", "cleanlab", "faiss-cpu")
        },
    }


def warm_up(device: str) -> None:
    """One short untimed training, so the first timed method does not pay for torch's start-up."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    config = TrainConfig(loss="cce", epochs=2, device=device, progress=False)
    fit(x, np.arange(64) % 2, config, num_classes=2)


def set_threads(threads: int) -> None:
    """Use `threads` CPU threads in torch and faiss (both default to every core)."""
    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def _load() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


# ============================================================================================
# main


def results_from_records(
    records: Sequence[dict[str, Any]],
) -> dict[str, dict[str, dict[str, dict[str, tuple[float, float, int]]]]]:
    """Aggregate per-seed records into dataset -> noise -> method -> measure statistics."""
    grouped: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    ids = ("dataset", "noise", "seed", "method")
    for record in records:
        by_method = grouped.setdefault(record["dataset"], {}).setdefault(record["noise"], {})
        by_method.setdefault(record["method"], []).append(
            {k: v for k, v in record.items() if k not in ids}
        )
    return {
        dataset: {
            noise: {method: aggregate(rows) for method, rows in by_method.items()}
            for noise, by_method in by_noise.items()
        }
        for dataset, by_noise in grouped.items()
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 2 settings, seed 0")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--datasets", nargs="+", default=None, help="default: all")
    parser.add_argument("--noises", nargs="+", default=None, help="default: each dataset's")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch and faiss (1: stable timings on a shared machine)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        nargs="+",
        default=None,
        help="rewrite the tables and plot from these compare.json files without training",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        render(args.render, args.out)
        return
    set_threads(args.threads)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    command = "uv run --group bench python benchmarks/compare.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    load_before = _load()
    started = time.perf_counter()
    raw: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    env = environment(args.device)
    with tempfile.TemporaryDirectory(prefix="dm-audit-bench-") as workdir:
        specs = dataset_specs(Path(workdir))
        warm_up(args.device)
        names = args.datasets or (["digits"] if args.quick else list(specs))
        for name in names:
            spec = specs[name]
            noises = args.noises or (["symmetric 40%", "pair 20%"] if args.quick else spec.noises)
            dataset_start = time.perf_counter()
            for noise_name in noises:
                noise = next(n for n in NOISES if n.name == noise_name)
                for seed in seeds:
                    ctx = Context(noisy_dataset(spec, noise, seed), seed, spec.epochs, args.device)
                    runs = run_cell(ctx, with_proselflc_source=name == "digits")
                    raw += [
                        {"dataset": name, "noise": noise_name, "seed": seed, "method": method}
                        | measure(run, ctx.y, ctx.truth)
                        for method, run in runs.items()
                    ]
                stats = results_from_records(raw)[name][noise_name]
                print(
                    f"{name:<14} {noise_name:<28} dm-audit F1 {_mean(stats[DM_AUDIT], 'f1'):.3f} "
                    f"test {_mean(stats[DM_AUDIT], 'test'):.3f}  cleanlab F1 "
                    f"{_mean(stats[CL_FIND], 'f1'):.3f}  [{time.perf_counter() - started:.0f} s]",
                    flush=True,
                )
                timings[name] = time.perf_counter() - dataset_start
                # Written after every setting, so an interrupted grid leaves what it measured.
                provenance = {
                    "command": command.strip(),
                    "seeds": seeds,
                    "environment": env,
                    "threads": args.threads,
                    "seconds": {"total": time.perf_counter() - started, **timings},
                    "load_average": {"start": load_before, "end": _load()},
                    "datasets": {
                        n: {k: v for k, v in dataclasses.asdict(specs[n]).items() if k != "load"}
                        for n in timings
                    },
                }
                write_results(args.out, specs, [provenance], raw)


def render(paths: Sequence[Path], out: Path) -> None:
    """Rewrite ``compare.md``/``.json``/``.png`` in `out` from earlier runs' ``compare.json``."""
    documents = [json.loads(Path(p).read_text()) for p in paths]
    raw = [r for doc in documents for r in doc["records"]]
    provenance = [
        run
        for doc in documents
        for run in doc.get("runs") or [{k: v for k, v in doc.items() if k != "records"}]
    ]
    with tempfile.TemporaryDirectory(prefix="dm-audit-bench-") as workdir:
        write_results(out, dataset_specs(Path(workdir)), provenance, raw)


def _provenance_lines(provenance: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for run in provenance:
        seconds = run.get("seconds", {})
        load = run.get("load_average", {})
        env = run["environment"]
        lines += [
            f"Command: `{run['command']}`. Seeds {run['seeds']} (each seed sets the 70/30 "
            "stratified split, the noise and every training); mean ± std over the seeds.",
            "",
            f"Machine: {env['platform']}, {env['cpu_count']} CPU cores, "
            f"{run.get('threads', env['torch_threads'])} thread(s) for torch and faiss, device "
            f"`{env['device']}`{' (' + env['cuda'] + ')' if env['cuda'] else ''}. Python "
            f"{env['python']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".",
            "",
            f"Wall time {seconds.get('total', math.nan) / 60:.1f} min ("
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items() if k != "total")
            + f"). Load average (1/5/15 min) {load.get('start', '?')} at the start, "
            f"{load.get('end', '?')} at the end."
            + (f" Note: {run['note']}." if run.get("note") else ""),
            "",
        ]
    return lines


def write_results(
    out: Path,
    specs: dict[str, DatasetSpec],
    provenance: Sequence[dict[str, Any]],
    raw: list[dict[str, Any]],
) -> None:
    """Write ``compare.md``, ``compare.json`` and ``compare.png`` into `out`."""
    results = results_from_records(raw)
    table, checks = headline(results)
    lines = [
        "# dm-audit against cleanlab and the robust-loss family",
        "",
        *_provenance_lines(provenance),
        "The machine has 2 CPU cores and was shared with other jobs (see the load averages), so "
        "the seconds are higher than on an idle machine; compare them within a table, where "
        "every method ran under the same conditions.",
        "",
        "## Configuration",
        "",
        "Per dataset every method trains the same model with the same recipe (SGD with Nesterov "
        "momentum, lr 0.1, cosine schedule, batch 128, the model family's weight decay; a conv "
        "net on a small training set gets smaller batches at a rate scaled alike, "
        "`dm_audit.crossfit.training_batch`) for the same epochs per training; dm-audit runs "
        "with its defaults (its probe trains a quarter of the epochs, at least 5).",
        "",
    ]
    # Each run recorded its datasets' budgets; they win over today's defaults when re-rendering.
    described = {n: dataclasses.asdict(s) for n, s in specs.items()}
    for run in provenance:
        described |= run.get("datasets", {})
    for name in results:
        spec = described[name]
        note = spec["note"][:1].upper() + spec["note"][1:]
        lines.append(
            f"* **{name}**: {spec['model']}, {spec['epochs']} epochs per training; settings: "
            f"{', '.join(results[name])}. {note}".rstrip()
        )
    lines += [
        "",
        "Noise (`dm_audit.noise.add_noise`, training split only): symmetric flips exactly "
        "⌊rN⌋ labels to another class; pair flips a share r of each class k to k+1 mod C; "
        f"open set keeps {OPEN_SET_FRACTION:.0%} of the training split from held-out classes "
        "with random in-set labels, plus 20 % symmetric flips of the rest. No dataset here is "
        "binary, so every setting can be learnt (with 3 classes, 60 % symmetric noise still "
        "leaves the true class the most frequent label).",
        "",
        "Definitions:",
        "",
        "* Detection (precision, recall, F1, AUROC) is measured on in-distribution training "
        "examples against the true labels. dm-audit: its `is_label_issue` flags and "
        "`label_issue_score`. cleanlab: `find_label_issues` (defaults) and 1 − "
        "`get_label_quality_scores`. Every loss-only method (CCE, GCE, MAE, IMAE, DM fixed, "
        "DM adaptive, ProSelfLC-AT): flag = the model's prediction differs from the given "
        "label, score = 1 − p_given.",
        "* OOD AUROC: open-set examples against all others. dm-audit: its `ood_score`; "
        "loss-only methods and cleanlab: 1 − max_j p_j (max-softmax baseline; cleanlab's "
        "out-of-sample probabilities).",
        "* Label acc. after: share of in-distribution training examples whose label after "
        "correction is true. Loss-only methods: the prediction (ProSelfLC-AT: the argmax of its "
        "corrected target). dm-audit: applied corrections, other examples keep their label. "
        "cleanlab find_label_issues: flagged examples relabelled with the out-of-sample "
        "prediction. CleanLearning prunes and corrects nothing (–).",
        "* Test acc.: the method's final model on the test split (find_label_issues has none). "
        "Seconds: wall time of every training and scoring pass of the method; trainings: how "
        "many models it trains (CleanLearning reuses the 5 folds' probabilities, and its seconds "
        "include them). DM adaptive is the audit's first two stages (probe, DM training), timed "
        "on their own. Seconds to flags: the dm-audit pipeline's probe, DM training, scoring "
        "and flags (its corrections and retrain come after), CleanLearning's 5 folds and "
        "find_label_issues; the other methods' seconds. The dm-audit pipeline's seconds end with "
        "the retrain: building its report tables and plots is left out, as cleanlab writes "
        "none.",
        "",
        "## Headline (settings with at least 20 % noise)",
        "",
        table,
        "",
        "Targets (mean of the seeds): dm-audit's F1 ≥ cleanlab's, its seconds to the flags ≤ "
        "half of cleanlab's find_label_issues path (5 trainings), and at 40 % symmetric noise "
        "its test accuracy ≥ the best of CCE, GCE and CleanLearning.",
        "",
        *checks,
        "",
        "",
        "![F1 and test accuracy](compare.png)",
        "",
    ]
    for name, by_noise in results.items():
        if any(DM_AUDIT_PSLC in stats for stats in by_noise.values()):
            lines += [
                f"## Correction source on {name}: the model's suggestions or ProSelfLC's",
                "",
                '`AuditConfig.correction_source`: "model" (default) against "proselflc" '
                "(the audit model trained with ProSelfLC-AT + DM, its corrected targets "
                "suggest the labels). Label accuracy over in-distribution training examples.",
                "",
                correction_source_table(by_noise),
                "",
            ]
    for name, by_noise in results.items():
        lines += [f"## {name}", ""]
        for noise, stats in by_noise.items():
            lines += [f"### {noise}", "", setting_table(stats), ""]
    (out / "compare.md").write_text("\n".join(lines))
    document = {"runs": list(provenance), "records": raw} if len(provenance) > 1 else None
    if document is None:
        document = {**provenance[0], "records": raw}
    (out / "compare.json").write_text(json.dumps(document, indent=1))
    plot(results, [n.name for n in NOISES], out / "compare.png")
    print(f"wrote {out / 'compare.md'}, compare.json, compare.png")


if __name__ == "__main__":
    main()
