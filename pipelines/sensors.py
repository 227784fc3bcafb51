"""Sensors: audit a dataset file when it lands; relabel and retrain when reviews land.

Both sensors watch a folder and keep a cursor, the JSON map ``{file name: mtime_ns}`` of the
files already handled, so a file starts exactly one run; a file that is replaced (new mtime)
starts another. Each run request also carries a ``run_key`` built from the name and mtime, which
Dagster de-duplicates on its own, so a cursor lost with an instance still never repeats a run.

Folders come from environment variables, read at every tick (so a deployment can move them
without a code change), relative to the working directory of the Dagster process:

``DM_AUDIT_INCOMING_DIR`` (default ``data/incoming``)
    New dataset tables (``.parquet``, ``.pq``, ``.csv``, ``.tsv``). An optional sidecar
    ``<stem>.json`` sets `pipelines.config.DatasetConfig` options for that file, e.g.
    ``{"label_column": "target", "id_column": "sku"}``.
``DM_AUDIT_REVIEWS_DIR`` (default ``data/reviews``)
    Review files (``example_id,label`` as ``.csv`` or ``.parquet``).
``DM_AUDIT_SETTLE_SECONDS`` (default 10)
    A file modified more recently than this is left for a later tick: it may still be copied.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from dm_audit.sources import COMPRESSION_SUFFIXES
from pipelines.config import DATASET_OPTIONS
from pipelines.jobs import (
    REVIEWS_FILE_TAG,
    SOURCE_FILE_TAG,
    UPSTREAM_RUN_TAG,
    audit_job,
    relabel_job,
)

__all__ = [
    "DATASET_SUFFIXES",
    "REVIEW_SUFFIXES",
    "FolderScan",
    "decode_cursor",
    "new_dataset_sensor",
    "reviews_sensor",
    "scan_folder",
]

DEFAULT_INCOMING_DIR = "data/incoming"
DEFAULT_REVIEWS_DIR = "data/reviews"
DEFAULT_SETTLE_SECONDS = 10.0
DATASET_SUFFIXES: frozenset[str] = frozenset(
    {".parquet", ".pq", ".csv", ".tsv"}
    | {f"{table}{packed}" for table in (".csv", ".tsv") for packed in COMPRESSION_SUFFIXES}
)
REVIEW_SUFFIXES: frozenset[str] = frozenset({".parquet", ".pq", ".csv"})
# Sensors tick every 30 s by default; a training run takes minutes, so faster buys nothing.
MINIMUM_INTERVAL_SECONDS = 30


@dataclass(frozen=True)
class FolderScan:
    """What one look at a watched folder found.

    Attributes
    ----------
    new : list of Path
        Files not in the cursor (or with a changed mtime), oldest first.
    cursor : dict {str: int}
        The cursor after handling ``new``: every settled file present now, name -> mtime_ns.
    waiting : list of Path
        Files still being written (modified within the settle time), left for a later tick.
    """

    new: list[Path]
    cursor: dict[str, int]
    waiting: list[Path]


def decode_cursor(cursor: str | None) -> dict[str, int]:
    """Parse a cursor written by these sensors; a missing or unreadable one is empty."""
    if not cursor:
        return {}
    try:
        data = json.loads(cursor)
    except json.JSONDecodeError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): int(v) for k, v in data.items() if isinstance(v, int | float)}


def encode_cursor(seen: Mapping[str, int]) -> str:
    """The cursor text: sorted JSON, so an unchanged folder gives an unchanged cursor."""
    return json.dumps(dict(sorted(seen.items())), separators=(",", ":"))


def _mtime_ns(path: Path) -> int:
    return path.stat().st_mtime_ns


def scan_folder(
    folder: Path,
    suffixes: Iterable[str],
    seen: Mapping[str, int],
    *,
    now: float | None = None,
    settle_seconds: float = DEFAULT_SETTLE_SECONDS,
    companions: Iterable[str] = (),
) -> FolderScan:
    """Find the files in ``folder`` that no earlier tick handled.

    Parameters
    ----------
    folder : Path
        Watched folder; a missing folder holds no files.
    suffixes : iterable of str
        File suffixes to consider (lower case, with the dot).
    seen : mapping {str: int}
        The previous cursor: file name -> mtime_ns.
    now : float, optional
        Current time (seconds since the epoch); default ``time.time()``.
    settle_seconds : float
        Files modified less than this long ago are reported as waiting, not new.
    companions : iterable of str
        Suffixes of sidecar files (e.g. ``".json"``) whose mtime counts as the data file's, so
        editing the sidecar re-runs the file.

    Returns
    -------
    FolderScan
        Names that vanished from the folder drop out of the cursor, which keeps it bounded.
    """
    now = time.time() if now is None else now
    wanted = {s.lower() for s in suffixes}
    new: list[tuple[int, Path]] = []
    waiting: list[Path] = []
    cursor: dict[str, int] = {}
    if not folder.is_dir():
        return FolderScan([], {}, [])
    for path in sorted(folder.iterdir()):
        # Hidden and partial names are the temporary files of copies and atomic writes.
        if path.name.startswith((".", "~")) or _suffix(path) not in wanted:
            continue
        try:
            if not path.is_file():
                continue
            mtime = _mtime_ns(path)
            for suffix in companions:
                sidecar = _companion(path, suffix)
                if sidecar.is_file():
                    mtime = max(mtime, _mtime_ns(sidecar))
        except FileNotFoundError:  # removed between listing and stat
            continue
        if now - mtime / 1e9 < settle_seconds:
            waiting.append(path)
            if path.name in seen:  # keep the old entry until the new version settles
                cursor[path.name] = seen[path.name]
            continue
        cursor[path.name] = mtime
        if seen.get(path.name) != mtime:
            new.append((mtime, path))
    new.sort(key=lambda item: (item[0], item[1].name))
    return FolderScan([p for _, p in new], cursor, waiting)


def _suffix(path: Path) -> str:
    """A file's data suffix: ``.csv`` for ``t.csv``, ``.csv.gz`` for ``t.csv.gz``."""
    last = path.suffix.lower()
    if last in COMPRESSION_SUFFIXES and len(path.suffixes) >= 2:
        return path.suffixes[-2].lower() + last
    return last


