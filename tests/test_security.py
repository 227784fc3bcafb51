"""Security properties: nothing outside the output folder is touched, and nothing read back from
it runs code.

The output folder may be writable by other people (a shared drive, a scheduled job's folder), so
its run marker and its work folder are untrusted input: the marker may only lead to the removal
of report files inside the folder, and stage results load without pickle.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dm_audit import estimate
from dm_audit.atomic import RUN_MARKER, replaced_run_files
from dm_audit.audit import ProbeResult
from dm_audit.cli import EXIT_BAD_INPUT, main
from dm_audit.errors import ConfigError
from dm_audit.reports import REPORT_OWNED_FILES
from dm_audit.stage_store import STAGE_FILE, load_stage_folder, save_stage_folder
from dm_audit.workdir import WorkDir
from tests.test_bad_input import audit_args, blobs, snapshot


class _Payload:
    """Unpickling this creates a folder: the proof that a load ran code."""

    def __init__(self, proof: Path) -> None:
        self.proof = proof

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.proof),)


def _write_marker(out: Path, files: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).write_text(json.dumps({"run_id": "x", "files": files}))


# ------------------------------------------------------------------ the run marker decides nothing


def test_overwrite_never_removes_a_file_outside_the_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "t.csv"
    blobs().to_csv(source, index=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "o"
    _write_marker(out, [str(victim)])
    before = snapshot(tmp_path)

    code = main(audit_args(source, out, "--overwrite"))

    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert err.startswith("dm-audit: error: ") and err.count("\n") == 1, err
    assert str(victim) in err and RUN_MARKER in err
    assert victim.read_text() == "precious"
    assert snapshot(tmp_path) == before  # refused before any work: nothing written anywhere


@pytest.mark.parametrize(
    "listed",
    [
        "../victim.txt",
        "plots/../../victim.txt",
        "./summary.json/../../victim.txt",
        "/etc/passwd",
        "data.csv",  # inside the folder, but no report writes it
        "plots/notes.txt",
        "",
        "summary.json\\..\\..\\victim.txt",
        "plots/noise_matrix.png/x.png",  # a glob's * must not cross a /
        "plots/" + "a" * 300 + ".png",  # longer than any file name
    ],
)
def test_a_marker_listing_anything_but_report_files_is_refused(tmp_path: Path, listed: str) -> None:
    out = tmp_path / "o"
    _write_marker(out, ["summary.json", listed])
    with pytest.raises(ConfigError, match="not a report file"):
        replaced_run_files(out, REPORT_OWNED_FILES)


def test_a_marker_cannot_reach_outside_through_a_linked_folder(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "p.png").write_bytes(b"not yours")
    out = tmp_path / "o"
    _write_marker(out, ["plots/p.png"])
    (out / "plots").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ConfigError, match=r"plots/p\.png"):
        replaced_run_files(out, REPORT_OWNED_FILES)
    assert (elsewhere / "p.png").exists()


def test_a_marker_listing_report_files_is_accepted(tmp_path: Path) -> None:
    out = tmp_path / "o"
    _write_marker(out, ["examples.parquet", "plots/p_curves.png", "summary.json"])
    assert replaced_run_files(out, REPORT_OWNED_FILES) == [
        "examples.parquet",
        "plots/p_curves.png",
        "summary.json",
    ]


# ------------------------------------------------------------- the work folder is data, not code


def test_a_planted_pickle_in_the_work_folder_is_never_loaded(tmp_path: Path) -> None:
    work = WorkDir.open(tmp_path / "o", {"format": "test"})
    proof = tmp_path / "code-ran"
    (work.path / "probe.pkl").write_bytes(pickle.dumps(_Payload(proof)))
    assert work.stage("probe", lambda: "computed") == "computed"
    assert not proof.exists()
    assert work.stage("probe", lambda: "computed again") == "computed"  # the stored result


def test_a_stage_file_naming_a_foreign_type_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "probe"
    folder.mkdir()
    document = {
        "format": "dm_audit.stage",
        "version": 1,
        "root": {"$id": 0, "$dataclass": "os.system", "fields": {"command": "touch x"}},
    }
    (folder / STAGE_FILE).write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=r"'os\.system' is not a stage type"):
        load_stage_folder(folder)


def test_a_stage_file_cannot_point_outside_its_folder(tmp_path: Path) -> None:
    np.save(tmp_path / "outside.npy", np.arange(3))
    folder = tmp_path / "scores"
    folder.mkdir()
    document = {
        "format": "dm_audit.stage",
        "version": 1,
        "root": {"$id": 0, "$ndarray": "../outside.npy"},
    }
    (folder / STAGE_FILE).write_text(json.dumps(document))
    with pytest.raises(ConfigError, match="bad blob name"):
        load_stage_folder(folder)


def test_a_pickled_array_in_a_stage_folder_is_refused(tmp_path: Path) -> None:
    proof = tmp_path / "code-ran"
    folder = save_stage_folder({"probs": np.arange(4.0)}, tmp_path / "scores")
    # Replace the array by an object array, whose .npy form is a pickle.
    np.save(folder / "blob-0.npy", np.array([_Payload(proof)], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match="damaged"):
        load_stage_folder(folder)
    assert not proof.exists()


def test_stage_results_round_trip_as_data(tmp_path: Path) -> None:
    est = estimate.NoiseEstimate(
        rate=0.25,
        matrix=np.eye(2),
        joint=np.full((2, 2), 0.25),
        per_class_rate=np.array([0.1, float("nan")]),
        n_examples=8,
        thresholds=np.array([0.5, 0.6], dtype=np.float32),
        confident_joint=np.array([[3, 1], [1, 3]], dtype=np.int64),
    )
    probe = ProbeResult(
        noise_rate=float("inf"),
        estimate=est,
        choice=estimate.EmphasisChoice(0.5, 8.0, "test"),
        adaptive=True,
        seconds=np.float64(1.5),
        folds=np.array([0, 1, 0, 1]),
    )
    table = pd.DataFrame({"example_id": ["a", "b"], "p": [0.1, 0.9], "flag": [True, False]})
    stored = {
        1: probe,
        "table": table,
        "pair": (probe, "x"),
        "labels": np.array(["a", "b"], dtype=object),
    }

    loaded = load_stage_folder(save_stage_folder(stored, tmp_path / "stage"))

    assert loaded["pair"][0] is loaded[1]  # shared objects stay shared
    got = loaded[1]
    assert got.noise_rate == float("inf") and got.choice == probe.choice
    assert isinstance(got.seconds, np.float64)
    np.testing.assert_array_equal(got.estimate.per_class_rate, est.per_class_rate)
    assert got.estimate.confident_joint.dtype == np.int64
    pd.testing.assert_frame_equal(loaded["table"], table)
    assert loaded["labels"].dtype == object and loaded["labels"].tolist() == ["a", "b"]
    assert all(
        p.suffix in {".json", ".npy", ".parquet", ".pt"} for p in (tmp_path / "stage").iterdir()
    )


def test_stage_results_stored_under_their_earlier_module_still_load(tmp_path: Path) -> None:
    probe = ProbeResult(
        noise_rate=0.1,
        estimate=None,
        choice=estimate.EmphasisChoice(0.5, 8.0, "test"),
        adaptive=False,
        seconds=2.0,
    )
    folder = save_stage_folder(probe, tmp_path / "probe")
    text = (folder / STAGE_FILE).read_text()
    assert '"dm_audit.stage_results.ProbeResult"' in text
    # A work folder written before the stage results moved out of dm_audit.audit.
    (folder / STAGE_FILE).write_text(
        text.replace("dm_audit.stage_results.ProbeResult", "dm_audit.audit.ProbeResult")
    )
    loaded = load_stage_folder(folder)
    assert type(loaded) is ProbeResult
    assert (loaded.noise_rate, loaded.choice, loaded.adaptive) == (0.1, probe.choice, False)


def test_an_unknown_type_is_refused_when_saving(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot be stored"):
        save_stage_folder({"payload": _Payload(tmp_path / "x")}, tmp_path / "stage")
    assert not (tmp_path / "stage").exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind


# ------------------------------------------------------------------- the input stays the input


def _image_folder(root: Path, n_per_class: int = 4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("ant", "bee"):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("where", [".", "report", "ant/report"])
def test_an_output_folder_inside_the_input_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    from tests.test_bad_input import assert_refused

    images = _image_folder(tmp_path / "images")
    out = images / where
    assert_refused(
        tmp_path, capsys, audit_args(images, out), f"is inside the input folder {images}"
    )


@pytest.mark.parametrize("link", ["file", "class folder"])
def test_an_image_folder_link_leading_outside_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], link: str
) -> None:
    from tests.test_bad_input import assert_refused

    images = _image_folder(tmp_path / "images")
    elsewhere = _image_folder(tmp_path / "elsewhere")
    if link == "file":
        (images / "ant" / "planted.png").symlink_to(elsewhere / "bee" / "0.png")
        shown = "'ant/planted.png'"
    else:
        (images / "cat").symlink_to(elsewhere / "bee", target_is_directory=True)
        shown = "'cat'"
    assert_refused(
        tmp_path, capsys, audit_args(images, tmp_path / "out"), shown, "outside the folder"
    )


def test_links_inside_an_image_folder_are_followed(tmp_path: Path) -> None:
    from dm_audit.sources import load_image_folder

    images = _image_folder(tmp_path / "images")
    (images / "ant" / "alias.png").symlink_to(images / "bee" / "0.png")
    assert len(load_image_folder(images)) == 9


# --------------------------------------------------------- links planted inside the output folder


@pytest.mark.parametrize("name", ["plots", ".dm-audit-work"])
def test_a_link_inside_the_output_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    from tests.test_bad_input import assert_refused

    source = tmp_path / "t.csv"
    blobs().to_csv(source, index=False)
    victim = tmp_path / "victim"
    (victim / "probe").mkdir(parents=True)
    (victim / "probe" / "important.txt").write_text("keep")
    out = tmp_path / "o"
    out.mkdir()
    (out / name).symlink_to(victim, target_is_directory=True)
    assert_refused(tmp_path, capsys, audit_args(source, out), f"{out / name} is a link")
    assert (victim / "probe" / "important.txt").read_text() == "keep"


def test_an_empty_output_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "t.csv"
    blobs().to_csv(source, index=False)
    with pytest.raises(SystemExit) as stop:  # argparse's usage error
        main(["audit", "--input", str(source), "--out", ""])
    assert stop.value.code == EXIT_BAD_INPUT
    assert "empty path" in capsys.readouterr().err


def test_the_root_as_output_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "t.csv"
    blobs().to_csv(source, index=False)
    assert main(audit_args(source, Path("/"))) == EXIT_BAD_INPUT
    assert "file system's root" in capsys.readouterr().err


@pytest.mark.parametrize(
    "document",
    [
        {"format": "dm_audit.stage", "version": 1, "root": {"$id": 0, "$tensor": "blob-0.pt"}},
        {"format": "dm_audit.stage", "version": 1, "root": "DEEP"},
    ],
    ids=["pickled-tensor-file", "deep-nesting"],
)
def test_damaged_stage_files_are_one_line_errors(tmp_path: Path, document: dict) -> None:
    import torch

    proof = tmp_path / "code-ran"
    folder = tmp_path / "stage"
    folder.mkdir()
    torch.save({"payload": _Payload(proof)}, folder / "blob-0.pt")
    text = json.dumps(document)
    if document["root"] == "DEEP":
        text = text.replace('"DEEP"', '{"$list": [' * 5000 + "1" + "]}" * 5000)
    (folder / STAGE_FILE).write_text(text)
    with pytest.raises(ConfigError) as info:
        load_stage_folder(folder)
    assert "\n" not in str(info.value)
    assert not proof.exists()


def test_a_work_folder_identity_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    work = tmp_path / "o" / ".dm-audit-work"
    work.mkdir(parents=True)
    (work / "run.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="--restart"):
        WorkDir.open(tmp_path / "o", {"format": "test"})


def test_a_train_config_stored_before_it_moved_still_loads(tmp_path: Path) -> None:
    from dm_audit.training import TrainConfig

    folder = save_stage_folder({"config": TrainConfig(epochs=3)}, tmp_path / "stage")
    text = (folder / STAGE_FILE).read_text()
    assert '"dm_audit.train_config.TrainConfig"' in text
    (folder / STAGE_FILE).write_text(
        text.replace("dm_audit.train_config.TrainConfig", "dm_audit.training.TrainConfig")
    )
    assert load_stage_folder(folder)["config"] == TrainConfig(epochs=3)
