from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dm_audit.dataset import (
    FORMAT_VERSION,
    AuditDataset,
    decode_image,
    default_ids,
    encode_png,
    is_dataset_file,
    normalize_labels,
    sort_classes,
    to_png,
)
from dm_audit.errors import DataError

# -- classes and labels ----------------------------------------------------------------------


def test_sort_classes_is_numeric_aware():
    assert sort_classes(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert sort_classes(["cat10", "cat2", "ant"]) == ["ant", "cat2", "cat10"]
    assert sort_classes(["b", "10", "-1", "2", "a"]) == ["-1", "2", "10", "a", "b"]


def test_normalize_labels_turns_numbers_into_names():
    assert list(normalize_labels(pd.Series([3, 10, 0]))) == ["3", "10", "0"]
    assert list(normalize_labels(pd.Series([3.0, -1.0]))) == ["3", "-1"]
    assert list(normalize_labels(pd.Series(["cat", " dog"]))) == ["cat", "dog"]
    assert list(normalize_labels(pd.Series([True, False]))) == ["True", "False"]
    assert list(normalize_labels(np.array([1, 2.0], dtype=object))) == ["1", "2"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1.0, 2.5, 3.0], "non-integral number 2.5 at row 1"),
        (["cat", 3, "dog"], "mixes text and numbers: row 0 is 'cat' but row 1 is 3"),
        ([1, None, 2], "1 missing value(s), the first at row 1"),
        (["a", "  ", "b"], "blank value at row 1"),
        ([b"x", b"y"], "value of type bytes at row 0"),
    ],
)
def test_normalize_labels_refuses_bad_values(values, message):
    with pytest.raises(DataError, match="column 'target'") as info:
        normalize_labels(pd.Series(values, dtype=object), "target")
    assert message in str(info.value)


def test_default_ids_are_zero_padded_and_stable():
    assert default_ids(3) == ["row-000000", "row-000001", "row-000002"]
    assert default_ids(1_000_001)[-1] == "row-1000000"
    assert default_ids(2, prefix="x") == ["x-000000", "x-000001"]


# -- images ----------------------------------------------------------------------------------


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image_dataset(blobs: list[bytes]) -> AuditDataset:
    table = pd.DataFrame(
        {
            "example_id": default_ids(len(blobs)),
            "label": ["a", "b"] * (len(blobs) // 2) + ["a"] * (len(blobs) % 2),
            "split": "train",
            "image": blobs,
        }
    )
    return AuditDataset(table, ["a", "b"], "image", "test").validate()


def test_encode_png_round_trips_pixels():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, size=(5, 7, 1), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_png(rgb), gray=False), rgb)
    np.testing.assert_array_equal(decode_image(encode_png(gray), gray=True), gray)
    with pytest.raises(DataError, match="uint8"):
        encode_png(rgb.astype(np.float32))


def test_to_png_keeps_png_and_reencodes_other_formats_losslessly():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    png = _png(pixels)
    assert to_png(png, "x") == png
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="BMP")
    converted = to_png(buffer.getvalue(), "x")
    assert converted.startswith(b"\x89PNG")
    np.testing.assert_array_equal(decode_image(converted, gray=False), pixels)
    with pytest.raises(DataError, match="cannot decode the image at row 7"):
        to_png(b"not an image", "row 7")


def test_images_all_grayscale_decode_to_one_channel():
    gray = [np.full((4, 4), v, dtype=np.uint8) for v in (10, 200)]
    dataset = _image_dataset([_png(g) for g in gray])
    images = dataset.images()
    assert images.shape == (2, 4, 4, 1) and images.dtype == np.uint8
    assert images[:, 0, 0, 0].tolist() == [10, 200]


def test_images_mixed_modes_become_rgb_and_alpha_is_dropped():
    gray = np.full((4, 4), 50, dtype=np.uint8)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 180, 0
    images = _image_dataset([_png(gray), _png(rgba)]).images()
    assert images.shape == (2, 4, 4, 3)
    assert images[0, 0, 0].tolist() == [50, 50, 50]
    assert images[1, 0, 0].tolist() == [180, 0, 0]


def test_images_16_bit_grayscale_is_rescaled_not_clipped():
    deep = np.array([[0, 65535], [257 * 100, 257 * 200]], dtype=np.uint16)
    images = _image_dataset([_png(deep), _png(deep)]).images()
    assert images[0, :, :, 0].tolist() == [[0, 255], [100, 200]]