def _companion(path: Path, suffix: str) -> Path:
    """The sidecar of a data file: ``t.json`` for ``t.csv`` and for ``t.csv.gz``."""
    stem = path.name[: len(path.name) - len(_suffix(path))]
    return path.with_name(stem + suffix)


def _settle_seconds() -> float:
    return float(os.environ.get("DM_AUDIT_SETTLE_SECONDS", DEFAULT_SETTLE_SECONDS))


def _run_key(path: Path, mtime_ns: int) -> str:
    return f"{path.name}@{mtime_ns}"


def dataset_options(path: Path) -> dict[str, Any]:
    """`DatasetConfig` options from the sidecar ``<stem>.json`` next to a dataset file.

    Raises
    ------
    ValueError
        If the sidecar is not a JSON object of known option names.
    """
    sidecar = _companion(path, ".json")
    if not sidecar.is_file():
        return {}
    try:
        options = json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{sidecar} is not valid JSON: {exc}") from exc
    if not isinstance(options, dict):
        raise ValueError(f"{sidecar} must hold a JSON object of dataset options")
    unknown = sorted(set(options) - DATASET_OPTIONS)
    if unknown:
        raise ValueError(
            f"{sidecar} sets unknown option(s) {unknown}; known: {sorted(DATASET_OPTIONS)}"
        )
    return options


@dg.sensor(
    job=audit_job,
    minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Starts an audit for each new .parquet/.csv/.tsv file in DM_AUDIT_INCOMING_DIR "
        "(default data/incoming)."
    ),
)
def new_dataset_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """One audit run per new or replaced dataset file in the incoming folder."""
    folder = Path(os.environ.get("DM_AUDIT_INCOMING_DIR", DEFAULT_INCOMING_DIR))
    seen = decode_cursor(context.cursor)
    scan = scan_folder(
        folder, DATASET_SUFFIXES, seen, settle_seconds=_settle_seconds(), companions=[".json"]
    )
    requests = []
    for path in scan.new:
        try:
            options = dataset_options(path)
        except ValueError as exc:
            # Logged and marked seen: fixing the sidecar changes its mtime and re-runs the file.
            context.log.error(f"not auditing {path}: {exc}")
            continue
        source = str(path.resolve())
        requests.append(
            dg.RunRequest(
                run_key=_run_key(path, scan.cursor[path.name]),
                run_config={"ops": {"dataset": {"config": {**options, "source": source}}}},
                tags={SOURCE_FILE_TAG: source},
            )
        )
    if not requests and scan.cursor == seen:
        waiting = f"; {len(scan.waiting)} file(s) still being written" if scan.waiting else ""
        return dg.SkipReason(f"no new dataset file in {folder}{waiting}")
    return dg.SensorResult(run_requests=requests, cursor=encode_cursor(scan.cursor))


@dg.sensor(
    job=relabel_job,
    minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Applies each new reviews file (example_id,label) in DM_AUDIT_REVIEWS_DIR (default "
        "data/reviews) to the latest audit, retrains and republishes the reports."
    ),
)
def reviews_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """One relabel-and-retrain run per new or replaced reviews file."""
    folder = Path(os.environ.get("DM_AUDIT_REVIEWS_DIR", DEFAULT_REVIEWS_DIR))
    seen = decode_cursor(context.cursor)
    scan = scan_folder(folder, REVIEW_SUFFIXES, seen, settle_seconds=_settle_seconds())
    if not scan.new:
        if scan.cursor != seen:
            return dg.SensorResult(run_requests=[], cursor=encode_cursor(scan.cursor))
        return dg.SkipReason(f"no new reviews file in {folder}")
    # The reviews revise the latest audit whose flags exist; pin the run to it so the relabel
    # job reads that run's dataset, scores and flags together (never a mix of two audits).
    latest = context.instance.get_latest_materialization_event(dg.AssetKey("flags"))
    if latest is None:
        # The cursor stays put, so the files are picked up once an audit has run.
        return dg.SkipReason(
            f"{len(scan.new)} reviews file(s) in {folder} wait for a first audit run"
        )
    requests = [
        dg.RunRequest(
            run_key=_run_key(path, scan.cursor[path.name]),
            run_config={
                "ops": {"corrected_labels": {"config": {"reviews_path": str(path.resolve())}}}
            },
            tags={REVIEWS_FILE_TAG: str(path.resolve()), UPSTREAM_RUN_TAG: latest.run_id},
        )
        for path in scan.new
    ]
    return dg.SensorResult(run_requests=requests, cursor=encode_cursor(scan.cursor))
