"""Hostile arguments to the public step ops (issue 10): property-based.

For every op, a valid call (random batch, feature shape, dtype, strides, scalar or per-sample dt/g) must equal
the reference op; a call with exactly one argument spoiled must raise ValueError/TypeError whose one-line
message names that argument -- never a kernel error, a crash or a silently wrong (NaN/inf) result.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffflow_ext import ops
from diffflow_ext.ops import reference as R

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# op name -> (public op, reference op, state-like tensor args, per-sample args (name, zero allowed), (B,) args)
OPS = {
    "em_step": (ops.em_step, R.em_step_ref, ("x", "drift", "noise"), (("dt", False), ("g", True)), ()),
    "backward_noise": (ops.backward_noise, R.backward_noise_ref, ("x_prev", "x_next", "drift_next", "score_next"),
                       (("dt", False), ("g_next", False)), ()),
    "flow_step": (ops.flow_step, R.flow_step_ref, ("x_prev", "x", "drift", "score", "noise"),
                  (("dt_prev", False), ("dt", False), ("g", False)), ()),
    "adjoint_step": (ops.adjoint_step, R.adjoint_step_ref, ("x_prev", "x", "drift", "score"),
                     (("dt_prev", False), ("dt", False), ("g", False)), ("weight",)),
}
_TENSORS_AFTER_WEIGHT = ("adj_next", "adj_direct")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _arg_names(name: str) -> list[str]:
    _, _, tens, scal, rows = OPS[name]
    names = list(tens)
    if rows:
        names += list(rows) + list(_TENSORS_AFTER_WEIGHT)
    return names + [s for s, _ in scal]


@st.composite
def calls(draw, name: str):
    """A valid call: kwargs in signature order (positional use) and the same values for the reference."""
    _, _, tens, scal, rows = OPS[name]
    B = draw(st.integers(1, 5))
    feat = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)

    def state():
        t = torch.randn((B, *feat), generator=gen, dtype=dtype)
        if draw(st.booleans()) and len(feat) >= 1:  # a non-contiguous view with the same values
            t = torch.randn((*feat[::-1], B), generator=gen, dtype=dtype).permute(
                len(feat), *range(len(feat) - 1, -1, -1))
        return t

    args = {n: state() for n in tens}
    for n in rows:
        args[n] = torch.rand(B, generator=gen, dtype=dtype)
        for m in _TENSORS_AFTER_WEIGHT:
            args[m] = state()
    for n, _ in scal:
        v = draw(st.floats(1e-3, 2.0))
        if draw(st.booleans()):
            args[n] = v
        else:
            args[n] = torch.rand(B, generator=gen, dtype=dtype) * 2 + 1e-3
    return args


def _ref_args(name, args):
    x = next(iter(args.values()))
    out = {}
    for k, v in args.items():
        if isinstance(v, float):
            out[k] = torch.full((x.shape[0],), v, dtype=R.acc_dtype(x.dtype))
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("name", list(OPS))
@SETTINGS
@given(data=st.data())
def test_valid_calls_match_the_reference(name, data):
    op, ref, *_ = OPS[name]
    args = data.draw(calls(name))
    got = op(*args.values())
    want = ref(*_ref_args(name, args).values())
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    x = next(iter(args.values()))
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a.to(b.dtype), b, **TOL[x.dtype])


def _spoil(data, name, args):
    """Spoil exactly one argument; returns (its name, the spoiled kwargs)."""
    _, _, tens, scal, rows = OPS[name]
    names = list(args)
    target = data.draw(st.sampled_from(names))
    v = args[target]
    x = next(iter(args.values()))
    B = x.shape[0]
    allow_zero = dict(scal).get(target, False)
    if target in dict(scal):
        choices = [-0.5, float("nan"), float("inf"), -float("inf"), "0.1", None, True, torch.ones(B + 1),
                   torch.ones(B, 2), torch.ones(B, dtype=torch.int64)]
        if not allow_zero:
            choices.append(0.0)
        bad = data.draw(st.sampled_from(choices))
    elif target in rows:
        bad = data.draw(st.sampled_from([torch.ones(B + 1, dtype=x.dtype), torch.ones(B, 2, dtype=x.dtype),
                                         [1.0] * B]))
    else:
        other = torch.float64 if x.dtype == torch.float32 else torch.float32
        bad = data.draw(st.sampled_from([
            torch.zeros((B + 1, *x.shape[1:]), dtype=x.dtype),
            torch.zeros((B, *x.shape[1:], 2), dtype=x.dtype),
            v.to(other),
            v.to(torch.int64),
            v.tolist(),
            None,
        ]))
    spoiled = dict(args)
    spoiled[target] = bad
    return target, spoiled


@pytest.mark.parametrize("name", list(OPS))
@SETTINGS
@given(data=st.data())
def test_one_bad_argument_is_named(name, data):
    op, *_ = OPS[name]
    args = data.draw(calls(name))
    target, spoiled = _spoil(data, name, args)
    first = next(iter(args))
    with pytest.raises((ValueError, TypeError)) as ei:
        op(*spoiled.values())
    msg = str(ei.value)
    assert "\n" not in msg
    # a mismatch between two tensors may be reported on either of them (e.g. x given as float64: "drift:
    # expected dtype float64 (the dtype of x)"), so the message must name the target or the reference state
    assert re.search(rf"\b({target}|{first})\b", msg), msg


@pytest.mark.parametrize("x, match", [
    (torch.tensor(1.0), "B >= 1|shape"),
    (torch.zeros(0, 3), "B >= 1"),
    (torch.zeros(4, 3, dtype=torch.int32), "floating"),
])
def test_degenerate_states(x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.em_step(x, x.clone(), x.clone(), 0.1, 0.2)


@pytest.mark.parametrize("backend", ["bogus", "", "CPU "])
def test_unknown_backend_lists_the_choices(backend):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="backend") as ei:
        ops.em_step(x, x, x, 0.1, 0.2, backend=backend)
    assert "cpu" in str(ei.value) and "torch" in str(ei.value)


def test_g_zero_is_an_ode_step_for_em_only():
    x = torch.randn(3, 2)
    n = torch.randn(3, 2)
    torch.testing.assert_close(ops.em_step(x, x, n, 0.25, 0.0), x + x * 0.25)
    with pytest.raises(ValueError, match="g_next"):
        ops.backward_noise(x, x, x, x, 0.1, 0.0)
    assert math.isfinite(ops.em_step(x, x, n, 1e-30, 1e-30).abs().max().item())
