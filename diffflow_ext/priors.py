"""The prior ``p_B(x_N)`` the backward SDE starts from: a Gaussian, fixed or learned.

``"fixed"``: ``N(0, std^2 I)`` (the paper's), no parameters. ``"learned"``: ``N(mu, diag(sigma^2))`` with a mean and a
log standard deviation per data dimension, trained with the networks by the same objective (the prior term
``-log p_B(x_N)`` of the loss is the only term that depends on them). A learned prior matters where the forward
process leaves some dimensions far narrower than the others, e.g. the near-constant border pixels of small images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .ops.reference import acc_dtype

__all__ = ["GaussianPrior", "PRIORS"]

#: prior kinds of :class:`GaussianPrior` (``DiffFlow(prior=...)``, ``diffflow train --prior``)
PRIORS = ("fixed", "learned")


class GaussianPrior(nn.Module):
    """``N(0, std^2 I)`` (``kind="fixed"``) or a diagonal Gaussian with learned per-dimension mean and log-std
    initialised at ``N(0, std^2 I)`` (``kind="learned"``; parameters ``mean`` and ``log_std``, shaped like one
    sample)."""

    def __init__(self, data_shape: Sequence[int], std: float = 1.0, kind: str = "fixed"):
        super().__init__()
        if kind not in PRIORS:
            raise ValueError(f"prior: expected one of {', '.join(PRIORS)}, got {kind!r}")
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std < math.inf:
            raise ValueError(f"prior_std: expected a finite number > 0, got {std!r}")
        self.kind, self.std, self.data_shape = kind, float(std), tuple(data_shape)
        self.dim = math.prod(self.data_shape)
        if kind == "learned":
            self.mean = nn.Parameter(torch.zeros(self.data_shape))
            self.log_std = nn.Parameter(torch.full(self.data_shape, math.log(self.std)))

    @property
    def learned(self) -> bool:
        return self.kind == "learned"

    def nll(self, x: Tensor) -> Tensor:
        """``-log p_B(x)`` per sample ``(B,)``, normaliser included, in ``x``'s accumulation dtype."""
        acc = acc_dtype(x.dtype)
        x = x.to(acc)
        B = x.shape[0]
        if not self.learned:
            sq = x.square().reshape(B, -1).sum(1)
            return 0.5 * sq / self.std**2 + 0.5 * self.dim * math.log(2 * math.pi * self.std**2)
        log_std = self.log_std.to(acc)
        z = (x - self.mean.to(acc)) * torch.exp(-log_std)
        return 0.5 * z.square().reshape(B, -1).sum(1) + log_std.sum() + 0.5 * self.dim * math.log(2 * math.pi)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, device=None,
               dtype: torch.dtype = torch.float32) -> Tensor:
        """``n`` draws, ``(n, *data_shape)``."""
        eps = torch.randn((n, *self.data_shape), generator=generator, device=device, dtype=dtype)
        if not self.learned:
            return self.std * eps
        return self.mean.to(eps.device, dtype) + torch.exp(self.log_std).to(eps.device, dtype) * eps

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, std={self.std}, data_shape={self.data_shape}"
