"""The `distributed_model` asset: torchrun with 2 CPU processes (gloo) launched through Pipes."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch.distributed as dist

from dm_audit.models import load_model
from dm_audit.sources import load_source
from dm_audit.training import predict_proba
from pipelines.definitions import defs
from pipelines.distributed import (
    TRAIN_SCRIPT,
    DistributedTrainConfig,
    distributed_model,
    torchrun_command,
)
from pipelines.jobs import AUDIT_ASSETS
from pipelines.resources import AuditRuntime

EPOCHS = 2


def _pycache_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Bytecode cache shared by the torchrun processes: pytest's cache folder, kept across runs."""
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    return cache.mkdir("torchrun-pycache") if cache is not None else tmp_path.parent / "pycache"


def test_torchrun_command_passes_the_config(tmp_path: Path) -> None:
    config = DistributedTrainConfig(epochs=4, lam=1.0, beta=16.0, nproc_per_node=3)
    command = torchrun_command(config, "cpu", tmp_path / "m", python="py")
    assert command[:6] == [
        "py",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "3",
    ]
    assert command[6] == str(TRAIN_SCRIPT)
    args = command[7:]
    for flag, value in (
        ("--epochs", "4"),
        ("--lam", "1.0"),
        ("--beta", "16.0"),
        ("--device", "cpu"),
    ):
        assert args[args.index(flag) + 1] == value
    assert "--inject-noise" not in args and "--lr" not in args
    # Two CPU processes unless told otherwise.
    assert torchrun_command(DistributedTrainConfig(), "cpu", tmp_path)[5] == "2"


def test_the_audit_job_does_not_run_the_distributed_asset() -> None:
    audit = defs.resolve_job_def("audit_job")
    assert "distributed_model" not in {n.name for n in audit.graph.node_defs}
    job = defs.resolve_job_def("distributed_train_job")
    assert [n.name for n in job.graph.node_defs] == ["distributed_model"]
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {*AUDIT_ASSETS, "distributed_model"}


def test_materialise_with_two_gloo_processes(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed with gloo")
    runtime = AuditRuntime(output_root=str(tmp_path), device="cpu")
    config = {"epochs": EPOCHS, "nproc_per_node": 2, "batch_size": 128, "seed": 1}
    # Two processes on two cores: one thread each. The three interpreters share compiled
    # bytecode (in pytest's cache folder) even where the environment disables writing it.
    env = {
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "",
        "PYTHONPYCACHEPREFIX": str(_pycache_dir(request, tmp_path)),
    }
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [distributed_model],
            instance=instance,
            resources={
                "runtime": runtime,
                "pipes_subprocess_client": dg.PipesSubprocessClient(env=env),
            },
            run_config={"ops": {"distributed_model": {"config": config}}},
        )
    assert result.success
    [materialization] = result.asset_materializations_for_node("distributed_model")
    meta = {k: v.value for k, v in materialization.metadata.items()}
    assert meta["world_size"] == 2
    assert meta["epochs"] == EPOCHS
    assert meta["examples_per_s"] > 0
    assert meta["collapse_events"] == 0

    # The reported accuracy is that of the model rank 0 wrote, on the same held-out split.
    model_path = Path(meta["model_path"])
    assert model_path == runtime.run_dir(result.run_id) / "distributed_model" / "model.pt"
    model, classes = load_model(model_path)
    data = load_source("digits", test_size=0.3, seed=1)
    assert list(data.classes) == classes
    test = data.test()
    probs, _ = predict_proba(model, test.inputs(), device="cpu")
    accuracy = float(np.mean(probs.argmax(1) == test.label_codes()))
    assert accuracy == pytest.approx(meta["eval_acc"], abs=1e-9)
    assert accuracy > 0.8
