"""What a user's table may hold: column types encoded as inputs, roles never used as inputs,
label spellings read one way in every format, compressed and `;`-separated files."""

from __future__ import annotations

import logging
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dm_audit.cli import EXIT_BAD_INPUT, main
from dm_audit.errors import ConfigError, DataError
from dm_audit.reviews import read_reviews
from dm_audit.sources import TableOptions, load_source, table_to_dataset
from tests.test_bad_input import assert_refused, audit_args, blobs


def mixed_table(n: int = 90, seed: int = 0) -> pd.DataFrame:
    """Numbers, a boolean, a category, a date and a free-text column; the class follows the
    category and the boolean."""
    rng = np.random.default_rng(seed)
    codes = np.arange(n) % 3
    return pd.DataFrame(
        {
            "example_id": [f"ex-{i}" for i in range(n)],
            "x": rng.normal(size=n) + codes,
            "member": codes == 1,
            "colour": np.array(["red", "green", "blue"])[codes],
            "joined": pd.Timestamp("2024-01-01") + pd.to_timedelta(codes * 30, unit="D"),
            "comment": [f"free text number {i}" for i in range(n)],
            "label": np.array(["ant", "bee", "cat"])[codes],
        }
    )


# ---------------------------------------------------------------------------- encoded columns


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_categorical_boolean_and_date_columns_are_encoded_and_recorded(
    tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"t{suffix}"
    frame = mixed_table()
    frame.to_parquet(path) if suffix == ".parquet" else frame.to_csv(path, index=False)

    dataset = load_source(str(path))

    inputs = {e["column"]: e for e in dataset.notes["inputs"]}
    assert list(inputs) == ["x", "member", "colour", "joined"]
    assert inputs["x"]["encoding"] == "numeric"
    assert inputs["member"]["encoding"] == "boolean (0/1)"
    assert inputs["colour"]["encoding"] == "one-hot"
    assert sorted(inputs["colour"]["categories"]) == ["blue", "green", "red"]
    assert inputs["joined"]["encoding"].startswith("date")
    assert [e["column"] for e in dataset.notes["ignored_columns"]] == ["comment"]
    features = dataset.features()
    assert features.shape == (90, 1 + 1 + 3 + 1)
    # The one-hot block names the category of every row.
    red = frame["colour"].to_numpy() == "red"
    assert set(np.unique(features[red, 2:5].argmax(axis=1)).tolist()) == {
        inputs["colour"]["categories"].index("red")
    }
    np.testing.assert_array_equal(features[:, 1], (frame["member"]).astype(np.float32))
    days = features[:, 5] - features[:, 5].min()
    np.testing.assert_allclose(days, np.arange(90) % 3 * 30.0)


def test_rare_categories_share_one_column_and_the_width_is_bounded() -> None:
    n = 400
    values = [f"c{i % 60}" for i in range(n - 5)] + [f"once-{i}" for i in range(5)]
    frame = pd.DataFrame({"cat": values, "label": np.arange(n) % 2})
    dataset = table_to_dataset(frame)
    (entry,) = dataset.notes["inputs"]
    assert dataset.features().shape[1] == len(entry["categories"]) <= 32
    assert any("infrequent" in c for c in entry["categories"])
    assert dataset.features().sum(axis=1).tolist() == [1.0] * n  # every row in one column


def test_an_identifier_named_as_a_feature_is_refused() -> None:
    frame = mixed_table()
    with pytest.raises(DataError, match=r"'comment' .* 90 distinct values in 90 rows"):
        table_to_dataset(frame, TableOptions(feature_columns=["x", "comment"]))


def test_a_named_categorical_feature_is_encoded() -> None:
    dataset = table_to_dataset(mixed_table(), TableOptions(feature_columns=["colour"]))
    assert dataset.features().shape == (90, 3)


def test_a_truth_column_is_never_an_input() -> None:
    frame = mixed_table().assign(true_label=lambda f: f["label"])
    dataset = table_to_dataset(frame)
    assert "true_label" not in [e["column"] for e in dataset.notes["inputs"]]
    assert "true_label" in [e["column"] for e in dataset.notes["ignored_columns"]]


def test_missing_numbers_and_dates_are_filled_from_the_nearest_rows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    frame = mixed_table()
    frame.loc[[7, 8], "x"] = np.nan
    frame.loc[4, "joined"] = pd.NaT
    with caplog.at_level(logging.WARNING):
        dataset = table_to_dataset(frame)

    inputs = {e["column"]: e for e in dataset.notes["inputs"]}
    assert inputs["x"]["missing"] == 2
    assert inputs["x"]["fill"] == pytest.approx(frame["x"].median())
    assert inputs["joined"]["missing"] == 1
    features = dataset.features()
    assert features.shape == (90, 1 + 1 + 3 + 1)  # no column added
    assert np.isfinite(features).all()
    # Every other input says which of three groups a row is in: the nearest rows are its own
    # group's, so a gap takes a mean of the group's values (a date: the group's date).
    codes = np.arange(90) % 3
    for row in (7, 8):
        own = frame["x"][(codes == codes[row]) & frame["x"].notna()]
        assert own.min() <= features[row, 0] <= own.max()
    joined_days = features[:, 5]
    assert joined_days[4] == pytest.approx(joined_days[np.flatnonzero(codes == codes[4])[0]])
    assert "3 missing value(s) in 2 column(s) ('x' 2, 'joined' 1)" in caplog.text


def test_a_table_without_gaps_records_none() -> None:
    dataset = table_to_dataset(mixed_table())
    assert all("missing" not in e for e in dataset.notes["inputs"])
    assert dataset.features().shape[1] == 6


def test_an_infinite_number_is_still_refused_by_column_and_row() -> None:
    frame = mixed_table()
    frame.loc[7, "x"] = np.inf
    frame.loc[3, "x"] = np.nan  # a gap before it is filled, not named
    with pytest.raises(
        DataError, match=r"feature column 'x' .* inf at row 7 \(example_id 'ex-7'\)"
    ):
        table_to_dataset(frame)


def test_a_number_beyond_float32_beside_a_gap_is_refused_by_name() -> None:
    frame = mixed_table()
    frame.loc[3, "x"] = np.nan
    frame.loc[9, "x"] = 1e308
    with pytest.raises(DataError, match=r"feature column 'x' .*beyond float32.* at row 9"):
        table_to_dataset(frame)


def test_new_rows_are_filled_as_the_table_was() -> None:
    from dm_audit.tabular import apply_encoding

    frame = mixed_table()
    frame.loc[3, "x"] = np.nan
    inputs = table_to_dataset(frame).notes["inputs"]
    fill = next(e for e in inputs if e["column"] == "x")["fill"]

    new = mixed_table(6, seed=1)
    new.loc[2, "x"] = np.nan
    encoded = apply_encoding(new, inputs, "new rows")
    # New rows have no table rows near them to read: the column's recorded median.
    assert encoded.shape == (6, 6)
    assert encoded[2, 0] == pytest.approx(fill)
    np.testing.assert_allclose(encoded[[0, 1, 3, 4, 5], 0], new["x"].drop(2), rtol=1e-6)

    # Text in a numeric column is not a gap: refused, not filled.
    text = new.astype({"x": object})
    text.loc[1, "x"] = "n/a"
    with pytest.raises(DataError, match=r"feature column 'x' .* at row 1"):
        apply_encoding(text, inputs, "new rows")
    # A column the table had no gap in has no filled value to give: its gap is refused.
    no_gaps = table_to_dataset(mixed_table()).notes["inputs"]
    with pytest.raises(DataError, match=r"feature column 'x' .* at row 2"):
        apply_encoding(new, no_gaps, "new rows")


def test_a_table_with_gaps_is_audited_by_the_cli(tmp_path: Path) -> None:
    source = tmp_path / "gaps.csv"
    frame = blobs(90)
    frame.loc[::9, "f1"] = np.nan
    frame.to_csv(source, index=False)
    out = tmp_path / "out"
    assert main(audit_args(source, out)) == 0
    examples = pd.read_parquet(out / "examples.parquet")
    assert len(examples) == 90
    assert source.read_text().count(",,") == 10  # the input file keeps its gaps


# ------------------------------------------------------------------------ roles are not inputs


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            TableOptions(feature_columns=["x", "label"]),
            "feature column 'label' is the label column",
        ),
        (TableOptions(feature_columns=["x", "example_id"]), "'example_id' is the id column"),
        (TableOptions(image_column="label"), "image column 'label' is the label column"),
        (
            TableOptions(feature_columns=["x", "split"]),
            "feature column 'split' is the split column",
        ),
    ],
)
def test_the_label_id_and_split_columns_cannot_be_inputs(
    options: TableOptions, message: str
) -> None:
    frame = mixed_table().assign(split="train")
    with pytest.raises(ConfigError, match=message):
        table_to_dataset(frame, options)