def test_images_are_resized_to_the_most_common_size():
    small = [np.full((4, 6, 3), 90, dtype=np.uint8)] * 3
    big = [np.full((8, 8, 3), 90, dtype=np.uint8)]
    dataset = _image_dataset([_png(x) for x in small + big])
    images = dataset.images()
    assert images.shape == (4, 4, 6, 3)
    # A flat image stays flat under bilinear resizing.
    assert np.all(images == 90)
    assert dataset.images(size=(3, 5)).shape == (4, 3, 5, 3)


def test_images_size_tie_goes_to_the_larger_area():
    blobs = [_png(np.zeros((4, 4), np.uint8)), _png(np.zeros((2, 7), np.uint8))]
    assert _image_dataset(blobs).images().shape == (2, 4, 4, 1)


# -- the dataset -----------------------------------------------------------------------------


def test_from_arrays_builds_a_canonical_table(blobs_dataset):
    ds = blobs_dataset
    assert ds.classes == ["a", "b", "c"] and ds.n_classes == 3 and ds.input_kind == "features"
    assert list(ds.table.columns) == ["example_id", "label", "split", "features"]
    assert len(ds) == 120 and ds.example_ids[0] == "row-000000"
    assert ds.features().shape == (120, 4) and ds.features().dtype == np.float32
    assert ds.inputs().shape == (120, 4)
    codes = ds.label_codes()
    assert codes.dtype == np.int64 and np.bincount(codes).tolist() == [40, 40, 40]
    assert (ds.table["split"] == "test").sum() == 30
    assert not ds.has_truth


def test_from_arrays_keeps_column_major_features_as_rows():
    # A DataFrame's to_numpy() is column-major; the trainings read rows of the matrix in place.
    x = np.asfortranarray(np.arange(24, dtype=np.float64).reshape(6, 4))
    ds = AuditDataset.from_arrays(["a", "b"] * 3, features=x)
    assert ds.inputs().flags.c_contiguous and ds.inputs().dtype == np.float32
    np.testing.assert_array_equal(ds.inputs(), x)


def test_from_arrays_with_codes_and_images(colour_image_dataset):
    ds = colour_image_dataset
    assert ds.classes == ["blue", "green", "red"]
    images = ds.images()
    assert images.shape == (24, 8, 8, 3)
    # Class colour survives the PNG round trip: red images are reddest.
    reds = images[ds.label_codes() == 2].mean(axis=(0, 1, 2))
    assert reds[0] > 180 and reds[1] < 60
    coded = AuditDataset.from_arrays(
        np.array([0, 1, 1]), features=np.eye(3), classes=["x", "y"], example_ids=["p", "q", "r"]
    )
    assert coded.table["label"].tolist() == ["x", "y", "y"]
    assert coded.example_ids.tolist() == ["p", "q", "r"]


def test_subset_train_and_test(blobs_dataset):
    train, test = blobs_dataset.train(), blobs_dataset.test()
    assert len(train) == 90 and len(test) == 30
    assert set(train.table["split"]) == {"train"} and train.classes == blobs_dataset.classes
    assert train.table.index.tolist() == list(range(90))
    picked = blobs_dataset.subset([5, 2])
    assert picked.example_ids.tolist() == ["row-000005", "row-000002"]
    np.testing.assert_array_equal(picked.features(), blobs_dataset.features()[[5, 2]])
    with pytest.raises(DataError, match=r"shape \(120,\)"):
        blobs_dataset.subset(np.ones(3, dtype=bool))


def test_true_label_codes_mark_open_set_as_minus_one(blobs_dataset):
    with pytest.raises(DataError, match="no true_label column"):
        blobs_dataset.true_label_codes()
    table = blobs_dataset.table.head(3).copy()
    table["true_label"] = ["a", "zebra", "c"]
    table["label"] = ["a", "b", "a"]
    table["noise"] = ["clean", "open_set", "flipped"]
    ds = AuditDataset(table, ["a", "b", "c"], "features").validate()
    assert ds.true_label_codes().tolist() == [0, -1, 2]
    assert ds.label_codes().tolist() == [0, 1, 0]


