"""Safe, atomic training checkpoints (one safetensors file: tensors + JSON metadata).

Layout of ``checkpoint.safetensors``:

* tensors: ``model/<name>``, ``ema/<name>`` (EMA weights), ``optim/<param index>/<key>`` (optimizer
  state), ``rng/torch_cpu`` (global torch CPU RNG), ``rng/gen/<name>`` (``torch.Generator`` states,
  e.g. the per-shard noise streams);
* header metadata (strings): ``format`` = ``diffflow_ext.checkpoint``, ``version``, ``sha256`` of the
  tensor payload, and ``meta``: JSON with the model config, step counter, optimizer param groups,
  scheduler state, numpy / python RNG states and any ``extra`` (training config, data standardisation).

Loading never unpickles anything: pickle / ``torch.save`` files are refused with :class:`CheckpointError`
(unpickling can run arbitrary code), as are truncated, corrupt or foreign files. Saving writes a
temporary file in the target directory, fsyncs it and ``os.replace``-s it, so a crash never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "EMA",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write_bytes",
    "atomic_write_text",
    "FORMAT",
    "VERSION",
]

FORMAT = "diffflow_ext.checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be (safely) saved or loaded; the message says why."""


# ----------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a module's floating parameters.

    ``decay_t = min(decay, (1 + t) / (10 + t))`` (the usual warm-up), updated after each optimizer step.
    """

    def __init__(self, module: torch.nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            k: p.detach().clone() for k, p in module.named_parameters() if p.dtype.is_floating_point
        }

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for k, p in module.named_parameters():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(p.detach(), alpha=1.0 - d)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor], num_updates: int) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise CheckpointError(f"EMA state lacks parameters: {sorted(missing)}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])
        self.num_updates = int(num_updates)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for k, p in module.named_parameters():
            if k in self.shadow:
                p.copy_(self.shadow[k])


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


def _payload_digest(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
    ema: EMA | None = None,
    step: int = 0,
    generators: Mapping[str, torch.Generator | Tensor] | None = None,
    numpy_rngs: Mapping[str, np.random.Generator] | None = None,
    save_global_rng: bool = True,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint atomically; returns its path. ``generators`` values may be generators or states."""
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

    header = {
        "format": FORMAT,
        "version": str(VERSION),
        "sha256": _payload_digest(tensors),
        "meta": json.dumps(meta, allow_nan=True),
    }
    try:
        blob = st_save(tensors, metadata=header)
    except Exception as e:  # pragma: no cover - defensive
        raise CheckpointError(f"cannot serialise checkpoint: {e}") from e
    return atomic_write_bytes(path, blob)


