"""log_prob through the probability-flow ODE: the defaults meet the accuracy their docstring states."""

import math

import numpy as np
import pytest
import torch
from analytic import ContinuousGaussianScore, Zero, gaussian_nll

from diffflow_ext import DiffFlow
from diffflow_ext.likelihood import DEFAULT_ATOL, DEFAULT_RTOL, log_prob

# (v0, g, T, D): the forward marginal of dx = g dw from N(0, v0 I) is N(0, (v0 + g^2 t) I) and its score is exact,
# so p_{t_start} = N(0, (v0 + g^2 t_start) I) in closed form. Cases span flat to sharp data, D = 2..64.
CASES = [(0.5, 1.0, 0.5, 3), (0.01, 0.2, 0.05, 2), (1e-4, 0.2, 0.05, 2), (1e-3, 1.0, 1.0, 16), (0.01, 1.0, 1.0, 64)]


def _model(v0, g, T, D, dtype):
    return DiffFlow(Zero(), ContinuousGaussianScore(v0, g), (D,), num_steps=10, t_start=1e-3, t_end=T,
                    diffusion=g, prior_std=math.sqrt(v0 + g**2 * T), backend="torch").to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_default_tolerances_meet_the_stated_accuracy(case, dtype):
    v0, g, T, D = case
    model = _model(v0, g, T, D, dtype)
    x = torch.randn(16, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * math.sqrt(v0)
    expected = -gaussian_nll(x.numpy(), v0 + g**2 * 1e-3)
    lp = model.log_prob(x.to(dtype), method="exact").double().numpy()
    bound = (1e-5 + 1e-6 * np.abs(expected)) if dtype == torch.float64 else (3e-5 + 2e-6 * np.abs(expected))
    err = np.abs(lp - expected)
    assert (err < bound).all(), (err.max(), bound.min())


def test_the_old_defaults_missed_that_accuracy():
    """The bound above is tight enough to catch the former rtol = atol = 1e-5 (issue 10)."""
    v0, g, T, D = 0.01, 1.0, 1.0, 64
    model = _model(v0, g, T, D, torch.float64)
    x = torch.randn(16, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * math.sqrt(v0)
    expected = -gaussian_nll(x.numpy(), v0 + g**2 * 1e-3)
    lp = log_prob(model, x, method="exact", rtol=1e-5, atol=1e-5).numpy()
    assert np.abs(lp - expected).max() > 1e-5 + 1e-6 * np.abs(expected).max()
    assert DEFAULT_RTOL <= 1e-7 and DEFAULT_ATOL <= 1e-7


def test_tighter_tolerances_are_more_accurate_in_float64():
    v0, g, T, D = 1e-3, 1.0, 1.0, 16
    model = _model(v0, g, T, D, torch.float64)
    x = torch.randn(8, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * math.sqrt(v0)
    expected = -gaussian_nll(x.numpy(), v0 + g**2 * 1e-3)
    err_default = np.abs(log_prob(model, x).numpy() - expected).max()
    err_tight = np.abs(log_prob(model, x, rtol=1e-9, atol=1e-9).numpy() - expected).max()
    assert err_tight < err_default
    assert err_tight < 1e-6


@pytest.mark.parametrize("kwargs, match", [
    ({"rtol": 0.0}, "rtol"), ({"atol": float("nan")}, "atol"), ({"solver": "magic"}, "solver"),
    ({"method": "magic"}, "method"), ({"num_probes": 0}, "num_probes"), ({"probe": "x"}, "probe"),
])
def test_bad_options_are_named(kwargs, match):
    model = _model(0.5, 1.0, 0.5, 2, torch.float64)
    with pytest.raises(ValueError, match=match):
        log_prob(model, torch.zeros(2, 2, dtype=torch.float64), **kwargs)


def test_output_dtype_follows_the_input():
    model = _model(0.5, 1.0, 0.5, 2, torch.float32)
    assert model.log_prob(torch.zeros(3, 2)).dtype == torch.float32
