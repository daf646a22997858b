"""The DiffFlow step ops, autograd-aware, with a choice of backend.

Public ops (stable signatures; ``dt`` and ``g``: Python float, 0-d tensor or ``(B,)`` tensor):

* :func:`em_step` -- forward Euler-Maruyama step.
* :func:`backward_noise` -- backward noise delta^B of a transition and its half squared norm.
* :func:`flow_step` -- fused forward-walk state: next state and previous transition's half squared norm.
* :func:`adjoint_step` -- fused backward-walk state of the stochastic adjoint (the VJP of ``flow_step``).

The math lives in :mod:`diffflow_ext.ops.reference`; the backends in :mod:`.backends`.
"""

from __future__ import annotations

from torch import Tensor

from . import reference
from ._checks import Scalar, check_like, check_state, per_sample_scalar
from .backends import BACKENDS, available_backends, resolve

__all__ = [
    "em_step",
    "backward_noise",
    "flow_step",
    "adjoint_step",
    "available_backends",
    "BACKENDS",
    "reference",
]


def em_step(x: Tensor, drift: Tensor, noise: Tensor, dt: Scalar, g: Scalar, *, backend: str = "auto") -> Tensor:
    """``x + drift*dt + g*sqrt(dt)*noise`` for ``x`` of shape ``(B, ...)`` (``g >= 0``)."""
    check_state("x", x)
    check_like("drift", drift, x, "x")
    check_like("noise", noise, x, "x")
    dt_t = per_sample_scalar("dt", dt, x)
    g_t = per_sample_scalar("g", g, x, allow_zero=True)  # g = 0: a deterministic (ODE) step
    return resolve(backend, x.device).em_step(x, drift, noise, dt_t, g_t)


def backward_noise(
    x_prev: Tensor,
    x_next: Tensor,
    drift_next: Tensor,
    score_next: Tensor,
    dt: Scalar,
    g_next: Scalar,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``(delta, half_sqnorm)`` with
    ``delta = (x_prev - x_next + (drift_next - g_next**2 * score_next) * dt) / (g_next * sqrt(dt))`` and
    ``half_sqnorm[b] = 0.5 * sum(delta[b]**2)`` (accumulated and returned in at least float32)."""
    check_state("x_prev", x_prev)
    check_like("x_next", x_next, x_prev, "x_prev")
    check_like("drift_next", drift_next, x_prev, "x_prev")
    check_like("score_next", score_next, x_prev, "x_prev")
    dt_t = per_sample_scalar("dt", dt, x_prev)
    g_t = per_sample_scalar("g_next", g_next, x_prev)
    return resolve(backend, x_prev.device).backward_noise(x_prev, x_next, drift_next, score_next, dt_t, g_t)


def flow_step(
    x_prev: Tensor,
    x: Tensor,
    drift: Tensor,
    score: Tensor,
    noise: Tensor,
    dt_prev: Scalar,
    dt: Scalar,
    g: Scalar,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Fused ``(em_step(x, drift, noise, dt, g), backward_noise(x_prev, x, drift, score, dt_prev, g)[1])``."""
    check_state("x", x)
    for name, t in (("x_prev", x_prev), ("drift", drift), ("score", score), ("noise", noise)):
        check_like(name, t, x, "x")
    dtp_t = per_sample_scalar("dt_prev", dt_prev, x)
    dt_t = per_sample_scalar("dt", dt, x)
    g_t = per_sample_scalar("g", g, x)
    return resolve(backend, x.device).flow_step(x_prev, x, drift, score, noise, dtp_t, dt_t, g_t)


def adjoint_step(
    x_prev: Tensor,
    x: Tensor,
    drift: Tensor,
    score: Tensor,
    weight: Tensor,
    adj_next: Tensor,
    adj_direct: Tensor,
    dt_prev: Scalar,
    dt: Scalar,
    g: Scalar,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused backward-walk state; see :func:`diffflow_ext.ops.reference.adjoint_step_ref`.

    ``weight``: ``(B,)`` cotangent of the per-sample half squared norm. Not differentiable itself
    (it is a backward pass)."""
    check_state("x", x)
    for name, t in (("x_prev", x_prev), ("drift", drift), ("score", score), ("adj_next", adj_next),
                    ("adj_direct", adj_direct)):
        check_like(name, t, x, "x")
    w_t = per_sample_scalar("weight", weight, x, positive=False)
    dtp_t = per_sample_scalar("dt_prev", dt_prev, x)
    dt_t = per_sample_scalar("dt", dt, x)
    g_t = per_sample_scalar("g", g, x)
    return resolve(backend, x.device).adjoint_step(x_prev, x, drift, score, w_t, adj_next, adj_direct, dtp_t, dt_t, g_t)
