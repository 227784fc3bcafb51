"""Label-issue detection across many datasets: dm-audit's defaults side by side with cleanlab.

`compare.py` measures a few datasets in depth; this benchmark asks whether the defaults hold on
data they were not tuned on. Twelve datasets (scikit-learn's bundled tables and seeded synthetic
shapes: binary, 20 classes, strong imbalance, raw features of mixed scale, an embedding column,
an image folder; tiny, small and mid-sized), each tagged ``dev`` or ``test`` once and for all in
`DATASETS`, get symmetric, pair and instance-dependent noise at 0, 20 and 40 %. On the same
noisy labels run:

* dm-audit: ``run_audit(dataset, AuditConfig(progress=False, seed=seed))``, nothing else set;
* cleanlab ``find_label_issues`` (its defaults) on 5-fold out-of-sample probabilities of a
  logistic regression (standardised features), a histogram gradient-boosting classifier, and the
  model family dm-audit trains (`compare.RecipeClassifier`: cross entropy, the audit's default
  epochs and batch); on the image folder only the last one;
* the argmax baseline: flag where the out-of-sample prediction of that same model differs from
  the given label.

Nothing is downloaded. cleanlab is a benchmark-only dependency (the ``bench`` group)::

    uv run --group bench python benchmarks/generality.py                     # full grid, seed 0
    uv run --group bench python benchmarks/generality.py --quick --out /tmp/q  # < 2 minutes
    uv run --group bench python benchmarks/generality.py --split test --seeds 0 1 2

Results (``generality.md``, ``generality.json``) are rewritten after every noise setting, so an
interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import siblings  # benchmarks/siblings.py: the sibling scripts' loader
from sklearn.datasets import (
    load_breast_cancer,
    load_digits,
    load_iris,
    load_wine,
    make_classification,
)
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from dm_audit.atomic import to_jsonable
from dm_audit.config import AuditConfig
from dm_audit.dataset import AuditDataset, default_ids
from dm_audit.noise import inject_instance_dependent, inject_pair, inject_symmetric
from dm_audit.sources import load_source

RESULTS = Path(__file__).parent / "results"
SPLITS = ("dev", "test")
# Row counts of each size category, lower bound included, upper bound excluded.
SIZES: dict[str, tuple[int, int]] = {
    "tiny": (0, 300),
    "small": (300, 2_001),
    "mid": (10_000, 100_001),
}
# Shape tags a dataset may carry; `tests/test_benchmarks_generality.py` checks each one holds.
TAGS = ("binary", "many-classes", "imbalanced", "raw-scale", "embedding", "images", "wide")
CV_FOLDS = 5
# The embedding table is digits seen through one fixed random projection, the same in every
# seed, like the other bundled datasets.
PROJECTION_SEED = 0
EMBEDDING_DIM = 32
IMAGES_PER_CLASS = 20


def compare_module() -> ModuleType:
    """``benchmarks/compare.py``: its recipe classifier and helpers are shared."""
    return siblings.load("compare")


# ============================================================================================
# datasets


@dataclass
class BenchData:
    """One dataset with clean labels, ready for every method.

    Attributes
    ----------
    dataset : AuditDataset
        Every row in the train split, clean labels: what dm-audit gets, relabelled.
    x_model : numpy.ndarray
        The torch model's input: float32 (N, D) features or uint8 (N, H, W, C) images.
    x_table : numpy.ndarray of float32, shape (N, D)
        The scikit-learn models' input (images flattened).
    labels : numpy.ndarray of int64, shape (N,)
        Clean codes into ``dataset.classes``.
    """

    dataset: AuditDataset
    x_model: np.ndarray
    x_table: np.ndarray
    labels: np.ndarray

    @property
    def n_classes(self) -> int:
        """Number of classes C."""
        return self.dataset.n_classes

    @property
    def is_image(self) -> bool:
        """Whether the inputs are images (only the torch model family runs on them)."""
        return self.dataset.input_kind == "image"


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark dataset: its fixed split, size category, shape tags and how to build it."""

    name: str
    split: str
    size: str
    tags: tuple[str, ...]
    build: Callable[[Path, int], BenchData]
    note: str


