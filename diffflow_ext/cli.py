"""``diffflow`` command line: ``train``, ``sample``, ``eval``.

Examples::

    diffflow train                                   # checkerboard, defaults tuned for a few CPU minutes
    diffflow train 2spirals --iters 4000 --out runs/spirals
    diffflow train my_points.npy --hidden 128 --progressive 5:30:1000
    diffflow train --resume runs/checkerboard/checkpoint.safetensors --iters 4000
    torchrun --nproc_per_node=2 -m diffflow_ext.train checkerboard --shards 2
    diffflow sample runs/checkerboard -n 10000 --lam 0.5 --out samples.npy
    diffflow eval runs/checkerboard

The options of ``diffflow train`` are generated from the fields of
:class:`diffflow_ext.training.config.TrainConfig` (flags, help, choices and bounds live in the fields'
metadata); ``sample`` and ``eval`` are generated the same way from :class:`SampleOptions` and
:class:`EvalOptions` below. Every bad input ends in one line on stderr that names the flag as the user typed
it, with exit status 2 (usage) or 1 (a failure while running), before anything is written; set
``DIFFFLOW_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .likelihood import DEFAULT_ATOL, DEFAULT_RTOL, TRACE_METHODS
from .training.config import (
    GROUPS,
    MAX_NUM_STEPS,
    PRESETS,
    SOURCE_PRESETS,
    ConfigError,
    Range,
    TrainConfig,
    check_field,
    option,
    option_fields,
    parse_device,
    parse_key_value,
    path_problem,
    resolve_config,
    resume_config,
)

__all__ = ["main", "build_parser", "CLIError", "SampleOptions", "EvalOptions"]

DEBUG_ENV = "DIFFFLOW_DEBUG"


class CLIError(Exception):
    """A user error: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 2, *, prog: str | None = None):
        super().__init__(message)
        self.code, self.prog = code, prog


# ----------------------------------------------------------------------------- options of sample / eval


def _sampler_names() -> Sequence[str]:
    from .samplers import SAMPLERS

    return tuple(SAMPLERS)


_COUNT = Range(1, 10**8, integer=True)
_SEED = Range(0, 2**32 - 1, integer=True)
_LAM = Range(0, 100)
_TOL = Range(1e-12, 1.0)
_S, _EV, _OUT = "sampling", "evaluation", "output"


@dataclass
class SamplingOptions:
    """The sampler options shared by ``diffflow sample`` and ``diffflow eval``."""

    method: str = option("em", "sampler (em: Euler-Maruyama with --lam; heun, ode: the probability-flow ODE)",
                         choices=_sampler_names, group=_S)
    sampler_options: dict = option({}, "an option of the sampler, e.g. rtol=1e-6 (ode); repeatable",
                                   flags=("--sampler-option",), metavar="KEY=VALUE", parse=parse_key_value, group=_S)
    lam: float | None = option(None, "lambda of the marginal-equivalent SDE (1: DiffFlow's backward SDE, 0: "
                                     "probability-flow ODE; default: the run's --eval-lam; em only)", range=_LAM,
                               nullable=True, group=_S)
    device: str = option("auto", "auto (CUDA when available), cpu, cuda or cuda:K", metavar="DEVICE",
                         parse=parse_device, group=_S)


@dataclass
class SampleOptions(SamplingOptions):
    """Options of ``diffflow sample``."""

    n: int = option(5000, "number of samples", flags=("-n",), range=_COUNT, group=_S)
    num_steps: int | None = option(None, "sampling steps (default: the trained N)", flags=("-N",), nullable=True,
                                   range=Range(1, MAX_NUM_STEPS, integer=True), group=_S)
    seed: int = option(0, "seed of the sampler", range=_SEED, group=_S)
    batch_size: int = option(1000, "samples drawn at once (memory)", range=_COUNT, group=_S)
    out: str | None = option(None, "output .npy file, or a folder to write samples_seed<SEED>.npy into "
                                   "(default: the run folder)", nullable=True, metavar="FILE|DIR", group=_OUT)
    png: str | None = option(None, "picture path (default: next to --out; none: no picture)", nullable=True,
                             metavar="FILE|none", group=_OUT)