def _features_table(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "example_id": default_ids(n),
            "label": ["a", "b"] * (n // 2),
            "split": "train",
            "features": [np.full(2, i, dtype=np.float32) for i in range(n)],
        }
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.head(0), "is empty"),
        (lambda t: t.assign(label="a"), None),
        (
            lambda t: t.assign(example_id=["x", "y", "x", "y"]),
            "column example_id: 'x' (rows 0, 2), 'y' (rows 1, 3)",
        ),
        (lambda t: t.assign(label=["a", "b", "q", "a"]), "'q' at row 2"),
        (lambda t: t.assign(split=["train", "val", "test", "train"]), "'val' at row 1"),
        (
            lambda t: t.assign(features=[np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(2)]),
            "mixes feature dimensions [2, 3]: most rows have 2 values but 'row-000001' has 3",
        ),
        (
            lambda t: t.assign(
                features=[np.zeros(2), np.zeros(2), np.array([0.0, np.nan]), np.zeros(2)]
            ),
            "the first is nan at position 1 of row 2 (example_id 'row-000002')",
        ),
    ],
)
def test_validate_names_the_problem(change, message):
    table = change(_features_table())
    classes = ["a"] if message is None else ["a", "b"]
    with pytest.raises(DataError) as info:
        AuditDataset(table, classes, "features", "t").validate()
    assert (message or "at least two are needed") in str(info.value)


def test_validate_checks_noise_agrees_with_truth():
    table = _features_table().assign(
        true_label=["a", "b", "a", "b"], noise=["clean", "flipped", "clean", "clean"]
    )
    with pytest.raises(DataError, match=r"row 1 \(example_id 'row-000001'\).*disagree"):
        AuditDataset(table, ["a", "b"], "features").validate()


def test_constructor_checks_columns_and_kind():
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['image'\]"):
        AuditDataset(_features_table(), ["a", "b"], "image")
    with pytest.raises(DataError, match="input_kind"):
        AuditDataset(_features_table(), ["a", "b"], "text")


# -- persistence -----------------------------------------------------------------------------


def _assert_same(a: AuditDataset, b: AuditDataset) -> None:
    assert a.classes == b.classes and a.input_kind == b.input_kind and a.source == b.source
    assert list(a.table.columns) == list(b.table.columns)
    for column in a.table.columns:
        if column == "features":
            np.testing.assert_array_equal(a.features(), b.features())
            assert b.features().dtype == np.float32
        else:
            assert a.table[column].tolist() == b.table[column].tolist()


def test_parquet_round_trip_features(blobs_dataset, tmp_path):
    path = blobs_dataset.to_parquet(tmp_path / "sub" / "ds.parquet")
    assert is_dataset_file(path) and list(tmp_path.joinpath("sub").iterdir()) == [path]
    schema = pq.read_schema(path)
    assert json.loads(schema.metadata[b"dm_audit.classes"]) == ["a", "b", "c"]
    assert schema.metadata[b"dm_audit.input_kind"] == b"features"
    assert schema.metadata[b"dm_audit.format_version"] == FORMAT_VERSION.encode()
    assert str(schema.field("features").type) == "list<element: float>"
    _assert_same(blobs_dataset, AuditDataset.from_parquet(path))


def test_parquet_round_trip_images_and_truth(colour_image_dataset, tmp_path):
    table = colour_image_dataset.table.copy()
    table["true_label"] = table["label"]
    table["noise"] = "clean"
    table.loc[0, ["label", "noise"]] = ["blue", "flipped"]
    noisy = AuditDataset(table, colour_image_dataset.classes, "image", "colours+noise").validate()
    loaded = AuditDataset.from_parquet(noisy.to_parquet(tmp_path / "img.parquet"))
    _assert_same(noisy, loaded)
    np.testing.assert_array_equal(loaded.images(), colour_image_dataset.images())
    assert loaded.true_label_codes().tolist() == colour_image_dataset.label_codes().tolist()


def test_from_parquet_refuses_other_files(tmp_path):
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(plain)
    assert not is_dataset_file(plain)
    with pytest.raises(DataError, match="not a dm-audit dataset file"):
        AuditDataset.from_parquet(plain)
    with pytest.raises(DataError, match="cannot read the Parquet file"):
        AuditDataset.from_parquet(tmp_path / "missing.parquet")
