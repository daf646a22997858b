"""2-D sample quality and likelihood on sharp sets nobody tuned for: DiffFlow defaults against baselines.

Every model is trained on every set in one run, on 50,000 points of the set (split 90/10 like ``diffflow train
FILE``, standardised by the training split), and reported per set and model: fraction of samples inside the
support, ODE NLL and -ELBO against the exact entropy (data units, nats), sliced Wasserstein distance to held-out
points, training CPU seconds (``time.process_time``, one thread).

Models:

* ``diffflow`` -- the library's defaults for point data (``resolve_config("points", {})``: the same network,
  optimiser, LR schedule, EMA, progressive N and iterations as ``diffflow train FILE``), trained with the
  library's own ``train_step``; its CPU time sets the budget of the others unless ``--budget`` is given;
* ``fixed-dsm`` -- fixed linear drift (VP, ``beta = g^2``), only the score learned, denoising score matching
  (Adam 5e-3 annealed to 0 by a cosine over the CPU budget, batch 1024; time grid uniform in ``t^0.1``, which puts
  few-step samplers' steps near the data, ``--fixed-time-exponent``);
* ``fixed-diffflow`` -- the same model trained by the DiffFlow objective (same optimiser);
* ``nsf`` -- zuko's neural spline flow (5 transforms, 2 x 128, Adam 1e-3, batch 1024; optional: needs zuko).

Sets: ``builtin`` (the six sharp built-ins), ``smooth`` (8gaussians, moons, swissroll: Gaussian noise, so no
support and no in-support fraction; their entropy is -E log p over the held-out points, with the exact density by
quadrature), ``heldout:K`` (the first K held-out generated sets), ``tuning:K``,
or names (``checkerboard``, ``sharp_1003``).

    python benchmarks/quality_2d.py --sets builtin,heldout:12 --json quality.json --sheet quality.png
    python benchmarks/quality_2d.py --mode steps --sets heldout:6 --plot steps.png   # quality vs N
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import OneLineParser

from diffflow_ext.baselines import NSF, dsm_loss, fixed_drift_diffusion, zuko_available
from diffflow_ext.data import sharp2d, toy2d
from diffflow_ext.evaluation import sliced_wasserstein

BUILTIN_SHARP = ("checkerboard", "olympic_rings", "four_rings", "2spirals", "sierpinski_carpet", "fractal_tree")
BUILTIN_SMOOTH = ("8gaussians", "moons", "swissroll")  # Gaussian noise: no support, so no in-support fraction
MODELS = ("diffflow", "fixed-dsm", "fixed-diffflow", "nsf")
STEPS = (5, 10, 20, 30)
STEP_LAMS = (0.0, 1.0)  # samplers of the steps mode: probability-flow ODE and the backward SDE
# samplers of the samplers mode (label, method, lam, num_steps): the grid's Euler steps at several lam and N, Heun
# on the grid, and the adaptive probability-flow ODE (torchdiffeq dopri5)
SAMPLERS = (("em lam0 N=train", "em", 0.0, None), ("em lam0.5", "em", 0.5, None), ("em lam1", "em", 1.0, None),
            ("em lam0 N=60", "em", 0.0, 60), ("em lam0 N=120", "em", 0.0, 120), ("heun N=train", "heun", None, None),
            ("ode dopri5 1e-5", "ode", None, None))
DIST_BINS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, np.inf)  # distance of outside samples to the support


# ----------------------------------------------------------------------------- data


class Points:
    """50k points of a set, split 90/10 and standardised by the training split (as the trainer does)."""

    shape = (2,)  # the trainer's data-source interface (with train_batch)

    def __init__(self, name: str | toy2d.Toy2D, n: int = 50_000, seed: int = 0):
        self.ds = name if isinstance(name, toy2d.Toy2D) else toy2d.get(name)
        self.name = self.ds.name
        pts = self.ds.sample_numpy(n, np.random.default_rng([seed, 11]))
        perm = np.random.default_rng([seed, 3]).permutation(n)
        n_hold = n // 10
        self.test, self.train = pts[perm[:n_hold]], pts[perm[n_hold:]]
        self.mean, self.std = self.train.mean(0), self.train.std(0)
        self.log_scale = float(np.log(self.std).sum())
        self.entropy = getattr(self.ds, "entropy", None)
        self.entropy_se = 0.0
        if self.entropy is None and hasattr(self.ds, "log_density") and not self.ds.sharp:
            # smooth sets: -E log p over the held-out points (exact density by quadrature; Monte Carlo error)
            lp = self.ds.log_density(self.test)
            self.entropy, self.entropy_se = float(-lp.mean()), float(lp.std() / np.sqrt(len(lp)))

    def z(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((x - self.mean) / self.std).float()

    def x(self, z: torch.Tensor) -> np.ndarray:
        return z.detach().double().numpy() * self.std + self.mean

    def batch(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        return self.z(self.train[rng.integers(0, len(self.train), size=n)])

    def train_batch(self, n: int, rng: np.random.Generator, *, device=None, dtype=torch.float32) -> torch.Tensor:
        """The trainer's data-source interface (build_state draws the data-dependent initialisation from it)."""
        return self.batch(n, rng).to(device=device, dtype=dtype)


