"""Fourier features of x in the MLP (``TimeMLP(x_freqs=...)``, the 2-D points preset): exact features, the plain
network unchanged when off, the fast first-layer path equal to the plain one, checkpoint round trip, and gradients
of every gradient mode equal to autograd's."""

import math

import pytest
import torch

from diffflow_ext import DiffFlow
from diffflow_ext.networks import TimeMLP, build_network, build_network_from_config
from diffflow_ext.networks.embeddings import FourierFeatures
from diffflow_ext.training.config import PRESETS, resolve_config


def test_features_are_sin_and_cos_of_the_projections():
    f = FourierFeatures(2, n_freq=6, max_freq=32.0, n_dir=4)
    assert f.out_dim == 48
    x = torch.randn(20, 2, dtype=torch.float64)
    freqs = [32.0 ** (k / 5) for k in range(6)]
    a = torch.stack([w * (math.cos(math.pi * j / 4) * x[:, 0] + math.sin(math.pi * j / 4) * x[:, 1])
                     for j in range(4) for w in freqs], 1)
    torch.testing.assert_close(f(x), torch.cat([a.sin(), a.cos()], 1), rtol=0, atol=1e-5 * 32 * x.abs().max())
    assert freqs[0] == 1 and freqs[-1] == pytest.approx(32)
    assert FourierFeatures(5, n_freq=3).out_dim == 2 * 5 * 3  # other dims: the coordinate axes
    assert not dict(f.state_dict())  # deterministic from the arguments: nothing in checkpoints


@pytest.mark.parametrize("kwargs, match", [({"n_freq": 0}, "n_freq"), ({"max_freq": 0.5}, "max_freq"),
                                           ({"n_dir": 0}, "n_dir"), ({"max_freq": float("inf")}, "max_freq")])
def test_feature_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FourierFeatures(2, **kwargs)


def test_off_is_the_plain_mlp():
    torch.manual_seed(0)
    a = TimeMLP(2, 64, 3, 32)
    torch.manual_seed(0)
    b = TimeMLP(2, 64, 3, 32, x_freqs=0)
    assert a.config() == b.config() == {"dim": 2, "hidden": 64, "depth": 3, "time_dim": 32}
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(ValueError, match="x_freqs"):
        TimeMLP(2, x_freqs=-1)


def test_shared_time_path_equals_the_concatenated_input_and_round_trips():
    torch.manual_seed(1)
    net = build_network("mlp", data_shape=(2,), hidden=32, depth=2, time_dim=16, x_freqs=6).double()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(9, 2, dtype=torch.float64)
    t = torch.full((1,), 0.02, dtype=torch.float64)
    shared, per_sample = net(x, t.expand(9)), net(x, t.repeat(9))  # stride 0 (fast path) vs a real batch of times
    torch.testing.assert_close(shared, per_sample, rtol=1e-12, atol=1e-12)
    again = build_network_from_config(net.network_config).double()
    again.load_state_dict(net.state_dict())
    torch.testing.assert_close(again(x, t.expand(9)), shared, rtol=0, atol=0)
    assert net.body[0].in_features == 2 + 48 + 16


