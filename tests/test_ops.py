"""Fused step kernels on CPU: every backend equals the reference ops (values and gradients), the
torch.library registrations pass opcheck, and bad input fails with an error naming the argument.

Backends tested here: "torch" (the reference itself, as a control) and "cpu" (the compiled C++
kernels, skipped with the reason when the extension is not built). Triton: tests/test_triton.py;
CUDA: tests/test_cuda.py. Tolerances (vs the reference, see conftest._STEP_TOL): float64 1e-10;
float32 1e-5 elementwise, 1e-4 for per-sample sums (summation order differs); float16 rtol 2e-3 and
bfloat16 rtol 1.6e-2 elementwise (both compute in float32 and round only the outputs).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffflow_ext
from diffflow_ext import ops
from diffflow_ext.ops import _library, backends

CPU_OK, CPU_WHY = backends._status("cpu")
needs_cpu_ext = pytest.mark.skipif(not CPU_OK, reason=f"cpu backend unavailable: {CPU_WHY}")
CPU_BACKENDS = ["torch", pytest.param("cpu", marks=needs_cpu_ext)]

OPS = ("em_step", "backward_noise", "flow_step", "adjoint_step")
DIFF_OPS = ("em_step", "backward_noise", "flow_step")
SUMS = {"em_step": (), "backward_noise": (1,), "flow_step": (1,), "adjoint_step": ()}
SHAPES = [(1, 1), (1, 7), (3, 1), (3, 7), (5, 97), (2, 1031), (2, 70000), (4, 3, 5), (6,), (2, 0)]


# ----------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_values_match_reference(step_cases, op, shape, dtype, backend):
    args = step_cases.make_args(op, shape, dtype)
    step_cases.assert_matches(step_cases.call(op, args, backend), step_cases.reference(op, args), dtype,
                              sums=SUMS[op], msg=f"{op}{shape}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded", "offset", "mixed"])
@pytest.mark.parametrize("shape", [(3, 7), (4, 3, 5), (2, 9000)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_layouts(step_cases, op, shape, layout, backend):
    """Non-contiguous, expanded and misaligned inputs give the reference's values."""
    args = step_cases.make_args(op, shape, torch.float32, layout=layout, seed=1)
    out = step_cases.call(op, args, backend)
    step_cases.assert_matches(out, step_cases.reference(op, args), torch.float32, sums=SUMS[op], msg=layout)
    if backend != "torch":  # the kernels' outputs are contiguous (the fake kernels say so too)
        for o in step_cases.as_tuple(out):
            assert o.is_contiguous()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scalars", ["per_sample", "strided", "float", "0d", "1elem", "mixed"])
@pytest.mark.parametrize("op", OPS)
def test_scalar_forms(step_cases, op, scalars, backend):
    """dt / g as (B,) tensors (contiguous or strided), Python floats, 0-d and 1-element tensors."""
    args = step_cases.make_args(op, (4, 33), torch.float64, scalars=scalars, seed=2)
    step_cases.assert_matches(step_cases.call(op, args, backend), step_cases.reference(op, args), torch.float64,
                              sums=SUMS[op])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (2, 70000), (4, 3, 5)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_half_types(step_cases, op, shape, dtype, backend):
    """float16 / bfloat16 states: computed in float32, outputs rounded, sums returned in float32."""
    args = step_cases.make_args(op, shape, dtype, seed=3)
    out = step_cases.call(op, args, backend)
    step_cases.assert_matches(out, step_cases.reference(op, args), dtype, sums=SUMS[op])
    for i in SUMS[op]:
        assert out[i].dtype == torch.float32


@needs_cpu_ext
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    op=st.sampled_from(OPS),
    B=st.integers(1, 6),
    rest=st.lists(st.integers(1, 40), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    layout=st.sampled_from(["contiguous", "transposed", "sliced", "expanded", "offset", "mixed"]),
    scalars=st.sampled_from(["per_sample", "float", "0d", "mixed"]),
    seed=st.integers(0, 2**16),
)
def test_shape_sweep(step_cases, op, B, rest, dtype, layout, scalars, seed):
    shape = (B, *rest)
    args = step_cases.make_args(op, shape, dtype, layout=layout, scalars=scalars, seed=seed)
    step_cases.assert_matches(step_cases.call(op, args, "cpu"), step_cases.reference(op, args), dtype,
                              sums=SUMS[op], msg=f"{op}{shape} {layout} {scalars}")


