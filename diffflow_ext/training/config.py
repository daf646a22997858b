"""Training configuration: :class:`TrainConfig` (every option of ``diffflow train``), its validation and
the per-data-kind presets.

The lowest layer of :mod:`diffflow_ext.training`: imports nothing from the trainer. Each field is one
option and carries its command-line description in ``field.metadata`` (flags, help, choices taken from the
library's own constants, bounds, group, whether it may change on ``--resume``); :mod:`diffflow_ext.cli`
builds ``diffflow train`` from it, so nothing is restated by hand. Validation reports every problem at once
in a :class:`ConfigError` whose issues name the fields involved (the CLI turns them into the flags the user
typed).

Defaults come in four layers: the dataclass defaults < ``PRESETS[kind]`` for the kind of data
(``"points"``: 2-D toys and point files, ``"tabular"``, ``"image"``) < ``SOURCE_PRESETS[name]`` for one
registered data source < what the user set (:func:`resolve_config`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import GRADIENT_MODES
from ..ops.backends import BACKENDS
from ..priors import PRIORS
from ..schedules import GRIDS

__all__ = [
    "TrainConfig", "ConfigError", "Issue", "Range", "PRESETS", "SOURCE_PRESETS", "DATA_KINDS", "resolve_config",
    "resume_config", "parse_progressive", "parse_memory_budget", "LR_SCHEDULES", "DTYPES", "PRECISIONS",
    "DEVICE_PATTERN", "MAX_NUM_STEPS", "option_fields", "resumable_fields", "GROUPS", "parse_device",
    "parse_key_value", "check_field", "path_problem",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: mixed-precision modes: the networks run under ``torch.autocast`` in this dtype; states stay float32
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:K``
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
#: the largest number of SDE steps a run may use (the adjoint keeps N+1 states; the paper uses N <= 100)
MAX_NUM_STEPS = 10_000
DATA_KINDS = ("points", "tabular", "image")
#: learning-rate schedules: step (x --lr-decay every --lr-decay-every iterations), cosine (to 0 at --iters), constant
LR_SCHEDULES = ("step", "cosine", "constant")

_MAX_SEED = 2**32 - 1
_MAX_COUNT = 10**9


# ----------------------------------------------------------------------------- option metadata


@dataclass(frozen=True)
class Range:
    """A numeric range; ``integer`` ranges hold ints only, every range holds finite numbers only."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def contains(self, v: object) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.integer and not isinstance(v, int):
            return False
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self) -> str:
        what = "an integer" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"{what} in {left}{_num(self.lo)}, {_num(self.hi)}{right}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {_num(self.hi)}"
        return what


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _int(lo: int, hi: int = _MAX_COUNT) -> Range:
    return Range(lo, hi, integer=True)


def option(default: Any, help: str, *, flags: Sequence[str] = (), choices: Callable[[], Sequence[str]] | None = None,
           range: Range | None = None, group: str = "model / SDE", resume: bool = False, metavar: str | None = None,
           parse: Callable[[str], Any] | None = None, nullable: bool = False, cli: bool = True,
           check: Callable[[Any], str | None] | None = None):
    """A config field with its command-line description.

    ``flags``: extra option strings besides ``--field-name`` (e.g. ``("-b",)``); ``choices``: a callable
    returning the valid values (evaluated late, so registries can grow); ``range``: numeric bounds;
    ``resume``: may differ from the checkpoint's value on ``--resume``; ``parse``: text -> value for the CLI;
    ``nullable``: ``None`` is valid (typed as ``none``); ``check``: value -> what was expected (a phrase) when the
    value is invalid, else None (for values that a range or choices cannot describe).
    """
    if isinstance(default, (dict, list)):
        factory = type(default)
        kw = {"default_factory": lambda: factory(default)}
    else:
        kw = {"default": default}
    meta = {"help": help, "flags": tuple(flags), "choices": choices, "range": range, "group": group,
            "resume": resume, "metavar": metavar, "parse": parse, "nullable": nullable, "cli": cli, "check": check}
    return field(metadata=meta, **kw)


def option_fields(cls: type = None) -> list[dataclasses.Field]:
    """The fields of ``cls`` (default :class:`TrainConfig`) that are options."""
    return [f for f in dataclasses.fields(cls or TrainConfig) if "help" in f.metadata]


