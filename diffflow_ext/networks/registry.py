"""The network registry: names -> factories of ``net(x, t)`` modules that describe themselves.

``build_network(name, data_shape=..., **kwargs)`` returns a module called as ``net(x, t)`` (``x`` of shape
``(B, *data_shape)``, ``t`` of shape ``(B,)``, continuous time) returning a tensor shaped like ``x``, with
``net.network_config == {"name": name, "kwargs": {...}}``: JSON-able, complete (the shape-derived arguments
included), so ``build_network_from_config(net.network_config)`` rebuilds the same architecture anywhere
(a model's checkpoint stores it next to the weights).

Users extend it::

    @register_network("my-net", shape_kwargs=lambda shape: {"channels": shape[0]})
    def my_net(channels: int, width: int = 64) -> nn.Module: ...
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "NETWORKS",
    "NetworkEntry",
    "register_network",
    "build_network",
    "build_network_from_config",
    "network_names",
]


@dataclass(frozen=True)
class NetworkEntry:
    """A registered network: its factory and how a data shape maps to the factory's shape arguments."""

    name: str
    factory: Callable[..., nn.Module]
    shape_kwargs: Callable[[tuple[int, ...]], dict] | None = None
    defaults: dict | None = None  # preset arguments (e.g. "unet-mnist"), overridable by the caller


NETWORKS: dict[str, NetworkEntry] = {}


def network_names() -> tuple[str, ...]:
    return tuple(sorted(NETWORKS))


def register_network(
    name: str,
    factory: Callable[..., nn.Module] | None = None,
    *,
    shape_kwargs: Callable[[tuple[int, ...]], dict] | None = None,
    defaults: dict | None = None,
    replace: bool = False,
):
    """Register ``factory`` (a class or function returning an ``nn.Module``) under ``name``.

    Usable as a decorator (``@register_network("name")``) or a call (``register_network("name", factory)``).
    ``shape_kwargs(data_shape)`` returns the arguments a data shape implies (``{"dim": 2}`` for the MLP);
    ``defaults`` are preset arguments the caller may override. A name already taken is an error unless
    ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    if defaults is not None:
        _json_normalised("defaults", defaults)

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not callable(fn):
            raise TypeError(f"register_network({name!r}): expected a callable factory, got {type(fn).__name__}")
        if name in NETWORKS and not replace:
            raise ValueError(f"register_network: {name!r} is already registered (pass replace=True to override)")
        NETWORKS[name] = NetworkEntry(name, fn, shape_kwargs, dict(defaults) if defaults else None)
        return fn

    return deco if factory is None else deco(factory)


def _json_normalised(what: str, kwargs: dict) -> dict:
    """``kwargs`` as a JSON round trip gives it back (tuples become lists), or a one-line error."""
    try:
        return json.loads(json.dumps(kwargs, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: network arguments must be JSON-able (numbers, strings, lists, dicts): {e}") from None


def _entry(name: object) -> NetworkEntry:
    if name not in NETWORKS:
        raise ValueError(f"network: expected one of {', '.join(map(repr, network_names()))}, got {name!r}")
    return NETWORKS[name]  # type: ignore[index]


def _accepted(fn: Callable) -> str:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return "?"
    return ", ".join(p for p in params if p != "self")


def build_network(name: str, data_shape: Sequence[int] | int | None = None, **kwargs: Any) -> nn.Module:
    """Build the registered network ``name``; ``data_shape`` (one sample's shape) fills the shape arguments.

    The result carries ``network_config = {"name": name, "kwargs": {...}}`` with every argument that was
    passed or implied by ``data_shape`` (preset defaults are not repeated: the name implies them).
    """
    entry = _entry(name)
    kwargs = dict(kwargs)
    if data_shape is not None:
        shape = (data_shape,) if isinstance(data_shape, int) else tuple(data_shape)
        if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"data_shape: expected a tuple of positive integers, got {data_shape!r}")
        if entry.shape_kwargs is not None:
            for k, v in entry.shape_kwargs(shape).items():
                given = kwargs.get(k, v)
                if _json_normalised(k, {k: given}) != _json_normalised(k, {k: v}):
                    raise ValueError(f"{k}: network {name!r} got {given!r} but the data shape {shape} implies {v!r}")
                kwargs[k] = v
    kwargs = _json_normalised(f"network {name!r}", kwargs)
    full = {**(entry.defaults or {}), **kwargs}
    try:
        inspect.signature(entry.factory).bind(**full)
    except TypeError as e:
        raise ValueError(f"network {name!r}: {e} (accepted arguments: {_accepted(entry.factory)})") from None
    except ValueError:  # no signature available (builtins); let the call itself report
        pass
    net = entry.factory(**full)
    if not isinstance(net, nn.Module):
        raise TypeError(f"network {name!r}: the factory returned {type(net).__name__}, expected an nn.Module")
    net.network_config = {"name": name, "kwargs": kwargs}
    return net


def build_network_from_config(cfg: dict, data_shape: Sequence[int] | None = None) -> nn.Module:
    """Rebuild a network from its ``network_config`` (``{"name": ..., "kwargs": {...}}``); with ``data_shape``, a
    stored shape argument that contradicts it is a ValueError (as in :func:`build_network`)."""
    if not isinstance(cfg, dict) or set(cfg) != {"name", "kwargs"} or not isinstance(cfg["kwargs"], dict):
        raise ValueError(f"network config: expected {{'name': str, 'kwargs': dict}}, got {cfg!r}")
    return build_network(cfg["name"], data_shape=data_shape, **cfg["kwargs"])
