"""Output folders: where a run may write, and what to do when one already holds a run.

An output folder that already holds a run is never overwritten silently: `prepare_output_dir`
refuses it (``if_exists="error"``), replaces it on request (``"overwrite"``) or picks the next
free sibling folder ``<out>-2``, ``<out>-3``, ... (``"version"``). A folder holds a complete run
when its run marker (``.dm-audit-run.json``) is present; the marker lists the run's files, and
replacing the run removes them, so every listed name is checked to be the run's own
(`replaced_run_files`) before anything is touched. `check_output_location` refuses, before any
work, a folder that cannot be written or that lies inside an input folder, and
`refuse_links_inside` a link planted where a run writes through.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from dm_audit.errors import ConfigError

RUN_MARKER = ".dm-audit-run.json"
# The hidden work folder of an audit that has not finished (see `dm_audit.workdir`).
UNFINISHED_RUN_DIR = ".dm-audit-work"
IfExists = Literal["error", "overwrite", "version"]
_IF_EXISTS = ("error", "overwrite", "version")
# Longest file-name component POSIX file systems accept, in bytes.
_NAME_MAX = 255
# Names inside an output folder that a run writes through (as folders): a symbolic link there
# would send the run's files, or the removal of its old ones, outside the folder.
_WRITTEN_THROUGH = ("plots", UNFINISHED_RUN_DIR)


def previous_run_files(out_dir: str | os.PathLike[str], names: Iterable[str] = ()) -> list[Path]:
    """Files in `out_dir` that show it already holds a run.

    Parameters
    ----------
    out_dir : path-like
        Output folder (need not exist).
    names : iterable of str
        Report file names (relative to `out_dir`) whose presence also counts as a previous run,
        e.g. a report written by an older version without the run marker.

    Returns
    -------
    list of Path
        The run marker and any of `names` that exist; empty for a fresh folder.
    """
    out = Path(out_dir)
    if (out / RUN_MARKER).is_file():
        return [out / RUN_MARKER, *(out / n for n in names if (out / n).exists())]
    if (out / UNFINISHED_RUN_DIR).is_dir():
        # Reports without a marker next to an unfinished run's work were moved in by that run
        # when it was killed: they belong to it, its resume replaces them.
        return []
    return [out / n for n in names if (out / n).exists()]


def check_output_location(
    out_dir: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str]] = ()
) -> None:
    """Refuse, before any work and without creating anything, an output folder that cannot be
    written or that lies inside an input folder.

    Parameters
    ----------
    out_dir : path-like
        The wanted output folder (need not exist).
    inputs : iterable of path-like
        Input paths; the folders among them may not hold the output: reports written into an
        image folder become part of its data (the next audit reads ``plots`` as a class).

    Raises
    ------
    ConfigError
        Naming the output folder and what is wrong with it.
    """
    if not str(out_dir).strip():
        raise ConfigError("the output folder is an empty path; name a folder")
    out = Path(out_dir)
    real_out = Path(os.path.realpath(out))
    if real_out == Path(real_out.anchor):
        raise ConfigError(f"output folder {out} is the file system's root; name a folder")
    for source in inputs:
        folder = Path(source)
        if not folder.is_dir():
            continue
        real_in = Path(os.path.realpath(folder))
        if real_out == real_in or real_in in real_out.parents:
            raise ConfigError(
                f"output folder {out} is inside the input folder {folder}: the reports would "
                "become part of the input; choose an output folder outside it"
            )
    existing = real_out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot create the output folder {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create the output folder {out}: {existing} is not writable")


def make_output_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create an output folder (and its parents), turning a failure into a one-line error."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"cannot create the output folder {out}: {error.strerror or error}"
        ) from None
    return out


def prepare_output_dir(
    out_dir: str | os.PathLike[str],
    *,
    if_exists: IfExists = "error",
    names: Iterable[str] = (),
    owned: Iterable[str] | None = None,
) -> Path:
    """Create an output folder, deciding what to do if it already holds a run.

    Call it before a long run so that a refused folder fails fast, and pass the returned path
    (which differs from `out_dir` with ``if_exists="version"``) to the writers.

    Parameters
    ----------
    out_dir : path-like
        Wanted output folder.
    if_exists : {"error", "overwrite", "version"}
        ``"error"``: raise `ConfigError` naming the files found. ``"overwrite"``: use the folder;
        the next commit replaces the previous run's reports. ``"version"``: use the first of
        ``<out>-2``, ``<out>-3``, ... that holds no run.
    names : iterable of str
        Report names that count as a previous run (see `previous_run_files`).
    owned : iterable of str, optional
        Glob patterns (relative to `out_dir`) of the files a run writes (default: `names`);
        see `resolve_output_dir`.

    Returns
    -------
    Path
        The folder to write into (created).
    """
    out = resolve_output_dir(out_dir, if_exists=if_exists, names=names, owned=owned)
    return make_output_dir(out)


def resolve_output_dir(
    out_dir: str | os.PathLike[str],
    *,
    if_exists: IfExists = "error",
    names: Iterable[str] = (),
    owned: Iterable[str] | None = None,
) -> Path:
    """The folder `prepare_output_dir` would write into, without creating anything.

    Parameters
    ----------
    out_dir : path-like
        Wanted output folder.
    if_exists : {"error", "overwrite", "version"}
        See `prepare_output_dir`.
    names : iterable of str
        Report names that count as a previous run (see `previous_run_files`).
    owned : iterable of str, optional
        Glob patterns (relative to `out_dir`) of the files a run writes (default: `names`).
        Replacing a run removes the files its marker lists; a marker that lists anything else
        (a path outside the folder, a file no run writes) is refused before any work starts.

    Returns
    -------
    Path
        `out_dir`, or with ``if_exists="version"`` and a previous run there, the first of
        ``<out>-2``, ``<out>-3``, ... that holds no run.

    Raises
    ------
    ConfigError
        When the path is a file, holds a previous run and `if_exists` is ``"error"``, or its
        run marker lists a file that is not the run's own.
    """
    if if_exists not in _IF_EXISTS:
        raise ConfigError(f"if_exists must be one of {_IF_EXISTS}, got {if_exists!r}")
    names = tuple(names)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a folder")
    refuse_links_inside(out)
    found = previous_run_files(out, names)
    if found and if_exists == "overwrite":
        replaced_run_files(out, names if owned is None else owned)
    if found and if_exists == "error":
        listed = ", ".join(p.name for p in found[:5])
        raise ConfigError(
            f"output folder {out} already holds a previous run ({listed}); choose another folder, "
            "or pass --overwrite to replace it, or --new-version to write next to it"
        )
    if found and if_exists == "version":
        n = 2
        while previous_run_files(out.with_name(f"{out.name}-{n}"), names):
            n += 1
        out = out.with_name(f"{out.name}-{n}")
    return out


def refuse_links_inside(out_dir: str | os.PathLike[str]) -> None:
    """Refuse an output folder whose ``plots`` or work folder is a link or not a folder.

    A run writes its plots and its unfinished state through these names; a symbolic link
    planted there would make it write (and replace, and delete) files elsewhere.

    Raises
    ------
    ConfigError
        Naming the entry.
    """
    out = Path(out_dir)
    for name in _WRITTEN_THROUGH:
        entry = out / name
        if entry.is_symlink() or (entry.exists() and not entry.is_dir()):
            what = "a link" if entry.is_symlink() else "not a folder"
            raise ConfigError(
                f"{entry} is {what}: a run writes its own files there; remove it or choose "
                "another output folder"
            )


def replaced_run_files(out_dir: str | os.PathLike[str], owned: Iterable[str]) -> list[str]:
    """The files a previous run's marker lists, after checking each is that run's own.

    A replaced run's files are removed, so the marker decides what gets deleted: anyone who can
    write into the folder could otherwise list any file the user can delete. A listed name must
    be a plain relative path (no ``..``, no absolute path, no symbolic link on the way) inside
    `out_dir` that matches one of the `owned` patterns.

    Raises
    ------
    ConfigError
        Naming the marker and the first file that is not a run's own.
    """
    out = Path(out_dir)
    files = _read_marker(out).get("files", [])
    patterns = tuple(owned)
    if not isinstance(files, list):
        raise ConfigError(f"{out / RUN_MARKER}: 'files' is not a list; remove the marker")
    for name in files:
        if not _is_owned_file(out, name, patterns):
            raise ConfigError(
                f"{out / RUN_MARKER} lists {name!r}, which is not a report file inside {out}; "
                "refusing to replace that folder's run (remove the marker if the folder is "
                "yours, or choose another output folder)"
            )
    return list(files)


def _matches(parts: tuple[str, ...], pattern: str) -> bool:
    """Glob match part by part: ``plots/*.png`` matches ``plots/a.png``, not ``plots/a.png/b.png``
    (`fnmatch` alone lets ``*`` cross a ``/``)."""
    wanted = PurePosixPath(pattern).parts
    return len(parts) == len(wanted) and all(
        fnmatch.fnmatchcase(part, glob) for part, glob in zip(parts, wanted, strict=True)
    )


def _is_owned_file(out: Path, name: object, patterns: tuple[str, ...]) -> bool:
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    path = PurePosixPath(name)
    if path.is_absolute() or path.as_posix() != name or ".." in path.parts:
        return False
    if any(len(part.encode()) > _NAME_MAX for part in path.parts):
        return False
    if not any(_matches(path.parts, pattern) for pattern in patterns):
        return False
    # A symbolic link on the way (e.g. plots -> /elsewhere) would lead the removal outside.
    real_out = os.path.realpath(out)
    real_parent = os.path.realpath(out / path.parent)
    return real_parent == real_out or real_parent.startswith(real_out + os.sep)


def _read_marker(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / RUN_MARKER).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
