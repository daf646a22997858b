"""Dropout in the time MLP: train-mode only, round-trips through configs, replayed by the recomputing gradients."""

from __future__ import annotations

import json

import pytest
import torch

from diffflow_ext import DiffFlow, TimeMLP
from diffflow_ext.networks import build_network, build_network_from_config


def _randomise(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return net


def test_default_has_no_dropout_and_unchanged_state_dict_keys():
    """dropout=0 (the default) builds exactly the old network: old checkpoints load, configs do not change."""
    net = TimeMLP(4, hidden=8, depth=2)
    assert not any(isinstance(m, torch.nn.Dropout) for m in net.modules())
    assert "dropout" not in net.config()
    assert list(net.state_dict()) == ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias",
                                      "out.weight", "out.bias"]


def test_dropout_only_in_train_mode_and_eval_equals_the_plain_network():
    torch.manual_seed(0)
    drop = _randomise(TimeMLP(6, hidden=32, depth=2, dropout=0.5))
    plain = TimeMLP(6, hidden=32, depth=2)
    # same weights: the Linear layers in order (the dropout layers hold none)
    for p, q in zip(plain.parameters(), drop.parameters()):
        p.data.copy_(q.data)
    x, t = torch.randn(5, 6), torch.rand(5) * 0.05
    drop.eval()
    torch.testing.assert_close(drop(x, t), plain(x, t), rtol=0, atol=0)
    drop.train()
    a, b = drop(x, t), drop(x, t)
    assert not torch.equal(a, b)  # fresh masks each call
    # inverted dropout: with one hidden layer the output is linear in the mask, so the mean over many masks is the
    # eval output (20000 masks: standard error ~1% of the output scale; bound 5%)
    one = _randomise(TimeMLP(6, hidden=32, depth=1, dropout=0.5)).train()
    with torch.no_grad():
        mean = one(x.repeat(20000, 1), t.repeat(20000)).reshape(20000, 5, 6).mean(0)
        ref = one.eval()(x, t)
    assert (mean - ref).abs().max() <= 0.05 * ref.abs().max()


def test_dropout_round_trips_through_the_registry_and_diffflow_config():
    net = build_network("mlp", data_shape=(1, 4, 4), hidden=16, depth=2, dropout=0.2)
    cfg = json.loads(json.dumps(net.network_config))
    assert cfg == {"name": "mlp", "kwargs": {"hidden": 16, "depth": 2, "dropout": 0.2, "dim": 16}}
    twin = build_network_from_config(cfg)
    assert twin.dropout == 0.2 and sum(isinstance(m, torch.nn.Dropout) for m in twin.modules()) == 2
    model = DiffFlow.from_networks("mlp", (1, 4, 4), {"hidden": 16, "depth": 2, "dropout": 0.2}, num_steps=3)
    again = DiffFlow.from_config(json.loads(json.dumps(model.config())))
    again.load_state_dict(model.state_dict(), strict=True)
    assert again.drift.dropout == again.score.dropout == 0.2


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "0.1"])
def test_dropout_argument_error(bad):
    with pytest.raises(ValueError, match=r"dropout: expected a number in \[0, 1\)"):
        TimeMLP(3, dropout=bad)


@pytest.mark.parametrize("gradient,budget", [("adjoint", None), ("auto", 0), ("auto", 2_000), ("auto", None)])
def test_mlp_dropout_recomputation_matches_autograd(gradient, budget):
    """The recomputing gradient modes replay the first pass's dropout masks: loss and gradients equal autograd's."""
    torch.manual_seed(0)
    model = DiffFlow.from_networks("mlp", (3,), {"hidden": 16, "depth": 2, "dropout": 0.3}, num_steps=6,
                                   backend="torch", memory_budget=budget).double()
    _randomise(model.drift), _randomise(model.score, 1)
    x0 = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(mode):
        model.gradient = mode
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        loss = model.loss(x0, torch.Generator().manual_seed(5))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    lb, gb = run("autograd")
    la, ga = run(gradient)
    assert abs(la - lb) <= 1e-12 * abs(lb)
    assert len(ga) == len(gb) > 0
    for a, b in zip(ga, gb):
        assert (a - b).norm() <= 1e-9 * b.norm()
    # and the masks matter: a different global seed gives a different loss
    torch.manual_seed(124)
    model.gradient = "autograd"
    assert abs(model.loss(x0, torch.Generator().manual_seed(5)).item() - lb.item()) > 1e-6
