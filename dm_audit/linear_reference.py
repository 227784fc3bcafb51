"""A second, linear model family whose out-of-sample probabilities join the network's.

The audit's network sees every row out of sample through two-fold cross-fitting, so each fold
model learns from half of the rows. On small tables that is where it is weakest: a linear model
(multinomial logistic regression on standardised features) has far fewer parameters to fit from
the same rows and errs differently. `reference_probs` cross-fits one on `REFERENCE_FOLDS`
stratified folds; the flags, the noise count and the suggested labels then read a mix of the
two families' probabilities, each weighing by its skill
(`dm_audit.stage_results.ExampleScores.ensemble_probs` for the flags, the count and the
suggested class, `combined_probs` for a suggestion's confidence), while the per-row p_i,
emphasis weight and training dynamics stay the DM network's.

Chosen on the development split of benchmarks/generality.py (results/generality.md): the
label-issue ranking's AUROC at 20-40 % noise rose from 0.908 to 0.919 (mean), rows flagged on
clean tables fell from 3.6 to 2.1 % (mean), and the suggested label of a correctly flagged row
at 20 % noise was the true one more often (92 -> 94 %); the mean F1 moved from 0.688 to 0.681,
as fewer rows are counted under instance-dependent noise that a logistic regression chose.
Those figures are for equal weights. The two families now weigh by their skill on the given
labels (`dm_audit.stage_results.FamilyWeights`), which keeps a network that learned nothing on a
small table from halving the reference's evidence (benchmarks/results/family_weights.md); a
stacking weight fitted to the noisy labels' log-loss had given a lower F1 than equal weights.
Images keep the network alone: a linear model of raw pixels is not a reference worth averaging
with a convolutional network.

A class with too few rows for five fold models (`MIN_CLASS_ROWS`) is left to the network: the
reference is fitted on the other classes' rows, gives the small class probability 0, and
abstains on the small class's own rows (a row of NaN), where the ensemble reads the network
alone, so one stray label of a class of its own (a typo, a class added by hand) does not cost
the whole table its reference. On the four development datasets with one such row
(benchmarks/small_classes.py), this flags 2.8 % of the correct rows of the tables as they are
where going without the reference flags 4.5 %; AUROC at 20-40 % noise 0.916 against 0.906, F1
0.683 against 0.694: the trade the reference makes on any table, fewer rows counted under
instance-dependent noise that a logistic regression chose.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dm_audit.array_checks import validate_labels
from dm_audit.errors import DataError
from dm_audit.progress import progress_bar

__all__ = [
    "MAX_REFERENCE_ROWS",
    "MIN_CLASS_ROWS",
    "REFERENCE_FOLDS",
    "classes_left_out",
    "learnable_classes",
    "reference_probs",
    "skip_reason",
]

# Five folds (scikit-learn's and cleanlab's default): each linear model learns from 80 % of the
# rows, which matters on the small tables where the reference helps most, and a linear fit is
# cheap enough to run five times (0.1-0.4 s on the 10,000-row development tables).
REFERENCE_FOLDS = 5
# Above this many rows the network has learnt from enough rows that the reference no longer
# changes the flags (10,000-row development tables: F1 within 0.008 either way), and the
# standardised float64 copy of the features would cost more memory than the audit's streaming
# path keeps (the same size as `dm_audit.scoring.STREAM_THRESHOLD`).
MAX_REFERENCE_ROWS = 200_000
# Every class needs two rows per fold, so each of the five models trains on at least eight rows
# of it. With fewer, the L2-regularised fit gives a small class a low probability even on its
# own rows (p_given 0.17 on classes of 2 rows, 0.40 on classes of 3, on a clean few-shot table),
# which flags correct rows and corrupts the count (a 2-row class among 300 rows: its per-class
# threshold fell to 0.006 and the estimated noise rose from 0.7 to 15 %); and a class smaller
# than the folds cannot be stratified at all. The network alone audits such classes' rows.
MIN_CLASS_ROWS = 2 * REFERENCE_FOLDS
# L-BFGS iterations per fit; a noisy table may stop short of full convergence, which changes the
# probabilities far less than the label noise does.
MAX_ITER = 1_000


def learnable_classes(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Which classes hold enough rows for the reference (`MIN_CLASS_ROWS`), (C,) bool."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)
    return counts >= MIN_CLASS_ROWS


def classes_left_out(labels: np.ndarray, classes: list[str]) -> list[str]:
    """Names of the classes some row is given that are too small for the reference: it abstains
    on their rows and the network audits them alone."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    small = (counts > 0) & ~learnable_classes(labels, len(classes))
    return [classes[k] for k in np.flatnonzero(small)]


