"""Triton kernels of the step ops, registered as the ``diffflow_ext_triton::*`` operators.

The schemas, fake kernels and autograd formulas are those of :mod:`._library` (declared once for
both namespaces); this module only registers the impls: raw ``@triton.jit`` kernels launched from
Python (not ``wrap_triton``), for CUDA tensors and, when ``TRITON_INTERPRET=1`` was set before
``import triton``, for CPU tensors in the Triton interpreter (how they are tested without a GPU;
the interpreter has no bfloat16).

The formulas are written once, as the ``@triton.jit`` helpers ``_em_step``, ``_delta`` and their VJPs
(the same helpers as ``csrc/include/diffflow_ext/math.h``, derivatives documented there), which mirror
:mod:`.reference`; every kernel is built from them. Each kernel works on a ``(BLOCK_R, BLOCK_D)`` tile of the
contiguous ``(B, D)`` view: ``program_id(0)`` picks ``BLOCK_R`` rows, ``program_id(1)`` one of
``C`` column chunks (``C > 1`` only when there are too few rows to fill the device). Values are
computed in the accumulation dtype (that of ``dt``: float32, or float64 for float64 states);
per-row sums go to a ``(B, C)`` partial buffer (the output itself when ``C == 1``) summed by a
second pass.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import _library
from ._checks import check_like, check_state
from .reference import acc_dtype

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - triton is optional
    triton = None
    tl = None
    _IMPORT_ERROR = e

NAMESPACE = _library.TRITON_NAMESPACE


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0")


def status() -> tuple[bool, str]:
    if triton is None:
        return False, f"triton not installed ({_IMPORT_ERROR})"
    return True, f"Triton {triton.__version__} kernels"


# ----------------------------------------------------------------------------------------------
# kernels

if triton is not None:

    @triton.jit
    def _tile(B, D, CHUNK, j, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1).to(tl.int64) * CHUNK + j + tl.arange(0, BLOCK_D)
        mask = (rows < B)[:, None] & (cols < D)[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        return offs, mask

    @triton.jit
    def _rows(B, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        return rows, rows < B

    @triton.jit
    def _row_param(ptr, stride, rows, rmask):
        return tl.load(ptr + rows.to(tl.int64) * stride, mask=rmask, other=1.0)[:, None]

    @triton.jit
    def _rows_dt_g(B, dt_ptr, dt_s, g_ptr, g_s, BLOCK_R: tl.constexpr):
        """This program's rows, their mask, and their (BLOCK_R, 1) dt and g."""
        rows, rmask = _rows(B, BLOCK_R)
        return rows, rmask, _row_param(dt_ptr, dt_s, rows, rmask), _row_param(g_ptr, g_s, rows, rmask)

    @triton.jit
    def _ld(ptr, offs, mask, ACC: tl.constexpr):
        return tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)

    @triton.jit
    def _st(ptr, offs, mask, val):
        tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _st_sum(ptr, C, rows, rmask, acc):
        tl.store(ptr + rows.to(tl.int64) * C + tl.program_id(1), tl.sum(acc, axis=1), mask=rmask)

    # --- the formulas (those of csrc/include/diffflow_ext/math.h, one helper each) ---------------------

    @triton.jit
    def _em_coef(dt, g):
        """Per-sample constants of the Euler-Maruyama step: ``(g sqrt(dt), g / (2 sqrt(dt)), sqrt(dt))``."""
        sdt = tl.sqrt(dt)
        return g * sdt, g / (2.0 * sdt), sdt

    @triton.jit
    def _em_step(x, f, n, dt, g_sdt):
        return x + f * dt + g_sdt * n

    @triton.jit
    def _em_step_vjp_state(go, dt, g_sdt):
        """Cotangents of (drift, noise); that of x is ``go`` itself."""
        return go * dt, go * g_sdt

    @triton.jit
    def _em_step_vjp_coef(go, f, n, half_g_over_sdt, sdt):
        """Per-element contributions to the cotangents of (dt, g)."""
        return go * (f + n * half_g_over_sdt), go * n * sdt

    @triton.jit
    def _noise_coef(dt, g):
        """Per-sample constants of the backward noise: ``(sqrt(dt), 1 / (g sqrt(dt)))``."""
        sdt = tl.sqrt(dt)
        return sdt, 1.0 / (g * sdt)

    @triton.jit
    def _delta(xp, xn, f, s, dt, g, inv):
        return (xp - xn + (f - g * g * s) * dt) * inv

    @triton.jit
    def _delta_vjp_state(G, g, sdt, inv):
        """Cotangents of (x_prev, x_next, drift, score) from the cotangent ``G`` of delta."""
        return G * inv, -G * inv, G * (sdt / g), G * (-g * sdt)

    @triton.jit
    def _delta_vjp_coef(G, delta, f, s, dt, g, sdt):
        """Per-element contributions to the cotangents of (dt, g)."""
        return G * ((f / g - g * s) / sdt - delta / (2.0 * dt)), G * (-delta / g - 2.0 * sdt * s)

    # --- the kernels ------------------------------------------------------------------------------------

    @triton.jit
    def _em_step_fwd(x_ptr, f_ptr, n_ptr, out_ptr, dt_ptr, dt_s, g_ptr, g_s, B, D, C, CHUNK,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows, rmask, dt, g = _rows_dt_g(B, dt_ptr, dt_s, g_ptr, g_s, BLOCK_R)
        ACC: tl.constexpr = dt_ptr.dtype.element_ty
        g_sdt, _, _ = _em_coef(dt, g)
        for j in range(0, CHUNK, BLOCK_D):
            offs, m = _tile(B, D, CHUNK, j, BLOCK_R, BLOCK_D)
            x = _ld(x_ptr, offs, m, ACC)
            f = _ld(f_ptr, offs, m, ACC)
            n = _ld(n_ptr, offs, m, ACC)
            _st(out_ptr, offs, m, _em_step(x, f, n, dt, g_sdt))

    @triton.jit
    def _em_step_bwd(go_ptr, f_ptr, n_ptr, gf_ptr, gn_ptr, pdt_ptr, pg_ptr, dt_ptr, dt_s, g_ptr, g_s, B, D, C, CHUNK,
                     DTG: tl.constexpr, OUT_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows, rmask, dt, g = _rows_dt_g(B, dt_ptr, dt_s, g_ptr, g_s, BLOCK_R)
        ACC: tl.constexpr = dt_ptr.dtype.element_ty
        g_sdt, half_g_over_sdt, sdt = _em_coef(dt, g)
        acc_dt = tl.zeros([BLOCK_R, BLOCK_D], ACC)
        acc_g = tl.zeros([BLOCK_R, BLOCK_D], ACC)
        for j in range(0, CHUNK, BLOCK_D):
            offs, m = _tile(B, D, CHUNK, j, BLOCK_R, BLOCK_D)
            go = _ld(go_ptr, offs, m, ACC)
            grad_drift, grad_noise = _em_step_vjp_state(go, dt, g_sdt)
            if OUT_MASK & 1:
                _st(gf_ptr, offs, m, grad_drift)
            if OUT_MASK & 2:
                _st(gn_ptr, offs, m, grad_noise)
            if DTG:
                f = _ld(f_ptr, offs, m, ACC)
                n = _ld(n_ptr, offs, m, ACC)
                c_dt, c_g = _em_step_vjp_coef(go, f, n, half_g_over_sdt, sdt)
                acc_dt += c_dt
                acc_g += c_g
        if DTG:
            _st_sum(pdt_ptr, C, rows, rmask, acc_dt)
            _st_sum(pg_ptr, C, rows, rmask, acc_g)

    @triton.jit
    def _backward_noise_fwd(xp_ptr, xn_ptr, f_ptr, s_ptr, delta_ptr, phs_ptr, dt_ptr, dt_s, g_ptr, g_s, B, D, C,
                            CHUNK, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows, rmask, dt, g = _rows_dt_g(B, dt_ptr, dt_s, g_ptr, g_s, BLOCK_R)
        ACC: tl.constexpr = dt_ptr.dtype.element_ty
        _, inv = _noise_coef(dt, g)
        acc = tl.zeros([BLOCK_R, BLOCK_D], ACC)
        for j in range(0, CHUNK, BLOCK_D):
            offs, m = _tile(B, D, CHUNK, j, BLOCK_R, BLOCK_D)
            xp = _ld(xp_ptr, offs, m, ACC)
            xn = _ld(xn_ptr, offs, m, ACC)
            f = _ld(f_ptr, offs, m, ACC)
            s = _ld(s_ptr, offs, m, ACC)
            delta = _delta(xp, xn, f, s, dt, g, inv)
            _st(delta_ptr, offs, m, delta)
            acc += 0.5 * delta * delta
        _st_sum(phs_ptr, C, rows, rmask, acc)

    @triton.jit
    def _backward_noise_bwd(gd_ptr, gh_ptr, gh_s, delta_ptr, f_ptr, s_ptr, o0_ptr, o1_ptr, o2_ptr, o3_ptr, pdt_ptr,
                            pg_ptr, dt_ptr, dt_s, g_ptr, g_s, B, D, C, CHUNK, HAS_GD: tl.constexpr,
                            HAS_GH: tl.constexpr, DTG: tl.constexpr, OUT_MASK: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_D: tl.constexpr):
        rows, rmask, dt, g = _rows_dt_g(B, dt_ptr, dt_s, g_ptr, g_s, BLOCK_R)
        ACC: tl.constexpr = dt_ptr.dtype.element_ty
        if HAS_GH:
            gh = _row_param(gh_ptr, gh_s, rows, rmask)
        else:
            gh = tl.zeros([BLOCK_R, 1], ACC)
        sdt, inv = _noise_coef(dt, g)
        acc_dt = tl.zeros([BLOCK_R, BLOCK_D], ACC)
        acc_g = tl.zeros([BLOCK_R, BLOCK_D], ACC)
        for j in range(0, CHUNK, BLOCK_D):
            offs, m = _tile(B, D, CHUNK, j, BLOCK_R, BLOCK_D)
            delta = _ld(delta_ptr, offs, m, ACC)
            G = gh * delta
            if HAS_GD:
                G += _ld(gd_ptr, offs, m, ACC)
            grad_xp, grad_xn, grad_f, grad_s = _delta_vjp_state(G, g, sdt, inv)
            if OUT_MASK & 1:
                _st(o0_ptr, offs, m, grad_xp)
            if OUT_MASK & 2:
                _st(o1_ptr, offs, m, grad_xn)
            if OUT_MASK & 4:
                _st(o2_ptr, offs, m, grad_f)
            if OUT_MASK & 8:
                _st(o3_ptr, offs, m, grad_s)
            if DTG:
                f = _ld(f_ptr, offs, m, ACC)
                s = _ld(s_ptr, offs, m, ACC)
                c_dt, c_g = _delta_vjp_coef(G, delta, f, s, dt, g, sdt)
                acc_dt += c_dt
                acc_g += c_g
        if DTG:
            _st_sum(pdt_ptr, C, rows, rmask, acc_dt)
            _st_sum(pg_ptr, C, rows, rmask, acc_g)

    @triton.jit
    def _flow_step_fwd(xp_ptr, x_ptr, f_ptr, s_ptr, n_ptr, xn_ptr, phs_ptr, dtp_ptr, dtp_s, dt_ptr, dt_s, g_ptr, g_s,
                       B, D, C, CHUNK, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows, rmask, dt, g = _rows_dt_g(B, dt_ptr, dt_s, g_ptr, g_s, BLOCK_R)
        dtp = _row_param(dtp_ptr, dtp_s, rows, rmask)
        ACC: tl.constexpr = dt_ptr.dtype.element_ty
        g_sdt, _, _ = _em_coef(dt, g)
        _, invp = _noise_coef(dtp, g)
        acc = tl.zeros([BLOCK_R, BLOCK_D], ACC)
        for j in range(0, CHUNK, BLOCK_D):
            offs, m = _tile(B, D, CHUNK, j, BLOCK_R, BLOCK_D)
            xp = _ld(xp_ptr, offs, m, ACC)
            x = _ld(x_ptr, offs, m, ACC)
            f = _ld(f_ptr, offs, m, ACC)
            s = _ld(s_ptr, offs, m, ACC)
            n = _ld(n_ptr, offs, m, ACC)
            _st(xn_ptr, offs, m, _em_step(x, f, n, dt, g_sdt))
            delta = _delta(xp, x, f, s, dtp, g, invp)
            acc += 0.5 * delta * delta
        _st_sum(phs_ptr, C, rows, rmask, acc)

    @triton.jit
    def _flow_step_bwd(go_ptr, gh_ptr, gh_s, xp_ptr, x_ptr, f_ptr, s_ptr, n_ptr, o0_ptr, o1_ptr, o2_ptr, o3_ptr,
                       o4_ptr, pdtp_ptr, pdt_ptr, pg_ptr, dtp_ptr, dtp_s, dt_ptr, dt_s, g_ptr, g_s, B, D, C, CHUNK,
                       HAS_GO: tl.constexpr, HAS_GH: tl.constexpr, DTG: tl.constexpr, OUT_MASK: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows, rmask, dt, g = _rows_dt_g(B, dt_ptr, dt_s, g_ptr, g_s, BLOCK_R)
        dtp = _row_param(dtp_ptr, dtp_s, rows, rmask)
        ACC: tl.constexpr = dt_ptr.dtype.element_ty
        if HAS_GH:
            gh = _row_param(gh_ptr, gh_s, rows, rmask)
        else:
            gh = tl.zeros([BLOCK_R, 1], ACC)
        g_sdt, half_g_over_sdt, sdt = _em_coef(dt, g)
        sdtp, invp = _noise_coef(dtp, g)
        acc_dtp = tl.zeros([BLOCK_R, BLOCK_D], ACC)
        acc_dt = tl.zeros([BLOCK_R, BLOCK_D], ACC)
        acc_g = tl.zeros([BLOCK_R, BLOCK_D], ACC)
        for j in range(0, CHUNK, BLOCK_D):
            offs, m = _tile(B, D, CHUNK, j, BLOCK_R, BLOCK_D)
            if HAS_GO:
                go = _ld(go_ptr, offs, m, ACC)
            else:
                go = tl.zeros([BLOCK_R, BLOCK_D], ACC)
            f = _ld(f_ptr, offs, m, ACC)
            if HAS_GH:
                xp = _ld(xp_ptr, offs, m, ACC)
                x = _ld(x_ptr, offs, m, ACC)
                s = _ld(s_ptr, offs, m, ACC)
                delta = _delta(xp, x, f, s, dtp, g, invp)
                G = gh * delta
            else:
                s = tl.zeros([BLOCK_R, BLOCK_D], ACC)
                delta = tl.zeros([BLOCK_R, BLOCK_D], ACC)
                G = tl.zeros([BLOCK_R, BLOCK_D], ACC)
            grad_xp, grad_x, grad_f, grad_s = _delta_vjp_state(G, g, sdtp, invp)
            em_grad_f, grad_n = _em_step_vjp_state(go, dt, g_sdt)
            if OUT_MASK & 1:
                _st(o0_ptr, offs, m, grad_xp)
            if OUT_MASK & 2:
                _st(o1_ptr, offs, m, go + grad_x)
            if OUT_MASK & 4:
                _st(o2_ptr, offs, m, em_grad_f + grad_f)
            if OUT_MASK & 8:
                _st(o3_ptr, offs, m, grad_s)
            if OUT_MASK & 16:
                _st(o4_ptr, offs, m, grad_n)
            if DTG:
                n = _ld(n_ptr, offs, m, ACC)
                c_dtp, c_gp = _delta_vjp_coef(G, delta, f, s, dtp, g, sdtp)
                c_dt, c_g = _em_step_vjp_coef(go, f, n, half_g_over_sdt, sdt)
                acc_dtp += c_dtp
                acc_dt += c_dt
                acc_g += c_g + c_gp
        if DTG:
            _st_sum(pdtp_ptr, C, rows, rmask, acc_dtp)
            _st_sum(pdt_ptr, C, rows, rmask, acc_dt)
            _st_sum(pg_ptr, C, rows, rmask, acc_g)

    @triton.jit
    def _adjoint_step(xp_ptr, x_ptr, f_ptr, s_ptr, an_ptr, ad_ptr, o0_ptr, o1_ptr, o2_ptr, o3_ptr, w_ptr, w_s,
                      dtp_ptr, dtp_s, dt_ptr, dt_s, g_ptr, g_s, B, D, C, CHUNK, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr):
        rows, rmask, dt, g = _rows_dt_g(B, dt_ptr, dt_s, g_ptr, g_s, BLOCK_R)
        w = _row_param(w_ptr, w_s, rows, rmask)
        dtp = _row_param(dtp_ptr, dtp_s, rows, rmask)
        ACC: tl.constexpr = dt_ptr.dtype.element_ty
        g_sdt, _, _ = _em_coef(dt, g)
        sdtp, invp = _noise_coef(dtp, g)
        for j in range(0, CHUNK, BLOCK_D):
            offs, m = _tile(B, D, CHUNK, j, BLOCK_R, BLOCK_D)
            xp = _ld(xp_ptr, offs, m, ACC)
            x = _ld(x_ptr, offs, m, ACC)
            f = _ld(f_ptr, offs, m, ACC)
            s = _ld(s_ptr, offs, m, ACC)
            adj_next = _ld(an_ptr, offs, m, ACC)
            adj_direct = _ld(ad_ptr, offs, m, ACC)
            G = w * _delta(xp, x, f, s, dtp, g, invp)
            adj_prev, grad_x, grad_f, grad_s = _delta_vjp_state(G, g, sdtp, invp)
            em_grad_f, _ = _em_step_vjp_state(adj_next, dt, g_sdt)
            _st(o0_ptr, offs, m, adj_prev)
            _st(o1_ptr, offs, m, adj_direct + adj_next + grad_x)
            _st(o2_ptr, offs, m, em_grad_f + grad_f)
            _st(o3_ptr, offs, m, grad_s)


# ----------------------------------------------------------------------------------------------
# launch helpers

_TILE_ELEMS = 2048  # elements of one (BLOCK_R, BLOCK_D) tile
_MAX_BLOCK_D = 1024


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class _Launch:
    """Grid and tile sizes for a (B, D) problem on ``device``; partial-sum buffers."""

    def __init__(self, B: int, D: int, device: torch.device):
        self.B, self.D = B, D
        self.block_d = max(16, min(_MAX_BLOCK_D, _next_pow2(D)))
        self.block_r = max(1, min(_TILE_ELEMS // self.block_d, _next_pow2(B)))
        row_programs = triton.cdiv(B, self.block_r)
        if device.type == "cuda":
            target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        else:  # interpreter: few programs, but still exercise the column-chunk path
            target = 8
        col_blocks = max(1, triton.cdiv(D, self.block_d))
        C = min(col_blocks, max(1, triton.cdiv(target, row_programs)), 65535)
        self.chunk = triton.cdiv(col_blocks, C) * self.block_d  # a multiple of block_d
        self.C = max(1, triton.cdiv(D, self.chunk))
        self.grid = (row_programs, self.C)

    def sums(self, like: Tensor, n: int, wanted: bool = True) -> list[Tensor]:
        """``n`` per-row sum buffers: ``(B,)`` outputs when C == 1, else ``(B, C)`` partials."""
        shape = (self.B,) if self.C == 1 else (self.B, self.C)
        dtype = acc_dtype(like.dtype)
        if not wanted:
            return [torch.empty((0,), dtype=dtype, device=like.device) for _ in range(n)]
        return [torch.empty(shape, dtype=dtype, device=like.device) for _ in range(n)]

    def finish(self, bufs: list[Tensor]) -> list[Tensor]:
        if self.C == 1:
            return bufs
        return [b.sum(dim=1) if b.dim() == 2 else b for b in bufs]

    @property
    def meta(self) -> dict:
        return dict(BLOCK_R=self.block_r, BLOCK_D=self.block_d)

    @property
    def tail(self) -> tuple:
        return (self.B, self.D, self.C, self.chunk)


def _flat(t: Tensor | None, B: int, D: int):
    return None if t is None else t.contiguous().view(B, D)


def _check_row(name: str, v: Tensor, x: Tensor) -> None:
    B = x.shape[0]
    if not isinstance(v, Tensor) or v.dim() != 1 or v.shape[0] != B:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"{name}: expected a per-sample tensor of shape ({B},), got {shape}")
    if v.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (the device of the state), got {v.device}")
    if v.dtype != acc_dtype(x.dtype):
        raise ValueError(
            f"{name}: expected dtype {acc_dtype(x.dtype)} (the accumulation dtype of a {x.dtype} state), got {v.dtype}"
        )


def _check_backend_device(x: Tensor) -> None:
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and interpret_mode():
        return
    raise ValueError(
        f"{NAMESPACE}: Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {x.device}"
    )


def _setup(x_name: str, x: Tensor, like: dict, rows: dict):
    check_state(x_name, x)
    for name, t in like.items():
        if t is not None:
            check_like(name, t, x, x_name)
    for name, t in rows.items():
        if t is not None:
            _check_row(name, t, x)
    _check_backend_device(x)
    B = x.shape[0]
    D = x.numel() // B
    return B, D


def _row_param_or_dummy(t: Tensor | None, fallback: Tensor):
    """Row-parameter pointer and stride (a dummy pointer when absent)."""
    return (t, t.stride(0)) if t is not None else (fallback, 0)


def _guard(x: Tensor):
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    import contextlib

    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# op impls


def em_step(x, drift, noise, dt, g):
    B, D = _setup("x", x, {"drift": drift, "noise": noise}, {"dt": dt, "g": g})
    L = _Launch(B, D, x.device)
    out = x.new_empty(x.shape)
    with _guard(x):
        _em_step_fwd[L.grid](_flat(x, B, D), _flat(drift, B, D), _flat(noise, B, D), out, dt, dt.stride(0), g,
                             g.stride(0), *L.tail, **L.meta)
    return out


def _mask_bits(mask) -> int:
    return sum(1 << i for i, m in enumerate(mask) if m)


def _grad_outs(x: Tensor, mask):
    """Elementwise gradient outputs (empty (0,) tensors where masked out) and the pointers to pass."""
    outs = [x.new_empty(x.shape if m else (0,)) for m in mask]
    return outs, [o if m else x for o, m in zip(outs, mask)]  # masked: a valid dummy pointer, never written


def em_step_backward(grad_out, drift, noise, dt, g, dt_g_grad, output_mask):
    B, D = _setup("grad_out", grad_out, {"drift": drift, "noise": noise}, {"dt": dt, "g": g})
    if dt_g_grad and (drift is None or noise is None):
        raise ValueError("em_step_backward: drift and noise are required when dt_g_grad is true")
    L = _Launch(B, D, grad_out.device)
    go = _flat(grad_out, B, D)
    f = _flat(drift, B, D) if dt_g_grad else go
    n = _flat(noise, B, D) if dt_g_grad else go
    (g_drift, g_noise), ptrs = _grad_outs(grad_out, output_mask)
    pdt, pg = L.sums(grad_out, 2, dt_g_grad)
    with _guard(grad_out):
        _em_step_bwd[L.grid](go, f, n, *ptrs, pdt, pg, dt, dt.stride(0), g, g.stride(0), *L.tail,
                             DTG=bool(dt_g_grad), OUT_MASK=_mask_bits(output_mask), **L.meta)
    g_dt, g_g = L.finish([pdt, pg]) if dt_g_grad else (pdt, pg)
    return g_drift, g_noise, g_dt, g_g


def backward_noise(x_prev, x_next, drift_next, score_next, dt, g):
    B, D = _setup("x_prev", x_prev, {"x_next": x_next, "drift_next": drift_next, "score_next": score_next},
                  {"dt": dt, "g": g})
    L = _Launch(B, D, x_prev.device)
    delta = x_prev.new_empty(x_prev.shape)
    (phs,) = L.sums(x_prev, 1)
    with _guard(x_prev):
        _backward_noise_fwd[L.grid](_flat(x_prev, B, D), _flat(x_next, B, D), _flat(drift_next, B, D),
                                    _flat(score_next, B, D), delta, phs, dt, dt.stride(0), g, g.stride(0), *L.tail,
                                    **L.meta)
    (hs,) = L.finish([phs])
    return delta, hs


def backward_noise_backward(grad_delta, grad_half_sqnorm, delta, drift_next, score_next, dt, g, dt_g_grad,
                            output_mask):
    B, D = _setup(
        "delta",
        delta,
        {"grad_delta": grad_delta, "drift_next": drift_next, "score_next": score_next},
        {"dt": dt, "g": g, "grad_half_sqnorm": grad_half_sqnorm},
    )
    if dt_g_grad and (drift_next is None or score_next is None):
        raise ValueError("backward_noise_backward: drift_next and score_next are required when dt_g_grad is true")
    L = _Launch(B, D, delta.device)
    dc = _flat(delta, B, D)
    gd = _flat(grad_delta, B, D) if grad_delta is not None else dc
    f = _flat(drift_next, B, D) if dt_g_grad else dc
    s = _flat(score_next, B, D) if dt_g_grad else dc
    gh, gh_s = _row_param_or_dummy(grad_half_sqnorm, dt)
    outs, ptrs = _grad_outs(delta, output_mask)
    pdt, pg = L.sums(delta, 2, dt_g_grad)
    with _guard(delta):
        _backward_noise_bwd[L.grid](gd, gh, gh_s, dc, f, s, *ptrs, pdt, pg, dt, dt.stride(0), g, g.stride(0), *L.tail,
                                    HAS_GD=grad_delta is not None, HAS_GH=grad_half_sqnorm is not None,
                                    DTG=bool(dt_g_grad), OUT_MASK=_mask_bits(output_mask), **L.meta)
    g_dt, g_g = L.finish([pdt, pg]) if dt_g_grad else (pdt, pg)
    return (*outs, g_dt, g_g)


def flow_step(x_prev, x, drift, score, noise, dt_prev, dt, g):
    B, D = _setup(
        "x",
        x, {"x_prev": x_prev, "drift": drift, "score": score, "noise": noise}, {"dt_prev": dt_prev, "dt": dt, "g": g}
    )
    L = _Launch(B, D, x.device)
    x_next = x.new_empty(x.shape)
    (phs,) = L.sums(x, 1)
    with _guard(x):
        _flow_step_fwd[L.grid](_flat(x_prev, B, D), _flat(x, B, D), _flat(drift, B, D), _flat(score, B, D),
                               _flat(noise, B, D), x_next, phs, dt_prev, dt_prev.stride(0), dt, dt.stride(0), g,
                               g.stride(0), *L.tail, **L.meta)
    (hs,) = L.finish([phs])
    return x_next, hs


def flow_step_backward(grad_x_next, grad_half_sqnorm, x_prev, x, drift, score, noise, dt_prev, dt, g, dt_g_grad,
                       output_mask):
    B, D = _setup(
        "x",
        x,
        {"grad_x_next": grad_x_next, "x_prev": x_prev, "drift": drift, "score": score, "noise": noise},
        {"dt_prev": dt_prev, "dt": dt, "g": g, "grad_half_sqnorm": grad_half_sqnorm},
    )
    if dt_g_grad and noise is None:
        raise ValueError("flow_step_backward: noise is required when dt_g_grad is true")
    L = _Launch(B, D, x.device)
    has_go, has_gh = grad_x_next is not None, grad_half_sqnorm is not None
    xc = _flat(x, B, D)
    go = _flat(grad_x_next, B, D) if has_go else xc
    n = _flat(noise, B, D) if dt_g_grad else xc
    gh, gh_s = _row_param_or_dummy(grad_half_sqnorm, dt)
    outs, ptrs = _grad_outs(x, output_mask)
    pdtp, pdt, pg = L.sums(x, 3, dt_g_grad)
    with _guard(x):
        _flow_step_bwd[L.grid](go, gh, gh_s, _flat(x_prev, B, D), xc, _flat(drift, B, D), _flat(score, B, D), n,
                               *ptrs, pdtp, pdt, pg, dt_prev, dt_prev.stride(0), dt, dt.stride(0), g, g.stride(0),
                               *L.tail, HAS_GO=has_go, HAS_GH=has_gh, DTG=bool(dt_g_grad),
                               OUT_MASK=_mask_bits(output_mask), **L.meta)
    sums = L.finish([pdtp, pdt, pg]) if dt_g_grad else [pdtp, pdt, pg]
    return (*outs, *sums)


def adjoint_step(x_prev, x, drift, score, weight, adj_next, adj_direct, dt_prev, dt, g):
    B, D = _setup(
        "x",
        x,
        {"x_prev": x_prev, "drift": drift, "score": score, "adj_next": adj_next, "adj_direct": adj_direct},
        {"weight": weight, "dt_prev": dt_prev, "dt": dt, "g": g},
    )
    L = _Launch(B, D, x.device)
    outs = [x.new_empty(x.shape) for _ in range(4)]
    with _guard(x):
        _adjoint_step[L.grid](_flat(x_prev, B, D), _flat(x, B, D), _flat(drift, B, D), _flat(score, B, D),
                              _flat(adj_next, B, D), _flat(adj_direct, B, D), *outs, weight, weight.stride(0),
                              dt_prev, dt_prev.stride(0), dt, dt.stride(0), g, g.stride(0), *L.tail, **L.meta)
    return tuple(outs)


IMPLS = {name: globals()[name] for name in _library.SCHEMAS}  # one impl per schema, named after it


def _register() -> None:
    if triton is None:
        return
    lib = _library.library(NAMESPACE)
    keys = ["CUDA"] + (["CPU"] if interpret_mode() else [])
    for key in keys:
        for name, fn in IMPLS.items():
            lib.impl(name, fn, key)


_register()
