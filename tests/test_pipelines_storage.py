"""Stage storage of the Dagster pipeline: datasets, networks and dynamics survive a round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dm_audit.dataset import AuditDataset
from dm_audit.dynamics import TrainingDynamics
from dm_audit.models import create_model
from pipelines.storage import load_stage, save_stage


def test_dataset_is_stored_as_canonical_parquet(
    tmp_path: Path, blobs_dataset: AuditDataset
) -> None:
    folder = save_stage(blobs_dataset, tmp_path / "dataset")
    assert sorted(p.name for p in folder.iterdir()) == ["blob-0.parquet", "stage.json"]
    loaded = load_stage(folder)
    assert loaded.classes == ["a", "b", "c"]
    assert loaded.table["example_id"].tolist() == blobs_dataset.table["example_id"].tolist()
    np.testing.assert_array_equal(loaded.features(), blobs_dataset.features())


def test_networks_go_to_weights_only_state_dicts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=3, input_shape=(4,))
    model.set_input_stats([1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 2.0, 2.0])
    model.train()
    model(torch.randn(16, 4))  # moves the BatchNorm running statistics off their defaults
    model.eval()
    dynamics = TrainingDynamics(5, 3)
    dynamics.record(0, np.arange(5), np.linspace(0.1, 0.9, 5), np.array([1, 0, 1, 0, 1], bool))
    dynamics.end_epoch(0)
    result = {"model": model, "same": model, "dynamics": dynamics, "p": np.array([0.25, 0.5])}

    folder = save_stage(result, tmp_path / "audit_model")

    assert sorted(p.name for p in folder.iterdir()) == [
        "blob-0.pt",
        "blob-1.pt",
        "blob-2.npy",
        "stage.json",
    ]
    state = torch.load(folder / "blob-0.pt", weights_only=True)
    assert set(state) == set(model.state_dict())
    loaded = load_stage(folder)
    assert loaded["model"] is loaded["same"]  # one network, stored once
    assert not loaded["model"].training
    x = torch.randn(6, 4)
    torch.testing.assert_close(loaded["model"](x), model(x), rtol=0, atol=0)
    np.testing.assert_array_equal(loaded["dynamics"].p_matrix(), dynamics.p_matrix())
    np.testing.assert_array_equal(loaded["p"], [0.25, 0.5])


def test_saving_again_replaces_the_stored_result(tmp_path: Path) -> None:
    save_stage({"version": 1}, tmp_path / "flags")
    save_stage({"version": 2}, tmp_path / "flags")
    assert load_stage(tmp_path / "flags") == {"version": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["flags"]  # no staging folders left
