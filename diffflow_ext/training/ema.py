"""Exponential moving average of a module's weights (the weights used for evaluation and sampling)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of a module's floating parameters.

    ``decay_t = min(decay, (1 + t) / (10 + t))`` (the usual warm-up), updated after each optimizer step.
    The shadow weights live on the module's device in the parameters' dtype.
    """

    def __init__(self, module: torch.nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            k: p.detach().clone() for k, p in module.named_parameters() if p.dtype.is_floating_point
        }

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for k, p in module.named_parameters():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(p.detach(), alpha=1.0 - d)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor], num_updates: int) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks parameters: {sorted(missing)}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])
        self.num_updates = int(num_updates)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for k, p in module.named_parameters():
            if k in self.shadow:
                p.copy_(self.shadow[k])
