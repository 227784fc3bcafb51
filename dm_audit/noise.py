"""Synthetic label noise with known truth, for tests and benchmarks.

Protocols (METHOD.md §5):

* symmetric: exactly ``floor(r N)`` labels, chosen uniformly, are replaced by a *different*
  class chosen uniformly (the true class is excluded, so the realised noise rate is r);
* pair: in every class k that the mapping moves, exactly ``floor(r n_k)`` labels become
  ``mapping[k]`` (default ``k -> k+1 mod C``), i.e. a transition matrix with ``1 - r`` on the
  diagonal and r at ``(k, mapping[k])``;
* instance-dependent ("confusable"): given out-of-sample class probabilities of a model trained
  on the clean labels, exactly ``floor(r N)`` labels are flipped, the ones the model finds most
  confusable (the largest probability of a class other than the true one), each to that most
  confused class; unlike the two protocols above, which examples are hit depends on the input;
* open-set: examples of held-out classes stay in the training split with a random in-set label;
  their classes leave the class list.

`add_noise` applies symmetric, pair and open-set noise to an `AuditDataset`, corrupting the train
split only, and records the truth in the ``true_label`` and ``noise`` ("clean" | "flipped" |
"open_set") columns. Instance-dependent noise needs a model's probabilities, which this module
does not train: `inject_instance_dependent` takes them as an argument.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from dm_audit.dataset import AuditDataset, normalize_labels
from dm_audit.errors import ConfigError, DataError

SeedLike = int | np.random.SeedSequence | np.random.Generator
NOISE_TYPES: tuple[str, ...] = ("none", "symmetric", "pair", "open_set")


def _rng(seed: SeedLike) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _count(rate: float, n: int) -> int:
    """floor(rate * n), robust to the rounding of rate * n (0.29 * 100 -> 29, not 28)."""
    return int(np.floor(rate * n + 1e-9))


def _check_rate(rate: float, name: str = "rate") -> None:
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {rate}")


def _check_labels(labels: np.ndarray | Sequence[int], n_classes: int) -> np.ndarray:
    if n_classes < 2:
        raise ConfigError(f"n_classes must be at least 2, got {n_classes}")
    codes = np.asarray(labels)
    if codes.ndim != 1 or (codes.size and not np.issubdtype(codes.dtype, np.integer)):
        raise DataError(f"labels must be a 1-D integer array, got {codes.dtype} {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= n_classes):
        bad = int(np.flatnonzero((codes < 0) | (codes >= n_classes))[0])
        raise DataError(f"label {codes[bad]} at position {bad} is outside 0..{n_classes - 1}")
    return codes.astype(np.int64)


def inject_symmetric(
    labels: np.ndarray | Sequence[int], n_classes: int, rate: float, seed: SeedLike
) -> np.ndarray:
    """Flip exactly ``floor(rate * N)`` labels to a different, uniformly chosen class.

    Parameters
    ----------
    labels : array of int, shape (N,)
        Clean codes in ``0..n_classes-1``.
    n_classes : int
        Number of classes C (at least 2).
    rate : float
        Fraction of labels to flip, in [0, 1].
    seed : int, numpy.random.SeedSequence or numpy.random.Generator
        Randomness.

    Returns
    -------
    numpy.ndarray of int64, shape (N,)
        Noisy codes; ``(noisy != labels).sum() == floor(rate * N)``.
    """
    codes = _check_labels(labels, n_classes)
    _check_rate(rate)
    rng = _rng(seed)
    n_flip = _count(rate, len(codes))
    chosen = rng.choice(len(codes), size=n_flip, replace=False)
    # An offset in 1..C-1 picks one of the other C-1 classes uniformly.
    offsets = rng.integers(1, n_classes, size=n_flip)
    noisy = codes.copy()
    noisy[chosen] = (codes[chosen] + offsets) % n_classes
    return noisy


def pair_mapping(n_classes: int) -> np.ndarray:
    """The default pair-noise mapping ``k -> k+1 mod C``.

    Parameters
    ----------
    n_classes : int
        Number of classes C.

    Returns
    -------
    numpy.ndarray of int64, shape (C,)
    """
    return (np.arange(n_classes, dtype=np.int64) + 1) % n_classes


def _mapping_array(
    mapping: Mapping[int, int] | Sequence[int] | np.ndarray | None, n_classes: int
) -> np.ndarray:
    if mapping is None:
        return pair_mapping(n_classes)
    if isinstance(mapping, Mapping):
        target = np.arange(n_classes, dtype=np.int64)
        for source, dest in mapping.items():
            target[int(source)] = int(dest)
    else:
        target = np.asarray(mapping, dtype=np.int64)
        if target.shape != (n_classes,):
            raise ConfigError(f"a pair mapping needs one target per class ({n_classes})")
    if target.min() < 0 or target.max() >= n_classes:
        raise ConfigError(f"pair mapping targets must lie in 0..{n_classes - 1}")
    return target


def inject_pair(
    labels: np.ndarray | Sequence[int],
    n_classes: int,
    rate: float,
    seed: SeedLike,
    mapping: Mapping[int, int] | Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Flip exactly ``floor(rate * n_k)`` labels of each class k to ``mapping[k]``.

    Parameters
    ----------
    labels : array of int, shape (N,)
        Clean codes in ``0..n_classes-1``.
    n_classes : int
        Number of classes C.
    rate : float
        Fraction of each mapped class to flip, in [0, 1].
    seed : int, numpy.random.SeedSequence or numpy.random.Generator
        Randomness.
    mapping : dict {int: int}, or array of int, shape (C,), optional
        Target class of each class; classes absent from a dict, or mapped to themselves, are
        left clean. Default ``k -> k+1 mod C``.

    Returns
    -------
    numpy.ndarray of int64, shape (N,)
        Noisy codes.
    """
    codes = _check_labels(labels, n_classes)
    _check_rate(rate)
    target = _mapping_array(mapping, n_classes)
    rng = _rng(seed)
    noisy = codes.copy()
    for k in range(n_classes):
        if target[k] == k:
            continue
        members = np.flatnonzero(codes == k)
        chosen = rng.choice(members, size=_count(rate, len(members)), replace=False)
        noisy[chosen] = target[k]
    return noisy


