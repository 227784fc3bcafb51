"""Data-parallel training: sharding, global normalisation, and torchrun against one process.

The end-to-end test runs ``dm-audit train`` under ``torchrun`` with 2 CPU processes (gloo) and
compares the model, history and p_i dynamics with the same command in one process.

Tolerance. The two runs differ only in floating-point summation order (gradients averaged over
two ranks, BatchNorm statistics from all-reduced sums). Measured on 2 epochs of digits: max
weight difference 2.7e-7 and identical p_i, the same size as between two single-process runs
with 1 and 2 threads (2.9e-7). DM training amplifies rounding differences over more epochs
(3 epochs: 1.9e-3 for DDP vs one process, and 1.9e-3 for 1 vs 2 threads), hence 2 epochs here.
The test asserts: every weight within 1e-5 (max abs), every example's p_i at every epoch within
1e-4, the loss per epoch within 1e-5 (relative), and accuracies per epoch within 1 point (they
were equal).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist

from dm_audit import distributed
from dm_audit.batches import EpochBatchSampler, split_batches
from dm_audit.cli import main
from dm_audit.errors import ConfigError
from dm_audit.losses import create_loss
from dm_audit.training import CHECKPOINT_NAME

EPOCHS = 2
# Summation order differs between one process and two: each feature is standardised by its own
# spread, so digits' rarely-lit pixels reach inputs of ~40 and amplify those float differences
# (measured 5.7e-5 after 2 epochs; a wrong gradient or a missed all-reduce is off by > 1e-2).
WEIGHT_TOL = 2e-4
# p_i are stored as float16, whose step near 1 is 4.9e-4: one rounding step apart is equal.
P_TOL = 1e-3
LOSS_RTOL = 1e-5
ACC_TOL = 0.01


def _train_args(out: Path) -> list[str]:
    return [
        "train",
        "--input",
        "digits",
        "--test-size",  # a held-out split, so both runs' eval_acc can be compared
        "0.3",
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "128",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--quiet",
        "--out",
        str(out),
    ]


def _torchrun_env(pycache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores: no oversubscription
    env.pop("WORLD_SIZE", None)
    # Three interpreters import torch: let them share compiled bytecode (kept in pytest's cache
    # folder, outside the environment) even where the environment disables writing it.
    env["PYTHONDONTWRITEBYTECODE"] = ""
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def _skip_without_gloo() -> None:
    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed")
    if not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")


# ------------------------------------------------------------------------------- unit pieces


def _pycache_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Bytecode cache shared by the torchrun processes: pytest's cache folder, kept across runs."""
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    return cache.mkdir("torchrun-pycache") if cache is not None else tmp_path.parent / "pycache"


def test_shards_partition_each_global_batch():
    batch = torch.arange(10, 21)
    for world in (1, 2, 3, 4):
        parts = [distributed.shard(batch, r, world) for r in range(world)]
        assert torch.equal(torch.cat(parts), batch)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1


def test_sampler_shards_are_the_single_process_batches():
    n, bs = 103, 16
    single = list(EpochBatchSampler(n, bs, torch.Generator().manual_seed(5)))
    ranks = [
        list(EpochBatchSampler(n, bs, torch.Generator().manual_seed(5), rank=r, world=2))
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch
    assert sorted(i for b in single for i in b) == list(range(n))


def test_losses_unchanged_outside_a_global_batch():
    torch.manual_seed(0)
    logits, y = torch.randn(12, 4), torch.randint(0, 4, (12,))
    w = torch.rand(12)
    assert torch.equal(distributed.batch_sum(w), w.sum())
    assert torch.equal(distributed.batch_mean(w), w.mean())
    assert distributed.global_batch_size(12) is None
    out = create_loss("dm", lam=1.0, beta=8.0)(logits, y)
    assert torch.allclose(out.extras["normalised_weights"].sum(), torch.tensor(1.0))


def test_no_process_group_means_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.process_group("cpu") as info:
        assert info is None
        assert distributed.is_main()
        assert distributed.on_main(lambda: 7) == 7
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR"), distributed.process_group("cpu"):
        pass


def test_only_train_runs_under_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert "only `dm-audit train` runs under torchrun" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_global_batch_sizes_cover_the_epoch():
    sizes = [len(b) for b in split_batches(torch.arange(1258), 128)]
    assert sum(sizes) == 1258 and min(sizes) >= 2


# ------------------------------------------------------------------------------- torchrun


def test_torchrun_two_cpu_processes_match_one_process(tmp_path, request):
    _skip_without_gloo()
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "dm_audit.cli",
        *_train_args(ddp_out),
    ]
    run = subprocess.run(
        command,
        env=_torchrun_env(_pycache_dir(request, tmp_path)),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # Only rank 0 wrote: one model, one summary, and no second versioned folder.
    assert run.stdout.count("trained:") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]

    assert main(_train_args(single_out)) == 0

    ddp_model = torch.load(ddp_out / "model.pt", map_location="cpu", weights_only=True)
    one_model = torch.load(single_out / "model.pt", map_location="cpu", weights_only=True)
    ddp_state, one_state = ddp_model["state_dict"], one_model["state_dict"]
    assert ddp_state.keys() == one_state.keys()
    worst = max(
        float((ddp_state[k].double() - one_state[k].double()).abs().max())
        for k in one_state
        if one_state[k].is_floating_point()
    )
    assert worst < WEIGHT_TOL

    ddp_hist = pd.read_parquet(ddp_out / "history.parquet")
    one_hist = pd.read_parquet(single_out / "history.parquet")
    assert len(ddp_hist) == len(one_hist) == EPOCHS
    for column in ("train_acc", "eval_acc"):
        gap = np.abs(ddp_hist[column].to_numpy() - one_hist[column].to_numpy())
        assert gap.max() <= ACC_TOL, column
    np.testing.assert_allclose(ddp_hist["loss"], one_hist["loss"], rtol=LOSS_RTOL)

    ddp_ckpt = torch.load(ddp_out / "checkpoints" / CHECKPOINT_NAME, weights_only=True)
    one_ckpt = torch.load(single_out / "checkpoints" / CHECKPOINT_NAME, weights_only=True)
    p_ddp = ddp_ckpt["dynamics"]["p"].numpy()
    p_one = one_ckpt["dynamics"]["p"].numpy()
    assert p_ddp.shape == p_one.shape == (EPOCHS, 1258)
    assert np.isfinite(p_ddp).all()  # every example recorded by exactly one rank
    assert np.abs(p_ddp - p_one).max() < P_TOL
    assert ddp_ckpt["epoch"] == one_ckpt["epoch"] == EPOCHS
    assert ddp_ckpt["events"] == one_ckpt["events"]