@pytest.mark.parametrize("x_learn", [False, True])
@pytest.mark.parametrize("gradient", ["adjoint", "auto"])
def test_gradients_equal_autograd(gradient, x_learn):
    grads = {}
    for mode in ("autograd", gradient):
        torch.manual_seed(2)
        nets = [TimeMLP(2, 16, 2, 8, zero_init=False, x_freqs=3, x_learn=x_learn).double() for _ in range(2)]
        model = DiffFlow(*nets, (2,), num_steps=6, diffusion={"start": 0.2, "end": 1.0}, gradient=mode).double()
        x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        model.loss(x, torch.Generator().manual_seed(4)).backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    assert len(grads["autograd"]) == len(grads[gradient]) == 2 * (6 + x_learn)  # 2 nets x (2 hidden + out) x (w, b)
    for a, b in zip(grads["autograd"], grads[gradient]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_learnable_projection_starts_fixed_trains_and_round_trips():
    fixed = FourierFeatures(2, n_freq=6, max_freq=32.0, n_dir=4)
    learned = FourierFeatures(2, n_freq=6, max_freq=32.0, n_dir=4, learnable=True)
    x = torch.randn(20, 2)
    torch.testing.assert_close(learned(x), fixed(x), rtol=0, atol=0)  # same initialisation
    assert [n for n, _ in learned.named_parameters()] == ["proj"] and list(learned.state_dict()) == ["proj"]
    learned(x).square().sum().backward()
    assert learned.proj.grad is not None and learned.proj.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="learnable"):
        FourierFeatures(2, learnable=1)

    torch.manual_seed(5)
    net = build_network("mlp", data_shape=(2,), hidden=16, depth=2, time_dim=8, x_freqs=6, x_learn=True)
    assert net.config()["x_learn"] is True and "x_features.proj" in net.state_dict()
    with torch.no_grad():
        net.x_features.proj.mul_(1.5)  # a trained projection differs from the initial one
    again = build_network_from_config(net.network_config)
    assert not torch.equal(again.x_features.proj, net.x_features.proj)
    again.load_state_dict(net.state_dict())
    t = torch.full((20,), 0.01)
    torch.testing.assert_close(again(x, t), net(x, t), rtol=0, atol=0)
    # with the features off there is nothing to train: the plain MLP (a preset's x_learn under x_freqs=0)
    assert TimeMLP(2, 16, 2, 8, x_freqs=0, x_learn=True).config() == TimeMLP(2, 16, 2, 8).config()
    with pytest.raises(ValueError, match="x_learn"):
        TimeMLP(2, x_freqs=6, x_learn="yes")


def test_points_preset_uses_features_and_an_option_merges_over_them():
    preset = {"x_freqs": 8, "x_max_freq": 128.0, "x_learn": True, "x_init": "data"}
    assert PRESETS["points"]["network_options"] == preset
    assert resolve_config("points", {}).network_options == preset
    merged = resolve_config("points", {"network_options": {"x_max_freq": 16.0}}).network_options
    assert merged == {**preset, "x_max_freq": 16.0}
    off = resolve_config("points", {"network_options": {"x_freqs": 0}}).network_options
    assert off == {**preset, "x_freqs": 0}
    assert build_network("mlp", data_shape=(2,), **off).config() == build_network("mlp", data_shape=(2,)).config()
    fixed = resolve_config("points", {"network_options": {"x_learn": False}}).network_options
    with pytest.raises(ValueError, match="x_init=band"):  # the error says how to fix the projection
        build_network("mlp", data_shape=(2,), **fixed)
    assert build_network("mlp", data_shape=(2,), **{**fixed, "x_init": "band"}).config()["x_freqs"] == 8


