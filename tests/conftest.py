"""Shared pytest fixtures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

# ----------------------------------------------------------------------------------------------
# step-op cases (fixture ``step_cases``): argument factories, reference calls and tolerances for
# the fused-kernel tests (tests/test_ops.py, test_triton.py, test_cuda.py, test_compile.py).

_STEP_SPECS = {
    # name -> [(argument, kind)], kind: "s" state tensor, "p" positive per-sample scalar, "w" any-sign per-sample
    "em_step": [("x", "s"), ("drift", "s"), ("noise", "s"), ("dt", "p"), ("g", "p")],
    "backward_noise": [
        ("x_prev", "s"), ("x_next", "s"), ("drift_next", "s"), ("score_next", "s"), ("dt", "p"), ("g_next", "p"),
    ],
    "flow_step": [
        ("x_prev", "s"), ("x", "s"), ("drift", "s"), ("score", "s"), ("noise", "s"),
        ("dt_prev", "p"), ("dt", "p"), ("g", "p"),
    ],
    "adjoint_step": [
        ("x_prev", "s"), ("x", "s"), ("drift", "s"), ("score", "s"), ("weight", "w"), ("adj_next", "s"),
        ("adj_direct", "s"), ("dt_prev", "p"), ("dt", "p"), ("g", "p"),
    ],
}

# (rtol, atol) for elementwise outputs and for per-sample sums, vs the reference ops.
_STEP_TOL = {
    torch.float64: ((1e-10, 1e-10), (1e-10, 1e-10)),
    torch.float32: ((1e-5, 1e-5), (1e-4, 1e-4)),
    torch.float16: ((2e-3, 1e-3), (1e-4, 1e-4)),
    torch.bfloat16: ((1.6e-2, 1e-2), (1e-4, 1e-4)),
}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _state(shape, dtype, device, layout, gen):
    """A random state-shaped tensor with the given memory layout (values ~ N(0, 1))."""
    shape = tuple(shape)
    B, rest = shape[0], shape[1:]

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)

    if layout == "contiguous":
        return rnd(*shape)
    if layout == "transposed":  # non-contiguous: batch dim last in memory
        return rnd(*reversed(shape)).permute(*reversed(range(len(shape))))
    if layout == "sliced":  # non-contiguous: every other element of a wider last dim
        return rnd(*shape[:-1], 2 * shape[-1])[..., ::2] if len(shape) > 1 else rnd(2 * B)[::2]
    if layout == "expanded":  # stride 0 along the batch (every sample the same)
        return rnd(1, *rest).expand(shape)
    if layout == "offset":  # contiguous but not 16-byte aligned
        n = 1
        for s in shape:
            n *= s
        return rnd(n + 1)[1:].view(shape)
    raise ValueError(layout)


def _scalar(kind, B, dtype, device, style, gen):
    acc = _acc(dtype)
    if kind == "p":
        v = 0.05 + torch.rand(B, generator=gen, dtype=torch.float64)
    else:
        v = torch.randn(B, generator=gen, dtype=torch.float64)
    if style == "per_sample":
        return v.to(acc).to(device)
    if style == "strided":  # a (B,) view with stride 2
        return torch.repeat_interleave(v, 2).to(acc).to(device)[::2]
    if style == "float":
        return float(v[0])
    if style == "0d":
        return v[0].to(acc).to(device)
    if style == "1elem":
        return v[:1].to(acc).to(device)
    raise ValueError(style)


def make_args(op, shape, dtype=torch.float32, device="cpu", layout="contiguous", scalars="per_sample", seed=0,
              requires_grad=False):
    """Positional arguments of ``diffflow_ext.ops.<op>`` for a state of ``shape``.

    ``layout``: one of contiguous / transposed / sliced / expanded / offset, or "mixed" (a different
    one per tensor), or "mixed_dense" (the same without expanded). ``scalars``: per_sample / strided / float /
    0d / 1elem, or "mixed".
    """
    gen = torch.Generator().manual_seed(seed)
    layouts = ["contiguous", "transposed", "sliced", "expanded"]
    if layout == "mixed_dense":  # no stride-0 tensors (gradcheck needs non-overlapping inputs)
        layouts, layout = ["contiguous", "transposed", "sliced", "offset"], "mixed"
    styles = ["per_sample", "strided", "float", "0d", "1elem"]
    args = []
    for i, (_name, kind) in enumerate(_STEP_SPECS[op]):
        if kind == "s":
            lay = layouts[i % len(layouts)] if layout == "mixed" else layout
            t = _state(shape, dtype, device, lay, gen)
        else:
            st = styles[i % len(styles)] if scalars == "mixed" else scalars
            if kind == "w" and st == "float":
                st = "per_sample"
            t = _scalar(kind, shape[0], dtype, device, st, gen)
        if requires_grad and isinstance(t, torch.Tensor):
            t = t.detach().requires_grad_(True)
        args.append(t)
    return args


def reference(op, args):
    """The reference op on the same arguments (dt/g normalised exactly like the public wrappers)."""
    from diffflow_ext.ops import _checks
    from diffflow_ext.ops import reference as R

    names = [n for n, _ in _STEP_SPECS[op]]
    x = args[names.index("x")] if "x" in names else args[0]
    norm = []
    for (name, kind), a in zip(_STEP_SPECS[op], args):
        if kind == "s":
            norm.append(a)
        else:
            norm.append(_checks.per_sample_scalar(name, a, x, positive=kind == "p"))
    return getattr(R, op + "_ref")(*norm)


def call(op, args, backend):
    from diffflow_ext import ops

    return getattr(ops, op)(*args, backend=backend)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


# Outputs that are per-sample sums (looser tolerance: summation order differs from the reference).
_SUM_OUTPUTS = {"em_step": (), "backward_noise": (1,), "flow_step": (1,), "adjoint_step": ()}


def assert_matches(out, ref, dtype, sums=(), msg=""):
    """Every output equals the reference's: same shape, dtype and device; values within the dtype's
    tolerance (``sums``: indices of per-sample-sum outputs, compared with the sum tolerance)."""
    out, ref = as_tuple(out), as_tuple(ref)
    assert len(out) == len(ref)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.shape == r.shape, f"{msg} output {i}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        assert o.dtype == r.dtype, f"{msg} output {i}: dtype {o.dtype} != {r.dtype}"
        assert o.device == r.device, f"{msg} output {i}: device {o.device} != {r.device}"
        rtol, atol = _STEP_TOL[dtype][1 if i in sums else 0]
        torch.testing.assert_close(o.detach().double().cpu(), r.detach().double().cpu(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{msg} output {i}: {m}")


def grads(op, args, out_weights=None, backend="torch"):
    """Gradients of a random linear functional of every output w.r.t. every tensor argument requiring grad."""
    out = as_tuple(call(op, args, backend))
    gen = torch.Generator().manual_seed(123)
    loss = 0
    for o in out:
        w = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype).to(o.device)
        loss = loss + (o * w).sum()
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return torch.autograd.grad(loss, leaves)


@pytest.fixture(scope="session")
def step_cases():
    """Factories and checks for the fused step-op tests (see the helpers above)."""
    return SimpleNamespace(
        OPS=tuple(_STEP_SPECS),
        SPECS=_STEP_SPECS,
        DIFFERENTIABLE=("em_step", "backward_noise", "flow_step"),
        TOL=_STEP_TOL,
        make_args=make_args,
        reference=reference,
        call=call,
        assert_matches=assert_matches,
        SUM_OUTPUTS=_SUM_OUTPUTS,
        as_tuple=as_tuple,
        grads=grads,
    )
