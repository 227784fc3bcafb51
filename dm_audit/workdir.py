"""The work folder of an audit run: what lets a killed run resume where it stopped.

An audit with an output folder keeps its unfinished state in ``<out>/.dm-audit-work/``:

* ``run.json``: the run's identity (audit options, a fingerprint of the dataset and of the
  reviews file, the dm-audit version). A later run with the same output folder resumes only when
  its identity is the same; otherwise it refuses and names what differs.
* ``<training>/checkpoint.pt``: the checkpoint of each training (probe, audit, retrain), rewritten
  atomically after every epoch by `dm_audit.training.fit`.
* ``<stage>/``: the result of each finished stage (probe, scores, flags, corrections), written
  once the stage is done, as data (`dm_audit.stage_store`: JSON, ``.npy``, Parquet and
  weights-only tensors), never as pickles.
* ``lock.json``: the process writing the folder; a second run into the same folder is refused
  while that process lives.

Re-running the same command after a crash or a kill therefore skips the finished stages and
continues the interrupted training from its last epoch; on CPU the report is the same as that
of an uninterrupted run. The work folder is removed once the report is in place, and after an
input or option error (`DMAuditError`, which a resume would only repeat).

Anyone who can write into the output folder can write into the work folder, so nothing read
back from it runs code: stage results load with `dm_audit.stage_store` (an allowlist of types,
no pickle) and checkpoints with ``torch.load(weights_only=True)``.

`kill_point` (from `dm_audit.faults`) is the testing hook that stops a run at a named point.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from dm_audit.atomic import (
    STAGING_PREFIX,
    UNFINISHED_RUN_DIR,
    atomic_write_json,
    make_output_dir,
    to_jsonable,
)
from dm_audit.errors import ConfigError
from dm_audit.stage_store import is_stored, load_stage_folder, save_stage_folder

__all__ = [
    "WORK_DIR_NAME",
    "WorkDir",
    "dataset_fingerprint",
    "discard_work",
    "file_fingerprint",
    "run_identity",
]

WORK_DIR_NAME = UNFINISHED_RUN_DIR
_IDENTITY = "run.json"
_LOCK = "lock.json"
_FORMAT = "dm_audit.work"
# 2: feature tables' heavy-tailed columns are read by rank (dm_audit.heavy_tails); a run
# begun on the raw columns must not continue on mapped ones.
# 3: the model families weigh by skill in the ensemble (ExampleScores.family_weights); flags
# stored under equal weights must not meet corrections made under skill weights.
_FORMAT_VERSION = 3
# Options that cannot change a report: a run may resume with them changed.
_IGNORED_OPTIONS = frozenset({"progress"})

T = TypeVar("T")


def _dm_audit_version() -> str:
    try:
        return version("dm-audit")
    except PackageNotFoundError:
        return "unknown"


def _update_with_value(h: Any, value: object) -> None:
    if isinstance(value, bytes | bytearray | memoryview):
        h.update(b"b")
        h.update(len(value).to_bytes(8, "little"))
        h.update(bytes(value))
    elif isinstance(value, np.ndarray):
        h.update(f"a{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    else:
        text = repr(value).encode()
        h.update(b"s")
        h.update(len(text).to_bytes(8, "little"))
        h.update(text)


def dataset_fingerprint(dataset: Any) -> dict[str, Any]:
    """A fingerprint of every value of a dataset's canonical table.

    Parameters
    ----------
    dataset : AuditDataset

    Returns
    -------
    dict
        ``source``, ``n_examples``, ``classes`` and ``sha256`` (over every column, every row:
        ids, labels, split, truth and inputs, so any change to the data changes it).
    """
    table: pd.DataFrame = dataset.table
    h = hashlib.sha256()
    for column in sorted(map(str, table.columns)):
        h.update(f"column {column}\n".encode())
        for value in table[column].to_numpy(dtype=object):
            _update_with_value(h, value)
    return {
        "source": str(dataset.source),
        "n_examples": len(table),
        "classes": [str(c) for c in dataset.classes],
        "sha256": h.hexdigest(),
    }


def file_fingerprint(path: str | os.PathLike[str] | None) -> str | None:
    """SHA-256 of a file's bytes (None for no file)."""
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_identity(
    options: dict[str, Any], dataset: Any, reviews_path: str | os.PathLike[str] | None
) -> dict[str, Any]:
    """What must be equal for a run to resume another one's work folder."""
    return to_jsonable(
        {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "dm_audit_version": _dm_audit_version(),
            "options": {k: v for k, v in options.items() if k not in _IGNORED_OPTIONS},
            "data": dataset_fingerprint(dataset),
            "reviews": file_fingerprint(reviews_path),
        }
    )


