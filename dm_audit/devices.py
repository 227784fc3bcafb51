"""Devices for training and inference: which one, its mixed precision, its determinism.

``auto`` picks CUDA, then MPS, then CPU. Mixed precision: on CUDA bf16 where the GPU supports
it, else fp16 with a gradient scaler; on a CPU with native bf16 (AVX-512 BF16 or AMX) the
convolutional networks run in bf16 autocast, about twice as fast as float32 there (ResNet-20,
2 cores with AMX: 832 -> 1,598 images/s at 28 x 28, 678 -> 1,215 at 32 x 32 x 3); MLPs, and
every pass on other CPUs or MPS, run in float32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import torch

from dm_audit.errors import ConfigError

__all__ = [
    "DEVICE_PATTERN",
    "amp_dtype",
    "autocast",
    "cpu_supports_bf16",
    "determinism",
    "resolve_device",
]

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


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's check: AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def amp_dtype(amp: str, device: torch.device, *, convnet: bool = False) -> torch.dtype | None:
    """The autocast dtype of ``amp`` ("auto", "off", "bf16", "fp16") on ``device``; None: off.

    On a CPU, "auto" means bf16 for a convolutional network (`convnet`) where the CPU computes
    bf16 natively, and float32 otherwise: an MLP's small matrix products gain little and its
    p_i, which the audit reads closely, keep float32's precision. "bf16" asks for it on any
    model where supported.
    """
    if device.type == "cpu" and amp in ("auto", "bf16"):
        wanted = amp == "bf16" or convnet
        if wanted and cpu_supports_bf16():
            return torch.bfloat16
        if amp == "bf16":
            log.info("mixed precision bf16 ignored: this CPU has no native bf16")
        return None
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
