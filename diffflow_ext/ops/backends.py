"""Backend registry: which implementation of the step ops runs for a given device.

A backend is an object with the four normalised ops (``em_step``, ``backward_noise``,
``flow_step``, ``adjoint_step``), each taking ``dt`` / ``g`` already as ``(B,)`` tensors
(see :mod:`diffflow_ext.ops.reference` for the math every backend must match), plus
``devices`` (the device types it serves) and ``available()`` -> ``(ok, reason)``.

Selection: ``backend="auto"`` picks the first available backend for the tensors'
device from :data:`PREFERENCE`; the environment variable ``DIFFFLOW_BACKEND`` (a backend name)
overrides ``"auto"``.

Built-in backends:

* ``torch``  -- the pure-PyTorch reference ops (any device, always available);
* ``cpu``    -- compiled C++ kernels (``diffflow_ext._C``), ops ``torch.ops.diffflow_ext.*``;
* ``cuda``   -- compiled CUDA kernels (``diffflow_ext._C_cuda``), same ops, CUDA tensors;
* ``triton`` -- Triton kernels (:mod:`.triton_kernels`), ops ``torch.ops.diffflow_ext_triton.*``,
  CUDA tensors (and CPU tensors in the Triton interpreter, ``TRITON_INTERPRET=1``).

The registry is open: :func:`register` adds a :class:`Backend` (e.g. kernels for another device, or an
instrumented copy of the reference) that every op (``ops.em_step(..., backend="mine")``), the model
(``DiffFlow(backend="mine")``) and ``DIFFFLOW_BACKEND`` can then select,
and that ``available_backends()`` reports; ``preferred=True`` also puts it first for ``"auto"`` on its
devices. :func:`unregister` removes it again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _library, reference

ENV_VAR = "DIFFFLOW_BACKEND"
BUILTIN_BACKENDS = ("cuda", "triton", "cpu", "torch")
# The names a user may pass ("auto" and the built-in backends); registered backends extend it (see names()).
BACKENDS = ("auto", *BUILTIN_BACKENDS)

# Fastest first, per device type.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}


@dataclass(frozen=True)
class Backend:
    """One implementation of the step ops.

    ``em_step``, ``backward_noise``, ``flow_step`` and ``adjoint_step`` take the arguments of the public
    ops in :mod:`diffflow_ext.ops` with ``dt`` / ``g`` / ``weight`` already normalised to ``(B,)`` tensors
    in the accumulation dtype (see :mod:`diffflow_ext.ops.reference`, the math every backend must match),
    and must be differentiable if training uses them. ``devices``: the device types it serves;
    ``available()`` -> ``(ok, reason)``.
    """

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
    available=_always,
    **{op: getattr(reference, f"{op}_ref") for op in _library.FORWARD_OPS},
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
    """A backend whose ops are the torch.library operators ``torch.ops.<namespace>.<op>.default`` (the
    schemas are defined at import of :mod:`._library`; kernels registered later are found by the dispatcher)."""
    ops = getattr(torch.ops, namespace)
    return Backend(name=name, devices=devices, available=available,
                   **{op_name: getattr(ops, op_name).default for op_name in _library.FORWARD_OPS})


CPU = _op_backend("cpu", _library.NAMESPACE, ("cpu",), _cpu_available)
CUDA = _op_backend("cuda", _library.NAMESPACE, ("cuda",), _cuda_available)
TRITON = _op_backend(
    "triton", _library.TRITON_NAMESPACE, ("cuda", "cpu") if _interpret_mode() else ("cuda",), _triton_available
)

_REGISTRY: dict[str, Backend] = {"torch": TORCH, "cpu": CPU, "cuda": CUDA, "triton": TRITON}

# Availability of each backend, computed once (at import, see the end of this module, and on register) and
# then a plain dict lookup, so that resolve() is traceable by torch.compile (fullgraph).
_STATUS: dict[str, tuple[bool, str]] = {}


def names() -> tuple[str, ...]:
    """Every name ``backend=`` accepts: ``"auto"``, the built-in backends and the registered ones."""
    return ("auto", *_REGISTRY)


def register(backend: Backend, *, preferred: bool = False) -> None:
    """Add (or replace) a backend, selectable by name from then on.

    ``preferred``: also try it first for ``backend="auto"`` on each of its devices (when available).
    The built-in names cannot be replaced.
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"backend: expected a diffflow_ext.ops.backends.Backend, got {type(backend).__name__}")
    if not isinstance(backend.name, str) or not backend.name or backend.name == "auto":
        raise ValueError(f"backend.name: expected a non-empty name other than 'auto', got {backend.name!r}")
    if backend.name in BUILTIN_BACKENDS:
        raise ValueError(f"backend.name: {backend.name!r} is a built-in backend; choose another name")
    missing = [op for op in _library.FORWARD_OPS if not callable(getattr(backend, op))]
    if missing:
        raise TypeError(f"backend {backend.name!r}: expected callables for {', '.join(missing)}")
    _REGISTRY[backend.name] = backend
    _STATUS.pop(backend.name, None)
    for dev in backend.devices:
        order = tuple(n for n in PREFERENCE.get(dev, ("torch",)) if n != backend.name)
        PREFERENCE[dev] = (backend.name, *order) if preferred else order
    _status(backend.name)


def unregister(name: str) -> None:
    """Remove a backend added by :func:`register` (built-in backends stay)."""
    if name in BUILTIN_BACKENDS:
        raise ValueError(f"backend: {name!r} is a built-in backend and cannot be removed")
    if _REGISTRY.pop(name, None) is None:
        raise ValueError(f"backend: no registered backend named {name!r}")
    _STATUS.pop(name, None)
    for dev, order in list(PREFERENCE.items()):
        PREFERENCE[dev] = tuple(n for n in order if n != name)


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
    """What this install has: ``{name: {"available": bool, "devices": [...], "reason": str}}`` for every
    built-in and registered backend."""
    out = {}
    for name, b in _REGISTRY.items():
        ok, why = _status(name)
        out[name] = {"available": ok, "devices": list(b.devices), "reason": why}
    return out


def _unknown(what: str, value: object) -> ValueError:
    return ValueError(f"{what}: expected one of {', '.join(map(repr, names()))}, got {value!r}")


def check_backend_name(backend: str) -> str:
    """``backend`` if it names ``"auto"``, a built-in or a registered backend; else a ValueError listing them."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in _REGISTRY):
        raise _unknown("backend", backend)
    return backend


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend object to run for tensors on ``device``; clear errors when it cannot."""
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced and forced != "auto":
            if forced not in _REGISTRY:
                raise _unknown(ENV_VAR, forced)
            backend = forced
    if backend == "auto":
        for name in PREFERENCE.get(device.type, ("torch",)):
            if _status(name)[0]:
                return _REGISTRY[name]
        return TORCH
    b = _REGISTRY.get(backend) if isinstance(backend, str) else None
    if b is None:
        raise _unknown("backend", backend)
    ok, why = _status(backend)
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available in this install: {why}")
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
