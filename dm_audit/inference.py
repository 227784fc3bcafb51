"""Eval-mode forward passes: class probabilities and embeddings of many inputs, in batches."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dm_audit.batches import check_inputs, prepare_batch
from dm_audit.devices import amp_dtype, autocast, resolve_device
from dm_audit.errors import ConfigError, DataError
from dm_audit.models import AuditModel

__all__ = ["forward_all", "predict_proba"]


@torch.inference_mode()
def forward_all(
    model: AuditModel,
    inputs: np.ndarray,
    device: torch.device,
    batch_size: int,
    amp: torch.dtype | None = None,
    *,
    embeddings: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities ``(N, C)`` and, with ``embeddings``, embeddings ``(N, E)`` of checked inputs.

    The model runs in eval mode and is put back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    # Filled in place (no list of batches to concatenate): at millions of rows a second copy
    # of the (N, E) embeddings would double the memory of the pass.
    n = len(inputs)
    probs = np.empty((n, model.head.out_features), dtype=np.float32)
    emb_all = np.empty((n, model.embedding_dim), dtype=np.float32) if embeddings else None
    try:
        for start in range(0, len(inputs), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch_size]))
            if xb.ndim == 4:
                xb = xb.permute(0, 3, 1, 2)
            x = prepare_batch(model, xb.to(device, non_blocking=device.type == "cuda"))
            with autocast(device, amp):
                emb = model.embed(x)
                logits = model.head(emb)
            stop = start + len(xb)
            probs[start:stop] = F.softmax(logits.float(), dim=1).cpu().numpy()
            if emb_all is not None:
                emb_all[start:stop] = emb.float().cpu().numpy()
    finally:
        model.train(was_training)
    return probs, emb_all


def predict_proba(
    model: AuditModel,
    inputs: np.ndarray,
    device: str | torch.device = "auto",
    batch_size: int = 1024,
    *,
    amp: str = "off",
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and embeddings of ``inputs`` in eval mode.

    Parameters
    ----------
    model : AuditModel
        A model from :func:`dm_audit.models.create_model` (moved to ``device``).
    inputs : array
        float features ``(N, D)`` or uint8 images ``(N, H, W, C)``.
    device : str or torch.device
        See :func:`dm_audit.devices.resolve_device`.
    batch_size : int
        Examples per forward pass.
    amp : {"off", "auto", "bf16", "fp16"}
        Autocast on CUDA (results are returned in float32 either way).

    Returns
    -------
    probs : array (N, C) float32
        Softmax probabilities; rows sum to 1.
    embeddings : array (N, E) float32
        ``model.embed`` outputs.
    """
    x = check_inputs(inputs)
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise DataError(
            f"inputs have shape {tuple(x.shape[1:])} per example; "
            f"the model takes {model.input_shape}"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    model.to(dev)
    probs, emb = forward_all(model, x, dev, batch_size, amp_dtype(amp, dev, convnet=x.ndim == 4))
    assert emb is not None
    return probs, emb
