"""Pure-PyTorch reference ops: the one place where the DiffFlow step math lives.

Every kernel (C++ CPU, CUDA, Triton) must match these functions; tests compare
against them. Conventions, for a batch of ``B`` samples of any shape ``(B, ...)``:

* ``dt`` and ``g`` arrive here already normalised by :func:`per_sample` to
  ``(B,)`` tensors (see :mod:`diffflow_ext.ops` for the public entry points that
  accept Python floats, 0-d tensors and ``(B,)`` tensors).
* Squared norms are accumulated in at least float32 (``acc_dtype``); they are
  returned in that dtype, so ``half_sqnorm`` of a float16 / bfloat16 input is float32.

Discretisation (grid t_0 < ... < t_N, dt_i = t_{i+1} - t_i):

    forward  x_{i+1} = x_i + f_i(x_i) dt_i + g_i sqrt(dt_i) eps_i                        (em_step)
    backward x_i     = x_{i+1} - [f_{i+1} - g_{i+1}^2 s_{i+1}](x_{i+1}) dt_i + g_{i+1} sqrt(dt_i) delta_i

so the backward noise that reproduces a forward transition is

    delta_i = (x_i - x_{i+1} + (f_{i+1} - g_{i+1}^2 s_{i+1}) dt_i) / (g_{i+1} sqrt(dt_i))     (backward_noise)

and, substituting the forward step (the presentation's closed form has the sign of
the eps and of the drift-difference terms flipped),

    delta_i = -(g_i / g_{i+1}) eps_i + [(f_{i+1} - f_i) / g_{i+1} - g_{i+1} s_{i+1}] sqrt(dt_i).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "acc_dtype",
    "per_sample",
    "em_step_ref",
    "backward_noise_ref",
    "flow_step_ref",
    "adjoint_step_ref",
    "backward_noise_from_forward_noise_ref",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_sample(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a ``(B,)`` per-sample tensor to broadcast against ``x`` of shape ``(B, ...)``."""
    return v.reshape((v.shape[0],) + (1,) * (x.dim() - 1))


def _row_half_sqnorm(delta: Tensor) -> Tensor:
    d = delta.to(acc_dtype(delta.dtype))
    return 0.5 * d.square().reshape(d.shape[0], -1).sum(dim=1)


def _upcast(*ts: Tensor) -> list[Tensor]:
    """Upcast to the accumulation dtype (kernels compute in fp32 and round only the outputs)."""
    return [t.to(acc_dtype(t.dtype)) for t in ts]


def _delta(x_prev: Tensor, x_next: Tensor, drift_next: Tensor, score_next: Tensor, dt: Tensor, g: Tensor) -> Tensor:
    """The backward noise ``(x_prev - x_next + (drift_next - g^2 score_next) dt) / (g sqrt(dt))`` (``dt``, ``g``
    broadcast against the states): the one place this formula is written in Python."""
    return (x_prev - x_next + (drift_next - g * g * score_next) * dt) / (g * torch.sqrt(dt))


def em_step_ref(x: Tensor, drift: Tensor, noise: Tensor, dt: Tensor, g: Tensor) -> Tensor:
    """Forward Euler-Maruyama step ``x + drift*dt + g*sqrt(dt)*noise`` (``dt``, ``g``: ``(B,)``)."""
    xa, da, na = _upcast(x, drift, noise)
    dt_b, g_b = per_sample(dt, x), per_sample(g, x)
    return (xa + da * dt_b + g_b * torch.sqrt(dt_b) * na).to(x.dtype)


def backward_noise_ref(
    x_prev: Tensor, x_next: Tensor, drift_next: Tensor, score_next: Tensor, dt: Tensor, g_next: Tensor
) -> tuple[Tensor, Tensor]:
    """Backward noise ``delta`` of one transition and ``0.5*||delta||^2`` per sample."""
    delta = _delta(*_upcast(x_prev, x_next, drift_next, score_next), per_sample(dt, x_prev), per_sample(g_next, x_prev))
    return delta.to(x_prev.dtype), _row_half_sqnorm(delta)