@needs_cpu_ext
def test_auto_picks_compiled_cpu_kernels(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve("auto", torch.device("cpu")).name == "cpu"
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.resolve("auto", torch.device("cpu")).name == "torch"
    # an explicit backend beats the environment variable
    assert backends.resolve("cpu", torch.device("cpu")).name == "cpu"


def test_env_var_validated(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="DIFFFLOW_BACKEND"):
        ops.em_step(x, x, x, 0.1, 1.0)


def test_available_backends_reports_reasons():
    info = diffflow_ext.available_backends()
    assert set(info) == {"cuda", "triton", "cpu", "torch"}
    for name, v in info.items():
        assert isinstance(v["available"], bool) and isinstance(v["reason"], str) and v["reason"], name
        assert v["devices"]
    assert info["torch"]["available"]
    if not torch.cuda.is_available():
        assert not info["cuda"]["available"]
        assert "CUDA" in info["cuda"]["reason"] or "compiled extension not built" in info["cuda"]["reason"]
    if not info["cpu"]["available"]:
        assert info["cpu"]["reason"].startswith("compiled extension not built")


# ----------------------------------------------------------------------------------------------
# gradients


def _gradcheck_args(step_cases, op, shape, scalars="per_sample", seed=4):
    args = step_cases.make_args(op, shape, torch.float64, scalars=scalars, seed=seed, requires_grad=True)
    return args


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("outputs", ["all", "first", "second"])
@pytest.mark.parametrize("op", DIFF_OPS)
def test_gradcheck(step_cases, op, outputs, backend):
    """First derivatives in every tensor argument, incl. per-sample dt and g (float64 gradcheck)."""
    if op == "em_step" and outputs != "all":
        pytest.skip("em_step has one output")
    args = _gradcheck_args(step_cases, op, (3, 4))

    def f(*a):
        out = step_cases.call(op, a, backend)
        return out if outputs == "all" else out[0 if outputs == "first" else 1]

    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", DIFF_OPS)
def test_gradcheck_shared_scalars_and_layouts(step_cases, op, backend):
    """0-d dt / g shared by all samples (their gradient is a sum over the batch), non-contiguous states."""
    args = step_cases.make_args(op, (2, 3, 2), torch.float64, scalars="mixed", layout="mixed_dense", seed=5,
                                requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: step_cases.call(op, a, backend), tuple(args), eps=1e-6, atol=1e-7)


@needs_cpu_ext
@pytest.mark.parametrize("shape", [(3, 7), (2, 70000), (5, 2, 3)], ids=str)
@pytest.mark.parametrize("op", DIFF_OPS)
def test_grads_match_reference_float32(step_cases, op, shape):
    """float32 gradients of the compiled kernels equal the reference's autograd (incl. the
    column-chunked per-sample sums of long rows)."""
    args = step_cases.make_args(op, shape, torch.float32, seed=6, requires_grad=True)
    got = step_cases.grads(op, args, backend="cpu")
    want = step_cases.grads(op, args, backend="torch")
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()), msg=f"grad {i}")


