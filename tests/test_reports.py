"""Report schemas and the atomic, staged report writer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.figure import Figure

import dm_audit.reports as reports
from dm_audit.atomic import RUN_MARKER
from dm_audit.errors import ConfigError, DataError
from dm_audit.reports import (
    CORRECTED_LABELS_SCHEMA,
    EXAMPLES_SCHEMA,
    LABEL_ISSUES_SCHEMA,
    METRICS_SCHEMA,
    SCHEMA_VERSION,
    corrected_labels_frame,
    label_issues_frame,
    read_report,
    table_from_frame,
    write_reports,
)


def _examples(n: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    score = np.array([0.1, 0.95, 0.2, 0.7, 0.95, 0.05])[:n]
    return pd.DataFrame(
        {
            "example_id": [f"id{i}" for i in range(n)],
            "split": "train",
            "given_label": ["cat", "dog", "cat", "dog", "cat", "dog"][:n],
            "p_given": rng.random(n),  # float64 on purpose: stored as float32
            "emphasis_weight": rng.random(n) * 3,
            "predicted_label": ["cat", "cat", "cat", "cat", "dog", "dog"][:n],
            "suggested_label": ["cat", "cat", "cat", "cat", "dog", "dog"][:n],
            "suggestion_confidence": rng.random(n),
            "label_issue_score": score,
            "is_label_issue": score > 0.5,
            "ood_score": rng.random(n),
            "is_ood": [False, False, False, True, False, False][:n],
            "corrected_label": ["cat", "cat", "cat", None, "dog", "dog"][:n],
            "correction_source": [
                "kept",
                "auto_corrected",
                "kept",
                "ood_set_aside",
                "auto_corrected",
                "kept",
            ][:n],
        }
    )


def test_schemas_are_exact_and_versioned() -> None:
    assert EXAMPLES_SCHEMA.names == [
        "example_id", "split", "fold", "given_label", "true_label", "is_noisy", "p_given", "mean_p",
        "emphasis_weight", "predicted_label", "predicted_prob", "knn_agreement",
        "label_issue_score", "is_label_issue", "ood_score", "is_ood",
        "near_duplicate_score", "is_near_duplicate", "near_duplicate_set", "is_leaked_duplicate",
        "suggested_label", "suggestion_confidence", "corrected_label", "correction_source",
    ]  # fmt: skip
    required = [f.name for f in EXAMPLES_SCHEMA if not f.nullable]
    assert required == [
        "example_id", "given_label", "p_given", "emphasis_weight", "predicted_label",
        "label_issue_score", "is_label_issue", "ood_score", "is_ood", "suggested_label",
    ]  # fmt: skip
    assert EXAMPLES_SCHEMA.field("p_given").type == pa.float32()
    assert EXAMPLES_SCHEMA.field("is_label_issue").type == pa.bool_()
    assert EXAMPLES_SCHEMA.field("true_label").nullable
    assert LABEL_ISSUES_SCHEMA.names == [
        "example_id", "given_label", "suggested_label", "label_issue_score",
        "suggestion_confidence", "p_given", "correction_source",
    ]  # fmt: skip
    assert LABEL_ISSUES_SCHEMA.field("correction_source").nullable
    assert CORRECTED_LABELS_SCHEMA.names == [
        "example_id", "original_label", "corrected_label", "source",
    ]  # fmt: skip
    assert METRICS_SCHEMA.names == ["stage", "fold", "epoch"]
    for name, schema in reports.SCHEMAS.items():
        assert schema.metadata[b"dm_audit_schema_version"] == SCHEMA_VERSION.encode()
        assert schema.metadata[b"dm_audit_table"] == name.encode()


def test_write_reports_round_trip(tmp_path: Path) -> None:
    examples = _examples()
    metrics = pd.DataFrame(
        {"stage": ["audit", "audit"], "epoch": [1, 2], "loss": [1.2, 0.8], "test_acc": [0.5, 0.9]}
    )
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    external = tmp_path / "external.png"
    fig.savefig(external, format="png")
    summary = {"noise_rate": np.float64(0.2), "lam": 0.5, "beta": 12, "missing": float("nan")}
    paths = write_reports(
        tmp_path / "out",
        examples,
        metrics_df=metrics,
        summary=summary,
        plots={"p_distribution": fig, "weights.png": external},
    )
    out = tmp_path / "out"
    assert paths.out_dir == out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*reports.REPORT_FILES, "plots", RUN_MARKER]
    )
    for path, schema in (
        (paths.examples, EXAMPLES_SCHEMA),
        (paths.label_issues, LABEL_ISSUES_SCHEMA),
        (paths.corrected_labels, CORRECTED_LABELS_SCHEMA),
    ):
        assert pq.read_schema(path).equals(schema, check_metadata=True)
    back = read_report(paths.examples, EXAMPLES_SCHEMA)
    assert list(back["example_id"]) == list(examples["example_id"])
    np.testing.assert_allclose(back["p_given"], examples["p_given"].astype(np.float32))
    assert back["true_label"].isna().all()  # optional column filled with nulls

    issues = read_report(paths.label_issues, LABEL_ISSUES_SCHEMA)
    # Flagged only, most suspicious first, ties by example_id.
    assert list(issues["example_id"]) == ["id1", "id4", "id3"]
    corrected = read_report(paths.corrected_labels)
    assert list(corrected["source"]) == list(examples["correction_source"])
    assert corrected["corrected_label"].isna().tolist() == [False, False, False, True, False, False]

    m = pq.read_table(paths.metrics)
    assert m.schema.names == ["stage", "fold", "epoch", "loss", "test_acc"]
    assert m.schema.field("epoch").type == pa.int32()
    assert m.schema.field("loss").type == pa.float64()

    data = json.loads(paths.summary.read_text())
    assert data["dm_audit_schema_version"] == SCHEMA_VERSION
    assert data["noise_rate"] == 0.2 and data["missing"] is None
    assert data["files"][-2:] == ["plots/p_distribution.png", "plots/weights.png"]
    for png in paths.plots.values():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_or_bad_column_fails_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"examples: missing required column\(s\) \['p_given'\]"):
        write_reports(out, _examples().drop(columns="p_given"))
    bad = _examples()
    bad.loc[2, "label_issue_score"] = 1.5
    with pytest.raises(DataError, match=r"'label_issue_score' row 2 = 1\.5 is outside"):
        write_reports(out, bad)
    bad = _examples()
    bad["embedding"] = 0.0
    with pytest.raises(DataError, match=r"unknown column\(s\) \['embedding'\]"):
        write_reports(out, bad)
    bad = _examples()
    bad.loc[1, "example_id"] = "id0"
    with pytest.raises(DataError, match="'id0' appears more than once"):
        write_reports(out, bad)
    bad = _examples()
    bad.loc[0, "correction_source"] = "guessed"
    with pytest.raises(DataError, match="unknown value"):
        write_reports(out, bad)
    bad = _examples()
    bad["is_ood"] = ["yes"] * 6
    with pytest.raises(DataError, match="'is_ood' must be boolean"):
        write_reports(out, bad)
    bad = _examples()
    bad.loc[4, "given_label"] = None
    with pytest.raises(DataError, match="'given_label' has a missing value at row 4"):
        write_reports(out, bad)
    bad = _examples()
    bad["p_given"] = ["high"] * 6
    with pytest.raises(DataError, match="'p_given'"):
        write_reports(out, bad)
    with pytest.raises(DataError, match="metrics: column 'note' must be numeric"):
        write_reports(
            out, _examples(), metrics_df=pd.DataFrame({"stage": ["a"], "epoch": [1], "note": ["x"]})
        )
    assert not out.exists()  # validation runs before anything is created


def test_crash_during_writing_leaves_no_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    real = reports.atomic_write_parquet

    def failing(path: Path, table: pa.Table, **kwargs: object) -> Path:
        if path.name == "metrics.parquet":
            raise OSError("no space left on device")
        return real(path, table, **kwargs)

    monkeypatch.setattr(reports, "atomic_write_parquet", failing)
    with pytest.raises(OSError, match="no space"):
        write_reports(out, _examples())
    assert list(out.iterdir()) == []  # examples.parquet was written, but only in staging


def test_existing_run_is_refused_replaced_or_versioned(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_reports(out, _examples())
    with pytest.raises(ConfigError, match="already holds a previous run"):
        write_reports(out, _examples())
    smaller = _examples(3)
    write_reports(out, smaller, if_exists="overwrite")
    assert len(read_report(out / "examples.parquet")) == 3
    paths = write_reports(out, _examples(), if_exists="version")
    assert paths.out_dir == tmp_path / "out-2"
    assert len(read_report(paths.examples)) == 6


def test_frames_and_read_report_checks(tmp_path: Path) -> None:
    examples = _examples()
    issues = label_issues_frame(examples)
    assert list(issues.columns) == LABEL_ISSUES_SCHEMA.names
    assert list(issues["label_issue_score"]) == [0.95, 0.95, 0.7]
    changed = corrected_labels_frame(examples, changed_only=True)
    assert list(changed["example_id"]) == ["id1", "id3", "id4"]
    with pytest.raises(DataError, match="correction_source"):
        corrected_labels_frame(examples.drop(columns="correction_source"))

    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1]}), plain)
    with pytest.raises(DataError, match="not a dm-audit report"):
        read_report(plain)
    old = tmp_path / "old.parquet"
    table = table_from_frame(examples, EXAMPLES_SCHEMA)
    meta = {**table.schema.metadata, b"dm_audit_schema_version": b"0"}
    pq.write_table(table.replace_schema_metadata(meta), old)
    with pytest.raises(DataError, match="schema version 0"):
        read_report(old)
    with pytest.raises(DataError, match="missing column 'stage'"):
        read_report(_write(tmp_path, examples), METRICS_SCHEMA)


def _write(tmp_path: Path, examples: pd.DataFrame) -> Path:
    path = tmp_path / "examples.parquet"
    pq.write_table(table_from_frame(examples, EXAMPLES_SCHEMA), path)
    return path


def test_default_corrected_labels_without_corrections(tmp_path: Path) -> None:
    examples = _examples().drop(columns=["corrected_label", "correction_source"])
    paths = write_reports(tmp_path / "out", examples)
    corrected = read_report(paths.corrected_labels)
    assert (corrected["source"] == "kept").all()
    assert list(corrected["corrected_label"]) == list(examples["given_label"])


def test_bad_plots_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="plot name"):
        write_reports(tmp_path / "a", _examples(), plots={"../escape": Figure()})
    with pytest.raises(DataError, match="does not exist"):
        write_reports(tmp_path / "b", _examples(), plots={"p": tmp_path / "none.png"})
    with pytest.raises(DataError, match="matplotlib Figure"):
        write_reports(tmp_path / "c", _examples(), plots={"p": 3})


def test_string_and_object_columns_give_the_same_table() -> None:
    """pandas' string columns are converted without a Python object per row; the table is the
    one their object-typed twins give, nulls included."""
    as_str = _examples()
    as_object = as_str.copy()
    for column in ("example_id", "split", "given_label", "predicted_label", "corrected_label"):
        as_str[column] = as_str[column].astype("str")
        as_object[column] = as_object[column].astype(object)
    assert isinstance(as_str["corrected_label"].dtype, pd.StringDtype)
    fast = table_from_frame(as_str, EXAMPLES_SCHEMA)
    assert fast.equals(table_from_frame(as_object, EXAMPLES_SCHEMA))
    assert fast.column("corrected_label").null_count == 1
    assert fast.schema.field("given_label").type == pa.string()


def test_duplicate_ids_are_named_in_every_row_table(tmp_path: Path) -> None:
    """The uniqueness check counts in Arrow and still names the repeated id."""
    frame = pd.DataFrame({"example_id": ["a", "b", "c", "b"], "given_label": "x"})
    frame = frame.assign(original_label="x", corrected_label="x", source="kept")
    with pytest.raises(DataError, match="corrected_labels: example_id 'b' appears more than once"):
        table_from_frame(
            frame[["example_id", "original_label", "corrected_label", "source"]],
            CORRECTED_LABELS_SCHEMA,
        )


@pytest.mark.parametrize("dtype", ["string", object])
def test_missing_labels_are_nulls_whatever_the_column_type(dtype) -> None:
    """pd.NA in a label column is a missing label (null), never the text "<NA>"."""
    frame = _examples()
    frame["corrected_label"] = pd.Series(["cat", "cat", "cat", pd.NA, "dog", "dog"], dtype=dtype)
    assert frame["corrected_label"].dtype == dtype
    table = table_from_frame(frame, EXAMPLES_SCHEMA)
    assert table.column("corrected_label").to_pylist()[3] is None
    frame["given_label"] = frame["corrected_label"]
    with pytest.raises(DataError, match="'given_label' has a missing value at row 3"):
        table_from_frame(frame, EXAMPLES_SCHEMA)


def test_report_page_without_the_optional_suggestion_columns() -> None:
    """The page lists the suspects from the columns a frame has, the others shown empty."""
    from dm_audit.html_report import render_report

    frame = _examples().drop(columns=["suggestion_confidence", "correction_source"])
    page = render_report({}, frame, pd.DataFrame(), {})
    assert "id1" in page and "Suspected label issues" in page


def test_audit_report_renders_its_page_once_and_only_when_read() -> None:
    """report.html is rendered on first read (an unwritten report never pays for it), once."""
    from dm_audit.stage_results import AuditReport

    calls: list[int] = []

    def render() -> str:
        calls.append(1)
        return "<html>page</html>"

    empty = pd.DataFrame()
    report = AuditReport(_examples(), empty, empty, empty, {}, render_html=render)
    assert calls == []
    assert report.html == "<html>page</html>"
    assert report.html == "<html>page</html>"
    assert calls == [1]
    assert report.render_html is None  # the renderer (and the data it holds) is released
    assert dataclasses.replace(report, summary={"n": 1}).html == "<html>page</html>"
    assert AuditReport(_examples(), empty, empty, empty, {}).html is None
