"""Every kind of bad input, through the command line: exit status 2, a message naming the problem,
and nothing written (no output folder, no partial file, the input files untouched).

Inputs that are accepted on purpose are checked here too, with the choice they get: integral float
labels (``3.0`` is class ``"3"``), and images of different sizes and modes (converted to one mode
and resized to the most common size, with a warning naming them). An unfinished audit run that
meets other options or data is refused in tests/test_faults.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dm_audit.atomic import RUN_MARKER
from dm_audit.cli import EXIT_BAD_INPUT, main
from dm_audit.sources import load_source

FAST = ["--epochs", "2", "--quiet", "--device", "cpu"]


def blobs(n: int = 60, seed: int = 0) -> pd.DataFrame:
    """Three separable classes with ids ``ex-0`` ... and four features."""
    rng = np.random.default_rng(seed)
    codes = np.arange(n) % 3
    frame = pd.DataFrame(
        rng.normal(size=(n, 4)) + 3.0 * codes[:, None], columns=[f"f{i}" for i in range(4)]
    )
    frame.insert(0, "example_id", [f"ex-{i}" for i in range(n)])
    frame["label"] = np.array(["ant", "bee", "cat"])[codes]
    return frame


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) with the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(folder)) + "/": "" for p in folder.rglob("*") if p.is_dir()}


def assert_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    *messages: str,
) -> None:
    """`main(argv)` exits 2 with every message in its one error line and changes no file."""
    before = snapshot(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert err.startswith("dm-audit: error: ") and err.count("\n") == 1, err
    for message in messages:
        assert message in err, (message, err)
    assert snapshot(tmp_path) == before


def audit_args(source: Path, out: Path, *extra: str) -> list[str]:
    return ["audit", "--input", str(source), "--out", str(out), *FAST, *extra]


def _set(frame: pd.DataFrame, row: int, column: str, value: object) -> pd.DataFrame:
    frame = frame.copy()
    if not isinstance(value, float):
        frame[column] = frame[column].astype(object)
    frame.loc[row, column] = value
    return frame


TABLE_CASES: dict[str, tuple[Callable[[pd.DataFrame], pd.DataFrame], list[str], list[str]]] = {
    # name: (change to the table, extra options, messages)
    "empty dataset": (lambda f: f.iloc[:0], [], ["has no rows"]),
    "one class": (lambda f: f.assign(label="ant"), [], ["1 class(es) ['ant']"]),
    "missing label column": (
        lambda f: f.drop(columns=["label"]),
        [],
        ["label column 'label' not found", "example_id"],
    ),
    "misspelt label column": (lambda f: f, ["--label-column", "lable"], ["did you mean 'label'"]),
    "missing id column": (lambda f: f, ["--id-column", "uid"], ["id column 'uid' not found"]),
    "misspelt id column": (
        lambda f: f,
        ["--id-column", "example_ids"],
        ["id column 'example_ids' not found", "did you mean 'example_id'"],
    ),
    "duplicate ids": (
        lambda f: _set(f, 5, "example_id", "ex-1"),
        [],
        ["duplicate example ids in", "column example_id: 'ex-1' (rows 1, 5)"],
    ),
    "inf feature": (
        lambda f: _set(f, 4, "f1", float("inf")),
        [],
        ["feature column 'f1'", "inf at row 4"],
    ),
    "float labels": (
        lambda f: f.assign(label=np.arange(len(f)) % 3 + 0.5),
        [],
        ["label column 'label' holds the non-integral number 0.5 at row 0"],
    ),
    "labels mixing numbers and text": (
        lambda f: _set(f, 4, "label", "7"),
        [],
        ["label column 'label'", "mixes numbers and text", "row 4 is '7'", "row 0 is 'ant'"],
    ),
}


@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_bad_tables_are_refused(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    change, extra, messages = TABLE_CASES[case]
    source = tmp_path / "data.csv"
    change(blobs()).to_csv(source, index=False)
    assert_refused(tmp_path, capsys, audit_args(source, tmp_path / "out", *extra), *messages)


def test_mixed_feature_dimensions_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = blobs()
    vectors = [list(map(float, row)) for row in frame[["f0", "f1", "f2", "f3"]].to_numpy()]
    vectors[7] = vectors[7][:3]
    source = tmp_path / "data.parquet"
    pd.DataFrame(
        {"example_id": frame["example_id"], "emb": vectors, "label": frame["label"]}
    ).to_parquet(source)
    assert_refused(
        tmp_path,
        capsys,
        audit_args(source, tmp_path / "out"),
        "column 'emb' mixes feature dimensions [3, 4]",
        "'ex-7' has 3",
    )


def _image_table(root: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append((f"{i}.png", "abc"[i % 3]))
    table = root / "index.csv"
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(table, index=False)
    return table


@pytest.mark.parametrize(
    ("damage", "messages"),
    [
        (lambda b: b"\x89PNG not an image", ["cannot decode the image at '3.png' (row 3)"]),
        (lambda b: b[: len(b) // 2], ["cannot decode the image at '3.png' (row 3)", "truncated"]),
    ],
    ids=["corrupt", "truncated"],
)
def test_corrupt_or_truncated_images_are_named(
    damage, messages: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    table = _image_table(root)
    broken = root / "3.png"
    broken.write_bytes(damage(broken.read_bytes()))
    assert_refused(tmp_path, capsys, audit_args(table, tmp_path / "out"), *messages)


def test_an_image_path_outside_its_root_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    table = _image_table(root)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "secret.png")
    frame = pd.read_csv(table)
    frame.loc[2, "path"] = "../secret.png"
    frame.to_csv(table, index=False)
    assert_refused(
        tmp_path, capsys, audit_args(table, tmp_path / "out"), "row 2", "escapes the image root"
    )


@pytest.mark.parametrize(
    ("rows", "messages"),
    [
        ([("ex-1", "bee"), ("ex-999", "ant")], ["ex-999", "is not in the dataset"]),
        ([("ex-1", "bee"), ("ex-2", "dog")], ["'dog'", "is not a known class"]),
    ],
    ids=["unknown-id", "unknown-class"],
)
def test_reviews_with_unknown_ids_or_classes_are_refused_before_training(
    rows, messages: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "data.csv"
    blobs().to_csv(source, index=False)
    reviews = tmp_path / "reviews.csv"
    pd.DataFrame(rows, columns=["example_id", "label"]).to_csv(reviews, index=False)
    argv = audit_args(source, tmp_path / "out", "--reviews", str(reviews))
    assert_refused(tmp_path, capsys, argv, "review file", *messages)


def test_an_output_folder_holding_a_previous_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "data.csv"
    blobs().to_csv(source, index=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_MARKER).write_text(json.dumps({"run_id": "earlier", "files": ["summary.json"]}))
    (out / "summary.json").write_text("{}")
    assert_refused(
        tmp_path,
        capsys,
        audit_args(source, out),
        f"output folder {out} already holds a previous run",
        "summary.json",
    )


def test_a_checkpoint_from_another_configuration_or_data_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "data.csv"
    blobs().to_csv(source, index=False)
    out = tmp_path / "model"
    train = ["train", "--input", str(source), "--out", str(out), "--model", "mlp", *FAST]
    assert main(train) == 0
    assert (out / "checkpoints" / "checkpoint.pt").is_file()
    capsys.readouterr()
    assert_refused(
        tmp_path,
        capsys,
        [*train, "--resume", "--lr", "0.05"],
        "different training configuration",
        "lr: checkpoint None vs now 0.05",
    )
    assert_refused(
        tmp_path,
        capsys,
        [*train, "--resume", "--inject-noise", "symmetric", "--noise-rate", "0.2"],
        "different training data",
        "sha256",
    )


# ---------------------------------------------------------------- accepted on purpose


def test_integral_float_labels_are_the_integer_classes(tmp_path: Path) -> None:
    source = tmp_path / "data.csv"
    blobs().assign(label=np.arange(60) % 3 + 1.0).to_csv(source, index=False)
    dataset = load_source(str(source), test_size=0)
    assert dataset.classes == ["1", "2", "3"]
    np.testing.assert_array_equal(dataset.label_codes(), np.arange(60) % 3)


def test_images_of_different_sizes_and_modes_are_converted_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    table = _image_table(root)
    Image.fromarray(np.full((10, 6), 200, np.uint8)).save(root / "4.png")  # grayscale, 10x6
    Image.fromarray(np.full((8, 8, 4), 90, np.uint8), "RGBA").save(root / "5.png")
    dataset = load_source(str(table), test_size=0)
    with caplog.at_level(logging.WARNING, logger="dm_audit.dataset"):
        images = dataset.images()
    assert images.shape == (12, 8, 8, 3)
    # The grayscale image is repeated over the three channels; the alpha channel is dropped.
    np.testing.assert_array_equal(images[4], np.full((8, 8, 3), 200, np.uint8))
    np.testing.assert_array_equal(images[5], np.full((8, 8, 3), 90, np.uint8))
    text = caplog.text
    assert "resized 1 of 12 images to 8x8 (the most common size)" in text
    assert "(10x6)" in text
    assert "converted images of mode(s) L, RGBA to RGB (alpha of RGBA dropped)" in text
    # Every stage of an audit decodes the images again: the warnings are said once.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dm_audit.dataset"):
        np.testing.assert_array_equal(dataset.images(), images)
    assert "resized" not in caplog.text and "converted" not in caplog.text
    # Another target size is news.
    with caplog.at_level(logging.WARNING, logger="dm_audit.dataset"):
        dataset.images(size=(6, 6))
    assert "resized 12 of 12 images to 6x6 (as asked)" in caplog.text


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (lambda tmp: tmp / "data.csv" / "sub", "data.csv is a file"),
        (lambda tmp: Path("/proc/dm-audit-out"), "cannot create the output folder /proc"),
    ],
    ids=["below-a-file", "proc"],
)
def test_an_unwritable_output_folder_is_one_line_and_exit_2(
    out, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "data.csv"
    blobs().to_csv(source, index=False)
    assert_refused(tmp_path, capsys, audit_args(source, out(tmp_path)), message)


def test_top_k_beyond_the_data_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "data.csv"
    blobs().to_csv(source, index=False)
    argv = audit_args(source, tmp_path / "out", "--top-k", "31")
    assert_refused(tmp_path, capsys, argv, "top_k 31 flags more than half of the dataset's 60 rows")
    assert "epoch" not in caplog.text


def test_an_undecodable_image_is_named_by_its_path_not_a_buffer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "images"
    (root / "ant").mkdir(parents=True)
    (root / "bee").mkdir()
    for name in ("ant", "bee"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / name / "0.png")
    (root / "bee" / "1.png").write_bytes(b"plain text, not an image")
    before = snapshot(tmp_path)
    assert main(audit_args(root, tmp_path / "out")) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "bee/1.png" in err and "not an image in a format Pillow reads" in err
    assert "BytesIO" not in err
    assert snapshot(tmp_path) == before