@needs_cpu_ext
@pytest.mark.parametrize("which", ["x_prev", "dt", "g", "none_of_dt_g"])
def test_partial_requires_grad(step_cases, which):
    """Only some inputs require grad (e.g. dt/g constants: their sums are skipped)."""
    for op in DIFF_OPS:
        names = [n for n, _ in step_cases.SPECS[op]]
        args = step_cases.make_args(op, (3, 5), torch.float64, seed=7)
        want = [i for i, n in enumerate(names) if n == which or (which == "none_of_dt_g" and n in ("x", "drift"))]
        if not want:
            want = [0]
        for i in want:
            args[i] = args[i].clone().requires_grad_(True)
        got = step_cases.grads(op, args, backend="cpu")
        ref = step_cases.grads(op, args, backend="torch")
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_noise_half_sqnorm_only(step_cases, backend):
    """A loss on half_sqnorm alone: grad_delta is None and G = w * delta."""
    args = step_cases.make_args("backward_noise", (4, 6), torch.float64, seed=8, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64)
    delta, hs = ops.backward_noise(*args, backend=backend)
    gx_prev, gx_next, gdrift, gscore, gdt, gg = torch.autograd.grad((w * hs).sum(), args)
    dt, g = args[4].detach()[:, None], args[5].detach()[:, None]
    G = w[:, None] * delta.detach()
    torch.testing.assert_close(gx_prev, G / (g * dt.sqrt()))
    torch.testing.assert_close(gx_next, -G / (g * dt.sqrt()))
    torch.testing.assert_close(gdrift, G * dt.sqrt() / g)
    torch.testing.assert_close(gscore, -G * g * dt.sqrt())
    d, s = args[2].detach(), args[3].detach()
    torch.testing.assert_close(gdt, (G * (-delta.detach() / (2 * dt) + (d / g - g * s) / dt.sqrt())).sum(1))
    torch.testing.assert_close(gg, (G * (-delta.detach() / g - 2 * s * dt.sqrt())).sum(1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_adjoint_step_is_not_differentiable(step_cases, backend):
    args = step_cases.make_args("adjoint_step", (2, 3), torch.float64, requires_grad=True)
    out = ops.adjoint_step(*args, backend=backend)
    if backend == "torch":
        return  # the reference is plain autograd-able PyTorch
    with pytest.raises(RuntimeError, match="not differentiable"):
        out[1].sum().backward()


@needs_cpu_ext
def test_adjoint_step_is_vjp_of_flow_step(step_cases):
    """adjoint_step == the VJP of (flow_step's half_sqnorm weighted by `weight`, x_next by adj_next)."""
    xp, x, f, s, w, an, ad, dtp, dt, g = step_cases.make_args("adjoint_step", (3, 5), torch.float64, seed=9)
    noise = torch.randn_like(x)
    leaves = [t.clone().requires_grad_(True) for t in (xp, x, f, s)]
    xn, hs = ops.flow_step(*leaves, noise, dtp, dt, g, backend="cpu")
    gxp, gx, gf, gs = torch.autograd.grad((xn * an).sum() + (w * hs).sum(), leaves)
    apd, cx, cf, cs = ops.adjoint_step(xp, x, f, s, w, an, ad, dtp, dt, g, backend="cpu")
    torch.testing.assert_close(apd, gxp)
    torch.testing.assert_close(cx, gx + ad)
    torch.testing.assert_close(cf, gf)
    torch.testing.assert_close(cs, gs)


# ----------------------------------------------------------------------------------------------
# torch.library registrations


def _opcheck_cases(step_cases):
    B, D = 3, 4
    f64 = torch.float64
    xs = [torch.randn(B, D, dtype=f64) for _ in range(6)]
    dt, g, dtp, w = (torch.rand(B, dtype=f64) + 0.2 for _ in range(4))
    dt_exp = torch.tensor(0.3, dtype=f64).expand(B)
    return {
        "em_step": [(*xs[:3], dt, g), (*xs[:3], dt_exp, g)],
        "backward_noise": [(*xs[:4], dt, g)],
        "flow_step": [(*xs[:5], dtp, dt, g), (*xs[:5], dt_exp, dt, dt_exp)],
        "adjoint_step": [(*xs[:4], w, xs[4], xs[5], dtp, dt, g)],
        "em_step_backward": [
            (xs[0], xs[1], xs[2], dt, g, True, [True, True]),
            (xs[0], None, None, dt, g, False, [True, False]),
        ],
        "backward_noise_backward": [
            (xs[0], w, xs[1], xs[2], xs[3], dt, g, True, [True] * 4),
            (None, w, xs[1], None, None, dt, g, False, [True, False, True, False]),
            (xs[0], None, xs[1], xs[2], xs[3], dt_exp, g, True, [False] * 4),
        ],
        "flow_step_backward": [
            (xs[0], w, *xs[1:5], xs[5], dtp, dt, g, True, [True] * 5),
            (None, w, *xs[1:5], None, dtp, dt, g, False, [True, True, True, True, False]),
            (xs[0], None, *xs[1:5], xs[5], dtp, dt, g, True, [False, True, False, True, True]),
            (xs[0], None, *xs[1:5], None, dtp, dt, g, False, [True] * 5),
        ],
    }


@needs_cpu_ext
@pytest.mark.parametrize("name", list(_library.SCHEMAS))
def test_opcheck(step_cases, name):
    op = getattr(torch.ops.diffflow_ext, name)
    for args in _opcheck_cases(step_cases)[name]:
        torch.library.opcheck(op, args)
        if name in DIFF_OPS:  # with autograd on
            rg = tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
            torch.library.opcheck(op, rg)


def test_schemas_defined_without_extension():
    """The schemas and fake kernels exist whatever was compiled (meta tensors run the fake kernels)."""
    for ns in (_library.NAMESPACE, _library.TRITON_NAMESPACE):
        for name in _library.SCHEMAS:
            assert hasattr(getattr(torch.ops, ns), name)
    x = torch.empty(3, 4, device="meta", dtype=torch.float16)
    dt = torch.empty(3, device="meta")
    xn, hs = torch.ops.diffflow_ext.flow_step(x, x, x, x, x, dt, dt, dt)
    assert xn.shape == (3, 4) and xn.dtype == torch.float16 and hs.shape == (3,) and hs.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument, from every backend


def _error_backends():
    out = ["torch", pytest.param("cpu", marks=needs_cpu_ext)]
    if backends._status("triton")[0] and "cpu" in backends.TRITON.devices:
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", _error_backends())
@pytest.mark.parametrize("op", OPS)
def test_bad_input_names_argument(step_cases, op, backend):
    names = [n for n, _ in step_cases.SPECS[op]]
    kinds = dict(step_cases.SPECS[op])
    good = step_cases.make_args(op, (3, 4), torch.float32)
    state_names = [n for n in names if kinds[n] == "s"]
    scalar_names = [n for n in names if kinds[n] != "s"]
    second = state_names[-1]  # not the state the others are checked against
    i2 = names.index(second)

    def run(i, v):
        args = list(good)
        args[i] = v
        return getattr(ops, op)(*args, backend=backend)

    with pytest.raises(ValueError, match=rf"^{second}: expected shape"):
        run(i2, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=rf"^{second}: expected dtype"):
        run(i2, torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"^{second}: expected device"):
        run(i2, torch.zeros(3, 4, device="meta"))
    with pytest.raises(TypeError, match=rf"^{second}: expected a torch.Tensor"):
        run(i2, [[0.0] * 4] * 3)
    with pytest.raises(ValueError, match=rf"^{names[0]}: expected|^x: expected"):
        run(names.index("x") if "x" in names else 0, torch.zeros(0, 4))
    for sname in scalar_names:
        j = names.index(sname)
        with pytest.raises(ValueError, match=rf"^{sname}: expected .*shape \(3,\)"):
            run(j, torch.ones(4))
        with pytest.raises(ValueError, match=rf"^{sname}: expected device"):
            run(j, torch.ones(3, device="meta"))
        with pytest.raises(ValueError, match=rf"^{sname}: expected a floating tensor"):
            run(j, torch.ones(3, dtype=torch.int64))
        if kinds[sname] == "p":
            with pytest.raises(ValueError, match=rf"^{sname}: expected (a positive number|a number >= 0)"):
                run(j, -0.1)
        for bad in (float("inf"), float("-inf"), float("nan")):
            with pytest.raises(ValueError, match=rf"^{sname}: expected a finite number"):
                run(j, bad)
    with pytest.raises(ValueError, match="^backend: expected one of"):
        getattr(ops, op)(*good, backend="fastest")


def test_unavailable_or_wrong_device_backend():
    x = torch.zeros(2, 3)
    if not backends._status("cuda")[0]:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            ops.em_step(x, x, x, 0.1, 1.0, backend="cuda")
    if CPU_OK:
        m = torch.zeros(2, 3, device="meta")
        with pytest.raises(ValueError, match="backend 'cpu' runs on cpu tensors"):
            ops.em_step(m, m, m, 0.1, 1.0, backend="cpu")


@needs_cpu_ext
def test_direct_op_calls_check_arguments():
    """The compiled ops check their own arguments too (they can be called without the wrappers)."""
    O = torch.ops.diffflow_ext
    x = torch.zeros(3, 4)
    dt = torch.ones(3)
    with pytest.raises(RuntimeError, match="noise: expected shape"):
        O.em_step(x, x, torch.zeros(3, 5), dt, dt)
    with pytest.raises(RuntimeError, match="dt: expected a per-sample tensor of shape \\(3,\\)"):
        O.em_step(x, x, x, torch.ones(4), dt)
    with pytest.raises(RuntimeError, match="g: expected dtype Float"):
        O.em_step(x, x, x, dt, torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="score_next: expected dtype"):
        O.backward_noise(x, x, x, x.double(), dt, dt)
    with pytest.raises(RuntimeError, match="x: expected a floating dtype"):
        O.flow_step(x.int(), x.int(), x.int(), x.int(), x.int(), dt, dt, dt)
    with pytest.raises(RuntimeError, match="weight: expected a per-sample tensor"):
        O.adjoint_step(x, x, x, x, x, x, x, dt, dt, dt)
    with pytest.raises(RuntimeError, match="noise is required when dt_g_grad"):
        O.flow_step_backward(x, None, x, x, x, x, None, dt, dt, dt, True, [True] * 5)


@needs_cpu_ext
@needs_cpu_ext
def test_large_outputs_are_ordinary_tensors(tmp_path):
    """Outputs of >= 4 MiB come from the CPU kernels' huge-page allocator (with a reuse cache): they must
    be correct, independent of each other across calls, and behave like any CPU tensor (opcheck,
    autograd, save/load, resize_, in-place ops)."""
    B, D = 2, 1 << 19  # 4 MiB per float32 state
    xs = [torch.randn(B, D) for _ in range(4)]
    dt, g = torch.full((B,), 1e-3), torch.full((B,), 0.2)
    want = ops.reference.backward_noise_ref(*xs, dt, g)
    d1, h1 = ops.backward_noise(*xs, dt, g, backend="cpu")
    torch.testing.assert_close(d1, want[0])
    torch.testing.assert_close(h1, want[1], rtol=1e-5, atol=0)  # float32 sums of 2**19 terms
    keep = d1.clone()
    del d1, h1  # its mapping goes to the reuse cache
    d2, _ = ops.backward_noise(*xs, 2 * dt, g, backend="cpu")  # likely the same mapping again
    torch.testing.assert_close(d2, ops.reference.backward_noise_ref(*xs, 2 * dt, g)[0])
    d3, _ = ops.backward_noise(*xs, dt, g, backend="cpu")
    assert d3.data_ptr() != d2.data_ptr()
    torch.testing.assert_close(d3, keep)
    torch.save(d3, tmp_path / "d.pt")
    torch.testing.assert_close(torch.load(tmp_path / "d.pt"), keep)
    d3.mul_(2).resize_(B, 2 * D)
    torch.testing.assert_close(d3.view(-1)[: B * D], 2 * keep.view(-1))  # resize_ keeps the flat prefix
    leaves = [x.clone().requires_grad_(True) for x in xs]
    _, h = ops.backward_noise(*leaves, dt, g, backend="cpu")
    grads = torch.autograd.grad(h.sum(), leaves)
    ref_grads = torch.autograd.grad(ops.reference.backward_noise_ref(*leaves, dt, g)[1].sum(), leaves)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.diffflow_ext.em_step, (*xs[:3], dt, g))


def test_python_float_scalars_are_shared_and_read_only_views():
    """A Python-number dt/g becomes an expanded view of a cached 0-d tensor (no per-call allocation)."""
    x = torch.randn(5, 3)
    a = ops._checks.per_sample_scalar("dt", 0.25, x)
    b = ops._checks.per_sample_scalar("dt", 0.25, x)
    assert a.shape == (5,) and a.stride() == (0,) and a.dtype == torch.float32 and a is b
    assert ops._checks.per_sample_scalar("dt", 0.25, x.double()).dtype == torch.float64
    assert torch.signbit(ops._checks.per_sample_scalar("g", -0.0, x, allow_zero=True)).all()
    torch.testing.assert_close(ops.em_step(x, x, x, 0.25, 0.5, backend="torch"),
                               ops.em_step(x, x, x, torch.full((5,), 0.25), torch.full((5,), 0.5), backend="torch"))


def test_backward_output_mask():
    """Masked-out elementwise gradients are returned empty and the others are unchanged."""
    O = torch.ops.diffflow_ext
    xs = [torch.randn(3, 4, dtype=torch.float64) for _ in range(6)]
    dt, g, w = (torch.rand(3, dtype=torch.float64) + 0.2 for _ in range(3))
    full = O.flow_step_backward(xs[0], w, *xs[1:5], xs[5], dt, dt, g, True, [True] * 5)
    mask = [True, False, True, False, False]
    part = O.flow_step_backward(xs[0], w, *xs[1:5], xs[5], dt, dt, g, True, mask)
    for m, a, b in zip(mask + [True] * 3, full, part):
        if m:
            torch.testing.assert_close(a, b)
        else:
            assert b.shape == (0,)


@needs_cpu_ext
@pytest.mark.parametrize("isa", ["default", "auto"])
def test_cpu_isa_modules(isa):
    """Both CPU kernel builds (portable baseline ``_C``, and ``_C_avx2`` where the CPU has AVX2)
    match the reference; DIFFFLOW_CPU_ISA=default forces the baseline. Runs in a subprocess, since
    a process loads one of them."""
    import os
    import subprocess
    import sys

    code = r"""
import torch, diffflow_ext
from diffflow_ext.ops import _library, reference as R
from diffflow_ext import ops
src = _library._SOURCES["cpu"]
print(src)
torch.manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    for shape in [(3, 7), (2, 70000), (5, 2, 3)]:
        xs = [torch.randn(shape).to(dtype) for _ in range(6)]
        acc = R.acc_dtype(dtype)
        dt, g, w = (torch.rand(shape[0], dtype=acc) + 0.2 for _ in range(3))
        tol = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
        for a, b in zip(ops.flow_step(*xs[:5], dt, dt, g, backend="cpu"), R.flow_step_ref(*xs[:5], dt, dt, g)):
            torch.testing.assert_close(a, b, **tol)
        for a, b in zip(ops.adjoint_step(*xs[:4], w, xs[4], xs[5], dt, dt, g, backend="cpu"),
                        R.adjoint_step_ref(*xs[:4], w, xs[4], xs[5], dt, dt, g)):
            torch.testing.assert_close(a, b, **tol)
x = [torch.randn(3, 9, dtype=torch.float64, requires_grad=True) for _ in range(5)]
d = (torch.rand(3, dtype=torch.float64) + 0.2).requires_grad_()
assert torch.autograd.gradcheck(lambda *a: ops.flow_step(*a, backend="cpu"), (*x, d, d, d))
print("OK")
"""
    import tempfile
    from pathlib import Path

    # the same diffflow_ext as this process (installed or checkout), whatever the working directory
    pkg_parent = str(Path(diffflow_ext.__file__).resolve().parents[1])
    env = dict(os.environ, DIFFFLOW_CPU_ISA=isa)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tempfile.gettempdir())
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
    src = r.stdout.split()[0]
    if isa == "default":
        assert src == "diffflow_ext._C"
    elif torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and src != "diffflow_ext._C_avx2":
        pytest.fail(f"AVX2-capable CPU but {src} was loaded (is diffflow_ext._C_avx2 built?)")


