"""Gradient modes of DiffFlow: every mode must give autograd's gradients, for every kind of network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffflow_ext import DiffFlow, TimeMLP


def _grads(model, x0, seed, mode):
    model.gradient = mode
    model.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    loss = model.loss(x, torch.Generator().manual_seed(seed))
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return loss.detach(), grads, x.grad.clone()


class DetachedLinearDrift(nn.Module):
    """A fixed drift whose output carries no graph (computed from a detached input)."""

    def forward(self, x, t):
        return -2.0 * x.detach() * (1.0 + t.to(x.dtype)[:, None])


class ParameterFreeDrift(nn.Module):
    """A fixed drift without parameters, differentiable in x (a DDPM-like linear drift)."""

    def forward(self, x, t):
        return -0.5 * x * (1.0 + 10.0 * t.to(x.dtype)[:, None])


@pytest.mark.parametrize("drift_cls", [DetachedLinearDrift, ParameterFreeDrift])
def test_fixed_drift_gradients_equal_autograd(drift_cls):
    torch.manual_seed(0)
    score = TimeMLP(3, 16, 2, zero_init=False).double()
    model = DiffFlow(drift_cls(), score, (3,), num_steps=6, backend="torch")
    x0 = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    la, ga, xa = _grads(model, x0, 5, "adjoint")
    lb, gb, xb = _grads(model, x0, 5, "autograd")
    assert abs(la - lb) <= 1e-12 * abs(lb)
    for a, b in zip(ga, gb):
        assert b.abs().sum() > 0
        assert (a - b).norm() <= 1e-9 * b.norm()
    assert (xa - xb).norm() <= 1e-9 * xb.norm()


@pytest.mark.parametrize("mode", ["adjoint", "autograd"])
def test_fixed_drift_model_trains_and_samples(mode):
    torch.manual_seed(0)
    model = DiffFlow(ParameterFreeDrift(), TimeMLP(2, 32, 2), (2,), num_steps=8, gradient=mode, diffusion=1.0,
                     t_end=1.0, time_exponent=1.0)
    data = torch.randn(512, 2, generator=torch.Generator().manual_seed(2)) * 0.3 + torch.tensor([1.0, -1.0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = model.loss(data, gen)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    with torch.no_grad():
        final = model.loss(data, torch.Generator().manual_seed(4)).item()
    assert final < first - 0.5  # the score learns: the transition terms fall
    x = model.sample(256, generator=torch.Generator().manual_seed(5))
    assert x.shape == (256, 2) and torch.isfinite(x).all()
