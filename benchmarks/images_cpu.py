"""Image benchmarks: DiffFlow against a zuko normalizing flow for the same training budget on the same data.

    python benchmarks/images_cpu.py digits                      # 8x8 digits, tuned presets, test split
    python benchmarks/images_cpu.py digits --split val --configs df-mlp,df-unet,maf,nsf --budget 3   # tuning
    python benchmarks/images_cpu.py mnist --data-dir ../shared/data/mnist --configs mnist-mlp --budget 10 \\
        --eval-every 60 --eval-n 500                            # learning curve (bits/dim against CPU minutes)

Every model trains for ``--budget`` minutes of *training* time (CPU seconds of this process with ``--clock
cpu``, the default, and ``torch`` threads = 1; wall seconds on CUDA); evaluations are not counted. Data come
from :func:`diffflow_ext.data.get_data_source` (the digits: 17 grey levels, 1257/180/360 train/val/test;
uniform dequantisation; scaling to [-1, 1]); bits/dim from :func:`diffflow_ext.evaluation.bits.bits_per_dim`
in data space (negative ELBO for DiffFlow, exact likelihood for the flow), both with the same dequantisation
draws and the same log-Jacobian of the scaling. Tune with ``--split val``; report with ``--split test``.

``--compare-backends`` also times training steps with the fused step ops (``backend="auto"``) against the
reference ops (``backend="torch"``), interleaved, and ``--json`` writes everything (it/s, peak memory, curve).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT  # noqa: E402,F401  (puts this checkout on sys.path when not installed)
from baselines_flow import FlowModel  # noqa: E402

from diffflow_ext import DiffFlow, available_backends  # noqa: E402
from diffflow_ext.data import get_data_source  # noqa: E402
from diffflow_ext.evaluation.bits import bits_per_dim  # noqa: E402
from diffflow_ext.training.ema import EMA  # noqa: E402

# name -> training recipe. "diffflow": network + model kwargs; "flow": a zuko flow on the flattened image.
# The digits presets were tuned on the validation split (docs/images.md has the sweep).
_DF = {"kind": "diffflow", "batch": 256, "lr": 1e-3, "ema": 0.999, "clip": 1.0}
CONFIGS: dict[str, dict] = {
    # --- 8x8 digits (CPU)
    "df-mlp": {**_DF, "network": "mlp", "network_kwargs": {"hidden": 512, "depth": 3},
               "model": {"num_steps": 10, "diffusion": 1.0, "t_end": 0.05}},
    "df-mlp-g02": {**_DF, "network": "mlp", "network_kwargs": {"hidden": 512, "depth": 3},
                   "model": {"num_steps": 10, "diffusion": 0.2, "t_end": 0.05}},
    "df-mlp-n20": {**_DF, "network": "mlp", "network_kwargs": {"hidden": 512, "depth": 3},
                   "model": {"num_steps": 20, "diffusion": 1.0, "t_end": 0.05}},
    "df-mlp-t1": {**_DF, "network": "mlp", "network_kwargs": {"hidden": 512, "depth": 3},
                  "model": {"num_steps": 10, "diffusion": 1.0, "t_end": 1.0}},
    "df-mlp-p05": {**_DF, "network": "mlp", "network_kwargs": {"hidden": 512, "depth": 3},
                   "model": {"num_steps": 10, "diffusion": 1.0, "t_end": 0.05, "prior_std": 0.5}},
    "df-mlp-t1-lr3": {**_DF, "lr": 3e-3, "network": "mlp", "network_kwargs": {"hidden": 512, "depth": 3},
                      "model": {"num_steps": 10, "diffusion": 1.0, "t_end": 1.0}},
    "df-mlp-lr3": {**_DF, "lr": 3e-3, "network": "mlp", "network_kwargs": {"hidden": 512, "depth": 3},
                   "model": {"num_steps": 10, "diffusion": 1.0, "t_end": 0.05}},
    "df-mlp-p05-lr3": {**_DF, "lr": 3e-3, "network": "mlp", "network_kwargs": {"hidden": 512, "depth": 3},
                       "model": {"num_steps": 10, "diffusion": 1.0, "t_end": 0.05, "prior_std": 0.5}},
    "df-mlp-p05-lr3-n5": {**_DF, "lr": 3e-3, "network": "mlp", "network_kwargs": {"hidden": 512, "depth": 3},
                          "model": {"num_steps": 5, "diffusion": 1.0, "t_end": 0.05, "prior_std": 0.5}},
    "df-mlp-p05-lr3-b64": {**_DF, "batch": 64, "lr": 3e-3, "network": "mlp",
                           "network_kwargs": {"hidden": 512, "depth": 3},
                           "model": {"num_steps": 10, "diffusion": 1.0, "t_end": 0.05, "prior_std": 0.5}},
    "df-mlp-p05-lr3-b64-n5": {**_DF, "batch": 64, "lr": 3e-3, "network": "mlp",
                              "network_kwargs": {"hidden": 512, "depth": 3},
                              "model": {"num_steps": 5, "diffusion": 1.0, "t_end": 0.05, "prior_std": 0.5}},
    # ... with the learned per-dimension prior (docs/images.md: the largest lever measured on validation)
    "df-mlp-p05-lr3-b64-lp": {**_DF, "batch": 64, "lr": 3e-3, "network": "mlp",
                              "network_kwargs": {"hidden": 512, "depth": 3},
                              "model": {"num_steps": 10, "diffusion": 1.0, "t_end": 0.05, "prior_std": 0.5,
                                        "prior": "learned"}},
    "df-unet": {**_DF, "batch": 128, "network": "unet-digits", "network_kwargs": {},
                "model": {"num_steps": 10, "diffusion": 1.0, "t_end": 0.05}},
    # unet-digits with the learned prior: the validation winner of session 14 (docs/images.md), batch 32, lr 2e-3
    "df-unet-lp": {**_DF, "batch": 32, "lr": 2e-3, "network": "unet-digits", "network_kwargs": {},
                   "model": {"num_steps": 10, "diffusion": 1.0, "t_end": 0.05, "prior_std": 0.5, "prior": "learned"}},
    "maf": {"kind": "flow", "flow": "maf", "flow_kwargs": {"transforms": 5, "hidden": 256, "depth": 2},
            "batch": 256, "lr": 1e-3, "ema": 0.999, "clip": 1.0},
    "nsf": {"kind": "flow", "flow": "nsf", "flow_kwargs": {"transforms": 3, "hidden": 256, "depth": 2, "bins": 8},
            "batch": 256, "lr": 1e-3, "ema": 0.999, "clip": 1.0},
    "nsf-b64": {"kind": "flow", "flow": "nsf", "batch": 64, "lr": 1e-3, "ema": 0.999, "clip": 1.0,
                "flow_kwargs": {"transforms": 3, "hidden": 256, "depth": 2, "bins": 8}},
    # --- MNIST (28x28, 256 levels)
    "mnist-mlp": {**_DF, "batch": 64, "network": "mlp", "network_kwargs": {"hidden": 1024, "depth": 3},
                  "model": {"num_steps": 10, "diffusion": 1.0, "t_end": 0.05}},
    "mnist-unet-small": {**_DF, "batch": 32, "lr": 5e-4, "network": "unet",
                         "network_kwargs": {"base_channels": 16, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
                                            "attn_resolutions": [7], "dropout": 0.0, "groups": 8},
                         "model": {"num_steps": 10, "diffusion": 1.0, "t_end": 0.05}},
    # the paper's MNIST network (GPU): about half DDPM width, N=30, Adam 2e-4, EMA 0.999, clip 1
    "mnist-paper": {**_DF, "batch": 128, "lr": 2e-4, "network": "unet-mnist", "network_kwargs": {},
                    "model": {"num_steps": 30, "diffusion": 1.0, "t_end": 0.05}},
    "mnist-maf": {"kind": "flow", "flow": "maf", "flow_kwargs": {"transforms": 5, "hidden": 1024, "depth": 2},
                  "batch": 64, "lr": 1e-3, "ema": 0.999, "clip": 1.0},
}
DEFAULTS = {"digits": "df-mlp,maf", "mnist": "mnist-mlp"}


def build(cfg: dict, shape: tuple[int, ...], device: torch.device, precision: str) -> torch.nn.Module:
    if cfg["kind"] == "flow":
        return FlowModel(cfg["flow"], shape, **cfg["flow_kwargs"]).to(device)
    model_kwargs = dict(cfg["model"])
    if precision != "fp32":
        model_kwargs["autocast_dtype"] = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return DiffFlow.from_networks(cfg["network"], shape, cfg["network_kwargs"], **model_kwargs).to(device)


class Clock:
    def __init__(self, kind: str, device: torch.device):
        self.kind, self.device = kind, device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.process_time() if self.kind == "cpu" else time.perf_counter()


class Trainer:
    """One model, its optimiser, EMA, data stream and noise; ``step()`` is one training iteration."""

    def __init__(self, cfg: dict, source, device: torch.device, seed: int, precision: str):
        torch.manual_seed(seed)
        self.cfg, self.source, self.device = cfg, source, device
        self.model = build(cfg, source.shape, device, precision)
        wd = cfg.get("wd", 0.0)
        self.opt = (torch.optim.AdamW(self.model.parameters(), lr=cfg["lr"], weight_decay=wd) if wd
                    else torch.optim.Adam(self.model.parameters(), lr=cfg["lr"]))
        # "iters": a fixed length; with "sched": "cosine" the learning rate decays to 0 over it
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, cfg["iters"])
                      if cfg.get("sched") == "cosine" else None)
        self.ema = EMA(self.model, cfg["ema"]) if cfg["ema"] else None
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator(device).manual_seed(seed)
        self.iters = 0

    def step(self) -> float:
        x = self.source.train_batch(self.cfg["batch"], self.rng, device=self.device)
        loss = self.model.loss(x, self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg["clip"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["clip"])
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.iters += 1
        return float(loss.detach())

    def eval_weights(self):
        """Context: the EMA weights in the model (restored afterwards)."""
        trainer = self

        class _Swap:
            def __enter__(self):
                self.saved = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
                if trainer.ema is not None:
                    trainer.ema.copy_to(trainer.model)
                return trainer.model

            def __exit__(self, *exc):
                trainer.model.load_state_dict(self.saved)

        return _Swap()


def evaluate(trainer: Trainer, split: str, n: int | None, draws: int, seed: int = 0, bound: str = "elbo",
             **ode_options) -> dict:
    """Data-space bits/dim of the EMA weights: negative ELBO (``bound="elbo"``) or probability-flow ODE likelihood
    (``bound="ode"``, DiffFlow only; ``ode_options`` such as ``rtol``/``atol`` go to ``DiffFlow.log_prob``)."""
    with trainer.eval_weights() as model:
        r = bits_per_dim(model, trainer.source, split=split, n=n, bound=bound, draws=draws, seed=seed,
                         batch_size=250, **ode_options)
    out = r.as_dict() | {"describe": r.describe()}
    if trainer.cfg["kind"] == "flow":  # bits_per_dim calls nll_bound; for a flow it is the exact NLL
        out["bound"] = "exact"
        out["describe"] = out["describe"].replace("negative ELBO", "exact flow likelihood")
    return out


def resolve(name: str) -> dict:
    """The recipe of ``name``: a key of :data:`CONFIGS`, optionally followed by ``@key=value`` overrides (JSON
    values; ``model.x`` / ``network_kwargs.x`` / ``flow_kwargs.x`` reach inside), e.g.
    ``df-mlp-p05-lr3-b64@model.diffusion=0.5@wd=1e-4``."""
    base, *overrides = name.split("@")
    if base not in CONFIGS:
        raise ValueError(f"--configs: unknown {base!r}; expected names from {', '.join(CONFIGS)}")
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in CONFIGS[base].items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--configs: {name!r}: expected @key=value, got @{item}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        head, _, sub = key.partition(".")
        if sub:
            cfg[head] = {**cfg.get(head, {}), sub: value}
        else:
            cfg[key] = value
    if cfg.get("sched") == "cosine" and "iters" not in cfg:
        raise ValueError(f"--configs: {name!r}: sched=cosine needs iters=N")
    return cfg


def curve_point(tr: Trainer, args, curve: list, losses: list, used: float, best: dict) -> None:
    """One learning-curve point (1 draw on ``--curve-split``); with ``--select-best`` keep the EMA weights of the
    lowest point in ``best``."""
    r = evaluate(tr, args.curve_split, args.eval_n, 1)
    curve.append({"minutes": used / 60, "iters": tr.iters, "bits_per_dim": r["bits_per_dim"],
                  "loss": statistics.fmean(losses[-20:])})
    print(f"  {used / 60:6.2f} min  it {tr.iters:6d}  loss {curve[-1]['loss']:9.3f}  "
          f"{args.curve_split} bpd {r['bits_per_dim']:.4f}", flush=True)
    if args.select_best and r["bits_per_dim"] < best["bits_per_dim"]:
        with tr.eval_weights() as model:
            best.update(curve[-1], weights={k: v.detach().clone() for k, v in model.state_dict().items()})


def run(name: str, args, source, device: torch.device, clock: Clock) -> dict:
    cfg = resolve(name)
    if args.batch:
        cfg["batch"] = args.batch
    if args.num_steps and cfg["kind"] == "diffflow":
        cfg["model"] = {**cfg["model"], "num_steps": args.num_steps}
    tr = Trainer(cfg, source, device, args.seed, args.precision)
    budget = args.budget * 60.0
    max_iters = cfg.get("iters", math.inf)
    every = args.eval_every or math.inf
    used, next_eval, curve, losses = 0.0, every, [], []
    best = {"bits_per_dim": math.inf}  # the curve point with the lowest bits/dim (early stopping on the curve split)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print(f"# {name}: {sum(p.numel() for p in tr.model.parameters()) / 1e6:.2f}M parameters, budget "
          f"{args.budget} {args.clock}-min", flush=True)
    while used < budget and tr.iters < max_iters:
        t0 = clock()
        loss = tr.step()
        used += clock() - t0
        losses.append(loss)
        if not math.isfinite(loss):
            print(f"# {name}: non-finite loss at iteration {tr.iters}; stopping", flush=True)
            break
        if used >= next_eval:
            curve_point(tr, args, curve, losses, used, best)
            next_eval += every
    if args.select_best and (not curve or curve[-1]["iters"] != tr.iters):
        curve_point(tr, args, curve, losses, used, best)  # the last weights are a candidate too
    out = {"config": cfg, "iters": tr.iters, "train_minutes": used / 60, "it_per_s": tr.iters / max(used, 1e-9),
           "curve": curve, "final_loss": statistics.fmean(losses[-20:]) if losses else None}
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    t0 = time.perf_counter()
    out["result"] = evaluate(tr, args.split, args.final_n, args.draws)
    out["eval_wall_s"] = time.perf_counter() - t0
    print(f"  {name}: {tr.iters} iters in {used / 60:.2f} {args.clock}-min; {out['result']['describe']}", flush=True)
    ode = args.ode and cfg["kind"] == "diffflow"
    ode_options = {"rtol": args.ode_tol, "atol": args.ode_tol}
    if ode and not args.select_best:  # with --select-best the ODE figure is that of the selected weights
        out["result_ode"] = evaluate(tr, args.split, args.final_n, args.draws, bound="ode", **ode_options)
        print(f"  {name} (last weights): {out['result_ode']['describe']}", flush=True)
    if args.select_best and "weights" in best:
        # the EMA weights of the best curve point: early stopping chosen on the curve split, figure on --split
        if tr.ema is not None:
            tr.ema.shadow = {k: v.clone() for k, v in best.pop("weights").items() if k in tr.ema.shadow}
        else:
            tr.model.load_state_dict(best.pop("weights"))
        out["best"] = best
        out["result_best"] = evaluate(tr, args.split, args.final_n, args.draws)
        print(f"  {name} (best {args.curve_split} point: it {best['iters']}, {best['minutes']:.2f} min): "
              f"{out['result_best']['describe']}", flush=True)
        if ode:
            out["result_best_ode"] = evaluate(tr, args.split, args.final_n, args.draws, bound="ode", **ode_options)
            print(f"  {name} (best {args.curve_split} point): {out['result_best_ode']['describe']}", flush=True)
    if args.grid_dir and cfg["kind"] == "diffflow":
        out["grid"] = str(sample_grid(tr, name, args))
    if args.compare_backends and cfg["kind"] == "diffflow":
        out["backends"] = compare_backends(tr, clock, args.compare_reps)
    return out


@torch.no_grad()
def sample_grid(tr: Trainer, name: str, args) -> Path:
    from diffflow_ext.plotting import sample_grid as grid

    Path(args.grid_dir).mkdir(parents=True, exist_ok=True)
    with tr.eval_weights() as model:
        model.eval()  # dropout off while sampling
        try:
            z = model.sample(64, lam=1.0, generator=torch.Generator(tr.device).manual_seed(0))
        finally:
            model.train()
    path = Path(args.grid_dir) / f"{args.dataset}_{name}_samples.png"
    images = tr.source.transform.to_data(z.cpu())
    return grid(images, path, levels=tr.source.levels, title=f"{args.dataset} {name}: 64 samples (lambda=1)")


def compare_backends(tr: Trainer, clock: Clock, reps: int) -> dict:
    """Seconds per training step with the fused step ops vs the reference ops, interleaved (medians)."""
    times: dict[str, list[float]] = {"auto": [], "torch": []}
    original = tr.model.backend
    try:
        for _ in range(reps):
            for backend in times:
                tr.model.backend = backend
                t0 = clock()
                tr.step()
                times[backend].append(clock() - t0)
    finally:
        tr.model.backend = original
    med = {k: statistics.median(v[1:] if len(v) > 2 else v) for k, v in times.items()}
    print(f"  step: fused {med['auto'] * 1e3:.1f} ms, reference {med['torch'] * 1e3:.1f} ms "
          f"(reference/fused {med['torch'] / med['auto']:.3f})", flush=True)
    return {"fused_step_s": med["auto"], "reference_step_s": med["torch"], "speedup": med["torch"] / med["auto"],
            "reps": reps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("dataset", choices=("digits", "mnist"))
    ap.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    ap.add_argument("--configs", default=None, help=f"comma-separated names from: {', '.join(CONFIGS)}")
    ap.add_argument("--budget", type=float, default=12.0, help="training minutes per model (default 12)")
    ap.add_argument("--split", default="test", choices=("val", "test"), help="split of the final figure")
    ap.add_argument("--curve-split", default=None, help="split of the learning curve (default: val if it exists)")
    ap.add_argument("--eval-every", type=float, default=0.0, help="learning-curve points every this many seconds")
    ap.add_argument("--eval-n", type=int, default=None, help="examples per learning-curve point (default: all)")
    ap.add_argument("--draws", type=int, default=3, help="dequantisation draws of the final figure")
    ap.add_argument("--final-n", type=int, default=None, help="examples of the final figure (default: the whole split)")
    ap.add_argument("--select-best", action="store_true",
                    help="early stopping: also report the EMA weights of the best learning-curve point")
    ap.add_argument("--ode", action="store_true",
                    help="also report DiffFlow's probability-flow ODE bits/dim (with --select-best: of those weights)")
    ap.add_argument("--ode-tol", type=float, default=1e-5, help="rtol = atol of the ODE likelihood (default 1e-5)")
    ap.add_argument("--batch", type=int, default=None, help="override the configs' batch size")
    ap.add_argument("--num-steps", type=int, default=None, help="override the configs' N (DiffFlow)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", default=None, choices=("cpu", "wall"), help="default: cpu on CPU, wall on CUDA")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--compare-backends", action="store_true", help="time fused vs reference step ops")
    ap.add_argument("--compare-reps", type=int, default=10)
    ap.add_argument("--grid-dir", default=None, help="write a sample grid per DiffFlow model here")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    args.clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
    torch.set_num_threads(args.threads)
    names = (args.configs or DEFAULTS[args.dataset]).split(",")
    for n in names:
        try:
            resolve(n)
        except ValueError as e:
            ap.error(str(e))
    if args.dataset == "mnist":
        if not args.data_dir:
            ap.error("--data-dir: required for mnist (a folder with the IDX files)")
        source = get_data_source("mnist", data_dir=args.data_dir, val=5000)
    else:
        source = get_data_source("digits")
    args.curve_split = args.curve_split or ("val" if "val" in source.splits else args.split)
    clock = Clock(args.clock, device)
    results = {"dataset": args.dataset, "shape": list(source.shape), "levels": source.levels,
               "split": args.split, "budget_minutes": args.budget, "clock": args.clock, "threads": args.threads,
               "device": str(device), "torch": torch.__version__, "backends": available_backends(),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "runs": {}}
    for name in names:
        results["runs"][name] = run(name, args, source, device, clock)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n{args.dataset}, {args.split} split, {args.budget} {args.clock}-minutes of training each:")
    for name, r in results["runs"].items():
        res = r["result"]
        line = f"  {name:18s} {res['bits_per_dim']:.4f} +- {res['bits_per_dim_se']:.4f} bits/dim"
        for key, what in (("result_ode", "ODE"), ("result_best", "best-point"), ("result_best_ode", "best-point ODE")):
            if key in r:
                line += f"; {what} {r[key]['bits_per_dim']:.4f} +- {r[key]['bits_per_dim_se']:.4f}"
        print(f"{line} ({r['iters']} iters, {r['it_per_s']:.2f} it/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
