"""A fixed-drift diffusion (DDPM-like): a fixed linear forward drift, only the score is learned.

Forward SDE ``dx = -beta/2 x dt + g dw`` on ``[t_start, t_end]`` (``beta = g^2`` is the variance-preserving
choice: ``x(t_end)`` is close to ``N(0, 1)`` when ``beta (t_end - t_start)`` is large; ``beta = 0`` is the
variance-exploding one). The model is an ordinary :class:`~diffflow_ext.DiffFlow` whose drift is the fixed
:class:`LinearDrift`, so it samples, computes ``log_prob`` and ``nll_bound`` like any DiffFlow, and can be
trained two ways:

* by the DiffFlow objective, ``model.loss(x0)`` (both gradient modes accept a drift without parameters);
* by denoising score matching, :func:`dsm_loss`, which uses the closed-form transition of the linear SDE
  ``x_t | x_0 ~ N(a_t x_0, sigma_t^2 I)``, ``a_t = exp(-beta (t - t_start) / 2)``,
  ``sigma_t^2 = g^2 (1 - exp(-beta (t - t_start))) / beta`` (``g^2 (t - t_start)`` for ``beta = 0``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..model import DiffFlow
from ..networks import SinusoidalTimeEmbedding, TimeMLP

__all__ = ["LinearDrift", "fixed_drift_diffusion", "transition", "dsm_loss", "time_features_for"]


class LinearDrift(nn.Module):
    """The fixed drift ``f(x, t) = -beta/2 x`` (no parameters; its output carries no graph)."""

    def __init__(self, beta: float):
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"beta: expected a finite number >= 0, got {beta!r}")
        self.beta = float(beta)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return (-0.5 * self.beta) * x

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


def time_features_for(t_end: float, dim: int = 32) -> SinusoidalTimeEmbedding:
    """Sinusoidal time features whose band covers ``t in [0, t_end]`` like the default band covers [0, 0.05]."""
    scale = 0.05 / float(t_end)
    return SinusoidalTimeEmbedding(dim, 1.0 * scale, 2000.0 * scale)


def fixed_drift_diffusion(
    dim: int, *, beta: float = 8.0, diffusion: float | None = None, t_start: float = 1e-3, t_end: float = 1.0,
    num_steps: int = 30, time_exponent: float = 1.0, hidden: int = 64, depth: int = 3, time_dim: int = 32,
    **kwargs,
) -> DiffFlow:
    """A DiffFlow with the fixed drift ``-beta/2 x`` and a learned score ``TimeMLP`` (VP by default:
    ``g = sqrt(beta)``). ``kwargs`` go to :class:`DiffFlow` (``gradient``, ``backend``, ``prior_std`` ...)."""
    g = math.sqrt(beta) if diffusion is None else float(diffusion)
    score = TimeMLP(dim, hidden, depth, time_dim)
    score.time_embed = time_features_for(t_end, time_dim)
    return DiffFlow(LinearDrift(beta), score, (dim,), num_steps=num_steps, t_start=t_start, t_end=t_end,
                    time_exponent=time_exponent, diffusion=g, **kwargs)


def _linear_params(model: DiffFlow) -> tuple[float, float]:
    if not isinstance(model.drift, LinearDrift):
        raise TypeError("dsm_loss: expected a model whose drift is a LinearDrift (see fixed_drift_diffusion)")
    if model.diffusion.kind != "constant":
        raise ValueError("dsm_loss: expected a constant diffusion coefficient g")
    return model.drift.beta, float(model.diffusion.spec)


def transition(model: DiffFlow, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(a_t, sigma_t)`` of ``x_t | x_{t_start} ~ N(a_t x, sigma_t^2 I)`` for ``t`` of shape ``(B,)``."""
    beta, g = _linear_params(model)
    s = (t.to(torch.float64) - model.t_start).clamp_min(0.0)
    if beta == 0.0:
        return torch.ones_like(s), g * s.sqrt()
    return torch.exp(-0.5 * beta * s), g * torch.sqrt(-torch.expm1(-beta * s) / beta)


def dsm_loss(model: DiffFlow, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Denoising score matching, ``E ||sigma_t s(x_t, t) + eps||^2 / 2`` summed over dimensions, batch mean.

    ``t`` is drawn with the density of the model's grid (``t^e`` uniform between ``t_start^e`` and ``t_end^e``),
    so the score is trained where the samplers evaluate it.
    """
    B = x0.shape[0]
    e = model.time_exponent
    u = torch.rand(B, generator=generator, dtype=torch.float64, device=x0.device)
    t = (model.t_start**e + u * (model.t_end**e - model.t_start**e)) ** (1.0 / e)
    a, sigma = transition(model, t)
    shape = (B,) + (1,) * (x0.dim() - 1)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    xt = a.to(x0.dtype).reshape(shape) * x0 + sigma.to(x0.dtype).reshape(shape) * eps
    s = model.score(xt, t.to(x0.dtype))
    return 0.5 * (sigma.to(x0.dtype).reshape(shape) * s + eps).square().reshape(B, -1).sum(1).mean()
