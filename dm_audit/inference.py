"""Eval-mode forward passes: class probabilities and embeddings of many inputs, in batches."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dm_audit.batches import RowSubset, check_inputs, prepare_batch
from dm_audit.devices import amp_dtype, autocast, resolve_device
from dm_audit.errors import ConfigError, DataError
from dm_audit.models import AuditModel

__all__ = ["forward_all", "predict_class_probs", "predict_proba"]


@torch.inference_mode()
def forward_all(
    model: AuditModel,
    inputs: np.ndarray | RowSubset,
    device: torch.device,
    batch_size: int,
    amp: torch.dtype | None = None,
    *,
    embeddings: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities ``(N, C)`` and, with ``embeddings``, embeddings ``(N, E)`` of checked inputs.

    `inputs` may be a `RowSubset`: each batch is gathered as it is needed.

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
        for start in range(0, n, batch_size):
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


def _checked(model: AuditModel, inputs: np.ndarray, batch_size: int) -> np.ndarray | RowSubset:
    """`check_inputs`, and that the inputs fit the model and the batch size is positive."""
    x = check_inputs(inputs)
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise DataError(
            f"inputs have shape {tuple(x.shape[1:])} per example; "
            f"the model takes {model.input_shape}"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return x


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
    x = _checked(model, inputs, batch_size)
    dev = resolve_device(device)
    model.to(dev)
    probs, emb = forward_all(model, x, dev, batch_size, amp_dtype(amp, dev, convnet=x.ndim == 4))
    assert emb is not None
    return probs, emb


def predict_class_probs(
    model: AuditModel,
    inputs: np.ndarray,
    device: str | torch.device = "auto",
    batch_size: int = 1024,
    *,
    rows: np.ndarray | None = None,
    amp: str = "off",
) -> np.ndarray:
    """Class probabilities ``(M, C)`` of ``inputs`` (or of its `rows`) in eval mode.

    `predict_proba` without the embeddings, and without copying the rows: at a million rows
    of a 256-wide model the embeddings of half of them are 512 MB that a caller wanting only
    the probabilities would allocate and drop.

    Parameters
    ----------
    model, inputs, device, batch_size, amp
        As `predict_proba`.
    rows : array of int, optional
        Row numbers of `inputs` to predict, in the order wanted; all rows when omitted.
    """
    x = _checked(model, inputs, batch_size)
    if rows is not None:
        x = RowSubset(x, rows)
    dev = resolve_device(device)
    model.to(dev)
    amp_type = amp_dtype(amp, dev, convnet=x.ndim == 4)
    probs, _ = forward_all(model, x, dev, batch_size, amp_type, embeddings=False)
    return probs
