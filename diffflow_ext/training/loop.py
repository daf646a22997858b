"""The training loop: state construction, one optimisation step (:func:`train_step`), and :func:`train`.

Determinism and resume: every random draw of training comes from state that is checkpointed -- the data
stream (a numpy ``Generator``), one ``torch.Generator`` per *shard* for the SDE noise and the flexible
grid, and the global torch / numpy / python RNGs. Hence ``k + m`` steps in one go equal ``k`` steps, then
``m`` more after ``--resume`` (bitwise on CPU), also when the first part ended with Ctrl-C: the first
Ctrl-C lets the current step finish and saves the state as of that completed step (a second Ctrl-C
aborts at once without saving). ``torchrun --nproc_per_node=2 ... --shards 2`` equals one process with
``--shards 2`` (up to the float rounding of the gradient all-reduce).

Non-finite loss or gradients stop training with a one-line :class:`NonFiniteError` before the optimizer
step; the last good checkpoint is kept (a checkpoint with non-finite weights is never written).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointError, atomic_write_bytes, atomic_write_text, load_checkpoint, save_checkpoint
from .config import DTYPES, PRECISIONS, ConfigError, TrainConfig, resumable_fields, resume_config
from .distributed import DistContext, local_shards, setup
from .ema import EMA
from .run import BEST_NAME, CHECKPOINT_NAME, RunFolder, choose_out_dir

__all__ = ["train", "train_step", "TrainState", "StepStats", "NonFiniteError", "build_data", "build_model"]


#: sampling batch of the evaluations (also the unit in which the final samples are split across ranks)
EVAL_BATCH = 500
#: training examples drawn for a network's data-dependent initialisation (DiffFlow.init_from_data)
DATA_INIT_EXAMPLES = 20_000
#: fp16: this many consecutive overflowing (skipped) steps stop training
MAX_SKIPPED_STEPS = 25


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the message says where and what to change."""


@dataclass
class StepStats:
    loss: float
    grad_norm: float | None
    num_steps: int
    skipped: bool = False  # fp16: the grad scaler skipped this step (overflow)


@dataclass
class TrainState:
    """Everything that changes during training (all of it is checkpointed)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: EMA | None
    data_rng: np.random.Generator
    noise: dict[str, torch.Generator]
    scaler: Any = None
    step: int = 0
    extra: dict = field(default_factory=dict)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


# ----------------------------------------------------------------------------- construction


def build_data(cfg: TrainConfig):
    """The run's :class:`~diffflow_ext.data.DataSource` (a registered name or a path; ``--data-dir``)."""
    from ..data import data_source_options, get_data_source

    options = dict(cfg.data_options or {})
    takes = data_source_options(cfg.data)
    if takes is not None and "holdout" in takes:  # sources split at random (files, folders): --holdout applies
        options.setdefault("holdout", cfg.holdout)
    return get_data_source(cfg.data, data_dir=cfg.data_dir, seed=cfg.seed, **options)


def network_arguments(cfg: TrainConfig) -> tuple[str, dict]:
    """``(network name, its keyword arguments)``: ``--network`` with ``--network-option``s; the MLP's width,
    depth and time embedding come from ``--hidden/--depth/--time-dim``."""
    name = cfg.network
    kwargs = dict(cfg.network_options or {})
    if name == "mlp":
        kwargs = {"hidden": cfg.hidden, "depth": cfg.depth, "time_dim": cfg.time_dim, **kwargs}
    return name, kwargs


def build_model(cfg: TrainConfig, shape: tuple[int, ...], device: torch.device):
    """The DiffFlow of a run on samples of ``shape`` (initialised from ``cfg.seed``), on ``device``."""
    from ..model import DiffFlow

    torch.manual_seed(cfg.seed)
    kwargs: dict[str, Any] = dict(
        num_steps=cfg.max_steps(), t_start=cfg.t_start, t_end=cfg.t_end, time_exponent=cfg.time_exponent,
        diffusion=cfg.diffusion, prior_std=cfg.prior_std, prior=cfg.prior, gradient=cfg.gradient, backend=cfg.backend,
        grid=cfg.grid,
        autocast_dtype=PRECISIONS[cfg.precision],
    )
    if cfg.memory_budget is not None:
        kwargs["memory_budget"] = cfg.memory_budget
    name, net_kwargs = network_arguments(cfg)
    model = DiffFlow.from_networks(name, tuple(shape), net_kwargs, **kwargs)
    return model.to(device=device, dtype=DTYPES[cfg.dtype])