@dataclass(frozen=True)
class Issue:
    """One problem with a configuration: the fields involved and a message in which ``{field}`` placeholders
    stand for how each field is named (the field name in Python, the flag the user typed on the CLI)."""

    fields: tuple[str, ...]
    text: str

    def format(self, name: Callable[[str], str] = str) -> str:
        text = self.text  # plain replacement: values quoted in the text may hold braces
        for f in self.fields:
            text = text.replace("{" + f + "}", name(f))
        return text


class ConfigError(ValueError):
    """Invalid options; ``issues`` lists every problem found."""

    def __init__(self, issues: Sequence[Issue], prefix: str = "invalid training options"):
        self.issues, self.prefix = list(issues), prefix
        super().__init__(self.format())

    def format(self, name: Callable[[str], str] = str) -> str:
        return f"{self.prefix}: " + "; ".join(i.format(name) for i in self.issues)


def check_field(f: dataclasses.Field, value: Any) -> Issue | None:
    """The issue with ``value`` for field ``f`` (bounds, choices), or None."""
    m = f.metadata
    if value is None:
        return None if m.get("nullable") else Issue((f.name,), f"{{{f.name}}}: a value is required")
    if m.get("choices") is not None:
        valid = tuple(m["choices"]())
        if value not in valid:
            return Issue((f.name,), f"{{{f.name}}}: expected one of {', '.join(map(str, valid))}, got {value!r}")
    if m.get("range") is not None and not m["range"].contains(value):
        return Issue((f.name,), f"{{{f.name}}}: expected {m['range'].describe()}, got {value!r}")
    if m.get("check") is not None and (expected := m["check"](value)) is not None:
        return Issue((f.name,), f"{{{f.name}}}: expected {expected}, got {value!r}")
    return None


# ----------------------------------------------------------------------------- parsers of textual values


