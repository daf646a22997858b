"""Gradients of the walk with the networks' graphs kept for some states and recomputed for the rest.

The forward walk (:func:`~.walk.forward_walk`) keeps every state ``x_i``. For each state the plan
(:mod:`.memory`) says whether the networks' graphs at ``x_i`` are kept; the others are evaluated without a
graph and, in the backward walk, re-evaluated at ``x_i`` with the first pass's RNG state, autocast state and
running statistics. The backward walk visits ``i = N..0``: ``ops.adjoint_step`` gives the cotangents of the
networks' outputs at ``x_i`` (the step math, fused), and one VJP pulls them back onto ``x_i`` and the
parameters. No noise is replayed: ``delta`` depends only on neighbouring states.

``gradient="adjoint"`` is the plan that keeps nothing (every network evaluated twice, O(1) graphs in N);
``gradient="auto"`` keeps as many graphs as the memory budget allows, up to all of them (no recomputation:
each network evaluated once and pulled back once per state).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import ops
from .memory import Plan, make_plan, work_bytes
from .walk import RngSnapshot, Walk, forward_walk, frozen_running_stats, running_stat_modules

__all__ = ["checkpointed_loss", "SavedBytes", "measure_graph_bytes"]


class SavedBytes:
    """Counts the bytes of the distinct storages autograd saves inside its context, ignoring ``exclude``
    (parameters, buffers and the input, which exist anyway)."""

    def __init__(self, exclude: set[int]):
        self.seen = set(exclude)
        self.total = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def add(self, t: Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
            return
        ptr = st.data_ptr()
        if ptr and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += st.nbytes()

    def _pack(self, t: Tensor) -> Tensor:
        self.add(t)
        return t

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _storage_ptrs(tensors) -> set[int]:
    out = set()
    for t in tensors:
        try:
            out.add(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            pass
    return out


def _networks(walk: Walk) -> list:
    """The walk's distinct networks (drift and score may be one module)."""
    return [walk.drift] if walk.score is walk.drift else [walk.drift, walk.score]


def _own_storage(nets: list) -> set[int]:
    """Storages of the networks' parameters and buffers: they exist anyway, so graphs are not charged for them."""
    return _storage_ptrs(p for net in nets if isinstance(net, torch.nn.Module)
                         for p in list(net.parameters()) + list(net.buffers()))


def measure_graph_bytes(walk: Walk, x0: Tensor) -> int:
    """Bytes autograd saves for one state's network calls (drift and score at state ``min(1, N)``), measured on a
    throw-away call that leaves no trace: the RNG is restored and running statistics are untouched, so a
    decision taken from it is a function of the call's shapes alone (the same before and after a resume)."""
    nets = _networks(walk)
    exclude = _own_storage(nets)
    x = x0.detach().requires_grad_(True)
    with RngSnapshot(x.device).restored(), frozen_running_stats(running_stat_modules(nets)):
        with torch.enable_grad(), SavedBytes(exclude | _storage_ptrs([x0])) as counter:
            outs = walk.networks(x, min(1, walk.num_steps))
        for out in outs:
            if out is not None:
                counter.add(out)
    return counter.total