def _from_matrix(x: np.ndarray, y: np.ndarray, classes: Sequence[str], source: str) -> BenchData:
    """A feature dataset built in memory, ids ``row-000000``, ... in row order."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    dataset = AuditDataset.from_arrays(
        np.asarray(y, dtype=np.int64),
        features=x,
        classes=list(classes),
        example_ids=default_ids(len(y)),
        split=None,
        source=source,
    )
    return BenchData(dataset, x, x, dataset.label_codes())


def _sklearn(loader: Callable[..., Any], name: str) -> Callable[[Path, int], BenchData]:
    """A bundled scikit-learn table with its raw, unscaled features (the seed does not apply)."""

    def build(workdir: Path, seed: int) -> BenchData:
        bunch = loader()
        return _from_matrix(bunch.data, bunch.target, [str(c) for c in bunch.target_names], name)

    return build


def _synthetic(
    rows: int,
    features: int,
    classes: int,
    informative: int,
    clusters: int,
    separation: float,
    weights: Sequence[float] | None = None,
    mixed_scale: bool = False,
) -> Callable[[Path, int], BenchData]:
    """Seeded `make_classification` data; the labels are the generator's truth.

    A fifth of the features are linear combinations of the informative ones, the rest noise.
    ``flip_y=0``: scikit-learn otherwise flips 1 % of the labels at random, which would count as
    clean here. With `mixed_scale` the columns are multiplied by factors from 1e-3 to 1e4 and
    shifted, the way raw measurements in different units arrive.
    """

    def build(workdir: Path, seed: int) -> BenchData:
        x, y = make_classification(
            n_samples=rows,
            n_features=features,
            n_informative=informative,
            n_redundant=features // 5,
            n_classes=classes,
            n_clusters_per_class=clusters,
            class_sep=separation,
            weights=None if weights is None else list(weights),
            flip_y=0.0,
            random_state=seed,
        )
        if mixed_scale:
            rng = np.random.default_rng(seed)
            factors = 10.0 ** rng.permutation(np.linspace(-3.0, 4.0, features))
            offsets = factors * rng.uniform(-50.0, 50.0, size=features)
            x = x * factors + offsets
        names = [f"c{k:02d}" for k in range(classes)]
        return _from_matrix(x, y, names, f"make_classification (seed {seed})")

    return build


def _digits_embedding(workdir: Path, seed: int) -> BenchData:
    """Digits projected to 32-d, written as one list column of a Parquet file and loaded back."""
    bunch = load_digits()
    rng = np.random.default_rng(PROJECTION_SEED)
    projection = rng.normal(size=(bunch.data.shape[1], EMBEDDING_DIM)) / np.sqrt(EMBEDDING_DIM)
    embedding = (bunch.data @ projection).astype(np.float32)
    path = workdir / "digits_embedding.parquet"
    pd.DataFrame(
        {
            "example_id": default_ids(len(embedding), prefix="emb"),
            "label": [str(t) for t in bunch.target],
            "embedding": list(embedding),
        }
    ).to_parquet(path, index=False)
    dataset = load_source(
        str(path), label_column="label", feature_columns="embedding", test_size=0.0, seed=seed
    )
    x = dataset.features()
    return BenchData(dataset, x, x, dataset.label_codes())


def _digits_images(workdir: Path, seed: int) -> BenchData:
    """Digits as an image folder of 8x8 grayscale PNGs (one sub-folder per class), loaded back."""
    folder = compare_module()._digits_png_folder(workdir, IMAGES_PER_CLASS)
    dataset = load_source(str(folder), test_size=0.0, seed=seed)
    images = dataset.images()
    flat = images.reshape(len(images), -1).astype(np.float32)
    return BenchData(dataset, images, flat, dataset.label_codes())


# One row per dataset: name, split, size category, shape tags, builder, note. Synthetic builders
# read _synthetic(rows, features, classes, informative features, clusters per class, separation).
DATASETS: list[DatasetSpec] = [
    # test: only reported, never looked at to choose defaults
    DatasetSpec(
        "wine", "test", "tiny", ("raw-scale",), _sklearn(load_wine, "wine"),
        "scikit-learn's wine, 13 raw features (proline in the hundreds, hue near 1)",
    ),
    DatasetSpec("iris", "test", "tiny", (), _sklearn(load_iris, "iris"), "scikit-learn's iris"),
    DatasetSpec(
        "breast-cancer", "test", "small", ("binary", "raw-scale"),
        _sklearn(load_breast_cancer, "breast_cancer"),
        "scikit-learn's breast cancer, 30 raw features spanning five orders of magnitude",
    ),
    DatasetSpec(
        "synth-20-classes", "test", "small", ("many-classes",),
        _synthetic(1_200, 30, 20, 20, 1, 2.0),
        "20 classes of 60 examples, 30 features",
    ),
    DatasetSpec(
        "synth-imbalanced", "test", "mid", ("imbalanced",),
        _synthetic(10_000, 20, 5, 10, 2, 1.5, weights=[0.6, 0.2, 0.1, 0.075, 0.025]),
        "5 classes, shares 60/20/10/7.5/2.5 % (largest/smallest 24), 20 features",
    ),
    DatasetSpec(
        "digits-embedding", "test", "small", ("embedding",), _digits_embedding,
        f"digits through a fixed random projection to {EMBEDDING_DIM}-d, stored as one list "
        "column of a Parquet file and read with `load_source`",
    ),
    # dev: free to look at while developing
    DatasetSpec(
        "digits", "dev", "small", (), _sklearn(load_digits, "digits"), "scikit-learn's digits"
    ),
    DatasetSpec(
        "digits-images", "dev", "tiny", ("images",), _digits_images,
        f"an image folder of {IMAGES_PER_CLASS} digits per class as 8x8 grayscale PNGs, read "
        "with `load_source(folder, test_size=0.0)`; dm-audit picks its CIFAR ResNet-20",
    ),
    DatasetSpec(
        "synth-binary-mid", "dev", "mid", ("binary",), _synthetic(10_000, 20, 2, 8, 3, 1.0),
        "2 classes of 3 clusters each, 20 features",
    ),
    DatasetSpec(
        "synth-mixed-scale", "dev", "small", ("raw-scale",),
        _synthetic(1_500, 12, 4, 8, 2, 1.5, mixed_scale=True),
        "4 classes, 12 raw columns scaled by 1e-3 to 1e4 and shifted",
    ),
    DatasetSpec(
        "synth-tiny-wide", "dev", "tiny", ("wide",), _synthetic(240, 60, 3, 10, 1, 1.5),
        "3 classes, 240 rows of 60 features (12 redundant, 38 noise)",
    ),
    DatasetSpec(
        "synth-imbalanced-small", "dev", "small", ("imbalanced",),
        _synthetic(2_000, 16, 3, 8, 2, 1.5, weights=[0.75, 0.215, 0.035]),
        "3 classes, shares 75/21.5/3.5 % (largest/smallest 21), 16 features",
    ),
]  # fmt: skip
SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in DATASETS}


def size_category(n: int) -> str | None:
    """The size category of a dataset of n rows (None: between the categories)."""
    return next((name for name, (lo, hi) in SIZES.items() if lo <= n < hi), None)


# ============================================================================================
# noise settings


NOISE_KINDS = ("symmetric", "pair", "instance")


@dataclass(frozen=True)
class Setting:
    """One noise setting; rate 0 is the single clean setting, whatever the kind."""

    kind: str
    rate: float

    @property
    def name(self) -> str:
        """``clean``, ``symmetric 20%``, ..."""
        return "clean" if self.kind == "none" else f"{self.kind} {self.rate:.0%}"


def settings(kinds: Sequence[str], rates: Sequence[float]) -> list[Setting]:
    """The grid: clean once (when 0 is a rate), then every kind at every positive rate."""
    out = [Setting("none", 0.0)] if any(r == 0 for r in rates) else []
    return out + [Setting(k, float(r)) for k in kinds for r in rates if r > 0]


def confusion_probs(data: BenchData, seed: int) -> np.ndarray:
    """Out-of-sample probabilities of a logistic regression on the clean labels.

    The instance-dependent noise flips the examples this model finds most confusable. No method
    sees these probabilities, but cleanlab + LR trains the same model family (on the noisy
    labels), so that noise sits where its own model is least sure; the results say so.
    """
    probs, _ = cross_val_probs(logistic(), data.x_table, data.labels, seed)
    return probs


def make_noisy(
    data: BenchData, setting: Setting, seed: int, probs: np.ndarray | None = None
) -> np.ndarray:
    """Noisy codes for one setting (the clean codes for rate 0); seeded.

    Parameters
    ----------
    data : BenchData
    setting : Setting
    seed : int
    probs : numpy.ndarray, shape (N, C), optional
        `confusion_probs` of the dataset; required by the instance-dependent kind.

    Returns
    -------
    numpy.ndarray of int64, shape (N,)
    """
    if setting.kind == "none" or setting.rate == 0:
        return data.labels.copy()
    if setting.kind == "symmetric":
        return inject_symmetric(data.labels, data.n_classes, setting.rate, seed)
    if setting.kind == "pair":
        return inject_pair(data.labels, data.n_classes, setting.rate, seed)
    if setting.kind == "instance":
        if probs is None:
            raise ValueError("instance-dependent noise needs the confusion probabilities")
        return inject_instance_dependent(data.labels, probs, setting.rate, seed)
    raise ValueError(f"unknown noise kind {setting.kind!r} (choose from {list(NOISE_KINDS)})")


def with_labels(dataset: AuditDataset, codes: np.ndarray) -> AuditDataset:
    """A copy of `dataset` whose given labels are `codes` (the inputs and ids unchanged)."""
    out = dataset.subset(np.ones(len(dataset), dtype=bool))
    out.table["label"] = np.asarray(dataset.classes, dtype=object)[codes]
    return out.validate()


# ============================================================================================
# methods

DM_AUDIT = "dm-audit"
CL_LR = "cleanlab + LR"
CL_HGB = "cleanlab + HGB"
CL_TORCH = "cleanlab + torch"
ARGMAX = "argmax (torch)"
METHODS = [DM_AUDIT, CL_LR, CL_HGB, CL_TORCH, ARGMAX]
IMAGE_METHODS = [DM_AUDIT, CL_TORCH, ARGMAX]


@dataclass
class Detection:
    """What one method says about every input row.

    Attributes
    ----------
    flags : numpy.ndarray of bool, shape (N,)
    scores : numpy.ndarray of float, shape (N,)
        Higher = more likely mislabelled.
    suggested : numpy.ndarray of int, shape (N,)
        The label the method would give instead (-1: none).
    covered : numpy.ndarray of bool, shape (N,)
        Rows the method returned a verdict for.
    seconds : float
    seconds_to_flags : float or None
        Seconds until the flags were known (dm-audit: the end of its flags stage, before the
        corrections, the retrain and the report); None: the same as `seconds`.
    """

    flags: np.ndarray
    scores: np.ndarray
    suggested: np.ndarray
    covered: np.ndarray
    seconds: float
    seconds_to_flags: float | None = None


def audit_epochs(n: int) -> int:
    """The epochs dm-audit trains for by default on n examples.

    The cross-validated torch model trains for as many, so both spend the same passes per
    training. The audit's own rule is used when it is importable, so a change there follows.
    """
    try:
        from dm_audit.audit import _auto_epochs

        return int(_auto_epochs(n))
    except ImportError:
        return 60 if n <= 5_000 else 40 if n <= 50_000 else 20 if n <= 500_000 else 8


def run_dm_audit(
    data: BenchData, noisy: np.ndarray, seed: int, config: AuditConfig | None = None
) -> Detection:
    """dm-audit with its defaults (or ``config``); rows missing from ``report.examples`` count
    as uncovered."""
    from dm_audit.audit import run_audit

    dataset = with_labels(data.dataset, noisy)
    flags_done: list[float] = []

    def on_stage(name: str, _result: object) -> None:
        if name == "flags":
            flags_done.append(time.perf_counter())

    start = time.perf_counter()
    config = config or AuditConfig(progress=False, seed=seed)
    report = run_audit(dataset, config, on_stage=on_stage)
    seconds = time.perf_counter() - start
    examples = report.examples
    n = len(noisy)
    position = pd.Index(dataset.example_ids).get_indexer(examples["example_id"].astype(str))
    known = position >= 0
    rows = position[known]
    covered = np.zeros(n, dtype=bool)
    covered[rows] = True
    flags = np.zeros(n, dtype=bool)
    flags[rows] = examples["is_label_issue"].to_numpy(dtype=bool)[known]
    scores = np.zeros(n)
    scores[rows] = examples["label_issue_score"].to_numpy(dtype=float)[known]
    code = {name: k for k, name in enumerate(dataset.classes)}
    suggested = np.full(n, -1, dtype=np.int64)
    if "suggested_label" in examples:
        names = examples["suggested_label"].to_numpy(dtype=object)[known]
        suggested[rows] = [code.get(str(s), -1) for s in names]
    to_flags = flags_done[0] - start if flags_done else None
    return Detection(flags, scores, suggested, covered, seconds, to_flags)


def logistic() -> Pipeline:
    """A logistic regression on standardised features."""
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2_000))


def cross_val_probs(
    model: Any, x: np.ndarray, y: np.ndarray, seed: int
) -> tuple[np.ndarray, float]:
    """5-fold stratified out-of-sample probabilities and the wall time of the 5 trainings."""
    folds = StratifiedKFold(CV_FOLDS, shuffle=True, random_state=seed)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # lbfgs stopping at max_iter on a noisy table is expected and changes nothing measured.
        warnings.simplefilter("ignore", ConvergenceWarning)
        probs = cross_val_predict(model, x, y, cv=folds, method="predict_proba")
    return np.asarray(probs, dtype=np.float64), time.perf_counter() - start


def cleanlab_detection(noisy: np.ndarray, probs: np.ndarray, train_seconds: float) -> Detection:
    """cleanlab's ``find_label_issues`` (defaults) on out-of-sample probabilities."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    start = time.perf_counter()
    issues = np.asarray(find_label_issues(noisy, probs), dtype=bool)
    seconds = train_seconds + time.perf_counter() - start
    # The ranking is read for the AUROC only; a user of the flags does not pay for it.
    scores = 1.0 - get_label_quality_scores(noisy, probs)
    covered = np.ones(len(noisy), dtype=bool)
    return Detection(issues, scores, probs.argmax(axis=1), covered, seconds)


