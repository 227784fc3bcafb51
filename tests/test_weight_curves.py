"""Tests of dm_audit.weight_curves: closed forms, types and dtypes, identities, parameter checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dm_audit.errors import ConfigError
from dm_audit.weight_curves import (
    weight_beta,
    weight_cce,
    weight_dm,
    weight_exponential,
    weight_gce,
    weight_imae,
    weight_mae,
    weight_mse,
    weight_normal,
)

P = np.array([0.0, 0.1, 0.25, 1 / 3, 0.5, 0.9, 1.0])

# (function, parameters, closed form in p) for every weighting function.
CLOSED_FORMS = [
    (weight_cce, {}, lambda p: 2 * (1 - p)),
    (weight_mae, {}, lambda p: 2 * p * (1 - p)),
    (weight_mse, {}, lambda p: 4 * p * (1 - p) ** 2),
    (weight_gce, {"q": 0.7}, lambda p: 2 * p**0.7 * (1 - p)),
    (weight_dm, {"lam": 0.5, "beta": 8.0}, lambda p: np.exp(8 * np.sqrt(p) * (1 - p))),
    (weight_normal, {"psi": 0.3, "beta": 6.0}, lambda p: np.exp(-6 * p * (p - 0.6))),
    (weight_exponential, {"beta": -2.0}, lambda p: np.exp(-2 * (1 - p))),
    (weight_beta, {"alpha": 3.0, "eta": 2.5}, lambda p: p**2 * (1 - p) ** 1.5),
    (weight_imae, {"T": 8.0}, lambda p: np.exp(8 * p * (1 - p))),
]


@pytest.mark.parametrize(("fn", "params", "expected"), CLOSED_FORMS)
def test_weight_matches_closed_form_for_numpy_and_torch(fn, params, expected):
    np.testing.assert_allclose(fn(P, **params), expected(P), rtol=1e-12, atol=1e-15)
    out = fn(torch.tensor(P, dtype=torch.float64), **params)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected(P), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("fn", "params", "expected"), CLOSED_FORMS)
def test_weight_keeps_type_shape_and_dtype(fn, params, expected):
    grid = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    out = fn(grid, **params)
    assert isinstance(out, np.ndarray) and out.shape == (3, 4) and out.dtype == np.float32
    out_t = fn(torch.from_numpy(grid), **params)
    assert out_t.shape == (3, 4) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.numpy(), out, rtol=1e-6)
    # Integer input is promoted to floating point rather than truncated.
    assert fn(np.array([0, 1]), **params).dtype == np.float64
    assert fn(torch.tensor([0, 1]), **params).is_floating_point()


def test_probabilities_are_clipped_to_unit_interval():
    # 1 + 1e-7 from rounding must not give a negative CCE weight or a NaN power.
    assert weight_cce(np.array([1.0 + 1e-7]))[0] == 0.0
    assert weight_cce(np.array([-1e-7]))[0] == 2.0
    assert np.isfinite(weight_gce(np.array([-1e-9]), q=0.5)).all()


def test_family_identities():
    p = np.linspace(0, 1, 101)
    # DM with lam = 0 is the exponential variant; with lam = 1 it is IMAE with T = beta.
    np.testing.assert_allclose(weight_dm(p, 0.0, 3.0), weight_exponential(p, 3.0))
    np.testing.assert_allclose(weight_dm(p, 1.0, 8.0), weight_imae(p, 8.0))
    # IMAE is the normal variant with mode 0.5.
    np.testing.assert_allclose(weight_imae(p, 5.0), weight_normal(p, 0.5, 5.0))
    # The beta variant covers the common losses up to constants (DM Eq. 11).
    np.testing.assert_allclose(weight_beta(p, 1, 2), weight_cce(p) / 2)
    np.testing.assert_allclose(weight_beta(p, 2, 2), weight_mae(p) / 2)
    np.testing.assert_allclose(weight_beta(p, 2, 3), weight_mse(p) / 4)
    np.testing.assert_allclose(weight_beta(p, 1.4, 2), weight_gce(p, 0.4) / 2)
    # GCE interpolates between CCE (q = 0) and MAE (q = 1); beta = 0 weighs all equally.
    np.testing.assert_allclose(weight_gce(p, 0.0), weight_cce(p))
    np.testing.assert_allclose(weight_gce(p, 1.0), weight_mae(p))
    np.testing.assert_allclose(weight_dm(p, 2.0, 0.0), np.ones_like(p))


@pytest.mark.parametrize(
    ("fn", "params", "message"),
    [
        (weight_gce, {"q": 1.5}, "'q'"),
        (weight_dm, {"lam": -0.1, "beta": 1.0}, "'lam'"),
        (weight_dm, {"lam": 1.0, "beta": float("nan")}, "'beta'"),
        (weight_normal, {"psi": 2.0, "beta": 1.0}, "'psi'"),
        (weight_beta, {"alpha": 0.5, "eta": 2.0}, "'alpha'"),
        (weight_beta, {"alpha": 2.0, "eta": 0.0}, "'eta'"),
        (weight_imae, {"T": -1.0}, "'T'"),
        (weight_exponential, {"beta": "big"}, "'beta'"),
    ],
)
def test_invalid_parameters_raise_config_error(fn, params, message):
    with pytest.raises(ConfigError, match=message):
        fn(P, **params)