def parse_progressive(spec: str) -> tuple[int, int, int]:
    """``"START:END[:WARMUP]"`` -> (start, end, warmup_iters); warm-up defaults to 1000 iterations."""
    parts = str(spec).split(":")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        vals = []
    if (len(vals) not in (2, 3) or vals[0] < 1 or vals[1] < vals[0] or vals[1] > MAX_NUM_STEPS
            or (len(vals) == 3 and not 0 <= vals[2] <= _MAX_COUNT)):
        raise ValueError(f"progressive: expected START:END or START:END:WARMUP_ITERS with 1 <= START <= END <= "
                         f"{MAX_NUM_STEPS}, or none, got {spec!r}")
    return vals[0], vals[1], vals[2] if len(vals) == 3 else 1000


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory_budget(text: str) -> float:
    """``"0.5"`` (a fraction of free memory), ``"4e9"``, ``"512MB"``, ``"2GiB"`` (bytes) -> a float."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    try:
        value = float(m.group(1)) * _UNITS[unit] if m and unit in _UNITS else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (0 < value <= 1 or 2**20 <= value <= 2**60)) or (unit and value < 2**20):
        raise ValueError(f"memory_budget: expected bytes (at least 1MiB, e.g. 2GiB, 512MB, 4e9) or a fraction in "
                         f"(0, 1] of free memory, got {text!r}")
    return value


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot name a file on this system (a NUL byte, a name or path too long), or None."""
    if "\x00" in path:
        return "contains a NUL character"
    limit = 255
    try:
        limit = os.pathconf("/", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        pass
    longest = max((len(part.encode("utf-8", "surrogateescape")) for part in re.split(r"[\\/]", path)), default=0)
    if longest > limit:
        return f"a name in the path is {longest} bytes long; this file system allows {limit}"
    if len(path.encode("utf-8", "surrogateescape")) > 4000:
        return "the path is longer than 4000 bytes"
    return None


def parse_device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:K`` (checked against the machine when the run starts)."""
    s = str(text).strip().lower()
    if not DEVICE_PATTERN.match(s):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:K, got {text!r}")
    return s


_G_RANGE = Range(0, 1e3, lo_open=True)
_G_EXPECTED = (f"g as {_G_RANGE.describe()}, or START:END (g at --t-start and at --t-end, geometric in t between; "
               "each in (0, 1000])")


def check_diffusion(value: Any) -> str | None:
    """None when ``value`` is a valid g (a number, or ``{"start": g0, "end": g1}``), else what is expected."""
    if isinstance(value, dict):
        ok = set(value) == {"start", "end"} and all(_G_RANGE.contains(v) for v in value.values())
    else:
        ok = _G_RANGE.contains(value)
    return None if ok else _G_EXPECTED


def parse_diffusion(text: str) -> float | dict:
    """``"0.2"`` -> 0.2 (constant g); ``"0.2:1"`` -> ``{"start": 0.2, "end": 1.0}`` (geometric in t)."""
    parts = str(text).split(":")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        vals = []
    value = vals[0] if len(vals) == 1 else {"start": vals[0], "end": vals[1]} if len(vals) == 2 else None
    if value is None or check_diffusion(value) is not None:
        raise ValueError(f"diffusion: expected {_G_EXPECTED}, got {text!r}")
    return value


def _parse_optional_str(text: str) -> str | None:
    return None if str(text).strip().lower() == "none" else str(text)


# ----------------------------------------------------------------------------- the config

_D, _M, _O, _E = "data", "model / SDE", "optimisation", "evaluation / output"
#: the order of the option groups in ``diffflow train --help``
GROUPS = (_D, _M, _O, _E)


def _network_names() -> Sequence[str]:
    from ..networks import network_names

    return network_names()


def parse_key_value(text: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` -> (key, value); the value is read as JSON when it is valid JSON (numbers, true/false,
    null, lists), else taken as a string (``pad_to=32`` -> 32, ``layout=nchw`` -> "nchw")."""
    key, sep, raw = str(text).partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise ValueError(f"expected KEY=VALUE with KEY a name, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite value for {key}, got {raw!r}")
    return key, value


def _data_sources() -> Sequence[str]:
    return ()


@dataclass
class TrainConfig:
    """All training options (the flags of ``diffflow train``); JSON-able, stored in checkpoints."""

    data: str = option("checkerboard", "data source name or a file/folder", cli=False, group=_D)
    data_dir: str | None = option(None, "folder holding the files of a named data source (mnist, cifar10, power, "
                                        "...); nothing is ever downloaded", nullable=True, metavar="DIR", group=_D,
                                  resume=True)
    data_options: dict = option({}, "an option of the data source, e.g. pad_to=32 (mnist), levels=16 (arrays); "
                                     "repeatable", flags=("--data-option",), metavar="KEY=VALUE", group=_D,
                                parse=parse_key_value)
    holdout: float = option(0.1, "held-out fraction of a point file (the test split)", group=_D,
                            range=Range(0, 1, hi_open=True))
    out: str | None = option(None, "output folder (default: runs/<data>[-k])", group=_E, resume=True, nullable=True,
                             metavar="DIR")
    # model / SDE
    num_steps: int = option(30, "fixed number of SDE steps N (turns the progressive schedule off)", flags=("-N",),
                            range=_int(1, MAX_NUM_STEPS))
    progressive: str | None = option(
        "10:30:800", "progressive N, rising from START to END over WARMUP iterations (default 1000); none: fixed N",
        metavar="START:END[:WARMUP]", nullable=True, parse=_parse_optional_str)
    grid: str = option("fixed", "time grid of training (flexible: interior points redrawn every batch)",
                       choices=lambda: GRIDS)
    diffusion: float | dict = option(
        0.2, "diffusion coefficient g: a number, or START:END for g rising geometrically in t "
        "from START at --t-start to END at --t-end", flags=("--g",), parse=parse_diffusion, check=check_diffusion,
        metavar="G|START:END")
    t_start: float = option(1e-3, "first time of the grid", range=Range(0, 1e3, lo_open=True))
    t_end: float = option(0.05, "last time of the grid (> --t-start)", range=Range(0, 1e3, lo_open=True))
    time_exponent: float = option(0.9, "grid exponent e: linspace(t_start^e, t_end^e)^(1/e)",
                                  range=Range(0, 100, lo_open=True))
    prior_std: float = option(1.0, "standard deviation of the Gaussian prior p_B(x_N) (model space; the initial "
                                   "one with --prior learned)", range=Range(0, 1e3, lo_open=True))
    prior: str = option("fixed", "prior p_B(x_N): fixed N(0, prior_std^2 I), or learned (a mean and a log-std per "
                                 "dimension, trained with the networks)", choices=lambda: PRIORS)
    network: str = option("mlp", "network of the drift and the score (a registered name)", choices=_network_names)
    network_options: dict = option({}, "an argument of the network, e.g. base_width=32 (see the network's "
                                        "docs); repeatable", flags=("--network-option",), metavar="KEY=VALUE",
                                   parse=parse_key_value)
    hidden: int = option(64, "MLP width (--network mlp)", flags=("--width",), range=_int(1, 65536))
    depth: int = option(3, "MLP hidden layers (--network mlp)", range=_int(1, 64))
    time_dim: int = option(32, "width of the MLP's sinusoidal time embedding (--network mlp)", range=_int(2, 4096))
    gradient: str = option("auto", "how gradients are computed (auto: keep the network graphs that fit in "
                                   "--memory-budget, recompute the rest)", choices=lambda: GRADIENT_MODES)
    backend: str = option("auto", "step-op backend (see diffflow_ext.available_backends())", choices=lambda: BACKENDS)
    dtype: str = option("float32", "dtype of the model and the states", choices=lambda: tuple(DTYPES))
    precision: str = option("fp32", "mixed precision of the networks (states and step ops stay float32)",
                            choices=lambda: tuple(PRECISIONS))
    memory_budget: float | None = option(
        None, "memory for the gradient computation: bytes (2GiB, 512MB) or a fraction in (0, 1] of free memory",
        nullable=True, parse=parse_memory_budget, metavar="BYTES|FRACTION")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:K", resume=True,
                         metavar="DEVICE", parse=parse_device)
    # optimisation
    batch_size: int = option(1024, "global batch size", flags=("-b",), group=_O, range=_int(1, 2**24))
    iters: int = option(2000, "total training iterations (on --resume: the new total)", group=_O, resume=True,
                        range=_int(1))
    lr: float = option(5e-3, "learning rate (Adam)", group=_O, range=Range(0, 10, lo_open=True))
    lr_schedule: str = option("step", "learning-rate schedule after the warm-up (step: x --lr-decay every "
                                      "--lr-decay-every iterations; cosine: to 0 at --iters; constant)", group=_O,
                              choices=lambda: LR_SCHEDULES)
    lr_warmup: int = option(0, "iterations of linear learning-rate warm-up (0: none)", group=_O, range=_int(0))
    lr_decay: float = option(0.95, "step decay factor of the learning rate (--lr-schedule step)", group=_O,
                             range=Range(0, 1, lo_open=True))
    lr_decay_every: int = option(100, "iterations between decays (--lr-schedule step; 0: off)", group=_O,
                                 range=_int(0))
    ema: float = option(0.995, "EMA decay of the weights (0: off)", group=_O, range=Range(0, 1, hi_open=True))
    clip: float = option(1.0, "gradient-norm clipping (0: off)", group=_O, range=Range(0, 1e12))
    seed: int = option(0, "seed of the data stream, the noise and the initialisation", group=_O,
                       range=_int(0, _MAX_SEED))
    shards: int = option(1, "noise streams the batch is split into (default: number of processes); equal shards "
                            "make runs with different process counts identical", group=_O, range=_int(1, 65536))
    # evaluation / output
    eval_every: int = option(500, "iterations between evaluations (0: off)", group=_E, resume=True, range=_int(0))
    eval_samples: int = option(2000, "model samples per evaluation", group=_E, resume=True, range=_int(1, 10**7))
    final_samples: int = option(5000, "samples for the final evaluation", group=_E, resume=True, range=_int(1, 10**7))
    final_ode: int = option(500, "held-out points for the final ODE log-likelihood (0: skip)", group=_E, resume=True,
                            range=_int(0, 10**7))
    eval_lam: float = option(
        0.5, "lambda of the sampler used by evaluations, pictures and 'diffflow sample' (1: DiffFlow's backward SDE, "
             "0: probability-flow ODE)", group=_E, resume=True, range=Range(0, 100))
    ckpt_every: int = option(0, "iterations between checkpoints (0: at the end only)", group=_E, resume=True,
                             range=_int(0))
    eval_seed: int = option(1234, "seed of the evaluations", group=_E, resume=True, range=_int(0, _MAX_SEED))
    log_every: int = option(50, "iterations between records in log.jsonl", group=_E, resume=True, range=_int(1))
    tensorboard: bool = option(False, "also write TensorBoard scalars (needs the tensorboard package)", group=_E,
                               resume=True)
    keep_best: bool = option(False, "early stopping: keep the (EMA) weights of the periodic evaluation with the lowest "
                                    "validation -ELBO in best.safetensors; the final evaluation and pictures use them "
                                    "(needs --eval-every and a data source with a validation split)", group=_E,
                             resume=True)
    patience: int = option(0, "with --keep-best: stop after this many periodic evaluations without a lower validation "
                              "-ELBO (0: train all --iters)", group=_E, resume=True, range=_int(0))

    def __post_init__(self) -> None:
        if isinstance(self.progressive, str):
            self.progressive = _parse_optional_str(self.progressive)
        issues = self.issues()
        if issues:
            raise ConfigError(issues)

    def issues(self) -> list[Issue]:
        """Every problem with this configuration (empty when valid)."""
        out = [i for f in option_fields(type(self)) if (i := check_field(f, getattr(self, f.name))) is not None]
        bad = {n for i in out for n in i.fields}
        if not isinstance(self.device, str) or not DEVICE_PATTERN.match(self.device):
            out.append(Issue(("device",), f"{{device}}: expected auto, cpu, cuda or cuda:K, got {self.device!r}"))
        if self.memory_budget is not None:
            try:
                parse_memory_budget(str(float(self.memory_budget)))
            except (TypeError, ValueError) as e:
                out.append(Issue(("memory_budget",), "{memory_budget}" + str(e)[len("memory_budget"):]))
        for k in ("data", "out", "data_dir"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                out.append(Issue((k,), f"{{{k}}}: expected a non-empty path or name, got {v!r}"))
            elif isinstance(v, str) and (problem := path_problem(v)):
                out.append(Issue((k,), f"{{{k}}}: {problem}"))
        if "time_dim" not in bad and self.time_dim % 2:
            out.append(Issue(("time_dim",), f"{{time_dim}}: expected an even integer (sine and cosine halves), got "
                                            f"{self.time_dim}"))
        for k in ("data_options", "network_options"):
            v = getattr(self, k)
            if not isinstance(v, dict) or not all(isinstance(x, str) and x.isidentifier() for x in v):
                out.append(Issue((k,), f"{{{k}}}: expected a dict of name -> value, got {v!r}"))
        if self.network != "mlp" and "network" not in bad:
            mlp_only = [k for k in ("hidden", "depth", "time_dim") if getattr(self, k) != _DEFAULTS[k]]
            if mlp_only:
                out.append(Issue(("network", *mlp_only), f"{', '.join('{' + k + '}' for k in mlp_only)} set the MLP's "
                                 f"size, but {{network}} is {self.network}; use --network-option"))
        if not bad & {"batch_size", "shards"} and self.batch_size % self.shards:
            out.append(Issue(("batch_size", "shards"),
                             f"{{batch_size}} ({self.batch_size}) must be divisible by {{shards}} ({self.shards})"))
        if not bad & {"t_start", "t_end"} and not self.t_start < self.t_end:
            out.append(Issue(("t_start", "t_end"), f"{{t_start}} ({self.t_start}) must be < {{t_end}} ({self.t_end})"))
        if not bad & {"precision", "dtype"} and self.precision != "fp32" and self.dtype != "float32":
            out.append(Issue(("precision", "dtype"),
                             f"{{precision}} {self.precision} needs {{dtype}} float32 (the states), got {self.dtype}"))
        if self.keep_best and not self.eval_every and "eval_every" not in bad:
            out.append(Issue(("keep_best", "eval_every"), "{keep_best} compares the periodic evaluations: it needs "
                                                           "{eval_every} > 0"))
        if self.patience and not self.keep_best and "patience" not in bad:
            out.append(Issue(("patience", "keep_best"), f"{{patience}} {self.patience} stops at the best evaluation: "
                                                        "it needs {keep_best}"))
        if self.progressive is not None and "progressive" not in bad:
            try:
                parse_progressive(self.progressive)
            except ValueError as e:
                out.append(Issue(("progressive",), "{progressive}" + str(e)[len("progressive"):]))
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainConfig:
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


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}

