"""The prior p_B(x_N): fixed N(0, std^2 I) and learned diagonal Gaussians (diffflow_ext.priors)."""

from __future__ import annotations

import math

import pytest
import torch

from diffflow_ext import DiffFlow
from diffflow_ext.checkpoint import load_checkpoint, save_checkpoint
from diffflow_ext.priors import GaussianPrior


def _normal_nll(x, mean, std):
    return -torch.distributions.Normal(mean, std).log_prob(x).reshape(x.shape[0], -1).sum(1)


def test_fixed_prior_is_the_isotropic_gaussian():
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    prior = GaussianPrior((2, 3), std=0.6)
    assert list(prior.parameters()) == [] and prior.state_dict() == {}  # old checkpoints load unchanged
    zero, std = torch.zeros((), dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    torch.testing.assert_close(prior.nll(x), _normal_nll(x, zero, std), rtol=1e-12, atol=1e-12)


def test_learned_prior_is_the_diagonal_gaussian_of_its_parameters():
    prior = GaussianPrior((4,), std=0.5, kind="learned").double()
    torch.testing.assert_close(prior.log_std.detach(), torch.full((4,), math.log(0.5), dtype=torch.float64))
    with torch.no_grad():
        prior.mean.copy_(torch.tensor([0.0, 1.0, -2.0, 0.5]))
        prior.log_std.copy_(torch.tensor([0.0, -1.0, 0.3, -3.0]))
    x = torch.randn(9, 4, dtype=torch.float64)
    torch.testing.assert_close(prior.nll(x), _normal_nll(x, prior.mean.detach(), prior.log_std.detach().exp()),
                               rtol=1e-12, atol=1e-12)
    draws = prior.sample(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # 200k draws: the mean's standard error is std/447, the std's about std/632
    torch.testing.assert_close(draws.mean(0), prior.mean.detach(), atol=5 * prior.log_std.exp().max().item() / 447,
                               rtol=0)
    torch.testing.assert_close(draws.std(0), prior.log_std.detach().exp(), rtol=5 / 632, atol=0)


def test_prior_kind_is_checked():
    with pytest.raises(ValueError, match="prior: expected one of"):
        DiffFlow.mlp(2, hidden=8, depth=1, prior="gaussian")


def _model(mode: str, budget=0.5) -> DiffFlow:
    torch.manual_seed(0)
    m = DiffFlow.mlp(3, hidden=16, depth=2, num_steps=5, diffusion=0.5, prior="learned", prior_std=0.7,
                     gradient=mode, memory_budget=budget).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("mode,budget", [("adjoint", 0.5), ("auto", 2000), ("auto", None)])
def test_learned_prior_gradients_equal_autograd(mode, budget):
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = {}
    for key, (m_mode, m_budget) in {"ref": ("autograd", 0.5), "test": (mode, budget)}.items():
        m = _model(m_mode, m_budget)
        m.loss(x, torch.Generator().manual_seed(1)).backward()
        grads[key] = {n: p.grad.clone() for n, p in m.named_parameters()}
    assert grads["ref"]["prior.mean"].abs().max() > 1e-3 and grads["ref"]["prior.log_std"].abs().max() > 1e-3
    for name, ref in grads["ref"].items():
        torch.testing.assert_close(grads["test"][name], ref, rtol=1e-9, atol=1e-12, msg=name)


def test_learned_prior_fits_a_narrow_dimension():
    """Data whose second coordinate is 20x narrower than the first: training moves that dimension's prior
    std down (a fixed prior cannot), and the bound improves over the fixed prior at the same steps."""
    gen = torch.Generator().manual_seed(0)

    def data(n):
        return torch.randn(n, 2, generator=gen) * torch.tensor([1.0, 0.05]) + torch.tensor([0.0, 0.3])

    bounds = {}
    for kind in ("fixed", "learned"):
        torch.manual_seed(0)
        m = DiffFlow.mlp(2, hidden=32, depth=2, num_steps=5, diffusion=0.2, prior=kind)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(150):
            opt.zero_grad()
            m.loss(data(256)).backward()
            opt.step()
        with torch.no_grad():
            bounds[kind] = m.nll_bound(data(4000), torch.Generator().manual_seed(5)).nats.mean().item()
        if kind == "learned":
            std = m.prior.log_std.detach().exp()
            assert std[1] < 0.5 * std[0], std
            assert abs(m.prior.mean[1].item() - 0.3) < 0.15
    assert bounds["learned"] < bounds["fixed"] - 0.5, bounds


def test_learned_prior_round_trips_through_a_checkpoint(tmp_path):
    m = _model("auto").float()
    path = save_checkpoint(tmp_path / "ckpt", model=m)
    back = load_checkpoint(path).build_model(use_ema=False)
    assert back.config()["prior"] == "learned"
    for (n, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    s1 = m.sample(5, generator=torch.Generator().manual_seed(2))
    s2 = back.sample(5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(s1, s2)
