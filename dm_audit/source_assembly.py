"""A source's rows made into a validated `AuditDataset`, and the stratified train/test split.

Every source (the built-in ones, tables, image folders) ends here: `assemble_dataset` builds the
canonical table from ids, labels, an optional split and the input column, gives it a stratified
split when the source fixes none, and validates it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from dm_audit.dataset import AuditDataset
from dm_audit.errors import DataError
from dm_audit.label_names import sort_classes


def stratified_split(labels: Sequence[str] | np.ndarray, test_size: float, seed: int) -> np.ndarray:
    """Assign each example to train or test, class by class.

    Each class with n examples puts ``round(test_size * n)`` of them (at most n - 1, so that
    every class keeps a training example) into test, chosen at random.

    Parameters
    ----------
    labels : array, shape (N,)
        Class of each example (names or codes).
    test_size : float
        Fraction in [0, 1).
    seed : int
        Seed of the random choice.

    Returns
    -------
    numpy.ndarray of object, shape (N,)
        ``"train"`` or ``"test"``.
    """
    labels = np.asarray(labels)
    split = np.full(len(labels), "train", dtype=object)
    if test_size <= 0 or len(labels) == 0:
        return split
    rng = np.random.default_rng(seed)
    for name in sort_classes(str(x) for x in np.unique(labels)):
        members = np.flatnonzero(labels.astype(str) == name)
        n_test = min(int(np.floor(test_size * len(members) + 0.5)), len(members) - 1)
        split[rng.permutation(members)[:n_test]] = "test"
    return split


def assemble_dataset(
    ids: Sequence[str],
    labels: np.ndarray,
    split: np.ndarray | None,
    inputs: tuple[str, list],
    *,
    test_size: float,
    seed: int,
    source: str,
    classes: Sequence[str] | None = None,
    notes: dict[str, Any] | None = None,
) -> AuditDataset:
    """Assemble, split and validate a canonical dataset."""
    if len(labels) == 0:
        raise DataError(f"data source {source!r} holds no examples")
    kind, values = inputs
    if split is None:
        split = stratified_split(labels, test_size, seed)
    table = pd.DataFrame({"example_id": list(ids), "label": labels, "split": split})
    table[kind] = values
    dataset = AuditDataset(
        table=table,
        classes=list(classes) if classes is not None else sort_classes(labels),
        input_kind=kind,
        source=source,
        notes=dict(notes or {}),
    ).validate()
    if not (table["split"] == "train").any():
        raise DataError(f"data source {source!r} has no example in the train split")
    return dataset
