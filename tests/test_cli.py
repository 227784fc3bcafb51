"""The dm-audit command line: bad input exits 2 naming the problem, and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dm_audit.cli import EXIT_BAD_INPUT, build_parser, main

FAST = ["--epochs", "4", "--quiet", "--device", "cpu"]


def _table(n: int = 90, n_classes: int = 3, seed: int = 0) -> pd.DataFrame:
    """Three well separated Gaussian blobs with four features."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    centres = rng.normal(0, 5, size=(n_classes, 4))
    x = centres[labels] + rng.normal(0, 0.5, size=(n, 4))
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(4)])
    frame["label"] = [f"class_{k}" for k in labels]
    return frame


def _audit(tmp_path: Path, source: Path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / "out"
    code = main(["audit", "--input", str(source), "--out", str(out), *FAST, *extra])
    return code, out


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.drop(columns=["label"]), "label"),
        (lambda f: f.assign(f1=f["f1"].where(f.index != 7, np.inf)), "f1"),
        (lambda f: f.assign(label="only_one"), "class"),
        (lambda f: f.iloc[:0], "no rows"),
    ],
    ids=["no-label-column", "inf-feature", "one-class", "empty-table"],
)
def test_bad_input_exits_2_names_the_problem_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mutate, message: str
) -> None:
    source = tmp_path / "data.csv"
    mutate(_table()).to_csv(source, index=False)
    before = source.read_bytes()
    code, out = _audit(tmp_path, source)
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert err.startswith("dm-audit: error:")
    assert message in err.lower()
    _assert_nothing_written(out)
    assert source.read_bytes() == before


def test_misspelt_label_column_suggests_the_right_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "data.parquet"
    _table().rename(columns={"label": "labels"}).to_parquet(source)
    code, out = _audit(tmp_path, source, "--label-column", "lable")
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert "lable" in err and "labels" in err
    _assert_nothing_written(out)


def test_reviews_with_unknown_ids_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "data.csv"
    _table().to_csv(source, index=False)
    reviews = tmp_path / "reviews.csv"
    pd.DataFrame({"example_id": ["row-000001", "no-such-id"], "label": ["class_0"] * 2}).to_csv(
        reviews, index=False
    )
    code, out = _audit(tmp_path, source, "--reviews", str(reviews))
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert "no-such-id" in err
    _assert_nothing_written(out)


def test_bad_options_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "data.csv"
    _table().to_csv(source, index=False)
    code, out = _audit(tmp_path, source, "--lam", "1.0")
    assert code == EXIT_BAD_INPUT
    assert "beta" in capsys.readouterr().err
    _assert_nothing_written(out)


def test_audit_of_a_feature_table_needs_no_other_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "data.csv"
    _table().to_csv(source, index=False)
    code, out = _audit(tmp_path, source)
    assert code == 0
    printed = capsys.readouterr().out
    assert "label issues flagged" in printed
    for name in ("examples.parquet", "label_issues.parquet", "summary.json"):
        assert (out / name).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_examples"] == len(pd.read_parquet(out / "examples.parquet"))

    # A second run into the same folder is refused rather than overwriting it.
    code, _ = _audit(tmp_path, source)
    assert code == EXIT_BAD_INPUT
    assert "previous run" in capsys.readouterr().err
    code, _ = _audit(tmp_path, source, "--new-version")
    assert code == 0
    assert (tmp_path / "out-2" / "examples.parquet").is_file()


def test_help_lists_every_subcommand() -> None:
    parser = build_parser()
    text = parser.format_help()
    for command in ("audit", "demo", "train", "score"):
        assert command in text


def test_help_names_exit_codes_and_every_training_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    text = capsys.readouterr().out
    assert "exit status:" in text and "3  the reports are written, but the retrained" in text
    assert "examples per training step" in text  # --batch-size
    assert "Audit every row" in text


