"""Reading human-reviewed labels."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd
import pytest

from dm_audit.errors import ConfigError, DataError
from dm_audit.reviews import read_reviews

IDS = [f"ex-{i:03d}" for i in range(10)]
CLASSES = ["cat", "dog", "bird"]


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns


def test_reads_csv_and_reports_every_bad_row(tmp_path: Path) -> None:
    path = _write_csv(
        tmp_path / "reviews.csv",
        "example_id,label,comment\n"
        "ex-001,dog,looks like a dog\n"  # row 1: accepted
        "ex-999,cat,\n"  # row 2: unknown id
        "ex-002,horse,\n"  # row 3: unknown label
        "ex-003, bird ,\n"  # row 4: accepted (spaces stripped)
        ",cat,\n"  # row 5: empty id
        "ex-001,cat,second opinion\n",  # row 6: supersedes row 1
    )
    before = _fingerprint(path)
    reviews = read_reviews(path, known_ids=IDS, classes=CLASSES)
    assert _fingerprint(path) == before  # never modified

    assert reviews.labels == {"ex-001": "cat", "ex-003": "bird"}
    assert len(reviews) == 2
    report = reviews.report
    assert report.n_rows == 6 and report.n_accepted == 2 and not report.ok
    assert [(p.row, p.example_id) for p in report.unknown_ids] == [(2, "ex-999")]
    assert [(p.row, p.label) for p in report.unknown_labels] == [(3, "horse")]
    assert [p.row for p in report.duplicates] == [1]
    assert [p.problem for p in report.problems] == [
        "superseded",
        "unknown_id",
        "unknown_label",
        "empty",
    ]
    text = report.summary()
    assert "row 2: example_id 'ex-999' is not in the dataset" in text
    assert "row 3: label 'horse' is not a known class" in text
    assert report.to_dict()["problems"][1] == {
        "row": 2,
        "example_id": "ex-999",
        "label": "cat",
        "problem": "unknown_id",
    }
    assert reviews.to_positions(IDS, CLASSES) == {1: 0, 3: 2}


def test_strict_mode_names_the_bad_rows(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "r.csv", "example_id,label\nex-001,dog\nnope,cat\nex-002,zebra\n")
    with pytest.raises(DataError) as err:
        read_reviews(path, known_ids=IDS, classes=CLASSES, strict=True)
    message = str(err.value)
    assert "row 2: example_id 'nope'" in message and "row 3: label 'zebra'" in message
    assert str(path) in message


def test_duplicates_can_be_an_error(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "r.csv", "example_id,label\nex-001,dog\nex-001,cat\n")
    assert read_reviews(path, known_ids=IDS, classes=CLASSES).labels == {"ex-001": "cat"}
    with pytest.raises(DataError, match="more than once: 'ex-001'"):
        read_reviews(path, known_ids=IDS, classes=CLASSES, duplicates="error")
    with pytest.raises(ConfigError, match="duplicates"):
        read_reviews(path, known_ids=IDS, classes=CLASSES, duplicates="first")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("header", "hint"),
    [
        ("id,label", "rename the column 'id' to 'example_id'"),
        ("Example_ID,label", "rename the column 'Example_ID' to 'example_id'"),
        ("example_id,class", "rename the column 'class' to 'label'"),
        ("example_ids,label", "did you mean 'example_ids'?"),
        ("foo,label", "add a column 'example_id'"),
    ],
)
def test_missing_column_suggests_a_fix(tmp_path: Path, header: str, hint: str) -> None:
    path = _write_csv(tmp_path / "r.csv", f"{header}\nex-001,dog\n")
    with pytest.raises(DataError) as err:
        read_reviews(path, known_ids=IDS, classes=CLASSES)
    assert hint in str(err.value)
    assert "has no column" in str(err.value)


def test_reads_parquet_with_numeric_ids(tmp_path: Path) -> None:
    path = tmp_path / "r.parquet"
    pd.DataFrame({"example_id": [7, 8, 42], "label": ["dog", "bird", "cat"]}).to_parquet(path)
    reviews = read_reviews(path, known_ids=["7", "8"], classes=CLASSES)
    assert reviews.labels == {"7": "dog", "8": "bird"}
    assert [p.example_id for p in reviews.report.unknown_ids] == ["42"]


def test_ids_stay_text(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "r.csv", "example_id,label\n007,dog\nNA,cat\n")
    reviews = read_reviews(path, known_ids=["007", "NA"], classes=CLASSES)
    assert reviews.labels == {"007": "dog", "NA": "cat"}


def test_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_reviews(tmp_path / "missing.csv", known_ids=IDS, classes=CLASSES)
    other = tmp_path / "r.xlsx"
    other.write_bytes(b"x")
    with pytest.raises(DataError, match=r"must be \.csv or \.parquet"):
        read_reviews(other, known_ids=IDS, classes=CLASSES)
    empty = _write_csv(tmp_path / "empty.csv", "")
    with pytest.raises(DataError, match="cannot read review file"):
        read_reviews(empty, known_ids=IDS, classes=CLASSES)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read review file"):
        read_reviews(broken, known_ids=IDS, classes=CLASSES)


def test_to_positions_rejects_a_label_outside_the_classes(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "r.csv", "example_id,label\nex-001,dog\n")
    reviews = read_reviews(path, known_ids=IDS, classes=CLASSES)
    assert reviews.to_positions(["ex-001"], ["dog"]) == {0: 0}
    assert reviews.to_positions(["other"], CLASSES) == {}
    with pytest.raises(DataError, match="'dog'"):
        reviews.to_positions(IDS, ["cat"])
