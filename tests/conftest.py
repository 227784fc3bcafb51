"""Shared fixtures: small seeded datasets whose truth is known."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from dm_audit.dataset import AuditDataset
from dm_audit.sources import load_source, stratified_split
from dm_audit.training import CHECKPOINT_SECONDS_ENV


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # The test models and tensors are tiny: intra-op threads gain nothing, and their OpenMP
    # workers spin-waiting on a busy 2-core machine slow every step down many times over.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _a_checkpoint_after_every_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests stop and kill trainings after chosen epochs and resume from there; a test of the
    # default interval sets its own.
    monkeypatch.setenv(CHECKPOINT_SECONDS_ENV, "0")


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# Benchmark scripts load each other through benchmarks/siblings.py, found here as it is beside
# a script run directly (appended: nothing in the tests resolves to a script by name).
sys.path.append(str(BENCHMARKS))


def load_benchmark(name: str) -> Iterator[ModuleType]:
    """Import ``benchmarks/<name>.py`` (not a package) for a module-scoped fixture."""
    import siblings

    yield siblings.load(name)
    sys.modules.pop(f"bench_{name}", None)


# One colour per class, far apart, so a class is recognisable from any single pixel.
CLASS_COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 50, 210]], dtype=np.int64)


def _make_blobs(n_per_class: int = 40, n_classes: int = 3, dim: int = 4, seed: int = 0):
    """Well-separated Gaussian blobs.

    Returns
    -------
    features : numpy.ndarray of float32, shape (n_per_class * n_classes, dim)
    labels : numpy.ndarray of int64, shape (n_per_class * n_classes,)
        Codes; blob k is centred at 5 * e_k (k < dim).
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    centres = 5.0 * np.eye(n_classes, dim)
    features = centres[labels] + rng.normal(0.0, 0.5, size=(len(labels), dim))
    return features.astype(np.float32), labels.astype(np.int64)


def _make_colour_images(n_per_class: int = 8, size: int = 8, seed: int = 0):
    """Solid-colour RGB images with a little noise, one colour per class (3 classes).

    Returns
    -------
    images : numpy.ndarray of uint8, shape (3 * n_per_class, size, size, 3)
    labels : numpy.ndarray of int64, shape (3 * n_per_class,)
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASS_COLOURS)), n_per_class)
    noise = rng.integers(-20, 21, size=(len(labels), size, size, 3))
    images = np.clip(CLASS_COLOURS[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


@pytest.fixture
def make_blobs():
    """Factory of seeded Gaussian blobs: ``make_blobs(n_per_class, n_classes, dim, seed)``."""
    return _make_blobs


@pytest.fixture
def make_colour_images():
    """Factory of seeded colour images: ``make_colour_images(n_per_class, size, seed)``."""
    return _make_colour_images


@pytest.fixture(scope="session")
def digits_dataset() -> AuditDataset:
    """scikit-learn digits, split 70/30 with seed 0 (1,797 examples, 10 classes, D = 64)."""
    return load_source("digits", test_size=0.3, seed=0)


@pytest.fixture
def blobs_dataset() -> AuditDataset:
    """120 feature vectors in 3 separable classes "a", "b", "c" (D = 4), split 75/25."""
    features, labels = _make_blobs()
    return AuditDataset.from_arrays(
        np.array(["a", "b", "c"])[labels],
        features=features,
        split=stratified_split(labels, 0.25, seed=0),
        source="blobs",
    )


@pytest.fixture
def colour_image_dataset() -> AuditDataset:
    """24 RGB 8x8 images in 3 classes "red", "green", "blue", all in the train split.

    Classes are sorted by name, so the codes are blue = 0, green = 1, red = 2.
    """
    images, labels = _make_colour_images()
    names = np.array(["red", "green", "blue"])[labels]
    return AuditDataset.from_arrays(names, images=images, source="colours")
