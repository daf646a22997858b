"""Safe, atomic training checkpoints (one safetensors file: tensors + JSON metadata).

Layout of ``checkpoint.safetensors``:

* tensors: ``model/<name>``, ``ema/<name>`` (EMA weights), ``optim/<param index>/<key>`` (optimizer
  state), ``rng/torch_cpu`` (global torch CPU RNG), ``rng/gen/<name>`` (``torch.Generator`` states,
  e.g. the per-shard noise streams);
* header metadata (strings): ``format`` = ``diffflow_ext.checkpoint``, ``version``, ``meta`` (JSON: the
  model config, step counter, optimizer param groups, scheduler state, numpy / python RNG states and any
  ``extra``: training config, data transform, ...) and ``sha256``, a checksum of EVERYTHING else: format,
  version, ``meta`` and every tensor's name, dtype, shape and bytes. Editing one digit anywhere (a stored
  data std, the step counter) makes the file fail to load.

Loading is defensive, in this order, and never unpickles anything:

1. the path must be a regular file (a FIFO, ``/dev/zero`` or a socket is refused without reading);
2. the safetensors header is read alone (at most 100 MB) and checked: pickle / ``torch.save`` files are
   refused (unpickling can run arbitrary code); every tensor entry's dtype, shape and byte range must be
   consistent and tile the file exactly, so sizes are known and bounded by the file before anything is
   allocated; the data must fit in available memory;
3. the tensors are read straight into their own buffers while the checksum is computed;
4. ``meta`` is validated against a schema with bounds (types, ranges, lengths, nesting depth, RNG states,
   consistency with the tensors) -- a crafted file whose checksum was recomputed still cannot make the
   loader allocate, recurse or restore nonsense.

Every failure raises :class:`CheckpointError` with one line naming the file and what is wrong.
Saving writes a temporary file in the target directory, fsyncs it and ``os.replace``-s it, so a crash
(even ``kill -9``) never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import stat
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._resources import fmt_bytes, mem_available

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write_bytes",
    "atomic_write_text",
    "FORMAT",
    "VERSION",
]

FORMAT = "diffflow_ext.checkpoint"
VERSION = 2  # 2: the checksum covers the metadata too (version 1 checksummed the tensors only)

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_JSON_DEPTH = 32
MAX_NDIM = 16
MAX_DIM = 2**40
MAX_TENSORS = 1_000_000
MAX_RNG_BYTES = 1 << 20

# safetensors dtype codes <-> torch dtypes
_ST_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"),
                     ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        _ST_DTYPES[_code] = getattr(torch, _name)
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be (safely) saved or loaded; the message (one line) names the file and why."""


# ----------------------------------------------------------------------------- atomic IO


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same dir + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------- (de)serialisation helpers


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Tensor) and x.numel() == 1:
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise CheckpointError(f"cannot store {type(x).__name__} in checkpoint metadata (not JSON-able)")


def _tensor_bytes(t: Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _digest_entries(metadata: Mapping[str, str], entries: list[tuple[str, str, list[int], str]]) -> str:
    """sha256 over format, version, meta and, per tensor (sorted by name), name, dtype code, shape and the
    sha256 of its bytes. Every field is length-prefixed, so no two different checkpoints hash alike."""
    h = hashlib.sha256()

    def feed(s: str) -> None:
        b = s.encode("utf-8")
        h.update(struct.pack("<Q", len(b)))
        h.update(b)

    feed(str(metadata.get("format", "")))
    feed(str(metadata.get("version", "")))
    feed(str(metadata.get("meta", "")))
    for name, code, shape, sub in sorted(entries):
        feed(name)
        feed(code)
        feed(json.dumps(list(shape)))
        feed(sub)
    return h.hexdigest()


def _digest(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """The checksum stored under ``sha256`` for these tensors and header fields."""
    entries = []
    for name, t in tensors.items():
        if t.dtype not in _ST_CODES:
            raise CheckpointError(f"cannot store tensor {name!r} of dtype {t.dtype} in a checkpoint")
        entries.append((name, _ST_CODES[t.dtype], list(t.shape), hashlib.sha256(_tensor_bytes(t)).hexdigest()))
    return _digest_entries(metadata, entries)


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"optim/{idx}/{key}"] = val.detach().cpu().clone().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = _jsonable(val)
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars}


