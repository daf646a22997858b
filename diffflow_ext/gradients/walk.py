"""The DiffFlow trajectory walk, and how the networks are called along it.

Per sample, with states ``x_0..x_N`` on a grid ``t`` (``(B, N+1)``) and g values ``g`` (``(B, N+1)``),

    loss = -log p_B(x_N) + sum_{i<N} 0.5 ||delta_i||^2,   x_{i+1} = em_step(x_i, f_i(x_i), eps_i, dt_i, g_i),
    delta_i = backward_noise(x_i, x_{i+1}, f_{i+1}(x_{i+1}), s_{i+1}(x_{i+1}), dt_i, g_{i+1}).

Each network is evaluated once per state: the drift at ``x_i`` feeds both the step to ``x_{i+1}`` and
``delta_{i-1}`` (fused in ``ops.flow_step``). The score is never needed at ``x_0``.

Network calls go through :meth:`Walk.evaluate`: under ``torch.autocast`` when the walk asks for it (the
networks may compute in bf16/fp16), with the output cast back to the state dtype, so that the states and the
step ops never leave it. :class:`RngSnapshot` and :func:`frozen_running_stats` make a recomputation of a
network call in the backward walk identical to the first pass (same dropout masks; batch-norm running
statistics updated once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from .. import ops

__all__ = ["call_network", "Walk", "WalkResult", "forward_walk", "RngSnapshot", "frozen_running_stats",
           "running_stat_modules"]


def call_network(net: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor,
                 autocast: tuple[str, torch.dtype] | None = None) -> Tensor:
    """``net(x, t)`` (under ``torch.autocast(*autocast)`` when given), returned in ``x``'s dtype."""
    if autocast is not None:
        with torch.autocast(autocast[0], dtype=autocast[1]):
            out = net(x, t)
    else:
        out = net(x, t)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"network {type(net).__name__}: expected an output shaped like x {tuple(x.shape)}, got {got}")
    return out if out.dtype == x.dtype else out.to(x.dtype)


@dataclass
class Walk:
    """Everything one trajectory needs besides its start: networks, grid, prior, noise, backend, autocast."""

    drift: nn.Module
    score: nn.Module
    t: Tensor  # (B, N+1) network times
    dt: Tensor  # (B, N)  in the accumulation dtype
    g: Tensor  # (B, N+1) in the accumulation dtype
    prior_nll: Callable[[Tensor], Tensor]  # x_N -> (B,) -log p_B(x_N)
    noise: Callable[[Tensor], Tensor]  # like-x -> standard normal noise (consumes the generator)
    backend: str = "auto"
    autocast: tuple[str, torch.dtype] | None = None  # (device type, dtype) the networks run under
    prior_params: tuple[Tensor, ...] = ()  # trainable parameters prior_nll depends on (a learned prior)

    @property
    def num_steps(self) -> int:
        return self.dt.shape[1]

    def evaluate(self, net: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor) -> Tensor:
        return call_network(net, x, t, self.autocast)

    def networks(self, x: Tensor, i: int) -> tuple[Tensor, Tensor | None]:
        """Drift and (for ``i > 0``) score at state ``i``, in that order."""
        f = self.evaluate(self.drift, x, self.t[:, i])
        return f, (self.evaluate(self.score, x, self.t[:, i]) if i > 0 else None)


@dataclass
class WalkResult:
    loss: Tensor  # (B,) -log p_B(x_N) + sum_i 0.5||delta_i||^2
    states: list[Tensor] | None  # x_0..x_N when kept
    eps_half_sqnorm: Tensor | None  # (B,) sum_i 0.5||eps_i||^2 when asked for


def forward_walk(walk: Walk, x0: Tensor, *, keep_states: bool, eps_norms: bool = False,
                 on_state: Callable[[int, Tensor], tuple[Tensor, Tensor | None]] | None = None) -> WalkResult:
    """Run the forward SDE from ``x0`` and accumulate the loss; differentiable if grad mode is on.

    ``on_state(i, x_i)``, when given, replaces :meth:`Walk.networks` (the checkpointed walk uses it to decide,
    per state, whether the networks' graphs are kept)."""
    N, b = walk.num_steps, walk.backend
    dt, g = walk.dt, walk.g
    nets = on_state or (lambda i, x: walk.networks(x, i))
    states = [x0] if keep_states else None
    eps_sq = torch.zeros(x0.shape[0], dtype=dt.dtype, device=x0.device) if eps_norms else None

    def draw(x: Tensor) -> Tensor:
        nonlocal eps_sq
        eps = walk.noise(x)
        if eps_sq is not None:
            eps_sq = eps_sq + 0.5 * eps.to(dt.dtype).square().reshape(eps.shape[0], -1).sum(1)
        return eps

    f, _ = nets(0, x0)
    x_prev, x = x0, ops.em_step(x0, f, draw(x0), dt[:, 0], g[:, 0], backend=b)
    if states is not None:
        states.append(x)
    total = torch.zeros(x0.shape[0], dtype=dt.dtype, device=x0.device)
    for i in range(1, N):
        f, s = nets(i, x)
        x_next, h = ops.flow_step(x_prev, x, f, s, draw(x), dt[:, i - 1], dt[:, i], g[:, i], backend=b)
        total = total + h
        x_prev, x = x, x_next
        if states is not None:
            states.append(x)
    f, s = nets(N, x)
    _, h = ops.backward_noise(x_prev, x, f, s, dt[:, N - 1], g[:, N], backend=b)
    total = total + h + walk.prior_nll(x).to(total.dtype)
    return WalkResult(total, states, eps_sq)


class RngSnapshot:
    """The RNG state (CPU, and the device's for CUDA tensors) at one moment; :meth:`restored` replays it and
    leaves the RNG as it found it afterwards (as ``torch.utils.checkpoint`` does)."""

    __slots__ = ("device", "cpu_state", "device_state")

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.device_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        devices = [self.device] if self.device_state is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_state)
            if self.device_state is not None:
                torch.cuda.set_rng_state(self.device_state, self.device)
            yield


def running_stat_modules(nets: Iterable[nn.Module]) -> list[nn.Module]:
    """Normalisation layers that would update running statistics when called now (train mode)."""
    seen: set[int] = set()
    out = []
    for net in nets:
        if not isinstance(net, nn.Module):
            continue
        for m in net.modules():
            if id(m) not in seen and isinstance(m, _NormBase) and m.training and m.track_running_stats:
                seen.add(id(m))
                out.append(m)
    return out


@contextlib.contextmanager
def frozen_running_stats(modules: list[nn.Module]) -> Iterator[None]:
    """Run a recomputation without changing the running statistics a first pass already updated: the layers see
    copies of their buffers (which autograd may save for backward), and get the originals back afterwards."""
    if not modules:
        yield
        return
    names = ("running_mean", "running_var", "num_batches_tracked")
    saved = [(m, [(n, getattr(m, n)) for n in names if getattr(m, n, None) is not None]) for m in modules]
    for m, bufs in saved:
        for n, v in bufs:
            setattr(m, n, v.clone())
    try:
        yield
    finally:
        for m, bufs in saved:
            for n, v in bufs:
                setattr(m, n, v)