def inject_instance_dependent(
    labels: np.ndarray | Sequence[int],
    probs: np.ndarray,
    rate: float,
    seed: SeedLike,
) -> np.ndarray:
    """Flip exactly ``floor(rate * N)`` of the most confusable labels to their most confused class.

    An example's confusability is the largest probability its model gives to a class other than
    its (clean) label; the most confusable examples are flipped, each to that class. The noise
    thus hits ambiguous inputs and lands on a plausible class, the way annotators err, instead
    of hitting examples and classes at random.

    Parameters
    ----------
    labels : array of int, shape (N,)
        Clean codes in ``0..C-1``.
    probs : numpy.ndarray of float, shape (N, C)
        Class probabilities of each example, out-of-sample (e.g. cross-validated) from a model
        trained on the clean labels; C is the number of classes (at least 2).
    rate : float
        Fraction of labels to flip, in [0, 1].
    seed : int, numpy.random.SeedSequence or numpy.random.Generator
        Breaks ties between equally confusable examples.

    Returns
    -------
    numpy.ndarray of int64, shape (N,)
        Noisy codes; ``(noisy != labels).sum() == floor(rate * N)``. A flipped example's new
        code is the argmax of its probabilities over the other classes (the lowest code among
        equal ones).

    Raises
    ------
    DataError
        When ``probs`` is not an (N, C) array (C >= 2) of finite, non-negative numbers with one
        row per label, or a label lies outside ``0..C-1``.
    ConfigError
        When ``rate`` is outside [0, 1].
    """
    matrix = np.asarray(probs, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] < 2:
        raise DataError(f"probs must have shape (N, C) with C >= 2 classes, got {matrix.shape}")
    codes = _check_labels(labels, matrix.shape[1])
    n = len(codes)
    if matrix.shape[0] != n:
        raise DataError(f"probs has {matrix.shape[0]} rows for {n} labels; give one row per label")
    _check_rate(rate)
    if not np.isfinite(matrix).all() or (matrix < 0).any():
        bad = int(np.flatnonzero(~(np.isfinite(matrix) & (matrix >= 0)).all(axis=1))[0])
        raise DataError(f"probs must be finite and non-negative; row {bad} is {matrix[bad]}")
    rng = _rng(seed)
    others = matrix.copy()
    others[np.arange(n), codes] = -np.inf  # the true class is never the target
    target = others.argmax(axis=1)
    confusion = others[np.arange(n), target]
    # Most confusable first; a seeded random key orders examples of equal confusion.
    order = np.lexsort((rng.random(n), -confusion))
    chosen = order[: _count(rate, n)]
    noisy = codes.copy()
    noisy[chosen] = target[chosen]
    return noisy


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def _class_names(names: Sequence[object], classes: Sequence[str], what: str) -> list[str]:
    wanted = list(normalize_labels(list(names), what)) if len(names) else []
    unknown = [n for n in wanted if n not in classes]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(classes), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{what}: unknown class(es) {unknown}{hint} (classes: {list(classes)})")
    return wanted