def parse_sets(spec: str) -> list[str]:
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if part == "builtin":
            out += BUILTIN_SHARP
        elif part == "smooth":
            out += BUILTIN_SMOOTH
        elif part.startswith(("heldout:", "tuning:")):
            kind, k = part.split(":")
            seeds = sharp2d.HELDOUT_SEEDS if kind == "heldout" else sharp2d.TUNING_SEEDS
            out += [f"sharp_{s}" for s in seeds[: int(k)]]
        elif part:
            out.append(toy2d.get(part).name)
    return out


# ----------------------------------------------------------------------------- training


def _cpu() -> float:
    return time.process_time()


def train_diffflow_defaults(data: Points, seed: int, iters: int | None = None, options: dict | None = None):
    """The library's defaults for point data (``options``: overrides, for ablations), trained by the library's
    train_step; returns (EMA model, cfg)."""
    from types import SimpleNamespace

    from diffflow_ext.training.config import resolve_config
    from diffflow_ext.training.loop import build_state, train_step

    explicit = {"data": "checkerboard", "seed": seed, **(options or {})}
    if iters is not None:
        explicit["iters"] = iters
    cfg = resolve_config("points", explicit)
    state = build_state(cfg, data, SimpleNamespace(device=torch.device("cpu")), [0])
    schedule = cfg.steps_schedule()
    rng = np.random.default_rng([seed, 0])
    while state.step < cfg.iters:
        x = data.batch(cfg.batch_size, rng)
        train_step(state, state.model, x, shards=[0], total_shards=1, world=1, num_steps=schedule(state.step),
                   grid=cfg.grid, clip=cfg.clip)
    model = copy.deepcopy(state.model)
    if state.ema is not None:
        state.ema.copy_to(model)
    return model.eval(), cfg


