"""Built-in sources: scikit-learn's digits and torchvision datasets from a local root.

``"digits"`` (1,797 8x8 images as 64 features in [0, 1]) is the default a new user meets.
CIFAR-10/100, MNIST and FashionMNIST keep their official train/test split; torchvision fetches
them only when ``download=True``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dm_audit.dataset import AuditDataset
from dm_audit.errors import ConfigError, DataError
from dm_audit.images import encode_png
from dm_audit.source_assembly import assemble_dataset


def load_digits(*, test_size: float = 0.0, seed: int = 0) -> AuditDataset:
    """scikit-learn's digits as feature vectors.

    Parameters
    ----------
    test_size, seed
        See `stratified_split`.

    Returns
    -------
    AuditDataset
        1,797 examples, ids ``digits-00000``..., classes ``"0"``..``"9"``, features float32
        (N, 64) in [0, 1] (pixel intensities divided by 16).
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    features = (bunch.data / 16.0).astype(np.float32)
    labels = np.array([str(int(t)) for t in bunch.target], dtype=object)
    ids = [f"digits-{i:05d}" for i in range(len(labels))]
    return assemble_dataset(
        ids,
        labels,
        None,
        ("features", list(features)),
        test_size=test_size,
        seed=seed,
        source="digits (scikit-learn)",
    )


@dataclass(frozen=True)
class TorchvisionSource:
    """A torchvision dataset class and how its targets become class names."""

    class_name: str
    title: str
    # Name of each target: MNIST's torchvision names ("0 - zero") are shortened to the digit.
    name_of: Callable[[object, int], str]


def _named_class(dataset: object, target: int) -> str:
    return str(dataset.classes[target])  # type: ignore[attr-defined]


def _digit_class(dataset: object, target: int) -> str:
    return str(target)


TORCHVISION_SOURCES: dict[str, TorchvisionSource] = {
    "cifar10": TorchvisionSource("CIFAR10", "CIFAR-10", _named_class),
    "cifar100": TorchvisionSource("CIFAR100", "CIFAR-100", _named_class),
    "mnist": TorchvisionSource("MNIST", "MNIST", _digit_class),
    "fashionmnist": TorchvisionSource("FashionMNIST", "FashionMNIST", _named_class),
}


def load_torchvision(
    name: str, root: str | os.PathLike[str], *, download: bool = False
) -> AuditDataset:
    """A torchvision dataset from a local root, with its official train/test split.

    Parameters
    ----------
    name : {"cifar10", "cifar100", "mnist", "fashionmnist"}
        Dataset.
    root : path-like
        torchvision root folder (e.g. the one holding ``cifar-10-batches-py``).
    download : bool
        Let torchvision fetch the files when they are missing.

    Returns
    -------
    AuditDataset
        PNG images; ids ``<name>-train-00000`` and ``<name>-test-00000``...; class names from
        torchvision (MNIST: ``"0"``..``"9"``).

    Notes
    -----
    The CIFAR files are Python pickles, which can run code when read: load only roots you
    trust.
    """
    import torchvision.datasets

    spec = TORCHVISION_SOURCES.get(name)
    if spec is None:
        raise ConfigError(
            f"unknown torchvision dataset {name!r}; known: {sorted(TORCHVISION_SOURCES)}"
        )
    if not str(root):
        raise ConfigError(f"{name}: needs a root folder, e.g. '{name}:./data'")
    root = Path(root).expanduser()
    dataset_class = getattr(torchvision.datasets, spec.class_name)
    ids, labels, splits, images = [], [], [], []
    for split in ("train", "test"):
        try:
            dataset = dataset_class(str(root), train=split == "train", download=download)
        except (RuntimeError, OSError) as exc:
            hint = "" if download else "; pass download=True to fetch it"
            raise DataError(
                f"{spec.title} not found or incomplete under {root}: {exc}{hint}"
            ) from exc
        data = np.asarray(dataset.data)
        targets = np.asarray(dataset.targets, dtype=np.int64)
        names = {t: spec.name_of(dataset, int(t)) for t in np.unique(targets)}
        for i, (pixels, target) in enumerate(zip(data, targets, strict=True)):
            ids.append(f"{name}-{split}-{i:05d}")
            labels.append(names[target])
            splits.append(split)
            images.append(encode_png(pixels))
    return assemble_dataset(
        ids,
        np.array(labels, dtype=object),
        np.array(splits, dtype=object),
        ("image", images),
        test_size=0.0,
        seed=0,
        source=f"{name}:{root}",
    )
