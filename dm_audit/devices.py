"""Devices for training and inference: which one, its mixed precision, its determinism.

``auto`` picks CUDA, then MPS, then CPU. Mixed precision applies on CUDA only (bf16 where the
GPU supports it, else fp16 with a gradient scaler); elsewhere every pass runs in float32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import torch

from dm_audit.errors import ConfigError

__all__ = ["DEVICE_PATTERN", "amp_dtype", "autocast", "determinism", "resolve_device"]

log = logging.getLogger(__name__)

# Device names a configuration may give; whether the machine has the device is checked later.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn a device string into a ``torch.device``, checking that it exists.

    Parameters
    ----------
    name : str or torch.device
        "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps".

    Raises
    ------
    ConfigError
        Unknown name, or a device this machine does not have.
    """
    if isinstance(name, torch.device):
        return name
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but MPS is not available")
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` ("auto", "off", "bf16", "fp16") on ``device``; None: off."""
    if device.type != "cuda" or amp == "off":
        if amp in ("bf16", "fp16") and device.type != "cuda":
            log.info("mixed precision %s ignored on device %s", amp, device)
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` in ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels for the duration of training, restored afterwards.

    CPU kernels are deterministic already; the switch matters on accelerators (and importing the
    machinery behind it costs seconds, so CPU runs skip it).
    """
    if device.type == "cpu":
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    if enabled:
        # cuBLAS reads this when it first initialises; harmless when already set.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]
        torch.backends.cudnn.deterministic = previous[3]
