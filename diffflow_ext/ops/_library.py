"""The torch.library operators of the fused step kernels: schemas, fake kernels, autograd.

The schemas are declared here, once, for two namespaces:

* ``diffflow_ext``: compiled C++ (CPU, ``diffflow_ext._C``) and CUDA (``diffflow_ext._C_cuda``)
  kernels register their impls with ``TORCH_LIBRARY_IMPL(diffflow_ext, CPU/CUDA, m)``;
* ``diffflow_ext_triton``: the Triton kernels of :mod:`.triton_kernels` (CUDA, and CPU under
  ``TRITON_INTERPRET=1``).

so ``import diffflow_ext`` works whether or not anything was compiled. Each forward op has a
``*_backward`` op (one fused elementwise pass that also yields the per-sample ``dt``/``g``
gradient sums when ``dt_g_grad`` is true; ``output_mask`` says which elementwise gradients to
write, from ``ctx.needs_input_grad``), a fake (meta) kernel for ``torch.compile`` /
``torch.export``, and an autograd formula (first order). ``adjoint_step`` is itself a backward
pass and is not differentiable (backpropagating through it raises).

Autograd: the formulas below are registered from Python (``register_autograd``, the ``Autograd`` alias key)
for both namespaces; they serve the Triton kernels. The compiled libraries register the same formulas
in C++ (``csrc/include/diffflow_ext/autograd.h``) for ``AutogradCPU`` / ``AutogradCUDA``, which take
precedence over the alias key, so the compiled ops pay no Python autograd cost.

Argument conventions (the public wrappers in :mod:`diffflow_ext.ops` guarantee them): every state
tensor has the shape, dtype and device of ``x``; ``dt``, ``g``, ``dt_prev``, ``weight`` and
``grad_half_sqnorm`` are ``(B,)`` tensors (any stride, e.g. an expanded scalar) in the
accumulation dtype (float64 for float64 states, float32 otherwise). Outputs are contiguous;
per-sample sums are in the accumulation dtype. Gradients that were not asked for (``dt``/``g``
without ``dt_g_grad``, elementwise ones masked out by ``output_mask``) are returned as empty
``(0,)`` tensors by the ``*_backward`` ops, and never written.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor

from .reference import acc_dtype

NAMESPACE = "diffflow_ext"
TRITON_NAMESPACE = "diffflow_ext_triton"
LIBRARY_ENV_VAR = "DIFFFLOW_EXT_LIBRARY"  # extra shared libraries to load (e.g. a CMake build), os.pathsep-separated

SCHEMAS: dict[str, str] = {
    "em_step": "(Tensor x, Tensor drift, Tensor noise, Tensor dt, Tensor g) -> Tensor",
    "em_step_backward": (
        "(Tensor grad_out, Tensor? drift, Tensor? noise, Tensor dt, Tensor g, bool dt_g_grad, bool[2] output_mask)"
        " -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "backward_noise": (
        "(Tensor x_prev, Tensor x_next, Tensor drift_next, Tensor score_next, Tensor dt, Tensor g)"
        " -> (Tensor, Tensor)"
    ),
    "backward_noise_backward": (
        "(Tensor? grad_delta, Tensor? grad_half_sqnorm, Tensor delta, Tensor? drift_next, Tensor? score_next,"
        " Tensor dt, Tensor g, bool dt_g_grad, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "flow_step": (
        "(Tensor x_prev, Tensor x, Tensor drift, Tensor score, Tensor noise, Tensor dt_prev, Tensor dt, Tensor g)"
        " -> (Tensor, Tensor)"
    ),
    "flow_step_backward": (
        "(Tensor? grad_x_next, Tensor? grad_half_sqnorm, Tensor x_prev, Tensor x, Tensor drift, Tensor score,"
        " Tensor? noise, Tensor dt_prev, Tensor dt, Tensor g, bool dt_g_grad, bool[5] output_mask)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "adjoint_step": (
        "(Tensor x_prev, Tensor x, Tensor drift, Tensor score, Tensor weight, Tensor adj_next, Tensor adj_direct,"
        " Tensor dt_prev, Tensor dt, Tensor g) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
}
# The public ops (each with a ``*_backward`` op, except adjoint_step) and which is which, from SCHEMAS.
FORWARD_OPS = tuple(name for name in SCHEMAS if not name.endswith("_backward"))
BACKWARD_OPS = {name: f"{name}_backward" for name in FORWARD_OPS if f"{name}_backward" in SCHEMAS}

_LIBS: dict[str, torch.library.Library] = {}


def library(namespace: str) -> torch.library.Library:
    """The ``Library`` object that defined ``namespace`` (use it to register impls)."""
    return _LIBS[namespace]


def op_namespace(namespace: str):
    """``torch.ops.<namespace>``."""
    return getattr(torch.ops, namespace)


# ----------------------------------------------------------------------------------------------
# fake kernels (shapes only; outputs are contiguous like the real kernels')


def _like(t: Tensor) -> Tensor:
    return t.new_empty(t.shape)


def _rows(t: Tensor, wanted: bool = True) -> Tensor:
    return t.new_empty((t.shape[0] if wanted else 0,), dtype=acc_dtype(t.dtype))


def _fake_em_step(x, drift, noise, dt, g):
    return _like(x)


def _masked(t: Tensor, wanted: bool) -> Tensor:
    return t.new_empty(t.shape if wanted else (0,))


def _fake_em_step_backward(grad_out, drift, noise, dt, g, dt_g_grad, output_mask):
    return (*(_masked(grad_out, m) for m in output_mask), _rows(grad_out, dt_g_grad), _rows(grad_out, dt_g_grad))


def _fake_backward_noise(x_prev, x_next, drift_next, score_next, dt, g):
    return _like(x_prev), _rows(x_prev)


def _fake_backward_noise_backward(grad_delta, grad_half_sqnorm, delta, drift_next, score_next, dt, g, dt_g_grad,
                                  output_mask):
    return (*(_masked(delta, m) for m in output_mask), _rows(delta, dt_g_grad), _rows(delta, dt_g_grad))


def _fake_flow_step(x_prev, x, drift, score, noise, dt_prev, dt, g):
    return _like(x), _rows(x)


def _fake_flow_step_backward(grad_x_next, grad_half_sqnorm, x_prev, x, drift, score, noise, dt_prev, dt, g, dt_g_grad,
                             output_mask):
    return (*(_masked(x, m) for m in output_mask), *(_rows(x, dt_g_grad) for _ in range(3)))


def _fake_adjoint_step(x_prev, x, drift, score, weight, adj_next, adj_direct, dt_prev, dt, g):
    return _like(x), _like(x), _like(x), _like(x)


_FAKES = {name: globals()[f"_fake_{name}"] for name in SCHEMAS}  # one _fake_<op> per schema


# ----------------------------------------------------------------------------------------------
# autograd (first order; the *_backward ops are not differentiable themselves)


def _needs(ctx, *idx: int) -> bool:
    return any(ctx.needs_input_grad[i] for i in idx)


def _if_needed(wanted: bool, t: Tensor):
    return t if wanted else None


def _make_autograd(namespace: str) -> dict:
    bwd_ops: dict = {}

    def bwd_op(name):  # looked up on first use (the namespace is defined after this runs), then cached
        op = bwd_ops.get(name)
        if op is None:
            op = bwd_ops[name] = getattr(op_namespace(namespace), name).default
        return op

    # em_step(x, drift, noise, dt, g) -> out
    def em_setup(ctx, inputs, output):
        x, drift, noise, dt, g = inputs
        ctx.set_materialize_grads(False)
        ctx.dt_g_grad = _needs(ctx, 3, 4)
        ctx.save_for_backward(drift if ctx.dt_g_grad else None, noise if ctx.dt_g_grad else None, dt, g)

    def em_backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None, None
        drift, noise, dt, g = ctx.saved_tensors
        n = ctx.needs_input_grad
        g_drift, g_noise, g_dt, g_g = bwd_op("em_step_backward")(
            grad_out, drift, noise, dt, g, ctx.dt_g_grad, [n[1], n[2]]
        )
        return tuple(_if_needed(n[i], t) for i, t in enumerate((grad_out, g_drift, g_noise, g_dt, g_g)))

    # backward_noise(x_prev, x_next, drift_next, score_next, dt, g) -> (delta, half_sqnorm)
    def bn_setup(ctx, inputs, output):
        x_prev, x_next, drift, score, dt, g = inputs
        delta, _ = output
        ctx.set_materialize_grads(False)
        ctx.dt_g_grad = _needs(ctx, 4, 5)
        ctx.save_for_backward(delta, drift if ctx.dt_g_grad else None, score if ctx.dt_g_grad else None, dt, g)

    def bn_backward(ctx, grad_delta, grad_hs):
        if grad_delta is None and grad_hs is None:
            return (None,) * 6
        delta, drift, score, dt, g = ctx.saved_tensors
        n = ctx.needs_input_grad
        outs = bwd_op("backward_noise_backward")(
            grad_delta, grad_hs, delta, drift, score, dt, g, ctx.dt_g_grad, list(n[:4])
        )
        return tuple(_if_needed(n[i], outs[i]) for i in range(6))

    # flow_step(x_prev, x, drift, score, noise, dt_prev, dt, g) -> (x_next, half_sqnorm_prev)
    def fs_setup(ctx, inputs, output):
        x_prev, x, drift, score, noise, dt_prev, dt, g = inputs
        ctx.set_materialize_grads(False)
        ctx.dt_g_grad = _needs(ctx, 5, 6, 7)
        ctx.save_for_backward(x_prev, x, drift, score, noise if ctx.dt_g_grad else None, dt_prev, dt, g)

    def fs_backward(ctx, grad_x_next, grad_hs):
        if grad_x_next is None and grad_hs is None:
            return (None,) * 8
        x_prev, x, drift, score, noise, dt_prev, dt, g = ctx.saved_tensors
        n = ctx.needs_input_grad
        outs = bwd_op("flow_step_backward")(
            grad_x_next, grad_hs, x_prev, x, drift, score, noise, dt_prev, dt, g, ctx.dt_g_grad, list(n[:5])
        )
        return tuple(_if_needed(n[i], outs[i]) for i in range(8))

    def adj_setup(ctx, inputs, output):
        pass

    def adj_backward(ctx, *grads):
        raise RuntimeError(
            f"{namespace}::adjoint_step is not differentiable: it is itself the backward pass (the VJP of "
            "flow_step) of the stochastic adjoint. Differentiate through flow_step / backward_noise instead."
        )

    return {
        "em_step": (em_backward, em_setup),
        "backward_noise": (bn_backward, bn_setup),
        "flow_step": (fs_backward, fs_setup),
        "adjoint_step": (adj_backward, adj_setup),
    }


def _define(namespace: str) -> None:
    lib = torch.library.Library(namespace, "DEF")
    _LIBS[namespace] = lib
    for name, schema in SCHEMAS.items():
        lib.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}", fake, lib=lib)
    for name, (backward, setup) in _make_autograd(namespace).items():
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup, lib=lib)


for _ns in (NAMESPACE, TRITON_NAMESPACE):
    _define(_ns)


# ----------------------------------------------------------------------------------------------
# compiled kernels


def has_kernel(namespace: str, dispatch_key: str, name: str = "em_step") -> bool:
    """Whether ``namespace::name`` has an impl for ``dispatch_key`` ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{name}", dispatch_key)


