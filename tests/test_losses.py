"""Tests of dm_audit.losses and its families: DM and baseline gradients, numerics, the factory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from loss_batches import F64, explicit_dm_grad, grad_of, make_batch

import dm_audit.losses as losses_module
from dm_audit import baseline_losses, dm_loss, loss_base, proselflc
from dm_audit.emphasis import create_weighting, edf
from dm_audit.errors import ConfigError, DataError
from dm_audit.losses import (
    LOSS_NAMES,
    BootHardLoss,
    BootSoftLoss,
    CCELoss,
    ConfidencePenaltyLoss,
    DMLoss,
    GCELoss,
    IMAELoss,
    LabelLoss,
    LabelSmoothingLoss,
    MAELoss,
    MSELoss,
    ProSelfLCLoss,
    create_loss,
)

# --------------------------------------------------------------------------- DM gradient


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("beta", [-2.0, 0.0, 4.0, 12.0, 24.0])
@pytest.mark.parametrize(("batch", "classes"), [(1, 2), (7, 3), (64, 10), (16, 100)])
def test_dm_autograd_gradient_equals_explicit_formula(lam, beta, batch, classes):
    logits, labels = make_batch(batch, classes, seed=batch * classes)
    weighting = create_weighting("dm", lam=lam, beta=beta)
    grad, out = grad_of(DMLoss(weighting), logits, labels)
    expected = explicit_dm_grad(logits, labels, weighting)
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-14)
    p_i = torch.softmax(logits, 1)[torch.arange(batch), labels]
    torch.testing.assert_close(out.p_given, p_i, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(out.weights, weighting(p_i))
    torch.testing.assert_close(out.extras["normalised_weights"].sum(), torch.tensor(1.0, dtype=F64))


@pytest.mark.parametrize("variant", ["normal", "exponential", "beta", "imae", "gce-dn", "mse"])
def test_dm_gradient_equals_explicit_formula_for_other_variants(variant):
    params = {"normal": {"psi": 0.3, "beta": 5.0}, "exponential": {"beta": 3.0}}
    params |= {"beta": {"alpha": 2.0, "eta": 3.0}, "imae": {"T": 8.0}, "gce-dn": {"q": 0.4}}
    weighting = create_weighting(variant, **params.get(variant, {}))
    logits, labels = make_batch(32, 5, seed=3)
    grad, _ = grad_of(DMLoss(weighting), logits, labels)
    torch.testing.assert_close(
        grad, explicit_dm_grad(logits, labels, weighting), rtol=1e-8, atol=1e-14
    )


@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("beta", [2.0, 16.0])
def test_dm_gradient_l1_norm_is_the_weight_before_normalisation(lam, beta):
    logits, labels = make_batch(40, 6, seed=11)
    weighting = create_weighting("dm", lam=lam, beta=beta)
    grad, out = grad_of(DMLoss(weighting, "none"), logits, labels)
    one_minus = 1 - out.p_given
    expected = out.weights * 2 * one_minus / (2 * one_minus + 1e-8)  # = w_i up to eps
    torch.testing.assert_close(grad.abs().sum(1), expected, rtol=1e-9, atol=1e-15)
    far = one_minus > 1e-3
    torch.testing.assert_close(grad.abs().sum(1)[far], out.weights[far], rtol=1e-5, atol=0)
    # The direction is CCE's: the gradient is a positive multiple of p - onehot.
    direction = torch.softmax(logits, 1) - F.one_hot(labels, 6)
    cosine = F.cosine_similarity(grad, direction, dim=1)
    torch.testing.assert_close(cosine[far], torch.ones_like(cosine[far]))


def test_dm_normalizations():
    logits, labels = make_batch(50, 4, seed=5, extremes=False)
    weighting = create_weighting("dm", lam=1.0, beta=8.0)
    norms = {}
    for normalization in ("batch_sum", "batch_mean", "integral", "none"):
        grad, out = grad_of(DMLoss(weighting, normalization), logits, labels)
        norms[normalization] = grad.abs().sum(1)
    w = weighting(out.p_given)
    torch.testing.assert_close(norms["none"], w, rtol=1e-6, atol=0)
    torch.testing.assert_close(norms["batch_sum"], w / w.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(
        norms["batch_sum"].sum(), torch.tensor(1.0, dtype=F64), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(norms["batch_mean"], w / w.mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(norms["integral"], edf(weighting)(out.p_given), rtol=1e-6, atol=0)


def test_dm_float32_gradient_stays_bounded_near_p_one():
    # 1 - p_i from 1e-5 down to below float32's resolution at 1 and to exact zero.
    weighting = create_weighting("dm", lam=0.0, beta=2.0)
    gaps = torch.tensor([1e-5, 1e-7, 1e-9, 1e-20, 1e-40])
    logits = torch.zeros(len(gaps), 3)
    logits[:, 0] = torch.log((1 - gaps) * 2 / gaps).float()
    logits[-1, 0] = 1e4
    labels = torch.zeros(len(gaps), dtype=torch.long)
    grad, out = grad_of(DMLoss(weighting, "none"), logits, labels)
    assert torch.isfinite(grad).all() and torch.isfinite(out.loss)
    l1 = grad.abs().sum(1)
    assert (l1 <= out.weights * 1.1).all()
    # Where 1 - p_i >> eps the magnitude is right even in float32.
    torch.testing.assert_close(l1[0], out.weights[0], rtol=1e-3, atol=0)
    # The surrogate's value stays below w_i / 2 per example.
    assert out.loss <= out.weights.sum() / 2 + 1e-6


def test_dm_emphasis_ramp():
    weighting = create_weighting("dm", lam=2.0, beta=12.0)
    loss_fn = DMLoss(weighting, ramp=0.5)
    logits, labels = make_batch(20, 4, seed=2, extremes=False)
    assert loss_fn.emphasis_scale == 0.0
    # Start of training: emphasis parameters at 0, every example weighs the same.
    _, out = grad_of(loss_fn, logits, labels)
    torch.testing.assert_close(out.weights, torch.ones(20, dtype=F64))
    loss_fn.set_progress(25, 100)
    assert loss_fn.emphasis_scale == 0.5
    _, out = grad_of(loss_fn, logits, labels)
    torch.testing.assert_close(out.weights, create_weighting("dm", lam=1.0, beta=6.0)(out.p_given))
    grad, out = grad_of(loss_fn, logits, labels)
    torch.testing.assert_close(
        grad, explicit_dm_grad(logits, labels, create_weighting("dm", lam=1.0, beta=6.0))
    )
    for iteration in (50, 80, 500):
        loss_fn.set_progress(iteration, 100)
        assert loss_fn.emphasis_scale == 1.0
        assert loss_fn.current_weighting is weighting
    # Without a ramp, progress leaves a manually set scale alone.
    fixed = DMLoss(weighting)
    fixed.emphasis_scale = 0.25
    fixed.set_progress(90, 100)
    assert fixed.emphasis_scale == 0.25
    assert fixed.current_weighting == create_weighting("dm", lam=0.5, beta=3.0)
    with pytest.raises(ConfigError, match="emphasis_scale"):
        fixed.emphasis_scale = 2.0
    with pytest.raises(ConfigError, match="ramp needs"):
        DMLoss(create_weighting("cce-dn"), ramp=0.1)
    with pytest.raises(ConfigError, match="total_iterations"):
        loss_fn.set_progress(1, 0)
    with pytest.raises(ConfigError, match="iteration"):
        loss_fn.set_progress(-1, 10)


def test_imae_is_dm_with_the_imae_curve():
    logits, labels = make_batch(30, 5, seed=8)
    g_imae, out = grad_of(IMAELoss(T=8.0), logits, labels)
    g_dm, _ = grad_of(DMLoss(create_weighting("dm", lam=1.0, beta=8.0)), logits, labels)
    torch.testing.assert_close(g_imae, g_dm)
    torch.testing.assert_close(out.weights, torch.exp(8 * out.p_given * (1 - out.p_given)))


# --------------------------------------------------------------------------- common losses


COMMON = [
    (CCELoss(reduction="sum"), lambda p: 2 * (1 - p), lambda p: 0 * p + 1),
    (MAELoss(reduction="sum"), lambda p: 2 * p * (1 - p), lambda p: p),
    (MSELoss(reduction="sum"), lambda p: 4 * p * (1 - p) ** 2, lambda p: 2 * p * (1 - p)),
    (GCELoss(0.7, reduction="sum"), lambda p: 2 * p**0.7 * (1 - p), lambda p: p**0.7),
    (GCELoss(0.2, reduction="none"), lambda p: 2 * p**0.2 * (1 - p), lambda p: p**0.2),
]


@pytest.mark.parametrize(("loss_fn", "weight", "factor"), COMMON)
def test_common_loss_gradient_l1_norm_is_its_table_weight(loss_fn, weight, factor):
    logits, labels = make_batch(48, 7, seed=1)
    grad, out = grad_of(loss_fn, logits, labels)
    p_i = torch.softmax(logits, 1)[torch.arange(48), labels]
    torch.testing.assert_close(grad.abs().sum(1), weight(p_i), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(out.weights, weight(p_i), rtol=1e-9, atol=1e-15)
    # dL/dz = factor(p_i) · (p - onehot): same direction as CCE (DM Eq. 5).
    cce_grad = torch.softmax(logits, 1) - F.one_hot(labels, 7)
    torch.testing.assert_close(grad, factor(p_i)[:, None] * cce_grad, rtol=1e-9, atol=1e-15)


def test_common_loss_values_and_reductions():
    logits, labels = make_batch(10, 3, seed=4, extremes=False)
    p_i = torch.softmax(logits, 1)[torch.arange(10), labels]
    expected = {
        "cce": -torch.log(p_i),
        "mae": 1 - p_i,
        "mse": (1 - p_i) ** 2,
        "gce": (1 - p_i**0.7) / 0.7,
    }
    for name, values in expected.items():
        per_example = create_loss(name, reduction="none")(logits, labels).loss
        torch.testing.assert_close(per_example, values)
        torch.testing.assert_close(create_loss(name)(logits, labels).loss, values.mean())
        torch.testing.assert_close(
            create_loss(name, reduction="sum")(logits, labels).loss, values.sum()
        )


@pytest.mark.parametrize(
    ("name", "weight"),
    [
        ("cce-dn", lambda p: 2 * (1 - p)),
        ("mae-dn", lambda p: 2 * p * (1 - p)),
        ("mse-dn", lambda p: 4 * p * (1 - p) ** 2),
        ("gce-dn", lambda p: 2 * p**0.7 * (1 - p)),
    ],
)
def test_dn_losses_rescale_by_the_normalised_curve(name, weight):
    logits, labels = make_batch(24, 5, seed=6, extremes=False)
    p_i = torch.softmax(logits, 1)[torch.arange(24), labels]
    grad, out = grad_of(create_loss(name), logits, labels)
    w = weight(p_i)
    torch.testing.assert_close(grad.abs().sum(1), w / w.sum(), rtol=1e-6, atol=0)
    # Without batch normalisation the weight is the EDF value w / ∫w.
    integral = {"cce-dn": 1.0, "mae-dn": 1 / 3, "mse-dn": 1 / 3, "gce-dn": 2 * (1 / 1.7 - 1 / 2.7)}
    grad, out = grad_of(create_loss(name, normalization="none"), logits, labels)
    torch.testing.assert_close(out.weights, w / integral[name])
    torch.testing.assert_close(grad.abs().sum(1), w / integral[name], rtol=1e-6, atol=0)


def test_probability_loss_option_conflicts():
    with pytest.raises(ConfigError, match="normalization applies only with dn=True"):
        CCELoss(normalization="none")
    with pytest.raises(ConfigError, match="reduction applies to the plain loss"):
        MAELoss(dn=True, reduction="sum")
    with pytest.raises(ConfigError, match="q must lie in"):
        GCELoss(q=0.0)
    with pytest.raises(ConfigError, match="reduction must be one of"):
        CCELoss(reduction="avg")
    with pytest.raises(ConfigError, match="normalization must be one of"):
        DMLoss(create_weighting("dm"), "batch")


# --------------------------------------------------------------------------- target modification


def test_label_smoothing_and_bootstrapping_gradients():
    logits, labels = make_batch(12, 4, seed=9, extremes=False)
    p = torch.softmax(logits, 1)
    onehot = F.one_hot(labels, 4).to(F64)
    predicted = F.one_hot(p.argmax(1), 4).to(F64)
    cases = [
        (LabelSmoothingLoss(0.2, reduction="sum"), 0.8 * onehot + 0.05),
        (BootSoftLoss(0.3, reduction="sum"), 0.7 * onehot + 0.3 * p),
        (BootHardLoss(0.4, reduction="sum"), 0.6 * onehot + 0.4 * predicted),
    ]
    for loss_fn, target in cases:
        grad, out = grad_of(loss_fn, logits, labels)
        torch.testing.assert_close(out.extras["target"], target)
        torch.testing.assert_close(out.extras["target"].sum(1), torch.ones(12, dtype=F64))
        # The target is a constant: the gradient of H(q̃, p) is p - q̃.
        torch.testing.assert_close(grad, p - target)
        torch.testing.assert_close(out.weights, (p - target).abs().sum(1))
        torch.testing.assert_close(out.loss, -(target * torch.log(p)).sum())


def test_confidence_penalty_gradient():
    logits, labels = make_batch(12, 4, seed=10, extremes=False)
    p = torch.softmax(logits, 1)
    log_p = torch.log(p)
    entropy = -(p * log_p).sum(1)
    grad, out = grad_of(ConfidencePenaltyLoss(0.3, reduction="sum"), logits, labels)
    expected = 0.7 * (p - F.one_hot(labels, 4)) + 0.3 * p * (log_p + entropy[:, None])
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(out.weights, expected.abs().sum(1))
    torch.testing.assert_close(out.extras["entropy"], entropy)
    torch.testing.assert_close(
        out.loss, (0.7 * -log_p[torch.arange(12), labels] - 0.3 * entropy).sum()
    )


# --------------------------------------------------------------------------- numerics


def every_loss() -> list[tuple[str, LabelLoss]]:
    losses = [(name, create_loss(name)) for name in LOSS_NAMES]
    losses += [
        ("proselflc+dm", create_loss("proselflc", dm_lam=1.0, dm_beta=16.0)),
        ("proselflc-max", create_loss("proselflc", trust="max", temperature=0.2)),
        ("dm-normal", create_loss("dm", variant="normal", psi=0.3, beta=20.0)),
        ("dm-none", create_loss("dm", lam=2.0, beta=24.0, normalization="none")),
        ("dm-integral", create_loss("dm", lam=0.0, beta=-8.0, normalization="integral")),
        ("dm-mean", create_loss("dm", lam=0.5, beta=12.0, normalization="batch_mean")),
        ("mae-dn-none", create_loss("mae-dn", normalization="none")),
    ]
    for _, loss_fn in losses:
        loss_fn.set_progress(60, 100)  # ProSelfLC's correction is active
    return losses


def extreme_batch(dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (16, 5), generator=gen) * 2 - 1
    logits = 1e4 * signs.to(F64)
    labels = torch.randint(0, 5, (16,), generator=gen)
    logits[0] = -1e4
    logits[0, labels[0]] = 1e4  # p_i = 1 exactly
    logits[1] = 1e4
    logits[1, labels[1]] = -1e4  # p_i = 0 exactly
    logits[2] = 0.0  # uniform
    logits[3] = 1e4  # a tie among all classes
    return logits.to(dtype), labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_every_loss_is_finite_for_extreme_logits(dtype):
    logits, labels = extreme_batch(dtype)
    for name, loss_fn in every_loss():
        grad, out = grad_of(loss_fn, logits, labels)
        assert grad.dtype == dtype, name
        assert torch.isfinite(out.loss).all(), name
        assert torch.isfinite(grad.float()).all(), name
        assert torch.isfinite(out.weights).all() and (out.weights >= 0).all(), name
        assert ((out.p_given >= 0) & (out.p_given <= 1)).all(), name
        assert not out.p_given.requires_grad and not out.weights.requires_grad, name
        for key, value in out.extras.items():
            assert torch.isfinite(value).all() and not value.requires_grad, (name, key)


def test_every_loss_is_finite_when_all_p_are_zero_or_one():
    # MAE-DN weights are all zero here: the batch normalisation must not divide 0 by 0.
    labels = torch.tensor([0, 1, 2, 0])
    logits = torch.full((4, 3), -1e4)
    logits[torch.arange(4), torch.tensor([0, 1, 0, 1])] = 1e4  # p_i = 1, 1, 0, 0
    for name, loss_fn in every_loss():
        grad, out = grad_of(loss_fn, logits, labels)
        assert torch.isfinite(out.loss).all() and torch.isfinite(grad).all(), name
        assert out.p_given.tolist() == [1.0, 1.0, 0.0, 0.0], name


def test_single_class_is_finite():
    for name, loss_fn in every_loss():
        grad, out = grad_of(loss_fn, torch.randn(3, 1), torch.zeros(3, dtype=torch.long))
        assert torch.isfinite(out.loss).all() and (grad == 0).all(), name


# --------------------------------------------------------------------------- validation and factory


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), "shape \\(B, C\\)"),
        (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), "floating"),
        (torch.zeros(4, 3), torch.zeros(4), "integer tensor"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.bool), "integer tensor"),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), "4 rows but targets have 5"),
        (torch.zeros(3, 3), torch.tensor([0, 3, 1]), "target 3 at row 1 .*0..2"),
        (torch.zeros(3, 3), torch.tensor([0, 1, -1]), "target -1 at row 2"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "empty batch"),
        (np.zeros((2, 3)), np.zeros(2), "torch tensors"),
    ],
)
def test_bad_inputs_raise_data_error(logits, labels, message):
    for name in ("cce", "dm", "proselflc", "cp", "ls"):
        with pytest.raises(DataError, match=message):
            create_loss(name)(logits, labels)


def test_int32_targets_are_accepted():
    logits, labels = make_batch(6, 3, seed=0, extremes=False)
    a = create_loss("dm")(logits, labels).loss
    b = create_loss("dm")(logits, labels.int()).loss
    torch.testing.assert_close(a, b)


def test_create_loss_builds_every_name():
    expected = {
        "cce": CCELoss,
        "mae": MAELoss,
        "mse": MSELoss,
        "gce": GCELoss,
        "gce-dn": GCELoss,
        "imae": IMAELoss,
        "dm": DMLoss,
        "ls": LabelSmoothingLoss,
        "cp": ConfidencePenaltyLoss,
        "boot-soft": BootSoftLoss,
        "boot-hard": BootHardLoss,
        "proselflc": ProSelfLCLoss,
    }
    assert set(expected) <= set(LOSS_NAMES)
    for name, cls in expected.items():
        assert isinstance(create_loss(name), cls), name
    dm = create_loss("dm", lam=1.0, beta=16.0, ramp=0.1)
    assert dm.weighting == create_weighting("dm", lam=1.0, beta=16.0) and dm.ramp == 0.1
    assert create_loss("dm").weighting == create_weighting("dm", lam=0.5, beta=8.0)
    assert create_loss("dm", variant="imae", T=4.0).weighting == create_weighting("imae", T=4.0)
    assert create_loss("gce-dn", q=0.5).dn and not create_loss("gce", q=0.5).dn
    assert create_loss("proselflc", dm_beta=4.0).weighting == create_weighting("dm", beta=4.0)
    assert create_loss("proselflc").weighting is None
    assert "weighting=dm(lam=1, beta=16)" in repr(dm)


def test_losses_exports_every_loss_of_its_family_modules():
    for module in (loss_base, dm_loss, baseline_losses, proselflc):
        for name in module.__all__:
            if name.endswith("Loss") or name in ("LossOutput", "NORMALIZATIONS", "REDUCTIONS"):
                assert name in losses_module.__all__, name
                assert getattr(losses_module, name) is getattr(module, name)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("focal", {}, "unknown loss 'focal'; choose one of: cce, cce-dn"),
        ("cce", {"q": 0.5}, "loss 'cce' got unknown parameter.*q.*accepted: dn, reduction"),
        ("ls", {"epsilon": 0.1}, "unknown parameter.*epsilon.*accepted: eps, reduction"),
        ("dm", {"lamda": 1.0}, "unknown parameter.*lamda.*accepted: lam, beta"),
        ("dm", {"variant": "focal"}, "unknown weighting 'focal'"),
        ("dm", {"lam": -1.0}, "'lam' must be >= 0"),
        ("proselflc", {"dm_lambda": 1.0}, "unknown parameter.*dm_lambda"),
        ("proselflc", {"dm_lam": 1.0, "weighting": create_weighting("dm")}, "either"),
        ("ls", {"eps": 1.5}, "eps must lie in"),
        ("ls", {"eps": "a lot"}, "eps must be a number"),
        ("proselflc", {"temperature": None}, "temperature must be a number"),
    ],
)
def test_create_loss_rejects_bad_configuration(name, params, message):
    with pytest.raises(ConfigError, match=message):
        create_loss(name, **params)


# --------------------------------------------------------------------------- training sanity


@pytest.mark.parametrize(
    "name",
    ["cce", "gce", "imae", "dm", "cce-dn", "proselflc", "proselflc+dm", "ls", "boot-soft"],
)
def test_losses_train_a_linear_model_on_noisy_blobs(name):
    # Three well-separated Gaussian blobs, 30 % of labels flipped to another class. A linear model
    # cannot memorise the flips, so every loss must recover the true classes and give flipped
    # examples a low probability of their (wrong) given label.
    rng = np.random.default_rng(0)
    n, classes = 600, 3
    truth = rng.integers(0, classes, n)
    centres = np.array([[3.0, 0.0], [-1.5, 2.6], [-1.5, -2.6]])
    x = torch.tensor(centres[truth] + rng.normal(size=(n, 2)), dtype=torch.float32)
    noisy = truth.copy()
    flip = rng.choice(n, int(0.3 * n), replace=False)
    noisy[flip] = (truth[flip] + rng.integers(1, classes, flip.size)) % classes
    labels = torch.tensor(noisy)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, classes)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    if name == "proselflc+dm":
        loss_fn = create_loss("proselflc", dm_lam=1.0, dm_beta=8.0)
    else:
        loss_fn = create_loss(name)
    steps = 150
    for step in range(steps):
        loss_fn.set_progress(step, steps)
        out = loss_fn(model(x), labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    out = loss_fn(model(x), labels)
    accuracy = (model(x).argmax(1).numpy() == truth).mean()
    assert accuracy > 0.95, (name, accuracy)
    flipped = np.zeros(n, dtype=bool)
    flipped[flip] = True
    p_given = out.p_given.numpy()
    assert p_given[flipped].mean() < 0.3 < 0.6 < p_given[~flipped].mean(), name