def skip_reason(
    input_kind: str, labels: np.ndarray, n_classes: int, enabled: bool = True
) -> str | None:
    """Why an audit of these rows goes without the linear reference; None when it uses one.

    Parameters
    ----------
    input_kind : {"features", "image"}
    labels : np.ndarray, shape (N,)
        Given labels as integer codes.
    n_classes : int
    enabled : bool
        `AuditConfig.linear_reference`.
    """
    if not enabled:
        return "switched off"
    if input_kind != "features":
        return "images are audited by the network alone"
    n_rows = len(labels)
    if n_rows > MAX_REFERENCE_ROWS:
        return f"{n_rows:,} rows, above {MAX_REFERENCE_ROWS:,}"
    learnable = int(learnable_classes(labels, n_classes).sum())
    if learnable < 2:
        return (
            f"{learnable} class(es) with at least {MIN_CLASS_ROWS} rows: a linear model of "
            f"{REFERENCE_FOLDS} folds needs two"
        )
    return None


def reference_probs(
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    seed: int = 0,
    progress: str | None = None,
) -> np.ndarray | None:
    """Out-of-sample class probabilities of a cross-fitted logistic regression.

    Parameters
    ----------
    features : np.ndarray, shape (N, D)
        Finite feature vectors (the dataset's encoded table).
    labels : np.ndarray, shape (N,)
        Given labels as integer codes in ``0..n_classes-1``.
    n_classes : int
        Number of classes C; a class a fold's model never saw gets probability 0 there.
    seed : int
        Seeds the folds.
    progress : str, optional
        Label of a progress bar over the folds.

    Returns
    -------
    np.ndarray of float32, shape (N, C), or None
        Every row's probabilities under the model that did not train on it; a row of NaN where
        the reference abstains (a row of a class with fewer than `MIN_CLASS_ROWS` rows, which
        it neither learns nor predicts). None when some fold's training rows hold a single
        class (no linear model to fit).
    """
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"features must be a non-empty (N, D) matrix, got shape {x.shape}")
    y = validate_labels(labels, x.shape[0], n_classes)
    if x.shape[0] < REFERENCE_FOLDS:
        raise DataError(f"{x.shape[0]} rows cannot be dealt into {REFERENCE_FOLDS} folds")
    # Only the rows of classes large enough to learn; the others keep their row of NaN.
    rows = np.flatnonzero(learnable_classes(y, n_classes)[y])
    out = np.full((x.shape[0], n_classes), np.nan, dtype=np.float32)
    if rows.size < REFERENCE_FOLDS:
        return None
    out[rows] = 0.0
    if rows.size < y.size:
        x, y = x[rows], y[rows]
    folds = StratifiedKFold(REFERENCE_FOLDS, shuffle=True, random_state=seed)
    bar = progress_bar(total=REFERENCE_FOLDS, desc=progress, unit="fold", disable=progress is None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for train, held_out in folds.split(np.zeros(y.size), y):
            if np.unique(y[train]).size < 2:
                bar.close()
                return None
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=MAX_ITER))
            model.fit(x[train], y[train])
            classes = model.classes_.astype(np.int64)
            out[np.ix_(rows[held_out], classes)] = model.predict_proba(x[held_out])
            bar.update(1)
    bar.close()
    return out
