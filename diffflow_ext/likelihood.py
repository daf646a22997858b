"""Exact log-likelihood through the probability-flow ODE and the instantaneous change of variables.

The ODE ``dx/dt = v(x,t) = f(x,t) - g(t)^2 s(x,t) / 2`` carries data at ``t_start`` to the prior at
``t_end``; along a solution ``d log p(x(t), t)/dt = -div v(x(t), t)``, hence

    log p_{t_start}(x) = log p_B(x(t_end)) + int_{t_start}^{t_end} div v(x(t), t) dt.

The pair ``(x, int div v)`` is solved by torchdiffeq. The divergence is exact (one VJP per dimension)
for small dimension and Hutchinson's estimator ``E[e^T (dv/dx) e]`` (probe fixed through the solve) for
large dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .samplers import probability_flow_velocity

__all__ = ["TRACE_METHODS", "divergence_exact", "divergence_hutchinson", "log_prob"]

TRACE_METHODS = ("auto", "exact", "hutchinson")
EXACT_MAX_DIM = 64  # "auto" uses the exact trace up to this dimension


def divergence_exact(v: Tensor, x: Tensor) -> Tensor:
    """``tr(dv/dx)`` per sample by one VJP per dimension (``x`` must require grad)."""
    B = x.shape[0]
    vf, div = v.reshape(B, -1), torch.zeros(B, dtype=v.dtype, device=v.device)
    for j in range(vf.shape[1]):
        (gj,) = torch.autograd.grad(vf[:, j].sum(), x, retain_graph=True)
        div = div + gj.reshape(B, -1)[:, j]
    return div


def divergence_hutchinson(v: Tensor, x: Tensor, probe: Tensor, retain_graph: bool = False) -> Tensor:
    """Unbiased ``e^T (dv/dx) e`` per sample for a probe with ``E[e e^T] = I``."""
    (vjp,) = torch.autograd.grad(v, x, probe, retain_graph=retain_graph)
    return (vjp * probe).reshape(x.shape[0], -1).sum(1)


def log_prob(
    model,
    x: Tensor,
    *,
    method: str = "auto",
    num_probes: int = 1,
    probe: str = "rademacher",
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``log p(x)`` per sample ``(B,)`` (in nats) under the model's probability-flow ODE."""
    from torchdiffeq import odeint

    if method not in TRACE_METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, TRACE_METHODS))}, got {method!r}")
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"probe: expected 'rademacher' or 'gaussian', got {probe!r}")
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes: expected a positive integer, got {num_probes!r}")
    D = x[0].numel()
    exact = method == "exact" or (method == "auto" and D <= EXACT_MAX_DIM)
    B = x.shape[0]
    probes = None
    if not exact:
        shape = (num_probes, *x.shape)
        probes = torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
        if probe == "rademacher":
            probes = probes.sign()

    def rhs(t: Tensor, state):
        y, _ = state
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            v = probability_flow_velocity(model, y, t.expand(B).to(y.dtype))
            if exact:
                div = divergence_exact(v, y)
            else:
                div = sum(divergence_hutchinson(v, y, probes[k], retain_graph=k < num_probes - 1)
                          for k in range(num_probes)) / num_probes
        return v.detach(), div.detach()

    times = torch.tensor([model.t_start, model.t_end], dtype=x.dtype, device=x.device)
    with torch.no_grad():
        xs, integ = odeint(rhs, (x.detach(), torch.zeros(B, dtype=x.dtype, device=x.device)), times,
                           method=solver, rtol=rtol, atol=atol)
    return -model.prior_nll(xs[-1]).to(x.dtype) + integ[-1]

