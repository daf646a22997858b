"""Training loop for DiffFlow on 2-D toys or users' point files; single process or DDP (gloo/nccl).

Run ``diffflow train --help`` (or ``torchrun --nproc_per_node=K -m diffflow_ext.train ...``).

Determinism and resume: every random draw of training comes from state that is checkpointed -- the data
stream (a numpy ``Generator``), one ``torch.Generator`` per *shard* for the SDE noise and the flexible
grid, and the global torch / numpy / python RNGs. The global batch is split into ``shards`` equal shards
(``shards`` must be a multiple of the world size); shard ``k`` always uses noise stream ``k``. Hence

* ``k + m`` steps in one go equal ``k`` steps, then ``m`` more after ``--resume`` (bitwise on CPU);
* ``torchrun --nproc_per_node=2 ... --shards 2`` equals one process with ``--shards 2`` (up to the
  float rounding of the gradient all-reduce).

Data: the trainer standardises data per dimension (``z = (x - mean) / std``, statistics of 100k points
of a toy set or of the training split of a file) and the model lives in ``z`` space; likelihoods
are reported in data units (``metrics``). Files are split into train / held-out (``--holdout``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import EMA, CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint
from .data import toy2d
from .data.files import load_points

__all__ = ["TrainConfig", "DataSource", "Standardizer", "train", "main", "parse_progressive"]

CHECKPOINT_NAME = "checkpoint.safetensors"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------- config


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

    def __post_init__(self) -> None:
        errs = []
        for k in ("num_steps", "hidden", "depth", "batch_size", "shards", "time_dim", "eval_samples", "final_samples"):
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
        if self.gradient not in ("adjoint", "autograd"):
            errs.append(f"gradient must be 'adjoint' or 'autograd', got {self.gradient!r}")
        if self.dtype not in _DTYPES:
            errs.append(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")
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
        from .schedules import ProgressiveSteps

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
        raise ValueError(f"progressive must look like START:END or START:END:WARMUP_ITERS with 1 <= START <= END, got {spec!r}")
    return vals[0], vals[1], vals[2] if len(vals) == 3 else 1000


# ----------------------------------------------------------------------------- data


class Standardizer:
    """Per-dimension affine map between data units and model units ``z = (x - mean) / std``."""

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        if (self.std <= 0).any() or not np.isfinite(self.std).all():
            raise ValueError("data has a constant (zero-variance) or non-finite dimension; cannot standardise")

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardizer":
        return cls(x.mean(0), x.std(0))

    def to_model(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.std

    def to_data(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) * self.std + self.mean

    @property
    def log_scale(self) -> float:
        """``sum(log std)``: add to model-space NLL (nats) to get data-space NLL."""
        return float(np.log(self.std).sum())

    def state(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}


def _sha256_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float64).tobytes()).hexdigest()


class DataSource:
    """Training stream + held-out set for a toy dataset name or a ``.npy``/``.csv`` file."""

    def __init__(self, name: str, *, seed: int, holdout: float, toy=None, points=None, standardizer=None, sha=None):
        self.name, self.seed, self.holdout_frac = name, int(seed), float(holdout)
        self.toy = toy
        self.train_points: np.ndarray | None = None
        self.heldout_points: np.ndarray | None = None
        self.points: np.ndarray | None = points
        if toy is not None:
            self.dim = 2
            if standardizer is None:
                standardizer = Standardizer.fit(toy.sample_numpy(100_000, np.random.default_rng([self.seed, 1])))
        else:
            assert points is not None
            self.dim = points.shape[1]
            self.sha = _sha256_array(points)
            if sha is not None and sha != self.sha:
                raise ValueError(f"data file {name} changed since training (content hash differs)")
            perm = np.random.default_rng([self.seed, 3]).permutation(len(points))
            n_hold = int(round(self.holdout_frac * len(points))) if self.holdout_frac > 0 else 0
            if self.holdout_frac > 0:
                n_hold = max(1, n_hold)
            if len(points) - n_hold < 2:
                raise ValueError(f"data file {name}: only {len(points)} points, too few to train with holdout={holdout}")
            self.heldout_points = points[perm[:n_hold]]
            self.train_points = points[perm[n_hold:]]
            if standardizer is None:
                standardizer = Standardizer.fit(self.train_points)
        self.standardizer = standardizer

    @classmethod
    def build(cls, spec: str, *, seed: int, holdout: float = 0.1) -> "DataSource":
        spec = str(spec)
        looks_like_file = any(spec.lower().endswith(e) for e in (".npy", ".csv", ".txt", ".tsv")) or os.sep in spec
        if looks_like_file or Path(spec).is_file():
            pts = load_points(spec, dtype=torch.float64).numpy()
            return cls(str(Path(spec).resolve()), seed=seed, holdout=holdout, points=pts)
        return cls(toy2d.get(spec).name, seed=seed, holdout=holdout, toy=toy2d.get(spec))

    def state(self) -> dict:
        s = {"name": self.name, "seed": self.seed, "holdout": self.holdout_frac, "dim": self.dim,
             "kind": "toy" if self.toy is not None else "file", **self.standardizer.state()}
        if self.toy is None:
            s["sha256"] = self.sha
        return s

    @classmethod
    def from_state(cls, s: dict) -> "DataSource":
        std = Standardizer(s["mean"], s["std"])
        if s["kind"] == "toy":
            return cls(s["name"], seed=s["seed"], holdout=s["holdout"], toy=toy2d.get(s["name"]), standardizer=std)
        pts = load_points(s["name"], dtype=torch.float64).numpy()
        return cls(s["name"], seed=s["seed"], holdout=s["holdout"], points=pts, standardizer=std, sha=s.get("sha256"))

    def train_batch(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` training points in data units (consumes ``rng``)."""
        if self.toy is not None:
            return self.toy.sample_numpy(n, rng)
        return self.train_points[rng.integers(0, len(self.train_points), size=n)]

    def heldout(self, n: int) -> np.ndarray:
        """Held-out points in data units (deterministic)."""
        if self.toy is not None:
            return self.toy.sample_numpy(n, np.random.default_rng([self.seed, 2]))
        if self.heldout_points is None or len(self.heldout_points) == 0:
            return self.train_points[:n]
        return self.heldout_points[:n]