# ----------------------------------------------------------------------------------------------
# C++ autograd, long-row accuracy, the open backend registry


@needs_cpu_ext
@pytest.mark.parametrize("op", DIFF_OPS + ("adjoint_step",))
def test_compiled_ops_have_cpp_autograd(step_cases, op):
    """The compiled CPU ops carry their autograd in C++ (AutogradCPU kernel, a C++ autograd node), not the
    Python register_autograd formula; without grad they return plain tensors."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"diffflow_ext::{op}", "AutogradCPU")
    args = step_cases.make_args(op, (3, 5), torch.float64, requires_grad=True)
    out = step_cases.as_tuple(step_cases.call(op, args, "cpu"))
    assert out[0].grad_fn is not None and f"{_camel(op)}Fn" in out[0].grad_fn.name(), out[0].grad_fn.name()
    with torch.no_grad():
        plain = step_cases.as_tuple(step_cases.call(op, args, "cpu"))
    assert all(t.grad_fn is None and not t.requires_grad for t in plain)


def _camel(op: str) -> str:
    return "".join(p.capitalize() for p in op.split("_"))


@needs_cpu_ext
@pytest.mark.parametrize("wrt", [(2, 6), (0, 3), (1, 5, 7), (4,)])
def test_cpp_autograd_partial_grads_match_reference(wrt):
    """autograd.grad w.r.t. a subset of flow_step's inputs (the C++ node computes only those, incl. the
    per-sample dt/g sums only when asked) gives the reference's gradients."""
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(5)]
    dt_prev, dt = ((torch.rand(4, generator=gen, dtype=torch.float64) + 0.1).requires_grad_() for _ in range(2))
    g = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    args = [*xs, dt_prev, dt, g]
    grads = {}
    for backend in ("cpu", "torch"):
        x_next, hs = ops.flow_step(*args, backend=backend)
        loss = x_next.square().sum() + (hs * torch.arange(1.0, 5.0, dtype=torch.float64)).sum()
        grads[backend] = torch.autograd.grad(loss, [args[i] for i in wrt])
    torch.testing.assert_close(grads["cpu"], grads["torch"], rtol=1e-10, atol=1e-10)


