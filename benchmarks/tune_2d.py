"""Proxy runs used to choose the 2-D point defaults (docs/quality_2d.md, "Tuning"): train the ``points`` defaults
plus overrides on TUNING sets only, report the fraction of samples inside the support at lam 0, 0.5 and 1 (3000
samples each), and the training CPU seconds (one thread).

    python benchmarks/tune_2d.py NAME SETS ITERS [JSON_OVERRIDES]
    python benchmarks/tune_2d.py base sharp_8,sharp_10,sharp_11,checkerboard 800
    python benchmarks/tune_2d.py g-rise sharp_8,sharp_10,sharp_11,checkerboard 800 \\
        '{"diffusion": {"start": 0.2, "end": 1.0}, "lr": 0.02, "lr_schedule": "cosine"}'
    python benchmarks/tune_2d.py b512 fine_grid,thin_tree 6000 '{"batch_size": 512}'

SETS: built-in names, tuning seeds of the generated family (``sharp_0`` ... ``sharp_999``) and three tuning-only
ANALOGUES of the built-ins sierpinski_carpet and fractal_tree (which are reported sets, never tuned on):
``fine_grid`` (a base-4 grid fractal, level 3: the two diagonal cells (1,1), (2,2) removed at every level, smallest
hole 2/64 of the side; holes are 33% of the square), ``notch_carpet`` (the carpet's scale with another pattern: a
base-3 level-4 grid fractal with the edge cell (0, 1) removed at every level; smallest hole 2/81, holes 38% of the
square, as in the carpet) and ``thin_tree`` (a binary tree of depth 8, branch angle
+-35 deg, length ratio 0.7, half-width 0.025 shrinking by 0.8 per level, tolerance 0.01).

Override keys are TrainConfig fields, plus ``_fs`` / ``_ss``: a constant factor on the drift's / score's output
(preconditioning ablation). Held-out sets (sharp2d.HELDOUT_SEEDS) and the reported built-ins sierpinski_carpet /
fractal_tree are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_2d as q  # noqa: E402
from _common import OneLineParser  # noqa: E402

import diffflow_ext.training.loop as loop  # noqa: E402
from diffflow_ext.data import sharp2d, toy2d  # noqa: E402
from diffflow_ext.training.config import TrainConfig, resolve_config  # noqa: E402

SCALE_KEYS = ("_fs", "_ss")
REPORTED_BUILTINS = ("sierpinski_carpet", "fractal_tree")  # their analogues below are tuned on instead


class FineGrid(toy2d.Toy2D):
    """A base-``base`` grid fractal on ``[-1, 1]^2``: the cells ``removed`` are holes at every level."""

    name = "fine_grid"
    sharp = True
    tol = 0.0
    description = "base-4 grid fractal, level 3, diagonal cells (1,1) and (2,2) removed"

    def __init__(self, base: int = 4, removed=((1, 1), (2, 2)), level: int = 3):
        self.base, self.level = base, level
        self.removed = np.array(removed)
        self.digits = np.array([(i, j) for i in range(base) for j in range(base) if (i, j) not in set(removed)])
        keep = len(self.digits) / base**2
        self.entropy = float(np.log(4 * keep**level))

    def _sample(self, n, rng):
        u, cell = np.zeros((n, 2)), 1.0
        for _ in range(self.level):
            cell /= self.base
            u += self.digits[rng.integers(0, len(self.digits), size=n)] * cell
        return 2 * (u + rng.random((n, 2)) * cell) - 1

    def distance(self, points):
        """Distance to the support: 0 on it, else the distance to the hole cell's boundary (the removed cells
        touch at most at corners, so that boundary belongs to the support) or to the square."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        d = np.sqrt((np.maximum(np.abs(p) - 1, 0) ** 2).sum(1))
        u = (np.clip(p, -1, 1) + 1) / 2
        origin, size = np.zeros_like(u), 1.0
        done = d > 0
        for _ in range(self.level):
            size /= self.base
            digit = np.clip(np.floor((u - origin) / size), 0, self.base - 1)
            hole = (digit[:, None, :] == self.removed[None]).all(-1).any(1) & ~done
            lo = origin + digit * size
            gap = np.minimum(u - lo, lo + size - u).min(1)
            d = np.where(hole, 2 * np.maximum(gap, 0.0), d)
            done |= hole
            origin = lo
        return d


class NotchCarpet(FineGrid):
    """The carpet's scale without the carpet: a base-3 level-4 grid fractal with the edge cell (0, 1) removed at
    every level (smallest hole 2/81 of the side and holes 1 - (8/9)^4 = 38% of the square, as in the carpet)."""

    name = "notch_carpet"
    description = "base-3 grid fractal, level 4, edge cell (0,1) removed"

    def __init__(self):
        super().__init__(base=3, removed=((0, 1),), level=4)


class ThinTree(toy2d.FractalTree):
    name = "thin_tree"
    description = "binary tree, depth 8, angle 35 deg, ratio 0.7, half-width 0.025"

    def __init__(self):
        super().__init__(depth=8, angle_deg=35.0, ratio=0.7, width=0.025)


ANALOGUES = {"fine_grid": FineGrid, "notch_carpet": NotchCarpet, "thin_tree": ThinTree}