@dataclass
class EvalOptions(SamplingOptions):
    """Options of ``diffflow eval``."""

    data: str | None = option(None, "other held-out data: a data source name or a file (default: the run's "
                                    "test split)", nullable=True, group=_EV)
    data_dir: str | None = option(None, "folder of the data's files (when the data moved, or for --data NAME)",
                                  nullable=True, metavar="DIR", group=_EV)
    split: str = option("test", "split of finite data sets to evaluate on", choices=lambda: ("test", "val", "train"),
                        group=_EV)
    n_samples: int | None = option(None, "model samples (default: as in training)", range=_COUNT, nullable=True,
                                   group=_EV)
    n_heldout: int = option(5000, "held-out examples compared with the samples", range=_COUNT, group=_EV)
    n_nll: int = option(2000, "held-out examples for the negative ELBO", range=_COUNT, group=_EV)
    n_ode: int | None = option(None, "held-out examples for the ODE log-likelihood (0: skip; default: as in "
                                     "training)", range=Range(0, 10**8, integer=True), nullable=True, group=_EV)
    ode_rtol: float = option(DEFAULT_RTOL, "relative tolerance of the ODE likelihood's adaptive solver (looser is "
                                           "faster; the error bound is in docs/evaluation.md)", range=_TOL, group=_EV)
    ode_atol: float = option(DEFAULT_ATOL, "absolute tolerance of the ODE likelihood's adaptive solver", range=_TOL,
                             group=_EV)
    ode_trace: str = option("auto", "divergence in the ODE likelihood: exact, hutchinson (one Rademacher probe, "
                                    "unbiased), auto (exact up to 64 dimensions)", choices=lambda: TRACE_METHODS,
                            group=_EV)
    draws: int | None = option(None, "dequantisation draws per image for bits/dim (default: 3)", nullable=True,
                               range=Range(1, 1000, integer=True), group=_EV)
    seed: int | None = option(None, "evaluation seed (default: the run's --eval-seed)", range=_SEED, nullable=True,
                              group=_EV)
    batch_size: int = option(500, "examples per batch (memory)", range=_COUNT, group=_EV)
    fid: str = option("auto", "FID for images: auto (when weights are given), on (required), off",
                      choices=lambda: ("auto", "on", "off"), group=_EV)
    fid_weights: str | None = option(None, "Inception weights file for FID (or env DIFFFLOW_FID_WEIGHTS); nothing "
                                           "is downloaded", nullable=True, metavar="PATH", group=_EV)
    json: str | None = option(None, "also write the metrics to this file", nullable=True, metavar="FILE",
                              group=_OUT)


# ----------------------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised as :class:`CLIError`, printed by :func:`main`)."""

    def error(self, message: str):  # noqa: D401
        raise CLIError(f"{message} (see '{self.prog} --help')", prog=self.prog)


def _parse_int(text: str) -> int:
    s = text.strip()
    try:
        return int(s)
    except ValueError:
        v = float(s)  # "1e4" -> 10000; ValueError for words
        if not (math.isfinite(v) and v.is_integer()):
            raise ValueError(f"not an integer: {text!r}") from None
        return int(v)


def _parse_bool(text: str) -> bool:
    s = text.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _text_parser(f: dataclasses.Field) -> Callable[[str], Any]:
    """How the CLI turns the text of field ``f``'s flag into a value."""
    custom = f.metadata.get("parse")
    if custom is not None:
        return custom
    kind = str(f.type).replace(" ", "").split("|")[0]
    return {"int": _parse_int, "float": float, "bool": _parse_bool}.get(kind, str)


class _FieldAction(argparse.Action):
    """Stores a field's value, checked against the field's bounds and choices; remembers the flag typed."""

    def __init__(self, option_strings, dest, field: dataclasses.Field, **kwargs):
        self.field = field
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        flag = option_string or self.metavar or self.dest
        typed = _typed(namespace)
        if _is_dict_field(self.field):
            return self._add_item(parser, namespace, str(values), flag, typed)
        if self.dest in typed:
            parser.error(f"{flag} given twice ({typed[self.dest]} and {flag}); give it once")
        f = self.field
        if self.nargs == 0:  # a switch (bool field)
            setattr(namespace, self.dest, True)
            typed[self.dest] = flag
            return
        text = str(values)
        if not text.strip():
            raise CLIError(f"{flag}: expected a value, got {text!r}", prog=parser.prog)
        try:
            if f.metadata.get("nullable") and text.strip().lower() == "none":
                value = None
            else:
                value = _text_parser(f)(text)
        except (ValueError, OverflowError) as e:
            msg = str(e)
            if msg.startswith(f"{f.name}: "):  # a parser of the config layer names the field: name the flag
                raise CLIError(f"{flag}: {msg[len(f.name) + 2:]}", prog=parser.prog) from None
            issue = check_field(f, object())  # the field's own description of what it expects
            expected = issue.format(lambda n: flag) if issue is not None else f"{flag}: {msg}"
            raise CLIError(f"{expected.split(', got')[0]}, got {text!r}", prog=parser.prog) from None
        issue = check_field(f, value)
        if issue is not None:
            raise CLIError(issue.format(lambda n: flag), prog=parser.prog)
        if isinstance(value, str) and (problem := path_problem(value)):  # paths and names alike
            raise CLIError(f"{flag}: {problem}", prog=parser.prog)
        setattr(namespace, self.dest, value)
        typed[self.dest] = flag

    def _add_item(self, parser, namespace, text: str, flag: str, typed: dict) -> None:
        """A repeatable KEY=VALUE option collecting into a dict."""
        try:
            key, value = _text_parser(self.field)(text)
        except ValueError as e:
            raise CLIError(f"{flag}: {e}", prog=parser.prog) from None
        items = getattr(namespace, self.dest, None)
        if not isinstance(items, dict):
            items = {}
            setattr(namespace, self.dest, items)
        if key in items:
            raise CLIError(f"{flag} {key} given twice ({key}={items[key]!r} and {text!r}); give it once",
                           prog=parser.prog)
        items[key] = value
        typed[self.dest] = flag


