"""The time-conditioned MLP of the paper's 2-D experiments (also usable on flattened images)."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import FourierFeatures, SinusoidalTimeEmbedding

__all__ = ["TimeMLP"]


def _positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    return v


class TimeMLP(nn.Module):
    """``net(x, t)`` for ``x`` of shape ``(B, dim)`` (or ``(B, *shape)`` with ``prod(shape) == dim``, flattened
    and restored) and ``t`` of shape ``(B,)``; returns a tensor shaped like ``x``.

    ``depth`` hidden layers of width ``hidden`` (SiLU), input ``[x, time features]``. The output layer
    starts at zero, so an untrained drift and score are both zero (the forward process starts as
    pure diffusion). ``dropout > 0`` adds dropout after every hidden activation (train mode only; it draws
    from the global RNG, which the recomputing gradient modes replay). ``x_freqs > 0`` appends Fourier features
    of ``x`` (:class:`FourierFeatures`: ``x_freqs`` frequencies in ``[1, x_max_freq]`` along ``x_dirs`` directions
    for 2-D data) to the input, ``[x, features, time features]``: what lets the 2-D defaults resolve thin strokes and
    small holes (docs/quality_2d.md); ``x_freqs = 0`` (default) is the plain MLP. ``x_learn=True`` trains the
    features' projection (frequencies and directions) with the network, from that initialisation (no effect
    with ``x_freqs = 0``). ``x_init="data"`` (needs ``x_learn``) asks for a data-dependent start of the projection:
    the training loop (or the user, through :meth:`diffflow_ext.DiffFlow.init_from_data`) calls
    :meth:`init_from_data` with training examples before the first step, which moves each frequency within its band
    to the data's strongest period there (:meth:`FourierFeatures.init_from_data`); ``"band"`` (default) keeps the
    log-spaced band.
    """

    #: the values of ``x_init``
    X_INITS = ("band", "data")

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, time_dim: int = 32, zero_init: bool = True,
                 dropout: float = 0.0, x_freqs: int = 0, x_max_freq: float = 32.0, x_dirs: int = 4,
                 x_learn: bool = False, x_init: str = "band"):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            _positive_int(name, v)
        if isinstance(time_dim, bool) or not isinstance(time_dim, int) or time_dim < 2 or time_dim % 2:
            raise ValueError(f"time_dim: expected an even number >= 2, got {time_dim!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
        self.dim, self.hidden, self.depth, self.time_dim = dim, hidden, depth, time_dim
        self.dropout = float(dropout)
        self.time_embed = SinusoidalTimeEmbedding(time_dim)
        if isinstance(x_freqs, bool) or not isinstance(x_freqs, int) or x_freqs < 0:
            raise ValueError(f"x_freqs: expected an integer >= 0 (0: no Fourier features of x), got {x_freqs!r}")
        if not isinstance(x_learn, bool):
            raise ValueError(f"x_learn: expected true or false, got {x_learn!r}")
        if x_init not in self.X_INITS:
            raise ValueError(f"x_init: expected one of {', '.join(self.X_INITS)}, got {x_init!r}")
        if x_init == "data" and x_freqs and not x_learn:
            raise ValueError("x_init: 'data' needs x_learn=true (the data-chosen projection is a trained parameter, "
                             "stored in checkpoints); a fixed projection takes x_init=band")
        self.x_features = FourierFeatures(dim, x_freqs, x_max_freq, x_dirs, learnable=x_learn) if x_freqs else None
        self.x_options = {"x_freqs": x_freqs, "x_max_freq": float(x_max_freq), "x_dirs": x_dirs} if x_freqs else {}
        if x_learn and x_freqs:  # (with x_freqs = 0 there is nothing to train: the plain MLP, as when a run turns
            self.x_options["x_learn"] = True  # off a preset's features with --network-option x_freqs=0)
            if x_init == "data":
                self.x_options["x_init"] = "data"
        #: whether :meth:`init_from_data` should run before training (read by DiffFlow.init_from_data)
        self.wants_data_init = bool(x_freqs) and x_init == "data"
        self.in_x = dim + (self.x_features.out_dim if x_freqs else 0)  # the x part of the first layer's input
        layers: list[nn.Module] = []
        width = self.in_x + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        shape = x.shape
        if x.dim() != 2:
            if x.dim() < 2 or math.prod(shape[1:]) != self.dim:
                raise ValueError(f"x: expected shape (B, {self.dim}) or (B, *shape) of {self.dim} values, "
                                 f"got {tuple(shape)}")
            x = x.reshape(shape[0], self.dim)
        if self.x_features is not None:
            x = torch.cat([x, self.x_features(x)], dim=-1)
        # the first layer on [x, time features] as W_x x + (W_t e(t) + b): when the batch shares one time (the fixed
        # grid passes t expanded, stride 0) the time part is computed once and broadcast -- the same parameters and
        # values as the concatenated input, ~10% less work per 2-D training step
        first = self.body[0]
        if t.dim() == 1 and t.shape[0] > 1 and t.stride(0) == 0:
            w = first.weight
            h = torch.addmm(F.linear(self.time_embed(t[:1]).to(x.dtype), w[:, self.in_x:], first.bias), x,
                            w[:, :self.in_x].t())
        else:
            h = first(torch.cat([x, self.time_embed(t).to(x.dtype)], dim=-1))
        for layer in itertools.islice(self.body, 1, None):
            h = layer(h)
        return self.out(h).reshape(shape)

    def init_from_data(self, x: Tensor) -> None:
        """The data-dependent start of the Fourier projection (``x_init="data"``): ``x`` are training examples in
        model units, shape ``(n, dim)`` or ``(n, *shape)``."""
        if not self.wants_data_init:
            raise ValueError("init_from_data: this network was not built with x_freqs > 0 and x_init='data'")
        self.x_features.init_from_data(x.reshape(x.shape[0], -1))

    def config(self) -> dict:
        cfg = {"dim": self.dim, "hidden": self.hidden, "depth": self.depth, "time_dim": self.time_dim}
        if self.dropout:
            cfg["dropout"] = self.dropout
        return {**cfg, **self.x_options}
