"""Seeded embedding clusters whose truth is known, for the tests of the flags.

Gaussian class clusters with a known share of flipped labels and optional out-of-distribution
clusters; the "model" knows the true classes, not the noise (like a DM model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Synthetic:
    embeddings: np.ndarray  # (N, E)
    given: np.ndarray  # (N,)
    true: np.ndarray  # (N,), -1 = out-of-distribution
    probs: np.ndarray  # (N, C)
    logits: np.ndarray  # (N, C)
    mean_p: np.ndarray  # (N,)

    @property
    def p_given(self) -> np.ndarray:
        return self.probs[np.arange(self.given.size), self.given]


def make_clusters(
    *,
    n: int = 3000,
    n_classes: int = 10,
    dim: int = 16,
    rate: float = 0.4,
    kind: str = "symmetric",
    separation: float = 1.0,
    n_ood: int = 0,
    seed: int = 0,
) -> Synthetic:
    """Gaussian class clusters, exactly floor(rate * n) flipped labels, optional OOD clusters.

    The "model" knows the true classes, not the noise (like a DM model): logits are negative
    squared distances to the class centres. With separation 1.0 it is about 95 % accurate.
    OOD inputs come from two extra clusters and get random labels. Training dynamics are
    simulated as p_i rising to its final value with per-epoch jitter.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * separation
    true = rng.integers(0, n_classes, n)
    emb = centres[true] + rng.normal(size=(n, dim))
    given = true.copy()
    idx = rng.choice(n, int(np.floor(rate * n)), replace=False)
    shift = rng.integers(1, n_classes, idx.size) if kind == "symmetric" else 1
    given[idx] = (true[idx] + shift) % n_classes
    if n_ood:
        ood_centres = rng.normal(size=(2, dim)) * separation
        ood_emb = ood_centres[rng.integers(0, 2, n_ood)] + rng.normal(size=(n_ood, dim))
        emb = np.vstack([emb, ood_emb])
        true = np.concatenate([true, np.full(n_ood, -1)])
        given = np.concatenate([given, rng.integers(0, n_classes, n_ood)])
    logits = -((emb[:, None, :] - centres[None]) ** 2).sum(-1) / 2
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    p_final = probs[np.arange(given.size), given]
    epochs = np.arange(1, 21)
    ramp = 1 - np.exp(-epochs / 3.0)
    history = np.clip(
        p_final[:, None] * ramp[None] + rng.normal(0, 0.05, (given.size, epochs.size)), 0, 1
    )
    return Synthetic(emb, given, true, probs, logits, history.mean(axis=1))
