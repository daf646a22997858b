"""The DiffFlow model: gradients, bounds, theorems and samplers against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from analytic import (
    ContinuousGaussianScore,
    GridLinear,
    Zero,
    backward_marginal_var,
    expected_nelbo,
    gaussian_nll,
    reversal_coefficients,
)
from torch import nn

from diffflow_ext import DiffFlow, TimeMLP
from diffflow_ext.schedules import ProgressiveSteps, polynomial_grid


def _random_mlp_model(dim=3, num_steps=6, **kw):
    torch.manual_seed(0)
    kw.setdefault("diffusion", [0.2, 0.35, 0.25, 0.4, 0.15, 0.3, 0.22][: num_steps + 1])
    m = DiffFlow.mlp(dim, hidden=16, depth=2, num_steps=num_steps, **kw).double()
    for p in m.parameters():  # non-trivial networks (the default output layer starts at zero)
        nn.init.normal_(p, std=0.4)
    return m


def _grads(model, x0, seed, mode):
    model.gradient = mode
    model.zero_grad()
    x = x0.clone().requires_grad_(True)
    loss = model.loss(x, torch.Generator().manual_seed(seed))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], x.grad.clone()


@pytest.mark.parametrize("grid,diffusion", [
    ("fixed", None),
    ("flexible", None),
    ("flexible", lambda t: 0.1 + 3.0 * t),  # g as a callable of (per-sample) time
])
def test_adjoint_equals_autograd_float64(grid, diffusion):
    kw = {"grid": grid, "backend": "torch"}
    if diffusion is not None:
        kw["diffusion"] = diffusion
    model = _random_mlp_model(num_steps=6, **kw)
    x0 = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    la, ga, xa = _grads(model, x0, 7, "adjoint")
    lb, gb, xb = _grads(model, x0, 7, "autograd")
    assert torch.equal(la, lb) or abs(la - lb) <= 1e-12 * abs(lb)
    for a, b in zip(ga, gb):
        assert b.abs().sum() > 0
        assert (a - b).norm() <= 1e-9 * b.norm()
    assert (xa - xb).norm() <= 1e-9 * xb.norm()


def test_adjoint_equals_autograd_default_backend_and_shared_parameters():
    # drift and score share a trunk: shared parameters must get the sum of both gradients once
    torch.manual_seed(1)
    trunk = nn.Linear(4, 4).double()

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk, self.t = trunk, nn.Linear(1, 4).double()

        def forward(self, x, t):
            return torch.tanh(self.trunk(x) + self.t(t[:, None]))

    model = DiffFlow(Head(), Head(), (4,), num_steps=5, diffusion=[0.3, 0.2, 0.25, 0.35, 0.2, 0.3])
    x0 = torch.randn(8, 4, dtype=torch.float64)
    la, ga, _ = _grads(model, x0, 1, "adjoint")
    lb, gb, _ = _grads(model, x0, 1, "autograd")
    for a, b in zip(ga, gb):
        assert (a - b).norm() <= 1e-9 * b.norm()


@pytest.mark.parametrize("gradient,budget,recomputed", [
    ("adjoint", None, (8, 7)),  # the adjoint re-evaluates each network once at every state
    ("auto", None, (0, 0)),  # no limit: every graph kept, nothing recomputed
    ("autograd", None, (0, 0)),
])
def test_each_network_evaluated_once_per_state(gradient, budget, recomputed):
    grid = polynomial_grid(7, 1e-3, 0.05, 0.9)
    drift, score = GridLinear(grid, np.linspace(-1, 1, 8), learnable=True), GridLinear(grid, np.ones(8), learnable=True)
    model = DiffFlow(drift, score, (2,), num_steps=7, backend="torch", gradient=gradient, memory_budget=budget)
    x0 = torch.randn(4, 2, dtype=torch.float64)
    loss = model.loss(x0)
    assert (drift.calls, score.calls) == (8, 7)  # N+1 drift evaluations, N score evaluations (none at x_0)
    loss.backward()
    assert (drift.calls - 8, score.calls - 7) == recomputed


def test_nll_bound_exact_for_exact_reversal():
    """When the backward chain is the exact time reversal, -ELBO = -log p(x0) for every sample and noise."""
    N, D, v0 = 8, 3, 0.7
    grid = polynomial_grid(N, 1e-3, 0.3, 0.9).numpy()
    a = np.linspace(-2.0, 1.0, N + 1)
    g, c, V = reversal_coefficients(grid, a, v0, g0=1.5)
    assert g.std() > 0.01  # g really varies along the grid
    model = DiffFlow(GridLinear(grid, a), GridLinear(grid, c), (D,), num_steps=N, t_start=1e-3, t_end=0.3,
                     diffusion=g.tolist(), prior_std=math.sqrt(V[-1]), backend="torch")
    x0 = torch.randn(256, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * math.sqrt(v0)
    bound = model.nll_bound(x0, torch.Generator().manual_seed(1))
    exact = gaussian_nll(x0.numpy(), v0)
    np.testing.assert_allclose(bound.nats.numpy(), exact, rtol=0, atol=1e-9)
    np.testing.assert_allclose(bound.bits_per_dim.numpy(), exact / (D * math.log(2)), atol=1e-9)


def test_nll_bound_matches_closed_form_and_bounds_exact_nll():
    N, D, v0 = 6, 2, 0.5
    grid = polynomial_grid(N, 1e-3, 0.2, 0.9).numpy()
    a = np.linspace(-1.0, 2.0, N + 1)
    g, c, V = reversal_coefficients(grid, a, v0, g0=1.2)
    c_bad = c * 0.6  # a mismatched score: the bound must be loose
    prior_var = V[-1]
    model = DiffFlow(GridLinear(grid, a), GridLinear(grid, c_bad), (D,), num_steps=N, t_start=1e-3, t_end=0.2,
                     diffusion=g.tolist(), prior_std=math.sqrt(prior_var), backend="torch")
    x0 = torch.tensor([[0.3, -0.8], [1.2, 0.4], [0.0, 0.0]], dtype=torch.float64)
    reps = 20000
    est = model.nll_bound(x0.repeat_interleave(reps, 0), torch.Generator().manual_seed(2)).nats.reshape(3, reps)
    closed = expected_nelbo(x0.numpy(), grid, a, c_bad, g, prior_var)
    se = est.std(1).numpy() / math.sqrt(reps)
    assert np.all(np.abs(est.mean(1).numpy() - closed) < 4 * se + 1e-9), (est.mean(1), closed, se)
    exact = gaussian_nll(x0.numpy(), backward_marginal_var(grid, a, c_bad, g, prior_var))
    assert np.all(closed > exact + 1e-3)  # a strict upper bound when the reversal is not exact


def test_theorem1_objective_approaches_flow_nll_as_g_shrinks():
    """Theorem 1: as g -> 0 the DiffFlow objective (-ELBO) tends to the normalizing-flow NLL.

    Linear drift ``a_i x`` (per dimension) makes the flow ``F_i(x) = (1 + a_i dt_i) x`` exactly invertible;
    for each g the score ``s_{i+1}(y) = (f_{i+1}(y) - f_i(F_i^{-1}(y))) / g^2`` makes the backward mean the
    inverse flow, so delta_i = -eps_i / A_i. The gap to the flow's NLL is then
    ``g^2 E||u||^2 / (2 sigma^2)`` plus the fixed discretisation residual
    ``sum_{i,d} [(A^-2 - 1)/2 + log A]`` (O(dt^2): a Gaussian kernel with isotropic variance cannot match the
    flow's anisotropic one exactly), which this test computes and checks.
    """
    N, B = 10, 20000
    grid = polynomial_grid(N, 1e-3, 0.5, 1.0).numpy()
    dt = np.diff(grid)
    a = np.stack([np.linspace(-1.5, 0.5, N + 1), np.linspace(1.0, -0.5, N + 1)], axis=1)  # (N+1, 2)
    A = 1 + a[:-1] * dt[:, None]
    x0 = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.6
    sigma2 = 0.3
    xN = x0.numpy() * np.prod(A, axis=0)
    flow_nll = gaussian_nll(xN, sigma2) - np.sum(np.log(A))
    residual = np.sum(0.5 * (A**-2 - 1) + np.log(A))
    gaps = []
    for gval in (0.4, 0.2, 0.1, 0.05, 0.025, 0.0125):
        c = np.zeros_like(a)
        c[1:] = (a[1:] - a[:-1] / A) / gval**2
        model = DiffFlow(GridLinear(grid, a), GridLinear(grid, c), (2,), num_steps=N, t_start=1e-3, t_end=0.5,
                         time_exponent=1.0, diffusion=gval, prior_std=math.sqrt(sigma2), backend="torch")
        nats = model.nll_bound(x0, torch.Generator().manual_seed(5)).nats.numpy()
        gaps.append(float(np.mean(nats - flow_nll)))
    assert all(g1 > g2 for g1, g2 in zip(gaps, gaps[1:])), gaps  # falls monotonically
    # the limit: the discretisation residual (MC error of the eps-dependent part is ~1e-4 here)
    assert abs(gaps[-1] - residual) < 2e-3 + 0.05 * abs(residual), (gaps, residual)
    assert gaps[0] - residual > 10 * abs(gaps[-1] - residual)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_marginal_equivalent_samplers_agree(lam):
    """dx = [f - (1+lam^2)/2 g^2 s] dt + lam g dw has the same marginals for every lam."""
    v0, gval, T, n = 0.25, 1.0, 1.0, 40000
    model = DiffFlow(Zero(), ContinuousGaussianScore(v0, gval), (2,), num_steps=400, t_start=1e-3, t_end=T,
                     time_exponent=1.0, diffusion=gval, prior_std=math.sqrt(v0 + gval**2 * T), backend="torch")
    x = model.sample(n, lam=lam, generator=torch.Generator().manual_seed(11), dtype=torch.float64, denoise=False)
    target_var = v0 + gval**2 * 1e-3
    mean, cov = x.mean(0), torch.cov(x.T)
    # Monte Carlo: se(mean) = sqrt(var/n) ~ 0.0025, se(var) = var*sqrt(2/n) ~ 0.0018; Euler bias < 1%.
    assert mean.abs().max() < 0.015
    assert torch.allclose(torch.diagonal(cov), torch.full((2,), target_var, dtype=torch.float64), rtol=0.04)
    assert abs(cov[0, 1]) < 0.012


def test_log_prob_matches_analytic_density():
    v0, gval, T = 0.5, 1.0, 0.5
    model = DiffFlow(Zero(), ContinuousGaussianScore(v0, gval), (3,), num_steps=10, t_start=1e-3, t_end=T,
                     diffusion=gval, prior_std=math.sqrt(v0 + gval**2 * T), backend="torch")
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lp = model.log_prob(x, method="exact", rtol=1e-8, atol=1e-8)
    expected = -gaussian_nll(x.numpy(), v0 + gval**2 * 1e-3)
    np.testing.assert_allclose(lp.numpy(), expected, rtol=0, atol=1e-5)


def test_hutchinson_agrees_with_exact_trace():
    from diffflow_ext.likelihood import divergence_exact, divergence_hutchinson

    torch.manual_seed(0)
    net = TimeMLP(5, hidden=32, depth=2, zero_init=False).double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.full((4,), 0.02, dtype=torch.float64)
    v = net(x, t)
    exact = divergence_exact(v, x)
    K = 4000
    probes = torch.randn(K, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).sign()
    est = torch.stack([divergence_hutchinson(v, x, probes[k], retain_graph=True) for k in range(K)])
    se = est.std(0) / math.sqrt(K)
    assert torch.all((est.mean(0) - exact).abs() < 4 * se + 1e-12), (est.mean(0), exact, se)

    model = _random_mlp_model(dim=3, num_steps=5, backend="torch")
    xs = torch.randn(6, 3, dtype=torch.float64)
    lp_exact = model.log_prob(xs, method="exact")
    lp_h = model.log_prob(xs, method="hutchinson", num_probes=256, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lp_exact, lp_h, atol=0.05), (lp_exact, lp_h)


def test_sample_shapes_trajectory_and_denoise():
    model = _random_mlp_model(num_steps=5, backend="torch")
    s, traj = model.sample(7, lam=1.0, return_trajectory=True, generator=torch.Generator().manual_seed(0))
    assert s.shape == (7, 3) and traj.shape == (6, 7, 3)
    assert torch.equal(traj[0], s)
    # lam = 0 is deterministic given the start
    a = model.sample(5, lam=0.0, generator=torch.Generator().manual_seed(1))
    b = model.sample(5, lam=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    ode = model.sample(5, method="ode", generator=torch.Generator().manual_seed(1))
    assert ode.shape == (5, 3) and torch.isfinite(ode).all()


def test_forward_trajectory_uses_the_em_step():
    model = _random_mlp_model(num_steps=4, backend="torch")
    x0 = torch.randn(5, 3, dtype=torch.float64)
    traj = model.forward_trajectory(x0, torch.Generator().manual_seed(0))
    assert traj.shape == (5, 5, 3) and torch.equal(traj[0], x0)
    gen = torch.Generator().manual_seed(0)
    t, dt = model.timestamps, model.timestamps.diff()
    g = model.diffusion.at_grid(t[None])[0]
    x = x0
    for i in range(4):
        eps = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        x = x + model.drift(x, t[i].expand(5)) * dt[i] + g[i] * dt[i].sqrt() * eps
        assert torch.allclose(traj[i + 1], x, atol=1e-12)


def test_progressive_and_flexible_schedules():
    p = ProgressiveSteps(start=5, end=30, warmup_iters=100)
    ns = [p(i) for i in range(0, 150, 10)]
    assert ns[0] == 5 and ns[-1] == 30 and all(a <= b for a, b in zip(ns, ns[1:]))
    model = _random_mlp_model(num_steps=6, grid="flexible", backend="torch", diffusion=0.3)
    t = model.time_grid(64, generator=torch.Generator().manual_seed(0))
    base = model.timestamps
    assert torch.equal(t[:, 0], base[0].expand(64)) and torch.equal(t[:, -1], base[-1].expand(64))
    assert (t.diff(dim=1) > 0).all() and not torch.equal(t[0], t[1])
    x0 = torch.randn(8, 3, dtype=torch.float64)
    assert torch.isfinite(model.loss(x0, num_steps=3))


@pytest.mark.parametrize("kwargs,match", [
    ({"num_steps": 0}, "num_steps"),
    ({"num_steps": 2.5}, "num_steps"),
    ({"diffusion": -0.1}, "diffusion"),
    ({"diffusion": [0.1, 0.2]}, "diffusion"),
    ({"gradient": "magic"}, "gradient: expected one of 'auto', 'adjoint', 'autograd'"),
    ({"backend": "gpu"}, "backend: expected one of"),
    ({"grid": "random"}, "grid"),
    ({"prior_std": 0}, "prior_std"),
    ({"t_start": 0.1, "t_end": 0.05}, "t_start"),
    ({"t_start": "0.001"}, "t_start: expected a finite number"),
    ({"t_end": float("nan")}, "t_end: expected a finite number"),
    ({"num_steps": 10**8}, r"num_steps: expected an integer number of steps in \[1, 100000\]"),
    ({"num_steps": 1e8}, "num_steps"),
    ({"memory_budget": -1}, "memory_budget"),
    ({"memory_budget": "1GB"}, "memory_budget"),
    ({"checkpoint_schedule": "revolve?"}, "checkpoint_schedule: expected one of 'end', 'uniform'"),
    ({"autocast_dtype": torch.float64}, "autocast_dtype: expected None, torch.bfloat16 or torch.float16"),
    ({"diffusion": nn.Linear(1, 1)}, "diffusion: a module with learnable parameters is not supported"),
    ({"data_shape": None}, "data_shape"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        if "data_shape" in kwargs:
            DiffFlow(TimeMLP(2), TimeMLP(2), **kwargs)
        else:
            DiffFlow.mlp(2, **kwargs)
    assert "\n" not in str(err.value)  # one line


def test_bad_data_shapes_raise():
    model = DiffFlow.mlp(2, hidden=8, depth=1, num_steps=3)
    with pytest.raises(ValueError, match=r"x0: expected shape \(B, 2\)"):
        model.loss(torch.randn(4, 3))
    with pytest.raises(ValueError, match="n: expected a positive integer"):
        model.sample(0)
    for lam in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lam: expected a finite number >= 0"):
            model.sample(3, lam=lam)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(6, 2)
        x[3, 1] = bad
        with pytest.raises(ValueError, match="x0: 1 of 6 samples hold NaN or inf"):
            model.loss(x)
    with pytest.raises(ValueError, match="num_steps"):
        model.sample(3, num_steps=10**8)
    with pytest.raises(ValueError, match="method"):
        model.sample(3, method="heun?")
    with pytest.raises(ValueError, match="method"):
        model.log_prob(torch.randn(2, 2), method="magic")


def test_learnable_diffusion_callable_is_refused():
    scale = nn.Parameter(torch.tensor(0.3))
    model = DiffFlow.mlp(2, hidden=8, depth=1, num_steps=3, diffusion=lambda t: scale * (1 + t))
    with pytest.raises(ValueError, match="diffusion: the callable returned a g that requires grad"):
        model.loss(torch.randn(4, 2))
    with torch.no_grad():  # evaluation with a fixed value of g is fine
        assert torch.isfinite(model.nll_bound(torch.randn(4, 2)).nats).all()
    with pytest.raises(ValueError, match="diffusion: the callable returned a g that is not finite and positive"):
        DiffFlow.mlp(2, hidden=8, depth=1, num_steps=3, diffusion=lambda t: t - 0.01).loss(torch.randn(4, 2))


def test_per_grid_point_diffusion_agrees_on_flexible_grids():
    """g given per point of the fixed grid: training on a flexible grid, the ODE and log_prob all use the same
    piecewise-linear g(t), which equals the given values at the fixed grid's points."""
    values = [0.2, 0.5, 0.3, 0.6, 0.25]
    model = DiffFlow.mlp(2, hidden=8, depth=1, num_steps=4, diffusion=values, grid="flexible").double()
    t = model.time_grid(16, generator=torch.Generator().manual_seed(0))
    _, _, g = model.step_coefficients(t, torch.float64)
    assert torch.allclose(g, model.diffusion_at(t), rtol=0, atol=1e-15)
    assert not torch.allclose(g[:, 1:-1], torch.tensor(values[1:-1], dtype=torch.float64).expand(16, -1))
    fixed = model.time_grid(3, grid="fixed")
    _, _, g_fixed = model.step_coefficients(fixed, torch.float64)
    assert torch.equal(g_fixed, torch.tensor(values, dtype=torch.float64).expand(3, -1))


@pytest.mark.parametrize("network,kwargs,shape", [
    ("mlp", {"hidden": 8, "depth": 1}, (2,)),
    ("mlp", {"hidden": 8, "depth": 2, "time_dim": 8}, (1, 3, 3)),
])
def test_config_round_trip_for_registered_networks(network, kwargs, shape):
    torch.manual_seed(0)
    model = DiffFlow.from_networks(network, shape, kwargs, num_steps=4, gradient="auto", memory_budget=2**20,
                                   checkpoint_schedule="uniform", autocast_dtype=torch.bfloat16, diffusion=[0.1] * 5)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    cfg = model.config()
    import json
    cfg = json.loads(json.dumps(cfg))
    clone = DiffFlow.from_config(cfg)
    clone.load_state_dict(model.state_dict())
    assert clone.config() == cfg and clone.autocast_dtype == torch.bfloat16 and clone.memory_budget == 2**20
    x = torch.randn(5, *shape)
    with torch.no_grad():
        a, b = model.loss(x, torch.Generator().manual_seed(1)), clone.loss(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # the older MLP form still loads
    old = DiffFlow.from_config({"dim": 2, "hidden": 8, "depth": 1, "time_dim": 32, "num_steps": 3,
                                "gradient": "adjoint"})
    assert old.gradient == "adjoint" and old.config()["drift"]["name"] == "mlp"
    with pytest.raises(ValueError, match="config: the drift network was not built by"):
        DiffFlow(nn.Identity(), model.score, shape).config()


def test_from_config_refuses_a_data_shape_that_contradicts_the_networks():
    """A (crafted or mixed-up) model config whose data_shape disagrees with the networks' stored shape arguments
    is refused with the argument named, instead of building a model that fails later in sample/eval."""
    from diffflow_ext import DiffFlow

    cfg = DiffFlow.mlp(2, hidden=16, depth=1).config()
    assert DiffFlow.from_config(cfg).data_shape == (2,)
    with pytest.raises(ValueError, match="dim: network 'mlp' got 2 but the data shape"):
        DiffFlow.from_config({**cfg, "data_shape": [3]})
    with pytest.raises(ValueError, match="data_shape"):
        DiffFlow.from_config({**cfg, "data_shape": [0]})
