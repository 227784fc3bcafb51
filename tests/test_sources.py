from __future__ import annotations

import io
import logging
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dm_audit.dataset import AuditDataset
from dm_audit.errors import ConfigError, DataError
from dm_audit.sources import (
    TableOptions,
    load_source,
    parse_vector,
    stratified_split,
    table_to_dataset,
)

# -- helpers ---------------------------------------------------------------------------------


def assert_round_trip(dataset: AuditDataset, tmp_path: Path) -> AuditDataset:
    """Saving and loading (directly and through load_source) gives the same dataset back."""
    path = dataset.to_parquet(tmp_path / "canonical.parquet")
    for loaded in (AuditDataset.from_parquet(path), load_source(str(path))):
        assert loaded.classes == dataset.classes and loaded.input_kind == dataset.input_kind
        for column in ("example_id", "label", "split"):
            assert loaded.table[column].tolist() == dataset.table[column].tolist()
        if dataset.input_kind == "features":
            np.testing.assert_array_equal(loaded.features(), dataset.features())
        else:
            assert loaded.table["image"].tolist() == dataset.table["image"].tolist()
    return dataset


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification time of every file under root (or of root itself)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


@pytest.fixture
def blob_frame(make_blobs) -> pd.DataFrame:
    """60 rows: label (int codes 0..2), id, and numeric features f0..f3 of separable blobs."""
    features, labels = make_blobs(n_per_class=20)
    frame = pd.DataFrame(features, columns=[f"f{i}" for i in range(4)])
    frame.insert(0, "label", labels)
    frame.insert(0, "uid", [f"u{i:03d}" for i in range(len(labels))])
    return frame


# -- digits ----------------------------------------------------------------------------------


def test_digits_is_the_builtin_default(tmp_path):
    ds = load_source("digits", seed=0)
    assert len(ds) == 1797 and ds.input_kind == "features" and ds.source.startswith("digits")
    assert ds.classes == [str(d) for d in range(10)]
    assert ds.example_ids[:2].tolist() == ["digits-00000", "digits-00001"]
    x = ds.features()
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    # Every row is audited, so nothing is held out unless asked.
    assert set(ds.table["split"]) == {"train"}
    assert_round_trip(ds, tmp_path)
    # Stratified on request: every class puts round(0.3 n_k) examples into test.
    split = load_source("digits", test_size=0.3, seed=0)
    for name, group in split.table.groupby("label"):
        assert (group["split"] == "test").sum() == int(np.floor(0.3 * len(group) + 0.5)), name
    assert (split.table["split"] == "test").sum() == 539


def test_split_is_seeded():
    a, b = (
        load_source("digits", test_size=0.3, seed=1),
        load_source("digits", test_size=0.3, seed=1),
    )
    c = load_source("digits", test_size=0.3, seed=2)
    assert a.table["split"].tolist() == b.table["split"].tolist()
    assert a.table["split"].tolist() != c.table["split"].tolist()
    assert set(load_source("digits").table["split"]) == {"train"}


def test_stratified_split_keeps_a_training_example_per_class():
    labels = np.array(["a"] * 10 + ["b"] * 3 + ["c"])
    split = stratified_split(labels, 0.5, seed=0)
    assert [(split[labels == k] == "test").sum() for k in "abc"] == [5, 2, 0]


# -- tables: numeric features ----------------------------------------------------------------


def test_parquet_numeric_features(blob_frame, tmp_path):
    path = tmp_path / "blobs.parquet"
    blob_frame.to_parquet(path)
    ds = load_source(str(path), id_column="uid", test_size=0.25, seed=3)
    assert ds.classes == ["0", "1", "2"] and ds.input_kind == "features"
    assert ds.example_ids.tolist() == blob_frame["uid"].tolist()
    np.testing.assert_array_equal(ds.features(), blob_frame[["f0", "f1", "f2", "f3"]].to_numpy())
    assert ds.table["label"].tolist() == [str(x) for x in blob_frame["label"]]
    assert (ds.table["split"] == "test").sum() == 15
    assert_round_trip(ds, tmp_path)
    chosen = load_source(str(path), id_column="uid", feature_columns=["f2", "f0"])
    np.testing.assert_array_equal(chosen.features(), blob_frame[["f2", "f0"]].to_numpy())


