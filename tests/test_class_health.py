"""Class health from the estimated joint, and the self-contained HTML report."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
from sklearn.datasets import load_digits, make_classification

from dm_audit import class_health
from dm_audit.audit import AuditConfig, run_audit
from dm_audit.dataset import AuditDataset
from dm_audit.reports import CLASSES_SCHEMA, read_report


def test_quality_confusions_and_score_follow_the_joint() -> None:
    # 3 classes of 100 rows each: 20 rows labelled "b" are truly "a", 5 labelled "c" are "b".
    joint = np.array([[80, 20, 0], [0, 75, 5], [0, 5, 95]], dtype=float).T / 280
    joint = joint.T  # [true, given]
    given = np.repeat([0, 1, 2], [80, 100, 100])
    frame, summary = class_health.class_health(
        joint, ["a", "b", "c"], given, np.zeros(280, bool), np.zeros(280, bool)
    )
    by = frame.set_index("class")
    column = joint.sum(axis=0)
    assert by.loc["b", "label_quality"] == pytest.approx(joint[1, 1] / column[1])
    assert by.loc["b", "confused_with"][0] == "a"
    assert by.loc["b", "noise_rate"] == pytest.approx(1 - joint[1, 1] / column[1])
    assert frame["class"].iloc[0] == "b"  # worst first
    assert summary["label_health_score"] == pytest.approx(np.trace(joint))
    assert summary["overlapping_pairs"][0]["classes"] == ["a", "b"]
    assert by.loc["a", "overlaps_most_with"] == "b"


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["digits", "synthetic"])
def test_an_injected_pair_is_ranked_first_among_overlapping_classes(shape: str) -> None:
    if shape == "digits":
        x, y = load_digits(return_X_y=True)
        pair = (3, 5)
    else:
        x, y = make_classification(
            3000, 20, n_informative=10, n_classes=6, n_clusters_per_class=1, random_state=2
        )
        pair = (1, 4)
    rng = np.random.default_rng(0)
    given = y.copy()
    source = np.flatnonzero(y == pair[0])
    flip = rng.choice(source, int(0.3 * source.size), replace=False)
    given[flip] = pair[1]
    names = [f"k{c}" for c in range(int(y.max()) + 1)]
    data = AuditDataset.from_arrays(
        [names[c] for c in given], classes=names, features=x.astype(np.float32), source=shape
    )
    report = run_audit(data, AuditConfig(seed=0, progress=False, device="cpu"))
    first = report.summary["class_health"]["overlapping_pairs"][0]
    assert first["classes"] == [names[pair[0]], names[pair[1]]]
    assert report.classes is not None
    # The two classes of the pair have the worst estimated label quality.
    assert set(report.classes["class"].iloc[:2]) == {names[pair[0]], names[pair[1]]}


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.sources: list[str] = []
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag not in {"meta", "img", "br", "link", "input"}:
            self.open.append(tag)
        for name, value in attrs:
            if name in {"src", "href"} and value is not None:
                self.sources.append(value)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert page.open == []  # every element closed, in order
    return page


@pytest.mark.slow
def test_report_files_for_an_image_folder(tmp_path, make_colour_images) -> None:
    images, labels = make_colour_images(n_per_class=20, size=8, seed=3)
    given = labels.copy()
    given[:6] = (given[:6] + 1) % 3
    names = np.array(["red", "green", "blue"])
    data = AuditDataset.from_arrays(
        names[given], classes=list(names), images=images, source="colours<script>"
    )
    run_audit(data, AuditConfig(seed=0, progress=False, device="cpu", retrain=False), tmp_path)
    classes = read_report(tmp_path / "classes.parquet", CLASSES_SCHEMA)
    assert sorted(classes["class"]) == sorted(names)
    page = _parse(tmp_path / "report.html")
    # Self-contained: every image is inlined, nothing is fetched, nothing runs.
    assert page.sources and all(s.startswith("data:image/png;base64,") for s in page.sources)
    assert "script" not in page.tags
    text = " ".join(page.text)
    assert "colours<script>" in text  # the source name, escaped in the markup
    assert "Class health" in text and "Suspected label issues" in text
    flagged = json.loads((tmp_path / "summary.json").read_text())["counts"]["label_issues"]
    # Thumbnails: each listed suspect, and rows of its suggested class beside it.
    assert flagged > 0
    assert len(page.sources) > flagged + len(list((tmp_path / "plots").iterdir()))
    assert "report.html" in json.loads((tmp_path / "summary.json").read_text())["files"]