def test_the_label_column_as_a_feature_is_refused_by_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "t.csv"
    blobs().to_csv(source, index=False)
    assert_refused(
        tmp_path,
        capsys,
        audit_args(source, tmp_path / "out", "--features", "f0", "f1", "label"),
        "feature column 'label' is the label column",
    )


# ---------------------------------------------------------------------------- label spellings


def test_label_spellings_are_one_class_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    nfd = unicodedata.normalize("NFD", "café")
    nfc = unicodedata.normalize("NFC", "café")
    labels = ["cat", " cat", "cat ", nfd, nfc, "dog"] * 5
    frame = pd.DataFrame({"label": labels, "x": np.arange(30.0)})
    with caplog.at_level(logging.WARNING):
        dataset = table_to_dataset(frame)
    assert dataset.classes == [nfc, "cat", "dog"]
    spelled = {e["class"]: e["spellings"] for e in dataset.notes["label_spellings"]}
    assert spelled["cat"] == {" cat": 5, "cat": 5, "cat ": 5}
    assert set(spelled[nfc]) == {nfd, nfc}
    assert "' cat' (5 rows)" in caplog.text


def test_a_spelled_class_can_be_reviewed(tmp_path: Path) -> None:
    reviews = tmp_path / "reviews.csv"
    reviews.write_text("example_id,label\nex-1, cat\n", encoding="utf-8")
    result = read_reviews(reviews, known_ids=["ex-1"], classes=["cat", "dog"], strict=True)
    assert result.report.n_accepted == 1


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_label_text_reads_the_same_from_csv_and_parquet(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame({"label": ["03", "3", "10"] * 10, "x": np.arange(30.0)})
    path = tmp_path / f"t{suffix}"
    frame.to_parquet(path) if suffix == ".parquet" else frame.to_csv(path, index=False)
    assert load_source(str(path)).classes == ["03", "3", "10"]


def test_the_same_number_written_twice_warns(caplog: pytest.LogCaptureFixture) -> None:
    frame = pd.DataFrame({"label": ["03", "3", "10"] * 10, "x": np.arange(30.0)})
    with caplog.at_level(logging.WARNING):
        dataset = table_to_dataset(frame)
    assert dataset.notes["numeric_label_spellings"] == [["03", "3"]]
    assert "the classes '03' and '3' are the same number" in caplog.text


# ------------------------------------------------------------------------------- file formats


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz", "zip"])
def test_compressed_csv_is_read(tmp_path: Path, compression: str) -> None:
    path = tmp_path / f"t.csv.{compression}"
    blobs().to_csv(path, index=False)
    dataset = load_source(str(path))
    assert len(dataset) == 60 and dataset.classes == ["ant", "bee", "cat"]


@pytest.mark.parametrize("delimiter", [";", "|", "\t"])
def test_the_delimiter_of_a_csv_is_detected(tmp_path: Path, delimiter: str) -> None:
    path = tmp_path / "t.csv"
    blobs().to_csv(path, index=False, sep=delimiter)
    dataset = load_source(str(path))
    assert dataset.features().shape == (60, 4)


def test_an_unsplittable_csv_names_what_was_seen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.csv"
    path.write_text("label;f0;f1\nant;1;2\nbee;3;4;5\nant;1\n")
    code = main(audit_args(path, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert "reads as one column 'label;f0;f1'" in err


def test_quoted_fields_holding_delimiters_are_read(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    frame = blobs().assign(note=[f"seen {i}; checked, ok" for i in range(60)])
    frame.to_csv(path, index=False)
    dataset = load_source(str(path))
    assert len(dataset) == 60 and dataset.features().shape[1] == 4
    assert [e["column"] for e in dataset.notes["ignored_columns"]] == ["note"]


def test_a_nullable_boolean_with_gaps_reads_the_same_from_csv_and_parquet(tmp_path: Path) -> None:
    frame = mixed_table().drop(columns=["comment"])
    frame["member"] = pd.array([True, None, False] * 30, dtype="boolean")
    got = {}
    for suffix in (".parquet", ".csv"):
        path = tmp_path / f"t{suffix}"
        frame.to_parquet(path) if suffix == ".parquet" else frame.to_csv(path, index=False)
        inputs = {e["column"]: e for e in load_source(str(path)).notes["inputs"]}
        got[suffix] = inputs["member"]["encoding"]
    assert got == {".parquet": "one-hot", ".csv": "one-hot"}


def test_an_empty_column_is_left_out_in_auto_detection() -> None:
    frame = mixed_table().assign(empty=np.nan)
    dataset = table_to_dataset(frame)
    assert "empty" in [e["column"] for e in dataset.notes["ignored_columns"]]
    with pytest.raises(DataError, match=r"'empty' .* holds no value"):
        table_to_dataset(frame, TableOptions(feature_columns=["x", "empty"]))


def test_decimal_commas_under_a_semicolon_delimiter(tmp_path: Path) -> None:
    path = tmp_path / "euro.csv"
    frame = blobs()
    frame.to_csv(path, index=False, sep=";", decimal=",")
    dataset = load_source(str(path))
    np.testing.assert_allclose(
        dataset.features(), frame[["f0", "f1", "f2", "f3"]].to_numpy(np.float32), rtol=1e-6
    )


def test_a_feature_named_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"\['x'\] named more than once"):
        table_to_dataset(mixed_table(), TableOptions(feature_columns=["x", "x"]))


def test_invisible_characters_around_a_label_are_not_part_of_it() -> None:
    frame = pd.DataFrame(
        {"label": ["cat", "cat\u200b", "dog", "\ufeffdog"] * 5, "x": np.arange(20.0)}
    )
    assert table_to_dataset(frame).classes == ["cat", "dog"]
