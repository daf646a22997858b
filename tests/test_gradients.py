"""Gradient modes of DiffFlow: every mode must give autograd's gradients, for every kind of network."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from diffflow_ext import DiffFlow, TimeMLP
from diffflow_ext.gradients import CHECKPOINT_SCHEDULES, check_memory_budget, make_plan


def _grads(model, x0, seed, mode):
    model.gradient = mode
    model.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    loss = model.loss(x, torch.Generator().manual_seed(seed))
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return loss.detach(), grads, x.grad.clone()


class DetachedLinearDrift(nn.Module):
    """A fixed drift whose output carries no graph (computed from a detached input)."""

    def forward(self, x, t):
        return -2.0 * x.detach() * (1.0 + t.to(x.dtype)[:, None])


class ParameterFreeDrift(nn.Module):
    """A fixed drift without parameters, differentiable in x (a DDPM-like linear drift)."""

    def forward(self, x, t):
        return -0.5 * x * (1.0 + 10.0 * t.to(x.dtype)[:, None])


@pytest.mark.parametrize("drift_cls", [DetachedLinearDrift, ParameterFreeDrift])
def test_fixed_drift_gradients_equal_autograd(drift_cls):
    torch.manual_seed(0)
    score = TimeMLP(3, 16, 2, zero_init=False).double()
    model = DiffFlow(drift_cls(), score, (3,), num_steps=6, backend="torch")
    x0 = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    la, ga, xa = _grads(model, x0, 5, "adjoint")
    lb, gb, xb = _grads(model, x0, 5, "autograd")
    assert abs(la - lb) <= 1e-12 * abs(lb)
    for a, b in zip(ga, gb):
        assert b.abs().sum() > 0
        assert (a - b).norm() <= 1e-9 * b.norm()
    assert (xa - xb).norm() <= 1e-9 * xb.norm()


@pytest.mark.parametrize("mode", ["adjoint", "autograd"])
def test_fixed_drift_model_trains_and_samples(mode):
    torch.manual_seed(0)
    model = DiffFlow(ParameterFreeDrift(), TimeMLP(2, 32, 2), (2,), num_steps=8, gradient=mode, diffusion=1.0,
                     t_end=1.0, time_exponent=1.0)
    data = torch.randn(512, 2, generator=torch.Generator().manual_seed(2)) * 0.3 + torch.tensor([1.0, -1.0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = model.loss(data, gen)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    with torch.no_grad():
        final = model.loss(data, torch.Generator().manual_seed(4)).item()
    assert final < first - 0.5  # the score learns: the transition terms fall
    x = model.sample(256, generator=torch.Generator().manual_seed(5))
    assert x.shape == (256, 2) and torch.isfinite(x).all()


# ----------------------------------------------------------------------------- "auto": every budget, every schedule
def _mlp_model(**kw):
    torch.manual_seed(0)
    kw.setdefault("diffusion", [0.2, 0.35, 0.25, 0.4, 0.15, 0.3, 0.22])
    m = DiffFlow.mlp(3, hidden=16, depth=2, num_steps=6, backend="torch", **kw).double()
    for p in m.parameters():  # non-trivial networks (the default output layer starts at zero)
        nn.init.normal_(p, std=0.4)
    return m


@pytest.mark.parametrize("schedule", CHECKPOINT_SCHEDULES)
@pytest.mark.parametrize("grid", ["fixed", "flexible"])
def test_auto_equals_autograd_for_every_budget(schedule, grid):
    """float64, relative 1e-9, for budgets from nothing kept to everything kept (the plans say which)."""
    model = _mlp_model(checkpoint_schedule=schedule, grid=grid)
    x0 = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lb, gb, xb = _grads(model, x0, 7, "autograd")
    kept = set()
    for budget in (0, 1, 150_000, 200_000, 260_000, 330_000, 1.0, None):
        model.memory_budget = budget
        la, ga, xa = _grads(model, x0, 7, "auto")
        kept.add(model.last_gradient_plan["kept"])
        assert abs(la - lb) <= 1e-12 * abs(lb)
        for a, b in zip(ga, gb):
            assert b.abs().sum() > 0
            assert (a - b).norm() <= 1e-9 * b.norm(), budget
        assert (xa - xb).norm() <= 1e-9 * xb.norm()
    assert 0 in kept and 7 in kept and len(kept) >= 4, kept  # the budgets really span the range of plans


def test_plans_keep_what_the_budget_allows():
    G, work = 1000, 300
    for schedule in CHECKPOINT_SCHEDULES:
        assert make_plan(31, schedule, math.inf, G, work).num_kept == 31
        assert make_plan(31, schedule, 0.0, G, work).num_kept == 0
        assert make_plan(31, schedule, 31 * G + work, G, work).num_kept == 31
    end = make_plan(31, "end", 10 * G + work, G, work)
    assert end.keep == [False] * 21 + [True] * 10  # the states the backward walk visits first
    uni = make_plan(31, "uniform", 10 * G + work, G, work)
    assert uni.num_kept == 9 and uni.keep[-1]  # one recomputed graph coexists with the kept ones
    idx = [i for i, k in enumerate(uni.keep) if k]
    gaps = [b - a for a, b in zip(idx, idx[1:])]
    assert max(gaps) - min(gaps) <= 1  # evenly spaced
    assert 0 < end.recompute_fraction() < 1 and make_plan(31, "end", 0.0, G, work).recompute_fraction() == 1.0


@pytest.mark.parametrize("value,ok", [
    (None, None), (0, 0), (2**30, 2**30), (0.25, 0.25), (1.0, 1.0), (float("inf"), None), (3e9, 3_000_000_000),
    (-1, "memory_budget"), (-0.5, "memory_budget"), (float("nan"), "memory_budget"), ("2GB", "memory_budget"),
    (True, "memory_budget"),
])
def test_memory_budget_argument(value, ok):
    if isinstance(ok, str):
        with pytest.raises(ValueError, match=ok):
            check_memory_budget(value)
        with pytest.raises(ValueError, match=ok):
            DiffFlow.mlp(2, memory_budget=value)
    else:
        assert check_memory_budget(value) == ok


def test_auto_with_no_limit_calls_each_network_once_and_adjoint_twice():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.calls = TimeMLP(2, 8, 1, zero_init=False), 0

        def forward(self, x, t):
            self.calls += 1
            return self.net(x, t)

    for gradient, budget, factor in (("auto", None, 1), ("adjoint", None, 2), ("auto", 0, 2)):
        drift, score = Counting(), Counting()
        model = DiffFlow(drift, score, (2,), num_steps=5, gradient=gradient, memory_budget=budget)
        model.loss(torch.randn(4, 2)).backward()
        assert (drift.calls, score.calls) == (6 * factor, 5 * factor)


# ----------------------------------------------------------------------------- recomputation = first pass
class DropoutNet(nn.Module):
    def __init__(self, dim=3, p=0.3):
        super().__init__()
        self.a, self.b, self.drop = nn.Linear(dim + 1, 32), nn.Linear(32, dim), nn.Dropout(p)

    def forward(self, x, t):
        h = torch.tanh(self.a(torch.cat([x, t[:, None].to(x.dtype)], 1)))
        return self.b(self.drop(h)) + 0.1 * torch.rand_like(x)  # dropout and a second RNG use


@pytest.mark.parametrize("gradient,budget", [("adjoint", None), ("auto", 0), ("auto", 100_000), ("auto", None)])
@pytest.mark.parametrize("seeded", [True, False])
def test_dropout_recomputation_matches_autograd(gradient, budget, seeded):
    """The backward walk replays the first pass's RNG state: same masks, autograd's gradients. With no
    generator the walk's noise comes from the global RNG too, which must not be disturbed either."""
    torch.manual_seed(0)
    model = DiffFlow(DropoutNet(), DropoutNet(), (3,), num_steps=6, backend="torch", memory_budget=budget).double()
    x0 = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(mode):
        model.gradient = mode
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        gen = torch.Generator().manual_seed(5) if seeded else None
        loss = model.loss(x0, gen)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], torch.rand(3)  # RNG after the step

    lb, gb, rb = run("autograd")
    la, ga, ra = run(gradient)
    if gradient == "auto" and budget == 100_000:
        assert 0 < model.last_gradient_plan["kept"] < 7
    assert abs(la - lb) <= 1e-12 * abs(lb)
    for a, b in zip(ga, gb):
        assert (a - b).norm() <= 1e-9 * b.norm()
    assert torch.equal(ra, rb)  # the RNG stream after the iteration is the same as with autograd