def _is_dict_field(f: dataclasses.Field) -> bool:
    return f.default_factory is not dataclasses.MISSING and isinstance(f.default_factory(), dict)


def _typed(namespace) -> dict[str, str]:
    d = getattr(namespace, "_typed", None)
    if d is None:
        d = {}
        namespace._typed = d
    return d


def _flags(f: dataclasses.Field) -> list[str]:
    """The option strings of field ``f``: its extra flags, then ``--field-name`` (the one used in messages); a
    repeatable KEY=VALUE field is named by its singular flag only (``--data-option``)."""
    extra = list(f.metadata.get("flags", ()))
    if _is_dict_field(f) and any(x.startswith("--") for x in extra):
        return extra
    return [*extra, "--" + f.name.replace("_", "-")]


def _default_text(f: dataclasses.Field, defaults: Any) -> str:
    v = getattr(defaults, f.name)
    text = f"default: {'none' if v is None else v}"
    if defaults.__class__ is TrainConfig:
        per_kind = [f"{k}: {'none' if p[f.name] is None else p[f.name]}"
                    for k, p in [*PRESETS.items(), *SOURCE_PRESETS.items()] if f.name in p and p[f.name] != v]
        if per_kind:
            text += "; " + ", ".join(per_kind)
    return text


def _add_fields(p: argparse.ArgumentParser, cls: type, groups: dict[str, Any] | None = None) -> None:
    """One flag per option field of ``cls``; values land in the namespace only when the user typed them."""
    defaults = cls()
    groups = {} if groups is None else groups
    fields = option_fields(cls)
    used = [f.metadata["group"] for f in fields]
    for g in dict.fromkeys([g for g in GROUPS if g in used] + used):  # GROUPS' order, then first use
        if g not in groups:
            groups[g] = p.add_argument_group(g)
    for f in fields:
        m = f.metadata
        if not m.get("cli", True):
            continue
        g = groups[m["group"]]
        choices = tuple(m["choices"]()) if m.get("choices") else None
        metavar = m.get("metavar") or ("{" + ",".join(map(str, choices)) + "}" if choices else None)
        shown = "default:" in m["help"] or _is_dict_field(f)
        hlp = m["help"] if shown else f"{m['help']} ({_default_text(f, defaults)})"
        switch = {"nargs": 0} if str(f.type).strip() == "bool" else {"metavar": metavar}
        g.add_argument(*_flags(f), dest=f.name, action=_FieldAction, field=f, default=argparse.SUPPRESS,
                       help=hlp.replace("%", "%%"), **switch)