def test_csv_numeric_features_with_float_labels_and_row_ids(blob_frame, tmp_path):
    frame = blob_frame.drop(columns="uid").assign(label=blob_frame["label"].astype(float))
    path = tmp_path / "blobs.csv"
    frame.to_csv(path, index=False)
    assert "0.0" in path.read_text()
    ds = load_source(str(path), test_size=0)
    assert ds.classes == ["0", "1", "2"]
    assert ds.example_ids[[0, 59]].tolist() == ["row-000000", "row-000059"]
    np.testing.assert_allclose(ds.features(), frame[["f0", "f1", "f2", "f3"]].to_numpy(), rtol=1e-6)
    assert_round_trip(ds, tmp_path)


def test_csv_ids_stay_text_and_split_column_is_honoured(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        "example_id,x,label,split\n007,0.5,cat,train\n008,1.5,dog,Train\n009,2.5,dog,test\n"
    )
    ds = load_source(str(path), test_size=0.9)
    assert ds.example_ids.tolist() == ["007", "008", "009"]
    assert ds.table["split"].tolist() == ["train", "train", "test"]
    assert ds.classes == ["cat", "dog"]


def test_a_named_split_column_is_honoured_and_not_a_feature(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("x,label,fold_set\n0.5,cat,train\n1.5,dog,test\n2.5,dog,train\n")
    ds = load_source(str(path), split_column="fold_set")
    assert ds.table["split"].tolist() == ["train", "test", "train"]
    assert ds.features().tolist() == [[0.5], [1.5], [2.5]]
    with pytest.raises(DataError, match="split column 'missing'"):
        load_source(str(path), split_column="missing")
    with pytest.raises(ConfigError, match="split_column"):
        load_source("digits", split_column="fold_set")


def test_tsv_is_read(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("x\ty\tlabel\n1\t2\ta\n3\t4\tb\n")
    assert load_source(str(path), test_size=0).features().tolist() == [[1, 2], [3, 4]]


# -- tables: list / embedding columns --------------------------------------------------------


def test_parquet_embedding_column(blob_frame, tmp_path):
    features = blob_frame[["f0", "f1", "f2", "f3"]].to_numpy()
    frame = pd.DataFrame({"label": blob_frame["label"], "embedding": list(features)})
    path = tmp_path / "emb.parquet"
    frame.to_parquet(path)
    ds = load_source(str(path))
    np.testing.assert_array_equal(ds.features(), features.astype(np.float32))
    assert_round_trip(ds, tmp_path)
    assert load_source(str(path), feature_columns="embedding").features().shape == (60, 4)


def test_csv_list_column_written_as_text(tmp_path):
    path = tmp_path / "emb.csv"
    path.write_text('label,vec,note\n1,"[0.1, 0.2, 0.3]",x\n2,"[1e-3,2,3]",y\n1,"(4 5 6)",z\n')
    ds = load_source(str(path), test_size=0)
    np.testing.assert_allclose(ds.features(), [[0.1, 0.2, 0.3], [0.001, 2, 3], [4, 5, 6]])
    assert ds.features().dtype == np.float32
    assert_round_trip(ds, tmp_path)


def test_parse_vector():
    np.testing.assert_array_equal(parse_vector(" [1, 2.5 ,-3] "), [1.0, 2.5, -3.0])
    np.testing.assert_array_equal(parse_vector("1;2"), [1.0, 2.0])
    with pytest.raises(ValueError):
        parse_vector("[1, two]")


def test_list_column_errors_name_the_row(tmp_path):
    mixed = tmp_path / "mixed.csv"
    mixed.write_text('label,vec\na,"[1, 2]"\nb,"[1, 2, 3]"\na,"[3, 4]"\n')
    with pytest.raises(DataError, match=r"'vec' mixes feature dimensions \[2, 3\].*'row-000001'"):
        load_source(str(mixed))
    bad = tmp_path / "bad.csv"
    bad.write_text('label,vec\na,"[1, 2]"\nb,"[1, x]"\n')
    with pytest.raises(DataError, match=r"'vec' holds '\[1, x\]' at row 1"):
        load_source(str(bad))
    nan = tmp_path / "nan.csv"
    nan.write_text('label,vec\na,"[1, 2]"\nb,"[1, nan]"\n')
    with pytest.raises(DataError, match=r"position 1 of row 1 \(example_id 'row-000001'\)"):
        load_source(str(nan))


# -- tables: image columns -------------------------------------------------------------------


def test_image_bytes_column(tmp_path, make_colour_images):
    images, labels = make_colour_images(n_per_class=4)
    blobs = [png_bytes(im) for im in images]
    blobs[1] = png_bytes(images[1], "BMP")  # any readable format is stored as PNG
    frame = pd.DataFrame({"label": np.array(["r", "g", "b"])[labels], "img": blobs})
    path = tmp_path / "images.parquet"
    frame.to_parquet(path)
    ds = load_source(str(path), test_size=0.25)
    assert ds.input_kind == "image" and ds.classes == ["b", "g", "r"]
    assert all(b.startswith(b"\x89PNG") for b in ds.table["image"])
    assert ds.table["image"][0] == blobs[0]
    np.testing.assert_array_equal(ds.images(), images)
    assert_round_trip(ds, tmp_path)
    # Hugging Face datasets store images as {"bytes", "path"} structs.
    structs = frame.assign(img=[{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)])
    structs.to_parquet(path)
    np.testing.assert_array_equal(load_source(str(path)).images(), images)


def test_undecodable_image_bytes_are_named(tmp_path, make_colour_images):
    images, _ = make_colour_images(n_per_class=1)
    frame = pd.DataFrame(
        {"label": ["a", "b", "c"], "img": [png_bytes(images[0]), b"garbage", png_bytes(images[2])]}
    )
    with pytest.raises(DataError, match=r"cannot decode the image at row 1 \(example_id"):
        table_to_dataset(frame, TableOptions(image_column="img"))


def _write_image_tree(
    root: Path, make_colour_images: Callable[..., tuple[np.ndarray, np.ndarray]]
) -> tuple[list[str], np.ndarray]:
    images, labels = make_colour_images(n_per_class=3)
    paths = []
    for i, (im, k) in enumerate(zip(images, labels, strict=True)):
        relative = f"{['red', 'green', 'blue'][k]}/img_{i:02d}.png"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / relative)
        paths.append(relative)
    return paths, images


def test_image_path_column_relative_to_the_table(tmp_path, make_colour_images):
    paths, images = _write_image_tree(tmp_path / "pics", make_colour_images)
    frame = pd.DataFrame(
        {"file": [f"pics/{p}" for p in paths], "label": [p.split("/")[0] for p in paths]}
    )
    path = tmp_path / "index.csv"
    frame.to_csv(path, index=False)
    ds = load_source(str(path), test_size=0)
    np.testing.assert_array_equal(ds.images(), images)
    assert ds.classes == ["blue", "green", "red"]
    assert_round_trip(ds, tmp_path)


def test_image_path_column_with_image_root(tmp_path, make_colour_images):
    paths, images = _write_image_tree(tmp_path / "pics", make_colour_images)
    frame = pd.DataFrame({"label": [p.split("/")[0] for p in paths], "path": paths})
    table = tmp_path / "meta" / "index.parquet"
    table.parent.mkdir()
    frame.to_parquet(table)
    ds = load_source(str(table), image_column="path", image_root=tmp_path / "pics", test_size=0)
    np.testing.assert_array_equal(ds.images(), images)
    with pytest.raises(DataError, match="does not exist"):
        load_source(str(table), image_column="path")


@pytest.mark.parametrize("escape", ["../outside.png", "ABSOLUTE"])
def test_image_paths_escaping_the_root_are_refused(tmp_path, escape):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(outside)
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(root / "in.png")
    value = str(outside) if escape == "ABSOLUTE" else escape
    frame = pd.DataFrame({"label": ["a", "b"], "path": ["in.png", value]})
    path = root / "index.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"at row 1 .* escapes the image root"):
        load_source(str(path))


def test_unreadable_image_file_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "ok.png")
    path = tmp_path / "index.csv"
    pd.DataFrame({"label": ["a", "b"], "path": ["ok.png", "broken.png"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"cannot decode the image at 'broken.png' \(row 1\)"):
        load_source(str(path))


# -- image folders ---------------------------------------------------------------------------


def test_image_folder(tmp_path, make_colour_images):
    root = tmp_path / "folder"
    paths, images = _write_image_tree(root, make_colour_images)
    (root / "red" / "notes.txt").write_text("not an image")
    (root / "red" / ".hidden.png").write_bytes(b"ignored")
    (root / "top.png").write_bytes(b"ignored too")
    before = snapshot(root)
    ds = load_source(str(root), test_size=0.34, seed=0)
    assert snapshot(root) == before
    order = np.argsort(paths, kind="stable")
    assert ds.example_ids.tolist() == sorted(paths)
    np.testing.assert_array_equal(ds.images(), images[order])
    assert ds.classes == ["blue", "green", "red"]
    assert (ds.table["split"] == "test").sum() == 3
    assert_round_trip(ds, tmp_path)


def test_image_folder_with_train_and_test_layout(tmp_path):
    root = tmp_path / "folder"
    for split, n in (("train", 3), ("test", 1)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((3, 3), i, np.uint8)).save(root / split / name / f"{i}.png")
    ds = load_source(str(root), test_size=0.5)
    assert ds.example_ids[:3].tolist() == ["test/cat/0.png", "test/dog/0.png", "train/cat/0.png"]
    assert ds.table["split"].value_counts().to_dict() == {"train": 6, "test": 2}
    assert ds.images().shape == (8, 3, 3, 1)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_source(str(tmp_path / "empty"))
    (tmp_path / "one" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "one" / "cat" / "a.png")
    with pytest.raises(DataError, match="at least two are needed"):
        load_source(str(tmp_path / "one"))
    (tmp_path / "one" / "dog").mkdir()
    (tmp_path / "one" / "dog" / "b.jpg").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"cannot decode the image at .*dog/b\.jpg"):
        load_source(str(tmp_path / "one"))


# -- torchvision formats ---------------------------------------------------------------------


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def _cifar_batch(rng: np.random.Generator, n: int, n_classes: int, key: str) -> dict:
    return {
        "data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
        key: rng.integers(0, n_classes, size=n).tolist(),
    }


@pytest.fixture
def skip_md5(monkeypatch):
    """torchvision checks the CIFAR files' md5 sums, which a tiny fake cannot match."""
    monkeypatch.setattr(
        "torchvision.datasets.cifar.check_integrity",
        lambda fpath, md5=None: os.path.isfile(fpath),
    )


def test_cifar10_from_local_root(tmp_path, skip_md5):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    batches = {f"data_batch_{i}": _cifar_batch(rng, 2, 10, "labels") for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(rng, 3, 10, "labels")
    for name, batch in batches.items():
        _pickle(folder / name, batch)
    _pickle(folder / "batches.meta", {"label_names": names})
    ds = load_source(f"cifar10:{tmp_path}")
    assert len(ds) == 13 and ds.table["split"].value_counts().to_dict() == {"train": 10, "test": 3}
    assert ds.example_ids[[0, 10]].tolist() == ["cifar10-train-00000", "cifar10-test-00000"]
    expected = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    expected = expected.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(ds.train().images(), expected)
    labels = [k for i in range(1, 6) for k in batches[f"data_batch_{i}"]["labels"]]
    assert ds.train().table["label"].tolist() == [names[k] for k in labels]
    assert set(ds.classes) <= set(names) and ds.classes == sorted(ds.classes)
    assert_round_trip(ds, tmp_path)


def test_cifar100_from_local_root(tmp_path, skip_md5):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    names = [f"class_{i:02d}" for i in range(100)]
    _pickle(folder / "train", _cifar_batch(rng, 6, 3, "fine_labels"))
    _pickle(folder / "test", _cifar_batch(rng, 2, 3, "fine_labels"))
    _pickle(folder / "meta", {"fine_label_names": names})
    ds = load_source(f"cifar100:{tmp_path}")
    assert len(ds) == 8 and set(ds.classes) <= {"class_00", "class_01", "class_02"}
    assert ds.images().shape == (8, 32, 32, 3)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's idx format: magic (0, 0, uint8 code 8, ndim), big-endian dims, raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(
    ("name", "folder", "classes"),
    [
        ("mnist", "MNIST", ["0", "1", "2"]),
        ("fashionmnist", "FashionMNIST", ["Pullover", "T-shirt/top", "Trouser"]),
    ],
)
def test_mnist_formats_from_local_root(tmp_path, name, folder, classes):
    rng = np.random.default_rng(2)
    raw = tmp_path / folder / "raw"
    train_images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    train_labels = np.array([0, 1, 2, 0, 1, 2], dtype=np.uint8)
    _write_idx(raw / "train-images-idx3-ubyte", train_images)
    _write_idx(raw / "train-labels-idx1-ubyte", train_labels)
    _write_idx(raw / "t10k-images-idx3-ubyte", train_images[:2])
    _write_idx(raw / "t10k-labels-idx1-ubyte", train_labels[:2])
    before = snapshot(tmp_path)
    ds = load_source(f"{name}:{tmp_path}")
    assert snapshot(tmp_path) == before
    assert ds.classes == classes
    images = ds.images()
    assert images.shape == (8, 28, 28, 1)
    np.testing.assert_array_equal(images[:6, :, :, 0], train_images)
    assert ds.example_ids[6] == f"{name}-test-00000"
    assert_round_trip(ds, tmp_path)


def test_missing_torchvision_data_names_the_root(tmp_path):
    with pytest.raises(DataError, match=r"MNIST not found .*pass download=True"):
        load_source(f"mnist:{tmp_path}")
    with pytest.raises(ConfigError, match="needs a root folder"):
        load_source("cifar10:")


# -- validation of tables --------------------------------------------------------------------


def test_misspelt_columns_get_a_suggestion(blob_frame, tmp_path):
    path = tmp_path / "t.parquet"
    blob_frame.to_parquet(path)
    with pytest.raises(DataError, match=r"label column 'lable' not found .*did you mean 'label'"):
        load_source(str(path), label_column="lable")
    with pytest.raises(DataError, match=r"id column 'UID' not found .*did you mean 'uid'"):
        load_source(str(path), id_column="UID")
    with pytest.raises(DataError, match=r"feature column 'f33' not found .*did you mean 'f3'"):
        load_source(str(path), feature_columns=["f0", "f33"])


def test_non_finite_features_name_column_and_row(blob_frame):
    frame = blob_frame.astype({"f2": np.float64})
    frame.loc[7, "f2"] = np.inf
    with pytest.raises(DataError, match=r"'f2' has 1 .* at row 7 \(example_id 'u007'\)"):
        table_to_dataset(frame, TableOptions(id_column="uid"))
    frame.loc[7, "f2"] = 1e39  # overflows float32
    with pytest.raises(DataError, match="beyond float32"):
        table_to_dataset(frame, TableOptions(id_column="uid"))


def test_csv_text_in_a_numeric_column_is_reported(tmp_path):
    path = tmp_path / "typo.csv"
    path.write_text("label,x,y\na,1,2\nb,3,4\na,5,oops\nb,7,8\n")
    with pytest.raises(DataError, match=r"'y' of .* looks numeric but row 2 holds 'oops'"):
        load_source(str(path))
    with pytest.raises(DataError, match=r"'y' is not numeric: row 2 .* holds 'oops'"):
        load_source(str(path), feature_columns=["x", "y"])


def test_csv_missing_number_markers_are_gaps(tmp_path, caplog):
    # "?" (UCI's marker) and "." (SAS's) in a column of numbers are gaps, filled like empty
    # cells; a category column keeps "?" as a category of its own.
    lines = ["label,x,y,kind"]
    for i in range(40):
        y = "?" if i == 5 else ("." if i == 9 else str(i % 7))
        lines.append(f"{'ab'[i % 2]},{i},{y},{'?' if i % 3 == 0 else 'red'}")
    path = tmp_path / "uci.csv"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="dm_audit.sources"):
        dataset = load_source(str(path), test_size=0.0)
    assert "2 cell(s) holding '.' or '?' read as missing numbers" in caplog.text
    assert dataset.notes["missing_markers"] == [{"column": "y", "markers": [".", "?"], "rows": 2}]
    encodings = {entry["column"]: entry["encoding"] for entry in dataset.notes["inputs"]}
    assert encodings["y"] == "numeric" and encodings["kind"].startswith("one-hot")
    assert np.isfinite(dataset.features()).all()
    # Named as a feature, the column reads the same way.
    named = load_source(str(path), feature_columns=["x", "y"], test_size=0.0)
    assert named.features().shape == (40, 2) and np.isfinite(named.features()).all()
    # Mostly gaps: still a numeric column, not categories of numbers and "?".
    sparse = tmp_path / "sparse.csv"
    rows = [f"{'ab'[i % 2]},{i},{i if i % 4 == 0 else '?'}" for i in range(40)]
    sparse.write_text("label,x,y\n" + "\n".join(rows) + "\n")
    (entry,) = [e for e in load_source(str(sparse)).notes["inputs"] if e["column"] == "y"]
    assert entry["encoding"] == "numeric" and entry["missing"] == 30