class BatchNormNet(nn.Module):
    def __init__(self, dim=3):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(dim + 1, 16), nn.BatchNorm1d(16), nn.Linear(16, dim)

    def forward(self, x, t):
        return self.b(torch.tanh(self.bn(self.a(torch.cat([x, t[:, None].to(x.dtype)], 1)))))


@pytest.mark.parametrize("gradient,budget", [("adjoint", None), ("auto", 0), ("auto", 45_000)])
def test_batchnorm_running_stats_updated_once(gradient, budget):
    def fresh():
        torch.manual_seed(0)
        return DiffFlow(BatchNormNet(), BatchNormNet(), (3,), num_steps=5, backend="torch", gradient=gradient,
                        memory_budget=budget).double()

    x0 = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref, model = fresh(), fresh()
    ref.gradient = "autograd"
    for m in (ref, model):
        m.loss(x0, torch.Generator().manual_seed(2)).backward()
    for (name, a), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(a, b), name
    assert int(model.drift.bn.num_batches_tracked) == 6  # once per state (N + 1)
    if budget == 45_000:
        assert 0 < model.last_gradient_plan["kept"] < 6
    for a, b in zip(model.parameters(), ref.parameters()):  # (the bias before the norm has an exactly-zero grad)
        assert (a.grad - b.grad).norm() <= 1e-9 * b.grad.norm() + 1e-14


