"""Stage results stored as data, never as code.

An audit keeps each finished stage on disk so that a killed run resumes (`dm_audit.workdir`) and
Dagster passes results between processes (`pipelines.storage`). Those folders sit inside an
output folder that other people may be able to write to, so loading one must never run code:
no pickle. A result is stored as a folder::

    <folder>/stage.json        the object tree: plain JSON values plus typed nodes
    <folder>/blob-<n>.npy      a numpy array (read with allow_pickle=False)
    <folder>/blob-<n>.parquet  a pandas DataFrame or an AuditDataset's canonical table
    <folder>/blob-<n>.pt       tensors only (read with torch.load(weights_only=True))

Only the types listed here can be stored: JSON values, lists, tuples, dicts, paths, numpy arrays
and scalars, DataFrames, tensors, dm-audit models (rebuilt by name from `dm_audit.models`, then
their weights loaded), training dynamics, datasets, and the dataclasses named in
`_ALLOWED_DATACLASSES`. A class name read from a file is only ever looked up in that allowlist,
never imported. Anything else is refused when saving, so an unsupported result fails the run
that produced it rather than a later resume.

Objects referenced twice (one model held by two results) are stored once and restored as one.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import shutil
import uuid
from functools import cache
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pandas as pd

from dm_audit.errors import ConfigError

__all__ = ["STAGE_FILE", "is_stored", "load_stage_folder", "save_stage_folder"]

STAGE_FILE = "stage.json"
_FORMAT = "dm_audit.stage"
_VERSION = 1
_BLOB_NAME = re.compile(r"blob-\d+\.(npy|parquet|pt)")

# The dataclasses a stage result may contain, as "module:qualname". Only these names are
# accepted from a file; the modules are dm-audit's own and are imported from this list.
_ALLOWED_DATACLASSES = (
    "dm_audit.stage_results:ProbeResult",
    "dm_audit.stage_results:CrossFit",
    "dm_audit.stage_results:AuditFit",
    "dm_audit.stage_results:ExampleScores",
    "dm_audit.stage_results:Flags",
    "dm_audit.stage_results:Corrections",
    "dm_audit.stage_results:Retrained",
    "dm_audit.stage_results:AuditReport",
    "dm_audit.correction:CorrectionPlan",
    "dm_audit.estimate:NoiseEstimate",
    "dm_audit.estimate:EmphasisChoice",
    "dm_audit.neighbours:ArrayEmbeddings",
    "dm_audit.neighbours:ParquetEmbeddings",
    "dm_audit.reports:ReportPaths",
    "dm_audit.reviews:ReviewProblem",
    "dm_audit.reviews:ReviewReport",
    "dm_audit.training:FitResult",
    "dm_audit.train_config:TrainConfig",
)
# Names under which earlier versions stored a class that has since moved: folders they wrote
# (an unfinished run, a Dagster run's stage results) read back as the class's new home.
_MOVED_DATACLASSES = {
    f"dm_audit.audit.{name}": f"dm_audit.stage_results.{name}"
    for name in (
        "ProbeResult",
        "CrossFit",
        "AuditFit",
        "ExampleScores",
        "Flags",
        "Corrections",
        "Retrained",
        "AuditReport",
    )
}
_MOVED_DATACLASSES["dm_audit.training.TrainConfig"] = "dm_audit.train_config.TrainConfig"


@cache
def _dataclass_registry() -> dict[str, type]:
    registry: dict[str, type] = {}
    for entry in _ALLOWED_DATACLASSES:
        module, name = entry.split(":")
        cls = getattr(importlib.import_module(module), name)
        registry[f"{cls.__module__}.{cls.__qualname__}"] = cls
    for old, new in _MOVED_DATACLASSES.items():
        registry[old] = registry[new]
    return registry


def _class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _Writer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.n_blobs = 0
        self.seen: dict[int, int] = {}  # id(obj) -> node number
        self.keep_alive: list[Any] = []  # ids stay unique while the objects live

    def blob(self, suffix: str) -> tuple[str, Path]:
        name = f"blob-{self.n_blobs}.{suffix}"
        self.n_blobs += 1
        return name, self.folder / name

    def encode(self, obj: Any, where: str) -> Any:
        if isinstance(obj, np.generic):  # before float: np.float64 is a float
            return {"$scalar": obj.dtype.str, "value": self.encode(obj.item(), where)}
        if obj is None or isinstance(obj, bool | str | int):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"$float": repr(obj)}
        if isinstance(obj, list):
            return {"$list": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, tuple):
            return {"$tuple": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, dict):
            return {
                "$dict": [
                    [self.encode(k, f"{where} key"), self.encode(v, f"{where}[{k!r}]")]
                    for k, v in obj.items()
                ]
            }
        if isinstance(obj, PurePath):
            return {"$path": str(obj)}
        # Everything below may be large or shared: stored once, referenced after.
        if id(obj) in self.seen:
            return {"$ref": self.seen[id(obj)]}
        node = self._encode_object(obj, where)
        self.seen[id(obj)] = len(self.seen)
        self.keep_alive.append(obj)
        return {"$id": self.seen[id(obj)], **node}

    def _encode_object(self, obj: Any, where: str) -> dict[str, Any]:
        import torch

        from dm_audit.dataset import AuditDataset
        from dm_audit.dynamics import TrainingDynamics
        from dm_audit.models import AuditModel

        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                values = obj.ravel().tolist()
                if not all(isinstance(v, str) for v in values):
                    raise TypeError(f"{where}: object array of non-strings cannot be stored")
                return {"$strings": values, "shape": list(obj.shape)}
            name, path = self.blob("npy")
            np.save(path, obj, allow_pickle=False)
            return {"$ndarray": name}
        if isinstance(obj, pd.DataFrame):
            name, path = self.blob("parquet")
            try:
                obj.to_parquet(path)
            except Exception as error:  # an object column of mixed types, say
                raise TypeError(
                    f"{where}: DataFrame cannot be stored as Parquet: {error}"
                ) from None
            return {"$frame": name}
        if isinstance(obj, AuditDataset):
            name, path = self.blob("parquet")
            obj.to_parquet(path)
            return {"$dataset": name}
        if isinstance(obj, torch.Tensor):
            name, path = self.blob("pt")
            torch.save(obj.detach().cpu(), path)
            return {"$tensor": name}
        if isinstance(obj, AuditModel):
            name, path = self.blob("pt")
            torch.save({k: v.detach().cpu() for k, v in obj.state_dict().items()}, path)
            return {
                "$model": name,
                "name": obj.model_name,
                "num_classes": int(obj.head.out_features),
                "input_shape": list(obj.input_shape),
                "options": self.encode(dict(getattr(obj, "model_options", {})), where),
            }
        if isinstance(obj, TrainingDynamics):
            name, path = self.blob("pt")
            torch.save(obj.state_dict(), path)
            return {"$dynamics": name}
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            key = _class_key(type(obj))
            if key not in _dataclass_registry():
                raise TypeError(f"{where}: {key} is not a storable stage type")
            fields = {
                f.name: self.encode(getattr(obj, f.name), f"{where}.{f.name}")
                for f in dataclasses.fields(obj)
            }
            return {"$dataclass": key, "fields": fields}
        raise TypeError(f"{where}: {type(obj).__name__} cannot be stored as a stage result")


class _Reader:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.objects: dict[int, Any] = {}

    def blob(self, name: object) -> Path:
        # Blob names come from the file: only our own pattern, directly inside the folder.
        if not isinstance(name, str) or not _BLOB_NAME.fullmatch(name):
            raise ConfigError(f"{self.folder / STAGE_FILE}: bad blob name {name!r}")
        return self.folder / name

    def decode(self, node: Any) -> Any:
        if node is None or isinstance(node, bool | int | float | str):
            return node
        if not isinstance(node, dict):
            raise ConfigError(f"{self.folder / STAGE_FILE}: unexpected value {node!r}")
        if "$float" in node:
            return float(node["$float"])
        if "$list" in node:
            return [self.decode(v) for v in node["$list"]]
        if "$tuple" in node:
            return tuple(self.decode(v) for v in node["$tuple"])
        if "$dict" in node:
            return {self.decode(k): self.decode(v) for k, v in node["$dict"]}
        if "$path" in node:
            return Path(node["$path"])
        if "$scalar" in node:
            return np.dtype(node["$scalar"]).type(self.decode(node["value"]))
        if "$ref" in node:
            return self.objects[int(node["$ref"])]
        obj = self._decode_object(node)
        self.objects[int(node["$id"])] = obj
        return obj

    def _decode_object(self, node: dict[str, Any]) -> Any:
        import torch

        if "$strings" in node:
            return np.array(node["$strings"], dtype=object).reshape(node["shape"])
        if "$ndarray" in node:
            return np.load(self.blob(node["$ndarray"]), allow_pickle=False)
        if "$frame" in node:
            return pd.read_parquet(self.blob(node["$frame"]))
        if "$dataset" in node:
            from dm_audit.dataset import AuditDataset

            return AuditDataset.from_parquet(self.blob(node["$dataset"]))
        if "$tensor" in node:
            return torch.load(self.blob(node["$tensor"]), weights_only=True, map_location="cpu")
        if "$model" in node:
            from dm_audit.models import create_model

            model = create_model(
                str(node["name"]),
                num_classes=int(node["num_classes"]),
                input_shape=tuple(int(s) for s in node["input_shape"]),
                **self.decode(node["options"]),
            )
            state = torch.load(self.blob(node["$model"]), weights_only=True, map_location="cpu")
            model.load_state_dict(state)
            return model.eval()
        if "$dynamics" in node:
            from dm_audit.dynamics import TrainingDynamics

            state = torch.load(self.blob(node["$dynamics"]), weights_only=True, map_location="cpu")
            dynamics = TrainingDynamics(
                int(state["n_examples"]), int(state["n_epochs"]), source=str(state["source"])
            )
            dynamics.load_state_dict(state)
            return dynamics
        if "$dataclass" in node:
            cls = _dataclass_registry().get(node["$dataclass"])
            if cls is None:
                raise ConfigError(
                    f"{self.folder / STAGE_FILE}: {node['$dataclass']!r} is not a stage type"
                )
            values = {k: self.decode(v) for k, v in node["fields"].items()}
            init = {f.name for f in dataclasses.fields(cls) if f.init}
            obj = cls(**{k: v for k, v in values.items() if k in init})
            for k, v in values.items():
                if k not in init:
                    object.__setattr__(obj, k, v)
            return obj
        raise ConfigError(f"{self.folder / STAGE_FILE}: unknown node {sorted(node)!r}")


def save_stage_folder(obj: Any, folder: str | os.PathLike[str]) -> Path:
    """Store `obj` in `folder`, replacing what was there, all at once.

    The files are written into a hidden sibling folder renamed into place at the end: a crash
    never leaves a half-written result that a later run would load.

    Raises
    ------
    TypeError
        When `obj` holds a type that cannot be stored (see the module docstring).
    """
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        writer = _Writer(staging)
        root = writer.encode(obj, type(obj).__name__)
        document = {"format": _FORMAT, "version": _VERSION, "root": root}
        text = json.dumps(document, allow_nan=False, separators=(",", ":"))
        with open(staging / STAGE_FILE, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def is_stored(folder: str | os.PathLike[str]) -> bool:
    """Whether `folder` holds a result written by `save_stage_folder`."""
    return (Path(folder) / STAGE_FILE).is_file()


def load_stage_folder(folder: str | os.PathLike[str]) -> Any:
    """Load what `save_stage_folder` stored; no code from the folder is run.

    Raises
    ------
    FileNotFoundError
        When `folder` holds no stored result.
    ConfigError
        When the folder's files are not a stage result of this format.
    """
    root = Path(folder)
    file = root / STAGE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no stored stage result in {root}")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise ConfigError(f"cannot read {file}: {error}") from None
    if not isinstance(document, dict) or (document.get("format"), document.get("version")) != (
        _FORMAT,
        _VERSION,
    ):
        raise ConfigError(f"{file} is not a dm-audit stage file of version {_VERSION}")
    reader = _Reader(root)
    try:
        return reader.decode(document["root"])
    except ConfigError:
        raise
    except Exception as error:  # any damage (bad values, foreign blobs, deep nesting)
        reason = " ".join(str(error).split())[:200]
        raise ConfigError(
            f"{file} is damaged ({type(error).__name__}: {reason}); pass --restart to discard "
            "the unfinished run"
        ) from None