def noise_generators(cfg: TrainConfig, shards: list[int], device: torch.device) -> dict[str, torch.Generator]:
    """One generator per shard ``k``, seeded from ``(seed, k)`` only (independent of the process count)."""
    return {f"noise{k}": torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + 7919 * (k + 1))
            for k in shards}


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """The learning-rate multiplier after ``it`` optimizer steps: linear warm-up over ``lr_warmup`` steps, then
    ``lr_schedule`` over the remaining steps (step: ``lr_decay`` every ``lr_decay_every``; cosine: to 0 at
    ``iters``; constant)."""
    warm, kind = int(cfg.lr_warmup), cfg.lr_schedule

    def factor(it: int) -> float:
        f = min(1.0, (it + 1) / warm) if warm else 1.0
        k = max(0, it - warm)
        if kind == "step" and cfg.lr_decay_every:
            f *= cfg.lr_decay ** (k // cfg.lr_decay_every)
        elif kind == "cosine":
            f *= 0.5 * (1.0 + math.cos(math.pi * min(k, max(1, cfg.iters - warm)) / max(1, cfg.iters - warm)))
        return f

    return factor


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer):
    """The LR scheduler of a run: plain step decay as ``StepLR`` (the default), anything else as ``LambdaLR``
    over :func:`lr_factor`."""
    if cfg.lr_schedule == "step" and not cfg.lr_warmup:
        step_size = max(1, cfg.lr_decay_every) if cfg.lr_decay_every else 10**12
        return torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=cfg.lr_decay)
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))


def build_state(cfg: TrainConfig, data, ctx: DistContext, shards: list[int]) -> TrainState:
    """Model, optimizer, LR schedule, EMA, grad scaler and generators of a new run on ``data``."""
    model = build_model(cfg, data.shape, ctx.device)
    if model.wants_data_init:  # before the optimizer and the EMA copy the weights; a resumed run's checkpoint
        # overwrites them. Its own generator: the data stream and the noise are those of a run without it
        x = data.train_batch(DATA_INIT_EXAMPLES, np.random.default_rng([cfg.seed, 3]), device=ctx.device,
                             dtype=DTYPES[cfg.dtype])
        model.init_from_data(x)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = build_scheduler(cfg, opt)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    scaler = torch.amp.GradScaler(ctx.device.type) if cfg.precision == "fp16" else None
    return TrainState(model=model, optimizer=opt, scheduler=sched, ema=ema,
                      data_rng=np.random.default_rng([cfg.seed, 0]), noise=noise_generators(cfg, shards, ctx.device),
                      scaler=scaler)


# ----------------------------------------------------------------------------- one step


def train_step(state: TrainState, net: torch.nn.Module, x: torch.Tensor, *, shards: list[int], total_shards: int,
               world: int, num_steps: int, grid: str, clip: float, any_rank: Callable[[bool], bool] = bool
               ) -> StepStats:
    """One optimisation step on the local part ``x`` of the global batch (``len(shards)`` equal shards).

    Raises :class:`NonFiniteError` (before touching the weights) on a non-finite loss or gradient norm;
    with an fp16 grad scaler an overflowing step is skipped instead (``StepStats.skipped``).
    """
    model, opt, scaler = state.model, state.optimizer, state.scaler
    size = x.shape[0] // len(shards)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for j, k in enumerate(shards):
        xs = x[j * size:(j + 1) * size]
        sync = j == len(shards) - 1
        ctx = net.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
        with ctx:
            lk = net(xs, state.noise[f"noise{k}"], num_steps=num_steps, grid=grid)
            scaled = lk * (world / total_shards)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += float(lk.detach())
    loss = total / len(shards)
    if any_rank(not math.isfinite(loss)):
        raise NonFiniteError(f"non-finite loss ({loss})")
    params = [p for p in model.parameters() if p.requires_grad]
    if scaler is not None:
        scaler.unscale_(opt)
    if clip > 0:
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    else:
        gnorm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    if not math.isfinite(gnorm):
        if scaler is None:
            raise NonFiniteError(f"non-finite gradient norm ({gnorm})")
        scaler.step(opt)  # skips the update, lowers the scale
        scaler.update()
        state.scheduler.step()
        state.step += 1
        return StepStats(loss, gnorm, num_steps, skipped=True)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update(model)
    state.step += 1
    return StepStats(loss, gnorm, num_steps)


