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


DEFAULT_RTOL = 1e-7
DEFAULT_ATOL = 1e-7


def log_prob(
    model,
    x: Tensor,
    *,
    method: str = "auto",
    num_probes: int = 1,
    probe: str = "rademacher",
    solver: str = "dopri5",
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``log p(x)`` per sample ``(B,)`` (in nats) under the model's probability-flow ODE.

    The pair ``(x(t), int div v)`` is integrated in float64 whatever the networks' dtype (they are evaluated in
    their own dtype), so the solver's error control is not swamped by float32 round-off.

    Accuracy of the defaults (``dopri5``, ``rtol = atol = 1e-7``, exact trace), measured against closed-form
    Gaussian cases (``tests/test_likelihood.py``; D = 2..64, ``|log p|`` up to ~60 nats): the error is below
    ``1e-5 + 1e-6 |log p|`` nats for float64 networks and below ``3e-5 + 2e-6 |log p|`` nats for float32 ones.
    Tighten ``rtol``/``atol`` for more (float64 networks reach ~1e-8 at 1e-9); the cost grows mildly (adaptive
    steps). ``method="hutchinson"`` adds the estimator's variance (unbiased; average ``num_probes`` probes).
    """
    from torchdiffeq import odeint
    from torchdiffeq._impl.odeint import SOLVERS

    if method not in TRACE_METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, TRACE_METHODS))}, got {method!r}")
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"probe: expected 'rademacher' or 'gaussian', got {probe!r}")
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes: expected a positive integer, got {num_probes!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected a torchdiffeq solver, one of {', '.join(sorted(SOLVERS))}; got {solver!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < 1):
            raise ValueError(f"{name}: expected a tolerance in (0, 1), got {tol!r}")
    D = x[0].numel()
    exact = method == "exact" or (method == "auto" and D <= EXACT_MAX_DIM)
    B = x.shape[0]
    net_dtype = x.dtype
    probes = None
    if not exact:
        shape = (num_probes, *x.shape)
        probes = torch.randn(shape, generator=generator, dtype=net_dtype, device=x.device)
        if probe == "rademacher":
            probes = probes.sign()

    def rhs(t: Tensor, state):
        y, _ = state
        with torch.enable_grad():
            y = y.detach().to(net_dtype).requires_grad_(True)
            v = probability_flow_velocity(model, y, t.expand(B).to(net_dtype))
            if exact:
                div = divergence_exact(v, y)
            else:
                div = sum(divergence_hutchinson(v, y, probes[k], retain_graph=k < num_probes - 1)
                          for k in range(num_probes)) / num_probes
        return v.detach().double(), div.detach().double()

    times = torch.tensor([model.t_start, model.t_end], dtype=torch.float64, device=x.device)
    with torch.no_grad():
        xs, integ = odeint(rhs, (x.detach().double(), torch.zeros(B, dtype=torch.float64, device=x.device)), times,
                           method=solver, rtol=rtol, atol=atol)
    return (-model.prior_nll(xs[-1]) + integ[-1]).to(x.dtype)