def train_for(loss_fn, params, data: Points, budget: float, *, batch: int, lr: float, seed: int,
              schedule: str = "cosine", clip: float = 1.0) -> int:
    """Adam until ``budget`` CPU seconds are spent; returns the number of iterations. ``schedule``: ``"cosine"``
    anneals the learning rate to 0 over the CPU budget (``lr * (1 + cos(pi * spent / budget)) / 2``, set before
    every step: the iteration count is not known in advance, so the decay is scaled to the budget, as the DiffFlow
    defaults' cosine is to their iterations), ``"constant"`` keeps it."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule: expected 'cosine' or 'constant', got {schedule!r}")
    opt = torch.optim.Adam(params, lr=lr)
    rng, gen = np.random.default_rng([seed, 0]), torch.Generator().manual_seed(seed)
    start, it = _cpu(), 0
    while (spent := _cpu() - start) < budget:
        if schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * spent / budget))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(data.batch(batch, rng), gen)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        it += 1
    return it


#: the fixed-drift baselines' grid exponent: t^E uniform on [1e-3, 1]. Chosen on the tuning set sharp_8 (DSM, 200 CPU-s;
#: mean in-support over N = 5, 10 at the better lam: E = 1 11.7%, 0.5 42.3%, 0.25 72.2%, 0.1 81.1%, 0.05 79.4%); the
#: uniform grid (E = 1) left its last step at noise std 0.74-0.89 for N = 10-5, so no few-step sample could be sharp
FIXED_TIME_EXPONENT = 0.1


def fixed_drift_model(gradient: str = "autograd", time_exponent: float = FIXED_TIME_EXPONENT):
    return fixed_drift_diffusion(2, beta=8.0, t_end=1.0, num_steps=30, hidden=64, depth=3, gradient=gradient,
                                 time_exponent=time_exponent)


def train_model(name: str, data: Points, seed: int, budget: float | None, iters: int | None,
                options: dict | None = None, fixed_time_exponent: float = FIXED_TIME_EXPONENT):
    """Train model ``name``; returns (model, info dict with cpu seconds and iterations)."""
    torch.manual_seed(seed)
    t0 = _cpu()
    if name == "diffflow":
        model, cfg = train_diffflow_defaults(data, seed, iters, options)
        info = {"iters": cfg.iters, "eval_lam": cfg.eval_lam}
    elif name in ("fixed-dsm", "fixed-diffflow"):
        model = fixed_drift_model(time_exponent=fixed_time_exponent)
        params = [p for p in model.parameters() if p.requires_grad]
        if name == "fixed-dsm":
            def loss_fn(x, gen):
                return dsm_loss(model, x, gen)
        else:
            def loss_fn(x, gen):
                return model.loss(x, gen)
        its = train_for(loss_fn, params, data, budget, batch=1024, lr=5e-3, seed=seed)
        info = {"iters": its, "eval_lam": 1.0}
    elif name == "nsf":
        model = NSF(2)
        its = train_for(lambda x, gen: model.loss(x), list(model.parameters()), data, budget, batch=1024, lr=1e-3,
                        seed=seed, schedule="constant", clip=0.0)
        info = {"iters": its}
    else:
        raise ValueError(f"--models: unknown model {name!r}; valid: {', '.join(MODELS)}")
    info["cpu_seconds"] = round(_cpu() - t0, 1)
    return model, info


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def draw(model, n: int, seed: int, *, num_steps: int | None = None, lam: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if isinstance(model, NSF):
        return model.sample(n, generator=gen)
    return model.sample(n, lam=lam, num_steps=num_steps, generator=gen)


def evaluate(model, info: dict, data: Points, *, n_samples: int, n_ode: int, n_elbo: int, seed: int) -> dict:
    out = dict(info)
    z = draw(model, n_samples, seed + 1, lam=info.get("eval_lam", 1.0))
    x = data.x(z)
    finite = np.isfinite(x).all(1)
    out["fraction_finite"] = float(finite.mean())
    out["fraction_in_support"] = (float(data.ds.contains(np.where(finite[:, None], x, 1e9)).mean())
                                  if data.ds.sharp else None)
    out["sliced_wasserstein"] = sliced_wasserstein(x[finite], data.test, seed=seed) if finite.sum() > 1 else None
    zt = data.z(data.test[:n_ode])
    if isinstance(model, NSF):
        out["ode_nll_nats"] = float(-model.log_prob(zt).double().mean()) + data.log_scale
    else:
        with torch.enable_grad():
            out["ode_nll_nats"] = float(-model.log_prob(zt).double().mean()) + data.log_scale
        nb = model.nll_bound(data.z(data.test[:n_elbo]), torch.Generator().manual_seed(seed + 2))
        out["nelbo_nats"] = float(nb.nats.double().mean()) + data.log_scale
    out["entropy_nats"] = data.entropy
    if data.entropy_se:
        out["entropy_se"] = data.entropy_se
    if data.entropy is not None:
        out["ode_nll_gap"] = out["ode_nll_nats"] - data.entropy
    out["_samples"] = x
    return out


def where_outside(ds, x: np.ndarray) -> dict:
    """Where the samples outside the support land: the share of all samples per distance band (data units; thin
    sets count as inside within ``ds.tol``), and per hole level for the Sierpinski carpet."""
    d = ds.distance(x)
    out = {f"({a:g},{b:g}]": float(((d > max(a, ds.tol) + 1e-6) & (d <= b)).mean())
           for a, b in zip(DIST_BINS[:-1], DIST_BINS[1:]) if b > ds.tol}
    if ds.name == "sierpinski_carpet":  # which hole level (1: the centre ninth ... 4: side 2/81) holds samples
        u, origin, size = (np.clip(x, -1, 1) + 1) / 2, np.zeros_like(x), 1.0
        done = (np.abs(x) > 1).any(1)
        out["outside_square"] = float(done.mean())
        for level in range(1, ds.level + 1):
            size /= 3
            digit = np.clip(np.floor((u - origin) / size), 0, 2)
            hole = (digit == 1).all(1) & ~done
            # density in the holes of this level relative to a uniform spread over the square
            out[f"hole_level{level}_mass"] = float(hole.mean())
            out[f"hole_level{level}_area"] = 8 ** (level - 1) / 9**level
            done |= hole
            origin = origin + digit * size
    return out


def sampler_rows(model, data: Points, n: int, seed: int) -> list[dict]:
    rows = []
    for label, method, lam, steps in SAMPLERS:
        t0 = _cpu()
        with torch.no_grad():
            z = model.sample(n, lam=lam, num_steps=steps, method=method, generator=torch.Generator().manual_seed(seed))
        x = data.x(z)
        ok = np.isfinite(x).all(1)
        x = np.where(ok[:, None], x, 1e9)
        rows.append({"set": data.name, "sampler": label, "fraction_in_support": float(data.ds.contains(x).mean()),
                     "sample_cpu_seconds": round(_cpu() - t0, 2), **where_outside(data.ds, x)})
        print(f"{data.name} {label}: in support {rows[-1]['fraction_in_support']:.4f}", file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------- reports


def summarize(rows: list[dict], sets: list[str]) -> dict:
    """Per model: median / worst in-support over the held-out generated sets and the built-ins, mean NLL gap."""
    summary = {}
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        for part, pick in (("builtin", lambda s: s in BUILTIN_SHARP),
                           ("heldout", lambda s: s.startswith("sharp_") and int(s[6:]) in sharp2d.HELDOUT_SEEDS),
                           ("tuning", lambda s: s.startswith("sharp_") and int(s[6:]) in sharp2d.TUNING_SEEDS)):
            sel = [r for r in mine if pick(r["set"])]
            if not sel:
                continue
            frac = [r["fraction_in_support"] for r in sel if r["fraction_in_support"] is not None] or [np.nan]
            gaps = [r["ode_nll_gap"] for r in sel if r.get("ode_nll_gap") is not None]
            summary[f"{model}/{part}"] = {
                "sets": len(sel), "in_support_median": float(np.median(frac)), "in_support_worst": float(min(frac)),
                "ode_nll_gap_mean": float(np.mean(gaps)) if gaps else None,
                "cpu_seconds_median": float(np.median([r["cpu_seconds"] for r in sel])),
            }
    return summary


def print_table(rows: list[dict]) -> None:
    cols = ("set", "model", "fraction_in_support", "ode_nll_nats", "nelbo_nats", "entropy_nats",
            "sliced_wasserstein", "cpu_seconds", "iters")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        vals = []
        for c in cols:
            v = r.get(c)
            vals.append("" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        print("| " + " | ".join(vals) + " |")


def contact_sheet(rows: list[dict], sets: list[str], models: list[str], datas: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sets), len(models) + 1, figsize=(2.2 * (len(models) + 1), 2.2 * len(sets)),
                             squeeze=False)
    for i, s in enumerate(sets):
        d = datas[s]
        panels = [("data", d.test)] + [(m, next((r["_samples"] for r in rows if r["set"] == s and r["model"] == m),
                                                None)) for m in models]
        for j, (title, pts) in enumerate(panels):
            ax = axes[i, j]
            if pts is not None:
                ax.scatter(pts[:3000, 0], pts[:3000, 1], s=0.2, c="k" if j == 0 else "C0", rasterized=True)
            r = next((r for r in rows if r["set"] == s and r["model"] == title), None)
            label = title if r is None or r["fraction_in_support"] is None else \
                f"{title}: {100 * r['fraction_in_support']:.1f}%"
            ax.set_title(label if i or j else f"{s}\n{label}", fontsize=7)
            if j == 0:
                ax.set_ylabel(s, fontsize=7)
            ax.set_xlim(-1.1, 1.1)
            ax.set_ylim(-1.1, 1.1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def steps_plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for model, lam in sorted({(r["model"], r["lam"]) for r in rows}):
        for k, key in enumerate(("fraction_in_support", "sliced_wasserstein")):
            med = [np.median([r[key] for r in rows if (r["model"], r["lam"], r["num_steps"]) == (model, lam, n)])
                   for n in STEPS]
            axes[k].plot(STEPS, med, "o-" if lam == 0 else "s--", label=f"{model}, lam {lam:g}")
            axes[k].set_xlabel("sampling steps N")
            axes[k].set_ylabel(f"median {key}")
    axes[1].set_yscale("log")  # a sampler whose samples diverge has a sliced Wasserstein orders of magnitude larger
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("quality", "steps", "samplers"), default="quality",
                    help="samplers: one DiffFlow per set (trained, or --load-models), sampled by every sampler of "
                         "SAMPLERS, with where the outside samples land (diagnosis)")
    ap.add_argument("--load-models", default=None, metavar="DIR",
                    help="samplers mode: load DIR/SET_diffflow.pt (written by --save-models) instead of training")
    ap.add_argument("--sets", default="builtin,heldout:12",
                    help="builtin (the six sharp built-ins), smooth (8gaussians, moons, swissroll), heldout:K, "
                         "tuning:K or set names")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--budget", type=float, default=None,
                    help="CPU seconds per baseline (default: the CPU time the DiffFlow defaults took on that set)")
    ap.add_argument("--iters", type=int, default=None, help="override the DiffFlow default iterations (diagnosis)")
    ap.add_argument("--fixed-time-exponent", type=float, default=FIXED_TIME_EXPONENT, metavar="E",
                    help="the fixed-drift baselines' time grid (and DSM's training times): t^E uniform; 1 is uniform "
                         "in t, smaller puts more of the N steps near the data (default %(default)s, chosen on the "
                         "tuning set sharp_8: docs/quality_2d.md)")
    ap.add_argument("--option", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a DiffFlow training default (ablation), e.g. --option diffusion=0.2")
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--ode", type=int, default=500, help="held-out points for the ODE NLL")
    ap.add_argument("--elbo", type=int, default=2000, help="held-out points for the -ELBO")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write all rows and the summary to this file")
    ap.add_argument("--sheet", default=None, help="contact-sheet PNG (quality mode)")
    ap.add_argument("--plot", default=None, help="quality-vs-N PNG (steps mode)")
    ap.add_argument("--save-samples", default=None, metavar="NPZ",
                    help="write each model's samples (data units) to this .npz as SET/MODEL (quality mode)")
    ap.add_argument("--save-models", default=None, metavar="DIR",
                    help="torch.save each trained model to DIR/SET_MODEL.pt (diagnosis: re-sample without retraining)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if not 0 < args.fixed_time_exponent <= 1:
        ap.error(f"--fixed-time-exponent: expected a number in (0, 1], got {args.fixed_time_exponent}")
    torch.set_num_threads(args.threads)
    sets = parse_sets(args.sets)
    options = {}
    for kv in args.option:
        key, _, value = kv.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"--models: unknown model {m!r}; valid: {', '.join(MODELS)}")
    if args.mode == "steps":
        models = [m for m in models if m in ("diffflow", "fixed-dsm")]
    if "nsf" in models and not zuko_available():
        print("zuko is not installed: skipping the NSF baseline (pip install zuko)", file=sys.stderr)
        models.remove("nsf")
    wall0 = time.perf_counter()
    rows, datas = [], {}
    if args.mode == "samplers":
        for s in sets:
            data = Points(s, seed=args.seed)
            if args.load_models:
                model = torch.load(Path(args.load_models) / f"{data.name}_diffflow.pt", weights_only=False)
            else:
                model, _ = train_model("diffflow", data, args.seed, None, args.iters, options)
            rows += sampler_rows(model, data, args.samples, args.seed + 1)
        print(json.dumps(rows, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
        return 0
    for s in sets:
        data = datas[s] = Points(s, seed=args.seed)
        budget = args.budget
        for m in models:
            model, info = train_model(m, data, args.seed, budget, args.iters, options, args.fixed_time_exponent)
            if m == "diffflow" and args.budget is None:
                budget = info["cpu_seconds"]
            if args.save_models:
                Path(args.save_models).mkdir(parents=True, exist_ok=True)
                torch.save(model, Path(args.save_models) / f"{s}_{m}.pt")
            if args.mode == "quality":
                r = evaluate(model, info, data, n_samples=args.samples, n_ode=args.ode, n_elbo=args.elbo,
                             seed=args.seed)
                rows.append({"set": s, "model": m, **r})
                print(f"{s} {m}: in support {r['fraction_in_support']}, ODE NLL {r['ode_nll_nats']:.3f} "
                      f"(entropy {r['entropy_nats']}), SW {r['sliced_wasserstein']:.4f}, {r['cpu_seconds']} CPU-s",
                      file=sys.stderr, flush=True)
            else:
                for n in STEPS:
                    for lam in STEP_LAMS:  # each model at the probability-flow ODE and at its backward SDE
                        z = draw(model, args.samples, args.seed + 1, num_steps=n, lam=lam)
                        x = data.x(z)
                        ok = np.isfinite(x).all(1)
                        inside = float(data.ds.contains(np.where(ok[:, None], x, 1e9)).mean())
                        rows.append({"set": s, "model": m, "num_steps": n, "lam": lam,
                                     "cpu_seconds": info["cpu_seconds"], "iters": info["iters"],
                                     "fraction_in_support": inside,
                                     "sliced_wasserstein": sliced_wasserstein(x[ok], data.test, seed=args.seed)})
                        print(f"{s} {m} N={n} lam={lam}: in support {inside:.3f}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - wall0
    if args.mode == "quality":
        print_table(rows)
        summary = summarize(rows, sets)
        if args.sheet:
            contact_sheet(rows, sets, models, datas, args.sheet)
        if args.save_samples:
            np.savez_compressed(args.save_samples, **{f"{r['set']}/{r['model']}": r["_samples"].astype(np.float32)
                                                      for r in rows})
    else:
        summary = {f"{m}/lam={lam}": {n: float(np.median([r["fraction_in_support"] for r in rows if r["model"] == m
                                                          and r["num_steps"] == n and r["lam"] == lam]))
                                      for n in STEPS} for m in models for lam in STEP_LAMS}
        if args.plot:
            steps_plot(rows, args.plot)
    print(json.dumps(summary, indent=2))
    print(f"total wall time {wall:.0f} s, CPU time {time.process_time():.0f} s", file=sys.stderr)
    if args.json:
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": clean, "summary": summary,
                                               "wall_seconds": wall}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