# ----------------------------------------------------------------------------- distributed helpers


def _dist_setup() -> tuple[int, int, bool]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    created = False
    if not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
        created = True
    return dist.get_rank(), dist.get_world_size(), created


def _bcast(obj, world: int):
    if world <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_states(states: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    if world <= 1:
        return states
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, {k: v.tolist() for k, v in states.items()})
    merged: dict[str, torch.Tensor] = {}
    for d in out:
        for k, v in d.items():
            merged[k] = torch.tensor(v, dtype=torch.uint8)
    return merged


# ----------------------------------------------------------------------------- training


def _pick_out_dir(cfg: TrainConfig, resume: str | None, overwrite: bool) -> Path:
    if cfg.out:
        out = Path(cfg.out)
        if (out / CHECKPOINT_NAME).exists() and not overwrite and not (
            resume and Path(resume).resolve().parent == out.resolve()
        ):
            raise FileExistsError(
                f"{out} already holds a training run; use --resume {out / CHECKPOINT_NAME} to continue it, "
                "--overwrite to replace it, or another --out"
            )
        return out
    if resume:
        return Path(resume).parent if Path(resume).is_file() else Path(resume)
    stem = Path(cfg.data).stem if Path(cfg.data).suffix else toy2d.get(cfg.data).name
    base = Path("runs") / stem
    out, k = base, 2
    while out.exists():
        out, k = base.with_name(f"{base.name}-{k}"), k + 1
    return out


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def train(
    cfg: TrainConfig,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    final_eval: bool = True,
    pictures: bool = True,
) -> dict:
    """Train; writes ``checkpoint.safetensors``, ``metrics.json``, pictures and ``log.jsonl`` under the
    output folder. Returns a summary dict (``out``, ``step``, ``metrics``, timings)."""
    from .model import DiffFlow

    rank, world, created_pg = _dist_setup()
    is_main = rank == 0
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))

    ck = None
    if resume:
        ck = load_checkpoint(resume)
        if "train_config" not in ck.extra:
            raise CheckpointError(f"{ck.path}: not a training checkpoint (no training config)")
        stored = TrainConfig.from_dict(ck.extra["train_config"])
        # training-defining options come from the checkpoint; only length / output / reporting may change
        keep = {"iters", "out", "eval_every", "ckpt_every", "eval_samples", "final_samples", "final_ode", "eval_lam"}
        cfg = dataclasses.replace(stored, **{k: getattr(cfg, k) for k in keep})
        resume = str(ck.path)
    shards = cfg.shards
    if shards % world:
        raise ValueError(f"--shards ({shards}) must be a multiple of the number of processes ({world})")
    local_shards = list(range(rank * shards // world, (rank + 1) * shards // world))
    shard_size = cfg.batch_size // shards

    # validate the data before anything is created on disk
    data = DataSource.from_state(ck.extra["data"]) if ck else DataSource.build(cfg.data, seed=cfg.seed, holdout=cfg.holdout)
    out = _bcast(str(_pick_out_dir(cfg, resume, overwrite)) if is_main else None, world)
    out = Path(out)
    cfg = dataclasses.replace(cfg, out=str(out))
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    dtype = _DTYPES[cfg.dtype]

    torch.manual_seed(cfg.seed)
    model = DiffFlow.mlp(
        data.dim, hidden=cfg.hidden, depth=cfg.depth, time_dim=cfg.time_dim, num_steps=cfg.max_steps(),
        t_start=cfg.t_start, t_end=cfg.t_end, time_exponent=cfg.time_exponent, diffusion=cfg.diffusion,
        gradient=cfg.gradient, backend=cfg.backend, grid=cfg.grid,
    ).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.lr_decay_every) if cfg.lr_decay_every else 10**12,
                                            gamma=cfg.lr_decay)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    data_rng = np.random.default_rng([cfg.seed, 0])
    noise = {f"noise{k}": torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * (k + 1)) for k in local_shards}
    step = 0
    if ck is not None:
        step = ck.restore(model=model, optimizer=opt, scheduler=sched, ema=ema, generators=noise,
                          numpy_rngs={"data": data_rng})
    schedule = cfg.steps_schedule()

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)

    def eval_model() -> DiffFlow:
        m = DiffFlow.from_config(model.config()).to(dtype)
        m.load_state_dict(model.state_dict())
        if ema is not None:
            ema.copy_to(m)
        return m.eval()

    def save(path: Path) -> None:
        gens = _gather_states({k: g.get_state() for k, g in noise.items()}, world)
        if is_main:
            save_checkpoint(
                path, model=model, optimizer=opt, scheduler=sched, ema=ema, step=step, generators=gens,
                numpy_rngs={"data": data_rng},
                extra={"train_config": cfg.to_dict(), "data": data.state(), "world_size": world},
            )

    log_path = out / "log.jsonl"
    if is_main:
        log(
            f"diffflow train: data={data.name} dim={data.dim} N={cfg.progressive or cfg.num_steps} grid={cfg.grid} "
            f"g={cfg.diffusion} net={cfg.depth}x{cfg.hidden} batch={cfg.batch_size} iters={cfg.iters} lr={cfg.lr} "
            f"processes={world} shards={shards} -> {out}" + (f" (resumed at step {step})" if ck else "")
        )
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.iters, initial=min(step, cfg.iters), disable=not (progress and is_main),
               dynamic_ncols=True, smoothing=0.1, desc="train")
    params = [p for p in model.parameters() if p.requires_grad]
    t_start = time.perf_counter()
    steps_run = 0
    loss_ema = None
    try:
        while step < cfg.iters:
            N = schedule(step)
            x = data.standardizer.to_model(data.train_batch(cfg.batch_size, data_rng))
            x = torch.from_numpy(x).to(dtype)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for j, k in enumerate(local_shards):
                xs = x[k * shard_size:(k + 1) * shard_size]
                sync = j == len(local_shards) - 1
                ctx = net.no_sync() if (world > 1 and not sync) else _null()
                with ctx:
                    lk = net(xs, noise[f"noise{k}"], num_steps=N, grid=cfg.grid)
                    (lk * (world / shards)).backward()
                total += float(lk.detach())
            loss_val = total / len(local_shards)
            if not math.isfinite(loss_val):
                raise FloatingPointError(
                    f"training diverged at step {step} (loss={loss_val}); try a smaller --lr, --clip 1, or float64")
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip) if cfg.clip > 0 else None
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            step += 1
            steps_run += 1
            loss_ema = loss_val if loss_ema is None else 0.95 * loss_ema + 0.05 * loss_val
            if bar.n < cfg.iters:
                bar.update(1)
            if step % 10 == 0 or step == cfg.iters:
                bar.set_postfix(loss=_fmt(loss_ema), N=N, lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
            if is_main and (step % 50 == 0 or step == cfg.iters):
                rec = {"step": step, "loss": loss_val, "loss_smooth": loss_ema, "N": N, "lr": sched.get_last_lr()[0],
                       "grad_norm": float(gnorm) if gnorm is not None else None,
                       "seconds": time.perf_counter() - t_start}
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.iters:
                save(out / CHECKPOINT_NAME)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.iters and is_main:
                from .metrics import evaluate_model

                m = evaluate_model(eval_model(), data.standardizer, data.heldout(2000), dataset=data.toy,
                                   n_samples=cfg.eval_samples, n_nll=1000, ode=False, seed=cfg.eval_seed,
                                   lam=cfg.eval_lam)
                keys = ("nelbo_nats", "sliced_wasserstein", "fraction_in_support")
                bar.write(f"step {step}: loss {_fmt(loss_ema)} " + " ".join(f"{k} {_fmt(m[k])}" for k in keys if k in m))
                with open(log_path, "a") as fh:
                    fh.write(json.dumps({"step": step, "eval": m}) + "\n")
    except KeyboardInterrupt:
        bar.close()
        if world == 1:
            save(out / CHECKPOINT_NAME)
            log(f"interrupted at step {step}; checkpoint saved to {out / CHECKPOINT_NAME} (continue with --resume)")
        raise
    bar.close()
    train_seconds = time.perf_counter() - t_start
    ckpt_path = out / CHECKPOINT_NAME
    save(ckpt_path)
    summary: dict[str, Any] = {
        "out": str(out), "checkpoint": str(ckpt_path), "step": step, "steps_run": steps_run,
        "train_seconds": round(train_seconds, 3),
        "iters_per_second": round(steps_run / train_seconds, 3) if train_seconds > 0 and steps_run else None,
        "final_loss": loss_ema, "world_size": world,
    }
    if is_main and final_eval:
        from .metrics import evaluate_checkpoint

        t0 = time.perf_counter()
        metrics, samples = evaluate_checkpoint(ckpt_path, n_samples=cfg.final_samples, n_ode=cfg.final_ode,
                                               ode=cfg.final_ode > 0, lam=cfg.eval_lam, return_samples=True)
        summary["eval_seconds"] = round(time.perf_counter() - t0, 3)
        atomic_write_text(out / "metrics.json", json.dumps({**metrics, "training": summary}, indent=2) + "\n")
        np.save(out / "samples.npy", samples)
        summary["metrics"] = metrics
        if pictures:
            from . import plotting

            t0 = time.perf_counter()
            ev = eval_model()
            plotting.samples_vs_data(samples, data.heldout(len(samples)), out / "samples.png",
                                     title=f"{Path(data.name).name}: step {step}",
                                     support=data.toy, metrics=metrics)
            plotting.trajectory_figure(ev, data.standardizer.to_model(data.heldout(2000)), out / "trajectories.png",
                                       seed=cfg.eval_seed, lam=cfg.eval_lam)
            summary["plot_seconds"] = round(time.perf_counter() - t0, 3)
        keys = ("fraction_in_support", "sliced_wasserstein", "nelbo_nats", "ode_nll_nats")
        log(f"done: {step} steps in {train_seconds:.1f}s ({summary['iters_per_second']} it/s); "
            + " ".join(f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics) + f"; outputs in {out}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if created_pg:
            dist.destroy_process_group()
    return summary


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main(argv: list[str] | None = None) -> int:
    """``python -m diffflow_ext.train ...`` == ``diffflow train ...`` (works under torchrun)."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
