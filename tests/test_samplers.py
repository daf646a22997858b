"""Samplers: registry and options, the step contract, accuracy against closed forms, clear errors."""

import math

import pytest
import torch
from analytic import ContinuousGaussianScore, Zero

from diffflow_ext import DiffFlow, ops
from diffflow_ext.samplers import (
    SAMPLERS,
    EulerMaruyamaSampler,
    Sampler,
    get_sampler,
    marginal_drift,
    register_sampler,
    sampler_options,
)

V0, G, T = 0.25, 1.0, 1.0


def _gauss_model(num_steps):
    return DiffFlow(Zero(), ContinuousGaussianScore(V0, G), (2,), num_steps=num_steps, t_start=1e-3, t_end=T,
                    time_exponent=1.0, diffusion=G, prior_std=math.sqrt(V0 + G**2 * T), backend="torch")


def _var(x):
    return torch.diagonal(torch.cov(x.T)).mean().item()


TARGET = V0 + G**2 * 1e-3


def test_builtins_are_registered_with_their_options():
    assert {"em", "ode", "heun"} <= set(SAMPLERS)
    assert sampler_options(SAMPLERS["em"]) == ("lam",)
    assert set(sampler_options(SAMPLERS["ode"])) == {"rtol", "atol", "method"}
    s = get_sampler("em", lam=0.5)
    assert isinstance(s, EulerMaruyamaSampler) and s.lam == 0.5 and s.options() == {"lam": 0.5}
    o = get_sampler("ode", rtol=1e-6, atol=1e-6, method="rk4")
    assert (o.rtol, o.atol, o.method) == (1e-6, 1e-6, "rk4")


@pytest.mark.parametrize("name, options, match", [
    ("magic", {}, "method: expected one of"),
    ("em", {"rtol": 1e-3}, "unknown option.*rtol.*valid options: lam"),
    ("em", {"lam": math.inf}, "lam: expected a finite number"),
    ("em", {"lam": math.nan}, "lam"),
    ("em", {"lam": -1.0}, "lam"),
    ("ode", {"method": "magic"}, "method: expected a torchdiffeq solver"),
    ("ode", {"rtol": 0}, "rtol"),
    ("heun", {"lam": 0.0}, "valid options: \\(none\\)"),
])
def test_bad_names_and_options_get_one_clear_error(name, options, match):
    with pytest.raises(ValueError, match=match):
        get_sampler(name, **options)


def test_model_sample_rejects_an_infinite_lambda():
    with pytest.raises(ValueError, match="lam"):
        _gauss_model(5).sample(4, lam=math.inf)


def test_a_user_sampler_is_selectable_and_walks_the_grid_backwards():
    seen = []

    @register_sampler("test-record")
    class Record(Sampler):
        def __init__(self, scale: float = 1.0):
            self.scale = scale

        def step(self, model, x, t_next, t_prev, dt, g_next, generator, noisy):
            seen.append((float(t_next[0]), float(t_prev[0]), float(dt[0]), noisy))
            return x * self.scale

    try:
        model = _gauss_model(4)
        x = model.sample(3, method="test-record", generator=torch.Generator().manual_seed(0))
        grid = model.timestamps.tolist()
        expected = [v for i in range(3, -1, -1) for v in (grid[i + 1], grid[i])]
        assert [v for s in seen for v in s[:2]] == pytest.approx(expected)
        assert [s[2] for s in seen] == pytest.approx([grid[i + 1] - grid[i] for i in range(3, -1, -1)])
        assert [s[3] for s in seen] == [True, True, True, False]  # the last step is the denoising one
        assert x.shape == (3, 2)
        assert get_sampler("test-record", scale=2.0).scale == 2.0
        with pytest.raises(ValueError, match="already registered"):
            register_sampler("test-record")(type("Other", (Sampler,), {}))
        with pytest.raises(TypeError, match="subclass of Sampler"):
            register_sampler("test-bad")(object)
    finally:
        SAMPLERS.pop("test-record", None)


@pytest.mark.parametrize("name, options", [("em", {"lam": 0.0}), ("em", {"lam": 1.0}), ("heun", {}),
                                           ("ode", {})])
def test_every_sampler_reaches_the_data_marginal(name, options):
    """Exact score of a Gaussian case: every sampler ends at N(0, v0 + g^2 t_start) (MC se of var ~0.003)."""
    model = _gauss_model(200 if name == "em" else 20)
    x = model.prior_std * torch.randn(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = get_sampler(name, **options)(model, x, generator=torch.Generator().manual_seed(2), denoise=False)
    assert abs(_var(out) - TARGET) < 0.02 * TARGET + 0.01


def test_heun_is_second_order_where_em_is_first():
    """At 8 steps on the probability-flow ODE, Heun's error in the variance is far below Euler's."""
    model = _gauss_model(8)
    x = model.prior_std * torch.randn(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    var_em = _var(get_sampler("em", lam=0.0)(model, x, denoise=False))
    var_heun = _var(get_sampler("heun")(model, x))
    var_ode = _var(get_sampler("ode", rtol=1e-8, atol=1e-8)(model, x))  # same x: only the discretisation differs
    assert abs(var_heun - var_ode) < 0.2 * abs(var_em - var_ode)


def test_trajectories_have_one_state_per_grid_point():
    model = _gauss_model(6)
    for name in ("em", "heun", "ode"):
        s, traj = model.sample(5, method=name, return_trajectory=True, generator=torch.Generator().manual_seed(0),
                               dtype=torch.float64)
        assert traj.shape == (7, 5, 2)
        assert torch.equal(s, traj[0])


def test_em_lambda_passed_by_the_model_overrides_the_option():
    model = _gauss_model(10)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = get_sampler("em", lam=1.0)(model, x, generator=torch.Generator().manual_seed(1), lam=0.0)
    b = get_sampler("em", lam=0.0)(model, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_a_wrong_lambda_coefficient_would_be_caught():
    """The marginal test's tolerance catches a sampler with the wrong drift coefficient (1+lam)/2 at lam=2."""

    class WrongCoefficient(EulerMaruyamaSampler):
        def step(self, model, x, t_next, t_prev, dt, g_next, generator, noisy):
            f, s = model.drift(x, t_next), model.score(x, t_next)
            wrong = f - 0.5 * (1 + self.lam) * (g_next**2).reshape(-1, 1) * s
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            return ops.em_step(x, -wrong, z, dt, self.lam * g_next)

    model = _gauss_model(200)
    x = model.prior_std * torch.randn(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    right = EulerMaruyamaSampler(2.0)(model, x, generator=torch.Generator().manual_seed(2), denoise=False)
    wrong = WrongCoefficient(2.0)(model, x, generator=torch.Generator().manual_seed(2), denoise=False)
    assert abs(_var(right) - TARGET) < 0.02 * TARGET + 0.01
    assert abs(_var(wrong) - TARGET) > 0.04 * TARGET + 0.01
    assert marginal_drift(torch.ones(1, 2), torch.ones(1, 2), torch.ones(1), 1.0).tolist() == [[0.0, 0.0]]
