"""Default networks: a time-conditioned MLP with sinusoidal time features (the paper's 2-D nets)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SinusoidalTimeEmbedding", "TimeMLP"]


class SinusoidalTimeEmbedding(nn.Module):
    """``[sin(w_k t), cos(w_k t)]`` with ``dim/2`` frequencies log-spaced in ``[min_freq, max_freq]``.

    The default band suits the paper's time range ``t in [1e-3, 0.05]``.
    """

    def __init__(self, dim: int = 32, min_freq: float = 1.0, max_freq: float = 2000.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim: expected an even number >= 2, got {dim}")
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        arg = t.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class TimeMLP(nn.Module):
    """``net(x, t)`` for ``x`` of shape ``(B, dim)`` and ``t`` of shape ``(B,)``, returns ``(B, dim)``.

    ``depth`` hidden layers of width ``hidden`` (SiLU), input ``[x, time features]``. The output layer
    starts at zero, so an untrained drift and score are both zero (the forward process starts as
    pure diffusion).
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, time_dim: int = 32, zero_init: bool = True):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        self.dim, self.hidden, self.depth, self.time_dim = dim, hidden, depth, time_dim
        self.time_embed = SinusoidalTimeEmbedding(time_dim)
        layers: list[nn.Module] = []
        width = dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = torch.cat([x, self.time_embed(t).to(x.dtype)], dim=-1)
        return self.out(self.body(h))

    def config(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "depth": self.depth, "time_dim": self.time_dim}
