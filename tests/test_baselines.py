"""Baselines: the fixed-drift diffusion (both objectives, both gradient modes) and the NSF wrapper."""

import math

import pytest
import torch

from diffflow_ext.baselines import NSF, LinearDrift, dsm_loss, fixed_drift_diffusion, transition, zuko_available


def _gaussian_data(n, v0=0.3, seed=0):
    return math.sqrt(v0) * torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_linear_drift_is_fixed_and_checked():
    f = LinearDrift(4.0)
    x = torch.randn(3, 2, requires_grad=True)
    assert torch.equal(f(x, torch.zeros(3)), -2.0 * x)
    assert not list(f.parameters())
    with pytest.raises(ValueError, match="beta"):
        LinearDrift(-1.0)
    with pytest.raises(ValueError, match="beta"):
        LinearDrift(math.inf)


@pytest.mark.parametrize("beta", [0.0, 8.0])
def test_transition_matches_a_finely_discretised_sde(beta):
    """(a_t, sigma_t) against Euler-Maruyama of dx = -beta/2 x dt + g dw with 2000 steps."""
    model = fixed_drift_diffusion(2, beta=beta, diffusion=1.5, t_end=0.5).double()
    t = torch.tensor([0.5], dtype=torch.float64)
    a, sigma = transition(model, t)
    n, steps = 20000, 2000
    x0 = torch.full((n, 1), 2.0, dtype=torch.float64)
    x, dt = x0.clone(), (0.5 - model.t_start) / steps
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = x - 0.5 * beta * x * dt + 1.5 * math.sqrt(dt) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    assert x.mean().item() == pytest.approx(2.0 * a.item(), abs=4 * sigma.item() / math.sqrt(n) + 2e-3)
    assert x.std().item() == pytest.approx(sigma.item(), rel=0.02)


def test_dsm_is_minimised_by_the_true_score():
    """For Gaussian data N(0, v0 I) the marginal score is -x / (a^2 v0 + sigma^2); scaling it up or down raises
    the DSM loss (same draws: common random numbers)."""
    v0 = 0.3
    model = fixed_drift_diffusion(2, beta=8.0, t_end=1.0).double()

    class Scaled(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x, t):
            a, s = transition(model, t)
            return -self.c * x / (a**2 * v0 + s**2).reshape(-1, 1)

    x0 = _gaussian_data(50000, v0)
    losses = {}
    for c in (0.8, 1.0, 1.25):
        model.score = Scaled(c)
        losses[c] = dsm_loss(model, x0, torch.Generator().manual_seed(1)).item()
    assert losses[1.0] < losses[0.8] and losses[1.0] < losses[1.25], losses


@pytest.mark.parametrize("gradient", ["adjoint", "autograd"])
@pytest.mark.parametrize("objective", ["dsm", "diffflow"])
def test_fixed_drift_model_trains_and_samples(gradient, objective):
    torch.manual_seed(0)
    model = fixed_drift_diffusion(2, beta=8.0, t_end=1.0, num_steps=10, hidden=32, gradient=gradient)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    x = _gaussian_data(512, 0.3).float()
    gen = torch.Generator().manual_seed(0)

    def loss():
        return dsm_loss(model, x, gen) if objective == "dsm" else model.loss(x, gen)

    with torch.no_grad():
        before = sum(loss().item() for _ in range(5)) / 5
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = sum(loss().item() for _ in range(5)) / 5
    assert after < before
    s = model.sample(2000, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(s).all()
    # an untrained model samples N(0, 1); the data has variance 0.3: training moved the samples towards it
    assert torch.var(s, 0).mean().item() < 0.8


def test_both_gradient_modes_agree_for_a_fixed_drift():
    torch.manual_seed(0)
    a = fixed_drift_diffusion(2, beta=8.0, t_end=1.0, num_steps=6, hidden=16, gradient="adjoint").double()
    b = fixed_drift_diffusion(2, beta=8.0, t_end=1.0, num_steps=6, hidden=16, gradient="autograd").double()
    b.load_state_dict(a.state_dict())
    for p in a.score.out.parameters():  # leave the zero-initialised output layer
        torch.nn.init.normal_(p, std=0.1)
    b.load_state_dict(a.state_dict())
    x = _gaussian_data(64)
    la = a.loss(x, torch.Generator().manual_seed(3))
    lb = b.loss(x, torch.Generator().manual_seed(3))
    la.backward()
    lb.backward()
    assert la.item() == pytest.approx(lb.item(), rel=1e-12)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not zuko_available(), reason="zuko not installed")
def test_nsf_fits_and_samples_deterministically():
    torch.manual_seed(0)
    flow = NSF(2, transforms=2, hidden=(32, 32))
    x = _gaussian_data(1024, 0.3).float()
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    first = flow.loss(x).item()
    for _ in range(100):
        opt.zero_grad()
        flow.loss(x).backward()
        opt.step()
    # the Gaussian's entropy is 1 + log(2 pi v0) = 1.63 nats; untrained the flow is ~N(0, 1): 2.14 nats
    assert flow.loss(x).item() < first - 0.3
    a = flow.sample(100, generator=torch.Generator().manual_seed(5))
    b = flow.sample(100, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (100, 2)