# ----------------------------------------------------------------------------- Ctrl-C


class _StopRequest:
    """First SIGINT (Ctrl-C) or SIGTERM (``kill``, a scheduler's preemption, torchrun's shutdown): finish the
    current step, then stop; a second one: ``KeyboardInterrupt`` at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc) -> bool:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ----------------------------------------------------------------------------- the loop


def _is_finite_model(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train(
    cfg: TrainConfig,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    final_eval: bool = True,
    pictures: bool = True,
    hooks: Sequence[Callable[[TrainState, StepStats], None]] = (),
    source=None,
) -> dict:
    """Train; writes ``checkpoint.safetensors``, ``metrics.json``, pictures and ``log.jsonl`` under the
    output folder. Returns a summary dict (``out``, ``step``, ``metrics``, timings).

    ``hooks``: callables ``hook(state, stats)`` run on every process after each completed step (after the
    built-in logging, checkpointing and evaluation of that step). ``source``: the data source of ``cfg``
    when the caller already built it (saves loading it twice); ignored on ``resume`` (the checkpoint's).
    Errors (bad options, data, checkpoint, output folder) are raised before anything is written.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    ck = None
    if resume:
        ck = load_checkpoint(resume)
        if "train_config" not in ck.extra:
            raise CheckpointError(f"{ck.path}: not a training checkpoint (no training config)")
        cfg = _resumed_config(ck, cfg)
        resume = str(ck.path)
        if cfg.iters <= ck.step:
            raise ValueError(f"--iters {cfg.iters}: the checkpoint is already at step {ck.step}; --iters is the new "
                             f"total, give more than {ck.step} (or use 'diffflow eval' to evaluate it)")
    elif cfg.iters < 1:
        raise ValueError(f"--iters {cfg.iters}: nothing to train; give the number of training iterations (>= 1)")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)")
    ctx = setup(cfg.device)
    try:
        return _train(cfg, ctx, ck, resume=resume, overwrite=overwrite, progress=progress, log=log,
                      final_eval=final_eval, pictures=pictures, hooks=tuple(hooks), source=source)
    finally:
        ctx.close()


def _resumed_config(ck, cfg: TrainConfig) -> TrainConfig:
    """The checkpoint's configuration with the options that may change on resume taken from ``cfg``; any other
    option of ``cfg`` that is not at its default and contradicts the checkpoint is a ``ConfigError``."""
    resumable = set(resumable_fields())
    defaults = TrainConfig().to_dict()
    explicit = {k: v for k, v in cfg.to_dict().items() if k not in resumable and v != defaults.get(k)}
    try:
        base = resume_config(ck.extra["train_config"], explicit)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ck.path}: invalid stored training options: {e}") from None
    return dataclasses.replace(base, **{k: getattr(cfg, k) for k in resumable})


