"""Accuracy, entropy and confidence, the six noisy-label metrics (clean and noisy-subset fit,
correction, test accuracy, entropies), and a paired test of two models' accuracies.

Arrays in, numbers out. ``probs`` is a float array ``(N, C)`` whose rows sum to 1; labels are
int codes ``0..C-1``; true labels use ``-1`` for open-set examples (inputs of no known class).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "accuracy",
    "balanced_accuracy_vs_chance",
    "confidence",
    "given_probability",
    "margin",
    "max_probability",
    "mcnemar_worse_p",
    "normalised_entropy",
    "paired_accuracy_test",
    "six_metrics",
]

# Up to this many discordant pairs the binomial tail is summed exactly in integers; above it,
# in log space (float rounding only, and linear rather than quadratic cost in the count).
_EXACT_TAIL_LIMIT = 10_000
# A balanced accuracy counts as chance up to 1/C plus the larger of this slack and _CHANCE_Z
# standard errors of a predictor that ignores its input (see balanced_accuracy_vs_chance).
_CHANCE_SLACK = 0.02
_CHANCE_Z = 3.0
# Classes of fewer rows are left out of the chance test: their recall moves in steps of 1/n, so
# one row moves it by more than 0.2, ten times the slack, and a model that leaves a class of 1-4
# rows unlearned may well be right (they may be the mislabelled ones: 298 rows of one class and
# 2 of another made every epoch look like chance and stopped every correction).
_MIN_JUDGED_ROWS = 5


def _probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, C) with C >= 2, got {p.shape}")
    return p


def _labels(labels: np.ndarray, n: int, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {y.shape}")
    return y.astype(np.int64, copy=False)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of examples whose predicted class equals the label.

    Parameters
    ----------
    predictions : array (N, C) float or (N,) int
        Probabilities / logits (argmax is taken) or predicted class codes.
    labels : array (N,) int
        Reference labels.

    Returns
    -------
    float
        Accuracy in [0, 1]; NaN for ``N == 0``.
    """
    pred = np.asarray(predictions)
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    y = _labels(labels, pred.shape[0])
    if y.size == 0:
        return float("nan")
    return float(np.mean(pred == y))


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """H(p) / H(uniform) per row, in [0, 1].

    Parameters
    ----------
    probs : array (N, C)

    Returns
    -------
    array (N,) float32
    """
    p = _probs(probs).astype(np.float64, copy=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return np.clip(h / math.log(p.shape[1]), 0.0, 1.0).astype(np.float32)


def confidence(probs: np.ndarray) -> np.ndarray:
    """Entropy confidence 1 − H(p)/H(u) per row, shape ``(N,)`` float32 (ProSelfLC's l(p))."""
    return (1.0 - normalised_entropy(probs)).astype(np.float32)


def max_probability(probs: np.ndarray) -> np.ndarray:
    """Largest class probability max_j p_j per row, shape ``(N,)`` float32."""
    return _probs(probs).max(axis=1).astype(np.float32)


def given_probability(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """p_i = probs[i, labels[i]], shape ``(N,)`` float32."""
    p = _probs(probs)
    y = _labels(labels, p.shape[0])
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in 0..{p.shape[1] - 1}")
    return p[np.arange(p.shape[0]), y].astype(np.float32)


def margin(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """p_i minus the largest probability of any other class, shape ``(N,)`` in [-1, 1].

    Negative: the model prefers another class to the given one (cleanlab's "normalized margin").
    """
    p = _probs(probs)
    y = _labels(labels, p.shape[0])
    rows = np.arange(p.shape[0])
    given = p[rows, y]
    others = p.copy()
    others[rows, y] = -np.inf
    return (given - others.max(axis=1)).astype(np.float32)


def six_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    true_labels: np.ndarray,
    *,
    test_probs: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
) -> dict[str, float | int]:
    """The per-epoch metrics of METHOD.md §4 on a training set with known clean labels.

    Parameters
    ----------
    probs : array (N, C)
        Model probabilities on the training examples.
    labels : array (N,) int
        Given (possibly noisy) labels.
    true_labels : array (N,) int
        Clean labels; ``-1`` marks open-set examples, which are kept out of the clean and noisy
        subsets and reported on their own.
    test_probs, test_labels : array (M, C), array (M,), optional
        Held-out predictions for the generalisation metric.

    Returns
    -------
    dict
        ``clean_fit`` (1: accuracy on the clean subset), ``noisy_fit`` (2: noisy subset vs its
        noisy labels, lower is better), ``noisy_correction`` (3: noisy subset vs its true
        labels), ``test_acc`` (4), ``entropy_clean`` and ``entropy_noisy`` (5, 6: mean
        normalised entropy), the confidence metrics ``confidence_clean`` / ``confidence_noisy``
        (mean 1 − H(p)/H(u)) and ``max_prob_clean`` / ``max_prob_noisy`` (mean max_j p_j),
        ``open_set_fit`` (open-set examples vs their given labels), ``entropy_open_set``, and
        the subset sizes ``n_clean``, ``n_noisy``, ``n_open_set``. A metric over an empty subset
        is NaN.
    """
    p = _probs(probs)
    n = p.shape[0]
    y = _labels(labels, n)
    t = _labels(true_labels, n, "true_labels")
    pred = p.argmax(axis=1)
    ent = normalised_entropy(p)
    top = p.max(axis=1)
    open_set = t < 0
    clean = (t == y) & ~open_set
    noisy = (t != y) & ~open_set

    def mean(values: np.ndarray, mask: np.ndarray) -> float:
        return float(values[mask].mean()) if mask.any() else float("nan")

    out = {
        "clean_fit": mean(pred == y, clean),
        "noisy_fit": mean(pred == y, noisy),
        "noisy_correction": mean(pred == t, noisy),
        "test_acc": float("nan"),
        "entropy_clean": mean(ent, clean),
        "entropy_noisy": mean(ent, noisy),
        "confidence_clean": mean(1.0 - ent, clean),
        "confidence_noisy": mean(1.0 - ent, noisy),
        "max_prob_clean": mean(top, clean),
        "max_prob_noisy": mean(top, noisy),
        "open_set_fit": mean(pred == y, open_set),
        "entropy_open_set": mean(ent, open_set),
        "n_clean": int(clean.sum()),
        "n_noisy": int(noisy.sum()),
        "n_open_set": int(open_set.sum()),
    }
    if test_probs is not None:
        if test_labels is None:
            raise ValueError("test_probs given without test_labels")
        out["test_acc"] = accuracy(test_probs, test_labels)
    return out


def _half_binomial_tail(k: int, m: int) -> float:
    """P(X >= k) for X ~ Binomial(m, 1/2)."""
    if k <= 0:
        return 1.0
    if k > m:
        return 0.0
    # By symmetry P(X >= k) = P(X <= m - k): a sum of m - k + 1 terms; the complement
    # 1 - P(X <= k - 1) takes k terms. Sum the shorter one.
    direct = m - k + 1 <= k
    top = m - k if direct else k - 1
    if m <= _EXACT_TAIL_LIMIT:
        coef, total = 1, 1  # C(m, 0) and the running sum of C(m, j), j <= top
        for j in range(top):
            coef = coef * (m - j) // (j + 1)
            total += coef
        numerator = total if direct else (1 << m) - total
        return numerator / (1 << m)  # one correctly rounded division of exact integers
    j = np.arange(top, dtype=np.float64)
    log_coef = np.concatenate(([0.0], np.cumsum(np.log(m - j) - np.log(j + 1))))
    peak = float(log_coef.max())
    log_lower = peak + math.log(float(np.exp(log_coef - peak).sum())) - m * math.log(2.0)
    tail = math.exp(log_lower) if direct else -math.expm1(log_lower)
    return min(1.0, max(0.0, tail))


def _count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def mcnemar_worse_p(before_only: int, after_only: int) -> float:
    """One-sided exact McNemar p-value that the "after" model is less accurate.

    Two models scored on the same examples against the same labels differ in accuracy only
    through the discordant examples: ``before_only`` (b) that only the first model gets right
    and ``after_only`` (c) that only the second gets right. If both are equally accurate, each
    discordant example is equally likely to fall either way, so b ~ Binomial(b + c, 1/2) and the
    p-value of b or more is ``P(Binomial(b + c, 1/2) >= b)``.

    Parameters
    ----------
    before_only, after_only : int
        Discordant counts (non-negative).

    Returns
    -------
    float
        The p-value in (0, 1]; 1.0 without discordant examples.

    Examples
    --------
    >>> mcnemar_worse_p(2, 0)  # two examples lost, none gained: P(X >= 2), X ~ Bin(2, 1/2)
    0.25
    >>> mcnemar_worse_p(0, 5)
    1.0
    """
    b = _count(before_only, "before_only")
    c = _count(after_only, "after_only")
    return _half_binomial_tail(b, b + c)


def paired_accuracy_test(
    before_correct: np.ndarray, after_correct: np.ndarray
) -> dict[str, float | int]:
    """Accuracies of two models on the same examples and the p-value that the second is worse.

    Parameters
    ----------
    before_correct, after_correct : array (N,) bool
        Whether each model got each example right (against the same labels).

    Returns
    -------
    dict
        ``n``, ``before_only`` and ``after_only`` (the discordant counts), ``accuracy_before``
        and ``accuracy_after`` (NaN for ``N == 0``), and ``p_worse``, the one-sided exact
        McNemar p-value of :func:`mcnemar_worse_p`.
    """
    before = np.asarray(before_correct)
    after = np.asarray(after_correct)
    if before.ndim != 1 or before.shape != after.shape:
        raise ValueError(
            f"before_correct and after_correct must be 1-D of one length, got {before.shape} "
            f"and {after.shape}"
        )
    if before.dtype != np.bool_ or after.dtype != np.bool_:
        raise ValueError("before_correct and after_correct must be boolean arrays")
    n = int(before.size)
    before_only = int(np.count_nonzero(before & ~after))
    after_only = int(np.count_nonzero(after & ~before))
    return {
        "n": n,
        "before_only": before_only,
        "after_only": after_only,
        "accuracy_before": float(before.mean()) if n else float("nan"),
        "accuracy_after": float(after.mean()) if n else float("nan"),
        "p_worse": mcnemar_worse_p(before_only, after_only),
    }


def skill_above_chance(probs: np.ndarray, labels: np.ndarray) -> float:
    """Balanced accuracy of the predictions ``probs.argmax(1)`` on `labels` above chance.

    Chance is 1/K over the K classes present in `labels`: the balanced accuracy of any predictor
    that ignores its input (see `balanced_accuracy_vs_chance`), however imbalanced the classes.
    So the skill is 0 for a model that learned nothing and ``1 - 1/K`` for a perfect one.
    Measured on noisy labels it is lower than on clean ones; under symmetric noise on balanced
    classes every recall shrinks towards chance alike, so two models keep their order (other
    noise shrinks the classes unevenly, and the order holds only roughly).

    Parameters
    ----------
    probs : np.ndarray, shape (N, C) or (N,)
        Class probabilities (out of sample, for a fair measure), or the predicted classes.
    labels : np.ndarray, shape (N,)
        Given labels as non-negative integer codes.

    Returns
    -------
    float
        In [0, 1 - 1/K]; 0 at or below chance, and without rows.

    Examples
    --------
    >>> skill_above_chance(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), np.array([0, 1, 1]))
    0.25
    """
    codes = np.asarray(labels, dtype=np.int64)
    if codes.size == 0:
        return 0.0
    probs = np.asarray(probs)
    predicted = probs if probs.ndim == 1 else probs.argmax(axis=1)
    counts = np.bincount(codes)
    hits = np.bincount(codes[predicted == codes], minlength=counts.size)
    present = counts > 0
    balanced = float(np.mean(hits[present] / counts[present]))
    return max(balanced - 1.0 / int(present.sum()), 0.0)


def balanced_accuracy_vs_chance(
    class_hits: np.ndarray, class_counts: np.ndarray, pred_share: np.ndarray
) -> tuple[float | None, float | None]:
    """Balanced accuracy of an epoch's predictions and the highest value that is still chance.

    Parameters
    ----------
    class_hits : array (C,) int
        Examples of each given class predicted as that class.
    class_counts : array (C,) int
        Examples of each given class.
    pred_share : array (C,) float
        Share of the predictions that went to each class.

    Returns
    -------
    (balanced, chance) : tuple of float, or (None, None) with fewer than two classes judged
        ``balanced`` is the mean recall over the K classes of at least `_MIN_JUDGED_ROWS` rows
        in the labels; the epoch is no better than chance when ``balanced <= chance``.

    Notes
    -----
    Plain accuracy cannot tell chance from learning under imbalance: with 98% of the labels in
    one class, always answering that class scores 0.98, and a model that also learns the rare
    classes scores at most 1.0, so "accuracy <= majority share + 0.02" fires on healthy runs.
    Balanced accuracy has the same chance level 1/K for every predictor that ignores its input:
    if it answers class k with probability q_k whatever the input, the recall of class k is q_k
    in expectation and the mean over classes is sum(q_k) / K <= 1/K (exactly 1/K for a
    one-class predictor). Its standard error under that null, with q_k the observed prediction
    shares and n_k the class counts, is sqrt(sum_k q_k (1 - q_k) / n_k) / K (recalls treated as
    independent binomial proportions). The epoch counts as chance up to 1/K plus the larger of
    ``_CHANCE_SLACK`` (on balanced labels, where balanced accuracy is accuracy, the limit is
    then 1/K + 0.02 as for plain accuracy) and ``_CHANCE_Z`` standard errors, capped at half
    the way from 1/K to 1: classes of a handful of examples make the error large, and a perfect
    fit must never look like chance.
    """
    present = class_counts >= _MIN_JUDGED_ROWS
    k = int(present.sum())
    if k < 2:
        return None, None
    n = class_counts[present].astype(np.float64)
    balanced = float(np.mean(class_hits[present] / n))
    q = pred_share[present].astype(np.float64)
    se = math.sqrt(float(np.sum(q * (1.0 - q) / n))) / k
    margin = min(max(_CHANCE_SLACK, _CHANCE_Z * se), 0.5 * (1.0 - 1.0 / k))
    return balanced, 1.0 / k + margin
