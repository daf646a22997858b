"""The data-source interface and registry the trainer and the evaluation use for every kind of data.

A :class:`DataSource` is one dataset as the model sees it:

* ``kind``: ``"points"`` (2-D toys, users' point files), ``"tabular"`` (POWER, GAS, ...) or ``"image"``;
* ``shape``: the shape of one sample in model space (``(2,)``, ``(8,)``, ``(1, 28, 28)``...), ``dim`` its size;
* ``splits``: the named finite splits (``"train"``, ``"val"``, ``"test"``), or none for a *streaming* source
  (a procedural toy, sampled afresh; its held-out set is a fixed seeded draw);
* ``transform``: the map between data space and model space with its log-Jacobian
  (:class:`Standardize` for points and tabular data, :class:`Dequantize` for images);
* ``support``: for sharp 2-D toys the exact support (``contains``/``distance``), otherwise ``None``.

The trainer calls :meth:`DataSource.train_batch` (model-space tensors, all randomness from one numpy
``Generator`` that is checkpointed); the evaluation calls :meth:`DataSource.heldout` (data space) and the
transform. Densities convert between the spaces by the change of variables::

    log p_data(x) = log p_model(T(x)) + log|det dT/dx|      (T = transform.to_model)
    nll_data      = nll_model - transform.log_det

where for images "data space" is the *dequantised* pixel value ``v = x + u`` in ``[0, K)`` (``K`` grey
levels), so that bits/dim are the usual discrete-data figures (see :mod:`diffflow_ext.evaluation`).

Sources are found by :func:`get_data_source` (a registered name, a toy name, or a path) and users add their
own with :func:`register_data_source`. :meth:`DataSource.state` is JSON-able and stored in checkpoints;
:func:`data_source_from_state` rebuilds the same source (same splits, same transform) and refuses data that
changed since training (content hash).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATA_KINDS",
    "DataSource",
    "DataSourceError",
    "UnknownDataSourceError",
    "Transform",
    "Standardize",
    "Dequantize",
    "register_data_source",
    "get_data_source",
    "data_source_names",
    "data_source_options",
    "data_source_from_state",
    "DATA_SOURCES",
    "sha256_array",
    "file_sha256",
]

DATA_KINDS = ("points", "tabular", "image")


class DataSourceError(ValueError):
    """A data source that cannot be built (missing files, bad format, bad option), with a one-line reason."""


class UnknownDataSourceError(DataSourceError, KeyError):
    """A data source name that is neither registered, nor a toy, nor an existing path."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def sha256_array(a: Any) -> str:
    """Content hash of an array (dtype, shape and bytes)."""
    a = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _as_tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def _uniform(shape: Sequence[int], generator: Any, device) -> Tensor:
    """U[0,1) noise from a numpy Generator, a torch.Generator, an int seed or None (fresh entropy)."""
    if isinstance(generator, np.random.Generator):
        return torch.from_numpy(generator.random(tuple(shape), dtype=np.float32)).to(device)
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(int(generator))
    if generator is None or isinstance(generator, torch.Generator):
        gdev = generator.device if generator is not None else torch.device("cpu")
        return torch.rand(tuple(shape), generator=generator, device=gdev).to(device)
    raise TypeError(f"generator: expected None, an int seed, numpy or torch Generator, got {type(generator).__name__}")


# ----------------------------------------------------------------------------- transforms