def flow_step_ref(
    x_prev: Tensor,
    x: Tensor,
    drift: Tensor,
    score: Tensor,
    noise: Tensor,
    dt_prev: Tensor,
    dt: Tensor,
    g: Tensor,
) -> tuple[Tensor, Tensor]:
    """One state of the forward walk, fused: the networks' outputs at ``x = x_i`` serve both

    * the Euler-Maruyama step to ``x_{i+1}`` (``drift`` with ``dt = dt_i``, ``g = g_i``), and
    * the backward noise of the previous transition ``x_{i-1} -> x_i`` (``dt_prev = dt_{i-1}``,
      the same ``g = g_i``), of which only the half squared norm is returned.

    Returns ``(x_next, half_sqnorm_prev)``.
    """
    x_next = em_step_ref(x, drift, noise, dt, g)
    _, half_sqnorm_prev = backward_noise_ref(x_prev, x, drift, score, dt_prev, g)
    return x_next, half_sqnorm_prev


def adjoint_step_ref(
    x_prev: Tensor,
    x: Tensor,
    drift: Tensor,
    score: Tensor,
    weight: Tensor,
    adj_next: Tensor,
    adj_direct: Tensor,
    dt_prev: Tensor,
    dt: Tensor,
    g: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One state of the stochastic-adjoint backward walk, fused (the VJP of :func:`flow_step_ref`).

    At state ``i`` the per-sample loss holds ``weight * 0.5*||delta_{i-1}||^2`` (``delta_{i-1}`` from
    ``backward_noise(x_prev, x, drift, score, dt_prev, g)``) and ``x_{i+1} = em_step(x, drift, ., dt, .)``
    whose total cotangent is ``adj_next``. ``adj_direct`` is the cotangent already collected on ``x``
    from the transition after it (the direct ``x_i`` term of ``delta_i``).

    Returns the cotangents ``(adj_prev_direct, cot_x, cot_drift, cot_score)``:

    * ``adj_prev_direct``: on ``x_prev`` through ``delta_{i-1}`` (its direct term only);
    * ``cot_x``: on ``x`` through everything except the networks (``adj_direct + adj_next + ddelta/dx``);
    * ``cot_drift``, ``cot_score``: on the networks' outputs at ``x``, to be pulled back through them.
    """
    xp, xa, d, s, an, ad = _upcast(x_prev, x, drift, score, adj_next, adj_direct)
    dt_prev_b, dt_b, g_b = per_sample(dt_prev, x), per_sample(dt, x), per_sample(g, x)
    sqrt_dt = torch.sqrt(dt_prev_b)
    delta = _delta(xp, xa, d, s, dt_prev_b, g_b)
    gd = per_sample(weight, x).to(delta.dtype) * delta  # cotangent of delta from weight*0.5*||delta||^2
    adj_prev_direct = gd / (g_b * sqrt_dt)
    cot_x = ad + an - adj_prev_direct
    cot_drift = an * dt_b + gd * (sqrt_dt / g_b)
    cot_score = -gd * (g_b * sqrt_dt)
    return tuple(t.to(x.dtype) for t in (adj_prev_direct, cot_x, cot_drift, cot_score))


def backward_noise_from_forward_noise_ref(
    noise: Tensor,
    drift: Tensor,
    drift_next: Tensor,
    score_next: Tensor,
    dt: Tensor,
    g: Tensor,
    g_next: Tensor,
) -> Tensor:
    """delta^B in terms of the forward noise eps (derived here; used by tests as a cross-check):

    ``delta = -(g_i/g_{i+1}) eps + [(f_{i+1} - f_i)/g_{i+1} - g_{i+1} s_{i+1}] sqrt(dt_i)``.
    """
    dt_b, g_b, gn_b = per_sample(dt, noise), per_sample(g, noise), per_sample(g_next, noise)
    return -(g_b / gn_b) * noise + ((drift_next - drift) / gn_b - gn_b * score_next) * torch.sqrt(dt_b)