def test_a_worse_retrain_exits_3_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    from dm_audit.cli import EXIT_OK, EXIT_RETRAIN_WORSE, _audit_status

    quality = {
        "accuracy_before": 0.9,
        "accuracy_after": 0.8,
        "n_compared": 100,
        "paired": {"n": 100, "before_only": 12, "after_only": 2, "p_worse": 0.006},
        "retrain_worse": True,
    }
    assert _audit_status({"quality": quality}) == EXIT_RETRAIN_WORSE
    assert "retrained model is worse" in capsys.readouterr().err
    assert _audit_status({"quality": {**quality, "retrain_worse": False}}) == EXIT_OK


def test_summary_records_how_the_inputs_were_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    codes = np.arange(90) % 3
    frame = pd.DataFrame(
        {
            "x": rng.normal(size=90) + codes,
            "colour": np.array(["red", "green", "blue"])[codes],
            "note": [f"row {i}" for i in range(90)],
            "label": np.array([" ant", "bee", "cat"])[codes],
        }
    )
    source = tmp_path / "t.csv"
    frame.to_csv(source, index=False)
    out = tmp_path / "out"
    assert (
        main(["audit", "--input", str(source), "--out", str(out), "--epochs", "2", "--quiet"]) == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    recorded = summary["input"]
    assert [e["column"] for e in recorded["inputs"]] == ["x", "colour"]
    assert recorded["ignored_columns"][0]["column"] == "note"
    assert recorded["label_spellings"] == [{"class": "ant", "spellings": {" ant": 30}}]
    assert summary["classes"] == ["ant", "bee", "cat"]


def test_bad_input_is_refused_before_torch_is_imported(tmp_path: Path) -> None:
    import subprocess
    import sys

    source = tmp_path / "t.csv"
    source.write_text("label,f0\nant,1\nant,2\n")  # one class: refused after reading
    script = (
        "import sys; from dm_audit.cli import main; "
        f"code = main(['audit', '--input', {str(source)!r}, '--out', {str(tmp_path / 'o')!r}]); "
        "print(code, 'torch' in sys.modules, 'faiss' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["2", "False", "False"], done.stdout + done.stderr
    assert "1 class(es)" in done.stderr


def test_a_missing_default_label_column_names_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "t.csv"
    source.write_text("segment,f0\nant,1\nbee,2\n")
    assert main(["audit", "--input", str(source), "--out", str(tmp_path / "o")]) == EXIT_BAD_INPUT
    assert "--label-column" in capsys.readouterr().err


def test_every_audit_option_is_settable_from_the_cli_and_dagster() -> None:
    import dataclasses

    from dm_audit.cli import _audit_config
    from dm_audit.config import AuditConfig
    from pipelines.resources import AuditSettings

    fields = {f.name for f in dataclasses.fields(AuditConfig)}
    argv = ["audit", "--input", "digits", "--out", "o"]
    changed = {
        "model": ["--model", "mlp"], "epochs": ["--epochs", "3"],
        "probe_epochs": ["--probe-epochs", "2"], "batch_size": ["--batch-size", "64"],
        "lr": ["--lr", "0.05"], "device": ["--device", "cpu"], "seed": ["--seed", "7"],
        "lam": ["--lam", "1", "--beta", "4"], "beta": [],
        "label_issue_threshold": ["--threshold", "0.6"], "top_k": [],
        "ood_threshold": ["--ood-threshold", "0.9"],
        "min_correction_confidence": ["--min-confidence", "0.7"],
        "correction_source": ["--correction-source", "proselflc"], "knn_k": ["--knn-k", "5"],
        "linear_reference": ["--no-linear-reference"], "retrain": ["--no-retrain"],
        "progress": ["--quiet"],
    }  # fmt: skip
    assert set(changed) | {"top_k"} == fields  # --top-k excludes --threshold: checked below
    flags = [flag for given in changed.values() for flag in given]
    config = _audit_config(build_parser().parse_args(argv + flags))
    default = AuditConfig()
    moved = {f for f in fields if getattr(config, f) != getattr(default, f)}
    assert moved == fields - {"top_k"}
    top = _audit_config(build_parser().parse_args([*argv, "--top-k", "9"]))
    assert top.top_k == 9
    # Dagster: every option but the device (the runtime resource's), the retrain (the asset
    # graph always has one) and progress (always plain lines in the step's log).
    assert fields - set(AuditSettings.model_fields) == {"device", "retrain", "progress"}
