"""``dm-audit train`` under torchrun, reporting to Dagster through Pipes.

The `pipelines.distributed.distributed_model` asset launches it as::

    torchrun --standalone --nproc_per_node N pipelines/ddp_train.py --input digits --out DIR ...

Every process trains (data-parallel, see `dm_audit.distributed`); rank 0 alone writes the model
and opens the Pipes connection, so Dagster receives one log stream and one materialisation with
the run's epochs, accuracies and throughput. The arguments are those of ``dm-audit train``.
Outside Dagster the script is just ``dm-audit train`` (Pipes then warns that it has no
orchestrator and does nothing).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import pandas as pd
from dagster_pipes import open_dagster_pipes

from dm_audit.cli import build_parser
from dm_audit.cli import main as dm_audit_main
from dm_audit.distributed import env_world_size


def run_metadata(out: str | os.PathLike[str], world_size: int) -> dict[str, Any]:
    """What the materialisation reports, read from the files ``dm-audit train`` wrote."""
    out = os.fspath(out)
    with open(os.path.join(out, "train_summary.json")) as f:
        summary = json.load(f)
    history = pd.read_parquet(os.path.join(out, "history.parquet"))
    kept = history[~history["discarded"]] if "discarded" in history else history
    last = summary["final_epoch"]
    metadata: dict[str, Any] = {
        "world_size": world_size,
        "epochs": int(last["epoch"]),
        "loss_function": summary["config"]["loss"],
        "train_acc": float(last["train_acc"]),
        "examples_per_s": float(kept["examples_per_s"].mean()),
        "train_seconds": float(kept["seconds"].sum()),
        "collapse_events": sum(e.get("event") == "collapse" for e in summary["events"]),
        "model_path": os.path.abspath(os.path.join(out, "model.pt")),
    }
    if last.get("eval_acc") is not None:
        metadata["eval_acc"] = float(last["eval_acc"])
    return metadata


def main(argv: Sequence[str] | None = None) -> int:
    """Train with the ``dm-audit train`` arguments ``argv``; rank 0 reports to Dagster."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(["train", *argv])
    rank = int(os.environ.get("RANK", "0"))
    world_size = env_world_size()
    pipes = open_dagster_pipes() if rank == 0 else contextlib.nullcontext()
    with pipes as context:
        if context is not None:
            context.log.info(f"training on {world_size} process(es): dm-audit train {argv}")
        status = dm_audit_main(["train", *argv])
        if status != 0:
            # Inside the Pipes context, so Dagster sees the failure and the CLI's message.
            raise SystemExit(status)
        if context is not None:
            metadata = run_metadata(args.out, world_size)
            context.report_asset_materialization(metadata=metadata)
    return 0


if __name__ == "__main__":
    sys.exit(main())
