"""Network registry, the time MLP and the time-conditioned UNet."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffflow_ext import SinusoidalTimeEmbedding, TimeMLP
from diffflow_ext.networks import (
    NETWORKS,
    UNet,
    build_network,
    build_network_from_config,
    network_names,
    register_network,
)

# small UNets keep these tests fast; the presets are checked for shape once
SMALL = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "groups": 4,
         "dropout": 0.0}


def _randomise(net: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Non-zero everywhere (the zero-initialised layers would hide the rest of the network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 and "norm" in _name(net, p) else 0))
    return net


def _name(net: nn.Module, param: torch.Tensor) -> str:
    return next(n for n, p in net.named_parameters() if p is param)


def _x(shape, b=3, seed=1, dtype=torch.float32):
    return torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------ registry


def test_registered_names():
    assert {"mlp", "unet", "unet-mnist", "unet-cifar10", "unet-digits"} <= set(network_names())


def test_mlp_is_the_default_time_mlp():
    torch.manual_seed(0)
    a = build_network("mlp", dim=2)
    torch.manual_seed(0)
    b = TimeMLP(2)
    assert isinstance(a, TimeMLP) and a.config() == b.config() == {"dim": 2, "hidden": 128, "depth": 3, "time_dim": 32}
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    assert a.network_config == {"name": "mlp", "kwargs": {"dim": 2}}
    assert isinstance(SinusoidalTimeEmbedding(8)(torch.rand(5)), torch.Tensor)


def test_mlp_flattens_images_and_restores_shape():
    net = _randomise(build_network("mlp", data_shape=(1, 8, 8), hidden=16, depth=1))
    assert net.network_config["kwargs"] == {"hidden": 16, "depth": 1, "dim": 64}
    x, t = _x((1, 8, 8)), torch.full((3,), 0.01)
    out = net(x, t)
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(3, 64), net(x.reshape(3, 64), t), rtol=0, atol=0)
    with pytest.raises(ValueError, match="x: expected shape"):
        net(torch.randn(3, 1, 7, 7), t)


@pytest.mark.parametrize("name,shape,kwargs", [
    ("mlp", (5,), {"hidden": 8, "depth": 2}),
    ("unet", (1, 8, 8), SMALL),
    ("unet-digits", (1, 8, 8), {"base_channels": 8}),
])
def test_config_round_trip_rebuilds_the_same_function(name, shape, kwargs):
    net = _randomise(build_network(name, data_shape=shape, **kwargs))
    cfg = json.loads(json.dumps(net.network_config))  # what a checkpoint stores
    assert cfg == net.network_config
    twin = build_network_from_config(cfg)
    assert twin.network_config == cfg
    twin.load_state_dict(net.state_dict(), strict=True)
    net.eval(), twin.eval()
    x, t = _x(shape), torch.tensor([1e-3, 0.02, 0.05])
    torch.testing.assert_close(twin(x, t), net(x, t), rtol=0, atol=0)


def test_registry_errors_name_the_argument():
    with pytest.raises(ValueError, match="network: expected one of .*'mlp'.*got 'nope'"):
        build_network("nope", dim=2)
    with pytest.raises(ValueError, match="unexpected keyword argument 'widht'.*accepted arguments: dim, hidden"):
        build_network("mlp", dim=2, widht=3)
    with pytest.raises(ValueError, match="JSON-able"):
        build_network("mlp", dim=2, hidden=torch.tensor(3))
    with pytest.raises(ValueError, match="dim: network 'mlp' got 3 but the data shape \\(4,\\) implies 4"):
        build_network("mlp", data_shape=(4,), dim=3)
    with pytest.raises(ValueError, match="UNet expects images of shape \\(C, H, W\\)"):
        build_network("unet", data_shape=(64,))
    with pytest.raises(ValueError, match="already registered"):
        register_network("mlp", TimeMLP)
    with pytest.raises(ValueError, match="time_dim: expected an even number >= 2, got 0"):
        build_network("mlp", dim=2, time_dim=0)
    with pytest.raises(ValueError, match="network config: expected"):
        build_network_from_config({"name": "mlp"})


def test_user_registered_network_round_trips():
    class Scale(nn.Module):
        def __init__(self, channels: int, factor: float = 2.0):
            super().__init__()
            self.w = nn.Parameter(torch.full((channels,), factor))

        def forward(self, x, t):
            return x * self.w[:, None, None] * t[:, None, None, None]

    register_network("test-scale", Scale, shape_kwargs=lambda s: {"channels": s[0]}, defaults={"factor": 3.0})
    try:
        net = build_network("test-scale", data_shape=(2, 4, 4))
        assert net.network_config == {"name": "test-scale", "kwargs": {"channels": 2}}
        assert torch.equal(net.w, torch.full((2,), 3.0))  # preset default applied, not repeated in the config
        assert torch.equal(build_network_from_config(net.network_config).w, net.w)
        assert torch.equal(build_network("test-scale", channels=2, factor=0.5).w, torch.full((2,), 0.5))
    finally:
        NETWORKS.pop("test-scale")


# ------------------------------------------------------------------ UNet


@pytest.mark.parametrize("shape,kwargs", [
    ((1, 8, 8), SMALL),
    ((1, 28, 28), SMALL),  # 2 levels: 28 -> 14, no padding
    ((1, 28, 28), {**SMALL, "channel_mult": [1, 1, 2, 2], "attn_resolutions": [16]}),  # padded to 32
    ((1, 32, 32), {**SMALL, "channel_mult": [1, 2, 2], "attn_resolutions": [16, 8], "attn_heads": 2}),
    ((3, 32, 32), {**SMALL, "attn_resolutions": [16]}),
    ((3, 12, 20), {**SMALL, "channel_mult": [1, 2, 2]}),  # non-square
    ((3, 7, 9), {**SMALL, "channel_mult": [1, 2, 2]}),  # odd sides, padded to 8 x 12
])
def test_unet_output_shaped_like_input(shape, kwargs):
    net = _randomise(build_network("unet", data_shape=shape, **kwargs))
    x = _x(shape)
    out = net(x, torch.rand(3) * 0.05)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("name,shape", [("unet-digits", (1, 8, 8)), ("unet-mnist", (1, 28, 28)),
                                        ("unet-cifar10", (3, 32, 32))])
def test_presets_build_and_start_at_zero(name, shape):
    net = build_network(name, data_shape=shape)
    x = _x(shape, b=2)
    out = net(x, torch.tensor([1e-3, 0.05]))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))  # zero-initialised last layer


def test_unet_padding_equals_explicit_padding():
    """A 28x28 input through a 4-level net is the 32x32 net on the zero-padded image, cropped."""
    kw = {**SMALL, "channel_mult": [1, 1, 2, 2], "attn_resolutions": [16]}
    small = _randomise(build_network("unet", data_shape=(1, 28, 28), **kw))
    big = build_network("unet", data_shape=(1, 32, 32), **kw)
    big.load_state_dict(small.state_dict())
    x, t = _x((1, 28, 28), dtype=torch.float64), torch.tensor([1e-3, 0.01, 0.05], dtype=torch.float64)
    small.double(), big.double()
    torch.testing.assert_close(small(x, t), big(F.pad(x, (2, 2, 2, 2)), t)[:, :, 2:30, 2:30], rtol=1e-12, atol=1e-12)


def test_unet_time_conditioning_changes_output_smoothly():
    net = _randomise(build_network("unet", data_shape=(1, 8, 8), **SMALL)).double()
    x = _x((1, 8, 8), b=1, dtype=torch.float64).expand(3, 1, 8, 8)
    out = net(x, torch.tensor([0.010, 0.01001, 0.040], dtype=torch.float64))
    near, far = (out[0] - out[1]).norm(), (out[0] - out[2]).norm()
    assert near > 1e-6 * out[0].norm()  # t matters
    assert far > 10 * near  # and nearby times give nearby outputs (continuous in t)
    # a scalar t is broadcast to the batch; the batch elements are independent
    torch.testing.assert_close(net(x, torch.tensor(0.04, dtype=torch.float64))[0], out[2], rtol=1e-12, atol=1e-12)


def test_unet_dropout_only_in_train_mode():
    net = _randomise(build_network("unet", data_shape=(1, 8, 8), **{**SMALL, "dropout": 0.5}))
    x, t = _x((1, 8, 8)), torch.full((3,), 0.02)
    net.eval()
    assert torch.equal(net(x, t), net(x, t))
    net.train()
    torch.manual_seed(0)
    a = net(x, t)
    torch.manual_seed(0)
    assert torch.equal(a, net(x, t))  # the randomness is the global RNG's (replayable)
    assert not torch.allclose(a, net(x, t))
    no_dropout = _randomise(build_network("unet", data_shape=(1, 8, 8), **SMALL)).train()
    assert torch.equal(no_dropout(x, t), no_dropout(x, t))


def test_unet_gradient_reaches_every_parameter():
    net = _randomise(build_network("unet", data_shape=(3, 8, 8), **{**SMALL, "attn_resolutions": [4, 8]}))
    x = _x((3, 8, 8)).requires_grad_(True)
    (net(x, torch.rand(3) * 0.05) ** 2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
    # at initialisation only the zero output layer has a gradient path (the net starts as the zero map)
    fresh = build_network("unet", data_shape=(3, 8, 8), **SMALL)
    (fresh(x, torch.rand(3)) * _x((3, 8, 8))).sum().backward()
    assert fresh.out[-1].weight.grad.abs().sum() > 0


def test_unet_float64_gradcheck():
    net = _randomise(build_network("unet", data_shape=(1, 4, 4), base_channels=4, channel_mult=[1, 2],
                                   num_res_blocks=1, attn_resolutions=[2], groups=2, dropout=0.0)).double()
    x = _x((1, 4, 4), b=2, dtype=torch.float64).requires_grad_(True)
    t = torch.tensor([0.01, 0.03], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: net(x, t), (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_unet_argument_errors():
    with pytest.raises(ValueError, match=r"attn_resolutions: \[5\] match no level of a 8x8 image .* are \[8, 4\]"):
        UNet(1, 8, channel_mult=[1, 2], attn_resolutions=[5])
    with pytest.raises(ValueError, match="dropout: expected a number in \\[0, 1\\)"):
        UNet(1, 8, dropout=1.0)
    with pytest.raises(ValueError, match="channel_mult: expected a non-empty list"):
        UNet(1, 8, channel_mult=[])
    with pytest.raises(ValueError, match="attn_heads: 3 does not divide"):
        UNet(1, 8, base_channels=8, channel_mult=[1], attn_resolutions=[8], attn_heads=3)
    net = UNet(1, 8, **{k: v for k, v in SMALL.items()})
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 1, 8, 8\), got \(2, 1, 9, 9\)"):
        net(torch.randn(2, 1, 9, 9), torch.rand(2))
    with pytest.raises(ValueError, match=r"t: expected shape \(2,\)"):
        net(torch.randn(2, 1, 8, 8), torch.rand(3))


def test_diffflow_with_unet_round_trips_through_its_config():
    from diffflow_ext import DiffFlow

    model = DiffFlow.from_networks("unet", (1, 8, 8), SMALL, num_steps=3, diffusion=1.0)
    for net in (model.drift, model.score):
        _randomise(net, seed=id(net) % 1000, std=0.05)
    cfg = json.loads(json.dumps(model.config()))
    assert cfg["drift"] == {"name": "unet", "kwargs": {**SMALL, "in_channels": 1, "image_size": 8}}
    twin = DiffFlow.from_config(cfg)
    twin.load_state_dict(model.state_dict(), strict=True)
    x = _x((1, 8, 8), b=4).clamp(-1, 1)
    a = model.loss(x, torch.Generator().manual_seed(5))
    b = twin.loss(x, torch.Generator().manual_seed(5))
    assert torch.isfinite(a) and torch.equal(a, b)
    a.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
