"""Accuracy, entropy and confidence, and the six noisy-label metrics of METHOD.md §4.

Arrays in, numbers out. ``probs`` is a float array ``(N, C)`` whose rows sum to 1; labels are
int codes ``0..C-1``; true labels use ``-1`` for open-set examples (inputs of no known class).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "accuracy",
    "confidence",
    "given_probability",
    "margin",
    "max_probability",
    "normalised_entropy",
    "six_metrics",
]


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
