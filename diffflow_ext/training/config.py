"""Training configuration: :class:`TrainConfig` (every option of ``diffflow train``) and its validation.

The lowest layer of :mod:`diffflow_ext.training`: imports nothing from the trainer. Each field is one
option; ``__post_init__`` checks every value and reports all problems in one ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model import GRADIENT_MODES

__all__ = ["TrainConfig", "parse_progressive", "DTYPES", "PRECISIONS", "DEVICE_PATTERN"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: mixed-precision modes: the networks run under ``torch.autocast`` in this dtype; states stay float32
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:K``
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass
class TrainConfig:
    """All training options (the CLI flags of ``diffflow train``); JSON-able, stored in checkpoints."""

    data: str = "checkerboard"
    out: str | None = None
    # model / SDE
    num_steps: int = 30
    progressive: str | None = "10:30:800"  # "START:END[:WARMUP]"; None: fixed num_steps
    grid: str = "fixed"
    diffusion: float = 0.2
    t_start: float = 1e-3
    t_end: float = 0.05
    time_exponent: float = 0.9
    hidden: int = 64
    depth: int = 3
    time_dim: int = 32
    gradient: str = "adjoint"
    backend: str = "auto"
    dtype: str = "float32"
    precision: str = "fp32"
    memory_budget: float | None = None
    device: str = "auto"
    # optimisation
    batch_size: int = 1024
    iters: int = 2000
    lr: float = 5e-3
    lr_decay: float = 0.95
    lr_decay_every: int = 100
    ema: float = 0.995
    clip: float = 1.0
    seed: int = 0
    shards: int = 1
    holdout: float = 0.1
    # evaluation / output
    eval_every: int = 500
    eval_samples: int = 2000
    final_samples: int = 5000
    final_ode: int = 500
    eval_lam: float = 0.5
    ckpt_every: int = 0
    eval_seed: int = 1234
    log_every: int = 50
    tensorboard: bool = False

    def __post_init__(self) -> None:
        errs = []
        for k in ("num_steps", "hidden", "depth", "batch_size", "shards", "time_dim", "eval_samples", "final_samples",
                  "log_every"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                errs.append(f"{k} must be a positive integer, got {v!r}")
        for k in ("iters", "eval_every", "ckpt_every", "lr_decay_every", "final_ode"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                errs.append(f"{k} must be a non-negative integer, got {v!r}")
        if not self.lr > 0:
            errs.append(f"lr must be > 0, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            errs.append(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if not 0 <= self.ema < 1:
            errs.append(f"ema must be in [0, 1) (0 disables), got {self.ema}")
        if not self.clip >= 0:
            errs.append(f"clip must be >= 0 (0 disables), got {self.clip}")
        if not self.diffusion > 0:
            errs.append(f"diffusion (g) must be > 0, got {self.diffusion}")
        if not self.eval_lam >= 0:
            errs.append(f"eval_lam must be >= 0, got {self.eval_lam}")
        if not 0 <= self.holdout < 1:
            errs.append(f"holdout must be in [0, 1), got {self.holdout}")
        if self.grid not in ("fixed", "flexible"):
            errs.append(f"grid must be 'fixed' or 'flexible', got {self.grid!r}")
        if self.gradient not in GRADIENT_MODES:
            errs.append(f"gradient must be one of {list(GRADIENT_MODES)}, got {self.gradient!r}")
        if self.dtype not in DTYPES:
            errs.append(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.precision not in PRECISIONS:
            errs.append(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.precision != "fp32" and self.dtype != "float32":
            errs.append(f"precision {self.precision!r} needs dtype 'float32' (the states), got {self.dtype!r}")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.match(self.device):
            errs.append(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:K', got {self.device!r}")
        if self.memory_budget is not None and not (self.memory_budget > 0 and math.isfinite(self.memory_budget)):
            errs.append(f"memory_budget must be > 0 (bytes, or a fraction in (0, 1] of free memory), "
                        f"got {self.memory_budget!r}")
        if self.batch_size % self.shards:
            errs.append(f"batch_size ({self.batch_size}) must be divisible by shards ({self.shards})")
        if isinstance(self.progressive, str) and self.progressive.strip().lower() in ("", "none", "off"):
            self.progressive = None
        if self.progressive is not None:
            try:
                parse_progressive(self.progressive)
            except ValueError as e:
                errs.append(str(e))
        if errs:
            raise ValueError("invalid training options: " + "; ".join(errs))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def steps_schedule(self) -> Callable[[int], int]:
        if self.progressive is None:
            return lambda it: self.num_steps
        from ..schedules import ProgressiveSteps

        start, end, warm = parse_progressive(self.progressive)
        return ProgressiveSteps(start=start, end=end, warmup_iters=warm)

    def max_steps(self) -> int:
        return parse_progressive(self.progressive)[1] if self.progressive else self.num_steps


def parse_progressive(spec: str) -> tuple[int, int, int]:
    """``"START:END[:WARMUP]"`` -> (start, end, warmup_iters); warm-up defaults to 1000 iterations."""
    parts = str(spec).split(":")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) not in (2, 3) or vals[0] < 1 or vals[1] < vals[0] or (len(vals) == 3 and vals[2] < 0):
        raise ValueError(
            f"progressive must look like START:END or START:END:WARMUP_ITERS with 1 <= START <= END, got {spec!r}")
    return vals[0], vals[1], vals[2] if len(vals) == 3 else 1000