def _optimizer_join(meta: dict, tensors: Mapping[str, Tensor]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("optim/"):
            _, idx, key = name.split("/", 2)
            state.setdefault(int(idx), {})[key] = t
    for idx, d in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(d)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        for k, v in g.items():
            if k != "params" and isinstance(v, list):
                g[k] = tuple(v)
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _numpy_state(rng: np.random.Generator) -> dict:
    return _jsonable(rng.bit_generator.state)


def _python_state() -> list:
    v, st, gauss = random.getstate()
    return [v, list(st), gauss]


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    model_config: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    ema: Any = None,
    step: int = 0,
    generators: Mapping[str, torch.Generator | Tensor] | None = None,
    numpy_rngs: Mapping[str, np.random.Generator] | None = None,
    save_global_rng: bool = True,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint atomically; returns its path. ``generators`` values may be generators or states.

    ``ema``: an object with ``state_dict()`` (name -> tensor), ``decay`` and ``num_updates`` (e.g.
    :class:`diffflow_ext.training.ema.EMA`). The metadata is validated by the same schema as on loading, so a
    checkpoint that could not be loaded back is never written."""
    if model_config is None:
        model_config = model.config() if hasattr(model, "config") else {}
    tensors: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model/{k}"] = v.detach().cpu().clone().contiguous()
    meta: dict[str, Any] = {"model_config": _jsonable(model_config), "step": int(step)}
    if ema is not None:
        for k, v in ema.state_dict().items():
            tensors[f"ema/{k}"] = v.detach().cpu().clone().contiguous()
        meta["ema"] = {"decay": ema.decay, "num_updates": ema.num_updates}
    if optimizer is not None:
        t, m = _optimizer_split(optimizer)
        tensors.update(t)
        meta["optimizer"] = m
    if scheduler is not None:
        meta["scheduler"] = _jsonable(scheduler.state_dict())
    if save_global_rng:
        tensors["rng/torch_cpu"] = torch.get_rng_state().clone()
        meta["rng_python"] = _python_state()
        name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
        meta["rng_numpy_global"] = [name, key.tolist(), int(pos), int(has_gauss), float(gauss)]
    for name, g in (generators or {}).items():
        state = g.get_state() if isinstance(g, torch.Generator) else g
        tensors[f"rng/gen/{name}"] = state.detach().cpu().clone().contiguous()
    if numpy_rngs:
        meta["rng_numpy"] = {k: _numpy_state(v) for k, v in numpy_rngs.items()}
    if extra:
        meta["extra"] = _jsonable(extra)
    from safetensors.torch import save as st_save

    where = Path(path)
    try:
        _validate(meta, {k: (_ST_CODES.get(v.dtype, "?"), list(v.shape)) for k, v in tensors.items()})
    except _Bad as e:
        raise CheckpointError(f"{where}: refusing to save an invalid checkpoint: {e}") from None
    header = {"format": FORMAT, "version": str(VERSION), "meta": json.dumps(meta, allow_nan=True)}
    header["sha256"] = _digest(tensors, header)
    try:
        blob = st_save(tensors, metadata=header)
    except Exception as e:  # pragma: no cover - defensive
        raise CheckpointError(f"{where}: cannot serialise checkpoint: {e}") from e
    return atomic_write_bytes(path, blob)


# ----------------------------------------------------------------------------- metadata schema


class _Bad(Exception):
    """A schema violation; the message names the field (``meta.optimizer.param_groups[0].lr``) and the rule."""


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _Bad(f"{where} must be an integer in [{lo}, {hi}], got {_show(v)}")
    return v


def _real(v: Any, where: str, lo: float = -math.inf, hi: float = math.inf, *, hi_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi \
            or (hi_open and v == hi):
        rng = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise _Bad(f"{where} must be a finite number in {rng}, got {_show(v)}")
    return float(v)


def _dict(v: Any, where: str, required: tuple[str, ...] = (), optional: tuple[str, ...] | None = ()) -> dict:
    """A dict with string keys; ``optional=None`` admits any further key."""
    if not isinstance(v, dict):
        raise _Bad(f"{where} must be an object, got {type(v).__name__}")
    missing = [k for k in required if k not in v]
    if missing:
        raise _Bad(f"{where} lacks {', '.join(missing)}")
    if optional is not None:
        unknown = sorted(set(v) - set(required) - set(optional))
        if unknown:
            raise _Bad(f"{where} has unknown field(s) {', '.join(map(repr, unknown[:5]))}")
    return v


def _list(v: Any, where: str, lo: int = 0, hi: int = 10**7) -> list:
    if not isinstance(v, list) or not lo <= len(v) <= hi:
        raise _Bad(f"{where} must be a list of {lo} to {hi} items, got {_show(v)}")
    return v


def _json_bounds(v: Any, where: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Nesting depth (iteratively: no recursion) and string/list sizes of any JSON value."""
    stack = [(v, 1)]
    while stack:
        x, d = stack.pop()
        if d > max_depth:
            raise _Bad(f"{where} is nested more than {max_depth} levels deep")
        if isinstance(x, dict):
            stack.extend((y, d + 1) for y in x.values())
        elif isinstance(x, list):
            stack.extend((y, d + 1) for y in x)
        elif isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > 256:
            raise _Bad(f"{where} holds an integer of {x.bit_length()} bits")


def _plain(v: Any, where: str) -> None:
    """None, a bool, a string, a finite number or a list (up to 10**7 items) of those."""
    if v is None or isinstance(v, (bool, str)):
        return
    if isinstance(v, (int, float)):
        _real(v, where)
        return
    for i, x in enumerate(_list(v, where)):
        if not (x is None or isinstance(x, (bool, str))):
            _real(x, f"{where}[{i}]")


_NUMPY_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


def _numpy_rng_state(s: Any, where: str) -> dict:
    s = _dict(s, where, ("bit_generator", "state"), None)
    name = s["bit_generator"]
    if name not in _NUMPY_BIT_GENERATORS:
        raise _Bad(f"{where}.bit_generator must be one of {', '.join(_NUMPY_BIT_GENERATORS)}, got {_show(name)}")
    try:
        getattr(np.random, name)().state = s  # numpy validates the state (types, key length, ranges)
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise _Bad(f"{where} is not a valid numpy {name} state ({str(e).splitlines()[0][:80]})") from None
    return s


def _validate(meta: Any, tensors: Mapping[str, tuple[str, list[int]]]) -> None:
    """Check ``meta`` (the parsed JSON) and its consistency with the tensors (name -> (dtype code, shape))."""
    _json_bounds(meta, "meta")
    meta = _dict(meta, "meta", ("model_config", "step"),
                 ("ema", "optimizer", "scheduler", "rng_python", "rng_numpy_global", "rng_numpy", "extra"))
    mc = _dict(meta["model_config"], "meta.model_config", (), None)
    for k, v in mc.items():
        if isinstance(v, dict):
            _dict(v, f"meta.model_config.{k}", (), None)
        else:
            _plain(v, f"meta.model_config.{k}")
    _int(meta["step"], "meta.step", 0, 2**53)

    groups: dict[str, list[str]] = {}
    for name in tensors:
        m = re.fullmatch(r"(model|ema)/(.+)|optim/(\d{1,9})/(.+)|rng/torch_cpu|rng/gen/(.+)", name)
        if m is None or len(name) > 1000:
            raise _Bad(f"unexpected tensor name {_show(name)}")
        groups.setdefault(name.split("/", 1)[0], []).append(name)

    for name in groups.get("rng", []):
        code, shape = tensors[name]
        if code != "U8" or len(shape) != 1 or not 1 <= shape[0] <= MAX_RNG_BYTES:
            raise _Bad(f"tensor {name} must be a 1-D uint8 generator state, got {code} {shape}")

    model_shapes = {n[len("model/"):]: tensors[n] for n in groups.get("model", [])}
    if "ema" in meta:
        e = _dict(meta["ema"], "meta.ema", ("decay", "num_updates"))
        _real(e["decay"], "meta.ema.decay", 0.0, 1.0, hi_open=True)
        _int(e["num_updates"], "meta.ema.num_updates", 0, 2**53)
    for name in groups.get("ema", []):
        if "ema" not in meta:
            raise _Bad(f"tensor {name} without meta.ema")
        base = name[len("ema/"):]
        if base not in model_shapes or model_shapes[base][1] != tensors[name][1]:
            raise _Bad(f"tensor {name} does not match a model weight of the same shape")

    param_ids: set[int] = set()
    if "optimizer" in meta:
        o = _dict(meta["optimizer"], "meta.optimizer", ("param_groups",), ("scalars",))
        for i, g in enumerate(_list(o["param_groups"], "meta.optimizer.param_groups", 1, 10_000)):
            g = _dict(g, f"meta.optimizer.param_groups[{i}]", ("params",), None)
            for j, pid in enumerate(_list(g["params"], f"meta.optimizer.param_groups[{i}].params", 0, 10**7)):
                _int(pid, f"meta.optimizer.param_groups[{i}].params[{j}]", 0, 10**9)
                if pid in param_ids:
                    raise _Bad(f"meta.optimizer.param_groups: parameter {pid} appears twice")
                param_ids.add(pid)
            for k, v in g.items():
                if k != "params":
                    _plain(v, f"meta.optimizer.param_groups[{i}].{k}")
        for idx, d in _dict(o.get("scalars", {}), "meta.optimizer.scalars", (), None).items():
            if not idx.isdigit() or int(idx) not in param_ids:
                raise _Bad(f"meta.optimizer.scalars: {_show(idx)} is not a parameter index of the param groups")
            for k, v in _dict(d, f"meta.optimizer.scalars.{idx}", (), None).items():
                _plain(v, f"meta.optimizer.scalars.{idx}.{k}")
    for name in groups.get("optim", []):
        if "optimizer" not in meta:
            raise _Bad(f"tensor {name} without meta.optimizer")
        if int(name.split("/")[1]) not in param_ids:
            raise _Bad(f"tensor {name}: parameter index not in meta.optimizer.param_groups")

    if "scheduler" in meta:  # any JSON object (schedulers store lambdas' states, lists...); restore() checks fit
        _dict(meta["scheduler"], "meta.scheduler", (), None)

    has_global = "rng/torch_cpu" in tensors
    if has_global != ("rng_python" in meta) or has_global != ("rng_numpy_global" in meta):
        raise _Bad("the global RNG states are incomplete (rng/torch_cpu, meta.rng_python, meta.rng_numpy_global "
                   "go together)")
    if has_global:
        rp = _list(meta["rng_python"], "meta.rng_python", 3, 3)
        _int(rp[0], "meta.rng_python[0] (version)", 3, 3)
        for i, w in enumerate(_list(rp[1], "meta.rng_python[1]", 625, 625)):
            _int(w, f"meta.rng_python[1][{i}]", 0, 2**32 - 1 if i < 624 else 624)
        if rp[2] is not None:
            _real(rp[2], "meta.rng_python[2]")
        rn = _list(meta["rng_numpy_global"], "meta.rng_numpy_global", 5, 5)
        if rn[0] != "MT19937":
            raise _Bad(f"meta.rng_numpy_global[0] must be 'MT19937', got {_show(rn[0])}")
        for i, w in enumerate(_list(rn[1], "meta.rng_numpy_global[1]", 624, 624)):
            _int(w, f"meta.rng_numpy_global[1][{i}]", 0, 2**32 - 1)
        _int(rn[2], "meta.rng_numpy_global[2] (position)", 0, 624)
        _int(rn[3], "meta.rng_numpy_global[3] (has_gauss)", 0, 1)
        _real(rn[4], "meta.rng_numpy_global[4] (gauss)")
    for k, s in _dict(meta.get("rng_numpy", {}), "meta.rng_numpy", (), None).items():
        _numpy_rng_state(s, f"meta.rng_numpy.{k}")
    _dict(meta.get("extra", {}), "meta.extra", (), None)


def _check_header(header: Any, data_len: int) -> tuple[dict, list[tuple[str, str, list[int], int, int]]]:
    """Validate the safetensors header: returns (``__metadata__``, [(name, code, shape, begin, end)] by offset)."""
    if not isinstance(header, dict):
        raise _Bad("the header is not a JSON object")
    md = header.get("__metadata__", {})
    if not isinstance(md, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
        raise _Bad("__metadata__ must map strings to strings")
    if len(header) - ("__metadata__" in header) > MAX_TENSORS:
        raise _Bad(f"more than {MAX_TENSORS} tensors")
    entries = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {_show(name)}"
        e = _dict(e, where, ("dtype", "shape", "data_offsets"))
        if e["dtype"] not in _ST_DTYPES:
            raise _Bad(f"{where} has unsupported dtype {_show(e['dtype'])}")
        shape = _list(e["shape"], f"{where} shape", 0, MAX_NDIM)
        for d in shape:
            _int(d, f"{where} shape", 0, MAX_DIM)
        offs = _list(e["data_offsets"], f"{where} data_offsets", 2, 2)
        a, b = (_int(o, f"{where} data_offsets", 0, data_len) for o in offs)
        nbytes = math.prod(shape) * _ST_DTYPES[e["dtype"]].itemsize
        if b - a != nbytes:
            raise _Bad(f"{where}: shape {shape} of {e['dtype']} needs {nbytes} bytes, its byte range holds {b - a}")
        entries.append((name, e["dtype"], shape, a, b))
    entries.sort(key=lambda t: (t[3], t[4]))
    pos = 0
    for name, _, _, a, b in entries:
        if a != pos:
            raise _Bad(f"tensor {_show(name)} starts at byte {a}, expected {pos} (gap or overlap)")
        pos = b
    if pos != data_len:
        raise _Bad(f"the tensors cover {pos} bytes, the file holds {data_len} data bytes")
    return md, entries


# ----------------------------------------------------------------------------- load


@dataclass
class Checkpoint:
    """A loaded, validated checkpoint: ``meta`` (JSON dict) and ``tensors`` (name -> tensor)."""

    path: Path
    meta: dict
    tensors: dict[str, Tensor] = field(repr=False)

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    @property
    def model_config(self) -> dict:
        return dict(self.meta.get("model_config", {}))

    @property
    def extra(self) -> dict:
        return dict(self.meta.get("extra", {}))

    @property
    def has_ema(self) -> bool:
        return any(k.startswith("ema/") for k in self.tensors)

    def group(self, prefix: str) -> dict[str, Tensor]:
        p = prefix.rstrip("/") + "/"
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}

    def model_state(self, use_ema: bool = False) -> dict[str, Tensor]:
        state = self.group("model")
        if use_ema:
            ema = self.group("ema")
            if not ema:
                raise CheckpointError(f"{self.path}: no EMA weights in this checkpoint")
            state.update(ema)
        return state

    def _fit(self, have: Mapping[str, Tensor], want: Mapping[str, Tensor], what: str) -> None:
        """One-line error unless ``have`` (stored) matches ``want`` (the module's) in names and shapes."""
        missing = sorted(set(want) - set(have))
        unexpected = sorted(set(have) - set(want))
        shapes = [k for k in want if k in have and tuple(have[k].shape) != tuple(want[k].shape)]
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
        if unexpected:
            problems.append(f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
        if shapes:
            k = shapes[0]
            problems.append(f"{k} stored as {tuple(have[k].shape)}, model has {tuple(want[k].shape)}"
                            + (f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""))
        if problems:
            raise CheckpointError(f"{self.path}: {what}: {'; '.join(problems)}")

    def load_model_state(self, model: torch.nn.Module, use_ema: bool = False) -> None:
        state = self.model_state(use_ema)
        self._fit(state, model.state_dict(), "weights do not fit the model")
        with torch.no_grad():
            model.load_state_dict(state, strict=True)

    def build_model(self, use_ema: bool = True, dtype: torch.dtype | None = None):
        """A :class:`DiffFlow` from the stored config with the (EMA, if present) weights.

        The model is first built on the ``meta`` device (no memory) and its weights' names and shapes are
        compared with the stored tensors, so an absurd stored config fails before anything is allocated."""
        from .model import DiffFlow

        cfg = self.model_config
        state = self.model_state(use_ema and self.has_ema)
        try:
            with torch.device("meta"):
                shell = DiffFlow.from_config(cfg)
        except (TypeError, ValueError, KeyError, RuntimeError, NotImplementedError, OverflowError) as e:
            raise CheckpointError(f"{self.path}: invalid model config: {str(e).splitlines()[0][:200]}") from None
        self._fit(state, shell.state_dict(), "weights do not fit the stored model config")
        del shell
        try:
            model = DiffFlow.from_config(cfg)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: invalid model config: {str(e).splitlines()[0][:200]}") from None
        if dtype is None:
            dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        model = model.to(dtype)
        with torch.no_grad():
            model.load_state_dict(state, strict=True)
        return model.eval()

    def restore(
        self,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        ema: Any = None,
        generators: Mapping[str, torch.Generator] | None = None,
        numpy_rngs: Mapping[str, np.random.Generator] | None = None,
        restore_global_rng: bool = True,
    ) -> int:
        """Restore the given objects in place; returns the step counter. Everything is checked against the
        objects before the first one is modified, so a mismatch leaves all of them untouched."""
        p = self.path
        if optimizer is not None:
            opt_state = self._optimizer_state(optimizer)
        if scheduler is not None:
            if "scheduler" not in self.meta:
                raise CheckpointError(f"{p}: no scheduler state in this checkpoint")
            cur, new = scheduler.state_dict(), self.meta["scheduler"]
            if set(cur) != set(new):
                raise CheckpointError(f"{p}: scheduler state does not fit ({type(scheduler).__name__} has fields "
                                      f"{sorted(cur)[:6]}, stored {sorted(new)[:6]})")
            for k in cur:
                if isinstance(cur[k], list) != isinstance(new[k], list) or \
                        (isinstance(cur[k], list) and len(cur[k]) != len(new[k])):
                    raise CheckpointError(f"{p}: scheduler state field {k!r} does not fit")
        if ema is not None:
            if "ema" not in self.meta:
                raise CheckpointError(f"{p}: no EMA state in this checkpoint")
            self._fit(self.group("ema"), ema.state_dict(), "EMA weights do not fit")
        for name, g in (generators or {}).items():
            key = f"rng/gen/{name}"
            if key not in self.tensors:
                raise CheckpointError(f"{p}: no state for generator {name!r}")
            if self.tensors[key].numel() != g.get_state().numel():
                raise CheckpointError(f"{p}: state of generator {name!r} has {self.tensors[key].numel()} bytes, "
                                      f"expected {g.get_state().numel()} (a generator of another device?)")
        states = self.meta.get("rng_numpy", {})
        for name, rng in (numpy_rngs or {}).items():
            if name not in states:
                raise CheckpointError(f"{p}: no state for numpy generator {name!r}")
            if states[name]["bit_generator"] != type(rng.bit_generator).__name__:
                raise CheckpointError(f"{p}: numpy generator {name!r} is stored as {states[name]['bit_generator']}, "
                                      f"got a {type(rng.bit_generator).__name__}")
        if model is not None:
            self._fit(self.group("model"), model.state_dict(), "weights do not fit the model")

        # all checks passed: modify
        if model is not None:
            self.load_model_state(model)
        if optimizer is not None:
            optimizer.load_state_dict(opt_state)
        if scheduler is not None:
            scheduler.load_state_dict(dict(self.meta["scheduler"]))
        if ema is not None:
            ema.load_state_dict(self.group("ema"), self.meta["ema"]["num_updates"])
        for name, g in (generators or {}).items():
            g.set_state(self.tensors[f"rng/gen/{name}"].clone())
        for name, rng in (numpy_rngs or {}).items():
            rng.bit_generator.state = states[name]
        if restore_global_rng and "rng/torch_cpu" in self.tensors:
            torch.set_rng_state(self.tensors["rng/torch_cpu"].clone())
            v, st, gauss = self.meta["rng_python"]
            random.setstate((v, tuple(st), gauss))
            name, key, pos, has_gauss, gauss = self.meta["rng_numpy_global"]
            np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
        return self.step

    def _optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        p = self.path
        if "optimizer" not in self.meta:
            raise CheckpointError(f"{p}: no optimizer state in this checkpoint")
        sd = _optimizer_join(self.meta["optimizer"], self.tensors)
        groups = optimizer.param_groups
        if len(groups) != len(sd["param_groups"]) or any(
                len(g["params"]) != len(s["params"]) for g, s in zip(groups, sd["param_groups"])):
            raise CheckpointError(f"{p}: optimizer state does not fit: stored parameter groups of sizes "
                                  f"{[len(s['params']) for s in sd['param_groups']]}, optimizer has "
                                  f"{[len(g['params']) for g in groups]}")
        params = {pid: q for s, g in zip(sd["param_groups"], groups) for pid, q in zip(s["params"], g["params"])}
        for pid, st in sd["state"].items():
            if pid not in params:
                raise CheckpointError(f"{p}: optimizer state for unknown parameter {pid}")
            for k, v in st.items():
                if isinstance(v, Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(params[pid].shape):
                    raise CheckpointError(f"{p}: optimizer state {k!r} of parameter {pid} has shape "
                                          f"{tuple(v.shape)}, the parameter {tuple(params[pid].shape)}")
        return sd


_PICKLE_HINT = (
    "diffflow only loads safetensors checkpoints; pickle files (torch.save / .pt / .pkl) are refused "
    "because unpickling can execute arbitrary code"
)


def _read_exact(fd: int, n: int, p: Path, what: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, min(n - got, 1 << 24))
        if not b:
            raise CheckpointError(f"{p}: checkpoint is truncated ({what}: expected {n} bytes, got {got})")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _open_regular(p: Path) -> tuple[int, Path, int]:
    """Open ``p`` (or ``p/checkpoint.safetensors``) for reading without blocking; refuse non-regular files."""
    for _ in range(2):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint not found: {p}") from None
        except OSError as e:
            raise CheckpointError(f"cannot read checkpoint {p}: {e.strerror or e}") from None
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            cand = p / "checkpoint.safetensors"
            if not cand.exists():
                raise CheckpointError(f"{p} is a directory without checkpoint.safetensors")
            p = cand
            continue
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                    else "a block device" if stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                    else "not a regular file")
            raise CheckpointError(f"{p}: not a checkpoint file ({kind}); give a checkpoint.safetensors file or run "
                                  "folder")
        return fd, p, st.st_size
    raise CheckpointError(f"{p}/checkpoint.safetensors is a directory, expected a file")


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load and validate a checkpoint (file or run folder); any problem raises :class:`CheckpointError` with a
    one-line reason naming the file. See the module docstring for the order of checks."""
    fd, p, size = _open_regular(Path(path))
    try:
        return _load(fd, p, size)
    finally:
        os.close(fd)


def _load(fd: int, p: Path, size: int) -> Checkpoint:
    head = _read_exact(fd, min(size, 9), p, "header length")
    # A safetensors file starts with the little-endian length of its JSON header, then "{". Only a file that
    # does not look like that is sniffed for pickle / zip (torch.save) signatures: the first length byte of a
    # valid checkpoint can itself be 0x80, the pickle protocol marker.
    n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
    safetensors_like = n is not None and n <= MAX_HEADER_BYTES and head[8:9] == b"{"
    if not safetensors_like and (
        head[:1] == b"\x80" or head[:2] == b"PK" or p.suffix in (".pt", ".pth", ".pkl", ".pickle")
    ):
        raise CheckpointError(f"{p}: refusing to load: {_PICKLE_HINT}")
    if n is None or len(head) < 9:
        raise CheckpointError(f"{p}: checkpoint is truncated or empty ({size} bytes)")
    if n > MAX_HEADER_BYTES or head[8:9] != b"{":
        raise CheckpointError(f"{p}: not a safetensors checkpoint (bad header); {_PICKLE_HINT}")
    if n > size - 8:
        raise CheckpointError(f"{p}: checkpoint is truncated (header says {n} header bytes, file has {size} bytes)")
    raw = head[8:] + _read_exact(fd, n - 1, p, "header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{p}: not a safetensors checkpoint (unreadable header); {_PICKLE_HINT}") from None
    except RecursionError:
        raise CheckpointError(f"{p}: checkpoint header is nested too deeply") from None
    md = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(md, dict) or md.get("format") != FORMAT:
        tag = md.get("format") if isinstance(md, dict) else None
        raise CheckpointError(f"{p}: not a diffflow_ext checkpoint (format tag {_show(tag)})")
    if md.get("version") != str(VERSION):
        hint = " (written by an older diffflow_ext whose checksum did not cover the metadata)" \
            if md.get("version") == "1" else ""
        raise CheckpointError(f"{p}: unsupported checkpoint version {_show(md.get('version'))}, expected "
                              f"{VERSION}{hint}")
    data_len = size - 8 - n
    try:
        md, entries = _check_header(header, data_len)
        unknown = sorted(set(md) - {"format", "version", "sha256", "meta"})
        if unknown or not isinstance(md.get("sha256"), str) or "meta" not in md:
            raise _Bad("__metadata__ must hold exactly format, version, sha256 and meta")
    except _Bad as e:
        raise CheckpointError(f"{p}: checkpoint header is invalid: {e}") from None
    avail = mem_available()
    if avail is not None and data_len > avail:
        raise CheckpointError(f"{p}: the checkpoint's tensors need {fmt_bytes(data_len)}, only "
                              f"{fmt_bytes(avail)} of memory is available")

    tensors: dict[str, Tensor] = {}
    digests = []
    for name, code, shape, a, b in entries:
        t = torch.empty(shape, dtype=_ST_DTYPES[code])
        if b > a:
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            got = 0
            while got < b - a:
                k = os.readv(fd, [buf[got:]])
                if k <= 0:
                    raise CheckpointError(f"{p}: checkpoint is truncated (file shrank while reading)")
                got += k
            sub = hashlib.sha256(buf).hexdigest()
        else:
            sub = hashlib.sha256(b"").hexdigest()
        tensors[name] = t
        digests.append((name, code, shape, sub))
    if _digest_entries(md, digests) != md["sha256"]:
        raise CheckpointError(f"{p}: checkpoint is corrupt or was modified (checksum mismatch)")
    try:
        meta = json.loads(md["meta"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: checkpoint metadata is unreadable ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{p}: checkpoint metadata is nested too deeply") from None
    try:
        _validate(meta, {k: (code, shape) for k, code, shape, _ in digests})
    except _Bad as e:
        raise CheckpointError(f"{p}: invalid checkpoint metadata: {e}") from None
    return Checkpoint(p, meta, tensors)