def _lattice(period: float, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Points on vertical lines x0 = k * period (+ tiny jitter), x1 uniform: one period along the first axis."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-8, 9, (n,), generator=g).double()
    x0 = k * period + 0.01 * period * torch.randn(n, generator=g, dtype=torch.float64)
    return torch.stack([x0, 4 * torch.rand(n, generator=g, dtype=torch.float64) - 2], 1).float()


def test_init_from_data_moves_each_frequency_to_the_datas_period_within_its_band():
    f = FourierFeatures(2, n_freq=6, max_freq=32.0, n_dir=4, learnable=True)
    start = f.proj.detach().clone()
    omega = 2 * math.pi / 0.22  # 28.6: in the top band [32 / sqrt(2), 32 * sqrt(2)], away from 32
    f.init_from_data(_lattice(0.22))
    k = f.out_dim // 2
    new, old = f.proj.detach()[:, :k], start[:, :k]
    torch.testing.assert_close(f.proj.detach()[:, k:], new, rtol=0, atol=0)  # sin and cos columns stay paired
    ratio = new.norm(dim=0) / old.norm(dim=0)
    assert bool((ratio >= 2 ** -0.5 - 1e-6).all() and (ratio <= 2 ** 0.5 + 1e-6).all())  # within its band
    cos = (new * old).sum(0) / (new.norm(dim=0) * old.norm(dim=0))
    torch.testing.assert_close(cos, torch.ones_like(cos))  # directions unchanged
    top_axis = new[:, 5]  # direction 0 (the first axis), top frequency
    assert top_axis.norm().item() == pytest.approx(omega, rel=0.012)  # the candidate grid's step is 1.1%
    # along the second axis the lines carry no period: no frequency there is pulled to omega
    assert abs(new[:, 2 * 6 + 5].norm().item() - omega) > 0.02 * omega


def test_init_from_data_is_checked_and_needs_a_trained_projection():
    with pytest.raises(ValueError, match="learnable=False"):
        FourierFeatures(2).init_from_data(torch.randn(10, 2))
    f = FourierFeatures(2, learnable=True)
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        f.init_from_data(torch.randn(10, 3))
    with pytest.raises(ValueError, match="finite"):
        f.init_from_data(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="x_init: expected one of band, data"):
        TimeMLP(2, x_freqs=6, x_learn=True, x_init="spectral")
    with pytest.raises(ValueError, match="needs x_learn"):
        TimeMLP(2, x_freqs=6, x_init="data")
    with pytest.raises(ValueError, match="not built with"):
        TimeMLP(2, x_freqs=6, x_learn=True).init_from_data(torch.randn(10, 2))


def test_data_init_through_the_model_round_trips_and_the_trainer_runs_it_before_the_ema():
    from types import SimpleNamespace

    from diffflow_ext.training.loop import build_state

    opts = {"x_freqs": 6, "x_learn": True, "x_init": "data"}
    model = DiffFlow.from_networks("mlp", (2,), {"hidden": 16, "depth": 2, "time_dim": 8, **opts})
    plain = DiffFlow.from_networks("mlp", (2,), {"hidden": 16, "depth": 2, "time_dim": 8, "x_freqs": 6,
                                                 "x_learn": True})
    assert model.wants_data_init and not plain.wants_data_init
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    plain.init_from_data(_lattice(0.22))  # nothing asks: unchanged
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    band = model.drift.x_features.proj.detach().clone()
    model.init_from_data(_lattice(0.22))
    assert not torch.equal(model.drift.x_features.proj, band)
    torch.testing.assert_close(model.score.x_features.proj, model.drift.x_features.proj)
    again = DiffFlow.from_config(model.config())  # the architecture round-trips; the chosen projection is a weight
    assert again.drift.config()["x_init"] == "data"
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again.drift.x_features.proj, model.drift.x_features.proj, rtol=0, atol=0)

    class Lines:
        shape = (2,)

        def train_batch(self, n, rng, *, device=None, dtype=torch.float32):
            return _lattice(0.22, n, int(rng.integers(1000))).to(device=device, dtype=dtype)

    cfg = resolve_config("points", {"network_options": {"x_init": "data"}, "hidden": 16, "depth": 2, "seed": 4})
    ctx = SimpleNamespace(device=torch.device("cpu"))
    st, st2 = build_state(cfg, Lines(), ctx, [0]), build_state(cfg, Lines(), ctx, [0])
    proj = st.model.drift.x_features.proj
    top = proj.detach()[:, 5].norm().item()  # first axis, top frequency: at the data's period, not the band's
    assert top == pytest.approx(2 * math.pi / 0.22, rel=0.012)
    torch.testing.assert_close(st2.model.drift.x_features.proj, proj, rtol=0, atol=0)  # the seed fixes it
    ema_copy = DiffFlow.from_config(st.model.config())
    st.ema.copy_to(ema_copy)
    torch.testing.assert_close(ema_copy.drift.x_features.proj, proj, rtol=0, atol=0)  # the EMA starts from it
