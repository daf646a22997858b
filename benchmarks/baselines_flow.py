"""Normalizing-flow baselines from zuko for image and vector benchmarks (what a user would pick instead).

``FlowModel(kind, dim, ...)`` wraps a zuko flow over the flattened sample and exposes the two calls the
benchmarks and :func:`diffflow_ext.evaluation.bits.bits_per_dim` use on a DiffFlow:
``loss(x, generator)`` (mean negative log-likelihood in model space, nats) and ``nll_bound(x, generator)``
(per-sample NLL; exact for a flow, the name only matches DiffFlow's API), so both models are trained on
the same dequantised batches and scored by the same code (same dequantisation draws, same log-Jacobian).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffflow_ext.model import NLLBound

FLOWS = ("maf", "nsf")


class FlowModel(nn.Module):
    """A zuko MAF or NSF on ``prod(data_shape)``-dimensional vectors (images are flattened)."""

    def __init__(self, kind: str, data_shape, *, transforms: int = 5, hidden: int = 256, depth: int = 2,
                 bins: int = 8):
        super().__init__()
        import zuko

        if kind not in FLOWS:
            raise ValueError(f"flow: expected one of {FLOWS}, got {kind!r}")
        self.data_shape = tuple(data_shape)
        self.dim = math.prod(self.data_shape)
        hidden_features = (hidden,) * depth
        if kind == "maf":
            self.flow = zuko.flows.MAF(self.dim, 0, transforms=transforms, hidden_features=hidden_features)
        else:
            self.flow = zuko.flows.NSF(self.dim, 0, bins=bins, transforms=transforms, hidden_features=hidden_features)
        self.kind = kind

    def log_prob(self, x: Tensor) -> Tensor:
        return self.flow().log_prob(x.reshape(x.shape[0], self.dim))

    def loss(self, x: Tensor, generator: torch.Generator | None = None, **_: object) -> Tensor:
        return -self.log_prob(x).mean()

    @torch.no_grad()
    def nll_bound(self, x: Tensor, generator: torch.Generator | None = None, *, num_steps=None) -> NLLBound:
        nats = -self.log_prob(x)
        return NLLBound(nats, nats / (self.dim * math.log(2.0)))

    @torch.no_grad()
    def sample(self, n: int, **_: object) -> Tensor:
        return self.flow().sample((n,)).reshape(n, *self.data_shape)