def test_csv_text_beside_missing_markers_is_still_a_typo(tmp_path):
    path = tmp_path / "typo.csv"
    path.write_text("label,x,y\na,1,?\nb,3,4\na,5,oops\nb,7,8\n")
    with pytest.raises(DataError, match=r"'y' of .* looks numeric but row 2 holds 'oops'"):
        load_source(str(path))


@pytest.mark.parametrize(
    ("frame", "options", "message"),
    [
        (pd.DataFrame({"label": [], "x": []}), TableOptions(), "has no rows"),
        (pd.DataFrame({"label": ["a", "a"], "x": [1, 2]}), TableOptions(), "1 class(es) ['a']"),
        (
            pd.DataFrame({"id": ["p", "q", "p"], "label": ["a", "b", "a"], "x": [1, 2, 3]}),
            TableOptions(id_column="id"),
            "column example_id: 'p' (rows",
        ),
        (
            pd.DataFrame({"label": [1.0, 2.5], "x": [1, 2]}),
            TableOptions(),
            "label column 'label' holds the non-integral number 2.5 at row 1",
        ),
        (
            pd.DataFrame({"label": pd.Series(["a", 2], dtype=object), "x": [1, 2]}),
            TableOptions(),
            "mixes text and numbers",
        ),
        (
            pd.DataFrame({"label": ["a", "b"], "name": ["x", "y"]}),
            TableOptions(),
            "no usable input column: 'name' 2 distinct values in 2 rows: an identifier",
        ),
        (
            pd.DataFrame({"label": ["a", "b"], "x": [1, 2], "p": ["a.png", "b.png"]}),
            TableOptions(),
            "several possible inputs (tabular columns ['x']; path column 'p')",
        ),
        (
            pd.DataFrame({"label": ["a", "b"], "x": [1, 2], "split": ["train", "dev"]}),
            TableOptions(),
            "'split' holds 'dev' at row 1",
        ),
        (
            pd.DataFrame({"label": ["a", "b"], "x": [1, 2], "split": ["test", "test"]}),
            TableOptions(),
            "no example in the train split",
        ),
        (
            pd.DataFrame({"label": ["a", "b"], "name": ["x", "y"]}),
            TableOptions(image_column="name"),
            "holds neither image bytes nor image file paths",
        ),
    ],
)
def test_bad_tables_are_refused(frame, options, message):
    with pytest.raises(DataError) as info:
        table_to_dataset(frame, options, source="t.csv")
    assert message in str(info.value)