# ----------------------------------------------------------------------------- presets per kind of data

#: Defaults per kind of data, over the dataclass defaults (field name -> value). Q owns the "points" values,
#: U the "image" values; keys must be TrainConfig fields (checked at import).
PRESETS: dict[str, dict[str, Any]] = {
    # chosen on tuning sets of the generated sharp family (docs/quality_2d.md, "Tuning"): g rising from 0.2 at the
    # data to 1 at T (sharp edges near the data, a mixing forward process that leaves the zero-drift saddle),
    # lr 2e-2 with a cosine schedule; Fourier features of x in the MLPs (6 frequencies 1..32 along 4 directions: thin
    # strokes and small holes, session 14), 2400 iterations (the CPU time of the former 3000 without them, ~210 CPU-s).
    # Session 15: the features' projection is trained (x_learn) and samples come from the backward SDE (lam 1, which
    # beat the probability-flow ODE on all five tuning sets with the features): +6.0 points in support on the
    # fine_grid analogue, +0.6..+2.8 on four other tuning sets.
    # Session 16: the band reaches 128 (8 frequencies) and starts at the data's own periods (x_init "data": each
    # frequency moved within its octave to the peak of the data's empirical characteristic function): +8.0 points on
    # the notch_carpet analogue (the carpet's scale), where the wider band alone gave +0.3 and the data start on the
    # 1..32 band +1.2
    "points": {"diffusion": {"start": 0.2, "end": 1.0}, "lr": 2e-2, "lr_schedule": "cosine", "iters": 2400,
               "eval_lam": 1.0,
               "network_options": {"x_freqs": 8, "x_max_freq": 128.0, "x_learn": True, "x_init": "data"}},
    "tabular": {"progressive": None, "num_steps": 30, "hidden": 256, "depth": 3, "batch_size": 512,
                "holdout": 0.1},
    "image": {"progressive": None, "num_steps": 30, "batch_size": 128, "lr": 2e-4, "lr_decay_every": 0,
              "ema": 0.999, "eval_lam": 1.0, "final_ode": 0},
}


