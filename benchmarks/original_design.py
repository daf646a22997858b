"""The ORIGINAL DiffFlow training design, re-implemented for comparison (benchmark baseline (d)).

This follows the structure of the authors' stochastic-adjoint training code (``QuickDiffFlow`` /
``SdeF`` in github.com/qsh-zh/DiffFlow), written here against this package's networks, grid and prior so
that it computes the *same* loss and gradients as :class:`diffflow_ext.DiffFlow` with ``gradient="adjoint"``:

* unfused PyTorch step math, no custom ops;
* forward (no grad), per step ``i``: ``z = x + f(x, t_i) dt_i + sqrt(dt_i) g_i eps`` and
  ``delta = (x - z + (f(z, t_{i+1}) - g_{i+1}^2 s(z, t_{i+1})) dt_i) / (g_{i+1} sqrt(dt_i))`` -- three network
  evaluations per step (the drift twice per state: at ``x_i`` as "f" and at ``x_{i+1}`` as the backward
  drift); the states go into a preallocated history tensor; the log-ratio
  ``-0.5 (||delta||^2 - ||eps||^2)`` is accumulated as in the original;
* backward walk, per step ``i = N-1..0``: ``x_i`` and ``x_{i+1}`` set to require grad, ``delta`` recomputed
  with grad (``f`` and ``s`` at ``x_{i+1}``) and pulled back by one ``autograd.grad`` onto
  ``(x_i, x_{i+1}, params)``, then ``x_i + f(x_i, t_i) dt_i`` recomputed with grad and pulled back by a second
  ``autograd.grad`` with the cotangent of ``x_{i+1}`` -- again three network forward+VJPs per step.

The per-sample loss is ``prior_nll(x_N) + sum_i 0.5 ||delta_i||^2`` (the ``eps`` term of the original's
log-ratio is a constant for the gradients; it is computed, as there, but not added).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["OriginalDesign"]


def _half_sqnorm(v: Tensor) -> Tensor:
    return 0.5 * v.flatten(start_dim=1).square().sum(dim=1)


class _OriginalSde(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0: Tensor, runner: "OriginalDesign", *params: Tensor):
        m, (t, dt, g) = runner.model, runner.coeffs
        N, B = dt.numel(), x0.shape[0]
        history = x0.new_zeros((N, *x0.shape))
        total = x0.new_zeros(B)
        eps_total = x0.new_zeros(B)
        x = x0
        with torch.no_grad():
            for i in range(N):
                history[i] = x
                eps = torch.randn(x.shape, generator=runner.generator, dtype=x.dtype, device=x.device)
                z = x + m.drift(x, t[i].expand(B)) * dt[i] + torch.sqrt(dt[i]) * g[i] * eps
                f_b = m.drift(z, t[i + 1].expand(B)) - g[i + 1] ** 2 * m.score(z, t[i + 1].expand(B))
                delta = (x - z + f_b * dt[i]) / (g[i + 1] * torch.sqrt(dt[i]))
                total += _half_sqnorm(delta)
                eps_total += _half_sqnorm(eps)
                x = z
        ctx.runner, ctx.params = runner, params
        ctx.save_for_backward(history, x)
        runner.last_eps_half_sqnorm = eps_total
        return x.clone(), total

    @staticmethod
    def backward(ctx, adj_z: Tensor, w: Tensor):
        history, z = ctx.saved_tensors
        runner, params = ctx.runner, ctx.params
        m, (t, dt, g) = runner.model, runner.coeffs
        N, B = dt.numel(), z.shape[0]
        grads: list[Tensor | None] = [None] * len(params)

        def accumulate(got):
            for k, gk in enumerate(got):
                if gk is not None:
                    grads[k] = gk if grads[k] is None else grads[k] + gk

        for i in range(N - 1, -1, -1):
            with torch.enable_grad():
                x = history[i].detach().requires_grad_(True)
                zz = z.detach().requires_grad_(True)
                f_b = m.drift(zz, t[i + 1].expand(B)) - g[i + 1] ** 2 * m.score(zz, t[i + 1].expand(B))
                delta = (x - zz + f_b * dt[i]) / (g[i + 1] * torch.sqrt(dt[i]))
                d_x, d_z, *d_pb = torch.autograd.grad(_half_sqnorm(delta), (x, zz, *params), w,
                                                      allow_unused=True)
                nxt = x + m.drift(x, t[i].expand(B)) * dt[i]
                d_x2, *d_pf = torch.autograd.grad(nxt, (x, *params), d_z + adj_z, allow_unused=True)
            accumulate(d_pb)
            accumulate(d_pf)
            adj_z = d_x2 + d_x
            z = history[i]
        return (adj_z, None, *grads)


class OriginalDesign:
    """Training loss of a :class:`diffflow_ext.DiffFlow` (fixed grid) computed the original way."""

    def __init__(self, model):
        self.model = model
        self.generator: torch.Generator | None = None
        self.last_eps_half_sqnorm: Tensor | None = None

    def _coeffs(self, x: Tensor):
        m = self.model
        t64 = m.timestamps.to(x.device)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        g = m.diffusion.at_grid(t64.unsqueeze(0))[0].to(acc)
        return t64.to(x.dtype), (t64[1:] - t64[:-1]).to(acc), g

    def loss_per_sample(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self.generator, self.coeffs = generator, self._coeffs(x0)
        params = tuple(p for p in self.model.parameters() if p.requires_grad)
        x_n, half_sq = _OriginalSde.apply(x0, self, *params)
        return self.model.prior_nll(x_n) + half_sq

    def loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.loss_per_sample(x0, generator).mean()