@needs_cpu_ext
@pytest.mark.parametrize("op", ["backward_noise", "flow_step"])
def test_long_row_sums_are_accurate(op):
    """Per-sample half squared norms of long float32 rows are summed pairwise: within 1e-6 relative of a
    float64 reference at D = 2^21 (a lane-sequential sum is 2.7e-5 off there, 2e-4 at D = 8.4M; torch's
    sum 5e-8)."""
    D = 1 << 21
    gen = torch.Generator().manual_seed(11)
    xs = [torch.randn(2, D, generator=gen) for _ in range(5)]
    dt = torch.tensor([0.01, 0.003])
    g = torch.tensor([0.7, 1.3])
    x64 = [t.double() for t in xs]
    dt64, g64 = dt.double(), g.double()
    if op == "backward_noise":
        hs = ops.backward_noise(*xs[:4], dt, g, backend="cpu")[1]
        ref = ops.reference.backward_noise_ref(*x64[:4], dt64, g64)[1]
    else:
        hs = ops.flow_step(*xs, dt, dt, g, backend="cpu")[1]
        ref = ops.reference.flow_step_ref(*x64, dt64, dt64, g64)[1]
    rel = ((hs.double() - ref).abs() / ref).max().item()
    assert rel < 1e-6, rel


def _counting_backend(name, calls, devices=("cpu",)):
    def wrap(op):
        ref = getattr(ops.reference, f"{op}_ref")

        def fn(*args):
            calls.append(op)
            return ref(*args)

        return fn

    return backends.Backend(name=name, devices=devices, available=lambda: (True, "test backend"),
                            **{op: wrap(op) for op in _library.FORWARD_OPS})


