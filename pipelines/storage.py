"""The IO manager that passes stage results between assets, across processes and runs.

`dagster dev` runs every asset in its own process, and the relabel job reuses the results of an
earlier audit run, so every result goes to disk under the run's folder::

    <output_root>/<run_id>/stages/<asset>/stage.json     the result's structure
    <output_root>/<run_id>/stages/<asset>/blob-<n>.*     its arrays, tables, datasets, weights

Results are stored as data by `dm_audit.stage_store` (the same store an audit's resumable work
folder uses): JSON, ``.npy`` arrays read without pickle, Parquet tables (a dataset as its
canonical table, readable by any tool) and weights-only tensor files. Loading a result never
runs code from the output root, which other people may be able to write to.

Per-run folders keep concurrent runs (two datasets dropped at once) from overwriting each
other. An input that the current run did not produce is read from the run named by the run tag
`UPSTREAM_RUN_TAG` (set by the reviews sensor, so a relabel run revises one definite audit), else
from the asset's latest materialization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg

from dm_audit.stage_store import load_stage_folder, save_stage_folder
from pipelines.jobs import UPSTREAM_RUN_TAG
from pipelines.resources import AuditRuntime

__all__ = ["STAGE_PATH_KEY", "AuditIOManager", "load_stage", "save_stage"]

#: Output metadata key recording where a result was stored.
STAGE_PATH_KEY = "stage_path"


def save_stage(obj: Any, folder: Path) -> Path:
    """Store one stage result in ``folder``, replacing what was there (all at once).

    Parameters
    ----------
    obj : Any
        An `AuditDataset` or any stage result (see `dm_audit.stage_store`).
    folder : Path
        Destination folder.

    Returns
    -------
    Path
        ``folder``.
    """
    return save_stage_folder(obj, folder)


def load_stage(folder: Path) -> Any:
    """Load what `save_stage` stored in ``folder``.

    Raises
    ------
    FileNotFoundError
        If ``folder`` holds no stored result.
    """
    return load_stage_folder(folder)


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