def _with_truth(dataset: AuditDataset) -> AuditDataset:
    if dataset.has_truth:
        raise ConfigError(
            f"dataset {dataset.source!r} already carries injected noise; add noise to a clean one"
        )
    table = dataset.table.copy()
    table["true_label"] = table["label"]
    table["noise"] = "clean"
    return AuditDataset(table, list(dataset.classes), dataset.input_kind, dataset.source)


def make_open_set(
    dataset: AuditDataset,
    held_out_classes: Sequence[str],
    fraction_of_train: float,
    seed: SeedLike,
) -> AuditDataset:
    """Turn held-out classes into open-set noise.

    The held-out classes leave the class list. Enough of their training examples stay in the
    train split, each with a uniformly random in-set label, to make up ``fraction_of_train`` of
    the resulting train split (``floor(f * n_in / (1 - f))`` of them, n_in being the in-set
    training examples); every other example of a held-out class is dropped, test split
    included.

    Parameters
    ----------
    dataset : AuditDataset
        A dataset without injected noise.
    held_out_classes : sequence of str
        Class names to hold out (at least two classes must remain).
    fraction_of_train : float
        Share of open-set examples in the resulting train split, in [0, 1).
    seed : int, numpy.random.SeedSequence or numpy.random.Generator
        Randomness.

    Returns
    -------
    AuditDataset
        With ``true_label`` (the real class name for open-set rows) and ``noise`` ("open_set"
        or "clean"); rows keep their original order.

    Raises
    ------
    ConfigError
        For unknown classes, fewer than two remaining classes, a fraction out of range, or too
        few held-out training examples to reach the fraction.
    """
    if not 0.0 <= fraction_of_train < 1.0:
        raise ConfigError(f"fraction_of_train must be in [0, 1), got {fraction_of_train}")
    held = _class_names(held_out_classes, dataset.classes, "held_out_classes")
    in_set = [c for c in dataset.classes if c not in held]
    if not held:
        raise ConfigError("held_out_classes is empty")
    if len(in_set) < 2:
        raise ConfigError(f"holding out {held} leaves {len(in_set)} class(es); two are needed")
    noisy = _with_truth(dataset)
    table = noisy.table
    is_held = table["label"].isin(held).to_numpy()
    is_train = (table["split"] == "train").to_numpy()
    n_in = int((is_train & ~is_held).sum())
    n_open = _count(fraction_of_train / (1.0 - fraction_of_train), n_in)
    candidates = np.flatnonzero(is_train & is_held)
    if n_open > len(candidates):
        raise ConfigError(
            f"an open-set fraction of {fraction_of_train} needs {n_open} training examples of "
            f"{held}, but there are only {len(candidates)}"
        )
    rng = _rng(seed)
    chosen = np.sort(rng.choice(candidates, size=n_open, replace=False))
    random_labels = np.asarray(in_set, dtype=object)[rng.integers(0, len(in_set), size=n_open)]
    label_col, noise_col = table.columns.get_loc("label"), table.columns.get_loc("noise")
    table.iloc[chosen, label_col] = random_labels
    table.iloc[chosen, noise_col] = "open_set"
    keep = ~is_held
    keep[chosen] = True
    result = AuditDataset(
        table.iloc[np.flatnonzero(keep)].reset_index(drop=True),
        in_set,
        dataset.input_kind,
        dataset.source,
    )
    return result.validate()


Injector = Callable[..., np.ndarray]
INJECTORS: dict[str, Injector] = {"symmetric": inject_symmetric, "pair": inject_pair}


def _mapping_codes(
    mapping: Mapping[str, str] | Mapping[int, int] | None, classes: Sequence[str]
) -> dict[int, int] | None:
    """A pair mapping given by class names as a mapping of codes."""
    if mapping is None:
        return None
    names = _class_names([*mapping.keys(), *mapping.values()], classes, "mapping")
    index = {name: code for code, name in enumerate(classes)}
    pairs = zip(names[: len(mapping)], names[len(mapping) :], strict=True)
    return {index[source]: index[dest] for source, dest in pairs}


