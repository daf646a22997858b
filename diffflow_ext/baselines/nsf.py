"""A neural spline flow from zuko (optional dependency), with the same small interface as the other models:
``loss(x)``, ``log_prob(x)``, ``sample(n, generator=...)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["NSF", "zuko_available"]


def zuko_available() -> bool:
    try:
        import zuko  # noqa: F401
    except ImportError:
        return False
    return True


class NSF(nn.Module):
    """zuko's ``NSF`` (rational-quadratic spline coupling flow) on ``dim``-vectors; the issue's settings by
    default (5 transforms, 2 x 128 hidden)."""

    def __init__(self, dim: int, transforms: int = 5, hidden: tuple[int, ...] = (128, 128), bins: int = 8):
        super().__init__()
        try:
            import zuko
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the NSF baseline needs zuko: pip install zuko") from e
        self.flow = zuko.flows.NSF(features=dim, transforms=transforms, hidden_features=tuple(hidden), bins=bins)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.flow().log_prob(x)

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return -self.log_prob(x).mean()

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        if generator is not None:  # zuko draws from the global generator: seed it from ours, restore after
            state = torch.random.get_rng_state()
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            try:
                return self.flow().sample((n,))
            finally:
                torch.random.set_rng_state(state)
        return self.flow().sample((n,))