_LOAD_ERRORS: dict[str, str] = {}
_SOURCES: dict[str, str] = {}  # device type -> what registered its kernels
_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


CPU_ISA_ENV_VAR = "DIFFFLOW_CPU_ISA"  # "default": skip the wider-ISA CPU module
# CPU kernel modules, preferred first, with the torch CPU capabilities that can run them (the
# variants of csrc/build_config.json "cpu_isa_variants"; the baseline module runs anywhere).
CPU_MODULES = (("diffflow_ext._C_avx2", ("AVX2", "AVX512")), ("diffflow_ext._C", None))


def _cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY
    except Exception:  # noqa: BLE001 - very old torch / exotic platform
        return "DEFAULT"


def _load_extensions() -> None:
    cap = _cpu_capability()
    skip_isa = os.environ.get(CPU_ISA_ENV_VAR, "").strip().lower() == "default"
    errors = []
    for module, caps in CPU_MODULES:
        if caps is not None and (skip_isa or cap not in caps):
            continue
        try:
            importlib.import_module(module)
            _SOURCES["cpu"] = module
            break
        except ImportError as e:  # not built, or built against another torch
            errors.append(f"{module}: {e}")
    if "cpu" not in _SOURCES:
        _LOAD_ERRORS["cpu"] = "; ".join(errors)
    try:
        importlib.import_module("diffflow_ext._C_cuda")
        _SOURCES["cuda"] = "diffflow_ext._C_cuda"
    except ImportError as e:  # not built, or no CUDA runtime / another torch
        _LOAD_ERRORS["cuda"] = f"diffflow_ext._C_cuda: {e}"
    # Libraries built with CMake (CMakeLists.txt); meant for when the package's extensions are not built.
    for path in filter(None, os.environ.get(LIBRARY_ENV_VAR, "").split(os.pathsep)):
        before = {dev: has_kernel(NAMESPACE, key) for dev, key in _KEYS.items()}
        try:
            torch.ops.load_library(path)
        except (OSError, RuntimeError) as e:
            for dev in _KEYS:
                _LOAD_ERRORS.setdefault(dev, f"{LIBRARY_ENV_VAR}={path}: {e}")
            continue
        for dev, key in _KEYS.items():
            if not before[dev] and has_kernel(NAMESPACE, key):
                _SOURCES[dev] = path


_load_extensions()


def compiled_status(device_type: str) -> tuple[bool, str]:
    """``(ok, reason)``: whether compiled kernels for ``device_type`` ("cpu" / "cuda") are registered."""
    key = _KEYS[device_type]
    if all(has_kernel(NAMESPACE, key, name) for name in SCHEMAS):
        return True, f"compiled {key} kernels ({_SOURCES.get(device_type, 'registered by another library')})"
    err = _LOAD_ERRORS.get(device_type, "the library loaded but registered no kernels for this device")
    return False, f"compiled extension not built: {err}"
