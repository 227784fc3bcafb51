"""Tests of dm_audit.proselflc: trust schedule, corrected target and gradient, DM weighting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from loss_batches import F64, grad_of, make_batch

from dm_audit.dm_loss import DMLoss
from dm_audit.emphasis import create_weighting
from dm_audit.errors import ConfigError
from dm_audit.losses import create_loss
from dm_audit.proselflc import ProSelfLCLoss


def test_proselflc_global_trust_schedule():
    loss_fn = ProSelfLCLoss(total_iterations=1000, B=12, r=0.5)
    assert loss_fn.g() == pytest.approx(1 / (1 + math.exp(6)))  # t = 0, no warm-up needed
    loss_fn.set_progress(500, 1000)
    assert loss_fn.g() == pytest.approx(0.5)
    values = []
    for t in range(0, 1001, 100):
        loss_fn.set_progress(t, 1000)
        values.append(loss_fn.g())
    assert np.all(np.diff(values) > 0) and 0 < values[0] < values[-1] < 1
    assert values[-1] == pytest.approx(1 / (1 + math.exp(-6)))
    # set_progress also sets Γ; r moves the midpoint; huge B does not overflow.
    late = ProSelfLCLoss(r=0.25, B=1e4)
    late.set_progress(25, 100)
    assert late.g() == pytest.approx(0.5)
    late.set_progress(0, 100)
    assert late.g() == 0.0


@pytest.mark.parametrize("trust", ["entropy", "max"])
@pytest.mark.parametrize("temperature", [0.3, 0.5, 1.0])
def test_proselflc_target_and_gradient(trust, temperature):
    logits, labels = make_batch(32, 6, seed=12, extremes=True)
    loss_fn = ProSelfLCLoss(100, B=10, trust=trust, temperature=temperature, reduction="sum")
    loss_fn.set_progress(70, 100)
    grad, out = grad_of(loss_fn, logits, labels)
    p = torch.softmax(logits, 1)
    p_t = torch.softmax(logits / temperature, 1)
    if trust == "entropy":
        l_expected = 1 + (p_t * torch.log(p_t.clamp_min(1e-300))).sum(1) / math.log(6)
    else:
        l_expected = p_t.max(1).values
    g = 1 / (1 + math.exp(-10 * (0.7 - 0.5)))
    assert float(out.extras["g"]) == pytest.approx(g)
    torch.testing.assert_close(out.extras["l"], l_expected)
    eps = out.extras["epsilon"]
    torch.testing.assert_close(eps, g * l_expected)
    assert ((eps >= 0) & (eps <= 1)).all()
    target = out.extras["target"]
    assert not target.requires_grad
    torch.testing.assert_close(
        target, (1 - eps[:, None]) * F.one_hot(labels, 6) + eps[:, None] * p_t
    )
    torch.testing.assert_close(target.sum(1), torch.ones(32, dtype=F64))
    # log p in the loss is at temperature 1 and the target is constant: gradient p - q̃.
    torch.testing.assert_close(grad, p - target)
    torch.testing.assert_close(out.weights, (p - target).abs().sum(1))


def test_proselflc_low_temperature_lowers_target_entropy():
    # A moderately confident model (logit scale 3, 10 classes), late in training.
    gen = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(256, 10, generator=gen, dtype=F64)

    def entropy(q):
        return -(q * torch.log(q.clamp_min(1e-300))).sum(1)

    # The annealed self knowledge p_T is sharper than p for every example.
    for temperature in (0.5, 0.2):
        sharper = entropy(torch.softmax(logits / temperature, 1))
        assert (sharper < entropy(torch.softmax(logits, 1))).all()
    # Labels that agree with the prediction (clean) and that contradict it (noisy).
    for labels in (logits.argmax(1), (logits.argmax(1) + 1) % 10):
        means = []
        for temperature in (1.0, 0.5, 0.2):
            loss_fn = ProSelfLCLoss(100, temperature=temperature)
            loss_fn.set_progress(100, 100)
            means.append(float(entropy(loss_fn(logits, labels).extras["target"]).mean()))
        assert means[0] > means[1] > means[2]
        assert means[2] < 0.5 * means[0]


def test_proselflc_low_temperature_trusts_a_flat_prediction_more():
    # Near-uniform predictions: T < 1 raises l(p_T), hence epsilon, so the target moves further
    # from the given label (the caveat documented on ProSelfLCLoss).
    logits = 0.1 * torch.randn(8, 10, generator=torch.Generator().manual_seed(1), dtype=F64)
    labels = torch.zeros(8, dtype=torch.long)
    eps = {}
    for temperature in (1.0, 0.5):
        loss_fn = ProSelfLCLoss(100, temperature=temperature)
        loss_fn.set_progress(100, 100)
        eps[temperature] = loss_fn(logits, labels).extras["epsilon"]
    assert (eps[0.5] > eps[1.0]).all()


def test_proselflc_corrects_a_confidently_contradicted_label():
    logits = torch.tensor([[8.0, 0.0, 0.0], [0.0, 8.0, 0.0]], dtype=F64)
    labels = torch.tensor([1, 1])  # row 0 is labelled 1 but predicted 0 with confidence
    loss_fn = ProSelfLCLoss(100, temperature=0.5)
    loss_fn.set_progress(100, 100)
    target = loss_fn(logits, labels).extras["target"]
    assert target.argmax(1).tolist() == [0, 1]
    loss_fn.set_progress(0, 100)  # early on the given label still rules
    assert loss_fn(logits, labels).extras["target"].argmax(1).tolist() == [1, 1]


def test_proselflc_with_dm_weighting_rescales_magnitude_keeps_direction():
    logits, labels = make_batch(40, 5, seed=13, extremes=False)
    weighting = create_weighting("dm", lam=1.0, beta=8.0)
    loss_fn = ProSelfLCLoss(100, B=10, weighting=weighting)
    loss_fn.set_progress(80, 100)
    grad, out = grad_of(loss_fn, logits, labels)
    p = torch.softmax(logits, 1)
    target = out.extras["target"]
    p_target = (target * p).sum(1)
    torch.testing.assert_close(out.extras["p_target"], p_target)
    torch.testing.assert_close(out.weights, weighting(p_target))
    w_hat = out.weights / out.weights.sum()
    torch.testing.assert_close(grad.abs().sum(1), w_hat, rtol=1e-6, atol=0)
    cosine = F.cosine_similarity(grad, p - target, dim=1)
    torch.testing.assert_close(cosine, torch.ones(40, dtype=F64))
    # The factory's dm_lam / dm_beta build the same loss.
    same = create_loss("proselflc", total_iterations=100, B=10, dm_lam=1.0, dm_beta=8.0)
    same.set_progress(80, 100)
    torch.testing.assert_close(grad_of(same, logits, labels)[0], grad)


def test_proselflc_with_dm_starts_as_dm():
    # With g(0) ≈ 4e-44 the target is the given label and the combination is DM.
    logits, labels = make_batch(32, 4, seed=14)
    weighting = create_weighting("dm", lam=0.5, beta=12.0)
    combined, _ = grad_of(ProSelfLCLoss(100, B=200, weighting=weighting), logits, labels)
    dm, _ = grad_of(DMLoss(weighting), logits, labels)
    torch.testing.assert_close(combined, dm, rtol=1e-6, atol=1e-14)


def test_proselflc_with_dm_ramp():
    loss_fn = ProSelfLCLoss(weighting=create_weighting("dm", lam=2.0, beta=16.0), ramp=0.2)
    assert loss_fn.emphasis_scale == 0.0
    loss_fn.set_progress(10, 100)
    assert loss_fn.emphasis_scale == pytest.approx(0.5)
    assert loss_fn.iteration == 10 and loss_fn.total_iterations == 100


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trust": "confidence"}, "trust must be one of"),
        ({"temperature": 0.0}, "temperature"),
        ({"B": -1.0}, "B must be"),
        ({"r": 1.5}, "r must lie"),
        ({"total_iterations": 0}, "total_iterations"),
        ({"normalization": "none"}, "only with a weighting"),
        ({"weighting": create_weighting("dm"), "reduction": "sum"}, "use normalization"),
        ({"weighting": "dm"}, "must be a Weighting"),
    ],
)
def test_proselflc_rejects_bad_options(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ProSelfLCLoss(**kwargs)
