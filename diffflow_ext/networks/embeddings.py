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
        self.band_ratio = max_freq ** (1 / (n_freq - 1)) if n_freq > 1 else 2.0  # between neighbouring frequencies

    @torch.no_grad()
    def init_from_data(self, x: Tensor, candidates: int = 64) -> None:
        """Data-dependent initialisation (``learnable=True`` only): each feature keeps its direction ``u`` and moves
        its frequency ``w`` within its band ``[w / sqrt(r), w * sqrt(r)]`` (``r``: the ratio between neighbouring
        frequencies; ``candidates`` log-spaced values) to where the empirical characteristic function of ``x``,
        ``|mean exp(i w u . x)|``, is largest: the strongest period of the data along ``u`` in that band (a grid's
        cell size, a lattice's spacing), which training alone re-tunes by a few percent only (docs/quality_2d.md).
        ``x``: examples in model units, shape ``(n, dim)``."""
        if not isinstance(self.proj, nn.Parameter):
            raise ValueError("init_from_data: the projection is fixed (learnable=False); a data-chosen one must be a "
                             "trained parameter to be stored in checkpoints")
        x = x.detach().to(device=self.proj.device, dtype=torch.float64)
        if x.dim() != 2 or x.shape[1] != self.dim or x.shape[0] < 1 or not torch.isfinite(x).all():
            raise ValueError(f"init_from_data: expected finite examples of shape (n, {self.dim}), got {tuple(x.shape)}")
        k = self.out_dim // 2
        w = self.proj[:, :k].to(torch.float64)  # (dim, k): the sin columns (the cos columns are equal at init)
        freq = w.norm(dim=0)
        u = w / freq
        half = 0.5 * math.log(self.band_ratio)
        steps = torch.linspace(-half, half, candidates, dtype=torch.float64, device=x.device)
        cand = freq[:, None] * torch.exp(steps)[None, :]  # (k, candidates)
        proj_x = x @ u  # (n, k)
        best = torch.empty_like(freq)
        for j in range(k):  # one feature at a time: (n, candidates) values in memory
            a = proj_x[:, j, None] * cand[j]
            ecf = torch.cos(a).mean(0) ** 2 + torch.sin(a).mean(0) ** 2
            best[j] = cand[j, ecf.argmax()]
        new = (u * best).to(self.proj.dtype)
        self.proj.copy_(torch.cat([new, new], dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(torch.addmm(self.phase.to(x.dtype), x, self.proj.to(x.dtype)))