def _flip_train(
    dataset: AuditDataset,
    kind: str,
    rate: float,
    seed: SeedLike,
    mapping: Mapping[str, str] | Mapping[int, int] | None,
) -> AuditDataset:
    """Corrupt, in place, the clean training rows of a dataset that has truth columns."""
    table = dataset.table
    rows = np.flatnonzero(((table["split"] == "train") & (table["noise"] == "clean")).to_numpy())
    codes = dataset.label_codes()[rows]
    options = {"mapping": _mapping_codes(mapping, dataset.classes)} if kind == "pair" else {}
    noisy = INJECTORS[kind](codes, dataset.n_classes, rate, seed, **options)
    flipped = noisy != codes
    names = np.asarray(dataset.classes, dtype=object)[noisy[flipped]]
    table.iloc[rows[flipped], table.columns.get_loc("label")] = names
    table.iloc[rows[flipped], table.columns.get_loc("noise")] = "flipped"
    return dataset


def add_noise(
    dataset: AuditDataset,
    kind: str = "symmetric",
    rate: float = 0.0,
    seed: int = 0,
    *,
    open_set_classes: Sequence[str] | None = None,
    open_set_fraction: float | None = None,
    mapping: Mapping[str, str] | None = None,
) -> AuditDataset:
    """Corrupt the train split of a dataset, keeping the truth.

    Parameters
    ----------
    dataset : AuditDataset
        A dataset without injected noise (no ``true_label`` column).
    kind : {"symmetric", "pair", "open_set", "none"}
        Noise protocol (see the module docstring). "none" returns the dataset unchanged.
    rate : float
        symmetric: fraction of in-set training labels flipped (exactly ``floor(rate * n)``);
        pair: fraction of each mapped class flipped; open_set: the open-set fraction when
        ``open_set_fraction`` is not given.
    seed : int
        Randomness; the same seed gives the same corruption.
    open_set_classes : sequence of str, optional
        Classes turned into open-set noise (see `make_open_set`). With "symmetric" or "pair"
        the open set is made first and the flips then hit the remaining clean training rows,
        e.g. 8% open-set plus 30% symmetric on the rest.
    open_set_fraction : float, optional
        Share of open-set examples in the resulting train split.
    mapping : dict {str: str}, optional
        Pair noise: target class name of each class name (default ``k -> k+1 mod C``).

    Returns
    -------
    AuditDataset
        A new dataset with ``true_label`` and ``noise`` columns; test rows are all "clean".

    Raises
    ------
    ConfigError
        For an unknown kind, a rate out of range, options that do not fit the kind, or a
        dataset that already carries injected noise.
    """
    if kind not in NOISE_TYPES:
        close = difflib.get_close_matches(kind, NOISE_TYPES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown noise kind {kind!r}{hint} (choose from {list(NOISE_TYPES)})")
    _check_rate(rate)
    if mapping is not None and kind != "pair":
        raise ConfigError(f"a pair mapping does not apply to noise kind {kind!r}")
    if kind == "none":
        if open_set_classes or open_set_fraction:
            raise ConfigError("noise kind 'none' takes no open-set options")
        return dataset.subset(np.ones(len(dataset), dtype=bool))
    if kind == "open_set":
        return _open_set_noise(dataset, rate, seed, open_set_classes, open_set_fraction)
    description = f"{dataset.source} + {kind} noise {rate:g}"
    if open_set_classes:
        if open_set_fraction is None:
            raise ConfigError("open_set_classes needs open_set_fraction")
        # Independent streams, so the flips do not depend on how the open set consumed randomness.
        open_seed, flip_seed = np.random.SeedSequence(seed).spawn(2)
        noisy = make_open_set(dataset, open_set_classes, open_set_fraction, open_seed)
        description += f" + open-set {open_set_fraction:g} {list(open_set_classes)}"
    elif open_set_fraction:
        raise ConfigError("open_set_fraction needs open_set_classes")
    else:
        noisy, flip_seed = _with_truth(dataset), seed
    noisy = _flip_train(noisy, kind, rate, flip_seed, mapping)
    noisy.source = f"{description} (seed {seed})"
    return noisy.validate()


def _open_set_noise(
    dataset: AuditDataset,
    rate: float,
    seed: int,
    open_set_classes: Sequence[str] | None,
    open_set_fraction: float | None,
) -> AuditDataset:
    """``kind="open_set"`` of `add_noise`: held-out classes only, no flips."""
    if open_set_fraction is not None and rate not in (0.0, open_set_fraction):
        raise ConfigError(
            f"open_set noise got rate={rate} and open_set_fraction={open_set_fraction}; "
            "give one of them"
        )
    fraction = open_set_fraction if open_set_fraction is not None else rate
    if not open_set_classes:
        raise ConfigError("open_set noise needs open_set_classes (the classes to hold out)")
    noisy = make_open_set(dataset, open_set_classes, fraction, seed)
    noisy.source = f"{dataset.source} + open-set noise {fraction:g} {list(open_set_classes)}"
    return noisy
