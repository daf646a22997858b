"""CUDA kernels ("cuda": compiled extension, "triton": Triton kernels) vs the reference ops, on a GPU.

Marked ``cuda``; skipped cleanly without a CUDA device (and per backend when it is unavailable,
with the reason). Run: ``pytest -m cuda tests/test_cuda.py`` (scripts/gpu_check.sh does).
Tolerances as tests/test_ops.py (float16/bfloat16 compute in float32 and round the outputs).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from diffflow_ext import ops  # noqa: E402
from diffflow_ext.ops import backends  # noqa: E402

OPS = ("em_step", "backward_noise", "flow_step", "adjoint_step")
DIFF_OPS = ("em_step", "backward_noise", "flow_step")
SUMS = {"em_step": (), "backward_noise": (1,), "flow_step": (1,), "adjoint_step": ()}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _backend(name):
    ok, why = backends._status(name)
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"{name} backend unavailable: {why}"))


GPU_BACKENDS = [_backend("cuda"), _backend("triton")]


def _dev_args(step_cases, op, shape, dtype, **kw):
    return step_cases.make_args(op, shape, dtype, device="cuda", **kw)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 97), (5000, 2), (2, 1031), (2, 70000), (4, 3, 5), (3, 0)],
                         ids=str)
@pytest.mark.parametrize("op", OPS)
def test_values_match_reference(step_cases, op, shape, dtype, backend):
    args = _dev_args(step_cases, op, shape, dtype)
    out = step_cases.call(op, args, backend)
    step_cases.assert_matches(out, step_cases.reference(op, args), dtype, sums=SUMS[op], msg=f"{op}{shape}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_large_rows(step_cases, op, dtype, backend):
    """B=256, D=65536: the column-chunked grid (vectorised loads, partial sums)."""
    args = _dev_args(step_cases, op, (256, 65536), dtype)
    step_cases.assert_matches(step_cases.call(op, args, backend), step_cases.reference(op, args), dtype,
                              sums=SUMS[op])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded", "offset", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_layouts(step_cases, op, dtype, layout, backend):
    """Non-contiguous / expanded inputs and misaligned storage (scalar-load path)."""
    args = _dev_args(step_cases, op, (6, 1024), dtype, layout=layout, scalars="mixed", seed=1)
    step_cases.assert_matches(step_cases.call(op, args, backend), step_cases.reference(op, args), dtype,
                              sums=SUMS[op])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (5000, 2), (2, 70000)], ids=str)
@pytest.mark.parametrize("op", DIFF_OPS)
def test_grads_match_reference(step_cases, op, shape, dtype, backend):
    args = _dev_args(step_cases, op, shape, dtype, scalars="mixed", seed=2, requires_grad=True)
    got = step_cases.grads(op, args, backend=backend)
    want = step_cases.grads(op, args, backend="torch")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * scale, msg=f"grad {i}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op", DIFF_OPS)
def test_gradcheck_float64(step_cases, op, backend):
    args = _dev_args(step_cases, op, (3, 5), torch.float64, seed=3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: step_cases.call(op, a, backend), tuple(args), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_current_stream(step_cases, backend):
    """Kernels run on the current stream (results correct when issued on a side stream)."""
    args = _dev_args(step_cases, "flow_step", (64, 4096), torch.float32, seed=4)
    ref = step_cases.reference("flow_step", args)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = step_cases.call("flow_step", args, backend)
    torch.cuda.current_stream().wait_stream(s)
    step_cases.assert_matches(out, ref, torch.float32, sums=(1,))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_device_mismatch_names_argument(backend):
    x = torch.zeros(3, 4, device="cuda")
    with pytest.raises(ValueError, match="^noise: expected device"):
        ops.em_step(x, x, torch.zeros(3, 4), 0.1, 1.0, backend=backend)
    with pytest.raises(ValueError, match="^dt: expected device"):
        ops.em_step(x, x, x, torch.ones(3), 1.0, backend=backend)


def test_auto_prefers_compiled_cuda():
    want = next(n for n in ("cuda", "triton", "torch") if backends._status(n)[0])
    assert backends.resolve("auto", torch.device("cuda")).name == want