#: Defaults of one registered data source over those of its kind (e.g. the network for MNIST); same rules.
#: U owns the image entries.
SOURCE_PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized (target <= 15 CPU-minutes); chosen by U on the digits validation split (docs/images.md, session 14):
    # unet-digits (conv inductive bias generalises far better than the 3x512 MLP on 1257 images), learned
    # per-dimension prior (initial std 0.5), batch 32, lr 2e-3, keeping the best periodic validation -ELBO. The measured
    # run trained 1000 iterations (13.2 CPU-min) and kept step 900, its best validation point; the preset stops at 900
    # (constant lr: the same trajectory) so that it reproduces that checkpoint, now that the last step is compared too
    "digits": {"network": "unet-digits", "num_steps": 10, "diffusion": 1.0, "t_end": 0.05, "prior": "learned",
               "prior_std": 0.5, "batch_size": 32, "lr": 2e-3, "iters": 900, "clip": 1.0, "eval_every": 100,
               "keep_best": True},
    # the paper's image setting (GPU): UNets at about half DDPM width, g=1, T=0.05
    "mnist": {"network": "unet-mnist", "diffusion": 1.0},
    "cifar10": {"network": "unet-cifar10", "diffusion": 1.0},
}


def _check_presets() -> None:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for kind, preset in PRESETS.items():
        unknown = set(preset) - names
        if kind not in DATA_KINDS or unknown:
            raise RuntimeError(f"PRESETS[{kind!r}]: unknown kind or fields {sorted(unknown)}")
    for source, preset in SOURCE_PRESETS.items():
        unknown = set(preset) - names
        if unknown:
            raise RuntimeError(f"SOURCE_PRESETS[{source!r}]: unknown fields {sorted(unknown)}")


