"""Samplers for a trained DiffFlow: a base class with one ``step`` and a registry open to users (as in score_sde).

All of them integrate, from ``t_N`` back to ``t_0``, the marginal-equivalent backward SDE

    dx = [f(x,t) - (1 + lam^2)/2 g(t)^2 s(x,t)] dt + lam g(t) dw,

which has the same marginals as the DiffFlow backward SDE (lam = 1) for every lam >= 0; lam = 0 is the
probability-flow ODE ``dx/dt = f - g^2 s / 2``.

Built in (``get_sampler(name, **options)``):

* ``"em"`` -- Euler-Maruyama on the model's grid (the paper's sampler), option ``lam`` (default 1; finite, >= 0);
* ``"heun"`` -- Heun's second-order method for the probability-flow ODE on the model's grid (2 evaluations a step);
* ``"ode"`` -- the probability-flow ODE solved adaptively by torchdiffeq between grid points, options ``rtol``,
  ``atol`` (default 1e-5 each) and ``method`` (a torchdiffeq solver, default ``"dopri5"``).

A new sampler subclasses :class:`Sampler`, implements ``step`` (one step from ``t_{i+1}`` back to ``t_i``) and
is registered with ``@register_sampler("name")``; its ``__init__`` keyword arguments are its options, and
``get_sampler`` rejects any other option with an error that lists the valid ones.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor

from . import ops

__all__ = ["Sampler", "SAMPLERS", "register_sampler", "get_sampler", "sampler_options", "EulerMaruyamaSampler",
           "HeunSampler", "ODESampler", "probability_flow_velocity", "marginal_drift"]

SAMPLERS: dict[str, type["Sampler"]] = {}


def marginal_drift(f: Tensor, s: Tensor, g: Tensor, lam: float) -> Tensor:
    """``f - (1 + lam^2)/2 g^2 s`` with ``g`` per sample ``(B,)``."""
    g2 = ops.reference.per_sample(g, f).to(f.dtype) ** 2
    return f - (0.5 * (1.0 + lam * lam)) * g2 * s


def probability_flow_velocity(model, x: Tensor, t: Tensor) -> Tensor:
    """``dx/dt = f(x,t) - g(t)^2 s(x,t) / 2`` for ``t`` of shape ``(B,)``."""
    g = model.diffusion_at(t.to(torch.float64)).to(x.dtype)
    return marginal_drift(model.drift(x, t), model.score(x, t), g, 0.0)


def _check_lam(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0 <= lam < math.inf):
        raise ValueError(f"lam: expected a finite number >= 0 (0: the probability-flow ODE), got {lam!r}")
    return float(lam)


def _check_tol(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < 1):
        raise ValueError(f"{name}: expected a tolerance in (0, 1), got {value!r}")
    return float(value)


class Sampler:
    """Base class: walks the model's fixed grid from ``t_N`` back to ``t_0`` calling :meth:`step` once per cell.

    Subclasses implement ``step`` and take their options as keyword arguments of ``__init__`` (validated there).
    """

    name: str = ""

    def step(self, model, x: Tensor, t_next: Tensor, t_prev: Tensor, dt: Tensor, g_next: Tensor,
             generator: torch.Generator | None, noisy: bool) -> Tensor:
        """One step from ``x`` at ``t_next = t_{i+1}`` to ``t_prev = t_i``; ``t_*`` ``(B,)`` in ``x``'s dtype, ``dt``
        and ``g_next`` ``(B,)`` in the accumulation dtype. ``noisy=False``: the final denoising step."""
        raise NotImplementedError

    def options(self) -> dict:
        """The options this sampler was built with (JSON-able)."""
        return {k: getattr(self, k) for k in sampler_options(type(self))}

    def __call__(self, model, x: Tensor, *, num_steps: int | None = None, generator: torch.Generator | None = None,
                 denoise: bool = True, keep_trajectory: bool = False, lam: float | None = None) -> Tensor:
        """Samples from ``x`` drawn at ``t_N``; ``(N+1, B, ...)`` states ``t_0..t_N`` with ``keep_trajectory``.

        ``lam`` is accepted for :meth:`DiffFlow.sample`'s sake; only samplers with a ``lam`` option use it."""
        if lam is not None and "lam" in sampler_options(type(self)):
            return type(self)(**{**self.options(), "lam": lam})(
                model, x, num_steps=num_steps, generator=generator, denoise=denoise, keep_trajectory=keep_trajectory)
        n = x.shape[0]
        t64 = model.time_grid(n, num_steps=num_steps, grid="fixed", device=x.device)
        t, dt, g = model.step_coefficients(t64, x.dtype)
        traj = [x] if keep_trajectory else None
        for i in range(dt.shape[1] - 1, -1, -1):
            x = self.step(model, x, t[:, i + 1], t[:, i], dt[:, i], g[:, i + 1], generator,
                          noisy=not (denoise and i == 0))
            if traj is not None:
                traj.append(x)
        return torch.stack(traj[::-1]) if traj is not None else x

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"


