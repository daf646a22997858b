"""Time embeddings shared by the networks: sinusoidal features of the continuous time ``t``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SinusoidalTimeEmbedding"]


class SinusoidalTimeEmbedding(nn.Module):
    """``[sin(w_k t), cos(w_k t)]`` with ``dim/2`` frequencies log-spaced in ``[min_freq, max_freq]``.

    The default band suits the paper's time range ``t in [1e-3, 0.05]``: the slowest feature turns by
    0.05 rad over the whole range, the fastest by 100 rad (a period of ~3e-3, the grid's finest cell).
    """

    def __init__(self, dim: int = 32, min_freq: float = 1.0, max_freq: float = 2000.0):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"dim: expected an even number >= 2, got {dim!r}")
        if not 0 < min_freq <= max_freq:
            raise ValueError(f"min_freq, max_freq: expected 0 < min_freq <= max_freq, got {min_freq!r}, {max_freq!r}")
        # from Python numbers (no elementwise op on a new tensor: cheap to build on the meta device)
        lo, hi, k = math.log(min_freq), math.log(max_freq), dim // 2
        freqs = [math.exp(lo + i * (hi - lo) / max(k - 1, 1)) for i in range(k)]
        self.register_buffer("freqs", torch.tensor(freqs, dtype=torch.float32), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        arg = t.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
