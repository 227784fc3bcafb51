"""Atomic writes and staged output folders, including simulated crashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.figure import Figure

from dm_audit.atomic import (
    RUN_MARKER,
    STAGING_PREFIX,
    atomic_open,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_png,
    atomic_write_text,
    figure_png,
    keep_png_renderings,
    prepare_output_dir,
    previous_run_files,
    staged_output_dir,
)
from dm_audit.errors import ConfigError


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_writers_round_trip(tmp_path: Path) -> None:
    assert atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write_text(tmp_path / "a.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    table = pa.table({"x": pa.array([1.5, 2.5], pa.float32())})
    assert pq.read_table(atomic_write_parquet(tmp_path / "a.parquet", table)).equals(table)
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    png = atomic_write_png(tmp_path / "a.png", fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with atomic_open(tmp_path / "b.txt", "w") as f:
        f.write("text mode")
    assert (tmp_path / "b.txt").read_text() == "text mode"
    assert _leftovers(tmp_path) == []


def test_a_finished_figure_is_rendered_once_per_dpi_and_others_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    renders: list[int] = []
    original = Figure.savefig

    def counting_savefig(self, *args, **kwargs):
        renders.append(kwargs["dpi"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", counting_savefig)
    kept = keep_png_renderings(Figure())
    kept.add_subplot().plot([0, 1], [1, 0])
    written = atomic_write_png(tmp_path / "kept.png", kept).read_bytes()
    assert figure_png(kept) == written  # the page's copy is the file's rendering
    assert figure_png(kept, dpi=50) != written
    assert renders == [100, 50]
    # A figure that may still change is rendered each time, and shows its changes.
    live = Figure()
    axes = live.add_subplot()
    first = figure_png(live)
    axes.plot([0, 1], [0, 1])
    assert figure_png(live) != first
    assert renders == [100, 50, 100, 100]


def test_json_converts_numpy_and_nan(tmp_path: Path) -> None:
    obj = {
        "rate": np.float32(0.25),
        "n": np.int64(3),
        "ok": np.bool_(True),
        "matrix": np.eye(2),
        "missing": float("nan"),
        "inf": np.inf,
        "path": tmp_path,
        "nested": [{"x": np.float64(1.0)}, (1, 2)],
    }
    data = json.loads(atomic_write_json(tmp_path / "s.json", obj).read_text())
    assert data == {
        "rate": 0.25,
        "n": 3,
        "ok": True,
        "matrix": [[1.0, 0.0], [0.0, 1.0]],
        "missing": None,
        "inf": None,
        "path": str(tmp_path),
        "nested": [{"x": 1.0}, [1, 2]],
    }
    with pytest.raises(ConfigError, match="as JSON"):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "report.txt", "old complete report")

    def crash(f) -> None:  # type: ignore[no-untyped-def]
        f.write(b"new half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_text() == "old complete report"
    assert _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "new.txt", crash)
    assert not (tmp_path / "new.txt").exists()


def test_killed_process_leaves_no_partial_file(tmp_path: Path) -> None:
    # A real crash: the process dies (os._exit, no cleanup) in the middle of a large write.
    def crash_while_writing(path: Path) -> int:
        script = textwrap.dedent(
            f"""
            import os
            from dm_audit.atomic import atomic_open
            with atomic_open({str(path)!r}) as f:
                f.write(b"x" * 5_000_000)
                f.flush()
                os._exit(3)
            """
        )
        return subprocess.run([sys.executable, "-c", script], check=False, timeout=60).returncode

    target = tmp_path / "examples.parquet"
    target.write_bytes(b"previous run")
    assert crash_while_writing(target) == 3
    assert target.read_bytes() == b"previous run"
    fresh = tmp_path / "fresh.bin"
    assert crash_while_writing(fresh) == 3
    assert not fresh.exists()
    # The torn data is only in hidden temporary files that no reader looks at.
    leftovers = _leftovers(tmp_path)
    assert len(leftovers) == 2 and all(name.startswith(".") for name in leftovers)


def test_atomic_open_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mode"):
        with atomic_open(tmp_path / "x", "a"):  # type: ignore[arg-type]
            pass
    with pytest.raises(ConfigError, match="does not exist"):
        atomic_write_text(tmp_path / "no" / "x.txt", "x")


def test_staged_output_appears_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with staged_output_dir(out, names=["a.txt"]) as stage:
        atomic_write_text(stage.path / "a.txt", "A")
        (stage.path / "plots").mkdir()
        atomic_write_text(stage.path / "plots" / "p.txt", "P")
        assert stage.path.name.startswith(STAGING_PREFIX)
        assert not (out / "a.txt").exists()  # invisible until the block completes
    assert (out / "a.txt").read_text() == "A"
    assert (out / "plots" / "p.txt").read_text() == "P"
    marker = json.loads((out / RUN_MARKER).read_text())
    assert marker["files"] == ["a.txt", "plots/p.txt"]
    assert marker["run_id"] == stage.run_id
    assert not any(p.name.startswith(STAGING_PREFIX) for p in out.iterdir())


def test_crash_inside_staging_leaves_output_untouched(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with staged_output_dir(out) as stage:
        atomic_write_text(stage.path / "a.txt", "first run")
    with pytest.raises(RuntimeError, match="training diverged"):
        with staged_output_dir(out, if_exists="overwrite", owned=["*.txt"]) as stage:
            atomic_write_text(stage.path / "a.txt", "second run, half done")
            raise RuntimeError("training diverged")
    assert (out / "a.txt").read_text() == "first run"
    assert sorted(p.name for p in out.iterdir()) == sorted([RUN_MARKER, "a.txt"])


def test_previous_run_is_refused_replaced_or_versioned(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with staged_output_dir(out) as stage:
        atomic_write_text(stage.path / "a.txt", "1")
        atomic_write_text(stage.path / "old_plot.txt", "stale")
    assert previous_run_files(out) == [out / RUN_MARKER]
    with pytest.raises(ConfigError, match="already holds a previous run"):
        with staged_output_dir(out) as stage:
            pass
    with staged_output_dir(out, if_exists="overwrite", owned=["*.txt"]) as stage:
        atomic_write_text(stage.path / "a.txt", "2")
    assert (out / "a.txt").read_text() == "2"
    assert not (out / "old_plot.txt").exists()  # the replaced run leaves nothing stale
    with staged_output_dir(out, if_exists="version") as stage:
        atomic_write_text(stage.path / "a.txt", "3")
    assert stage.final_dir == tmp_path / "run-2"
    assert prepare_output_dir(out, if_exists="version") == tmp_path / "run-3"
    assert (out / "a.txt").read_text() == "2"
    with pytest.raises(ConfigError, match="if_exists"):
        prepare_output_dir(out, if_exists="replace")  # type: ignore[arg-type]


def test_report_names_count_as_a_previous_run(tmp_path: Path) -> None:
    out = tmp_path / "legacy"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    (out / "model.pt").write_text("other files are not a run")
    with pytest.raises(ConfigError, match=r"summary\.json"):
        prepare_output_dir(out, names=["summary.json", "examples.parquet"])
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "checkpoint.pt").write_text("x")
    assert prepare_output_dir(fresh, names=["summary.json"]) == fresh
    file_path = tmp_path / "file"
    file_path.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        prepare_output_dir(file_path)


def test_stale_staging_folders_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    stale = out / f"{STAGING_PREFIX}crashed"
    stale.mkdir()
    (stale / "examples.parquet").write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    recent = out / f"{STAGING_PREFIX}running"
    recent.mkdir()
    with staged_output_dir(out) as stage:
        atomic_write_text(stage.path / "a.txt", "A")
    assert not stale.exists()
    assert recent.exists()  # may belong to a run still in progress