def _differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    diffs: list[str] = []
    if before.get("format") != _FORMAT or before.get("version") != _FORMAT_VERSION:
        return [f"work folder format {before.get('version')!r} vs now {_FORMAT_VERSION!r}"]
    if before.get("dm_audit_version") != now["dm_audit_version"]:
        diffs.append(
            f"dm-audit version {before.get('dm_audit_version')} vs now {now['dm_audit_version']}"
        )
    old, new = before.get("options", {}), now["options"]
    diffs += [
        f"option {k}: {old.get(k)!r} before vs {new.get(k)!r} now"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    old_data, new_data = before.get("data", {}), now["data"]
    changed = [k for k in ("source", "n_examples", "classes") if old_data.get(k) != new_data[k]]
    diffs += [f"data {k}: {old_data.get(k)!r} before vs {new_data[k]!r} now" for k in changed]
    if not changed and old_data.get("sha256") != new_data["sha256"]:
        diffs.append("the data's content (same size and classes, different values)")
    if before.get("reviews") != now["reviews"]:
        diffs.append("the reviews file")
    return diffs


@dataclass
class WorkDir:
    """The work folder of one audit run (see the module docstring).

    Attributes
    ----------
    path : Path
        ``<out>/.dm-audit-work``.
    resumed : bool
        Whether it held the work of an earlier, interrupted run of the same identity.
    """

    path: Path
    resumed: bool

    @classmethod
    def open(cls, out_dir: str | os.PathLike[str], identity: dict[str, Any]) -> WorkDir:
        """Create the work folder in `out_dir`, or reopen an interrupted run's one.

        Raises
        ------
        ConfigError
            When the folder holds the work of a run with other options, data or reviews; the
            message names what differs.
        """
        out = Path(out_dir)
        path = out / WORK_DIR_NAME
        marker = path / _IDENTITY
        _refuse_if_in_use(path)
        if marker.is_file():
            try:
                before = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"cannot read {marker}: {exc}; remove {path}") from exc
            if not isinstance(before, dict):
                raise ConfigError(
                    f"{marker} is not a dm-audit work folder's identity; pass --restart to "
                    "discard the unfinished run"
                )
            diffs = _differences(before, identity)
            if diffs:
                raise ConfigError(
                    f"{out} holds an unfinished run started with other inputs or options "
                    f"({'; '.join(diffs)}); re-run with the same ones to resume it, or pass "
                    "--restart to discard it"
                )
            _remove_staging(out)  # the interrupted run's report writing
            work = cls(path, resumed=True)
        else:
            make_output_dir(out)  # its own error names the folder the user gave
            make_output_dir(path)
            atomic_write_json(marker, identity)
            work = cls(path, resumed=False)
        atomic_write_json(path / _LOCK, {"pid": os.getpid(), "host": socket.gethostname()})
        return work

    def release(self) -> None:
        """Let another run resume this work (the process ends, or gives up, with it unfinished)."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / _LOCK).unlink()

    def checkpoint_dir(self, training: str) -> Path:
        """Checkpoint folder of one training (``probe``, ``audit`` or ``retrain``)."""
        return self.path / training

    def stage(self, name: str, compute: Callable[[], T]) -> T:
        """The result of stage `name`: loaded when finished before, else computed and saved."""
        folder = self.path / name
        if is_stored(folder):
            return load_stage_folder(folder)
        result = compute()
        save_stage_folder(result, folder)
        return result

    def remove(self) -> None:
        """Delete the work folder and everything in it."""
        shutil.rmtree(self.path, ignore_errors=True)


def _refuse_if_in_use(path: Path) -> None:
    """Refuse a work folder that a live process on this machine is writing."""
    try:
        owner = json.loads((path / _LOCK).read_text(encoding="utf-8"))
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # no lock, or an unreadable one: nobody to wait for
    if host != socket.gethostname() or pid == os.getpid():
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return  # its process died (a crash or a kill): the work is ours to resume
    except PermissionError:
        pass
    raise ConfigError(
        f"{path.parent} is being written by another dm-audit run (process {pid}); wait for it "
        f"to finish, or choose another output folder (if no dm-audit run is using it, delete "
        f"{path / _LOCK})"
    )


def discard_work(out_dir: str | os.PathLike[str]) -> bool:
    """Delete the work folder of an unfinished run in `out_dir`; True if there was one."""
    path = Path(out_dir) / WORK_DIR_NAME
    if not path.exists():
        return False
    _refuse_if_in_use(path)
    shutil.rmtree(path, ignore_errors=True)
    _remove_staging(Path(out_dir))
    return True


def _remove_staging(out: Path) -> None:
    """Delete the staging folders an unfinished run's report writing left in `out`."""
    with contextlib.suppress(OSError):
        for stale in out.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
