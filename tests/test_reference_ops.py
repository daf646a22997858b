"""The reference ops against the formulas of the discretised SDEs (the math every kernel must match)."""

from __future__ import annotations

import math

import pytest
import torch

from diffflow_ext import ops
from diffflow_ext.ops import reference as ref

DT_G_FORMS = ["float", "0d", "per_sample"]


def _scalar(form, value, B, dtype=torch.float64):
    if form == "float":
        return value
    if form == "0d":
        return torch.tensor(value, dtype=dtype)
    return value * (1 + 0.5 * torch.rand(B, dtype=dtype, generator=torch.Generator().manual_seed(9)))


def _col(v, x):
    return v.reshape(-1, *([1] * (x.dim() - 1))) if isinstance(v, torch.Tensor) and v.dim() == 1 else v


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (4, 2, 3, 5)])
@pytest.mark.parametrize("form", DT_G_FORMS)
def test_em_step_formula(shape, form):
    gen = torch.Generator().manual_seed(0)
    x, f, e = (torch.randn(shape, dtype=torch.float64, generator=gen) for _ in range(3))
    dt, g = _scalar(form, 0.01, shape[0]), _scalar(form, 0.7, shape[0])
    out = ops.em_step(x, f, e, dt, g, backend="torch")
    dtc, gc = _col(dt, x), _col(g, x)
    expected = x + f * dtc + gc * (dtc**0.5 if isinstance(dtc, torch.Tensor) else math.sqrt(dtc)) * e
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("shape", [(1, 1), (6, 7), (3, 2, 4, 4)])
@pytest.mark.parametrize("form", DT_G_FORMS)
def test_backward_noise_formula(shape, form):
    gen = torch.Generator().manual_seed(1)
    xp, xn, f, s = (torch.randn(shape, dtype=torch.float64, generator=gen) for _ in range(4))
    dt, g = _scalar(form, 0.02, shape[0]), _scalar(form, 0.3, shape[0])
    delta, hs = ops.backward_noise(xp, xn, f, s, dt, g, backend="torch")
    dtc, gc = _col(dt, xp), _col(g, xp)
    sq = dtc**0.5 if isinstance(dtc, torch.Tensor) else math.sqrt(dtc)
    expected = (xp - xn + (f - gc**2 * s) * dtc) / (gc * sq)
    torch.testing.assert_close(delta, expected, rtol=1e-13, atol=1e-13)
    assert hs.shape == (shape[0],)
    torch.testing.assert_close(hs, 0.5 * expected.reshape(shape[0], -1).square().sum(1))