# ----------------------------------------------------------------------------- load


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``meta`` (JSON dict) and ``tensors`` (name -> tensor)."""

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

    def load_model_state(self, model: torch.nn.Module, use_ema: bool = False) -> None:
        state = self.model_state(use_ema)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{self.path}: weights do not fit the model: {e}") from None

    def build_model(self, use_ema: bool = True, dtype: torch.dtype | None = None):
        """A :class:`DiffFlow` from the stored config with the (EMA, if present) weights."""
        from .model import DiffFlow

        try:
            model = DiffFlow.from_config(self.model_config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: invalid model config {self.model_config}: {e}") from None
        state = self.model_state(use_ema and self.has_ema)
        if dtype is None:
            dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        model = model.to(dtype)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{self.path}: weights do not fit the model config: {e}") from None
        return model.eval()

    def restore(
        self,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        ema: EMA | None = None,
        generators: Mapping[str, torch.Generator] | None = None,
        numpy_rngs: Mapping[str, np.random.Generator] | None = None,
        restore_global_rng: bool = True,
    ) -> int:
        """Restore the given objects in place; returns the step counter."""
        if model is not None:
            self.load_model_state(model)
        if optimizer is not None:
            if "optimizer" not in self.meta:
                raise CheckpointError(f"{self.path}: no optimizer state in this checkpoint")
            try:
                optimizer.load_state_dict(_optimizer_join(self.meta["optimizer"], self.tensors))
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"{self.path}: optimizer state does not fit: {e}") from None
        if scheduler is not None:
            if "scheduler" not in self.meta:
                raise CheckpointError(f"{self.path}: no scheduler state in this checkpoint")
            scheduler.load_state_dict(self.meta["scheduler"])
        if ema is not None:
            if "ema" not in self.meta:
                raise CheckpointError(f"{self.path}: no EMA state in this checkpoint")
            ema.load_state_dict(self.group("ema"), self.meta["ema"]["num_updates"])
        for name, g in (generators or {}).items():
            key = f"rng/gen/{name}"
            if key not in self.tensors:
                raise CheckpointError(f"{self.path}: no state for generator {name!r}")
            g.set_state(self.tensors[key].clone())
        for name, rng in (numpy_rngs or {}).items():
            states = self.meta.get("rng_numpy", {})
            if name not in states:
                raise CheckpointError(f"{self.path}: no state for numpy generator {name!r}")
            rng.bit_generator.state = states[name]
        if restore_global_rng and "rng/torch_cpu" in self.tensors:
            torch.set_rng_state(self.tensors["rng/torch_cpu"].clone())
            v, st, gauss = self.meta["rng_python"]
            random.setstate((v, tuple(st), gauss))
            name, key, pos, has_gauss, gauss = self.meta["rng_numpy_global"]
            np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
        return self.step


_PICKLE_HINT = (
    "diffflow only loads safetensors checkpoints; pickle files (torch.save / .pt / .pkl) are refused "
    "because unpickling can execute arbitrary code"
)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load and validate a checkpoint; any problem raises :class:`CheckpointError` with the reason."""
    p = Path(path)
    if p.is_dir():
        cand = p / "checkpoint.safetensors"
        if not cand.is_file():
            raise CheckpointError(f"{p} is a directory without checkpoint.safetensors")
        p = cand
    try:
        blob = p.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {p}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {p}: {e}") from None
    # A safetensors file starts with the little-endian length of its JSON header, then "{". Only a file that
    # does not look like that is sniffed for pickle / zip (torch.save) signatures: the first length byte of a
    # valid checkpoint can itself be 0x80, the pickle protocol marker.
    n = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else None
    safetensors_like = n is not None and n < 100_000_000 and blob[8:9] == b"{"
    if not safetensors_like and (
        blob[:1] == b"\x80" or blob[:2] == b"PK" or p.suffix in (".pt", ".pth", ".pkl", ".pickle")
    ):
        raise CheckpointError(f"{p}: refusing to load: {_PICKLE_HINT}")
    if n is None:
        raise CheckpointError(f"{p}: checkpoint is truncated or empty ({len(blob)} bytes)")
    if n > len(blob) - 8:
        raise CheckpointError(
            f"{p}: checkpoint is truncated (header says {n} header bytes, file has {len(blob)} bytes)"
            if n < 100_000_000
            else f"{p}: not a safetensors checkpoint (bad header); {_PICKLE_HINT}"
        )
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
        md = header.get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise CheckpointError(f"{p}: not a safetensors checkpoint (unreadable header); {_PICKLE_HINT}") from None
    if md.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a diffflow_ext checkpoint (format tag {md.get('format')!r})")
    try:
        version = int(md.get("version", "0"))
    except ValueError:
        version = -1
    if version != VERSION:
        raise CheckpointError(f"{p}: unsupported checkpoint version {md.get('version')!r} (expected {VERSION})")
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(blob)
    except Exception as e:
        raise CheckpointError(f"{p}: checkpoint is truncated or corrupt ({e})") from None
    if _payload_digest(tensors) != md.get("sha256"):
        raise CheckpointError(f"{p}: checkpoint is corrupt (tensor checksum mismatch)")
    try:
        meta = json.loads(md["meta"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: checkpoint metadata is unreadable ({e})") from None
    return Checkpoint(p, meta, tensors)