class _CheckpointedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, walk: Walk, x0: Tensor, options: dict, *params: Tensor) -> Tensor:
        N = walk.num_steps
        budget, schedule = options["budget_bytes"], options["schedule"]
        nets = _networks(walk)
        kept: list[tuple[Tensor, Tensor, Tensor | None] | None] = [None] * (N + 1)
        rngs: list[RngSnapshot | None] = [None] * (N + 1)
        plan: Plan | None = None
        if budget <= 0:
            plan = make_plan(N + 1, schedule, 0.0, 0, 0)
        elif math.isinf(budget):
            plan = make_plan(N + 1, schedule, budget, 0, 0)
        decide_at = min(1, N)  # undecided states (0 and 1) keep a graph, an RNG snapshot and measure it
        exclude = _own_storage(nets)
        measured = [0]

        def on_state(i: int, x: Tensor):
            nonlocal plan
            keep = plan.keep[i] if plan is not None else True
            if plan is None or not keep:
                rngs[i] = RngSnapshot(x.device)
            if not keep:
                with torch.no_grad():
                    return walk.networks(x, i)
            xl = x.detach().requires_grad_(True)
            if plan is None:
                with torch.enable_grad(), SavedBytes(exclude | _storage_ptrs([x])) as counter:
                    f, s = walk.networks(xl, i)
                for out in (f, s):
                    if out is not None:
                        counter.add(out)
                measured[0] = counter.total
            else:
                with torch.enable_grad():
                    f, s = walk.networks(xl, i)
            kept[i] = (xl, f, s)
            if plan is None and i == decide_at:
                state_bytes = x.numel() * x.element_size()
                param_bytes = sum(p.numel() * p.element_size() for p in params)
                work = work_bytes(measured[0], param_bytes, state_bytes)
                plan = make_plan(N + 1, schedule, budget, measured[0], work)
                for j in range(i + 1):
                    if not plan.keep[j]:
                        kept[j] = None
            return f.detach(), (s.detach() if s is not None else None)

        with torch.no_grad():
            res = forward_walk(walk, x0.detach(), keep_states=True, on_state=on_state)
        assert plan is not None
        options["plan"] = plan
        ctx.walk, ctx.states, ctx.kept, ctx.rngs, ctx.params = walk, res.states, kept, rngs, params
        ctx.autocast = walk.autocast
        ctx.stat_modules = running_stat_modules(nets)
        return res.loss

    @staticmethod
    @once_differentiable
    def backward(ctx, w: Tensor):
        walk, xs, kept, rngs, params = ctx.walk, ctx.states, ctx.kept, ctx.rngs, ctx.params
        ctx.kept = ctx.states = None  # free the graphs as the walk goes
        N, b = walk.num_steps, walk.backend
        dt, g = walk.dt, walk.g
        grads: list[Tensor | None] = [None] * len(params)
        index = {id(p): k for k, p in enumerate(params)}
        groups = [[index[id(p)] for p in net.parameters() if id(p) in index] if isinstance(net, torch.nn.Module)
                  else [] for net in (walk.drift, walk.score)]
        w = w.detach()
        zeros = torch.zeros_like(xs[0])
        adj_next, adj_direct = zeros, zeros
        for i in range(N, -1, -1):
            rec, kept[i] = kept[i], None
            if rec is None:  # recompute exactly as the first pass
                with rngs[i].restored(), frozen_running_stats(ctx.stat_modules), torch.enable_grad():
                    x = xs[i].detach().requires_grad_(True)
                    f, s = walk.networks(x, i)
                rngs[i] = None
            else:
                x, f, s = rec
            if i > 0:
                prev, dt_prev, weight, s_val = xs[i - 1], dt[:, i - 1], w, s.detach()
            else:  # no transition into x_0: weight 0 turns adjoint_step into the plain EM pull-back
                prev, dt_prev, weight, s_val = xs[0], dt[:, 0], torch.zeros_like(w), f.detach()
            adj_prev, cot_x, cot_f, cot_s = ops.adjoint_step(
                prev, xs[i], f.detach(), s_val, weight, adj_next, adj_direct,
                dt_prev, dt[:, min(i, N - 1)], g[:, i], backend=b)
            adj = cot_x  # a fresh buffer from adjoint_step: accumulate into it in place
            with torch.enable_grad():
                if i == N:  # the prior's gradient enters at x_N (and reaches a learned prior's parameters)
                    prior_params = [p for p in walk.prior_params if id(p) in index]
                    got = torch.autograd.grad(walk.prior_nll(x), (x, *prior_params), w.to(cot_x.dtype))
                    adj.add_(got[0])
                    for p, gk in zip(prior_params, got[1:]):
                        k = index[id(p)]
                        grads[k] = gk if grads[k] is None else grads[k].add_(gk)
                    got = None
                # one VJP per network, so that only one network's fresh parameter grads exist next to the
                # running sums (accumulated in place) -- the lowest peak; a fixed network's output has no graph
                for out, cot, group in ((f, cot_f, groups[0]), (s, cot_s, groups[1]))[: 2 if i > 0 else 1]:
                    if not out.requires_grad:
                        continue
                    got = torch.autograd.grad(out, (x, *(params[k] for k in group)), cot, allow_unused=True)
                    if got[0] is not None:
                        adj.add_(got[0])
                    for k, gk in zip(group, got[1:]):
                        if gk is not None:
                            if grads[k] is None:
                                grads[k] = gk
                            else:
                                grads[k].add_(gk)
                    got = gk = None  # free the fresh grads before the next VJP
            del rec, f, s
            adj_next = adj
            adj_direct = adj_prev
        # adj_next is now dL/dx_0.
        return (None, adj_next if ctx.needs_input_grad[1] else None, None, *grads)


def checkpointed_loss(walk: Walk, x0: Tensor, budget_bytes: float, schedule: str = "end",
                      info: dict | None = None) -> Tensor:
    """Per-sample loss ``(B,)`` whose backward runs the backward walk, keeping the networks' graphs for as many
    states as ``budget_bytes`` allows (0: the stochastic adjoint; ``inf``: every graph kept). ``info``, when
    given, receives the plan under ``"plan"``."""
    nets = _networks(walk)
    seen, params = set(), []
    for p in itertools.chain(*(net.parameters() for net in nets if isinstance(net, torch.nn.Module)),
                             walk.prior_params):
        if p.requires_grad and id(p) not in seen:  # shared parameters (e.g. a common trunk) once
            seen.add(id(p))
            params.append(p)
    options = {"budget_bytes": float(budget_bytes), "schedule": schedule}
    loss = _CheckpointedLoss.apply(walk, x0, options, *params)
    if info is not None:
        info["plan"] = options["plan"]
    return loss