def test_half_types_accumulate_in_float32():
    x = torch.randn(3, 1000, dtype=torch.float64)
    args = [x, x.roll(1, 1), x.roll(2, 1), x.roll(3, 1)]
    delta16, hs16 = ref.backward_noise_ref(*(a.to(torch.bfloat16) for a in args),
                                           torch.full((3,), 0.01), torch.full((3,), 0.5))
    assert delta16.dtype == torch.bfloat16 and hs16.dtype == torch.float32
    dt64, g64 = torch.full((3,), 0.01, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
    _, hs64 = ref.backward_noise_ref(*(a.to(torch.bfloat16).double() for a in args), dt64, g64)
    torch.testing.assert_close(hs16.double(), hs64, rtol=1e-5, atol=0)


def test_backward_noise_in_terms_of_forward_noise():
    """delta_i = -(g_i/g_{i+1}) eps_i + [(f_{i+1} - f_i)/g_{i+1} - g_{i+1} s_{i+1}] sqrt(dt_i) on random trajectories.

    The presentation's closed form, (g_i/g_{i+1}) eps - [(f_{i+1} - f_i)/g_{i+1} + g_{i+1} s_{i+1}] sqrt(dt),
    flips the signs of the eps and drift-difference terms; the test shows it does not hold.
    """
    torch.manual_seed(0)
    B, D, N = 64, 5, 8
    W1, W2 = torch.randn(D, D, dtype=torch.float64), torch.randn(D, D, dtype=torch.float64)

    def f(x, t):
        return torch.tanh(x @ W1) * (1 + t)[:, None]

    def s(x, t):
        return torch.sin(x @ W2) - t[:, None] * x

    t = torch.linspace(0.001, 0.1, N + 1, dtype=torch.float64)
    g = 0.2 + torch.rand(N + 1, dtype=torch.float64)
    x = torch.randn(B, D, dtype=torch.float64)
    for i in range(N):
        ti, tn = t[i].expand(B), t[i + 1].expand(B)
        dt = (t[i + 1] - t[i]).expand(B)
        eps = torch.randn(B, D, dtype=torch.float64)
        fi = f(x, ti)
        x_next = ops.em_step(x, fi, eps, dt, g[i].expand(B), backend="torch")
        fn, sn = f(x_next, tn), s(x_next, tn)
        delta, _ = ops.backward_noise(x, x_next, fn, sn, dt, g[i + 1].expand(B), backend="torch")
        closed = ref.backward_noise_from_forward_noise_ref(eps, fi, fn, sn, dt, g[i].expand(B), g[i + 1].expand(B))
        torch.testing.assert_close(delta, closed, rtol=1e-10, atol=1e-10)
        slide = (g[i] / g[i + 1]) * eps - ((fn - fi) / g[i + 1] + g[i + 1] * sn) * dt[0].sqrt()
        assert (slide - delta).abs().max() > 0.1
        x = x_next


def test_flow_step_is_em_step_plus_backward_noise():
    gen = torch.Generator().manual_seed(2)
    xp, x, f, s, e = (torch.randn(4, 6, dtype=torch.float64, generator=gen) for _ in range(5))
    dtp, dt, g = torch.rand(4, dtype=torch.float64) + 0.01, torch.rand(4, dtype=torch.float64) + 0.01, 0.4
    x_next, hs = ops.flow_step(xp, x, f, s, e, dtp, dt, g, backend="torch")
    torch.testing.assert_close(x_next, ops.em_step(x, f, e, dt, g, backend="torch"))
    torch.testing.assert_close(hs, ops.backward_noise(xp, x, f, s, dtp, g, backend="torch")[1])


def test_adjoint_step_is_the_vjp_of_the_walk():
    """adjoint_step returns the cotangents autograd finds for weight*hs(x_prev, x, f, s) + <adj_next, em_step>."""
    gen = torch.Generator().manual_seed(3)
    B, D = 5, 7
    xp, x, f, s, an, ad = (torch.randn(B, D, dtype=torch.float64, generator=gen) for _ in range(6))
    w = torch.rand(B, dtype=torch.float64, generator=gen)
    dtp, dt = torch.rand(B, dtype=torch.float64) * 0.1 + 0.01, torch.rand(B, dtype=torch.float64) * 0.1 + 0.01
    g = torch.rand(B, dtype=torch.float64) + 0.2
    leaves = [t.clone().requires_grad_(True) for t in (xp, x, f, s)]
    _, hs = ops.backward_noise(leaves[0], leaves[1], leaves[2], leaves[3], dtp, g, backend="torch")
    x_next = ops.em_step(leaves[1], leaves[2], torch.zeros_like(x), dt, g, backend="torch")
    total = (w * hs).sum() + (an * x_next).sum()
    gxp, gx, gf, gs = torch.autograd.grad(total, leaves)
    adj_prev, cot_x, cot_f, cot_s = ops.adjoint_step(xp, x, f, s, w, an, ad, dtp, dt, g, backend="torch")
    for got, want in ((adj_prev, gxp), (cot_x, gx + ad), (cot_f, gf), (cot_s, gs)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_ops_differentiable_in_every_tensor_argument():
    gen = torch.Generator().manual_seed(4)
    B, D = 3, 4
    args = [torch.randn(B, D, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(4)]
    dt = (torch.rand(B, dtype=torch.float64, generator=gen) * 0.1 + 0.01).requires_grad_(True)
    g = (torch.rand(B, dtype=torch.float64, generator=gen) + 0.3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: ops.backward_noise(*a, backend="torch"), (*args, dt, g))
    assert torch.autograd.gradcheck(lambda *a: ops.em_step(*a, backend="torch"), (*args[:3], dt, g))
    dt0 = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c, d, t: ops.backward_noise(a, b, c, d, t, 0.5, backend="torch"),
                                    (*args, dt0))


@pytest.mark.parametrize("call,match", [
    (lambda x: ops.em_step(x, x[:, :2], x, 0.1, 0.2), "drift: expected shape"),
    (lambda x: ops.em_step(x, x.float(), x, 0.1, 0.2), "drift: expected dtype"),
    (lambda x: ops.em_step(x, x, x, -0.1, 0.2), "dt: expected a positive number"),
    (lambda x: ops.em_step(x, x, x, torch.ones(5, dtype=torch.float64), 0.2), r"dt: expected .* shape \(4,\)"),
    (lambda x: ops.backward_noise(x, x, x, x, 0.1, 0.0), "g_next: expected a positive number"),
    (lambda x: ops.backward_noise(x, x, x, "x", 0.1, 0.1), "score_next: expected a torch.Tensor"),
    (lambda x: ops.em_step(x, x, x, 0.1, 0.2, backend="fast"), "backend: expected one of"),
    (lambda x: ops.em_step(x.long(), x.long(), x.long(), 0.1, 0.2), "x: expected a floating dtype"),
])
def test_bad_input_raises_clear_errors(call, match):
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x)
