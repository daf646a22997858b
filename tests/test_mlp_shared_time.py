"""TimeMLP computes the time features' part of its first layer once when the batch shares one time (``t`` expanded,
stride 0: the fixed grid of training and sampling). That path must equal the concatenated-input path exactly up to
rounding, in values and in every gradient, for each dtype and for images (flattened inputs)."""

from __future__ import annotations

import pytest
import torch

from diffflow_ext.networks.mlp import TimeMLP


def _net(dim, dtype, **kw):
    torch.manual_seed(0)
    net = TimeMLP(dim, hidden=32, depth=2, time_dim=16, zero_init=False, **kw).to(dtype)
    return net


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(7, 2), (5, 1, 4, 4)])
def test_shared_time_equals_per_sample_time(dtype, tol, shape):
    net = _net(int(torch.tensor(shape[1:]).prod()), dtype)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    t_shared = torch.tensor([0.0123], dtype=dtype).expand(shape[0])
    t_full = t_shared.clone()  # the same values, contiguous: the concatenated path
    assert t_shared.stride(0) == 0 and t_full.stride(0) == 1
    outs, grads = [], []
    for t in (t_shared, t_full):
        y = net(x, t)
        assert y.shape == x.shape
        w = torch.linspace(-1, 1, y.numel(), dtype=dtype).reshape(y.shape)
        g = torch.autograd.grad((y * w).sum(), (x, *net.parameters()))
        outs.append(y.detach())
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_shared_time_with_dropout_and_autocast():
    net = _net(2, torch.float32, dropout=0.2).eval()  # eval: dropout off, values comparable
    x = torch.randn(6, 2)
    t = torch.full((1,), 0.02).expand(6)
    torch.testing.assert_close(net(x, t), net(x, t.clone()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = net(x, t), net(x, t.clone())
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