def test_source_files_are_never_modified(blob_frame, tmp_path):
    csv, parquet = tmp_path / "t.csv", tmp_path / "t.parquet"
    blob_frame.to_csv(csv, index=False)
    blob_frame.to_parquet(parquet)
    before = snapshot(tmp_path)
    load_source(str(csv), id_column="uid")
    load_source(str(parquet), id_column="uid")
    assert snapshot(tmp_path) == before


# -- the spec and options --------------------------------------------------------------------


def test_bad_specs_and_options(tmp_path):
    with pytest.raises(DataError, match=r"no data source 'digit'.*did you mean 'digits'"):
        load_source("digit")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"unknown table format '\.txt'"):
        load_source(str(tmp_path / "data.txt"))
    with pytest.raises(ConfigError, match="test_size"):
        load_source("digits", test_size=1.0)
    with pytest.raises(ConfigError, match="image_root only apply to table sources"):
        load_source("digits", image_root=tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        table_to_dataset(
            pd.DataFrame({"label": ["a", "b"], "x": [1, 2]}),
            TableOptions(feature_columns=["x"], image_column="x"),
        )


def test_a_column_named_id_names_the_rows_when_its_values_are_distinct(tmp_path, caplog):
    # Written class by class: read as a feature, the row number would give every label away.
    frame = pd.DataFrame(
        {
            "ID": [10, 11, 12, 13, 14, 15],
            "x": [0.1, 0.9, 0.2, 0.8, 0.3, 0.7],
            "label": ["a", "a", "a", "b", "b", "b"],
        }
    )
    with caplog.at_level("INFO", logger="dm_audit.sources"):
        data = table_to_dataset(frame, source="rows.csv")
    assert list(data.example_ids) == ["10", "11", "12", "13", "14", "15"]
    assert [entry["column"] for entry in data.notes["inputs"]] == ["x"]
    assert data.features().shape == (6, 1)
    assert "rows.csv: column 'ID' names the rows" in caplog.text
    # The same from a file, as the CLI reads it.
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    assert list(load_source(str(path)).example_ids) == list(data.example_ids)
    # Repeated or missing values name no rows: the column stays an input, the rows numbered
    # (and a missing value is filled as any other feature's gap).
    kept = table_to_dataset(frame.assign(ID=[1, 1, 2, 2, 3, 3]))
    assert kept.example_ids[0] == "row-000000"
    assert [entry["column"] for entry in kept.notes["inputs"]] == ["ID", "x"]
    gapped = table_to_dataset(frame.assign(ID=[1.0, 2.0, None, 4.0, 5.0, 6.0]))
    assert gapped.example_ids[0] == "row-000000"
    assert [entry.get("missing") for entry in gapped.notes["inputs"]] == [1, None]
    # A column the user names as a feature stays one.
    featured = table_to_dataset(frame, TableOptions(feature_columns=["ID", "x"]))
    assert featured.example_ids[0] == "row-000000"
    assert featured.features().shape == (6, 2)
    # An example_id column or a named id column wins.
    named = table_to_dataset(frame.assign(example_id=list("pqrstu")))
    assert list(named.example_ids) == list("pqrstu")
    assert [entry["column"] for entry in named.notes["inputs"]] == ["ID", "x"]
