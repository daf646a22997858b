"""Networks for the drift and the score: a registry of ``net(x, t)`` modules.

* ``"mlp"``: :class:`TimeMLP`, the paper's time-conditioned MLP (vectors; images are flattened).

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

__all__ = [
    "NETWORKS",
    "NetworkEntry",
    "SinusoidalTimeEmbedding",
    "TimeMLP",
    "build_network",
    "build_network_from_config",
    "network_names",
    "register_network",
]

register_network("mlp", TimeMLP, shape_kwargs=lambda shape: {"dim": math.prod(shape)})
