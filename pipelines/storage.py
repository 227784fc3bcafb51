"""The IO manager that passes stage results between assets, across processes and runs.

`dagster dev` runs every asset in its own process, and the relabel job reuses the results of an
earlier audit run, so every result goes to disk under the run's folder::

    <output_root>/<run_id>/stages/<asset>/dataset.parquet     the canonical table
    <output_root>/<run_id>/stages/<asset>/result.pkl          any other result
    <output_root>/<run_id>/stages/<asset>/model-<k>.pt        state dict of each network in it
    <output_root>/<run_id>/stages/<asset>/dynamics-<k>.pt     training dynamics tensors

Datasets are stored as canonical Parquet (readable by any tool). Networks are taken out of the
pickle: their weights go to a plain ``state_dict`` file loaded with
``torch.load(weights_only=True)``, and the pickle keeps only the architecture on the ``meta``
device (no data). Training dynamics, which may be memory-mapped, are stored the same way.

Per-run folders keep concurrent runs (two datasets dropped at once) from overwriting each
other. An input that the current run did not produce is read from the run named by the run tag
`UPSTREAM_RUN_TAG` (set by the reviews sensor, so a relabel run revises one definite audit), else
from the asset's latest materialization.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import torch
from torch import nn

from dm_audit.dataset import AuditDataset
from dm_audit.dynamics import TrainingDynamics
from pipelines.jobs import UPSTREAM_RUN_TAG
from pipelines.resources import AuditRuntime

__all__ = ["STAGE_PATH_KEY", "AuditIOManager", "load_stage", "save_stage"]

#: Output metadata key recording where a result was stored.
STAGE_PATH_KEY = "stage_path"

_DATASET_FILE = "dataset.parquet"
_RESULT_FILE = "result.pkl"


class _StagePickler(pickle.Pickler):
    """Pickler that moves networks and training dynamics into weights-only torch files."""

    def __init__(self, file: io.BufferedIOBase, folder: Path) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.folder = folder
        # One file per object even when the result references it twice (e.g. a model held by
        # two results): the unpickler then restores a single shared object.
        self.stored: dict[int, tuple[Any, ...]] = {}

    def persistent_id(self, obj: Any) -> tuple[Any, ...] | None:
        if not isinstance(obj, nn.Module | TrainingDynamics):
            return None
        if id(obj) in self.stored:
            return self.stored[id(obj)]
        index = len(self.stored)
        pid: tuple[Any, ...]
        if isinstance(obj, nn.Module):
            # Only outermost networks reach here: their sub-modules travel inside the skeleton.
            name = f"model-{index}.pt"
            state = {k: v.detach().cpu() for k, v in obj.state_dict().items()}
            torch.save(state, self.folder / name)
            # The architecture without data: parameters and buffers on the meta device.
            skeleton = pickle.dumps(copy.deepcopy(obj).to("meta"), protocol=pickle.HIGHEST_PROTOCOL)
            pid = ("module", name, skeleton)
        else:
            name = f"dynamics-{index}.pt"
            torch.save(obj.state_dict(), self.folder / name)
            pid = ("dynamics", name, obj.n_examples, obj.n_epochs, obj.source)
        self.stored[id(obj)] = pid
        return pid


class _StageUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, folder: Path) -> None:
        super().__init__(file)
        self.folder = folder
        self.loaded: dict[str, Any] = {}

    def persistent_load(self, pid: Any) -> Any:
        kind, name = pid[0], pid[1]
        if name not in self.loaded:
            self.loaded[name] = self._restore(kind, name, pid)
        return self.loaded[name]

    def _restore(self, kind: str, name: str, pid: Any) -> Any:
        state = torch.load(self.folder / name, weights_only=True, map_location="cpu")
        if kind == "module":
            module = pickle.loads(pid[2]).to_empty(device="cpu")
            module.load_state_dict(state)
            return module
        if kind == "dynamics":
            n_examples, n_epochs, source = pid[2:]
            dynamics = TrainingDynamics(n_examples, n_epochs, source=source)
            dynamics.load_state_dict(state)
            return dynamics
        raise pickle.UnpicklingError(f"unknown stored object kind {kind!r} in {self.folder}")


def save_stage(obj: Any, folder: Path) -> Path:
    """Store one stage result in ``folder``, replacing what was there.

    The files are written into a hidden sibling folder that is renamed into place at the end, so
    a crash never leaves a half-written result that a later run would load.

    Parameters
    ----------
    obj : Any
        An `AuditDataset` (stored as canonical Parquet) or any picklable result.
    folder : Path
        Destination folder.

    Returns
    -------
    Path
        ``folder``.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        if isinstance(obj, AuditDataset):
            obj.to_parquet(staging / _DATASET_FILE)
        else:
            with open(staging / _RESULT_FILE, "wb") as f:
                _StagePickler(f, staging).dump(obj)
        if folder.exists():
            # A retried step writes again; the old copy goes only once the new one is complete.
            trash = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load_stage(folder: Path) -> Any:
    """Load what `save_stage` stored in ``folder``.

    Raises
    ------
    FileNotFoundError
        If ``folder`` holds no stored result.
    """
    if (folder / _DATASET_FILE).exists():
        return AuditDataset.from_parquet(folder / _DATASET_FILE)
    if (folder / _RESULT_FILE).exists():
        with open(folder / _RESULT_FILE, "rb") as f:
            return _StageUnpickler(f, folder).load()
    raise FileNotFoundError(f"no stored stage result in {folder}")


class AuditIOManager(dg.ConfigurableIOManager):
    """Stores each asset's result under ``<output_root>/<run_id>/stages/<asset>``."""

    runtime: AuditRuntime

    def _folder(self, run_id: str, asset_key: dg.AssetKey) -> Path:
        return self.runtime.stage_dir(run_id).joinpath(*asset_key.path)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        """Store ``obj`` and record its folder in the materialization's metadata."""
        folder = save_stage(obj, self._folder(context.run_id, context.asset_key))
        context.add_output_metadata({STAGE_PATH_KEY: dg.MetadataValue.path(str(folder))})

    def _lineage(self, context: dg.InputContext) -> list[str]:
        """This run's id, then its parents' (a re-execution reuses its parent's results)."""
        run = context.step_context.dagster_run
        ids = [run.run_id]
        while run is not None and run.parent_run_id and run.parent_run_id not in ids:
            ids.append(run.parent_run_id)
            run = context.instance.get_run_by_id(run.parent_run_id)
        return ids

    def load_input(self, context: dg.InputContext) -> Any:
        """Load an upstream result: this run's (or a re-executed parent's), the tagged upstream
        run's, or else the latest materialization's."""
        key = context.asset_key
        step = context.step_context
        candidates = [self._folder(run_id, key) for run_id in self._lineage(context)]
        upstream_run = step.run_tags.get(UPSTREAM_RUN_TAG)
        if upstream_run:
            candidates.append(self._folder(upstream_run, key))
        else:
            event = context.instance.get_latest_materialization_event(key)
            materialization = event.asset_materialization if event else None
            if materialization is not None:
                stored = materialization.metadata.get(STAGE_PATH_KEY)
                if stored is not None:
                    candidates.append(Path(str(stored.value)))
        for folder in candidates:
            if folder.exists():
                context.log.debug(f"loading {key.to_user_string()} from {folder}")
                return load_stage(folder)
        where = f"run {upstream_run}" if upstream_run else "any earlier run"
        raise FileNotFoundError(
            f"asset {key.to_user_string()!r} has no stored result from this run or {where} "
            f"(looked in {[str(c) for c in candidates]}); materialize it first, e.g. with the "
            "audit_job"
        )