def sampler_options(cls: type[Sampler]) -> tuple[str, ...]:
    """The option names of a sampler class (its ``__init__`` keyword arguments)."""
    sig = inspect.signature(cls.__init__)
    return tuple(p.name for p in list(sig.parameters.values())[1:]
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def register_sampler(name: str):
    """Class decorator: ``@register_sampler("mine")`` makes ``get_sampler("mine", **options)`` build it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_sampler: expected a non-empty name, got {name!r}")

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Sampler)):
            raise TypeError(f"register_sampler({name!r}): expected a subclass of Sampler, got {cls!r}")
        if name in SAMPLERS and SAMPLERS[name] is not cls:
            raise ValueError(f"register_sampler: a sampler called {name!r} is already registered")
        cls.name = name
        SAMPLERS[name] = cls
        return cls

    return deco


def get_sampler(name: str, **options) -> Sampler:
    """The sampler ``name`` built with ``options``; errors list the valid names / options."""
    if name not in SAMPLERS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, sorted(SAMPLERS)))}, got {name!r}")
    cls = SAMPLERS[name]
    valid = sampler_options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"sampler {name!r}: unknown option(s) {', '.join(unknown)}; valid options: "
                         f"{', '.join(valid) if valid else '(none)'}")
    return cls(**options)


@register_sampler("em")
class EulerMaruyamaSampler(Sampler):
    """Euler-Maruyama on the model's fixed grid, backwards:

    ``x_i = x_{i+1} - [f - (1+lam^2)/2 g^2 s](x_{i+1}, t_{i+1}) dt_i + lam g_{i+1} sqrt(dt_i) z``,

    i.e. one forward ``em_step`` with drift ``-(marginal drift)`` and noise scale ``lam g_{i+1}``.
    """

    def __init__(self, lam: float = 1.0):
        self.lam = _check_lam(lam)

    def step(self, model, x, t_next, t_prev, dt, g_next, generator, noisy):
        f, s = model.drift(x, t_next), model.score(x, t_next)
        drift = -marginal_drift(f, s, g_next, self.lam)
        if noisy and self.lam > 0:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        else:
            z = torch.zeros_like(x)
        return ops.em_step(x, drift, z, dt, self.lam * g_next, backend=model.backend)


@register_sampler("heun")
class HeunSampler(Sampler):
    """Heun's method (explicit trapezoid) for the probability-flow ODE on the model's grid; deterministic."""

    def step(self, model, x, t_next, t_prev, dt, g_next, generator, noisy):
        h = dt.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        v1 = probability_flow_velocity(model, x, t_next)
        x_euler = x - h * v1
        v2 = probability_flow_velocity(model, x_euler, t_prev)
        return x - 0.5 * h * (v1 + v2)


@register_sampler("ode")
class ODESampler(Sampler):
    """The probability-flow ODE solved adaptively by torchdiffeq (deterministic). Without a kept trajectory one
    solve runs from ``t_N`` to ``t_0``; with one, a solve per grid cell."""

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5"):
        from torchdiffeq._impl.odeint import SOLVERS

        self.rtol, self.atol = _check_tol("rtol", rtol), _check_tol("atol", atol)
        if method not in SOLVERS:
            raise ValueError(f"method: expected a torchdiffeq solver, one of {', '.join(sorted(SOLVERS))}; "
                             f"got {method!r}")
        self.method = method

    def solve(self, model, x: Tensor, times: Tensor) -> Tensor:
        from torchdiffeq import odeint

        def rhs(t: Tensor, y: Tensor) -> Tensor:
            return probability_flow_velocity(model, y, t.expand(y.shape[0]).to(y.dtype))

        return odeint(rhs, x, times.to(device=x.device, dtype=x.dtype), method=self.method, rtol=self.rtol,
                      atol=self.atol)

    def step(self, model, x, t_next, t_prev, dt, g_next, generator, noisy):
        return self.solve(model, x, torch.stack([t_next[0], t_prev[0]]))[-1]

    def __call__(self, model, x, *, num_steps=None, generator=None, denoise=True, keep_trajectory=False, lam=None):
        if keep_trajectory:
            return super().__call__(model, x, num_steps=num_steps, generator=generator, denoise=denoise,
                                    keep_trajectory=True)
        times = model.timestamps
        return self.solve(model, x, times[[-1, 0]])[-1]
