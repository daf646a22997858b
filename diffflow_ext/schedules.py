"""Time grids, diffusion coefficients and step-count schedules.

A time grid runs from ``t_0`` (data side, near 0) to ``t_N = T`` (noise side). The model always
works with a per-sample grid of shape ``(B, N + 1)``: the fixed grid is broadcast, a flexible
grid draws each interior point inside its cell, fresh for every batch and every sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "GRIDS",
    "polynomial_grid",
    "flexible_grid",
    "Diffusion",
    "ProgressiveSteps",
    "check_num_steps",
    "MAX_NUM_STEPS",
]

GRIDS = ("fixed", "flexible")


MAX_NUM_STEPS = 100_000


def check_num_steps(num_steps: object, name: str = "num_steps") -> int:
    """An integer number of steps in ``[1, MAX_NUM_STEPS]`` (larger grids are a mistake, not a workload: the
    paper uses at most 100 steps, and every step holds a state of the whole batch)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_NUM_STEPS:
        raise ValueError(f"{name}: expected an integer number of steps in [1, {MAX_NUM_STEPS}], got {num_steps!r}")
    return num_steps


def polynomial_grid(
    num_steps: int, t_start: float, t_end: float, exponent: float, *, dtype=torch.float64, device=None
) -> Tensor:
    """The paper's fixed grid ``t_i = linspace(t_start**e, t_end**e, N+1)**(1/e)``, shape ``(N+1,)``."""
    check_num_steps(num_steps)
    if not exponent > 0:
        raise ValueError(f"time_exponent: expected a positive number, got {exponent}")
    if not (0.0 <= t_start < t_end):
        raise ValueError(f"t_start, t_end: expected 0 <= t_start < t_end, got t_start={t_start}, t_end={t_end}")
    base = torch.linspace(t_start**exponent, t_end**exponent, num_steps + 1, dtype=torch.float64)
    t = base ** (1.0 / exponent)
    t[0], t[-1] = t_start, t_end  # exact endpoints despite the round trip through the power
    return t.to(dtype=dtype, device=device)


