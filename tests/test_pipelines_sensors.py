"""Sensors and schedule of the Dagster pipeline: run requests, run config and cursors."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from pipelines.jobs import UPSTREAM_RUN_TAG
from pipelines.schedules import DEFAULT_CRON, build_audit_schedule
from pipelines.sensors import (
    DATASET_SUFFIXES,
    decode_cursor,
    encode_cursor,
    new_dataset_sensor,
    reviews_sensor,
    scan_folder,
)


def _touch(path: Path, text: str = "x", *, age: float = 60.0) -> int:
    """Write a file whose mtime lies ``age`` seconds in the past; return its mtime_ns."""
    path.write_text(text)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path.stat().st_mtime_ns


@pytest.fixture(scope="module")
def shared_instance() -> Iterator[dg.DagsterInstance]:
    """One ephemeral instance for the tests that need no recorded materialisation."""
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture
def incoming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "incoming"
    folder.mkdir()
    monkeypatch.setenv("DM_AUDIT_INCOMING_DIR", str(folder))
    monkeypatch.setenv("DM_AUDIT_SETTLE_SECONDS", "5")
    return folder


@pytest.fixture
def reviews_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "reviews"
    folder.mkdir()
    monkeypatch.setenv("DM_AUDIT_REVIEWS_DIR", str(folder))
    monkeypatch.setenv("DM_AUDIT_SETTLE_SECONDS", "5")
    return folder


# ------------------------------------------------------------------------------ folder scan


def test_scan_folder_finds_new_files_and_ignores_others(tmp_path: Path) -> None:
    old = _touch(tmp_path / "a.csv", age=120)
    new = _touch(tmp_path / "b.parquet", age=60)
    _touch(tmp_path / "notes.txt")  # not a table
    _touch(tmp_path / ".c.csv.tmp-1234")  # a copy in progress
    _touch(tmp_path / ".hidden.csv")
    _touch(tmp_path / "fresh.csv", age=0.0)  # may still be written

    scan = scan_folder(tmp_path, DATASET_SUFFIXES, {}, settle_seconds=5)

    assert [p.name for p in scan.new] == ["a.csv", "b.parquet"]  # oldest first
    assert scan.cursor == {"a.csv": old, "b.parquet": new}
    assert [p.name for p in scan.waiting] == ["fresh.csv"]


def test_scan_folder_reports_replaced_files_and_forgets_removed_ones(tmp_path: Path) -> None:
    first = _touch(tmp_path / "a.csv", age=120)
    _touch(tmp_path / "b.csv", age=120)
    seen = scan_folder(tmp_path, DATASET_SUFFIXES, {}, settle_seconds=5).cursor

    second = _touch(tmp_path / "a.csv", "changed", age=30)
    (tmp_path / "b.csv").unlink()
    scan = scan_folder(tmp_path, DATASET_SUFFIXES, seen, settle_seconds=5)

    assert second != first
    assert [p.name for p in scan.new] == ["a.csv"]
    assert scan.cursor == {"a.csv": second}


def test_scan_folder_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    scan = scan_folder(tmp_path / "absent", DATASET_SUFFIXES, {"x.csv": 1})
    assert (scan.new, scan.cursor, scan.waiting) == ([], {}, [])


def test_cursor_round_trip_and_garbage() -> None:
    assert decode_cursor(encode_cursor({"b.csv": 2, "a.csv": 1})) == {"a.csv": 1, "b.csv": 2}
    assert encode_cursor({"b.csv": 2, "a.csv": 1}) == '{"a.csv":1,"b.csv":2}'
    assert decode_cursor(None) == {}
    assert decode_cursor("not json") == {}
    assert decode_cursor("[1, 2]") == {}


# ------------------------------------------------------------------------------ dataset sensor


def test_new_dataset_sensor_requests_one_run_per_file(
    incoming: Path, shared_instance: dg.DagsterInstance
) -> None:
    mtime_a = _touch(incoming / "a.csv", age=120)
    mtime_b = _touch(incoming / "b.parquet", age=60)
    _touch(incoming / "readme.md")

    result = new_dataset_sensor(dg.build_sensor_context(instance=shared_instance))
    assert isinstance(result, dg.SensorResult)
    requests = result.run_requests
    assert [r.run_key for r in requests] == [f"a.csv@{mtime_a}", f"b.parquet@{mtime_b}"]
    source = requests[0].run_config["ops"]["dataset"]["config"]["source"]
    assert source == str((incoming / "a.csv").resolve())
    assert requests[0].tags["dm-audit/source-file"] == source
    assert json.loads(result.cursor) == {"a.csv": mtime_a, "b.parquet": mtime_b}

    # The same files on the next tick: nothing runs twice.
    again = new_dataset_sensor(
        dg.build_sensor_context(instance=shared_instance, cursor=result.cursor)
    )
    assert isinstance(again, dg.SkipReason)
    assert "no new dataset file" in again.skip_message

    # A third file: only it runs, and the cursor grows by one entry.
    mtime_c = _touch(incoming / "c.csv", age=30)
    third = new_dataset_sensor(
        dg.build_sensor_context(instance=shared_instance, cursor=result.cursor)
    )
    assert [r.run_key for r in third.run_requests] == [f"c.csv@{mtime_c}"]
    assert json.loads(third.cursor) == {
        "a.csv": mtime_a,
        "b.parquet": mtime_b,
        "c.csv": mtime_c,
    }


def test_new_dataset_sensor_waits_for_files_being_written(
    incoming: Path, shared_instance: dg.DagsterInstance
) -> None:
    _touch(incoming / "copying.csv", age=0.0)
    result = new_dataset_sensor(dg.build_sensor_context(instance=shared_instance))
    assert isinstance(result, dg.SkipReason)
    assert "1 file(s) still being written" in result.skip_message


def test_new_dataset_sensor_applies_sidecar_options(
    incoming: Path, shared_instance: dg.DagsterInstance
) -> None:
    _touch(incoming / "shop.csv", age=120)
    _touch(incoming / "shop.json", json.dumps({"label_column": "y", "id_column": "sku"}), age=120)
    _touch(incoming / "bad.csv", age=120)
    _touch(incoming / "bad.json", json.dumps({"label_colum": "y"}), age=120)

    result = new_dataset_sensor(dg.build_sensor_context(instance=shared_instance))

    # The file with a broken sidecar is logged and skipped, the other one runs with its options.
    assert len(result.run_requests) == 1
    config = result.run_requests[0].run_config["ops"]["dataset"]["config"]
    assert config == {
        "label_column": "y",
        "id_column": "sku",
        "source": str((incoming / "shop.csv").resolve()),
    }
    assert set(json.loads(result.cursor)) == {"bad.csv", "shop.csv"}


def test_new_dataset_sensor_run_config_is_valid_for_the_job(
    incoming: Path, shared_instance: dg.DagsterInstance
) -> None:
    from pipelines.definitions import defs

    _touch(incoming / "a.csv", age=120)
    result = new_dataset_sensor(dg.build_sensor_context(instance=shared_instance))
    # Raises DagsterInvalidConfigError if the sensor's run config does not fit the job.
    resolved = dg.validate_run_config(
        defs.resolve_job_def("audit_job"), result.run_requests[0].run_config
    )
    assert resolved["ops"]["dataset"]["config"]["source"].endswith("a.csv")


# ------------------------------------------------------------------------------ reviews sensor


def test_reviews_sensor_waits_for_a_first_audit(
    reviews_dir: Path, shared_instance: dg.DagsterInstance
) -> None:
    _touch(reviews_dir / "batch-1.csv", "example_id,label\nrow-000001,3\n", age=60)
    result = reviews_sensor(dg.build_sensor_context(instance=shared_instance))
    assert isinstance(result, dg.SkipReason)
    assert "wait for a first audit run" in result.skip_message


def test_reviews_sensor_pins_the_latest_audit_and_advances(reviews_dir: Path) -> None:
    mtime = _touch(reviews_dir / "batch-1.csv", "example_id,label\nrow-000001,3\n", age=60)
    with dg.instance_for_test() as instance:
        # Record an audit run that materialised the flags.
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="flags"))
        audit_run_id = instance.get_latest_materialization_event(dg.AssetKey("flags")).run_id

        result = reviews_sensor(dg.build_sensor_context(instance=instance))
        (request,) = result.run_requests
        path = str((reviews_dir / "batch-1.csv").resolve())
        assert request.run_key == f"batch-1.csv@{mtime}"
        assert request.run_config == {
            "ops": {"corrected_labels": {"config": {"reviews_path": path}}}
        }
        assert request.tags[UPSTREAM_RUN_TAG] == audit_run_id
        assert json.loads(result.cursor) == {"batch-1.csv": mtime}

        again = reviews_sensor(dg.build_sensor_context(instance=instance, cursor=result.cursor))
        assert isinstance(again, dg.SkipReason)


# ------------------------------------------------------------------------------ schedule


def test_schedule_defaults_to_daily_and_reads_the_cron_from_the_environment() -> None:
    assert build_audit_schedule({}).cron_schedule == DEFAULT_CRON
    schedule = build_audit_schedule(
        {"DM_AUDIT_SCHEDULE_CRON": "*/15 * * * *", "DM_AUDIT_SOURCE": "data/shop.parquet"}
    )
    assert schedule.cron_schedule == "*/15 * * * *"
    assert schedule.job_name == "audit_job"
    context = dg.build_schedule_context(scheduled_execution_time=None)
    (request,) = list(schedule.evaluate_tick(context).run_requests)
    assert request.run_config == {"ops": {"dataset": {"config": {"source": "data/shop.parquet"}}}}


def test_schedule_refuses_a_bad_cron() -> None:
    with pytest.raises(ValueError, match="DM_AUDIT_SCHEDULE_CRON='every day'"):
        build_audit_schedule({"DM_AUDIT_SCHEDULE_CRON": "every day"})


def test_compressed_tables_and_their_sidecars_are_picked_up(tmp_path: Path) -> None:
    from pipelines.sensors import dataset_options

    packed = _touch(tmp_path / "shop.csv.gz", age=120)
    _touch(tmp_path / "model.pt.gz", age=120)  # compressed, but not a table
    _touch(tmp_path / "shop.json", '{"label_column": "category"}', age=120)
    scan = scan_folder(tmp_path, DATASET_SUFFIXES, {}, settle_seconds=5, companions=[".json"])
    assert [p.name for p in scan.new] == ["shop.csv.gz"]
    assert scan.cursor["shop.csv.gz"] >= packed
    assert dataset_options(tmp_path / "shop.csv.gz") == {"label_column": "category"}
