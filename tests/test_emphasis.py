"""Tests of dm_audit.emphasis: the Weighting registry, EDFs, emphasis mode and variance, plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dm_audit import emphasis, weight_curves
from dm_audit.emphasis import (
    WEIGHTING_NAMES,
    Weighting,
    batch_variance,
    create_weighting,
    curve_variance,
    dm_emphasis_mode,
    edf,
    emphasis_mode,
    integrate_unit,
    plot_weighting_curves,
    weight_dm,
)
from dm_audit.errors import ConfigError, DataError

P = np.array([0.0, 0.1, 0.25, 1 / 3, 0.5, 0.9, 1.0])

# Parameters covering every family, used where a test runs over all curves.
ALL_CURVES = {
    "cce": {},
    "mae": {},
    "mse": {},
    "gce": {"q": 0.05},
    "dm": {"lam": 0.3, "beta": 12.0},
    "normal": {"psi": 0.7, "beta": 20.0},
    "exponential": {"beta": 4.0},
    "beta": {"alpha": 1.5, "eta": 4.0},
    "imae": {"T": 16.0},
}


def reference_integral(f) -> float:
    """Adaptive QUADPACK integral on [0, 1]: an integrator independent of the module's."""
    quad = pytest.importorskip("scipy.integrate").quad
    value, _ = quad(
        lambda x: float(np.asarray(f(np.array([x])))[0]),
        0.0,
        1.0,
        epsabs=1e-12,
        epsrel=1e-12,
        limit=500,
    )
    return value


# --------------------------------------------------------------------------- every curve


def test_emphasis_exports_every_weight_function():
    for name in weight_curves.__all__:
        if name.startswith("weight_"):
            assert name in emphasis.__all__
            assert getattr(emphasis, name) is getattr(weight_curves, name)


def test_weights_are_finite_at_the_endpoints_for_all_curves():
    for name, params in ALL_CURVES.items():
        for w in (create_weighting(name, **params), create_weighting(name + "-dn", **params)):
            values = w(np.array([0.0, 1.0]))
            assert np.isfinite(values).all() and (values >= 0).all(), w


# --------------------------------------------------------------------------- Weighting registry


def test_registry_names_cover_families_and_their_edfs():
    assert set(WEIGHTING_NAMES) == set(ALL_CURVES) | {n + "-dn" for n in ALL_CURVES}


def test_create_weighting_fills_defaults_and_is_callable():
    assert create_weighting("dm").params == {"lam": 0.5, "beta": 8.0}
    assert create_weighting("gce").params == {"q": 0.7}
    assert create_weighting("imae").params == {"T": 8.0}
    w = create_weighting("dm", lam=2, beta=12)
    assert w.params == {"lam": 2.0, "beta": 12.0}
    assert str(w) == "dm(lam=2, beta=12)"
    np.testing.assert_allclose(w(P), weight_dm(P, 2.0, 12.0))
    assert w == Weighting("dm", {"lam": 2.0, "beta": 12.0})
    assert len({w, create_weighting("dm", lam=2.0, beta=12.0)}) == 1


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("focal", {}, "unknown weighting 'focal'"),
        ("dm", {"lamda": 1.0}, "unknown parameter.*lamda.*accepted: lam, beta"),
        ("cce", {"q": 0.5}, "unknown parameter.*accepted: none"),
        ("normal", {"beta": 1.0}, "needs parameter.*psi"),
        ("dm", {"lam": -1.0}, "'lam' must be >= 0"),
        ("exponential", {"beta": 200.0}, "float32-safe range"),
        ("dm-dn", {"lam": 1.0, "beta": 300.0}, "float32-safe range"),
    ],
)
def test_create_weighting_rejects_bad_configuration(name, params, message):
    with pytest.raises(ConfigError, match=message):
        create_weighting(name, **params)


def test_edf_name_and_idempotence():
    w = create_weighting("gce", q=0.3)
    h = edf(w)
    assert h.name == "gce-dn" and h.normalised and not w.normalised and h.base == "gce"
    assert edf(h) is h
    assert h == create_weighting("gce-dn", q=0.3)


