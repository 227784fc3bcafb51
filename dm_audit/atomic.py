"""Atomic file writes and staged output folders.

A report that another tool reads must never be seen half-written. Every writer here writes to a
temporary name in the destination folder, flushes and fsyncs it, then renames it over the final
name with `os.replace` (atomic on POSIX and Windows when both names are on one file system). A
crash at any point leaves either the previous file or the new one, never a torn one; at worst a
hidden ``.<name>.tmp-<id>`` file remains, which no reader looks at.

A run writes several reports that belong together. `staged_output_dir` collects them in a hidden
``<out>/.staging-<id>`` folder and moves them into place only when all were written, with the run
marker (``.dm-audit-run.json``) last: a folder whose marker is present holds a complete run.

Which output folder a run writes into, and the checks that keep it from writing or deleting
anything that is not its own, are in `dm_audit.output_dir`; its public names are importable from
here too.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import numpy as np

from dm_audit.errors import ConfigError
from dm_audit.faults import kill_point
from dm_audit.output_dir import (
    RUN_MARKER,
    UNFINISHED_RUN_DIR,
    IfExists,
    check_output_location,
    make_output_dir,
    prepare_output_dir,
    previous_run_files,
    refuse_links_inside,
    replaced_run_files,
    resolve_output_dir,
)

if TYPE_CHECKING:
    import pyarrow as pa
    from matplotlib.figure import Figure

__all__ = [
    "RUN_MARKER",
    "STAGING_PREFIX",
    "UNFINISHED_RUN_DIR",
    "IfExists",
    "StagedOutput",
    "atomic_open",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_parquet",
    "atomic_write_png",
    "atomic_write_text",
    "check_output_location",
    "figure_png",
    "keep_png_renderings",
    "make_output_dir",
    "prepare_output_dir",
    "previous_run_files",
    "refuse_links_inside",
    "replaced_run_files",
    "resolve_output_dir",
    "staged_output_dir",
    "to_jsonable",
]

STAGING_PREFIX = ".staging-"
# Staging folders older than this, left by a crashed run, are removed on the next commit.
_STALE_STAGING_S = 3600.0


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: fsync the folder entry (POSIX only, a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: Literal["wb", "w"] = "wb", *, encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """Open a file for writing that appears under `path` only if the block completes.

    Parameters
    ----------
    path : path-like
        Final file name. Its folder must exist.
    mode : {"wb", "w"}
        Binary or text mode.
    encoding : str
        Text encoding for ``mode="w"``.

    Yields
    ------
    file object
        Writes go to a temporary file next to `path`. On normal exit it is flushed, fsynced and
        renamed over `path`; on an exception it is deleted and `path` is left untouched.
    """
    if mode not in ("wb", "w"):
        raise ConfigError(f"atomic_open mode must be 'wb' or 'w', got {mode!r}")
    final = Path(path)
    if not final.parent.is_dir():
        raise ConfigError(f"cannot write {final}: folder {final.parent} does not exist")
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:12]}")
    # "x": never clobber a file that happens to carry the temporary name.
    f = open(tmp, mode.replace("w", "x"), encoding=None if "b" in mode else encoding)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, final)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)


def atomic_write(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], object]) -> Path:
    """Write a file atomically with a function that writes into a binary file object.

    Parameters
    ----------
    path : path-like
        Final file name.
    writer : callable
        Called once with the open binary file; anything it raises aborts the write.

    Returns
    -------
    Path
        The written file.
    """
    with atomic_open(path, "wb") as f:
        writer(f)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically and return the path."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically and return the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars and arrays, paths, sets and non-finite floats into JSON values.

    NaN and infinities become ``None`` because strict JSON has no spelling for them and other
    tools (jq, JavaScript) reject Python's ``NaN`` extension.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> Path:
    """Write `obj` as strict JSON (see `to_jsonable`) atomically and return the path."""
    try:
        text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, sort_keys=False)
    except TypeError as exc:
        raise ConfigError(f"cannot write {path} as JSON: {exc}") from exc
    return atomic_write_text(path, text + "\n")


def atomic_write_parquet(path: str | os.PathLike[str], table: pa.Table, **kwargs: Any) -> Path:
    """Write a pyarrow table to Parquet atomically and return the path.

    Extra keyword arguments go to `pyarrow.parquet.write_table`.
    """
    import pyarrow.parquet as pq

    return atomic_write(path, lambda f: pq.write_table(table, f, **kwargs))


# Where `keep_png_renderings` keeps a figure's PNG bytes, by dpi.
_PNG_RENDERINGS = "_dm_audit_png_renderings"


def keep_png_renderings(figure: Figure) -> Figure:
    """Let `figure_png` render `figure` once per dpi and reuse the bytes; returns the figure.

    Only for a figure that is finished: one changed after its first rendering would be shown
    as it was. The report's plots are (report.html and plots/*.png show the same rendering,
    and rendering is most of a small report's cost).
    """
    setattr(figure, _PNG_RENDERINGS, {})
    return figure


def figure_png(figure: Figure, *, dpi: int = 100) -> bytes:
    """The figure as PNG bytes; rendered once per dpi if it went through `keep_png_renderings`."""
    kept: dict[int, bytes] | None = getattr(figure, _PNG_RENDERINGS, None)
    if kept is not None and dpi in kept:
        return kept[dpi]
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    png = buffer.getvalue()
    if kept is not None:
        kept[dpi] = png
    return png


def atomic_write_png(path: str | os.PathLike[str], figure: Figure, *, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically and return the path."""
    return atomic_write_bytes(path, figure_png(figure, dpi=dpi))


