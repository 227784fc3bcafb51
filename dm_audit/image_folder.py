"""Image folders: one sub-folder per class, optionally under ``train/`` and ``test/``.

Ids are the files' paths relative to the folder, labels the class folders' names. Hidden files,
files directly in the root and files without an image suffix are ignored; a link that leads
outside the folder is refused, as an image-path column refuses paths that leave its root.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dm_audit.dataset import AuditDataset
from dm_audit.errors import DataError
from dm_audit.images import IMAGE_EXTENSIONS, to_png
from dm_audit.source_assembly import assemble_dataset


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _inside(path: Path, root: Path) -> Path:
    """`path`, refused when it is a link that leads outside the image folder `root`.

    An image-path column refuses paths that leave its root; a folder gets the same rule, so a
    link planted in a shared folder cannot make the audit read (and copy into its reports)
    files from elsewhere.
    """
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise DataError(
            f"the image folder {root} holds {path.relative_to(root).as_posix()!r}, a link to "
            f"{real} outside the folder; copy the file in, or remove the link"
        )
    return path


def _class_dirs(root: Path, top: Path | None = None) -> list[Path]:
    top = root if top is None else top
    return [
        _inside(p, top) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
    ]


def _image_files(class_dir: Path, root: Path) -> list[Path]:
    return [
        _inside(p, root)
        for p in sorted(class_dir.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and _visible(p, root)
    ]


def load_image_folder(
    root: str | os.PathLike[str], *, test_size: float = 0.0, seed: int = 0
) -> AuditDataset:
    """Images in one sub-folder per class.

    ``root/<class>/**/<file>`` (files sorted by path), or ``root/train/<class>/...`` and
    ``root/test/<class>/...`` when the root holds exactly the folders ``train`` and ``test``.
    Files whose suffix is not an image suffix, hidden files and files directly in the root are
    ignored.

    Parameters
    ----------
    root : path-like
        The folder.
    test_size, seed
        See `stratified_split` (unused with a train/test layout).

    Returns
    -------
    AuditDataset
        Ids are the files' paths relative to ``root`` (with ``/``); labels are the class
        folders' names.
    """
    root = Path(root)
    top = _class_dirs(root)
    layout = {p.name for p in top} == {"train", "test"}
    groups = [(p.name, p) for p in top] if layout else [(None, root)]
    ids, labels, splits, images = [], [], [], []
    for split_name, group_dir in groups:
        for class_dir in _class_dirs(group_dir, root):
            for file in _image_files(class_dir, root):
                try:
                    data = file.read_bytes()
                except OSError as exc:
                    raise DataError(f"cannot read the image file {file}: {exc}") from exc
                images.append(to_png(data, str(file)))
                ids.append(file.relative_to(root).as_posix())
                labels.append(class_dir.name)
                splits.append(split_name)
    if not top:
        raise DataError(f"the image folder {root} has no class sub-folders (root/<class>/<image>)")
    if not ids:
        raise DataError(
            f"the image folder {root} holds no image files ({sorted(IMAGE_EXTENSIONS)})"
        )
    return assemble_dataset(
        ids,
        np.array(labels, dtype=object),
        np.array(splits, dtype=object) if layout else None,
        ("image", images),
        test_size=test_size,
        seed=seed,
        source=str(root),
    )