def _train(cfg: TrainConfig, ctx: DistContext, ck, *, resume, overwrite, progress, log, final_eval, pictures,
           hooks, source) -> dict:
    from ..model import DiffFlow

    shards = local_shards(cfg.shards, ctx.rank, ctx.world)
    # validate the data and the output folder before anything is created on disk
    if ck is not None:
        from ..data import data_source_from_state

        data = data_source_from_state(ck.extra["data"], data_dir=cfg.data_dir)
    else:
        data = source if source is not None else build_data(cfg)
    if cfg.keep_best and "val" not in data.splits:
        why = ("it draws fresh data every batch, so it cannot overfit" if data.streaming else
               f"its splits are {', '.join(data.splits)}; choosing weights on the test split would bias the reported "
               "figures")
        raise ValueError(f"--keep-best: {data.name} has no validation split ({why})")
    inputs = tuple(n for n in (data.name, str(cfg.data)) if Path(n).is_file())
    out = Path(ctx.on_main(lambda: str(choose_out_dir(cfg.out, data=cfg.data if not ck else data.name,
                                                      resume=resume, overwrite=overwrite, inputs=inputs)[0])))
    cfg = dataclasses.replace(cfg, out=str(out))
    state = build_state(cfg, data, ctx, shards)
    if ck is not None:
        saved_device = ck.extra.get("device_type", "cpu")
        if saved_device != ctx.device.type:
            raise CheckpointError(f"{ck.path}: its noise streams were saved on {saved_device}; resume with "
                                  f"--device {saved_device} (exact resume needs the same device type)")
        state.step = ck.restore(model=state.model, optimizer=state.optimizer, scheduler=state.scheduler,
                                ema=state.ema, generators=state.noise, numpy_rngs={"data": state.data_rng})
        if state.scaler is not None and "grad_scaler" in ck.extra:
            state.scaler.load_state_dict(ck.extra["grad_scaler"])
    folder = RunFolder(out, is_main=ctx.is_main)
    ckpt_path = out / CHECKPOINT_NAME
    have_checkpoint = ck is not None

    net = state.model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(state.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    def eval_model(weights: dict[str, torch.Tensor] | None = None) -> DiffFlow:
        """A copy of the model for evaluation: with ``weights``, those; else the current (EMA) weights."""
        m = DiffFlow.from_config(state.model.config()).to(device=ctx.device, dtype=DTYPES[cfg.dtype])
        m.load_state_dict(weights if weights is not None else state.model.state_dict())
        if weights is None and state.ema is not None:
            state.ema.copy_to(m)
        return m.eval()

    # --keep-best: the best periodic evaluation so far ({"step", "nelbo_nats", "since"}: evaluations since it) and
    # its evaluation weights, kept on every rank (the final samples may be drawn by all of them)
    best_path = out / BEST_NAME
    best: dict[str, Any] = dict(ck.extra.get("best") or {}) if ck is not None else {}
    best_weights: dict[str, torch.Tensor] | None = None
    if cfg.keep_best and best and best_path.is_file():
        best_weights = load_checkpoint(best_path).build_model(use_ema=True).state_dict()

    def final_model() -> DiffFlow:
        """The weights the run reports: the best evaluation's with --keep-best, else the last (EMA) ones."""
        return eval_model(best_weights)

    def save(path: Path) -> None:
        if not _is_finite_model(state.model):  # the same weights on every rank: all of them stop
            raise NonFiniteError(f"weights became non-finite at step {state.step}; not saving them")
        gens = ctx.gather_states({k: g.get_state() for k, g in state.noise.items()})
        if not ctx.is_main:
            return
        extra = {"train_config": cfg.to_dict(), "data": data.state(), "world_size": ctx.world,
                 "device_type": ctx.device.type, "best": best or None}
        if state.scaler is not None:
            extra["grad_scaler"] = state.scaler.state_dict()
        save_checkpoint(path, model=state.model, optimizer=state.optimizer, scheduler=state.scheduler,
                        ema=state.ema, step=state.step, generators=gens, numpy_rngs={"data": state.data_rng},
                        extra=extra)
        folder.commit()

    from tqdm.auto import tqdm

    schedule = cfg.steps_schedule()
    dtype = DTYPES[cfg.dtype]
    start_step = state.step
    t_start = time.perf_counter()
    loss_ema = None
    interrupted = False
    skipped_in_a_row = 0
    gradient_plan = None
    bar = None
    saved_at = -1
    stopped_early = None
    # from here on files are written: a failure before the first checkpoint removes what this run created
    ctx.on_main(lambda: folder.open(replace_run=overwrite and ck is None and (out / CHECKPOINT_NAME).exists()))
    folder.file(CHECKPOINT_NAME)
    try:
        if ctx.is_main:
            log(f"diffflow train: data={data.name} dim={data.dim} N={cfg.progressive or cfg.num_steps} "
                f"grid={cfg.grid} g={cfg.diffusion} net={_describe_network(cfg)} batch={cfg.batch_size} "
                f"iters={cfg.iters} lr={cfg.lr} device={ctx.device} precision={cfg.precision} "
                f"gradient={cfg.gradient} processes={ctx.world} shards={cfg.shards} -> {out}"
                + (f" (resumed at step {state.step})" if ck else ""))
        tb = folder.enable_tensorboard() if cfg.tensorboard else False
        bar = tqdm(total=cfg.iters, initial=min(state.step, cfg.iters), disable=not (progress and ctx.is_main),
                   dynamic_ncols=True, smoothing=0.1, desc="train", file=sys.stderr)
        with _StopRequest() as stop:  # held through the final save: a Ctrl-C there cannot cut it short
            while state.step < cfg.iters:
                if ctx.any(stop.requested is not None):
                    interrupted = stop.requested or "a stop request on another process"
                    break
                N = schedule(state.step)
                # every process draws the global batch (one data stream, as in a single process) and keeps its shards
                x = data.train_batch(cfg.batch_size, state.data_rng, device=ctx.device, dtype=dtype)
                lo = shards[0] * (cfg.batch_size // cfg.shards)
                x = x[lo:lo + len(shards) * (cfg.batch_size // cfg.shards)]
                try:
                    st = train_step(state, net, x, shards=shards, total_shards=cfg.shards, world=ctx.world,
                                    num_steps=N, grid=cfg.grid, clip=cfg.clip, any_rank=ctx.any)
                except NonFiniteError as e:
                    where = (f"the last good checkpoint {ckpt_path} is kept" if have_checkpoint
                             else "no checkpoint was written")
                    raise NonFiniteError(f"training stopped at step {state.step + 1}: {e}; {where}; try a smaller "
                                         "--lr, gradient clipping (--clip 1) or --dtype float64") from None
                if gradient_plan is None:
                    gradient_plan = _report_gradient_plan(state.model, cfg, ctx, folder, log, state.step)
                skipped_in_a_row = skipped_in_a_row + 1 if st.skipped else 0
                if skipped_in_a_row >= MAX_SKIPPED_STEPS:
                    raise NonFiniteError(
                        f"training stopped at step {state.step}: {MAX_SKIPPED_STEPS} fp16 steps in a row overflowed "
                        "(non-finite gradients); try --precision bf16 or a smaller --lr")
                step = state.step
                loss_ema = st.loss if loss_ema is None else 0.95 * loss_ema + 0.05 * st.loss
                if bar.n < cfg.iters:
                    bar.update(1)
                if step % 10 == 0 or step == cfg.iters:
                    bar.set_postfix(loss=_fmt(loss_ema), N=N, lr=f"{state.scheduler.get_last_lr()[0]:.2e}",
                                    refresh=False)
                if ctx.is_main and (step % cfg.log_every == 0 or step == cfg.iters):
                    rec = {"step": step, "loss": st.loss, "loss_smooth": loss_ema, "N": N,
                           "lr": state.scheduler.get_last_lr()[0], "grad_norm": st.grad_norm,
                           "seconds": time.perf_counter() - t_start}
                    if state.scaler is not None:
                        rec["grad_scale"] = float(state.scaler.get_scale())
                    folder.log(rec)
                    if tb:
                        folder.scalars(step, rec)
                if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.iters:
                    save(ckpt_path)
                    have_checkpoint = True
                # periodic evaluations (the last step's is the final evaluation, on the test split) -- with
                # --keep-best the last step is also compared on the validation split, so a run still improving
                # keeps its last weights
                if cfg.eval_every and ((step % cfg.eval_every == 0 and step < cfg.iters)
                                       or (cfg.keep_best and step == cfg.iters)):
                    value = None
                    if ctx.is_main:
                        from ..evaluation import evaluate_model

                        # periodic evaluations watch the validation split where the source has one, so that
                        # choices made from the curve (iterations, early stopping) never look at the test split
                        m = evaluate_model(eval_model(), data, split="val" if "val" in data.splits else "test",
                                           n_heldout=2000, n_samples=cfg.eval_samples, n_nll=1000,
                                           ode=False, seed=cfg.eval_seed, lam=cfg.eval_lam, fid=False)
                        value = m.get("nelbo_nats")
                        keys = ("nelbo_nats", "nelbo_bits_per_dim", "sliced_wasserstein", "fraction_in_support")
                        bar.write(f"step {step}: loss {_fmt(loss_ema)} [{m.get('split', 'test')}] "
                                  + " ".join(f"{k} {_fmt(m[k])}" for k in keys if k in m), file=sys.stderr)
                        folder.log({"step": step, "eval": m})
                        if tb:
                            folder.scalars(step, {k: v for k, v in m.items() if isinstance(v, float)}, prefix="eval")
                    if cfg.keep_best:
                        better = value is not None and math.isfinite(value) and (
                            not best or value < best["nelbo_nats"])
                        if ctx.any(better):  # decided on rank 0; every rank saves (the save gathers the noise)
                            best = {"step": step, "nelbo_nats": value, "since": 0} if ctx.is_main else {"step": step}
                            best_weights = eval_model().state_dict()
                            folder.file(BEST_NAME)
                            save(best_path)
                        elif best:
                            best["since"] = best.get("since", 0) + 1
                        if ctx.is_main and best:
                            folder.log({"step": step, "best": dict(best)})
                        if cfg.patience and ctx.any(ctx.is_main and best.get("since", 0) >= cfg.patience):
                            stopped_early = step
                            if ctx.is_main:
                                bar.write(f"step {step}: early stop, no lower validation -ELBO in {cfg.patience} "
                                          f"evaluations since step {best['step']}", file=sys.stderr)
                for hook in hooks:
                    hook(state, st)
                if stopped_early is not None:
                    break
            train_seconds = time.perf_counter() - t_start
            bar.close()
            if not interrupted:
                save(ckpt_path)
                saved_at, have_checkpoint = state.step, True
                interrupted = stop.requested or False  # a stop request during the final save: skip the evaluation
    except BaseException:
        if bar is not None:
            bar.close()
        if not have_checkpoint:
            folder.discard()
        folder.close()
        raise
    if interrupted:
        if state.step > start_step or have_checkpoint:
            if saved_at != state.step:
                save(ckpt_path)
            if ctx.is_main:
                log(f"interrupted ({interrupted}) after step {state.step}; checkpoint saved to {ckpt_path} "
                    f"(continue with --resume {ckpt_path})")
        else:
            folder.discard()
            if ctx.is_main:
                log("interrupted before the first step; nothing was written")
        folder.close()
        raise KeyboardInterrupt
    steps_run = state.step - start_step
    summary: dict[str, Any] = {
        "out": str(out), "checkpoint": str(ckpt_path), "step": state.step, "steps_run": steps_run,
        "train_seconds": round(train_seconds, 3),
        "iters_per_second": round(steps_run / train_seconds, 3) if train_seconds > 0 and steps_run else None,
        "final_loss": loss_ema, "world_size": ctx.world, "device": str(ctx.device), "precision": cfg.precision,
        "gradient": cfg.gradient, "gradient_plan": gradient_plan or None,
    }
    if cfg.keep_best:
        summary["best"] = ({"step": best["step"], "nelbo_nats": best.get("nelbo_nats"), "checkpoint": str(best_path)}
                           if best_weights is not None else None)
        summary["stopped_early_at"] = stopped_early
    report_path = best_path if best_weights is not None else ckpt_path
    t0 = time.perf_counter()
    # under torchrun the final samples are drawn by all ranks (batch i on rank i % world), gathered on rank 0
    split = {"samples": _sample_across_ranks(final_model(), cfg, ctx)} if (final_eval and ctx.distributed) else {}
    if ctx.is_main and final_eval:
        from ..evaluation import evaluate_checkpoint

        metrics, samples = evaluate_checkpoint(report_path, n_samples=cfg.final_samples, n_ode=cfg.final_ode,
                                               ode=cfg.final_ode > 0, lam=cfg.eval_lam, device=ctx.device,
                                               data_dir=cfg.data_dir, batch_size=EVAL_BATCH, return_samples=True,
                                               **split)
        summary["eval_seconds"] = round(time.perf_counter() - t0, 3)
        atomic_write_text(folder.file("metrics.json"), json.dumps({**metrics, "training": summary}, indent=2) + "\n")
        buf = io.BytesIO()
        np.save(buf, samples)
        atomic_write_bytes(folder.file("samples.npy"), buf.getvalue())
        summary["metrics"] = metrics
        if tb:
            folder.scalars(state.step, {k: v for k, v in metrics.items() if isinstance(v, float)}, prefix="final")
        if pictures:
            t0 = time.perf_counter()
            write_pictures(final_model(), data, samples, folder, step=metrics.get("step", state.step), metrics=metrics,
                           seed=cfg.eval_seed, lam=cfg.eval_lam)
            summary["plot_seconds"] = round(time.perf_counter() - t0, 3)
        keys = ("fraction_in_support", "sliced_wasserstein", "nelbo_nats", "ode_nll_nats", "nelbo_bits_per_dim",
                "ode_bits_per_dim", "fid")
        if best_weights is not None:
            log(f"evaluated the best weights: step {best['step']} of {state.step}"
                + (f" (stopped early at step {stopped_early})" if stopped_early is not None else "")
                + f"; {best_path}")
        log(f"done: {state.step} steps in {train_seconds:.1f}s ({summary['iters_per_second']} it/s); "
            + " ".join(f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics) + f"; outputs in {out}")
    folder.close()
    ctx.barrier()
    return summary




def _sample_across_ranks(model, cfg: TrainConfig, ctx: DistContext) -> torch.Tensor | None:
    """The final evaluation's samples, drawn in batches split across the ranks; on rank 0 (``None`` elsewhere).

    Batch ``i`` always uses the generator seed ``batch_seed(sampling seed, i)``, so the gathered samples equal
    those a single-process ``diffflow eval`` draws.
    """
    from ..evaluation import sample_model, sampling_seed

    n_batches = -(-cfg.final_samples // EVAL_BATCH)
    mine = list(range(ctx.rank, n_batches, ctx.world))
    z = sample_model(model, cfg.final_samples, lam=cfg.eval_lam, seed=sampling_seed(cfg.eval_seed),
                     batch_size=EVAL_BATCH, batches=mine)
    parts = ctx.gather_to_main(z)
    if parts is None:
        return None
    chunks: dict[int, torch.Tensor] = {}
    for r, zr in enumerate(parts):
        offset = 0
        for i in range(r, n_batches, ctx.world):
            m = min(EVAL_BATCH, cfg.final_samples - i * EVAL_BATCH)
            chunks[i] = zr[offset:offset + m]
            offset += m
    return torch.cat([chunks[i] for i in range(n_batches)])


def _describe_network(cfg: TrainConfig) -> str:
    name, kwargs = network_arguments(cfg)
    if name == "mlp":
        return f"mlp {kwargs['depth']}x{kwargs['hidden']}"
    return name + (f"({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else "")


def _report_gradient_plan(model, cfg: TrainConfig, ctx: DistContext, folder: RunFolder, log, step: int) -> dict:
    """Once per run: what the gradient mode kept and recomputed under the memory budget (log + ``log.jsonl``)."""
    plan = dict(getattr(model, "last_gradient_plan", None) or {})
    if ctx.is_main and plan:
        budget = plan.get("budget_bytes")
        per = plan.get("graph_bytes_per_state")
        text = (f"gradient {cfg.gradient}: keeps the network graphs of {plan.get('kept')}/{plan.get('states')} states, "
                f"recomputes {plan.get('recomputed')}")
        if cfg.gradient == "auto":
            text += (f" (schedule {plan.get('schedule')}, memory budget "
                     + ("unlimited" if budget is None else f"{budget / 2**20:.1f} MiB")
                     + ("" if per is None else f", {per / 2**20:.2f} MiB per kept state") + ")")
        log(text)
        folder.log({"step": step, "gradient_plan": plan, "memory_budget": cfg.memory_budget})
    return plan


def write_pictures(model, data, samples, folder: RunFolder, *, step: int, metrics: dict, seed: int, lam: float) -> None:
    """``samples.png`` (samples beside held-out data, or a sample grid for images) and ``trajectories.png``
    (forward / backward trajectories, or trajectory strips for images)."""
    from .. import plotting

    title = f"{Path(data.name).name}: step {step}"
    if data.kind == "image":
        plotting.sample_grid(samples, folder.file("samples.png"), title=title, levels=data.levels)
        x = data.heldout(8)
        plotting.trajectory_strip(model, data.to_model(x, False), folder.file("trajectories.png"), seed=seed,
                                  lam=lam, to_unit=data.transform.to_unit)
        return
    held = data.heldout(len(samples)).double().numpy().reshape(-1, data.dim)
    if data.dim < 2:  # 1-D data: the samples beside the data as (value, 0) points
        samples, held = (np.concatenate([a, np.zeros_like(a)], 1) for a in (samples, held))
    if data.dim == 2:
        plotting.samples_vs_data(samples, held, folder.file("samples.png"), title=title, support=data.support,
                                 metrics=metrics)
        plotting.trajectory_figure(model, data.to_model(data.heldout(2000), dtype=torch.float64).numpy(),
                                   folder.file("trajectories.png"), seed=seed, lam=lam)
    else:
        what = " (first two coordinates)" if data.dim > 2 else " (1-D)"
        plotting.samples_vs_data(samples[:, :2], held[:, :2], folder.file("samples.png"), title=title + what,
                                 metrics=metrics)