@dataclass
class StagedOutput:
    """A hidden staging folder whose files are moved into `final_dir` on `commit`.

    Attributes
    ----------
    final_dir : Path
        Where the files appear after `commit`.
    path : Path
        The staging folder (``<final_dir>/.staging-<id>``); write every file under it.
    run_id : str
        Identifier of this run, recorded in the run marker.
    owned : tuple of str
        Glob patterns of the files a run writes: the previous run's files that `commit` may
        remove (see `replaced_run_files`).
    """

    final_dir: Path
    path: Path
    run_id: str
    owned: tuple[str, ...] = ()
    committed: list[Path] = field(default_factory=list)
    done: bool = False

    def commit(self, extra_marker: Mapping[str, Any] | None = None) -> list[Path]:
        """Move every staged file into `final_dir`, then write the run marker.

        Files of a previous run listed in its marker but absent from this run are removed, so a
        replaced run leaves no stale report behind.

        Parameters
        ----------
        extra_marker : mapping, optional
            Extra JSON fields for the run marker.

        Returns
        -------
        list of Path
            Final paths of the committed files.
        """
        if self.done:
            raise ConfigError(f"staging folder {self.path} was already committed")
        # summary.json last: a reader that polls for it finds the tables already in place.
        staged = sorted(
            (p for p in self.path.rglob("*") if p.is_file()),
            key=lambda p: (p.name == "summary.json", p.as_posix()),
        )
        relative = [p.relative_to(self.path) for p in staged]
        # Checked before anything moves: a refused marker leaves the folder as it was.
        old_files = replaced_run_files(self.final_dir, self.owned)
        refuse_links_inside(self.final_dir)
        # The marker goes first: once it is removed the old run is no longer announced as
        # complete while its files are being replaced.
        with contextlib.suppress(FileNotFoundError):
            (self.final_dir / RUN_MARKER).unlink()
        final: list[Path] = []
        for src, rel in zip(staged, relative, strict=True):
            dst = self.final_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            final.append(dst)
            kill_point("report:commit")
        new_names = {r.as_posix() for r in relative}
        for name in old_files:
            if name not in new_names:
                # Best effort: the new run is in place, a stale file that cannot go stays.
                with contextlib.suppress(OSError):
                    (self.final_dir / name).unlink()
        _fsync_dir(self.final_dir)
        marker = {
            "run_id": self.run_id,
            "completed_at": datetime.now(UTC).isoformat(),
            "files": sorted(new_names),
            **dict(extra_marker or {}),
        }
        atomic_write_json(self.final_dir / RUN_MARKER, marker)
        shutil.rmtree(self.path, ignore_errors=True)
        _remove_stale_staging(self.final_dir)
        self.committed = final
        self.done = True
        return final

    def abort(self) -> None:
        """Delete the staging folder and everything in it."""
        shutil.rmtree(self.path, ignore_errors=True)


def _remove_stale_staging(out: Path) -> None:
    now = time.time()
    for p in out.glob(f"{STAGING_PREFIX}*"):
        with contextlib.suppress(OSError):
            if p.is_dir() and now - p.stat().st_mtime > _STALE_STAGING_S:
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staged_output_dir(
    out_dir: str | os.PathLike[str],
    *,
    if_exists: IfExists = "error",
    names: Iterable[str] = (),
    owned: Iterable[str] | None = None,
    run_id: str | None = None,
) -> Iterator[StagedOutput]:
    """Stage a run's files and move them into the output folder only if all were written.

    Parameters
    ----------
    out_dir : path-like
        Output folder; see `prepare_output_dir` for `if_exists` and `names`.
    if_exists : {"error", "overwrite", "version"}
        What to do when `out_dir` already holds a run.
    names : iterable of str
        Report names that count as a previous run.
    owned : iterable of str, optional
        Glob patterns of the files a run writes (default: `names`); only these, listed in the
        previous run's marker, are removed when it is replaced.
    run_id : str, optional
        Identifier recorded in the run marker (default: a random hex string).

    Yields
    ------
    StagedOutput
        Write files under ``stage.path``. On normal exit they are committed (unless the block
        already called ``stage.commit()``); on an exception the staging folder is deleted and
        `out_dir` is left as it was.

    Examples
    --------
    >>> with staged_output_dir(tmp_path / "run") as stage:  # doctest: +SKIP
    ...     atomic_write_json(stage.path / "summary.json", {"rate": 0.2})
    """
    names = tuple(names)
    patterns = names if owned is None else tuple(owned)
    final = prepare_output_dir(out_dir, if_exists=if_exists, names=names, owned=patterns)
    rid = run_id or uuid.uuid4().hex[:12]
    staging = final / f"{STAGING_PREFIX}{rid}-{uuid.uuid4().hex[:6]}"
    staging.mkdir()
    stage = StagedOutput(final_dir=final, path=staging, run_id=rid, owned=patterns)
    try:
        yield stage
    except BaseException:
        stage.abort()
        raise
    if not stage.done:
        stage.commit()
