"""Training checkpoints: what one holds, how it is written, and when a run may resume from it.

A checkpoint is one dict, as in torchvision's reference scripts: model, optimizer, scheduler,
gradient scaler, epoch and iteration, every RNG state, the configuration, a fingerprint of the
data, and the run's record (history, events, dynamics, collapse-guard state and its rollback
target). It is written atomically after every kept epoch, so a killed run never leaves a torn
file, and it holds only tensors, numbers, strings, lists and dicts so that it loads with
``torch.load(weights_only=True)``: reading a checkpoint never runs code from it.

Resuming refuses a checkpoint written by another configuration (up to the fields that cannot
change the weights) or for other data, naming every difference.
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dm_audit.atomic import atomic_write
from dm_audit.errors import ConfigError

if TYPE_CHECKING:
    from dm_audit.engine import TrainState

__all__ = [
    "CHECKPOINT_NAME",
    "check_resumable",
    "data_fingerprint",
    "plain",
    "read_checkpoint",
    "restore_state",
    "seed_everything",
    "state_of",
    "write_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "dm_audit.checkpoint"
CHECKPOINT_VERSION = 1
# Config fields that cannot change the trained weights: a checkpoint may differ in them.
RESUME_IGNORED_FIELDS = frozenset({"progress", "progress_label", "eval_batch_size"})


def plain(value: Any) -> Any:
    """Python scalars/containers only (numpy scalars would need weights_only=False)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return str(value)
    return value


# ============================================================================================
# random number generators


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's legacy and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - user code (transforms) may use the legacy global RNG
    torch.manual_seed(seed)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_version), "state": list(py_state), "gauss": py_gauss},
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    generator.set_state(state["generator"].cpu())
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            n["kind"],
            n["key"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# ============================================================================================
# the trajectory's state at an epoch boundary


def state_of(state: TrainState, *, detach: bool = False) -> dict[str, Any]:
    """Everything needed to continue the trajectory from the current epoch boundary.

    With ``detach`` the result is a copy, safe to keep while training goes on (the live
    tensors change in place): a rollback target. The RNG states are read fresh either way.
    """
    parts = {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
    }
    return {
        "epoch": state.epoch,
        "global_iter": state.global_iter,
        **(_detached(parts) if detach else parts),
        "rng": _rng_state(state.generator),
    }


def _detached(value: Any) -> Any:
    """A copy of `value` that shares nothing mutable with it: tensors cloned, containers rebuilt.

    What `copy.deepcopy` gives for a training state, without its per-object memo bookkeeping: a
    tiny model's snapshot after every epoch cost a fifth of a 150-row audit's time to its flags.
    A state dict's ``_metadata`` (the module versions `load_state_dict` reads) is kept.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        # A shallow copy keeps the mapping's type and attributes (an OrderedDict's _metadata, a
        # defaultdict's factory); its values are then replaced by detached ones.
        out = copy.copy(value)
        for k, v in value.items():
            out[k] = _detached(v)
        metadata = getattr(value, "_metadata", None)
        if metadata is not None:
            out._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, tuple):
        items = [_detached(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return copy.deepcopy(value)


def restore_state(state: TrainState, saved: dict[str, Any]) -> None:
    """Put ``state`` back at the epoch boundary ``saved`` was taken at (see `state_of`)."""
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    if saved["scaler"]:
        state.scaler.load_state_dict(saved["scaler"])
    _set_rng_state(saved["rng"], state.generator)
    state.epoch = int(saved["epoch"])
    state.global_iter = int(saved["global_iter"])


# ============================================================================================
# files


def data_fingerprint(inputs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Shape, dtype and a hash of the labels and a sample of the inputs: resume only on these."""
    h = hashlib.sha256()
    h.update(labels.astype(np.int64).tobytes())
    step = max(1, len(inputs) // 4096)
    h.update(np.ascontiguousarray(inputs[::step]).tobytes())
    return {
        "n_examples": len(labels),
        "num_classes": int(num_classes),
        "input_shape": list(inputs.shape[1:]),
        "input_dtype": str(inputs.dtype),
        "sha256": h.hexdigest(),
    }


def write_checkpoint(path: Path, state: TrainState, **record: Any) -> None:
    """Write ``state`` (see `state_of`) and the run's ``record`` to ``path``, atomically.

    ``record`` holds ``config``, ``data``, ``guard``, ``history``, ``events``, ``dynamics`` and
    ``snapshot``, already reduced to weights_only-loadable values.
    """
    checkpoint = state_of(state)
    checkpoint.update(format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, **record)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict at ``path``; :class:`ConfigError` if it is unreadable or not ours."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message spans lines (and explains weights_only): keep one line.
        reason = " ".join(str(exc).split())[:200]
        raise ConfigError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {reason}); delete it "
            "to start afresh"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a dm-audit training checkpoint")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"checkpoint {path} has format version {checkpoint.get('version')}, "
            f"this dm-audit writes {CHECKPOINT_VERSION}"
        )
    return checkpoint


def check_resumable(
    checkpoint: dict[str, Any], config: dict[str, Any], data: dict[str, Any], path: Path
) -> None:
    """Raise :class:`ConfigError` unless ``checkpoint`` was written by this run's setup.

    ``config`` is this run's ``TrainConfig.to_dict()`` and ``data`` its `data_fingerprint`; the
    message names every difference, except in fields that cannot change the weights.
    """
    theirs = checkpoint["config"]
    diffs = [
        f"{k}: checkpoint {theirs.get(k)!r} vs now {config.get(k)!r}"
        for k in sorted(set(config) | set(theirs))
        if k not in RESUME_IGNORED_FIELDS and theirs.get(k) != config.get(k)
    ]
    if diffs:
        raise ConfigError(
            f"checkpoint {path} was written by a different training configuration; "
            f"refusing to resume ({'; '.join(diffs)}). Remove it or use the same options."
        )
    data_diffs = [
        f"{k}: checkpoint {checkpoint['data'].get(k)!r} vs now {v!r}"
        for k, v in data.items()
        if checkpoint["data"].get(k) != v
    ]
    if data_diffs:
        raise ConfigError(
            f"checkpoint {path} was written for different training data; refusing to resume "
            f"({'; '.join(data_diffs)})"
        )