class Transform:
    """Map between data space and model space. ``log_det`` = ``log|det d to_model / dx|`` of one sample."""

    name = "identity"

    def to_model(self, x: Any, generator: Any = None, *, dtype: torch.dtype = torch.float32) -> Tensor:
        return _as_tensor(x).to(dtype)

    def to_data(self, z: Tensor) -> Tensor:
        return z

    @property
    def log_det(self) -> float:
        return 0.0

    def state(self) -> dict:
        return {"name": self.name}

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether this transform maps samples of ``shape`` (one sample, model space)."""
        return True

    @staticmethod
    def from_state(s: dict) -> "Transform":
        """Rebuild a transform from :meth:`state`, type- and range-checking every stored value."""
        kinds = {"identity": Transform, "standardize": Standardize, "dequantize": Dequantize}
        if not isinstance(s, dict) or s.get("name") not in kinds:
            name = s.get("name") if isinstance(s, dict) else type(s).__name__
            raise DataSourceError(f"stored data state: unknown transform {str(name)[:40]!r} "
                                  f"(expected one of {', '.join(kinds)})")
        cls = kinds[s["name"]]
        if cls is Transform:
            return Transform()
        if cls is Standardize:
            mean, std = _numbers(s.get("mean"), "transform.mean"), _numbers(s.get("std"), "transform.std")
            if len(mean) != len(std):
                raise DataSourceError(f"stored data state: transform.mean has {len(mean)} values, std {len(std)}")
            bad = [i for i, v in enumerate(std) if not v > 0]
            if bad:
                raise DataSourceError(f"stored data state: transform.std[{bad[0]}] must be a positive finite number, "
                                      f"got {std[bad[0]]}")
            return Standardize(mean, std)
        levels, shape = s.get("levels"), s.get("shape")
        if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 256:
            raise DataSourceError(f"stored data state: transform.levels must be an integer in [2, 256], got "
                                  f"{str(levels)[:40]}")
        low, high = _numbers([s.get("low", -1.0), s.get("high", 1.0)], "transform.low/high")
        return Dequantize(levels, _shape(shape, "transform.shape"), low, high)


_MAX_NUMEL = 2**24


def _numbers(v, what: str) -> list[float]:
    if not isinstance(v, list) or not v or len(v) > _MAX_NUMEL or any(
            isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
        raise DataSourceError(f"stored data state: {what} must be a non-empty list of numbers")
    bad = [i for i, x in enumerate(v) if not math.isfinite(x)]
    if bad:
        raise DataSourceError(f"stored data state: {what}[{bad[0]}] must be finite, got {v[bad[0]]}")
    return [float(x) for x in v]


def _shape(v, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not 1 <= len(v) <= 4 or any(
            isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= _MAX_NUMEL for x in v) \
            or math.prod(v) > _MAX_NUMEL:
        raise DataSourceError(f"stored data state: {what} must be 1 to 4 integers in [1, {_MAX_NUMEL}] with at most "
                              f"{_MAX_NUMEL} values in all, got {str(v)[:60]}")
    return tuple(v)


class Standardize(Transform):
    """Per-dimension affine map ``z = (x - mean) / std`` (points, tabular); ``log_det = -sum(log std)``."""

    name = "standardize"

    def fits(self, shape: Sequence[int]) -> bool:
        return len(self.mean) == math.prod(shape)

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(np.asarray(mean, dtype=np.float64))
        self.std = torch.as_tensor(np.asarray(std, dtype=np.float64))
        if self.mean.shape != self.std.shape or self.mean.ndim != 1:
            raise DataSourceError(f"standardize: mean/std must be 1-D and alike, got {tuple(self.mean.shape)} "
                                  f"and {tuple(self.std.shape)}")
        if not (torch.isfinite(self.std).all() and (self.std > 0).all() and torch.isfinite(self.mean).all()):
            bad = [int(i) for i in torch.nonzero(~(torch.isfinite(self.std) & (self.std > 0))).flatten()[:5]]
            raise DataSourceError(f"data has constant (zero-variance) or non-finite dimensions {bad}; "
                                  "cannot standardise")

    @classmethod
    def fit(cls, x: Any) -> "Standardize":
        x = _as_tensor(x).double()
        return cls(x.mean(0).numpy(), x.std(0, unbiased=False).numpy())

    def to_model(self, x: Any, generator: Any = None, *, dtype: torch.dtype = torch.float32) -> Tensor:
        x = _as_tensor(x)
        m, s = self.mean.to(x.device), self.std.to(x.device)
        return ((x.double() - m) / s).to(dtype)

    def to_data(self, z: Tensor) -> Tensor:
        z = _as_tensor(z)
        return z.double() * self.std.to(z.device) + self.mean.to(z.device)

    @property
    def log_det(self) -> float:
        return -float(torch.log(self.std).sum())

    @property
    def log_scale(self) -> float:
        """``sum(log std)``: model-space NLL + ``log_scale`` = data-space NLL (``= -log_det``)."""
        return -self.log_det

    def state(self) -> dict:
        return {"name": self.name, "mean": self.mean.tolist(), "std": self.std.tolist()}


class Dequantize(Transform):
    """Images with ``levels`` grey levels (integers ``0..levels-1``) <-> model space ``[low, high]``.

    ``to_model``: ``z = low + (high - low) (x + u) / levels`` with ``u ~ U[0,1)`` per pixel (uniform
    dequantisation; ``generator=False`` uses ``u = 1/2``, the bin centres). ``to_data``: the bin of ``z``
    (``uint8``). Data space for densities is the dequantised value ``v = x + u`` in ``[0, levels)``, so
    ``log_det = D log((high - low) / levels)`` for ``D`` pixels: for 256 levels and ``[-1, 1]`` that is
    ``-7 ln 2`` per dimension, i.e. data-space bits/dim = model-space bits/dim + 7.
    """

    name = "dequantize"

    def __init__(self, levels: int = 256, shape: Sequence[int] = (), low: float = -1.0, high: float = 1.0):
        if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 256:
            raise DataSourceError(f"levels: expected an integer number of grey levels in [2, 256], got {levels!r}")
        if not high > low:
            raise DataSourceError(f"dequantize: need high > low, got [{low}, {high}]")
        self.levels, self.shape = int(levels), tuple(int(s) for s in shape)
        self.low, self.high = float(low), float(high)

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def fits(self, shape: Sequence[int]) -> bool:
        return self.shape == tuple(shape)

    def to_model(self, x: Any, generator: Any = None, *, dtype: torch.dtype = torch.float32) -> Tensor:
        x = _as_tensor(x)
        if generator is False:
            u = torch.full(x.shape, 0.5, device=x.device)
        else:
            u = _uniform(x.shape, generator, x.device)
        v = x.to(torch.float32) + u
        return (self.low + (self.high - self.low) / self.levels * v).to(dtype)

    def to_data(self, z: Tensor) -> Tensor:
        z = _as_tensor(z)
        v = torch.floor((z.float() - self.low) * (self.levels / (self.high - self.low)))
        return v.clamp_(0, self.levels - 1).to(torch.uint8)

    def to_unit(self, z: Tensor) -> Tensor:
        """Model-space values -> pixel intensities in ``[0, 1]`` for pictures (continuous, clamped)."""
        return ((_as_tensor(z).float() - self.low) / (self.high - self.low)).clamp(0, 1)

    @property
    def log_det(self) -> float:
        return self.dim * math.log((self.high - self.low) / self.levels)

    def state(self) -> dict:
        return {"name": self.name, "levels": self.levels, "shape": list(self.shape), "low": self.low,
                "high": self.high}


# ----------------------------------------------------------------------------- sources


class DataSource:
    """One dataset, as the trainer and the evaluation see it (see the module docstring).

    Finite sources hold their splits as data-space tensors (``float64`` points / tabular rows, ``uint8``
    images ``(n, C, H, W)``). Streaming sources (2-D toys) implement :meth:`_draw` instead.
    """

    kind: str = "points"

    def __init__(
        self,
        name: str,
        *,
        kind: str,
        shape: Sequence[int],
        transform: Transform,
        splits: dict[str, Tensor] | None = None,
        support: Any = None,
        spec: dict | None = None,
        info: dict | None = None,
    ):
        if kind not in DATA_KINDS:
            raise DataSourceError(f"kind: expected one of {DATA_KINDS}, got {kind!r}")
        self.name, self.kind, self.shape, self.transform = str(name), kind, tuple(int(s) for s in shape), transform
        self._splits = dict(splits or {})
        self.support = support
        self.spec = dict(spec or {"name": self.name, "options": {}})
        self.info = dict(info or {})
        for k, v in self._splits.items():
            if tuple(v.shape[1:]) != self._data_shape():
                raise DataSourceError(f"{self.name}: split {k!r} has sample shape {tuple(v.shape[1:])}, "
                                      f"expected {self._data_shape()}")
        if self._splits and len(self._splits.get("train", ())) < 1:
            raise DataSourceError(f"{self.name}: the training split is empty")

    def _data_shape(self) -> tuple[int, ...]:
        return self.shape

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def streaming(self) -> bool:
        return not self._splits

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._splits)

    @property
    def levels(self) -> int | None:
        """Grey levels of an image source (``None`` otherwise)."""
        return getattr(self.transform, "levels", None)

    @property
    def log_det(self) -> float:
        return self.transform.log_det

    def split_size(self, split: str) -> int | None:
        return None if self.streaming else len(self.split(split))

    def split(self, split: str = "train") -> Tensor:
        """The whole ``split`` in data space (finite sources only)."""
        if self.streaming:
            raise DataSourceError(f"{self.name} is a streaming source without fixed splits; use heldout(n)")
        if split not in self._splits:
            raise DataSourceError(f"{self.name}: no split {split!r}; available: {', '.join(self._splits)}")
        return self._splits[split]

    # ------------------------------------------------------------------ sampling
    def _draw(self, n: int, rng: np.random.Generator) -> Tensor:
        raise NotImplementedError

    def train_data(self, n: int, rng: np.random.Generator) -> Tensor:
        """``n`` training examples in data space (uniform with replacement; consumes ``rng``)."""
        if self.streaming:
            return self._draw(n, rng)
        tr = self._splits["train"]
        return tr[torch.from_numpy(rng.integers(0, len(tr), size=n))]

    def train_batch(self, n: int, rng: np.random.Generator, *, device=None, dtype: torch.dtype = torch.float32
                    ) -> Tensor:
        """``n`` training examples in model space, ``(n, *shape)``; every random draw (indices, toy samples,
        dequantisation noise) comes from ``rng``, so a checkpointed ``rng`` resumes the stream exactly."""
        x = self.train_data(n, rng)
        if device is not None:
            x = x.to(device)
        return self.transform.to_model(x, rng, dtype=dtype)

    def heldout(self, n: int | None = None, split: str = "test") -> Tensor:
        """Held-out examples in data space, deterministic: the first ``n`` of ``split`` (finite sources), or
        ``n`` (default 10000) points of a fixed seeded draw (streaming sources)."""
        if self.streaming:
            seed = int(self.spec.get("options", {}).get("seed", 0))
            return self._draw(10_000 if n is None else int(n), np.random.default_rng([seed, 2]))
        if split not in self._splits:
            raise DataSourceError(f"{self.name}: no split {split!r}; available: {', '.join(self._splits)}")
        x = self._splits[split]
        return x if n is None else x[: int(n)]

    def to_model(self, x: Any, generator: Any = None, *, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.transform.to_model(x, generator, dtype=dtype)

    def to_data(self, z: Tensor) -> Tensor:
        return self.transform.to_data(z)

    def contains(self, x: Any, tol: float | None = None) -> np.ndarray:
        """Exact support membership (sharp 2-D toys only)."""
        if self.support is None or not getattr(self.support, "sharp", False):
            raise DataSourceError(f"{self.name} has no exact support")
        x = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
        return self.support.contains(x, tol)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        """JSON-able description: how to rebuild the source, its transform, and content hashes."""
        s = {"source": self.spec, "kind": self.kind, "shape": list(self.shape), "name": self.name,
             "transform": self.transform.state()}
        if not self.streaming:
            if getattr(self, "_sha", None) is None:  # splits never change: hash once (checkpoints call this often)
                self._sha = {k: sha256_array(v) for k, v in self._splits.items()}
            s["sha256"] = dict(self._sha)
        if self.info.get("file_sha256"):
            s["file_sha256"] = self.info["file_sha256"]
        return s

    def describe(self) -> str:
        parts = [f"{self.name} ({self.kind}, shape {'x'.join(map(str, self.shape))}"]
        if self.levels:
            parts.append(f", {self.levels} grey levels")
        if self.streaming:
            parts.append(", streaming")
        else:
            parts.append(", " + " / ".join(f"{k} {len(v)}" for k, v in self._splits.items()))
        return "".join(parts) + ")"

    def __repr__(self) -> str:
        return f"DataSource({self.describe()})"


class ImageSource(DataSource):
    """An image set: ``uint8`` splits ``(n, C, H, W)`` with ``levels`` grey levels, dequantised to ``[-1, 1]``."""

    kind = "image"

    def __init__(self, name: str, *, splits: dict[str, Tensor], levels: int = 256, spec=None, info=None):
        shape = tuple(next(iter(splits.values())).shape[1:])
        if len(shape) != 3:
            raise DataSourceError(f"{name}: images must be (n, C, H, W), got sample shape {shape}")
        for k, v in splits.items():
            if v.dtype != torch.uint8:
                raise DataSourceError(f"{name}: split {k!r} must be uint8 images, got {v.dtype}")
            if len(v) and int(v.max()) >= levels:
                raise DataSourceError(f"{name}: split {k!r} has pixel value {int(v.max())} >= levels={levels}")
        super().__init__(name, kind="image", shape=shape, transform=Dequantize(levels, shape), splits=splits,
                         spec=spec, info=info)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[..., DataSource]
    kind: str
    help: str
    needs_dir: bool


DATA_SOURCES: dict[str, _Entry] = {}
_ALIASES: dict[str, str] = {}
#: families of names (``"sharp_SEED"`` -> resolver): ``resolver(key)`` registers ``key`` when it names a member of
#: the family, on first use (a family is unbounded, so it cannot be registered up front)
_NAME_RESOLVERS: dict[str, Callable[[str], bool]] = {}
_GENERATED: set[str] = set()  # keys registered by a resolver (not listed among the names)


def _source_key(spec: str) -> str:
    """The registry key of a name (aliases and name families resolved, the family member registered)."""
    key = _ALIASES.get(spec.lower(), spec.lower())
    if key not in DATA_SOURCES and any(resolve(key) for resolve in _NAME_RESOLVERS.values()):
        _GENERATED.add(key)
    return key


def register_data_source(name: str, *, kind: str, help: str = "", needs_dir: bool = False,
                         aliases: Sequence[str] = ()) -> Callable:
    """Decorator: register ``factory(*, data_dir, seed, **options) -> DataSource`` under ``name``.

    ``needs_dir``: the source reads files from ``data_dir`` (``--data-dir``); it is an error to omit it.
    Names are case-insensitive; re-registering a name replaces it.
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"kind: expected one of {DATA_KINDS}, got {kind!r}")

    def deco(factory: Callable[..., DataSource]) -> Callable[..., DataSource]:
        key = name.lower()
        DATA_SOURCES[key] = _Entry(key, factory, kind, help, needs_dir)
        for a in aliases:
            _ALIASES[a.lower()] = key
        return factory

    return deco