def argmax_detection(noisy: np.ndarray, probs: np.ndarray, train_seconds: float) -> Detection:
    """Flag where the out-of-sample prediction differs from the given label."""
    predicted = probs.argmax(axis=1)
    scores = 1.0 - probs[np.arange(len(noisy)), noisy]
    covered = np.ones(len(noisy), dtype=bool)
    return Detection(predicted != noisy, scores, predicted, covered, train_seconds)


def run_methods(
    data: BenchData,
    noisy: np.ndarray,
    seed: int,
    methods: Sequence[str],
    report: Callable[[str, Detection | None, str | None], None],
) -> None:
    """Run `methods` on one set of noisy labels, calling `report` as each one finishes.

    A method that fails is reported with its error and the others still run: one broken method
    must not cost a grid its other measurements.
    """

    def attempt(method: str, compute: Callable[[], Detection]) -> None:
        try:
            detection = compute()
        except Exception as error:  # recorded and shown; the grid goes on
            report(method, None, f"{type(error).__name__}: {error}")
            return
        report(method, detection, None)

    if DM_AUDIT in methods:
        attempt(DM_AUDIT, lambda: run_dm_audit(data, noisy, seed))
    tabular = {
        CL_LR: logistic,
        CL_HGB: lambda: HistGradientBoostingClassifier(random_state=seed),
    }
    for method, make_model in tabular.items():
        if method in methods:
            attempt(
                method,
                lambda make_model=make_model: cleanlab_detection(
                    noisy,
                    *cross_val_probs(make_model(), data.x_table, noisy, seed),
                ),
            )
    if CL_TORCH in methods or ARGMAX in methods:
        try:
            recipe = compare_module().RecipeClassifier(
                seed=seed, epochs=audit_epochs(len(noisy)), device="auto"
            )
            probs, seconds = cross_val_probs(recipe, data.x_model, noisy, seed)
        except Exception as error:
            for method in (CL_TORCH, ARGMAX):
                if method in methods:
                    report(method, None, f"{type(error).__name__}: {error}")
            return
        if CL_TORCH in methods:
            attempt(CL_TORCH, lambda: cleanlab_detection(noisy, probs, seconds))
        if ARGMAX in methods:
            attempt(ARGMAX, lambda: argmax_detection(noisy, probs, seconds))