class FourierMLP(torch.nn.Module):
    """Harness-only candidate network ``"fourier-mlp"`` (a representation ablation, not a library network): the
    TimeMLP with Fourier features of x, ``[sin, cos](w_k u_j . x)`` for ``n_freq`` frequencies log-spaced in
    ``[1, max_freq]`` (model units) along ``n_dir`` directions, appended to its input."""

    def __init__(self, dim: int, hidden: int = 64, depth: int = 3, time_dim: int = 32, n_freq: int = 6,
                 max_freq: float = 32.0, n_dir: int = 4):
        super().__init__()
        from diffflow_ext.networks import TimeMLP

        ang = torch.arange(n_dir, dtype=torch.float64) * (np.pi / n_dir)
        dirs = torch.stack([torch.cos(ang), torch.sin(ang)], 1)  # (n_dir, 2); 2-D data
        freqs = torch.logspace(0, np.log10(max_freq), n_freq, dtype=torch.float64)
        self.register_buffer("proj", (dirs[:, None, :] * freqs[None, :, None]).reshape(-1, dim).T.float().contiguous())
        self.mlp = TimeMLP(dim, hidden, depth, time_dim)
        first = self.mlp.body[0]
        self.mlp.body[0] = torch.nn.Linear(first.in_features + 2 * self.proj.shape[1], hidden)
        self.dim = dim

    def forward(self, x, t):
        a = x @ self.proj
        h = torch.cat([x, torch.sin(a), torch.cos(a), self.mlp.time_embed(t).to(x.dtype)], dim=-1)
        return self.mlp.out(self.mlp.body(h))


def _register_candidates() -> None:
    from diffflow_ext.networks import register_network

    register_network("fourier-mlp", FourierMLP, shape_kwargs=lambda shape: {"dim": int(np.prod(shape))},
                     replace=True)


def parse_args(argv=None):
    _register_candidates()
    ap = OneLineParser(prog="tune_2d.py", description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="a label for the candidate (printed on every row)")
    ap.add_argument("sets", help="comma-separated tuning sets: built-ins, sharp_0..sharp_999, "
                                 "fine_grid, notch_carpet, thin_tree")
    ap.add_argument("iters", help="training iterations (a positive integer)")
    ap.add_argument("overrides", nargs="?", default="{}", help="JSON object of TrainConfig fields (plus _fs, _ss)")
    ap.add_argument("--samples", type=int, default=3000, help="samples per lam for the in-support fraction")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    args = ap.parse_args(argv)
    try:
        args.iters = int(args.iters)
        if args.iters < 1:
            raise ValueError
    except ValueError:
        ap.error(f"ITERS: expected a positive integer, got {args.iters!r}")
    try:
        opts = json.loads(args.overrides)
    except json.JSONDecodeError as e:
        ap.error(f"JSON_OVERRIDES: not valid JSON ({e.msg} at character {e.pos})")
    if not isinstance(opts, dict):
        ap.error(f"JSON_OVERRIDES: expected a JSON object of TrainConfig fields, got {args.overrides!r}")
    args.scale = {k: float(opts.pop(k)) for k in SCALE_KEYS if k in opts}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(opts) - fields)
    if unknown:
        ap.error(f"JSON_OVERRIDES: unknown field {unknown[0]!r}; valid: TrainConfig fields "
                 f"(e.g. lr, batch_size, diffusion, ema, lr_warmup, prior) and {', '.join(SCALE_KEYS)}")
    try:
        resolve_config("points", {"data": "checkerboard", "iters": args.iters, **opts})
    except Exception as e:  # ConfigError / TypeError from an unknown field: one line naming it
        ap.error(f"JSON_OVERRIDES: {str(e).splitlines()[0]}")
    args.opts = opts
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets:
        ap.error("SETS: expected at least one set name")
    args.datasets = []
    for s in sets:
        if s in ANALOGUES:
            args.datasets.append(ANALOGUES[s]())
            continue
        try:
            ds = toy2d.get(s)
        except toy2d.UnknownDatasetError as e:
            ap.error(f"SETS: {e}, {', '.join(ANALOGUES)}")
        if not getattr(ds, "sharp", False):
            ap.error(f"SETS: {s!r} has no sharp support (no in-support fraction)")
        if ds.name.startswith("sharp_") and int(ds.name[6:]) in sharp2d.HELDOUT_SEEDS:
            ap.error(f"SETS: {s} is a held-out set; tune on sharp2d.TUNING_SEEDS (sharp_0..sharp_999) and built-ins")
        if ds.name in REPORTED_BUILTINS:
            ap.error(f"SETS: {s} is a reported set; tune on its analogue "
                     f"({'fine_grid' if ds.name == 'sierpinski_carpet' else 'thin_tree'}) instead")
        args.datasets.append(ds)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    build = loop.build_state

    def build_state(cfg, data, ctx, shards):
        st = build(cfg, data, ctx, shards)
        for net, key in ((st.model.drift, "_fs"), (st.model.score, "_ss")):
            if key in args.scale:
                net.out.register_forward_hook(lambda m, i, o, c=args.scale[key]: o * c)
        return st

    loop.build_state = build_state
    rows = []
    for ds in args.datasets:
        data = q.Points(ds, seed=0)
        t0 = time.process_time()
        model, _ = q.train_model("diffflow", data, args.seed, None, args.iters, args.opts)
        row = {"set": ds.name, "cpu": round(time.process_time() - t0, 1)}
        for lam in (0.0, 0.5, 1.0):
            x = data.x(q.draw(model, args.samples, 1, lam=lam))
            ok = np.isfinite(x).all(1)
            row[f"in{lam}"] = round(float(data.ds.contains(np.where(ok[:, None], x, 1e9)).mean()) * 100, 1)
        rows.append(row)
        print(args.name, json.dumps(row), flush=True)
    mean = {k: round(float(np.mean([r[k] for r in rows])), 1) for k in ("in0.0", "in0.5", "in1.0")}
    print("SUMMARY", args.name, args.iters, json.dumps(args.opts), json.dumps(args.scale), json.dumps(mean),
          "min0.5", min(r["in0.5"] for r in rows), "cpu", round(sum(r["cpu"] for r in rows), 1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
