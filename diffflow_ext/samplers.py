"""Samplers for a trained DiffFlow (a registry, as in score_sde).

All of them integrate the marginal-equivalent backward SDE from ``t_N`` to ``t_0``

    dx = [f(x,t) - (1 + lam^2)/2 g(t)^2 s(x,t)] dt + lam g(t) dw,

which has the same marginals as the DiffFlow backward SDE (lam = 1) for every lam >= 0; lam = 0 is the
probability-flow ODE.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import ops

__all__ = ["SAMPLERS", "register_sampler", "get_sampler", "EulerMaruyamaSampler", "ODESampler",
           "probability_flow_velocity", "marginal_drift"]

SAMPLERS: dict[str, Callable] = {}


def register_sampler(name: str):
    def deco(cls):
        SAMPLERS[name] = cls
        return cls
    return deco


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, sorted(SAMPLERS)))}, got {name!r}")
    return SAMPLERS[name]()


def marginal_drift(f: Tensor, s: Tensor, g: Tensor, lam: float) -> Tensor:
    """``f - (1 + lam^2)/2 g^2 s`` with ``g`` per sample ``(B,)``."""
    g2 = ops.reference.per_sample(g, f).to(f.dtype) ** 2
    return f - (0.5 * (1.0 + lam * lam)) * g2 * s


def probability_flow_velocity(model, x: Tensor, t: Tensor) -> Tensor:
    """``dx/dt = f(x,t) - g(t)^2 s(x,t) / 2`` for ``t`` of shape ``(B,)``."""
    g = model.diffusion_at(t.to(torch.float64)).to(x.dtype)
    return marginal_drift(model.drift(x, t), model.score(x, t), g, 0.0)


@register_sampler("em")
class EulerMaruyamaSampler:
    """Euler-Maruyama on the model's fixed grid, backwards:

    ``x_i = x_{i+1} - [f - (1+lam^2)/2 g^2 s](x_{i+1}, t_{i+1}) dt_i + lam g_{i+1} sqrt(dt_i) z``,

    i.e. one forward ``em_step`` with drift ``-(marginal drift)`` and noise scale ``lam g_{i+1}``.
    """

    def step(self, model, x: Tensor, t_next: Tensor, dt: Tensor, g_next: Tensor, lam: float,
             generator, noisy: bool) -> Tensor:
        f, s = model.drift(x, t_next), model.score(x, t_next)
        drift = -marginal_drift(f, s, g_next, lam)
        if noisy and lam > 0:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        else:
            z = torch.zeros_like(x)
        return ops.em_step(x, drift, z, dt, lam * g_next, backend=model.backend)

    def __call__(self, model, x: Tensor, *, lam: float, num_steps, generator, denoise: bool,
                 keep_trajectory: bool):
        n = x.shape[0]
        t, dt, g = model.step_coefficients(model.time_grid(n, num_steps=num_steps, grid="fixed", device=x.device),
                                           x.dtype)
        N = dt.shape[1]
        traj = [x] if keep_trajectory else None
        for i in range(N - 1, -1, -1):
            x = self.step(model, x, t[:, i + 1], dt[:, i], g[:, i + 1], lam, generator,
                          noisy=not (denoise and i == 0))
            if traj is not None:
                traj.append(x)
        if traj is not None:
            return torch.stack(traj[::-1])
        return x


@register_sampler("ode")
class ODESampler:
    """The probability-flow ODE (lam is ignored) solved adaptively by torchdiffeq from ``t_end`` to ``t_start``."""

    def __init__(self, solver: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5):
        self.solver, self.rtol, self.atol = solver, rtol, atol

    def __call__(self, model, x: Tensor, *, lam: float, num_steps, generator, denoise: bool,
                 keep_trajectory: bool):
        from torchdiffeq import odeint

        def rhs(t: Tensor, y: Tensor) -> Tensor:
            return probability_flow_velocity(model, y, t.expand(y.shape[0]).to(y.dtype))

        times = model.timestamps.to(device=x.device, dtype=x.dtype)
        if not keep_trajectory:
            times = times[[-1, 0]]
        else:
            times = times.flip(0)
        ys = odeint(rhs, x, times, method=self.solver, rtol=self.rtol, atol=self.atol)
        if keep_trajectory:
            return ys.flip(0)
        return ys[-1]
