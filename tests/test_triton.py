"""Triton kernels in the Triton interpreter on CPU tensors: values and gradients vs the reference.

Run separately, with the variable set before Python starts (triton reads it at import):

    TRITON_INTERPRET=1 pytest tests/test_triton.py

Skipped otherwise. The interpreter has no bfloat16; tolerances as in tests/test_ops.py.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "") in ("", "0"):
    pytest.skip("needs TRITON_INTERPRET=1 set before Python starts", allow_module_level=True)
pytest.importorskip("triton")

from diffflow_ext.ops import _library, backends  # noqa: E402

OK, WHY = backends._status("triton")
if not OK:
    pytest.skip(f"triton backend unavailable: {WHY}", allow_module_level=True)

OPS = ("em_step", "backward_noise", "flow_step", "adjoint_step")
DIFF_OPS = ("em_step", "backward_noise", "flow_step")
SUMS = {"em_step": (), "backward_noise": (1,), "flow_step": (1,), "adjoint_step": ()}


def test_registered_for_cpu_in_interpreter():
    assert "cpu" in backends.TRITON.devices
    assert _library.has_kernel(_library.TRITON_NAMESPACE, "CPU")
    assert _library.has_kernel(_library.TRITON_NAMESPACE, "CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 97), (300, 2), (4, 3, 5), (2, 0)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_values_match_reference(step_cases, op, shape, dtype):
    args = step_cases.make_args(op, shape, dtype)
    step_cases.assert_matches(step_cases.call(op, args, "triton"), step_cases.reference(op, args), dtype,
                              sums=SUMS[op], msg=f"{op}{shape}")


@pytest.mark.parametrize("op", OPS)
def test_long_rows_column_chunks(step_cases, op):
    """D larger than one block, split into column chunks with a partial-sum pass."""
    args = step_cases.make_args(op, (2, 70000), torch.float32, seed=1)
    step_cases.assert_matches(step_cases.call(op, args, "triton"), step_cases.reference(op, args), torch.float32,
                              sums=SUMS[op])


@pytest.mark.parametrize("layout", ["mixed", "offset"])
@pytest.mark.parametrize("scalars", ["mixed", "float"])
@pytest.mark.parametrize("op", OPS)
def test_layouts_and_scalars(step_cases, op, layout, scalars):
    args = step_cases.make_args(op, (3, 2, 5), torch.float32, layout=layout, scalars=scalars, seed=2)
    step_cases.assert_matches(step_cases.call(op, args, "triton"), step_cases.reference(op, args), torch.float32,
                              sums=SUMS[op])


@pytest.mark.parametrize("outputs", ["all", "first", "second"])
@pytest.mark.parametrize("op", DIFF_OPS)
def test_gradcheck(step_cases, op, outputs):
    if op == "em_step" and outputs != "all":
        pytest.skip("em_step has one output")
    args = step_cases.make_args(op, (3, 4), torch.float64, seed=3, requires_grad=True)

    def f(*a):
        out = step_cases.call(op, a, "triton")
        return out if outputs == "all" else out[0 if outputs == "first" else 1]

    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("shape", [(3, 7), (2, 20000)], ids=str)
@pytest.mark.parametrize("op", DIFF_OPS)
def test_grads_match_reference_float32(step_cases, op, shape):
    args = step_cases.make_args(op, shape, torch.float32, scalars="mixed", seed=4, requires_grad=True)
    got = step_cases.grads(op, args, backend="triton")
    want = step_cases.grads(op, args, backend="torch")
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()), msg=f"grad {i}")


@pytest.mark.parametrize("op", OPS)
def test_opcheck(step_cases, op):
    args = step_cases.make_args(op, (3, 4), torch.float64, seed=5)
    kinds = dict(step_cases.SPECS[op])
    names = [n for n, _ in step_cases.SPECS[op]]
    x = args[names.index("x")] if "x" in names else args[0]
    from diffflow_ext.ops._checks import per_sample_scalar

    norm = [a if kinds[n] == "s" else per_sample_scalar(n, a, x) for n, a in zip(names, args)]
    opfn = getattr(torch.ops.diffflow_ext_triton, op)
    torch.library.opcheck(opfn, norm)
    if op in DIFF_OPS:
        torch.library.opcheck(opfn, [a.clone().requires_grad_(True) for a in norm])


def test_direct_call_errors_name_argument():
    O = torch.ops.diffflow_ext_triton
    x = torch.zeros(3, 4)
    dt = torch.ones(3)
    with pytest.raises(ValueError, match="^noise: expected shape"):
        O.em_step(x, x, torch.zeros(3, 5), dt, dt)
    with pytest.raises(ValueError, match=r"^dt: expected a per-sample tensor of shape \(3,\)"):
        O.flow_step(x, x, x, x, x, dt, torch.ones(4), dt)
    with pytest.raises(ValueError, match="^g: expected dtype torch.float32"):
        O.backward_noise(x, x, x, x, dt, dt.double())


@pytest.mark.parametrize("op", DIFF_OPS)
def test_partial_requires_grad(step_cases, op):
    """Only some inputs require grad: masked-out gradients are skipped, the others match."""
    args = step_cases.make_args(op, (3, 5), torch.float64, seed=6)
    for i in (0, 2):  # a state and the drift; dt / g constants
        args[i] = args[i].clone().requires_grad_(True)
    got = step_cases.grads(op, args, backend="triton")
    want = step_cases.grads(op, args, backend="torch")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