def test_registered_backend_is_selectable_everywhere(monkeypatch):
    """backends.register() makes a backend selectable by every op, by DiffFlow(backend=...), by
    DIFFFLOW_BACKEND and (preferred=True) by "auto"; available_backends() reports it; unregister() removes it."""
    calls: list[str] = []
    backends.register(_counting_backend("mine", calls))
    try:
        assert diffflow_ext.available_backends()["mine"] == {"available": True, "devices": ["cpu"],
                                                             "reason": "test backend"}
        x = torch.randn(3, 4)
        w = torch.ones(3)
        torch.testing.assert_close(ops.em_step(x, x, x, 0.1, 0.5, backend="mine"),
                                   ops.em_step(x, x, x, 0.1, 0.5, backend="torch"))
        ops.backward_noise(x, x, x, x, 0.1, 0.5, backend="mine")
        ops.flow_step(x, x, x, x, x, 0.1, 0.1, 0.5, backend="mine")
        ops.adjoint_step(x, x, x, x, w, x, x, 0.1, 0.1, 0.5, backend="mine")
        assert calls == ["em_step", "backward_noise", "flow_step", "adjoint_step"]

        calls.clear()
        monkeypatch.setenv(backends.ENV_VAR, "mine")
        ops.em_step(x, x, x, 0.1, 0.5)
        assert calls == ["em_step"]
        monkeypatch.delenv(backends.ENV_VAR)

        net = torch.nn.Linear(2, 2)

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = net

            def forward(self, x, t):
                return self.lin(x)

        calls.clear()
        model = diffflow_ext.DiffFlow(Net(), Net(), data_shape=(2,), num_steps=3, backend="mine")
        model.loss(torch.randn(8, 2)).backward()
        assert calls and set(calls) <= set(_library.FORWARD_OPS)

        # preferred: first for "auto" on its devices
        calls.clear()
        backends.register(_counting_backend("mine", calls), preferred=True)
        assert backends.resolve("auto", torch.device("cpu")).name == "mine"
    finally:
        backends.unregister("mine")
    assert "mine" not in diffflow_ext.available_backends()
    assert backends.resolve("auto", torch.device("cpu")).name in ("cpu", "torch")
    with pytest.raises(ValueError, match="^backend: expected one of 'auto', .*got 'mine'"):
        ops.em_step(x, x, x, 0.1, 0.5, backend="mine")
    with pytest.raises(ValueError, match="built-in"):
        backends.register(_counting_backend("cpu", calls))
    with pytest.raises(TypeError, match="expected a diffflow_ext.ops.backends.Backend"):
        backends.register("mine")
