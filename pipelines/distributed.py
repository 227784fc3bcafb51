"""Data-parallel training as a Dagster asset: ``torchrun`` launched through Dagster Pipes.

`distributed_model` starts ``torchrun --standalone --nproc_per_node N pipelines/ddp_train.py``
with `dagster.PipesSubprocessClient`: N processes train one model with DistributedDataParallel
(gloo on CPU, nccl with one GPU per process), rank 0 writes it to
``<output_root>/<run_id>/distributed_model/`` and reports the epochs, accuracies and
examples/s back to Dagster, with the training's log. The asset has its own group and job
(``distributed_train_job``); the audit job, its schedule and sensors do not run it.

Config (``ops: distributed_model: config:``): the data (``source``, ``label_column``,
``id_column``, ``test_size``, synthetic ``noise_kind``/``noise_rate``), the training (``loss``,
``lam``, ``beta``, ``model``, ``epochs``, ``batch_size``, ``lr``, ``seed``) and
``nproc_per_node`` (None: one process per GPU when training on CUDA, else 2).
"""

# No `from __future__ import annotations`: Dagster reads the annotations at definition time.

import sys
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from pipelines.assets import MODEL_OP_TAGS, MODEL_POOL
from pipelines.jobs import PIPELINE_TAG
from pipelines.resources import AuditRuntime

__all__ = [
    "DISTRIBUTED_GROUP",
    "TRAIN_SCRIPT",
    "DistributedTrainConfig",
    "distributed_model",
    "distributed_train_job",
    "torchrun_command",
]

DISTRIBUTED_GROUP = "dm_audit_distributed"
TRAIN_SCRIPT = Path(__file__).with_name("ddp_train.py")
CPU_PROCESSES = 2


class DistributedTrainConfig(dg.Config):
    """What `distributed_model` trains on and how (the options of ``dm-audit train``)."""

    source: str = Field(
        default="digits", description='"digits", a .parquet/.csv table, an image folder, ...'
    )
    label_column: str = Field(default="label", description="Label column of a table.")
    id_column: str | None = Field(default=None, description="Id column of a table.")
    test_size: float = Field(default=0.3, description="Held-out share for eval_acc.")
    noise_kind: str = Field(
        default="none", description='Synthetic noise: "none", "symmetric", "pair", "open_set".'
    )
    noise_rate: float = Field(default=0.0, description="Share of training labels to corrupt.")
    model: str = Field(default="auto", description='Model name ("auto", "mlp", "resnet20", ...).')
    loss: str = Field(default="dm", description='Loss name ("dm", "cce", "proselflc", ...).')
    lam: float | None = Field(default=None, description="DM emphasis mode λ (None: 0.5).")
    beta: float | None = Field(default=None, description="DM emphasis spread β (None: 8).")
    epochs: int | None = Field(default=None, description="Epochs (None: from the data size).")
    batch_size: int = Field(default=128, description="Global batch size (all processes).")
    lr: float | None = Field(default=None, description="Learning rate (None: the recipe's).")
    seed: int = Field(default=0, description="Seeds the split, the noise and the training.")
    nproc_per_node: int | None = Field(
        default=None,
        description="Training processes (None: one per GPU when training on CUDA, else 2).",
    )


def _processes(config: DistributedTrainConfig, device: str) -> int:
    if config.nproc_per_node is not None:
        if config.nproc_per_node < 1:
            raise dg.Failure(f"nproc_per_node must be >= 1, got {config.nproc_per_node}")
        return config.nproc_per_node
    import torch

    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return max(1, torch.cuda.device_count()) if on_cuda else CPU_PROCESSES


def torchrun_command(
    config: DistributedTrainConfig, device: str, out: Path, *, python: str = sys.executable
) -> list[str]:
    """The ``torchrun`` command line that trains ``config`` into ``out``."""
    args: list[str] = [
        "--input", config.source,
        "--label-column", config.label_column,
        "--test-size", str(config.test_size),
        "--model", config.model,
        "--loss", config.loss,
        "--batch-size", str(config.batch_size),
        "--device", device,
        "--seed", str(config.seed),
        "--quiet",
        "--overwrite",
        "--out", str(out),
    ]  # fmt: skip
    optional: dict[str, Any] = {
        "--id-column": config.id_column,
        "--lam": config.lam,
        "--beta": config.beta,
        "--epochs": config.epochs,
        "--lr": config.lr,
    }
    for flag, value in optional.items():
        if value is not None:
            args += [flag, str(value)]
    if config.noise_kind != "none":
        args += ["--inject-noise", config.noise_kind, "--noise-rate", str(config.noise_rate)]
    launcher = [python, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc_per_node", str(_processes(config, device))]
    return [*launcher, str(TRAIN_SCRIPT), *args]


@dg.asset(group_name=DISTRIBUTED_GROUP, kinds={"pytorch"}, op_tags=MODEL_OP_TAGS, pool=MODEL_POOL)
def distributed_model(
    context: dg.AssetExecutionContext,
    config: DistributedTrainConfig,
    runtime: AuditRuntime,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """A model trained by torchrun with DistributedDataParallel (reported through Pipes)."""
    out = runtime.run_dir(context.run.run_id) / "distributed_model"
    command = torchrun_command(config, runtime.device, out)
    context.log.info(" ".join(command))
    return pipes_subprocess_client.run(command=command, context=context).get_materialize_result()


distributed_train_job = dg.define_asset_job(
    name="distributed_train_job",
    selection=dg.AssetSelection.assets("distributed_model"),
    description="Train one model with torchrun (DistributedDataParallel) via Dagster Pipes.",
    tags={PIPELINE_TAG: "distributed_train"},
)
