"""Faults: an audit killed during training, scoring or report writing resumes to the same report.

The kills are real SIGKILLs of a ``dm-audit audit`` subprocess, sent by the process itself at a
named point through the ``DM_AUDIT_KILL_AT`` testing hook (`dm_audit.faults.kill_point`), so no
cleanup code runs, as with an out-of-memory killer or a pre-empted machine.

"The same report" is defined by `assert_same_report`: examples.parquet, label_issues.parquet,
corrected_labels.parquet and every plot are byte-identical; metrics.parquet is equal in every
column except the timings ``seconds`` and ``examples_per_s``; summary.json is equal in every field
except ``seconds`` (timings), ``out_dir`` and ``resumed`` (which trainings were continued).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dm_audit import audit as audit_module
from dm_audit import stage_scoring
from dm_audit.atomic import RUN_MARKER, STAGING_PREFIX
from dm_audit.cli import EXIT_BAD_INPUT, main
from dm_audit.faults import KILL_ENV
from dm_audit.noise import add_noise
from dm_audit.reports import REPORT_FILES
from dm_audit.sources import load_source
from dm_audit.workdir import WORK_DIR_NAME, dataset_fingerprint

AUDIT = [
    "audit",
    "--inject-noise",
    "symmetric",
    "--noise-rate",
    "0.2",
    "--epochs",
    "3",
    "--batch-size",
    "32",
    "--device",
    "cpu",
    "--seed",
    "3",
    "--quiet",
]
# SIGKILL and fork are POSIX; the kill hook is inert elsewhere.
pytestmark = pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL and fork")
TIMING_COLUMNS = ("seconds", "examples_per_s")
SUMMARY_EXCLUDED = ("seconds", "out_dir", "resumed")


def write_blobs(path: Path, n_per_class: int = 60, seed: int = 0) -> Path:
    """Three Gaussian blobs in 5-D with ids ``ex-000``, ... as a CSV."""
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(3), n_per_class)
    x = 4.0 * np.eye(3, 5)[codes] + rng.normal(0.0, 0.7, size=(len(codes), 5))
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(5)])
    frame.insert(0, "example_id", [f"ex-{i:03d}" for i in range(len(codes))])
    frame["label"] = np.array(["ant", "bee", "cat"])[codes]
    frame.to_csv(path, index=False)
    return path


def run_cli(source: Path, out: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """``python -m dm_audit.cli audit ...`` in a fresh interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(KILL_ENV, None)
    if kill_at is not None:
        env[KILL_ENV] = kill_at
    command = [sys.executable, "-m", "dm_audit.cli", *AUDIT, "--input", str(source)]
    return subprocess.run(
        [*command, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600
    )


def run_forked(source: Path, out: Path, kill_at: str | None = None) -> int:
    """`main` in a forked child process; its exit status, or minus the signal that ended it.

    A fork shares the modules this interpreter has already imported, so a run takes seconds
    where a fresh interpreter spends most of its time importing; the child is killed for real.
    """
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            if kill_at is not None:
                os.environ[KILL_ENV] = kill_at
            code = main([*AUDIT, "--input", str(source), "--out", str(out)])
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def visible_reports(out: Path) -> list[str]:
    """Report files a reader of `out` could see (hidden work and staging folders excluded)."""
    if not out.exists():
        return []
    names = [RUN_MARKER, *REPORT_FILES, "plots"]
    return [name for name in names if (out / name).exists()]


def assert_same_report(expected: Path, actual: Path) -> None:
    """Equal reports, as the module docstring defines it."""
    for name in ("examples.parquet", "label_issues.parquet", "corrected_labels.parquet"):
        assert (actual / name).read_bytes() == (expected / name).read_bytes(), name
    plots = sorted(p.name for p in (expected / "plots").iterdir())
    assert plots and sorted(p.name for p in (actual / "plots").iterdir()) == plots
    for name in plots:
        assert (actual / "plots" / name).read_bytes() == (expected / "plots" / name).read_bytes()
    metrics = [
        pd.read_parquet(d / "metrics.parquet").drop(columns=list(TIMING_COLUMNS))
        for d in (expected, actual)
    ]
    pd.testing.assert_frame_equal(metrics[1], metrics[0])
    summaries = [json.loads((d / "summary.json").read_text()) for d in (expected, actual)]
    for summary in summaries:
        for key in SUMMARY_EXCLUDED:
            summary.pop(key, None)
    assert summaries[1] == summaries[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The source table and the reports of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("faults")
    source = write_blobs(tmp / "blobs.csv")
    out = tmp / "uninterrupted"
    assert main([*AUDIT, "--input", str(source), "--out", str(out)]) == 0
    assert not (out / WORK_DIR_NAME).exists()
    return source, out


def test_killed_in_training_scoring_and_report_writing_resumes_to_the_same_report(
    reference: tuple[Path, Path], tmp_path: Path
) -> None:
    source, expected = reference
    out = tmp_path / "killed"
    work = out / WORK_DIR_NAME

    # During the probe, then the audit training, each right after epoch 2 was checkpointed.
    assert run_forked(source, out, kill_at="probe:epoch:2") == -signal.SIGKILL
    assert visible_reports(out) == []
    probe_checkpoint = work / "probe" / "fold0" / "checkpoint.pt"
    assert probe_checkpoint.is_file() and not (work / "probe" / "stage.json").exists()
    assert run_forked(source, out, kill_at="audit:epoch:2") == -signal.SIGKILL
    assert visible_reports(out) == []
    assert (work / "probe" / "stage.json").is_file()
    assert (work / "audit" / "fold0" / "checkpoint.pt").is_file()
    assert not (work / "scores" / "stage.json").exists()

    # During scoring: the audit training is finished, the scores are not saved.
    assert run_forked(source, out, kill_at="scoring") == -signal.SIGKILL
    assert visible_reports(out) == []
    assert not (work / "scores" / "stage.json").exists()

    # During the retrain, then during report writing: the first report file is written, but
    # only into the hidden staging folder.
    assert run_forked(source, out, kill_at="retrain:epoch:1") == -signal.SIGKILL
    assert (work / "corrections" / "stage.json").is_file()
    assert run_forked(source, out, kill_at="report") == -signal.SIGKILL
    assert visible_reports(out) == []
    assert len(list(out.glob(f"{STAGING_PREFIX}*/examples.parquet"))) == 1

    # While the finished files are moved in, one by one: each visible file is whole, and the
    # summary and the run marker, which announce a complete run, come last.
    assert run_forked(source, out, kill_at="report:commit") == -signal.SIGKILL
    assert visible_reports(out) == ["classes.parquet"]
    pd.read_parquet(out / "classes.parquet")

    assert run_forked(source, out) == 0
    assert_same_report(expected, out)
    # Nothing of the interrupted attempts is left behind.
    assert sorted(p.name for p in out.iterdir()) == sorted([RUN_MARKER, *REPORT_FILES, "plots"])
    resumed = json.loads((out / "summary.json").read_text())["resumed"]
    # Each cross-fitted model resumes from its own checkpoint.
    assert {"training": "audit", "fold": 0, "epoch": 2} in resumed
    assert {"training": "retrain", "fold": 0, "epoch": 1} in resumed
    assert {"training": "retrain", "fold": 1, "epoch": 3} in resumed
    assert json.loads((expected / "summary.json").read_text())["resumed"] == []


def test_the_command_killed_in_a_fresh_interpreter_resumes_to_the_same_report(
    reference: tuple[Path, Path], tmp_path: Path
) -> None:
    source, expected = reference
    out = tmp_path / "killed"
    killed = run_cli(source, out, kill_at="audit:epoch:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert visible_reports(out) == []
    assert main([*AUDIT, "--input", str(source), "--out", str(out)]) == 0
    assert_same_report(expected, out)


def _interrupt_at(point: str):
    """A stand-in for the kill hook that interrupts the run in-process (Ctrl-C) at `point`."""

    def hook(name: str) -> None:
        if name == point:
            raise KeyboardInterrupt

    return hook


def _interrupted_before_scoring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Path, list[str]]:
    """An audit of a blobs table stopped by Ctrl-C at scoring: its source, output folder and
    command-line arguments; the trainings are finished and kept in the work folder."""
    source = write_blobs(tmp_path / "data.csv")
    out = tmp_path / "run"
    args = [*AUDIT, "--input", str(source), "--out", str(out)]
    with monkeypatch.context() as patch:
        patch.setattr(audit_module, "kill_point", _interrupt_at("scoring"))
        assert main(args) == 130
    return source, out, args


def _work_files(out: Path) -> list[Path]:
    return sorted(p.relative_to(out) for p in (out / WORK_DIR_NAME).rglob("*"))


def test_other_options_refuse_the_unfinished_run_and_restart_discards_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source, out, args = _interrupted_before_scoring(tmp_path, monkeypatch)
    identity = (out / WORK_DIR_NAME / "run.json").read_bytes()
    capsys.readouterr()

    # While another live process writes the folder, a second run keeps out; a dead one's lock
    # (a killed run) is taken over.
    lock = out / WORK_DIR_NAME / "lock.json"
    assert not lock.exists()  # released by the interrupted run
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    assert main(args) == EXIT_BAD_INPUT
    assert f"being written by another dm-audit run (process {os.getppid()})" in (
        capsys.readouterr().err
    )
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))

    changed = [*args]
    changed[changed.index("--epochs") + 1] = "4"
    assert main(changed) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "unfinished run" in err and "epochs: 3 before vs 4 now" in err and "--restart" in err
    # The refused run leaves the unfinished one intact and writes no report.
    assert (out / WORK_DIR_NAME / "run.json").read_bytes() == identity
    assert visible_reports(out) == []

    write_blobs(source, seed=1)  # the same file name and size, other values
    assert main(args) == EXIT_BAD_INPUT
    assert "data's content" in capsys.readouterr().err

    assert main([*changed, "--restart"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["epochs"] == 4 and summary["resumed"] == []
    assert not (out / WORK_DIR_NAME).exists()


def test_a_bad_checkpoint_interval_is_refused_and_the_unfinished_run_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, args = _interrupted_before_scoring(tmp_path, monkeypatch)
    work = _work_files(out)
    assert work
    capsys.readouterr()
    monkeypatch.setenv("DM_AUDIT_CHECKPOINT_SECONDS", "soon")
    assert main(args) == EXIT_BAD_INPUT
    assert "DM_AUDIT_CHECKPOINT_SECONDS must be a number" in capsys.readouterr().err
    # The finished stages and checkpoints are still there for the corrected command.
    assert _work_files(out) == work
    monkeypatch.setenv("DM_AUDIT_CHECKPOINT_SECONDS", "0")
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["resumed"]


def test_an_error_after_training_removes_the_work_and_writes_nothing(
    reference: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source, _ = reference
    out = tmp_path / "run"

    def no_retrain(*args, **kwargs):
        raise audit_module.ConfigError("the retrain's options no longer fit the data")

    monkeypatch.setattr(audit_module, "retrain", no_retrain)
    code = main([*AUDIT, "--input", str(source), "--out", str(out)])
    assert code == EXIT_BAD_INPUT
    assert "no longer fit the data" in capsys.readouterr().err
    assert not out.exists()


def test_the_data_fingerprint_sees_every_value(tmp_path: Path) -> None:
    source = write_blobs(tmp_path / "data.csv")
    dataset = load_source(str(source), id_column="example_id", test_size=0.3, seed=0)
    same = load_source(str(source), id_column="example_id", test_size=0.3, seed=0)
    assert dataset_fingerprint(dataset) == dataset_fingerprint(same)
    table = dataset.table.copy()
    table.loc[17, "label"] = "ant" if table.loc[17, "label"] != "ant" else "bee"
    relabelled = dataclasses.replace(dataset, table=table)
    table = dataset.table.copy()
    vector = table.loc[5, "features"].copy()
    vector[2] += np.float32(1e-3)
    table.at[5, "features"] = vector
    moved = dataclasses.replace(dataset, table=table)
    resplit = load_source(str(source), id_column="example_id", test_size=0.3, seed=1)
    prints = {dataset_fingerprint(d)["sha256"] for d in (dataset, relabelled, moved, resplit)}
    assert len(prints) == 4


def test_streamed_scores_live_in_the_work_folder_so_a_resume_can_read_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stream from 100 training examples on, so a small dataset takes the large-data path.
    monkeypatch.setattr(stage_scoring, "STREAM_THRESHOLD", 100)
    digits = load_source("digits", seed=0)
    data = add_noise(digits.subset(np.arange(400)), kind="symmetric", rate=0.3)
    config = audit_module.AuditConfig(
        seed=0, epochs=6, probe_epochs=5, progress=False, device="cpu"
    )
    real_retrain = audit_module.retrain

    def crash(*args, **kwargs):
        raise RuntimeError("stopped before the retrain")

    monkeypatch.setattr(audit_module, "retrain", crash)
    with pytest.raises(RuntimeError, match="stopped"):
        audit_module.run_audit(data, config, tmp_path / "run")
    work = tmp_path / "run" / WORK_DIR_NAME
    assert (work / "scores_fold0.parquet").is_file() and (work / "scores_fold1.parquet").is_file()
    assert (work / "scores" / "stage.json").is_file()

    monkeypatch.setattr(audit_module, "retrain", real_retrain)
    resumed = audit_module.run_audit(data, config, tmp_path / "run")
    fresh = audit_module.run_audit(data, config, tmp_path / "fresh")
    assert not work.exists()
    pd.testing.assert_frame_equal(resumed.examples, fresh.examples)
