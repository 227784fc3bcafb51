"""Seeded batches and gradients for the tests of the losses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dm_audit.losses import LossOutput

F64 = torch.float64


def make_batch(
    batch: int, classes: int, seed: int, *, dtype=F64, extremes: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded logits (B, C) and labels (B,); with ``extremes`` the first rows have
    p_i = 1 - 1e-6, p_i = 1 - 1e-3 and p_i ~ 1e-9 exactly by construction."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(batch, classes, generator=gen, dtype=F64)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    if extremes and classes > 1:
        for row, p in zip(range(batch), (1 - 1e-6, 1 - 1e-3, 1e-9), strict=False):
            logits[row] = 0.0
            # With the other logits at 0: p = e^z / (e^z + C - 1).
            logits[row, labels[row]] = math.log(p * (classes - 1) / (1 - p))
    return logits.to(dtype), labels


def grad_of(loss_fn, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, LossOutput]:
    """Gradient of the (summed) loss w.r.t. the logits, and the loss output."""
    z = logits.detach().clone().requires_grad_()
    out = loss_fn(z, labels)
    (out.loss if out.loss.ndim == 0 else out.loss.sum()).backward()
    return z.grad, out


def explicit_dm_grad(logits, labels, weighting):
    """The authors' explicit DM gradient: (p - y)/(2(1 - p_i) + 1e-8) · w_i/Σw."""
    p = torch.softmax(logits.to(F64), dim=1)
    p_i = p[torch.arange(len(labels)), labels]
    w = weighting(p_i)
    onehot = F.one_hot(labels, logits.shape[1]).to(F64)
    return (p - onehot) / (2 * (1 - p_i) + 1e-8)[:, None] * (w / w.sum())[:, None]
