"""The DiffFlow trajectory walks: the forward walk and its stochastic-adjoint backward walk.

Per sample, with states ``x_0..x_N`` on a grid ``t`` (``(B, N+1)``) and g values ``g`` (``(B, N+1)``),

    loss = -log p_B(x_N) + sum_{i<N} 0.5 ||delta_i||^2,   x_{i+1} = em_step(x_i, f_i(x_i), eps_i, dt_i, g_i),
    delta_i = backward_noise(x_i, x_{i+1}, f_{i+1}(x_{i+1}), s_{i+1}(x_{i+1}), dt_i, g_{i+1}).

Each network is evaluated once per state: the drift at ``x_i`` feeds both the step to ``x_{i+1}`` and
``delta_{i-1}`` (fused in ``ops.flow_step``). The score is never needed at ``x_0``.

Gradients (``gradient="adjoint"``): the forward walk runs without a graph and keeps only the states; the
backward walk visits ``i = N..0``, re-evaluates the two networks at ``x_i`` with grad, gets the
cotangents of their outputs from ``ops.adjoint_step`` and pulls them back with one VJP. No noise is
replayed: ``delta`` depends only on neighbouring states. ``gradient="autograd"`` unrolls the same walk
with the graph kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["Walk", "forward_walk", "adjoint_loss"]


@dataclass
class Walk:
    """Everything one trajectory needs besides its start: networks, grid, prior, noise, backend."""

    drift: nn.Module
    score: nn.Module
    t: Tensor  # (B, N+1) network times
    dt: Tensor  # (B, N)  in the accumulation dtype
    g: Tensor  # (B, N+1) in the accumulation dtype
    prior_nll: Callable[[Tensor], Tensor]  # x_N -> (B,) -log p_B(x_N)
    noise: Callable[[Tensor], Tensor]  # like-x -> standard normal noise (consumes the generator)
    backend: str = "auto"

    @property
    def num_steps(self) -> int:
        return self.dt.shape[1]


@dataclass
class WalkResult:
    loss: Tensor  # (B,) -log p_B(x_N) + sum_i 0.5||delta_i||^2
    states: list[Tensor] | None  # x_0..x_N when kept
    eps_half_sqnorm: Tensor | None  # (B,) sum_i 0.5||eps_i||^2 when asked for


def forward_walk(walk: Walk, x0: Tensor, *, keep_states: bool, eps_norms: bool = False) -> WalkResult:
    """Run the forward SDE from ``x0`` and accumulate the loss; differentiable if grad mode is on."""
    N, b = walk.num_steps, walk.backend
    t, dt, g = walk.t, walk.dt, walk.g
    states = [x0] if keep_states else None
    eps_sq = torch.zeros(x0.shape[0], dtype=dt.dtype, device=x0.device) if eps_norms else None

    def draw(x: Tensor) -> Tensor:
        nonlocal eps_sq
        eps = walk.noise(x)
        if eps_sq is not None:
            eps_sq = eps_sq + 0.5 * eps.to(dt.dtype).square().reshape(eps.shape[0], -1).sum(1)
        return eps

    x_prev, x = x0, ops.em_step(x0, walk.drift(x0, t[:, 0]), draw(x0), dt[:, 0], g[:, 0], backend=b)
    if states is not None:
        states.append(x)
    total = torch.zeros(x0.shape[0], dtype=dt.dtype, device=x0.device)
    for i in range(1, N):
        f, s = walk.drift(x, t[:, i]), walk.score(x, t[:, i])
        x_next, h = ops.flow_step(x_prev, x, f, s, draw(x), dt[:, i - 1], dt[:, i], g[:, i], backend=b)
        total = total + h
        x_prev, x = x, x_next
        if states is not None:
            states.append(x)
    f, s = walk.drift(x, t[:, N]), walk.score(x, t[:, N])
    _, h = ops.backward_noise(x_prev, x, f, s, dt[:, N - 1], g[:, N], backend=b)
    total = total + h + walk.prior_nll(x).to(total.dtype)
    return WalkResult(total, states, eps_sq)


class _AdjointLoss(torch.autograd.Function):
    """Per-sample loss with the stochastic adjoint: O(1) network activations in N."""

    @staticmethod
    def forward(ctx, walk: Walk, x0: Tensor, *params: Tensor) -> Tensor:
        with torch.no_grad():
            res = forward_walk(walk, x0, keep_states=True)
        ctx.walk, ctx.states = walk, res.states
        ctx.params = params
        return res.loss

    @staticmethod
    def backward(ctx, w: Tensor):
        walk, xs, params = ctx.walk, ctx.states, ctx.params
        N, b = walk.num_steps, walk.backend
        t, dt, g = walk.t, walk.dt, walk.g
        grads: list[Tensor | None] = [None] * len(params)
        # parameters of each network (by position in ``params``), so that each VJP materialises only one
        # network's gradients next to the running sums, which are accumulated in place
        index = {id(p): k for k, p in enumerate(params)}
        groups = [[index[id(p)] for p in net.parameters() if id(p) in index] for net in (walk.drift, walk.score)]

        def pull_back(outputs, cotangents, x, group, retain):
            """VJP of one network's outputs at ``x``; accumulates its parameter grads, returns d/dx."""
            if not outputs.requires_grad:  # a fixed network whose output has no graph: nothing to pull back
                return None
            got = torch.autograd.grad(outputs, (x, *(params[k] for k in group)), cotangents, allow_unused=True,
                                      retain_graph=retain)
            for k, gk in zip(group, got[1:]):
                if gk is not None:
                    if grads[k] is None:
                        grads[k] = gk
                    else:
                        grads[k].add_(gk)
            return got[0]

        w = w.detach()
        zeros = torch.zeros_like(xs[0])
        adj_next, adj_direct = zeros, zeros
        for i in range(N, -1, -1):
            with torch.enable_grad():
                x = xs[i].detach().requires_grad_(True)
                f = walk.drift(x, t[:, i])
                if i > 0:
                    s = walk.score(x, t[:, i])
                    prev, dt_prev, weight = xs[i - 1], dt[:, i - 1], w
                else:  # no transition into x_0: weight 0 turns adjoint_step into the plain EM pull-back
                    s, prev, dt_prev, weight = f, xs[0], dt[:, 0], torch.zeros_like(w)
                adj_prev, cot_x, cot_f, cot_s = ops.adjoint_step(
                    prev, xs[i], f.detach(), s.detach(), weight, adj_next, adj_direct,
                    dt_prev, dt[:, min(i, N - 1)], g[:, i], backend=b)
                adj = cot_x  # a fresh buffer from adjoint_step: accumulate into it in place
                if i == N:  # the prior's gradient enters at x_N
                    (gp,) = torch.autograd.grad(walk.prior_nll(x), x, w.to(cot_x.dtype))
                    adj.add_(gp)
                for out, cot, group in ((f, cot_f, groups[0]), (s, cot_s, groups[1]))[: 2 if i > 0 else 1]:
                    gx = pull_back(out, cot, x, group, retain=False)
                    if gx is not None:
                        adj.add_(gx)
                adj_next = adj
            adj_direct = adj_prev
        # adj_next is now dL/dx_0.
        return (None, adj_next if ctx.needs_input_grad[1] else None, *grads)


def adjoint_loss(walk: Walk, x0: Tensor) -> Tensor:
    """Per-sample loss ``(B,)`` whose backward runs the stochastic adjoint."""
    params = tuple(p for m in (walk.drift, walk.score) for p in m.parameters() if p.requires_grad)
    # de-duplicate shared parameters (e.g. drift and score sharing a trunk)
    seen, uniq = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            uniq.append(p)
    return _AdjointLoss.apply(walk, x0, *uniq)
