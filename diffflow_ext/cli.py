"""``diffflow`` command line: ``train``, ``sample``, ``eval``.

Examples::

    diffflow train                                   # checkerboard, defaults tuned for a few CPU minutes
    diffflow train 2spirals --iters 4000 --out runs/spirals
    diffflow train my_points.npy --hidden 128 --progressive 5:30:1000
    diffflow train --resume runs/checkerboard/checkpoint.safetensors --iters 4000
    torchrun --nproc_per_node=2 -m diffflow_ext.train checkerboard --shards 2
    diffflow sample runs/checkerboard -n 10000 --lam 0.5 --out samples.npy
    diffflow eval runs/checkerboard
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _train_parser(sub) -> None:
    from .training.config import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a DiffFlow model", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train DiffFlow on a 2-D toy dataset or a .npy/.csv file of points.")
    p.add_argument("data", nargs="?", default=d.data,
                   help="dataset name (checkerboard, olympic_rings, four_rings, 2spirals, 8gaussians, moons, "
                        "swissroll, sierpinski_carpet, fractal_tree) or a .npy/.csv file of points (n, d)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<data>[-k])")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue a run from its checkpoint (file or run folder); --iters is the new total")
    g = p.add_argument_group("model / SDE")
    g.add_argument("-N", "--num-steps", type=int, default=None,
                   help=f"fixed number of SDE steps N (turns the default progressive schedule off; "
                        f"default: progressive {d.progressive})")
    g.add_argument("--progressive", default=None, metavar="START:END[:WARMUP]",
                   help=f"progressive N, rising from START to END over WARMUP iterations (default 1000); "
                        f"'none': fixed N (default: {d.progressive} unless -N is given)")
    g.add_argument("--grid", choices=("fixed", "flexible"), default=d.grid)
    g.add_argument("--g", "--diffusion", dest="diffusion", type=float, default=d.diffusion,
                   help="diffusion coefficient g")
    g.add_argument("--t-start", type=float, default=d.t_start)
    g.add_argument("--t-end", type=float, default=d.t_end)
    g.add_argument("--time-exponent", type=float, default=d.time_exponent)
    g.add_argument("--hidden", "--width", dest="hidden", type=int, default=d.hidden, help="MLP width")
    g.add_argument("--depth", type=int, default=d.depth, help="MLP hidden layers")
    g.add_argument("--gradient", choices=("adjoint", "autograd"), default=d.gradient)
    g.add_argument("--backend", default=d.backend, help="step-op backend (see diffflow_ext.available_backends())")
    g.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype)
    o = p.add_argument_group("optimisation")
    o.add_argument("-b", "--batch-size", type=int, default=d.batch_size, help="global batch size")
    o.add_argument("--iters", type=int, default=d.iters, help="total training iterations")
    o.add_argument("--lr", type=float, default=d.lr)
    o.add_argument("--lr-decay", type=float, default=d.lr_decay, help="step decay factor")
    o.add_argument("--lr-decay-every", type=int, default=d.lr_decay_every, help="iterations between decays (0: off)")
    o.add_argument("--ema", type=float, default=d.ema, help="EMA decay of the weights (0: off)")
    o.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clipping (0: off)")
    o.add_argument("--seed", type=int, default=d.seed)
    o.add_argument("--shards", type=int, default=None,
                   help="noise streams the batch is split into (default: number of processes); equal shards "
                        "make runs with different process counts identical")
    o.add_argument("--holdout", type=float, default=d.holdout, help="held-out fraction of a data file")
    e = p.add_argument_group("evaluation / output")
    e.add_argument("--eval-every", type=int, default=d.eval_every, help="iterations between evaluations (0: off)")
    e.add_argument("--eval-samples", type=int, default=d.eval_samples)
    e.add_argument("--final-samples", type=int, default=d.final_samples, help="samples for the final evaluation")
    e.add_argument("--final-ode", type=int, default=d.final_ode,
                   help="held-out points for the final ODE log-likelihood (0: skip)")
    e.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="iterations between checkpoints (0: end)")
    e.add_argument("--eval-seed", type=int, default=d.eval_seed)
    e.add_argument("--eval-lam", type=float, default=d.eval_lam,
                   help="lambda of the marginal-equivalent sampler used by the evaluations, pictures and "
                        "'diffflow sample' (1: DiffFlow's backward SDE, 0: probability-flow ODE); 0.5 gives "
                        "slightly sharper 2-D samples than 1 after short training")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    _threads_arg(p)
    p.set_defaults(func=_cmd_train)


def _threads_arg(p) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process (the small MLPs run fastest single-threaded, and "
                        "several threads per process thrash a busy machine); 0: torch's default")


def _set_threads(args) -> None:
    import torch

    if getattr(args, "threads", 0) and args.threads > 0:
        torch.set_num_threads(args.threads)


def _cmd_train(args) -> int:
    import os

    from .training import TrainConfig, train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    shards = args.shards if args.shards is not None else world
    d = TrainConfig()
    progressive = args.progressive if args.progressive is not None else (None if args.num_steps else d.progressive)
    num_steps = args.num_steps if args.num_steps is not None else d.num_steps
    cfg = TrainConfig(
        data=args.data, out=args.out, num_steps=num_steps, progressive=progressive, grid=args.grid,
        diffusion=args.diffusion, t_start=args.t_start, t_end=args.t_end, time_exponent=args.time_exponent,
        hidden=args.hidden, depth=args.depth, gradient=args.gradient, backend=args.backend, dtype=args.dtype,
        batch_size=args.batch_size, iters=args.iters, lr=args.lr, lr_decay=args.lr_decay,
        lr_decay_every=args.lr_decay_every, ema=args.ema, clip=args.clip, seed=args.seed, shards=shards,
        holdout=args.holdout, eval_every=args.eval_every, eval_samples=args.eval_samples,
        final_samples=args.final_samples, final_ode=args.final_ode, ckpt_every=args.ckpt_every, eval_seed=args.eval_seed,
        eval_lam=args.eval_lam,
    )
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if summary.get("metrics") is not None:
        print(json.dumps({k: summary[k] for k in ("out", "step", "train_seconds", "iters_per_second")}
                         | {"metrics": summary["metrics"]}, indent=2))
    return 0


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("-n", "--n", type=int, default=5000, help="number of samples")
    p.add_argument("--lam", type=float, default=None,
                   help="lambda of the marginal-equivalent SDE (1: DiffFlow's backward SDE, 0: probability-flow "
                        "ODE; default: the run's --eval-lam)")
    p.add_argument("-N", "--num-steps", type=int, default=None, help="sampling steps (default: trained N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--out", default=None, help="output .npy (default: <run>/samples_seed<seed>.npy)")
    p.add_argument("--png", default=None, help="picture path (default: next to --out; 'none' to skip)")
    _threads_arg(p)
    p.set_defaults(func=_cmd_sample)


def _cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .checkpoint import load_checkpoint
    from .training.data import DataSource

    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    ck = load_checkpoint(args.checkpoint)
    model = ck.build_model(use_ema=not args.no_ema)
    if args.lam is None:
        args.lam = float(ck.extra.get("train_config", {}).get("eval_lam", 1.0))
    z = model.sample(args.n, lam=args.lam, num_steps=args.num_steps, generator=torch.Generator().manual_seed(args.seed))
    z = z.double().numpy().reshape(args.n, -1)
    data = ck.extra.get("data")
    if data is not None:
        from .training.data import Standardizer

        x = Standardizer(data["mean"], data["std"]).to_data(z)
    else:
        x = z
    out = Path(args.out) if args.out else ck.path.parent / f"samples_seed{args.seed}.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, x.astype(np.float32))
    msg = {"samples": str(out), "n": args.n, "lam": args.lam, "num_steps": args.num_steps or model.num_steps}
    if args.png != "none":
        from . import plotting

        png = Path(args.png) if args.png else out.with_suffix(".png")
        title = f"{args.n} samples, lam={args.lam}"
        if data is not None:
            src = DataSource.from_state(data) if data["kind"] == "toy" or Path(data["name"]).exists() else None
            if src is not None:
                res = None
                if src.toy is not None and src.toy.sharp:
                    res = {"fraction_in_support": float(src.toy.contains(x).mean())}
                    msg.update(res)
                plotting.samples_vs_data(x, src.heldout(min(args.n, 20000)), png, title=title, metrics=res)
            else:
                plotting.plot_points(x, png, title)
        else:
            plotting.plot_points(x, png, title)
        msg["picture"] = str(png)
    print(json.dumps(msg, indent=2))
    return 0


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained model on held-out data",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--data", default=None,
                   help="held-out data: dataset name or .npy/.csv file (default: the run's held-out data)")
    p.add_argument("--n-samples", type=int, default=None, help="model samples (default: as in training)")
    p.add_argument("--n-heldout", type=int, default=5000)
    p.add_argument("--n-nll", type=int, default=2000, help="held-out points for the negative ELBO")
    p.add_argument("--n-ode", type=int, default=None,
                   help="held-out points for the ODE log-likelihood (0: skip; default: as in training)")
    p.add_argument("--lam", type=float, default=None, help="sampler lambda (default: the run's --eval-lam)")
    p.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's --eval-seed)")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--json", default=None, help="also write the metrics to this file")
    _threads_arg(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from .checkpoint import atomic_write_text, load_checkpoint
    from .metrics import evaluate_checkpoint

    tc = load_checkpoint(args.checkpoint).extra.get("train_config", {})
    n_samples = args.n_samples if args.n_samples is not None else int(tc.get("final_samples", 5000))
    n_ode = args.n_ode if args.n_ode is not None else int(tc.get("final_ode", 500))
    lam = args.lam if args.lam is not None else float(tc.get("eval_lam", 1.0))
    res = evaluate_checkpoint(
        args.checkpoint, data=args.data, n_samples=n_samples, n_heldout=args.n_heldout, n_nll=args.n_nll,
        n_ode=n_ode, lam=lam, seed=args.seed, use_ema=not args.no_ema, ode=n_ode > 0,
    )
    text = json.dumps(res, indent=2)
    if args.json:
        atomic_write_text(args.json, text + "\n")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="diffflow", description="Diffusion Normalizing Flow (DiffFlow) for PyTorch.")
    p.add_argument("--version", action="version", version=f"diffflow_ext {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,sample,eval}")
    _train_parser(sub)
    _sample_parser(sub)
    _eval_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError
    from .data import DataFileError, UnknownDatasetError

    try:
        _set_threads(args)
        return int(args.func(args) or 0)
    except (CheckpointError, DataFileError, UnknownDatasetError, FileExistsError, FileNotFoundError,
            ValueError, FloatingPointError) as e:
        print(f"diffflow {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"diffflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
