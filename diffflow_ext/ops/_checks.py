"""Up-front contract checks shared by every op entry point and backend.

Every error names the argument and says what was expected, so a bad call fails in
Python with a readable message before any kernel runs.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .reference import acc_dtype

Scalar = float | int | Tensor

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_like(name: str, t: object, ref: Tensor, ref_name: str) -> None:
    """``t`` must be a tensor with ``ref``'s shape, dtype and device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        raise ValueError(
            f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), got {tuple(t.shape)}"
        )
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")


def check_state(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (B, ...), got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a tensor of shape (B, ...) with B >= 1, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name}: expected a floating dtype (one of {', '.join(map(str, _FLOATS))}), got {x.dtype}")
    return x


# Python-number dt / g / ... as (B,) tensors, per (value, B, dtype, device): an expanded (stride-0) view of a
# 0-d tensor, made once and reused instead of allocating a (B,) tensor per call. Read-only by contract (the
# ops never write their per-sample inputs). Bounded; bypassed while torch.compile traces (no global state in
# graphs) and for zeros (keeps the sign of -0.0, which compares equal to 0.0).
_SCALARS: dict = {}
_SCALARS_MAX = 1024


def _scalar_rows(value: float, B: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if value == 0.0 or torch.compiler.is_compiling():
        return torch.full((), value, dtype=dtype, device=device).expand(B)
    key = (value, B, dtype, device)
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) >= _SCALARS_MAX:
            _SCALARS.clear()
        t = _SCALARS[key] = torch.full((), value, dtype=dtype, device=device).expand(B)
    return t


def per_sample_scalar(name: str, v: Scalar, x: Tensor, *, positive: bool = True, allow_zero: bool = False) -> Tensor:
    """Normalise ``dt`` or ``g`` (Python number, 0-d tensor or ``(B,)`` tensor) to a ``(B,)`` tensor.

    The result has the accumulation dtype of ``x`` (float32 for half types) and lives on ``x``'s
    device; tensors keep their autograd history. Python numbers are checked to be positive
    and finite (tensors are not inspected, which would force a device sync); ``allow_zero`` admits 0.
    A Python number becomes a cached expanded (stride-0, read-only) view of a 0-d tensor.
    """
    B = x.shape[0]
    dtype = acc_dtype(x.dtype)
    if isinstance(v, Tensor):
        if not v.is_floating_point():
            raise ValueError(f"{name}: expected a floating tensor, got dtype {v.dtype}")
        if v.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of the state), got {v.device}")
        shape = v.shape
        n = len(shape)
        if n == 1 and shape[0] == B:  # the common case: already per-sample
            return v if v.dtype is dtype else v.to(dtype)
        if n == 0 or (n == 1 and shape[0] == 1):
            return v.reshape(()).to(dtype).expand(B)
        raise ValueError(
            f"{name}: expected a Python float, a 0-d tensor or a tensor of shape ({B},) (one value per sample), "
            f"got shape {tuple(v.shape)}"
        )
    if type(v) is float or (isinstance(v, numbers.Real) and not isinstance(v, bool)):
        fv = float(v)
        if not math.isfinite(fv):
            raise ValueError(f"{name}: expected a finite number, got {v}")
        if positive and not (fv > 0.0 or (allow_zero and fv == 0.0)):
            kind = "a number >= 0" if allow_zero else "a positive number"
            raise ValueError(f"{name}: expected {kind}, got {v}")
        return _scalar_rows(fv, B, dtype, x.device)
    raise TypeError(
        f"{name}: expected a Python float, a 0-d tensor or a (B,) tensor, got {type(v).__name__}"
    )
