"""torch.compile(fullgraph=True) of functions calling the public step ops (forward and backward)
runs on CPU without graph breaks and matches eager mode.

The custom ops are opaque to the compiler (fake kernels give the shapes); backend resolution is a
dict lookup and traces. The inductor test compiles once (~tens of seconds on 2 cores); the others
use the cheaper "aot_eager" backend, which still traces forward + backward through AOTAutograd.
"""

from __future__ import annotations

import pytest
import torch

from diffflow_ext import ops
from diffflow_ext.ops import backends

CPU_OK, CPU_WHY = backends._status("cpu")
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not CPU_OK, reason=CPU_WHY))]


def _walk(backend):
    def f(x_prev, x, drift, score, noise, dt_vec, g_vec):
        # forward-walk state, an EM step and a backward noise, with float, 0-d and (B,) dt / g
        x_next, hs = ops.flow_step(x_prev, x, drift, score, noise, 0.02, dt_vec, g_vec, backend=backend)
        y = ops.em_step(x_next, drift, noise, dt_vec, 0.3, backend=backend)
        delta, hs2 = ops.backward_noise(x_prev, x, drift, score, torch.tensor(0.05), g_vec, backend=backend)
        return y.square().sum() + hs.sum() + (hs2 * g_vec).sum() + delta.mean()

    return f


def _inputs(B=4, D=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, D, generator=gen).requires_grad_(True) for _ in range(5)]
    dt = (0.05 + torch.rand(B, generator=gen)).requires_grad_(True)
    g = (0.5 + torch.rand(B, generator=gen)).requires_grad_(True)
    return [*xs, dt, g]


def _value_and_grads(f, args):
    out = f(*args)
    return out.detach(), torch.autograd.grad(out, args)


def _check(compiled, eager, args):
    v1, g1 = _value_and_grads(compiled, args)
    v2, g2 = _value_and_grads(eager, args)
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-4)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_aot_eager(backend):
    torch._dynamo.reset()
    f = _walk(backend)
    _check(torch.compile(f, fullgraph=True, backend="aot_eager"), f, _inputs())


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=pytest.mark.skipif(not CPU_OK, reason=CPU_WHY))])
def test_compile_fullgraph_inductor(backend):
    torch._dynamo.reset()
    f = _walk(backend)
    cf = torch.compile(f, fullgraph=True)
    # No on-disk caches: their keys do not cover the custom ops' schemas, so a graph cached by an
    # older build could replay calls with an out-of-date signature.
    with torch._inductor.config.patch(force_disable_caches=True):
        _check(cf, f, _inputs())
        _check(cf, f, _inputs(seed=1))  # same shapes: no recompile needed


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=pytest.mark.skipif(not CPU_OK, reason=CPU_WHY))])
def test_compile_dynamic_shapes_and_adjoint(backend):
    """Dynamic batch/feature sizes through the fake kernels; adjoint_step under no_grad."""
    torch._dynamo.reset()

    def f(x_prev, x, drift, score, w, adj_next, adj_direct, dt):
        with torch.no_grad():
            return ops.adjoint_step(x_prev, x, drift, score, w, adj_next, adj_direct, 0.1, dt, 0.7, backend=backend)

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for B, D in [(3, 5), (7, 11)]:
        args = [torch.randn(B, D) for _ in range(4)] + [torch.rand(B)] + [torch.randn(B, D) for _ in range(2)]
        args.append(torch.rand(B) + 0.1)
        for a, b in zip(cf(*args), f(*args)):
            torch.testing.assert_close(a, b)