# --------------------------------------------------------------------------- integrals and EDFs


def test_integrals_match_closed_forms_to_1e_10():
    q, lam_alpha, eta = 0.05, 1.5, 4.0
    beta_fn = math.gamma(lam_alpha) * math.gamma(eta) / math.gamma(lam_alpha + eta)
    t = 16.0
    closed = {
        "cce": 1.0,
        "mae": 1 / 3,
        "mse": 1 / 3,
        "gce": 2 * (1 / (q + 1) - 1 / (q + 2)),
        "exponential": (math.exp(4.0) - 1) / 4.0,
        "beta": beta_fn,
        "imae": math.exp(t / 4) * math.sqrt(math.pi / t) * math.erf(math.sqrt(t) / 2),
    }
    for name, expected in closed.items():
        w = create_weighting(name, **ALL_CURVES[name])
        assert w.integral() == pytest.approx(expected, rel=1e-10, abs=1e-12), name


@pytest.mark.parametrize("name", list(ALL_CURVES))
def test_every_edf_integrates_to_one(name):
    h = create_weighting(name + "-dn", **ALL_CURVES[name])
    assert integrate_unit(h) == pytest.approx(1.0, abs=1e-10)
    # An independent integrator agrees to 1e-6.
    assert reference_integral(h) == pytest.approx(1.0, abs=1e-6)
    assert h.integral() == 1.0
    # The EDF is the curve divided by its integral.
    w = create_weighting(name, **ALL_CURVES[name])
    np.testing.assert_allclose(h(P), w(P) / w.integral(), rtol=1e-12)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("beta", [-4.0, 2.0, 24.0])
def test_dm_edf_integrates_to_one_on_a_grid(lam, beta):
    h = create_weighting("dm-dn", lam=lam, beta=beta)
    assert reference_integral(h) == pytest.approx(1.0, abs=1e-6)


def test_integrate_unit_rejects_shape_changing_integrands():
    with pytest.raises(ConfigError, match="shape"):
        integrate_unit(lambda p: p[:3])


# --------------------------------------------------------------------------- emphasis mode