def flexible_grid(grid: Tensor, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample grids ``(B, N+1)``: endpoints kept, each interior ``t_i`` uniform in its cell.

    The cell of ``t_i`` is ``[(t_{i-1} + t_i)/2, (t_i + t_{i+1})/2]`` so that the points stay ordered
    and every step stays positive.
    """
    n = grid.numel() - 1
    out = grid.expand(batch_size, n + 1).clone()
    if n >= 2:
        lo = 0.5 * (grid[:-2] + grid[1:-1])
        hi = 0.5 * (grid[1:-1] + grid[2:])
        u = torch.rand((batch_size, n - 1), generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else grid.device)
        out[:, 1:-1] = (lo + (hi - lo) * u.to(device=grid.device, dtype=grid.dtype))
    return out


DiffusionSpec = float | int | Sequence[float] | Tensor | Mapping[str, float] | Callable[[Tensor], Tensor]


class Diffusion:
    """The diffusion coefficient g: a constant, one value per grid point, ``{"start": g0, "end": g1}`` (geometric
    in t from g0 at the grid's first time to g1 at its last, ``g0 (g1/g0)^((t - t_0)/(t_N - t_0))``; any N), or a
    callable of t.

    ``at_grid(t)`` gives g at each point of a ``(B, N+1)`` grid; ``at_time(t)`` at continuous times.
    Per-grid-point values belong to the points of the fixed grid and are interpolated linearly in between,
    the same way everywhere: on a flexible training grid, in the ODE and in ``log_prob``.

    A learnable g is refused: its gradients would need the ``D log(g_N/g_0)`` term of the bound and the step
    ops' derivatives in g, which the loss leaves out (it is constant in the networks' parameters).
    """

    def __init__(self, spec: DiffusionSpec):
        self.spec = spec
        if isinstance(spec, Mapping):
            ends = [spec.get(k) for k in ("start", "end")]
            if set(spec) != {"start", "end"} or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in ends):
                raise ValueError(f"diffusion: expected {{'start': g0, 'end': g1}} with positive finite g0, g1, got "
                                 f"{dict(spec)!r}")
            self.kind = "geometric"
            self.ends = (float(ends[0]), float(ends[1]))
        elif callable(spec) and not isinstance(spec, Tensor):
            params = getattr(spec, "parameters", None)
            if callable(params) and any(p.requires_grad for p in params()):
                raise ValueError("diffusion: a module with learnable parameters is not supported (the loss treats g "
                                 "as fixed); freeze them (requires_grad_(False)) or pass a float, a list or a function")
            self.kind = "callable"
        elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
            if not spec > 0:
                raise ValueError(f"diffusion: expected a positive value of g, got {spec}")
            self.kind = "constant"
        else:
            values = torch.as_tensor(spec, dtype=torch.float64, device="cpu").flatten()  # meta-device safe
            if values.numel() < 2 or not bool((values > 0).all()):
                raise ValueError(
                    "diffusion: expected a positive float, a sequence of N+1 positive values (one per grid "
                    f"point) or a callable of t; got {spec!r}"
                )
            self.kind = "per_point"
            self.values = values

    def config(self):
        if self.kind == "constant":
            return float(self.spec)
        if self.kind == "per_point":
            return self.values.tolist()
        if self.kind == "geometric":
            return {"start": self.ends[0], "end": self.ends[1]}
        return None  # callables are not serialisable; the caller must pass them again

    def check_steps(self, num_steps: int) -> None:
        if self.kind == "per_point" and self.values.numel() != num_steps + 1:
            raise ValueError(
                f"diffusion: {self.values.numel()} per-grid-point values given, but num_steps={num_steps} needs "
                f"{num_steps + 1}; pass a float or a callable of t to change the number of steps"
            )

    def at_grid(self, t: Tensor, fixed_grid: Tensor | None = None) -> Tensor:
        """g at the points of ``(B, N+1)`` grids. Per-grid-point values: by index when ``fixed_grid`` is None,
        else interpolated over ``fixed_grid`` (the same values at its points; in between for flexible grids)."""
        if self.kind == "constant":
            return torch.full_like(t, float(self.spec))
        if self.kind == "per_point":
            self.check_steps(t.shape[-1] - 1)
            if fixed_grid is not None:
                return self.at_time(t, fixed_grid)
            return self.values.to(device=t.device, dtype=t.dtype).expand_as(t).clone()
        if self.kind == "geometric":
            return self._geometric(t, t[..., :1], t[..., -1:]) if fixed_grid is None else self.at_time(t, fixed_grid)
        return self._call(t)

    def at_time(self, t: Tensor, fixed_grid: Tensor) -> Tensor:
        if self.kind == "constant":
            return torch.full_like(t, float(self.spec))
        if self.kind == "per_point":
            grid = fixed_grid.to(device=t.device, dtype=t.dtype)
            vals = self.values.to(device=t.device, dtype=t.dtype)
            idx = torch.searchsorted(grid, t.clamp(grid[0], grid[-1]).contiguous()).clamp(1, grid.numel() - 1)
            t0, t1 = grid[idx - 1], grid[idx]
            w = (t - t0) / (t1 - t0)
            return vals[idx - 1] * (1 - w) + vals[idx] * w
        if self.kind == "geometric":
            grid = fixed_grid.to(device=t.device, dtype=t.dtype)
            return self._geometric(t, grid[0], grid[-1])
        return self._call(t)

    def _geometric(self, t: Tensor, t0: Tensor, t1: Tensor) -> Tensor:
        g0, g1 = self.ends
        return g0 * (g1 / g0) ** ((t - t0) / (t1 - t0)).clamp(0.0, 1.0)

    def _call(self, t: Tensor) -> Tensor:
        g = self.spec(t)
        if isinstance(g, Tensor) and g.requires_grad:
            raise ValueError("diffusion: the callable returned a g that requires grad (a learnable g is not supported: "
                             "the loss treats g as fixed); detach it or freeze its parameters")
        g = torch.as_tensor(g, dtype=t.dtype, device=t.device)
        if g.shape != t.shape:
            try:
                g = g.expand(t.shape)
            except RuntimeError:
                raise ValueError(f"diffusion: the callable returned shape {tuple(g.shape)} for times of shape "
                                 f"{tuple(t.shape)}; expected a scalar or the times' shape") from None
        if not bool(((g > 0) & torch.isfinite(g)).all()):
            raise ValueError("diffusion: the callable returned a g that is not finite and positive at some time")
        return g


class ProgressiveSteps:
    """Progressive training: the number of steps N grows from ``start`` to ``end`` during training.

    ``N(it)`` rises linearly in ``warmup_iters`` iterations, rounded to a multiple of ``multiple``.
    """

    def __init__(self, start: int = 5, end: int = 30, warmup_iters: int = 1000, multiple: int = 1):
        check_num_steps(start, "start")
        check_num_steps(end, "end")
        if end < start:
            raise ValueError(f"end: expected end >= start ({start}), got {end}")
        if warmup_iters < 0:
            raise ValueError(f"warmup_iters: expected a non-negative integer, got {warmup_iters}")
        self.start, self.end, self.warmup_iters, self.multiple = start, end, warmup_iters, max(1, int(multiple))

    def __call__(self, iteration: int) -> int:
        if self.warmup_iters == 0 or iteration >= self.warmup_iters:
            return self.end
        n = self.start + (self.end - self.start) * iteration / self.warmup_iters
        n = int(math.floor(n / self.multiple)) * self.multiple
        return max(self.start, min(self.end, n))

    def __repr__(self) -> str:
        return f"ProgressiveSteps(start={self.start}, end={self.end}, warmup_iters={self.warmup_iters})"
