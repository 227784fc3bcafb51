"""The image-folder benchmark's folder, its truth, and how the audit's rows are matched to it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def image_folder():
    yield from load_benchmark("image_folder")


def test_the_folder_files_each_image_under_its_given_label(image_folder, tmp_path: Path):
    truth = image_folder.build_folder(tmp_path, per_class=10, noise=0.3, open_set=False, seed=0)
    assert len(truth) == 100 and truth["noisy"].sum() == 30 and not truth["open"].any()
    for row in truth.itertuples():
        image = np.asarray(Image.open(tmp_path / row.file))
        assert image.shape == (28, 28) and image.dtype == np.uint8
        assert row.file.split("/")[0] == row.given
    # The truth lives outside the folder: only images are in it.
    assert {p.suffix for p in tmp_path.rglob("*") if p.is_file()} == {".png"}


def test_the_open_set_folder_holds_eight_percent_of_an_unseen_digit(image_folder, tmp_path):
    truth = image_folder.build_folder(tmp_path, per_class=20, noise=0.0, open_set=True, seed=0)
    assert truth["open"].sum() == int(0.08 / 0.92 * 180)
    assert "9" not in set(truth["given"])  # 9 is no class of the folder
    assert not truth["noisy"].any()


def test_detection_is_measured_on_the_rows_matched_by_file(image_folder, tmp_path: Path):
    truth = image_folder.build_folder(tmp_path, per_class=5, noise=0.4, open_set=False, seed=1)
    examples = pd.DataFrame(
        {
            "example_id": truth["file"],
            "is_label_issue": truth["noisy"],
            "label_issue_score": truth["noisy"].astype(float),
            "ood_score": 0.0,
        }
    )
    examples.to_parquet(tmp_path / "examples.parquet")
    quality = image_folder.measure(tmp_path, truth)
    assert quality["f1"] == 1.0 and quality["auroc"] == 1.0
    examples.iloc[:-1].to_parquet(tmp_path / "examples.parquet")
    with pytest.raises(SystemExit, match="misses rows"):
        image_folder.measure(tmp_path, truth)
