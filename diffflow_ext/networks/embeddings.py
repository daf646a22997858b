"""Embeddings shared by the networks: sinusoidal features of the continuous time ``t``, and Fourier features of
the state ``x`` (for low-dimensional data with fine structure)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SinusoidalTimeEmbedding", "FourierFeatures"]


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


class FourierFeatures(nn.Module):
    """``[sin(w_k u_j . x), cos(w_k u_j . x)]``: ``n_freq`` frequencies ``w_k`` log-spaced in ``[1, max_freq]``
    (model units: standardised data) along fixed unit directions ``u_j`` -- for 2-D data ``n_dir`` directions
    equally spaced in angle over ``[0, pi)``, otherwise the ``dim`` coordinate axes. Output width
    ``2 * n_dir * n_freq`` (2-D) or ``2 * dim * n_freq``. By default deterministic from its arguments (no state).

    ``learnable=True`` makes the projection a trained parameter ``proj`` of shape ``(dim, out_dim)``, initialised
    to the fixed one (its sin and cos columns then move independently: ``out_dim`` learned sinusoids of fixed
    phase 0 or pi/2); it is stored in checkpoints. Training moves the frequencies and directions to the data's own
    scales: on the 2-D defaults this resolves holes that the fixed band leaves filled (docs/quality_2d.md).

    An MLP on raw coordinates is biased toward smooth functions; these features let it resolve structure at the
    scale ``~1/max_freq`` (thin strokes, small holes) in a few thousand iterations (Tancik et al., NeurIPS 2020;
    docs/quality_2d.md).
    """

    def __init__(self, dim: int, n_freq: int = 6, max_freq: float = 32.0, n_dir: int = 4, learnable: bool = False):
        super().__init__()
        if not isinstance(learnable, bool):
            raise ValueError(f"learnable: expected true or false, got {learnable!r}")
        for name, v in (("dim", dim), ("n_freq", n_freq), ("n_dir", n_dir)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if isinstance(max_freq, bool) or not isinstance(max_freq, (int, float)) or not 1 <= max_freq < math.inf:
            raise ValueError(f"max_freq: expected a finite number >= 1, got {max_freq!r}")
        if dim == 2:
            dirs = [(math.cos(math.pi * j / n_dir), math.sin(math.pi * j / n_dir)) for j in range(n_dir)]
        else:
            dirs = [tuple(float(i == j) for i in range(dim)) for j in range(dim)]
        freqs = [max_freq ** (k / max(n_freq - 1, 1)) for k in range(n_freq)] if n_freq > 1 else [1.0]
        proj = [[u[i] * w for u in dirs for w in freqs] for i in range(dim)]  # (dim, n_dirs * n_freq)
        k = len(dirs) * len(freqs)
        # one affine map and one sin: [sin(a), cos(a)] = sin([a, a + pi/2]) (fewer ops per call than sin, cos, cat)
        proj = torch.tensor([row * 2 for row in proj], dtype=torch.float32)
        if learnable:
            self.proj = nn.Parameter(proj)
        else:
            self.register_buffer("proj", proj, persistent=False)
        self.register_buffer("phase", torch.tensor([0.0] * k + [math.pi / 2] * k, dtype=torch.float32),
                             persistent=False)
        self.dim, self.out_dim = dim, 2 * k

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(torch.addmm(self.phase.to(x.dtype), x, self.proj.to(x.dtype)))