# ============================================================================================
# measures (pure: no training, no cleanlab)


def measure(detection: Detection, noisy: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Compare one detection with the truth over every input row.

    A row the method left out counts as not flagged with score 0, so a method cannot gain by
    dropping rows; ``coverage`` reports the share it did return.

    Parameters
    ----------
    detection : Detection
    noisy : numpy.ndarray of int, shape (N,)
        The labels the method saw.
    truth : numpy.ndarray of int, shape (N,)
        The clean labels; a row is mislabelled when they differ.

    Returns
    -------
    dict
        ``coverage``, ``precision``, ``recall``, ``f1``, ``auroc`` (None without mislabelled
        rows; ``auroc`` also None when every row is), ``flagged``, ``flagged_share``,
        ``suggestion_acc`` (share of correctly flagged rows whose suggested label is the true
        one; None without correctly flagged rows) and ``seconds``.
    """
    covered = np.asarray(detection.covered, dtype=bool)
    flags = np.asarray(detection.flags, dtype=bool) & covered
    scores = np.where(covered, np.asarray(detection.scores, dtype=float), 0.0)
    wrong = np.asarray(noisy) != np.asarray(truth)
    out: dict[str, Any] = dict.fromkeys(("precision", "recall", "f1", "auroc", "suggestion_acc"))
    out["coverage"] = float(covered.mean())
    if wrong.any():
        out["precision"] = float(precision_score(wrong, flags, zero_division=0))
        out["recall"] = float(recall_score(wrong, flags, zero_division=0))
        out["f1"] = float(f1_score(wrong, flags, zero_division=0))
        if not wrong.all():
            out["auroc"] = float(roc_auc_score(wrong, scores))
    hit = flags & wrong
    if hit.any():
        out["suggestion_acc"] = float(np.mean(np.asarray(detection.suggested)[hit] == truth[hit]))
    out["flagged"] = int(flags.sum())
    out["flagged_share"] = float(flags.mean())
    out["seconds"] = float(detection.seconds)
    to_flags = detection.seconds_to_flags
    out["seconds_to_flags"] = float(detection.seconds if to_flags is None else to_flags)
    return out


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    return float(np.mean(values)) if values else math.nan


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def group(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Rows by (dataset, setting, method), in the order they first appear."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault((row["dataset"], row["setting"], row["method"]), []).append(row)
    return out


def summary_f1(rows: Sequence[dict[str, Any]], split: str, min_rate: float = 0.2) -> dict:
    """Mean F1 (and AUROC, seconds, cells) per method over a split at ``rate >= min_rate``."""
    chosen = [r for r in rows if r["split"] == split and r["rate"] >= min_rate and not r["error"]]
    return {
        method: {
            "f1": _mean(of, "f1"),
            "auroc": _mean(of, "auroc"),
            "seconds": _mean(of, "seconds"),
            "cells": len(of),
        }
        for method in METHODS
        if (of := [r for r in chosen if r["method"] == method])
    }


def wins(rows: Sequence[dict[str, Any]], min_rate: float = 0.2) -> dict[str, dict[str, Any]]:
    """Per dataset: settings (rate >= min_rate) each method wins on mean F1 over the seeds.

    Ties credit every tied method. ``best`` is the method with the highest F1 averaged over those
    settings.
    """
    out: dict[str, dict[str, Any]] = {}
    grouped = group([r for r in rows if r["rate"] >= min_rate and not r["error"]])
    by_dataset: dict[str, dict[str, dict[str, float]]] = {}
    for (dataset, setting, method), of in grouped.items():
        f1 = _mean(of, "f1")
        if not math.isnan(f1):
            by_dataset.setdefault(dataset, {}).setdefault(setting, {})[method] = f1
    for dataset, by_setting in by_dataset.items():
        counts = dict.fromkeys(METHODS, 0)
        for f1s in by_setting.values():
            top = max(f1s.values())
            for method, f1 in f1s.items():
                counts[method] += int(np.isclose(f1, top))
        means = {
            m: float(np.mean([f[m] for f in by_setting.values() if m in f]))
            for m in METHODS
            if any(m in f for f in by_setting.values())
        }
        best = max(means, key=lambda m: means[m])
        out[dataset] = {
            "settings": len(by_setting),
            "wins": counts,
            "mean_f1": means,
            "best": best,
        }
    return out


# ============================================================================================
# reporting


def _cell(rows: Sequence[dict[str, Any]], clean: bool) -> str:
    if rows and all(r["error"] for r in rows):
        return "error"
    seconds = f"{_mean(rows, 'seconds'):.1f} s"
    if clean:
        return f"flags {_mean(rows, 'flagged_share'):.1%} · {seconds}"
    return f"F1 {_fmt(_mean(rows, 'f1'))} · AUROC {_fmt(_mean(rows, 'auroc'))} · {seconds}"


def split_tables(rows: Sequence[dict[str, Any]], split: str) -> list[str]:
    """Markdown for one split: every method side by side, then every measure per method."""
    markdown_table = compare_module().markdown_table
    chosen = [r for r in rows if r["split"] == split]
    if not chosen:
        return [f"No dataset of the {split} split was run.", ""]
    grouped = group(chosen)
    cells = list(dict.fromkeys((r["dataset"], r["setting"]) for r in chosen))
    side = []
    for dataset, setting in cells:
        clean = setting == "clean"
        audit = grouped.get((dataset, setting, DM_AUDIT), [])
        side.append(
            [
                dataset,
                setting,
                _fmt(_mean(audit, "coverage")) if audit else "–",
                *(
                    _cell(grouped[(dataset, setting, m)], clean)
                    if (dataset, setting, m) in grouped
                    else "–"
                    for m in METHODS
                ),
            ]
        )
    detail = []
    for (dataset, setting, method), of in grouped.items():
        errors = sorted({r["error"] for r in of if r["error"]})
        detail.append(
            [
                dataset,
                setting,
                method,
                _fmt(_mean(of, "realised_noise")),
                _fmt(_mean(of, "coverage")),
                _fmt(_mean(of, "precision")),
                _fmt(_mean(of, "recall")),
                _fmt(_mean(of, "f1")),
                _fmt(_mean(of, "auroc")),
                _fmt(_mean(of, "flagged"), 1),
                _fmt(_mean(of, "flagged_share")),
                _fmt(_mean(of, "suggestion_acc")),
                _fmt(_mean(of, "seconds"), 1),
                "; ".join(errors)[:200],
            ]
        )
    return [
        markdown_table(["dataset", "noise", "dm-audit coverage", *METHODS], side),
        "",
        "<details><summary>Every measure</summary>",
        "",
        markdown_table(
            [
                "dataset",
                "noise",
                "method",
                "noise rate",
                "coverage",
                "precision",
                "recall",
                "F1",
                "AUROC",
                "flagged",
                "flagged share",
                "suggestion acc.",
                "seconds",
                "error",
            ],
            detail,
        ),
        "",
        "</details>",
        "",
    ]


def time_to_flags(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per dataset: dm-audit's seconds to its flags, cleanlab + torch's 5 trainings and
    `find_label_issues`, and their ratio, each the median over the dataset's settings."""
    out: dict[str, dict[str, float]] = {}
    grouped = group([r for r in rows if not r["error"]])
    by_dataset: dict[str, list[tuple[float, float]]] = {}
    for (dataset, setting, method), of in grouped.items():
        if method != DM_AUDIT or (dataset, setting, CL_TORCH) not in grouped:
            continue
        ours = _mean(of, "seconds_to_flags")
        theirs = _mean(grouped[(dataset, setting, CL_TORCH)], "seconds")
        if math.isfinite(ours) and math.isfinite(theirs) and theirs > 0:
            by_dataset.setdefault(dataset, []).append((ours, theirs))
    for dataset, pairs in by_dataset.items():
        ours, theirs = np.array(pairs).T
        out[dataset] = {
            "dm_audit_to_flags": float(np.median(ours)),
            "cleanlab_torch": float(np.median(theirs)),
            "ratio": float(np.median(ours / theirs)),
        }
    return out


def time_to_flags_lines(
    rows: Sequence[dict[str, Any]], run_names: Sequence[str], markdown_table: Callable
) -> list[str]:
    """The time-to-flags section of generality.md (empty without both methods)."""
    times = time_to_flags(rows)
    if not times:
        return []
    return [
        "## Time to the flags",
        "",
        "dm-audit's seconds from the start of `run_audit` to the end of its flags stage (probe, "
        "audit training, scoring with the linear reference, flags; not the corrections, the "
        "retrain or the report) against cleanlab + torch's 5 trainings of the same model family "
        "and `find_label_issues`, measured in the same run; medians over each dataset's "
        "settings, and the median of the per-setting ratios.",
        "",
        markdown_table(
            ["dataset", "split", "dm-audit to flags (s)", "cleanlab + torch (s)", "ratio"],
            [
                [
                    name,
                    SPECS[name].split if name in SPECS else "?",
                    _fmt(t["dm_audit_to_flags"], 1),
                    _fmt(t["cleanlab_torch"], 1),
                    _fmt(t["ratio"], 2),
                ]
                for name in run_names
                if (t := times.get(name))
            ],
        ),
        "",
    ]


def write_results(out: Path, provenance: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Write ``generality.md`` and ``generality.json`` into `out`."""
    markdown_table = compare_module().markdown_table
    summary = {split: summary_f1(rows, split) for split in SPLITS}
    per_dataset = wins(rows)
    document = {
        **provenance,
        "summary": summary,
        "wins": per_dataset,
        "time_to_flags": time_to_flags(rows),
        "rows": rows,
    }
    (out / "generality.json").write_text(
        json.dumps(to_jsonable(document), indent=1, allow_nan=False)
    )

    machine, load = provenance["machine"], provenance["load_average"]
    datasets = provenance["datasets"]
    run_names = list(dict.fromkeys(r["dataset"] for r in rows))
    lines = [
        "# Label-issue detection across datasets: dm-audit's defaults and cleanlab",
        "",
        f"Command: `{provenance['command']}`. Seeds {provenance['seeds']} (each seed sets the "
        "synthetic data, the noise, the folds and every training); tables show the mean over "
        "the seeds.",
        "",
        f"Machine: `{machine['machine']}` ({machine['platform']}), {machine['cpu_count']} CPU "
        f"cores, {provenance['threads']} thread(s) for torch, faiss and scikit-learn, device "
        f"`{machine['device']}`. Python {machine['python']}; "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
        + ".",
        "",
        f"Wall time {provenance['seconds'] / 60:.1f} min. Load average (1/5/15 min) "
        f"{load['start']} at the start, {load['end']} at the end: on a shared machine the "
        "seconds are higher than on an idle one; compare them within a row, where every method "
        "ran under the same conditions.",
        "",
        "## Datasets and the fixed dev/test split",
        "",
        "The split was fixed before any result was seen: defaults may be tuned on `dev`, `test` "
        "is only reported. Every row is in the audited (train) split; nothing is downloaded.",
        "",
        markdown_table(
            [
                "dataset",
                "split",
                "size",
                "rows",
                "input",
                "classes",
                "largest/smallest",
                "tags",
                "in this run",
            ],
            [
                [
                    d["name"],
                    d["split"],
                    d["size"],
                    f"{d['rows']:,}",
                    d["input"],
                    d["classes"],
                    f"{d['imbalance']:.1f}",
                    ", ".join(d["tags"]) or "–",
                    "yes" if d["name"] in run_names else "no",
                ]
                for d in datasets
            ],
        ),
        "",
        *(f"* **{d['name']}**: {d['note']}." for d in datasets),
        "",
        "## Protocol",
        "",
        "Noise (`dm_audit.noise`), applied to the clean labels of every row: symmetric flips "
        "exactly ⌊rN⌋ labels to another class chosen uniformly; pair flips ⌊r n_k⌋ labels of "
        "each class k to k+1 mod C; instance-dependent (`inject_instance_dependent`) flips the "
        "⌊rN⌋ examples that a logistic regression on standardised features, trained on the clean "
        "labels (5-fold out-of-sample probabilities), finds most confusable, each to the class "
        "it confuses them with (cleanlab + LR trains the same model family, on the noisy labels, "
        "so this noise sits where its model is least sure). A row is mislabelled when its noisy "
        "label differs from the clean one.",
        "",
        "Methods, all on the same noisy labels:",
        "",
        f"* **{DM_AUDIT}**: `run_audit(dataset, AuditConfig(progress=False, seed=seed))`, every "
        "other option at its default, no output folder; `is_label_issue`, `label_issue_score` "
        "and `suggested_label` of `report.examples`, aligned by `example_id`. Seconds: the whole "
        "`run_audit` (probe, audit training, flags, corrections, retrain, report tables); the "
        "time to its flags is in its own section.",
        f"* **{CL_LR}**, **{CL_HGB}**, **{CL_TORCH}**: cleanlab `find_label_issues` (defaults) "
        f"on {CV_FOLDS}-fold stratified out-of-sample `predict_proba` of a `LogisticRegression` "
        "after a `StandardScaler`, a `HistGradientBoostingClassifier`, and the model family "
        "dm-audit trains (its MLP or ResNet-20, cross entropy, the audit's default epochs and "
        "batch for the training set's size; `compare.RecipeClassifier`). Score: 1 − "
        "`get_label_quality_scores`. Suggested label: the out-of-sample prediction. Seconds: "
        "the 5 trainings and `find_label_issues`. The image folder runs only the torch model.",
        f"* **{ARGMAX}**: flag where the same out-of-sample torch prediction differs from the "
        "given label; score 1 − p(given label). Seconds: the 5 trainings.",
        "",
        "Measures over every input row: coverage (share of rows the method returned; a missing "
        "row counts as not flagged, score 0), precision, recall, F1 of the flags and AUROC of "
        "the score against the truth; flags (share of rows flagged: on clean data every flag is "
        "a false alarm); suggestion acc. (share of correctly flagged rows whose suggested label "
        "is the true one); seconds.",
        "",
        "## Summary",
        "",
    ]
    for split in SPLITS:
        if not summary[split]:
            continue
        lines += [
            f"Mean over the **{split}** split's settings with at least 20 % noise:",
            "",
            markdown_table(
                ["method", "mean F1", "mean AUROC", "mean seconds", "cells"],
                [
                    [m, _fmt(s["f1"]), _fmt(s["auroc"]), _fmt(s["seconds"], 1), s["cells"]]
                    for m, s in summary[split].items()
                ],
            ),
            "",
        ]
    if per_dataset:
        lines += [
            "Wins per dataset: settings with at least 20 % noise where the method has the best "
            "mean F1 (ties count for each tied method), and the method with the best F1 averaged "
            "over them.",
            "",
            markdown_table(
                ["dataset", "split", "settings", *METHODS, "best mean F1"],
                [
                    [
                        name,
                        SPECS[name].split if name in SPECS else "?",
                        w["settings"],
                        *(w["wins"][m] for m in METHODS),
                        f"{w['best']} ({w['mean_f1'][w['best']]:.3f})",
                    ]
                    for name in run_names
                    if (w := per_dataset.get(name))
                ],
            ),
            "",
        ]
    lines += time_to_flags_lines(rows, run_names, markdown_table)
    for split in SPLITS:
        lines += [
            f"## Results: {split} split",
            "",
            "Each cell: F1 · AUROC · seconds; on clean data the share flagged instead.",
            "",
            *split_tables(rows, split),
        ]
    (out / "generality.md").write_text("\n".join(lines))


def describe(spec: DatasetSpec, data: BenchData) -> dict[str, Any]:
    """The dataset's row of the split table."""
    counts = np.bincount(data.labels, minlength=data.n_classes)
    shape = data.x_model.shape[1:]
    return {
        "name": spec.name,
        "split": spec.split,
        "size": spec.size,
        "rows": len(data.labels),
        "classes": data.n_classes,
        "input": "image " + "x".join(str(s) for s in shape) if data.is_image else f"{shape[0]}-d",
        "imbalance": float(counts.max() / max(counts.min(), 1)),
        "tags": list(spec.tags),
        "note": spec.note,
    }


def machine_info() -> dict[str, Any]:
    """The machine and library versions, recorded with the results."""
    from dm_audit.training import resolve_device

    version = compare_module()._version
    return {
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "device": str(resolve_device("auto")),
        "versions": {
            name: version(name)
            for name in ("dm-audit", "torch", "numpy", "scikit-learn", "cleanlab", "faiss-cpu")
        },
    }


# ============================================================================================
# main

# Two quick datasets with one setting each: the new noise kind and the tabular path.
QUICK = {"iris": Setting("instance", 0.2), "wine": Setting("symmetric", 0.2)}


def _record(
    rows: list[dict[str, Any]],
    base: dict[str, Any],
    noisy: np.ndarray,
    truth: np.ndarray,
    started: float,
    method: str,
    detection: Detection | None,
    error: str | None,
) -> None:
    """Measure one method's detection into `rows` and print its progress line."""
    row = {**base, "method": method, "error": error}
    if detection is not None:
        row |= measure(detection, noisy, truth)
    rows.append(row)
    if error:
        result = f"ERROR {error}"
    else:
        f1 = math.nan if row["f1"] is None else row["f1"]
        result = (
            f"F1 {_fmt(f1)} flagged {row['flagged']:>5} coverage {row['coverage']:.2f} "
            f"{row['seconds']:7.1f} s"
        )
    print(
        f"[{time.perf_counter() - started:6.0f} s] {base['dataset']:<22} {base['setting']:<14} "
        f"seed {base['seed']} {method:<17} {result}",
        flush=True,
    )


def _choose_datasets(names: Sequence[str] | None, split: str) -> list[DatasetSpec]:
    if names:
        unknown = [n for n in names if n not in SPECS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(SPECS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SystemExit(f"unknown dataset {unknown[0]!r}{hint} (choose from {list(SPECS)})")
        chosen = [SPECS[n] for n in names]
    else:
        chosen = list(DATASETS)
    return [s for s in chosen if split == "all" or s.split == split]


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return row["dataset"], row["setting"], row["seed"], row["method"]


def merge_results(paths: Sequence[Path], out: Path) -> None:
    """Write the rows of several runs' ``generality.json`` as one result.

    The provenance keeps each run's command, wall time and load average; the machine and the
    dataset table are the first run's (the runs are of one machine). A later run's row replaces
    an earlier run's of the same dataset, setting, seed and method: a change that touches some
    datasets only reruns those.
    """
    documents = [json.loads(Path(p).read_text()) for p in paths]
    first = documents[0]
    provenance = {
        # The runs (in parallel, into their own folders), then this merge.
        "command": " & ".join(d["command"] for d in documents)
        + " ; then uv run --group bench python benchmarks/generality.py --merge "
        + " ".join(str(p) for p in paths),
        "seeds": sorted({s for d in documents for s in d["seeds"]}),
        "threads": first["threads"],
        "machine": first["machine"],
        "seconds": max(d["seconds"] for d in documents),
        "load_average": {
            "start": first["load_average"]["start"],
            "end": documents[-1]["load_average"]["end"],
        },
        "datasets": first["datasets"],
    }
    latest = {_row_key(row): row for d in documents for row in d["rows"]}
    rows = list(latest.values())
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, provenance, rows)
    print(f"merged {len(paths)} runs into {out / 'generality.md'}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--split", choices=["dev", "test", "all"], default="all")
    parser.add_argument("--datasets", nargs="+", default=None, help="default: every dataset")
    parser.add_argument("--noise", nargs="+", choices=NOISE_KINDS, default=list(NOISE_KINDS))
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{', '.join(QUICK)}: one setting each, < 2 min"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch, faiss and scikit-learn (1: stable timings when shared)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="write the results of earlier runs' generality.json files as one (runs of the "
        "dev and the test split in parallel), measuring nothing",
    )
    args = parser.parse_args(argv)
    if args.merge:
        merge_results(args.merge, args.out)
        return
    if any(not 0.0 <= r < 1.0 for r in args.rates):
        parser.error(f"--rates must lie in [0, 1), got {args.rates}")
    args.out.mkdir(parents=True, exist_ok=True)

    from threadpoolctl import threadpool_limits

    compare = compare_module()
    compare.set_threads(args.threads)
    # HistGradientBoosting and BLAS use OpenMP threads of their own: held to the same count.
    threadpool_limits(limits=args.threads)
    if args.quick:
        specs = [SPECS[n] for n in QUICK]
        grid = {n: [s] for n, s in QUICK.items()}
    else:
        specs = _choose_datasets(args.datasets, args.split)
        grid = {s.name: settings(args.noise, args.rates) for s in specs}
        if not specs:
            parser.error(f"no dataset of --datasets {args.datasets} is in the {args.split} split")
    command = "uv run --group bench python benchmarks/generality.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    load_start = compare._load()
    started = time.perf_counter()
    machine = machine_info()
    compare.warm_up("auto")
    rows: list[dict[str, Any]] = []

    with tempfile.TemporaryDirectory(prefix="dm-audit-generality-") as tmp:
        # The whole split table goes into the results, whichever datasets this run measures.
        described = []
        for spec in DATASETS:
            workdir = Path(tmp) / f"{spec.name}-describe"
            workdir.mkdir()
            described.append(describe(spec, spec.build(workdir, args.seeds[0])))
        for spec in specs:
            for seed in args.seeds:
                workdir = Path(tmp) / f"{spec.name}-{seed}"
                workdir.mkdir()
                data = spec.build(workdir, seed)
                methods = IMAGE_METHODS if data.is_image else METHODS
                needs_probs = any(s.kind == "instance" for s in grid[spec.name])
                probs = confusion_probs(data, seed) if needs_probs else None
                for setting in grid[spec.name]:
                    noisy = make_noisy(data, setting, seed, probs)
                    base = {
                        "dataset": spec.name,
                        "split": spec.split,
                        "size": spec.size,
                        "tags": list(spec.tags),
                        "rows": len(noisy),
                        "classes": data.n_classes,
                        "setting": setting.name,
                        "noise": setting.kind,
                        "rate": setting.rate,
                        "seed": seed,
                        "realised_noise": float(np.mean(noisy != data.labels)),
                    }

                    record = functools.partial(_record, rows, base, noisy, data.labels, started)
                    run_methods(data, noisy, seed, methods, record)
                    provenance = {
                        "command": command.strip(),
                        "seeds": list(args.seeds),
                        "threads": args.threads,
                        "machine": machine,
                        "seconds": time.perf_counter() - started,
                        "load_average": {"start": load_start, "end": compare._load()},
                        "datasets": described,
                    }
                    # Rewritten after every setting: an interrupted grid keeps what it measured.
                    write_results(args.out, provenance, rows)
    print(f"wrote {args.out / 'generality.md'} and generality.json", flush=True)


if __name__ == "__main__":
    main()
