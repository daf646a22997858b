"""Backend registry: which implementation of the step ops runs for a given device.

A backend is an object with the four normalised ops (``em_step``, ``backward_noise``,
``flow_step``, ``adjoint_step``), each taking ``dt`` / ``g`` already as ``(B,)`` tensors
(see :mod:`diffflow_ext.ops.reference` for the math every backend must match), plus
``devices`` (the device types it serves) and ``available()`` -> ``(ok, reason)``.

Selection: ``backend="auto"`` picks the first available backend for the tensors'
device from :data:`PREFERENCE`; the environment variable ``DIFFFLOW_BACKEND`` (one of
:data:`BACKENDS`) overrides ``"auto"``.

Backends:

* ``torch``  -- the pure-PyTorch reference ops (any device, always available);
* ``cpu``    -- compiled C++ kernels (``diffflow_ext._C``), ops ``torch.ops.diffflow_ext.*``;
* ``cuda``   -- compiled CUDA kernels (``diffflow_ext._C_cuda``), same ops, CUDA tensors;
* ``triton`` -- Triton kernels (:mod:`.triton_kernels`), ops ``torch.ops.diffflow_ext_triton.*``,
  CUDA tensors (and CPU tensors in the Triton interpreter, ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import _library, reference

ENV_VAR = "DIFFFLOW_BACKEND"
BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

# Fastest first, per device type.
PREFERENCE = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    em_step: Callable
    backward_noise: Callable
    flow_step: Callable
    adjoint_step: Callable
    available: Callable[[], tuple[bool, str]]


def _always() -> tuple[bool, str]:
    return True, "pure PyTorch reference ops"


TORCH = Backend(
    name="torch",
    devices=("cpu", "cuda", "mps", "xpu", "meta"),
    em_step=reference.em_step_ref,
    backward_noise=reference.backward_noise_ref,
    flow_step=reference.flow_step_ref,
    adjoint_step=reference.adjoint_step_ref,
    available=_always,
)


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0")


def _cuda_device() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    return True, ""


def _cpu_available() -> tuple[bool, str]:
    return _library.compiled_status("cpu")


def _cuda_available() -> tuple[bool, str]:
    ok, why = _library.compiled_status("cuda")
    if not ok:
        return ok, why
    dev_ok, dev_why = _cuda_device()
    return (True, why) if dev_ok else (False, dev_why)


def _triton_available() -> tuple[bool, str]:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False, "triton not installed"
    if not _interpret_mode():
        dev_ok, dev_why = _cuda_device()
        if not dev_ok:  # (and triton is not even imported)
            return False, dev_why + "; set TRITON_INTERPRET=1 to run the Triton kernels on CPU"
    from . import triton_kernels

    ok, why = triton_kernels.status()
    if ok and _interpret_mode():
        why += " (TRITON_INTERPRET=1: interpreter on CPU tensors)"
    return ok, why


def _op_backend(name: str, namespace: str, devices: tuple[str, ...], available: Callable) -> Backend:
    def call(op_name):
        def fn(*args):
            return getattr(getattr(torch.ops, namespace), op_name)(*args)

        fn.__name__ = f"{name}_{op_name}"
        fn.__qualname__ = fn.__name__
        return fn

    return Backend(
        name=name,
        devices=devices,
        em_step=call("em_step"),
        backward_noise=call("backward_noise"),
        flow_step=call("flow_step"),
        adjoint_step=call("adjoint_step"),
        available=available,
    )


CPU = _op_backend("cpu", _library.NAMESPACE, ("cpu",), _cpu_available)
CUDA = _op_backend("cuda", _library.NAMESPACE, ("cuda",), _cuda_available)
TRITON = _op_backend(
    "triton", _library.TRITON_NAMESPACE, ("cuda", "cpu") if _interpret_mode() else ("cuda",), _triton_available
)

_REGISTRY: dict[str, Backend] = {"torch": TORCH, "cpu": CPU, "cuda": CUDA, "triton": TRITON}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend
    _STATUS.pop(backend.name, None)


# Availability of each backend, computed once (at import, see the end of this module) and then a plain
# dict lookup, so that resolve() is traceable by torch.compile (fullgraph).
_STATUS: dict[str, tuple[bool, str]] = {}


def _status(name: str) -> tuple[bool, str]:
    st = _STATUS.get(name)
    if st is None:
        b = _REGISTRY.get(name)
        st = (False, "not part of this install") if b is None else b.available()
        _STATUS[name] = st
    return st


def refresh() -> None:
    """Recompute the backends' availability (e.g. after loading a library with torch.ops.load_library)."""
    _STATUS.clear()
    for name in _REGISTRY:
        _status(name)


def available_backends() -> dict[str, dict]:
    """What this install has: ``{name: {"available": bool, "devices": [...], "reason": str}}``."""
    out = {}
    for name in BACKENDS[1:]:
        ok, why = _status(name)
        b = _REGISTRY.get(name)
        out[name] = {"available": ok, "devices": list(b.devices) if b else [], "reason": why}
    return out


def check_backend_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend object to run for tensors on ``device``; clear errors when it cannot."""
    check_backend_name(backend)
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced and forced != "auto":
            if forced not in BACKENDS:
                raise ValueError(
                    f"{ENV_VAR}: expected one of {', '.join(map(repr, BACKENDS))}, got {forced!r}"
                )
            backend = forced
    if backend == "auto":
        for name in PREFERENCE.get(device.type, ("torch",)):
            if _status(name)[0]:
                return _REGISTRY[name]
        return TORCH
    ok, why = _status(backend)
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available in this install: {why}")
    b = _REGISTRY[backend]
    if device.type not in b.devices:
        raise ValueError(
            f"backend {backend!r} runs on {', '.join(b.devices)} tensors, but the tensors are on {device}"
        )
    return b


def _register_triton_impls() -> None:
    """Import the Triton kernels (registering their impls) when they can run here."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return
    if _interpret_mode() or torch.cuda.is_available():
        from . import triton_kernels  # noqa: F401


_register_triton_impls()
refresh()