# ----------------------------------------------------------------------------- mixed precision
def _transition_terms(model, x0):
    """Per-sample sum of 0.5||delta_i||^2 (the loss without the prior) and the forward trajectory."""
    with torch.no_grad():
        traj = model.forward_trajectory(x0, torch.Generator().manual_seed(1))
        loss = model.loss_per_sample(x0, torch.Generator().manual_seed(1))
    return loss.float() - model.prior_nll(traj[-1]).float(), traj


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_networks_keep_states_float32(dtype):
    """Networks under autocast; states, step ops and delta stay float32 (issue 9: bf16 *states* put ~3% (here)
    to 24% (paper setting) relative error into delta)."""
    torch.manual_seed(0)
    model = DiffFlow.mlp(2, hidden=128, depth=3, num_steps=30, backend="torch")
    for net in (model.drift, model.score):
        nn.init.normal_(net.out.weight, std=0.3)
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    ref, _ = _transition_terms(model, x0)
    model.autocast_dtype = dtype
    seen = []
    hook = model.drift.out.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    mixed, traj = _transition_terms(model, x0)
    hook.remove()
    assert set(seen) == {dtype}  # the networks did run in the low precision
    assert traj.dtype == torch.float32
    assert float(((mixed - ref).abs() / ref.abs()).median()) < 1e-3
    # the design it replaces: states in bf16 are far worse (so the bound above is meaningful)
    low = DiffFlow.mlp(2, hidden=128, depth=3, num_steps=30, backend="torch")
    low.load_state_dict(model.state_dict())
    low_err, low_traj = _transition_terms(low.to(torch.bfloat16), x0.bfloat16())
    assert low_traj.dtype == torch.bfloat16 and float(((low_err - ref).abs() / ref.abs()).median()) > 1e-2


@pytest.mark.parametrize("gradient,budget", [("adjoint", None), ("auto", 30_000)])
def test_autocast_recomputation_runs_under_the_first_pass_autocast(gradient, budget):
    """The backward walk recomputes under the same autocast as the first pass -- the model's option or an
    enclosing ``torch.autocast`` that has been left by the time ``backward()`` runs -- and its gradients are as
    close to the float32 gradients as autograd's under the same autocast."""
    torch.manual_seed(0)
    model = DiffFlow.mlp(2, hidden=16, depth=2, num_steps=6, backend="torch", memory_budget=budget)
    for p in model.parameters():
        nn.init.normal_(p, std=0.4)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    seen = []
    model.drift.out.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))

    def grads(mode, enclosing):
        model.gradient = mode
        model.zero_grad(set_to_none=True)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enclosing):
            loss = model.loss(x0, torch.Generator().manual_seed(2))
        assert loss.dtype == torch.float32
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    model.autocast_dtype = None
    model.gradient = gradient
    model.loss(x0, torch.Generator().manual_seed(2))  # "auto" measures a state's graph once per shape, first
    exact = grads("autograd", False)
    for enclosing, option in ((True, None), (False, torch.bfloat16)):
        model.autocast_dtype = option
        ref = grads("autograd", enclosing)
        got = grads(gradient, enclosing)
        recomputed = 7 - model.last_gradient_plan["kept"]
        assert 0 < recomputed and len(seen) == 7 + recomputed and set(seen) == {torch.bfloat16}
        err, ref_err = (got - exact).norm() / exact.norm(), (ref - exact).norm() / exact.norm()
        assert 0 < ref_err < 0.05 and err <= 2 * ref_err, (err, ref_err)


def test_auto_takes_the_same_walk_on_its_first_call_as_on_later_ones():
    """The walk "auto" takes depends only on the shapes and the budget, not on earlier calls: a model that has
    trained a step and a fresh copy of it (as after a resume) give bitwise equal gradients."""
    torch.manual_seed(0)
    model = DiffFlow.mlp(2, hidden=16, depth=2, num_steps=6, gradient="auto", memory_budget=2**30)
    x = torch.randn(64, 2)
    model.loss(x, torch.Generator().manual_seed(1)).backward()  # the first call: measures, then plans
    fresh = copy.deepcopy(model)
    fresh._graph_bytes.clear()  # as a model rebuilt from a checkpoint
    grads = []
    for m in (model, fresh):
        m.zero_grad()
        m.loss(x, torch.Generator().manual_seed(2)).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert model.last_gradient_plan == fresh.last_gradient_plan
    assert all(torch.equal(a, b) for a, b in zip(*grads))
