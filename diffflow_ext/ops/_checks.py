"""Up-front contract checks shared by every op entry point and backend.

Every error names the argument and says what was expected, so a bad call fails in
Python with a readable message before any kernel runs.
"""

from __future__ import annotations

import numbers
from typing import Union

import torch
from torch import Tensor

from .reference import acc_dtype

Scalar = Union[float, int, Tensor]

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


def per_sample_scalar(name: str, v: Scalar, x: Tensor, *, positive: bool = True, allow_zero: bool = False) -> Tensor:
    """Normalise ``dt`` or ``g`` (Python number, 0-d tensor or ``(B,)`` tensor) to a ``(B,)`` tensor.

    The result has the accumulation dtype of ``x`` (float32 for half types) and lives on ``x``'s
    device; tensors keep their autograd history. Python numbers are checked to be positive
    (tensors are not inspected, which would force a device sync); ``allow_zero`` admits 0.
    """
    B = x.shape[0]
    dtype = acc_dtype(x.dtype)
    if isinstance(v, Tensor):
        if not v.is_floating_point():
            raise ValueError(f"{name}: expected a floating tensor, got dtype {v.dtype}")
        if v.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of the state), got {v.device}")
        if v.dim() == 0 or v.shape == (1,):
            return v.reshape(()).to(dtype).expand(B)
        if v.shape == (B,):
            return v.to(dtype)
        raise ValueError(
            f"{name}: expected a Python float, a 0-d tensor or a tensor of shape ({B},) (one value per sample), "
            f"got shape {tuple(v.shape)}"
        )
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        if positive and not (float(v) > 0.0 or (allow_zero and float(v) == 0.0)):
            kind = "a number >= 0" if allow_zero else "a positive number"
            raise ValueError(f"{name}: expected {kind}, got {v}")
        return torch.full((B,), float(v), dtype=dtype, device=x.device)
    raise TypeError(
        f"{name}: expected a Python float, a 0-d tensor or a (B,) tensor, got {type(v).__name__}"
    )
