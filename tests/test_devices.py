"""Mixed precision by device and model kind, checked on the CPU."""

from __future__ import annotations

import pytest
import torch

from dm_audit import devices


@pytest.mark.parametrize("native", [True, False])
def test_cpu_autocast_is_bf16_for_conv_nets_where_the_cpu_has_it(monkeypatch, native) -> None:
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: native)
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if native else None
    assert devices.amp_dtype("auto", cpu, convnet=True) == expected
    assert devices.amp_dtype("auto", cpu, convnet=False) is None  # MLPs keep float32
    assert devices.amp_dtype("bf16", cpu) == expected
    assert devices.amp_dtype("off", cpu, convnet=True) is None
    assert devices.amp_dtype("fp16", cpu, convnet=True) is None  # no fp16 autocast on a CPU


def test_other_devices_without_cuda_run_in_float32() -> None:
    assert devices.amp_dtype("auto", torch.device("mps"), convnet=True) is None


def test_a_bf16_training_step_on_the_cpu_learns(monkeypatch) -> None:
    import numpy as np

    from dm_audit.training import TrainConfig, fit

    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 32)
    images = np.zeros((64, 8, 8, 1), dtype=np.uint8)
    images[labels == 1, :4] = 200  # class 1: a bright top half
    images += rng.integers(0, 30, size=images.shape, dtype=np.uint8)
    config = TrainConfig(model="resnet20", epochs=6, device="cpu", seed=0)
    result = fit(images, labels, config, num_classes=2)
    assert result.recipe["amp"] == "bfloat16"
    assert result.history[-1]["train_acc"] > 0.9