_check_presets()


def resolve_config(kind: str, explicit: Mapping[str, Any], source: str | None = None) -> TrainConfig:
    """The configuration of a new run: dataclass defaults < ``PRESETS[kind]`` < ``SOURCE_PRESETS[source]`` (a
    registered data source's name) < ``explicit`` (what the user set).

    Setting ``num_steps`` without ``progressive`` means a fixed N; setting both (progressive not none)
    contradicts itself and is an error. Choosing another ``network`` than the preset's drops the preset's
    arguments of its network (MLP sizes, ``network_options``); for the same network, explicit ``network_options``
    are merged over the preset's (``--network-option x_freqs=0`` turns the points preset's Fourier features off).
    ``eval_every=0`` without ``keep_best`` turns a preset's early stopping off (it compares evaluations).
    """
    if kind not in PRESETS:
        raise ValueError(f"kind: expected one of {', '.join(PRESETS)}, got {kind!r}")
    preset = {**PRESETS[kind], **SOURCE_PRESETS.get(str(source).lower(), {})}
    if "network" in explicit and explicit["network"] != preset.get("network", _DEFAULTS["network"]):
        for k in ("hidden", "depth", "time_dim", "network_options"):  # arguments of the preset's own network
            preset.pop(k, None)
    if explicit.get("eval_every") == 0 and "keep_best" not in explicit:  # a preset's early stopping needs evaluations
        preset.pop("keep_best", None)
        preset.pop("patience", None)
    values = {**preset, **explicit}
    if isinstance(explicit.get("network_options"), dict) and isinstance(preset.get("network_options"), dict):
        # a --network-option adds to (or overrides one of) the preset's options of the same network
        values["network_options"] = {**preset["network_options"], **explicit["network_options"]}
    conflicts = explicit_conflicts(explicit, values.get("lr_schedule", _DEFAULTS["lr_schedule"]))
    if conflicts:
        raise ConfigError(conflicts, "conflicting options")
    if "num_steps" in explicit and "progressive" not in explicit:
        values["progressive"] = None
    return TrainConfig(**values)


