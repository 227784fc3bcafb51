"""The Python API: `find_label_issues` and the `LabelAuditor` estimator."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

import dm_audit
from dm_audit.config import AuditConfig
from dm_audit.errors import ConfigError, DataError
from dm_audit.noise import inject_symmetric

FAST = {"epochs": 6, "device": "cpu", "seed": 0}


def _blobs(n_per_class: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(3), n_per_class)
    x = 4.0 * np.eye(3, 5)[truth] + rng.normal(0.0, 0.6, size=(truth.size, 5))
    return x.astype(np.float32), truth


def test_every_option_is_an_estimator_parameter() -> None:
    params = dm_audit.LabelAuditor().get_params()
    assert set(params) == {f.name for f in dataclasses.fields(AuditConfig)}
    tuned = clone(dm_audit.LabelAuditor(seed=3, epochs=5))
    assert tuned.get_params()["seed"] == 3 and tuned.get_params()["epochs"] == 5
    with pytest.raises(ValueError):
        dm_audit.LabelAuditor().set_params(not_an_option=1)


def test_find_label_issues_keeps_the_index_and_the_label_type() -> None:
    x, truth = _blobs()
    given = inject_symmetric(truth, 3, 0.2, seed=1)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(5)], index=np.arange(1000, 1180))
    labels = np.array([10, 20, 30])[given]  # integers stay integers

    issues = dm_audit.find_label_issues(frame, labels, **FAST)

    assert issues.index.tolist() == frame.index.tolist()
    assert set(issues["given_label"]) == {10, 20, 30}
    assert issues["given_label"].tolist() == labels.tolist()
    noisy = given != truth
    flagged = issues["is_label_issue"].to_numpy(dtype=bool)
    assert (flagged & noisy).sum() >= 0.8 * noisy.sum()
    right = flagged & noisy
    assert (
        issues["suggested_label"].to_numpy()[right] == np.array([10, 20, 30])[truth[right]]
    ).mean() >= 0.9


def test_the_estimator_predicts_in_the_label_values() -> None:
    x, truth = _blobs()
    names = np.array(["ant", "bee", "cat"])[truth]
    auditor = dm_audit.LabelAuditor(**FAST).fit(x, names)
    assert list(auditor.classes_) == ["ant", "bee", "cat"]
    assert auditor.is_label_issue_.shape == (180,) and auditor.ood_scores_.shape == (180,)
    proba = auditor.predict_proba(x[:10])
    assert proba.shape == (10, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert (auditor.predict(x) == names).mean() > 0.95


def test_bad_inputs_are_named() -> None:
    x, truth = _blobs()
    with pytest.raises(DataError, match="X has 180 rows but y has 179"):
        dm_audit.find_label_issues(pd.DataFrame(x), truth[:-1], **FAST)
    with pytest.raises(DataError, match="y must be one-dimensional"):
        dm_audit.find_label_issues(x, truth[:, None], **FAST)
    with pytest.raises(DataError, match="X must be a numeric"):
        dm_audit.find_label_issues(np.array(["a"] * 180), truth, **FAST)


def test_the_readme_example_runs() -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    issues = namespace["issues"]
    assert len(issues) == 1797 and issues["is_label_issue"].mean() > 0.1


def test_a_dataframe_is_read_like_a_table_and_its_index_names_the_rows() -> None:
    x, truth = _blobs()
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(5)])
    frame["notes"] = [f"free text {i}" for i in range(len(frame))]
    frame.index = [f"cust-{i}" for i in range(len(frame))]
    auditor = dm_audit.LabelAuditor(**FAST).fit(frame, truth)
    assert auditor.report_["example_id"].tolist() == frame.index.tolist()
    read = auditor.summary_["input"]
    assert [e["column"] for e in read["ignored_columns"]] == ["notes"]
    # New rows are encoded as fit encoded the table (free text left out again).
    assert (auditor.predict(frame.iloc[:40]) == truth[:40]).mean() > 0.9


def test_a_dataframe_with_categories_predicts_new_rows() -> None:
    x, truth = _blobs()
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(x[:, :3], columns=["a", "b", "c"])
    # A categorical column that carries the class (with some disagreement).
    frame["colour"] = np.where(rng.random(len(truth)) < 0.8, np.array(["r", "g", "b"])[truth], "r")
    auditor = dm_audit.LabelAuditor(**FAST).fit(frame, truth)
    new = frame.iloc[:30].copy()
    new.loc[new.index[0], "colour"] = "never seen"  # an unknown category encodes as no column
    proba = auditor.predict_proba(new)
    assert proba.shape == (30, 3)
    assert (proba.argmax(axis=1) == truth[:30]).mean() > 0.9
    with pytest.raises(DataError, match=r"lacks the input column\(s\) \['colour'\]"):
        auditor.predict(new.drop(columns="colour"))
    broken = new.astype({"a": object})
    broken.loc[broken.index[2], "a"] = "n/a"  # text where fit saw numbers: named, not NaN
    with pytest.raises(DataError, match=r"feature column 'a' .* at row 2 \(example_id '2'\)"):
        auditor.predict(broken)


def test_a_dataframe_with_gaps_is_audited_and_new_gaps_are_filled_alike() -> None:
    x, truth = _blobs()
    frame = pd.DataFrame(x[:, :3], columns=["a", "b", "c"])
    frame.loc[frame.index[::10], "a"] = np.nan
    auditor = dm_audit.LabelAuditor(**FAST).fit(frame, truth)
    assert len(auditor.report_) == len(frame)
    (entry,) = [e for e in auditor.summary_["input"]["inputs"] if e["column"] == "a"]
    assert entry["missing"] == len(frame.index[::10])
    new = frame.iloc[:30].copy()
    new.loc[new.index[1], "a"] = np.nan
    assert (auditor.predict(new) == truth[:30]).mean() > 0.9
    # New rows read from a text file may mark that gap "?" (the UCI convention): a gap too.
    marked = frame.iloc[:30].astype({"a": object})
    marked.loc[marked.index[1], "a"] = " ?"
    np.testing.assert_allclose(auditor.predict_proba(marked), auditor.predict_proba(new))


def test_a_torch_dataset_of_image_tensors(make_colour_images) -> None:
    import torch
    from torch.utils.data import TensorDataset

    images, truth = make_colour_images(n_per_class=20, size=8, seed=1)
    given = truth.copy()
    given[:4] = (given[:4] + 1) % 3
    tensors = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # ToTensor layout
    data = TensorDataset(tensors, torch.from_numpy(given))
    auditor = dm_audit.LabelAuditor(**FAST).fit(data)
    issues = auditor.report_
    assert issues.index.tolist() == list(range(60))
    assert issues["given_label"].tolist() == given.tolist()  # the items' labels, as ints
    assert auditor.summary_["input"] == {} or "inputs" not in auditor.summary_["input"]
    assert issues["is_label_issue"].to_numpy()[:4].sum() >= 3  # six epochs of a small CNN
    assert auditor.predict_proba(data).shape == (60, 3)


def test_an_image_folder_path(tmp_path, make_colour_images) -> None:
    from PIL import Image

    images, truth = make_colour_images(n_per_class=15, size=8, seed=2)
    names = ["red", "green", "blue"]
    for i, (image, label) in enumerate(zip(images, truth, strict=True)):
        wrong = i % 15 == 0  # one file per class in the wrong folder
        folder = tmp_path / "photos" / names[(label + 1) % 3 if wrong else label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img{i:03d}.png")
    issues = dm_audit.find_label_issues(tmp_path / "photos", **FAST)
    assert len(issues) == 45 and issues.index.name == "example_id"
    # Each file's given label is its folder's name (the moved files carry the wrong one).
    by_file = {Path(i).name: label for i, label in issues["given_label"].items()}
    assert by_file["img000.png"] == "green" and by_file["img001.png"] == "red"
    with pytest.raises(ConfigError, match="subfolder names: pass no y"):
        dm_audit.find_label_issues(tmp_path / "photos", truth, **FAST)


@pytest.mark.slow
def test_the_api_gives_the_command_lines_flags(tmp_path) -> None:
    from sklearn.datasets import load_digits

    from dm_audit.cli import main

    out = tmp_path / "cli"
    args = ["audit", "--input", "digits", "--inject-noise", "symmetric", "--noise-rate", "0.4"]
    assert main([*args, "--seed", "0", "--quiet", "--out", str(out)]) == 0
    cli = pd.read_parquet(out / "examples.parquet")
    x, _ = load_digits(return_X_y=True)
    api = dm_audit.find_label_issues(x, cli["given_label"].to_numpy(dtype=object), seed=0)
    assert api["is_label_issue"].tolist() == cli["is_label_issue"].tolist()
    # The report stores float32; the neighbours' order may differ at exact ties of distance.
    np.testing.assert_allclose(
        api["label_issue_score"].to_numpy(), cli["label_issue_score"].to_numpy(), atol=1e-3
    )
