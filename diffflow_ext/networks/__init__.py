"""Networks for the drift and the score: a registry of ``net(x, t)`` modules.

* ``"mlp"``: :class:`TimeMLP`, the paper's time-conditioned MLP (vectors; images are flattened).
* ``"unet"``: :class:`UNet`, a DDPM-style time-conditioned UNet for ``(C, H, W)`` images, with presets
  ``"unet-mnist"``, ``"unet-cifar10"`` (about half DDPM's CIFAR-10 width, as in the paper) and
  ``"unet-digits"`` (small, for the 8x8 scikit-learn digits on a CPU). Preset arguments can be overridden.

``build_network(name, data_shape=..., **kwargs)`` builds one; its ``network_config`` rebuilds it
(:func:`build_network_from_config`); :func:`register_network` adds your own.
"""

from __future__ import annotations

import math

from .embeddings import SinusoidalTimeEmbedding
from .mlp import TimeMLP
from .registry import (
    NETWORKS,
    NetworkEntry,
    build_network,
    build_network_from_config,
    network_names,
    register_network,
)
from .unet import UNet

__all__ = [
    "NETWORKS",
    "NetworkEntry",
    "SinusoidalTimeEmbedding",
    "TimeMLP",
    "UNet",
    "UNET_PRESETS",
    "build_network",
    "build_network_from_config",
    "network_names",
    "register_network",
]

register_network("mlp", TimeMLP, shape_kwargs=lambda shape: {"dim": math.prod(shape)})


def _image_kwargs(shape: tuple[int, ...]) -> dict:
    if len(shape) != 3:
        raise ValueError(f"data_shape: the UNet expects images of shape (C, H, W), got {shape}")
    c, h, w = shape
    return {"in_channels": c, "image_size": h if h == w else [h, w]}


# About half of DDPM's CIFAR-10 UNet (ch=128, mult 1,2,2,2, 2 blocks, attention at 16, dropout 0.1), as in the
# paper; MNIST's 28x28 is padded to 32 inside the net (4 levels). The digits preset is sized for a CPU budget.
UNET_PRESETS: dict[str, dict] = {
    "unet-mnist": {"base_channels": 64, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2,
                   "attn_resolutions": [16], "dropout": 0.1},
    "unet-cifar10": {"base_channels": 64, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2,
                     "attn_resolutions": [16], "dropout": 0.1},
    "unet-digits": {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
                    "attn_resolutions": [4], "dropout": 0.0, "groups": 8},
}

register_network("unet", UNet, shape_kwargs=_image_kwargs)
for _name, _defaults in UNET_PRESETS.items():
    register_network(_name, UNet, shape_kwargs=_image_kwargs, defaults=_defaults)