def _explicit(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options the user typed (field name -> value)."""
    names = {f.name for f in option_fields(cls) if f.metadata.get("cli", True)}
    return {k: v for k, v in vars(args).items() if k in names}


def _namer(args: argparse.Namespace, cls: type = TrainConfig) -> Callable[[str], str]:
    """Field name -> the flag the user typed (or the field's long flag when it was not typed)."""
    typed = getattr(args, "_typed", None) or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}

    def name(field: str) -> str:
        if field in typed:
            return typed[field]
        if field == "data":
            return "DATA"
        f = fields.get(field)
        return _flags(f)[-1] if f is not None else field

    return name


# ----------------------------------------------------------------------------- output safety


def _check_writable_dir(path: Path, flag: str) -> None:
    """``path`` (a folder, existing or not) can be created and written, else a one-line error."""
    anc = path
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise CLIError(f"{flag} {path}: {anc} is a file, not a folder", 1)
    try:
        fd, tmp = tempfile.mkstemp(dir=anc, prefix=".diffflow-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise CLIError(f"{flag} {path}: cannot write in {anc} ({e.strerror or e})", 1) from None


def _refuse_existing(path: Path, flag: str, overwrite: bool) -> None:
    if path.is_dir():
        raise CLIError(f"{flag} {path}: is a folder, expected a file", 1)
    if os.path.lexists(path) and not overwrite:  # lexists: a dangling symlink is the user's too
        raise CLIError(f"{flag} {path}: file exists; pass --overwrite to replace it", 1)
    _check_writable_dir(path.parent, flag)


@contextlib.contextmanager
def _staged(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Temporary files next to each of ``paths`` (same suffix); all moved into place together at the end,
    all removed if anything fails -- the outputs appear complete or not at all."""
    tmps: list[Path] = []
    made: list[Path] = []  # folders created for the outputs, removed again if nothing is written
    done = False
    try:
        for p in paths:
            made += [d for d in (p.parent, *p.parent.parents) if not d.exists()]  # deepest first
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, t = tempfile.mkstemp(dir=p.parent, prefix=f".{p.stem}.", suffix=f".tmp{p.suffix}")
            os.close(fd)
            tmps.append(Path(t))
        yield tmps
        for t, p in zip(tmps, paths):
            os.replace(t, p)
        done = True
    finally:
        for t in tmps:
            with contextlib.suppress(OSError):
                t.unlink()
        if not done:
            for d in dict.fromkeys(made):
                with contextlib.suppress(OSError):
                    d.rmdir()


# ----------------------------------------------------------------------------- train


def _train_parser(sub) -> None:
    from .data.base import data_source_names

    p = sub.add_parser("train", help="train a DiffFlow model",
                       description="Train DiffFlow on a 2-D toy, a point file, a tabular set or an image set. "
                                   "Defaults depend on the kind of data (shown as 'kind: value').")
    p.add_argument("data", nargs="?", default=None, metavar="DATA",
                   help=f"a data source ({', '.join(sorted(data_source_names()))}) or a file: .npy/.csv of points "
                        f"(n, d), .npy/.npz of uint8 images, a folder of PNG images (default: checkerboard)")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue a run from its checkpoint (file or run folder); --iters is the new total")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _threads_arg(p)
    _add_fields(p, TrainConfig)
    p.set_defaults(func=_cmd_train)


@dataclass
class ProcessOptions:
    """Options of the process itself, shared by every command."""

    threads: int = option(1, "torch CPU threads per process (the small MLPs run fastest single-threaded, and several "
                             "threads per process thrash a busy machine); 0: torch's default",
                          range=Range(0, 1024, integer=True), group="process")


def _threads_arg(p) -> None:
    _add_fields(p, ProcessOptions)


def _set_threads(args) -> None:
    import torch

    threads = getattr(args, "threads", ProcessOptions().threads)
    if threads > 0:
        torch.set_num_threads(threads)


def _config_error(e: ConfigError, args) -> CLIError:
    return CLIError(e.format(_namer(args)))


def _check_backend(cfg: TrainConfig, name: Callable[[str], str]) -> None:
    """The device exists here, and the backend exists and runs on it."""
    from .ops import available_backends
    from .training.devices import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    on = resolve_device(cfg.device, local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world).type
    if cfg.backend != "auto":
        info = available_backends().get(cfg.backend, {})
        if not info.get("available"):
            raise CLIError(f"{name('backend')} {cfg.backend}: not available here ({info.get('reason', '?')}); "
                           "use --backend auto", 1)
        if on not in info.get("devices", ()):
            raise CLIError(f"{name('backend')} {cfg.backend} runs on {', '.join(info['devices'])} tensors, but the "
                           f"run is on {on} ({name('device')} {cfg.device})", 1)
    if cfg.shards % world:
        raise CLIError(f"{name('shards')} {cfg.shards}: must be a multiple of the number of processes ({world})")


def _stored_config(ck) -> TrainConfig:
    """The training options stored in checkpoint ``ck``, validated (one line naming the file and the option)."""
    stored = ck.extra.get("train_config")
    if not isinstance(stored, dict):
        raise CLIError(f"{ck.path}: not a training checkpoint (stored train_config: expected a dict of training "
                       f"options, got {type(stored).__name__})", 1)
    try:
        return TrainConfig.from_dict(stored)
    except ConfigError as e:
        raise CLIError(f"{ck.path}: invalid stored training options: "
                       + "; ".join(i.format(lambda f: f"{f}={stored.get(f)!r}") for i in e.issues), 1) from None
    except (TypeError, ValueError) as e:
        raise CLIError(f"{ck.path}: invalid stored training options ({_one_line(e)})", 1) from None


def _train_plan(args) -> tuple[TrainConfig, Any, Any]:
    """Everything ``train`` is asked to do, checked: (config, checkpoint or None, data source or None)."""
    explicit = _explicit(args, TrainConfig)
    name = _namer(args)
    ck = None
    if args.resume:
        from .checkpoint import load_checkpoint

        ck = load_checkpoint(args.resume)
        stored = _stored_config(ck).to_dict()
        if args.data is not None and args.data != stored.get("data"):
            raise CLIError(f"DATA {args.data!r} contradicts the checkpoint (trained on {stored.get('data')!r}); "
                           "omit it with --resume")
        try:
            cfg = resume_config(stored, explicit)
        except ConfigError as e:
            raise _config_error(e, args) from None
        _check_backend(cfg, name)
        step = int(ck.step)
        if cfg.iters <= step:
            raise CLIError(f"{name('iters')} {cfg.iters}: the checkpoint is at step {step} already; give a larger "
                           "total (--iters is the total, not the number of further steps)")
        return cfg, ck, None
    from .training.loop import build_data

    data = args.data if args.data is not None else TrainConfig().data
    _check_data_flags(data, explicit, name)
    if "shards" not in explicit:
        explicit["shards"] = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        # every option checked before data is read (with the named source's own preset: it may enable options that
        # others depend on, e.g. the digits preset's keep_best for --patience)
        first = resolve_config("points", {**explicit, "data": data}, data)
        _check_backend(first, name)
        source = build_data(first)
        cfg = resolve_config(source.kind, {**explicit, "data": data}, data)  # the defaults of this data
    except ConfigError as e:
        raise _config_error(e, args) from None
    if any(getattr(cfg, k) != getattr(first, k) for k in ("data_dir", "data_options", "seed", "holdout")):
        source = build_data(cfg)  # a preset changed how the data is read
    return cfg, None, source


def _check_data_flags(spec: str, explicit: dict[str, Any], name: Callable[[str], str]) -> None:
    """Data options that the data source would ignore are errors; a data path must be a folder or a regular file
    (a FIFO or device would block)."""
    from .data import data_source_options, sources  # noqa: F401  (sources: registers the built-in sources)
    from .data.base import _ALIASES, DATA_SOURCES

    _check_data_path(spec, name("data"))
    takes = data_source_options(spec)
    if "holdout" in explicit and takes is not None and "holdout" not in takes:
        key = _ALIASES.get(spec.lower(), spec.lower())
        why = "is generated (its held-out set is a fresh draw)" if key in DATA_SOURCES and \
            DATA_SOURCES[key].kind == "points" else "has fixed splits"
        raise CLIError(f"{name('holdout')}: applies to point files, arrays and PNG folders; {key} {why}")
    entry = DATA_SOURCES.get(_ALIASES.get(spec.lower(), spec.lower()))
    if "data_dir" in explicit and (entry is None or Path(spec).exists()):
        raise CLIError(f"{name('data_dir')}: applies to named data sources (mnist, cifar10, power, ...), not to the "
                       f"file {spec}")
    if "data_dir" in explicit and not entry.needs_dir:
        raise CLIError(f"{name('data_dir')}: {entry.name} reads no files (only sources such as mnist, cifar10 or "
                       "power do)")


def _check_data_path(spec: str, flag: str) -> None:
    """An existing data path that is not a folder must be a non-empty regular file (checked without opening it)."""
    p = Path(spec)
    try:
        is_dir = p.is_dir()
        exists = is_dir or os.path.lexists(p)
    except OSError:
        return
    if exists and not is_dir:
        from .data.files import DataFileError, check_regular_file

        try:
            check_regular_file(p)
        except DataFileError as e:
            raise CLIError(f"{flag} {_one_line(e)}", 1) from None


def _stored_data_error(e: Exception, ck) -> Exception:
    """Problems with the data state stored in ``ck`` are named with the checkpoint's path."""
    if isinstance(e, ValueError) and str(e).startswith("stored data state"):
        return CLIError(f"{ck.path}: {_one_line(e)}", 1)
    return e


def _cmd_train(args) -> int:
    from .training import train

    cfg, ck, source = _train_plan(args)
    try:
        summary = train(cfg, resume=str(ck.path) if ck is not None else None, overwrite=args.overwrite,
                        progress=not args.no_progress, source=source)
    except ValueError as e:
        raise _stored_data_error(e, ck) if ck is not None else e from None
    if summary.get("metrics") is not None:
        print(json.dumps({k: summary[k] for k in ("out", "step", "train_seconds", "iters_per_second")}
                         | {"metrics": summary["metrics"]}, indent=2))
    return 0


# ----------------------------------------------------------------------------- sample


def _checkpoint_command(sub, name: str, cls: type, func: Callable, *, help: str, description: str,
                        overwrite: str) -> None:
    """A command that reads a trained checkpoint (``sample``, ``eval``); its options come from ``cls``."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--overwrite", "--force", action="store_true", help=overwrite)
    _threads_arg(p)
    _add_fields(p, cls)
    p.set_defaults(func=func)


def _sample_parser(sub) -> None:
    _checkpoint_command(sub, "sample", SampleOptions, _cmd_sample, help="draw samples from a trained model",
                        description="Draw samples from a trained model; writes a .npy file and a picture.",
                        overwrite="replace existing output files")


def _sample_targets(o: SampleOptions, run_dir: Path, typed: dict[str, str],
                    overwrite: bool) -> tuple[Path, Path | None]:
    """The .npy and picture paths of ``diffflow sample``, checked before any work."""
    out_flag, png_flag = typed.get("out", "--out"), typed.get("png", "--png")
    default_name = f"samples_seed{o.seed}.npy"
    if o.out is None:
        out = run_dir / default_name
    else:
        out = Path(o.out)
        if out.is_dir() or o.out.endswith(("/", os.sep)):
            out = out / default_name
        elif out.suffix.lower() != ".npy":
            raise CLIError(f"{out_flag} {o.out}: expected a .npy file or an existing folder")
    _refuse_existing(out, out_flag, overwrite)
    if o.png is None:
        png = out.with_suffix(".png")
        flag = f"the picture next to {out_flag} (or {png_flag} none)"
    else:
        png, flag = Path(o.png), png_flag
        if png.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
            raise CLIError(f"{png_flag} {o.png}: expected a .png (or .pdf/.svg/.jpg) file, or none")
    if png.resolve() == out.resolve():
        raise CLIError(f"{png_flag} {o.png}: the same file as {out_flag}")
    if o.png is None and os.path.lexists(png) and not overwrite:
        raise CLIError(f"{png} exists ({flag}); pass --overwrite to replace it, or choose another path", 1)
    _refuse_existing(png, png_flag, overwrite)
    return out, png


def _sampler_plan(o: SamplingOptions, typed: dict[str, str], train_config: dict) -> dict[str, Any]:
    """Keyword arguments for the sampler (``method``, ``lam`` and its options), checked before any work."""
    from .samplers import SAMPLERS, get_sampler, sampler_options

    flag = typed.get("sampler_options", "--sampler-option")
    takes_lam = "lam" in sampler_options(SAMPLERS[o.method])
    if "lam" in o.sampler_options:
        raise CLIError(f"{flag} lam=...: use {typed.get('lam', '--lam')}")
    if o.lam is not None and not takes_lam:
        with_lam = ", ".join(k for k, c in SAMPLERS.items() if "lam" in sampler_options(c))
        raise CLIError(f"{typed['lam']}: only the samplers with a lambda take it ({with_lam}); --method {o.method} "
                       "follows the probability-flow ODE (lambda 0)")
    lam = (o.lam if o.lam is not None else float(train_config.get("eval_lam", 1.0))) if takes_lam else None
    try:
        get_sampler(o.method, **o.sampler_options)
    except (TypeError, ValueError) as e:
        raise CLIError(f"{flag} (--method {o.method}): {_one_line(e)}") from None
    plan: dict[str, Any] = {"lam": lam}
    if o.method != "em" or o.sampler_options:
        plan["method"] = o.method
    if o.sampler_options:
        plan["sampler_options"] = dict(o.sampler_options)
    return plan


def _cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .checkpoint import load_checkpoint
    from .evaluation import sample_model
    from .training.devices import resolve_device

    o = SampleOptions(**_explicit(args, SampleOptions))
    typed = getattr(args, "_typed", {}) or {}
    ck = load_checkpoint(args.checkpoint)
    run_dir = ck.path.parent
    png_off = "png" in typed and o.png is None
    out, png = _sample_targets(o, run_dir, typed, args.overwrite)
    if png_off:
        png = None
    plan = _sampler_plan(o, typed, _stored_config(ck).to_dict())
    transform = _stored_transform(ck)
    device = resolve_device(o.device)
    model = ck.build_model(use_ema=not args.no_ema).to(device)
    _check_transform_fits(ck, transform, model.data_shape)
    numel = math.prod(model.data_shape)
    if o.n * numel > 2**31:
        raise CLIError(f"{typed.get('n', '-n')} {o.n}: {o.n} samples of {numel} values each exceed 2^31 values; "
                       "draw them in several runs with different --seed")
    lam = plan.pop("lam")
    z = sample_model(model, o.n, lam=lam, seed=o.seed, batch_size=o.batch_size, num_steps=o.num_steps, **plan)
    if not torch.isfinite(z).all():
        raise CLIError(f"sampling produced non-finite values (lam={lam}, steps={o.num_steps or model.num_steps}); "
                       "nothing was written", 1)
    src = None
    if png is not None:  # the data is only needed for the picture (samples beside held-out data, support)
        src, why = _data_source(ck)
        if why is not None:
            print(f"diffflow sample: note: the training data is not available ({why}); the picture shows the "
                  "samples alone", file=sys.stderr)
    x = _to_data_space(transform, z)  # the stored transform: the samples never depend on the data files
    if x.dtype.kind == "f":
        x = x.astype(np.float32)
    msg: dict[str, Any] = {"samples": str(out), "n": o.n, "method": o.method, "lam": lam,
                           "num_steps": o.num_steps or model.num_steps}
    if o.sampler_options:
        msg["sampler_options"] = o.sampler_options
    targets = [out] + ([png] if png is not None else [])
    with _staged(targets) as tmps:
        buf = io.BytesIO()
        np.save(buf, x)
        tmps[0].write_bytes(buf.getvalue())
        if png is not None:
            title = f"{o.n} samples, {o.method}" + (f", lam={lam}" if lam is not None else "")
            msg.update(_sample_picture(src, x, tmps[1], title, o.n,
                                       _levels(transform)))
            msg["picture"] = str(png)
    print(json.dumps(msg, indent=2))
    return 0


def _check_transform_fits(ck, transform, data_shape: tuple[int, ...]) -> None:
    """The stored data transform must map the model's samples (a crafted or mixed-up checkpoint otherwise
    reshapes or broadcasts them silently)."""
    if not transform.fits(data_shape):
        raise CLIError(f"{ck.path}: the stored data transform ({transform.name}) does not fit the model's samples "
                       f"of shape {tuple(data_shape)}", 1)


def _stored_transform(ck):
    """The model-space -> data-space map stored in checkpoint ``ck`` (validated; one-line error naming the file)."""
    from .data.base import Transform

    state = ck.extra.get("data")
    if isinstance(state, dict) and "transform" not in state and "mean" in state and "std" in state:
        state = {"transform": {"name": "standardize", "mean": state["mean"], "std": state["std"]}}  # old format
    if not isinstance(state, dict) or not isinstance(state.get("transform"), dict):
        raise CLIError(f"{ck.path}: the stored data state has no transform (model space -> data space)", 1)
    try:
        return Transform.from_state(state["transform"])
    except (TypeError, ValueError) as e:
        raise CLIError(f"{ck.path}: invalid stored data transform ({_one_line(e)})", 1) from None


def _data_source(ck) -> tuple[Any, str | None]:
    """``(source, None)``: the run's data rebuilt from the checkpoint, or ``(None, why)`` when its files are not at
    hand (sampling does not need them: the transform is stored; the picture then shows the samples alone)."""
    from .data import data_source_from_state

    try:
        return data_source_from_state(ck.extra.get("data")), None
    except (ValueError, OSError) as e:
        err = _stored_data_error(e, ck)
        if err is not e:
            raise err from None
        return None, _one_line(e)
    except (KeyError, TypeError, AttributeError) as e:
        raise CLIError(f"{ck.path}: invalid stored data state ({type(e).__name__}: {_one_line(e)})", 1) from None


def _to_data_space(transform, z):
    """Model samples -> data space (numpy)."""
    return transform.to_data(z.detach().cpu()).numpy()


def _levels(transform) -> int | None:
    """Grey levels of image data (None for points)."""
    return getattr(transform, "levels", None)


def _sample_picture(src, x, path: Path, title: str, n: int, levels: int | None) -> dict:
    """Draw the samples (beside held-out data when the data is at hand); returns metrics it computed."""
    from . import plotting

    res: dict[str, Any] = {}
    if x.ndim > 2:  # images
        plotting.sample_grid(x, path, title=title, levels=levels)
        return res
    if src is None:
        plotting.plot_points(x, path, title)
        return res
    if src.support is not None:
        res["fraction_in_support"] = float(src.contains(x).mean())
    held = src.heldout(min(n, 20000)).numpy()
    plotting.samples_vs_data(x, held, path, title=title, metrics=res or None)
    return res


# ----------------------------------------------------------------------------- eval


def _eval_parser(sub) -> None:
    _checkpoint_command(sub, "eval", EvalOptions, _cmd_eval, help="evaluate a trained model on held-out data",
                        description="Evaluate a trained model: sample quality and likelihoods on held-out data.",
                        overwrite="replace an existing --json file")


def _ode_options(o: EvalOptions) -> dict:
    """The ODE likelihood's options that differ from the library's defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(EvalOptions)}
    names = {"ode_rtol": "rtol", "ode_atol": "atol", "ode_trace": "method"}  # option -> DiffFlow.log_prob argument
    return {arg: getattr(o, k) for k, arg in names.items() if getattr(o, k) != defaults[k]}


def _cmd_eval(args) -> int:
    from .checkpoint import atomic_write_text, load_checkpoint
    from .evaluation import evaluate_checkpoint
    from .training.devices import resolve_device

    o = EvalOptions(**_explicit(args, EvalOptions))
    typed = getattr(args, "_typed", {}) or {}
    if o.json is not None:
        _refuse_existing(Path(o.json), typed.get("json", "--json"), args.overwrite)
    if o.fid_weights is not None and o.fid == "off":
        raise CLIError(f"{typed['fid_weights']} has no effect with {typed.get('fid', '--fid')} off")
    if o.data_dir is not None and not Path(o.data_dir).is_dir():
        raise CLIError(f"{typed['data_dir']} {o.data_dir}: not a folder", 1)
    ck = load_checkpoint(args.checkpoint)
    tc = _stored_config(ck).to_dict()
    plan = _sampler_plan(o, typed, tc)
    images = _levels(_stored_transform(ck)) is not None
    if o.data is None and not images:
        for k, what in (("draws", "dequantisation draws"), ("fid_weights", "FID")):
            if k in typed:
                raise CLIError(f"{typed[k]}: {what} apply to image data; this run was trained on vectors")
        if o.fid == "on":
            raise CLIError(f"{typed['fid']} on: FID applies to image data; this run was trained on vectors")
    if "split" in typed and o.data is None:
        src, why = _data_source(ck)
        if src is not None and src.streaming:
            raise CLIError(f"{typed['split']}: {src.name} is generated (no splits; its held-out set is a fixed draw)")
    if o.fid_weights is not None or o.fid == "on":
        from .evaluation.fid import resolve_fid_weights

        resolve_fid_weights(o.fid_weights)  # fails now (one line naming --fid-weights) rather than after sampling
    device = resolve_device(o.device)
    n_samples = o.n_samples if o.n_samples is not None else int(tc.get("final_samples", 5000))
    n_ode = o.n_ode if o.n_ode is not None else int(tc.get("final_ode", 500))
    if n_ode == 0:
        for k in ("ode_rtol", "ode_atol", "ode_trace"):
            if k in typed:
                raise CLIError(f"{typed[k]} has no effect: the ODE likelihood is skipped (--n-ode 0"
                               + ("" if o.n_ode is not None else ", the run's --final-ode") + ")")
    if o.data is not None:
        _check_data_path(o.data, typed.get("data", "--data"))
    try:
        res = evaluate_checkpoint(
            args.checkpoint, data=o.data, data_dir=o.data_dir, split=o.split, n_samples=n_samples,
            n_heldout=o.n_heldout, n_nll=o.n_nll, n_ode=n_ode, seed=o.seed, use_ema=not args.no_ema, ode=n_ode > 0,
            draws=o.draws, device=device, batch_size=o.batch_size, fid={"auto": None, "on": True, "off": False}[o.fid],
            fid_weights=o.fid_weights, ode_options=_ode_options(o), **plan,
        )
    except ValueError as e:
        raise _stored_data_error(e, ck) from None
    text = json.dumps(res, indent=2)
    if o.json:
        atomic_write_text(o.json, text + "\n")
    print(text)
    return 0


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="diffflow", description="Diffusion Normalizing Flow (DiffFlow) for PyTorch.", allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"diffflow_ext {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,sample,eval}", parser_class=_Parser)
    _train_parser(sub)
    _sample_parser(sub)
    _eval_parser(sub)
    return p


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, KeyError) and text.startswith(("'", '"')) and text.endswith(("'", '"')):
        text = text[1:-1]
    return text


# library exceptions that describe a user's mistake (their message is the error); anything else is a bug
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError, FloatingPointError, MemoryError)


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    prog = "diffflow"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        prog = f"diffflow {args.command}"
        _set_threads(args)
        return int(args.func(args) or 0)
    except CLIError as e:
        if debug:
            raise
        print(f"{e.prog or prog}: error: {_one_line(e)}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- the one place where errors become one line
        if debug:
            raise
        from .checkpoint import CheckpointError

        known = isinstance(e, (*_USER_ERRORS, OSError, CheckpointError)) or type(e).__module__.startswith(
            "diffflow_ext")
        msg = _one_line(e)
        if isinstance(e, OSError) and e.strerror:  # e.g. a name too long, a full disk: say which file
            name = str(e.filename or "")
            msg = f"{name if len(name) <= 120 else name[:60] + '...' + name[-40:]}: {e.strerror}".lstrip(": ")
        if not known:
            msg = f"{type(e).__name__}: {msg} (unexpected; rerun with {DEBUG_ENV}=1 for the traceback and report it)"
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