@pytest.mark.parametrize(
    ("weighting", "mode"),
    [
        (create_weighting("cce"), 0.0),
        (create_weighting("mae"), 0.5),
        (create_weighting("mse"), 1 / 3),
        (create_weighting("gce", q=0.7), 0.7 / 1.7),
        (create_weighting("gce", q=0.2), 0.2 / 1.2),
        (create_weighting("normal", psi=0.8, beta=5.0), 0.8),
        (create_weighting("beta", alpha=3.0, eta=2.0), 2 / 3),
        (create_weighting("imae", T=8.0), 0.5),
        (create_weighting("exponential", beta=2.0), 0.0),
        (create_weighting("exponential", beta=-2.0), 1.0),
    ],
)
def test_emphasis_modes_of_the_common_curves(weighting, mode):
    assert emphasis_mode(weighting) == pytest.approx(mode, abs=1e-6)
    # Normalisation rescales the curve but keeps its mode.
    assert emphasis_mode(edf(weighting)) == pytest.approx(mode, abs=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("beta", [0.5, 8.0, 20.0])
def test_dm_mode_is_lambda_over_lambda_plus_one(lam, beta):
    assert dm_emphasis_mode(lam) == pytest.approx(lam / (lam + 1))
    assert emphasis_mode(create_weighting("dm", lam=lam, beta=beta)) == pytest.approx(
        lam / (lam + 1), abs=1e-6
    )


def test_emphasis_mode_of_a_flat_curve_is_the_smallest_maximiser():
    assert emphasis_mode(create_weighting("dm", lam=1.0, beta=0.0)) == 0.0
    with pytest.raises(ConfigError, match="lam"):
        dm_emphasis_mode(-1.0)
    with pytest.raises(ConfigError, match="grid_size"):
        emphasis_mode(create_weighting("cce"), grid_size=2)


# --------------------------------------------------------------------------- emphasis variance


@pytest.mark.parametrize(
    ("T", "variance"),
    [(16, 354.113), (8, 4.546), (4, 0.299), (2, 0.040), (1, 0.007), (0.5, 0.002), (0, 0.0)],
)
def test_imae_variance_table(T, variance):
    # IMAE supplement, Table 4.
    assert round(curve_variance(create_weighting("imae", T=T)), 3) == pytest.approx(variance)


def test_mae_and_cce_variances():
    # IMAE's MAE curve is 4p(1-p): 16/30 - (2/3)^2 = 0.0889; ours is half, so a quarter of it.
    assert curve_variance(lambda p: 4 * p * (1 - p)) == pytest.approx(16 / 30 - 4 / 9, abs=1e-12)
    assert round(curve_variance(lambda p: 4 * p * (1 - p)), 2) == 0.09
    assert curve_variance(create_weighting("mae")) == pytest.approx((16 / 30 - 4 / 9) / 4)
    assert curve_variance(create_weighting("cce")) == pytest.approx(1 / 3, abs=1e-12)
    assert round(curve_variance(create_weighting("cce")), 2) == 0.33
    # An EDF's variance is the raw variance over the squared integral.
    w = create_weighting("dm", lam=1.0, beta=8.0)
    assert curve_variance(edf(w)) == pytest.approx(curve_variance(w) / w.integral() ** 2)


def test_batch_variance_matches_population_variance_and_the_curve():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200_000)
    w = create_weighting("imae", T=4.0)
    np.testing.assert_allclose(batch_variance(w(p)), np.var(w(p)))
    # p ~ U[0, 1]: the batch variance estimates the curve variance 0.2985.
    assert batch_variance(w(p)) == pytest.approx(curve_variance(w), rel=0.02)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert batch_variance(weights) == pytest.approx(1.25)
    assert batch_variance(weights.requires_grad_()) == pytest.approx(1.25)
    with pytest.raises(DataError, match="empty"):
        batch_variance(np.array([]))
    with pytest.raises(DataError, match="non-finite"):
        batch_variance(np.array([1.0, np.inf]))


# --------------------------------------------------------------------------- emphasis ramp


def test_scaled_ramps_emphasis_parameters_from_flat():
    w = create_weighting("dm", lam=2.0, beta=12.0)
    assert w.scaled(1.0) is w
    assert w.scaled(0.5).params == {"lam": 1.0, "beta": 6.0}
    np.testing.assert_allclose(w.scaled(0.0)(P), np.ones_like(P))
    b = create_weighting("beta-dn", alpha=3.0, eta=5.0)
    assert b.scaled(0.5) == create_weighting("beta-dn", alpha=2.0, eta=3.0)
    np.testing.assert_allclose(b.scaled(0.0)(P), np.ones_like(P))
    assert create_weighting("gce", q=0.6).scaled(0.5).params == {"q": pytest.approx(0.3)}
    assert not create_weighting("cce").scalable
    with pytest.raises(ConfigError, match="no emphasis parameters"):
        create_weighting("mae").scaled(0.5)
    with pytest.raises(ConfigError, match="scale"):
        w.scaled(1.5)


# --------------------------------------------------------------------------- plot


def test_plot_weighting_curves_writes_a_png(tmp_path):
    curves = {
        "CCE": create_weighting("cce"),
        "MAE": create_weighting("mae"),
        "DM λ=1 β=8": create_weighting("dm", lam=1.0, beta=8.0),
    }
    for normalise in (False, True):
        out = plot_weighting_curves(
            curves, tmp_path / "sub" / f"c{normalise}.png", normalise=normalise
        )
        assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert out.stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["cFalse.png", "cTrue.png"]
    with pytest.raises(ConfigError, match="at least one"):
        plot_weighting_curves({}, tmp_path / "empty.png")