def data_source_names(kind: str | None = None) -> list[str]:
    """Registered names (optionally of one kind), for help texts and CLI choices."""
    return [k for k, e in DATA_SOURCES.items() if (kind is None or e.kind == kind) and k not in _GENERATED]


_POINT_EXT = (".csv", ".txt", ".tsv")
_IMAGE_EXT = (".npz",)


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or Path(spec).suffix.lower() in (".npy", ".npz", *_POINT_EXT) \
        or Path(spec).exists()


def _option_names(factory: Callable) -> list[str] | None:
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None  # anything goes
    return sorted(k for k, p in params.items() if k not in ("data_dir", "seed")
                  and (p.kind is inspect.Parameter.KEYWORD_ONLY or p.default is not inspect.Parameter.empty))


def _check_options(name: str, factory: Callable, options: dict) -> None:
    valid = _option_names(factory)
    if valid is None:
        return
    bad = sorted(set(options) - set(valid))
    if bad:
        raise DataSourceError(f"data option(s) {', '.join(bad)} do not apply to {name}; valid: "
                              f"{', '.join(valid) or 'none'}")


def get_data_source(spec: str, *, data_dir: str | os.PathLike | None = None, seed: int = 0, **options
                    ) -> DataSource:
    """Build a data source from a registered name (``"mnist"``, ``"power"``, ``"checkerboard"``...) or a path.

    Paths: a ``.csv``/``.txt``/``.npy`` file of ``(n, d)`` points -> points; a ``.npy`` array of ``uint8``
    images ``(n, H, W)``, ``(n, H, W, C)`` or ``(n, C, H, W)`` or a ``.npz`` -> images; a folder -> PNG images.
    ``data_dir`` is where file-based named sources look (``--data-dir``); ``seed`` fixes splits that are
    drawn at random (point files) and the held-out draw of toys; ``options`` go to the source's factory.
    """
    from . import sources  # noqa: F401  (registers the built-in sources)

    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise DataSourceError(f"data: expected a data source name or a path, got {spec!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataSourceError(f"seed: expected a non-negative integer, got {seed!r}")
    s = os.path.expanduser(str(spec))
    if data_dir is not None:
        data_dir = os.path.expanduser(str(data_dir))
    key = _source_key(s)
    if key in DATA_SOURCES and not (Path(s).exists() and _looks_like_path(s) and os.sep in s):
        e = DATA_SOURCES[key]
        if e.needs_dir and data_dir is None:
            raise DataSourceError(f"{key} reads files from a folder you downloaded: pass --data-dir PATH "
                                  "(nothing is ever downloaded)")
        if data_dir is not None and not Path(data_dir).is_dir():
            raise DataSourceError(f"--data-dir {data_dir}: not a directory")
        _check_options(key, e.factory, options)
        src = e.factory(data_dir=data_dir, seed=int(seed), **options)
        ddir = str(Path(data_dir).resolve()) if data_dir is not None else None
        src.spec = {"name": key, "options": {"seed": int(seed), "data_dir": ddir, **options}}
        return src
    if _looks_like_path(s):
        from .sources import source_from_path

        src = source_from_path(s, seed=int(seed), **options)
        src.spec = {"name": str(Path(s).resolve()), "options": {"seed": int(seed), **options}}
        if Path(s).is_file():
            src.info["file_sha256"] = file_sha256(s)
        return src
    names = ", ".join([*sorted(data_source_names()), *_NAME_RESOLVERS])
    raise UnknownDataSourceError(f"unknown data source {s!r}: not a file, and not one of: {names}")


def data_source_options(spec: str) -> list[str] | None:
    """The option names ``get_data_source(spec, **options)`` accepts (``None``: any), e.g. to pass ``holdout``
    only to sources that split at random."""
    from . import sources

    s = str(spec)
    key = _source_key(s)
    if key in DATA_SOURCES and not (Path(s).exists() and os.sep in s):
        return _option_names(DATA_SOURCES[key].factory)
    return sources.path_options(s)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_source_from_state(state: dict, *, data_dir: str | os.PathLike | None = None) -> DataSource:
    """Rebuild a source from :meth:`DataSource.state` (as stored in a checkpoint).

    ``data_dir`` overrides the stored folder (data moved). Every stored value is type- and range-checked
    first ("stored data state: ..." errors); a data file whose bytes changed is refused before it is parsed,
    and the rebuilt splits must match their stored hashes. The stored transform is used as is (a point set's
    standardisation statistics do not drift).
    """
    if not isinstance(state, dict):
        raise DataSourceError(f"stored data state must be a dict, got {type(state).__name__}")
    if "source" not in state and state.get("kind") in ("toy", "file"):  # checkpoints written before the registry
        opts = {"seed": state.get("seed", 0)}
        if state["kind"] == "file":
            opts["holdout"] = state.get("holdout", 0.1)
        spec = {"name": state.get("name"), "options": opts}
        state = {"source": spec, "transform": {"name": "standardize", "mean": state.get("mean"),
                                               "std": state.get("std")}, "sha256": None}
    spec = state.get("source")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"] \
            or not isinstance(spec.get("options", {}), dict):
        raise DataSourceError("stored data state: source must be {'name': str, 'options': dict}")
    kind, shape = state.get("kind"), state.get("shape")
    if kind is not None and kind not in DATA_KINDS:
        raise DataSourceError(f"stored data state: kind must be one of {DATA_KINDS}, got {str(kind)[:40]!r}")
    if shape is not None:
        shape = _shape(shape, "shape")
    transform = Transform.from_state(state["transform"]) if "transform" in state else None
    hashes = state.get("sha256")
    if hashes is not None and (not isinstance(hashes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in hashes.items())):
        raise DataSourceError("stored data state: sha256 must map split names to hex digests")
    fsha = state.get("file_sha256")
    if fsha is not None and Path(spec["name"]).is_file() and file_sha256(spec["name"]) != fsha:
        raise DataSourceError(f"data file {spec['name']} changed since training (content hash differs)")
    opts = dict(spec.get("options", {}))
    if data_dir is None:
        data_dir = opts.pop("data_dir", None)
        if data_dir is not None and (not isinstance(data_dir, str) or not Path(data_dir).is_dir()):
            raise DataSourceError(f"the data folder of this run, {str(data_dir)[:200]}, is gone; pass --data-dir "
                                  "with its new location")
    else:
        opts.pop("data_dir", None)
    src = get_data_source(spec["name"], data_dir=data_dir, **opts)
    if hashes:
        now = src.state().get("sha256") or {}
        changed = [k for k, v in hashes.items() if now.get(k) != v]
        if changed:
            raise DataSourceError(f"data {spec['name']!r} changed since training (content hash of split(s) "
                                  f"{', '.join(changed)} differs)")
    if kind is not None and src.kind != kind or shape is not None and src.shape != shape:
        raise DataSourceError(f"stored data state: kind {kind} / shape {shape} do not match the data "
                              f"({src.kind} / {src.shape})")
    if transform is not None:
        if not transform.fits(src.shape):
            raise DataSourceError(f"stored data state: the transform does not fit samples of shape {src.shape}")
        src.transform = transform
    return src