def explicit_conflicts(explicit: Mapping[str, Any], lr_schedule: str | None = None) -> list[Issue]:
    """Options set together that contradict each other (one of them would be ignored); ``lr_schedule``: the
    schedule in effect (a preset's when the user set none)."""
    out = []
    prog = explicit.get("progressive")
    if "num_steps" in explicit and isinstance(prog, str) and _parse_optional_str(prog) is not None:
        out.append(Issue(("num_steps", "progressive"),
                         "{num_steps} fixes N while {progressive} makes it grow; give one of them "
                         "(the progressive schedule ends at its END)"))
    if explicit.get("lr_decay_every") == 0 and "lr_decay" in explicit:
        out.append(Issue(("lr_decay", "lr_decay_every"), "{lr_decay} has no effect with {lr_decay_every} 0"))
    schedule = explicit.get("lr_schedule", lr_schedule or "step")
    if schedule != "step":
        for k in ("lr_decay", "lr_decay_every"):
            if k in explicit:
                out.append(Issue((k, "lr_schedule"), f"{{{k}}} applies to {{lr_schedule}} step, not {schedule} "
                                                     f"(the {'one set' if 'lr_schedule' in explicit else 'default'}"
                                                     f" for this data; pass {{lr_schedule}} step)"))
    if explicit.get("eval_every") == 0 and "eval_samples" in explicit:
        out.append(Issue(("eval_samples", "eval_every"), "{eval_samples} has no effect with {eval_every} 0"))
    return out


def resumable_fields() -> tuple[str, ...]:
    """Options that may differ from the checkpoint's on ``--resume`` (length, output, reporting, device)."""
    return tuple(f.name for f in option_fields() if f.metadata["resume"])


def resume_config(stored: Mapping[str, Any], explicit: Mapping[str, Any]) -> TrainConfig:
    """The configuration of a resumed run: the checkpoint's ``stored`` config with the options that may change
    on resume (``resume=True`` in their metadata: length, output, evaluation, device) taken from ``explicit``.
    Any other option that differs from the checkpoint is an error (it would be silently ignored)."""
    fields = {f.name: f for f in option_fields()}
    base = TrainConfig.from_dict(stored)
    issues = []
    for k, v in explicit.items():
        f = fields.get(k)
        if f is None or f.metadata["resume"]:
            continue
        if k == "progressive" and isinstance(v, str):
            v = _parse_optional_str(v)
        if getattr(base, k) != v:
            issues.append(Issue((k,), f"{{{k}}} {v!r} contradicts the checkpoint ({getattr(base, k)!r})"))
    if issues:
        may = ", ".join(f"{{{n}}}" for n in sorted(n for n, f in fields.items() if f.metadata["resume"]))
        issues.append(Issue(tuple(n for n, f in fields.items() if f.metadata["resume"]),
                            f"on resume only {may} may change"))
        raise ConfigError(issues, "options contradict the checkpoint")
    changes = {k: v for k, v in explicit.items() if k in fields and fields[k].metadata["resume"]}
    changes.setdefault("out", None)  # without --out a resumed run continues in its checkpoint's folder
    return dataclasses.replace(base, **changes)
