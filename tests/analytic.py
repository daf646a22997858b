"""Analytic test models: linear drifts and scores looked up by grid point, and closed-form answers.

For linear, per-grid-point coefficients every density of the discretised DiffFlow is Gaussian, so
NELBOs, exact likelihoods and normalizing-flow log-determinants have closed forms (float64 numpy).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class GridLinear(nn.Module):
    """``net(x, t) = coef[i] * x`` where ``i`` is the index of ``t`` on a fixed grid.

    ``coef``: ``(N+1,)`` (isotropic) or ``(N+1, D)`` (per dimension). ``calls`` counts evaluations.
    """

    def __init__(self, grid: torch.Tensor, coef, learnable: bool = False):
        super().__init__()
        self.register_buffer("grid", torch.as_tensor(grid, dtype=torch.float64))
        c = torch.as_tensor(np.asarray(coef), dtype=torch.float64)
        self.coef = nn.Parameter(c, requires_grad=learnable) if learnable else None
        if not learnable:
            self.register_buffer("coef_buf", c)
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        coef = self.coef if self.coef is not None else self.coef_buf
        idx = torch.argmin((t.to(torch.float64)[:, None] - self.grid[None, :]).abs(), dim=1)
        c = coef[idx].to(x.dtype)
        if c.dim() == 1:
            c = c.reshape(-1, *([1] * (x.dim() - 1)))
        return c * x


class ContinuousGaussianScore(nn.Module):
    """Exact score of the forward marginal ``N(0, (v0 + g^2 t) I)`` of ``dx = g dw`` from ``N(0, v0 I)``."""

    def __init__(self, v0: float, g: float):
        super().__init__()
        self.v0, self.g = v0, g

    def forward(self, x, t):
        var = self.v0 + self.g**2 * t.to(x.dtype)
        return -x / var.reshape(-1, *([1] * (x.dim() - 1)))


class Zero(nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


def gaussian_nll(x: np.ndarray, var) -> np.ndarray:
    """``-log N(x; 0, var I)`` per row (``var`` scalar or per dimension)."""
    var = np.broadcast_to(np.asarray(var, dtype=np.float64), x.shape[1:])
    return 0.5 * np.sum(x**2 / var + np.log(2 * math.pi * var), axis=1)


def reversal_coefficients(grid: np.ndarray, drift: np.ndarray, v0: float, g0: float):
    """g and score coefficients that make the backward chain the exact reversal of the forward one.

    Forward (isotropic, per dimension): ``x_{i+1} = A_i x_i + g_i sqrt(dt_i) eps``, ``A_i = 1 + a_i dt_i``,
    data ``N(0, v0)``; marginal variances ``V_{i+1} = A_i^2 V_i + g_i^2 dt_i``. The posterior
    ``p_F(x_i | x_{i+1})`` has mean ``A_i V_i / V_{i+1} x_{i+1}`` and variance ``V_i g_i^2 dt_i / V_{i+1}``;
    the backward kernel matches it when ``g_{i+1}^2 = g_i^2 V_i / V_{i+1}`` and
    ``1 - (a_{i+1} - g_{i+1}^2 c_{i+1}) dt_i = A_i V_i / V_{i+1}``. Returns ``(g, c, V)``.
    """
    n = len(grid) - 1
    dt = np.diff(grid)
    g = np.empty(n + 1)
    c = np.zeros(n + 1)
    V = np.empty(n + 1)
    g[0], V[0] = g0, v0
    for i in range(n):
        A = 1 + drift[i] * dt[i]
        V[i + 1] = A * A * V[i] + g[i] ** 2 * dt[i]
        g[i + 1] = g[i] * math.sqrt(V[i] / V[i + 1])
        c[i + 1] = (A * V[i] / V[i + 1] - 1 + drift[i + 1] * dt[i]) / (g[i + 1] ** 2 * dt[i])
    return g, c, V


def expected_nelbo(x0: np.ndarray, grid, drift, score, g, prior_var) -> np.ndarray:
    """Closed-form ``E[-ELBO | x0]`` for isotropic linear drift ``a_i x`` and score ``c_i x``."""
    D = x0.shape[1]
    dt = np.diff(grid)
    n = len(dt)
    r2 = np.sum(x0**2, axis=1)
    m, Vc = 1.0, 0.0  # x_i | x0 ~ N(m x0, Vc I)
    total = np.zeros(len(x0))
    for i in range(n):
        A = 1 + drift[i] * dt[i]
        sig2 = g[i] ** 2 * dt[i]
        beta = 1 - (drift[i + 1] - g[i + 1] ** 2 * score[i + 1]) * dt[i]
        gam2 = g[i + 1] ** 2 * dt[i]
        k = 1 - beta * A
        e_delta2 = (k * k * m * m * r2 + D * (k * k * Vc + beta * beta * sig2)) / gam2
        total += D * math.log(g[i + 1] / g[i]) + 0.5 * e_delta2 - 0.5 * D
        m, Vc = A * m, A * A * Vc + sig2
    total += 0.5 * D * math.log(2 * math.pi * prior_var) + (m * m * r2 + D * Vc) / (2 * prior_var)
    return total


def backward_marginal_var(grid, drift, score, g, prior_var) -> float:
    """Variance of ``p_B(x_0)`` for the linear backward chain started at ``N(0, prior_var)``."""
    dt = np.diff(grid)
    W = prior_var
    for i in range(len(dt) - 1, -1, -1):
        beta = 1 - (drift[i + 1] - g[i + 1] ** 2 * score[i + 1]) * dt[i]
        W = beta * beta * W + g[i + 1] ** 2 * dt[i]
    return W
