#!/usr/bin/env python
"""Seconds per DiffFlow training iteration for every gradient mode, peak memory, and sampling throughput.

Settings (``--settings``):

* ``2d``: the paper's 2-D setting -- time-conditioned MLPs 3x128 (``DiffFlow.mlp(2, 128, 3)``), N=30, B=5000;
* ``image``: flattened MNIST-sized data, D=784, small time-conditioned MLPs 2x512, N=30, B=64;
* ``conv``: MNIST-shaped images (1, 28, 28) with a small time-conditioned conv net (3 conv layers, 32 channels,
  :class:`SmallConvNet`), N=30, B=32.

Training-iteration variants (one iteration = ``loss = model.loss(x0, gen); loss.backward()`` with the
parameter grads cleared before; no optimizer step, it is the same for every variant):

* ``auto+<auto>``: ``gradient="auto"``, ``memory_budget=None`` (no limit: every network graph kept, nothing
  recomputed), fused step ops (``backend="auto"``; the resolved backend name is in the label);
* ``auto@budget``: ``gradient="auto"`` with ``memory_budget`` = a tenth of ``autograd+<auto>``'s measured peak
  (``--budget-fraction``), the ``"end"`` schedule;
* ``adjoint+<auto>`` / ``adjoint+torch``: ``gradient="adjoint"`` (nothing kept: each network re-run once per state);
* ``autograd+torch`` / ``autograd+<auto>``: ``gradient="autograd"`` (the walk unrolled with the graph kept);
* ``original``: the authors' design (:mod:`original_design`): unfused math, 3 network evaluations per step
  forward and the same 3 recomputed with grad per step backward (the drift twice per state);
* ``floor``: the network work of the adjoint alone: no-grad forwards of the drift at x_0..x_N and of the score
  at x_1..x_N, then for each state i = N..0 the same nets re-evaluated with grad and pulled back by one
  ``autograd.grad`` onto (x_i, parameters) with fixed cotangents. No noise, no step math, no prior.
* ``floor-no-recompute``: the network work without recomputation: each network evaluated once with grad at
  every state (drift at x_0..x_N, score at x_1..x_N), then one VJP per state (i = N..0) with fixed cotangents.

Targets (issue 11): ``auto`` with no limit within 3% of the fastest autograd variant, >= 1.9x faster than the
original design and within 1.1x of ``floor-no-recompute``; ``auto@budget``: peak memory <= budget + stored
states and time between the two ends as the plan predicts: predicted = t(auto) + r (t(adjoint) - t(auto)) with
r the plan's recomputed fraction of network evaluations (both ratios printed).

Peak memory: peak bytes held during one iteration above what existed before it. CUDA:
``max_memory_allocated``. CPU: exact live-tensor accounting through a ``TorchDispatchMode``
(``_common.LiveTensorBytes``). The stored states, ``(N+1) B D`` elements, are reported separately. ``--mem-steps``
(default 10 30 100) adds a table of adjoint / auto / autograd / original peaks against N.

Sampling throughput: samples/s of ``model.sample(B)`` (Euler-Maruyama on the N-step grid, no grad) for the auto
and the torch backend.

The variants of one setting (and the two sampling backends) are timed interleaved, round-robin
(``_common.time_interleaved``), so that their ratios hold on a machine shared with other work.

Usage::

    python benchmarks/train_step.py [--json FILE] [--device cpu|cuda] [--settings 2d image conv]
        [--repeats 10] [--mem-steps 10 30 100] [--no-mem] [--no-sample] [--profile] [--quick]
"""

from __future__ import annotations

import argparse
import time

import _common as C  # noqa: E402  (puts the checkout on sys.path)
import torch
from original_design import OriginalDesign  # noqa: E402
from torch import nn

from diffflow_ext import DiffFlow  # noqa: E402
from diffflow_ext.networks import SinusoidalTimeEmbedding  # noqa: E402

SETTINGS = {
    "2d": dict(dim=2, hidden=128, depth=3, batch=5000, num_steps=30),
    "image": dict(dim=784, hidden=512, depth=2, batch=64, num_steps=30),
    "conv": dict(shape=(1, 28, 28), channels=32, batch=32, num_steps=30),
}
TARGET_AUTO_VS_AUTOGRAD = 1.03
TARGET_AUTO_SPEEDUP_VS_ORIGINAL = 1.9
TARGET_AUTO_VS_FLOOR_NO_RECOMPUTE = 1.1
TARGET_SPEEDUP_VS_ORIGINAL = 1.4  # the adjoint's (issue 4)
TARGET_VS_FLOOR = 1.2
TARGET_MEM_GROWTH = 1.3
TARGET_MEM_VS_AUTOGRAD = 0.2


class SmallConvNet(nn.Module):
    """``net(x, t)`` on images ``(B, C, H, W)``: conv3x3 -> SiLU -> (+ time features) conv3x3 -> SiLU -> conv3x3."""

    def __init__(self, in_channels: int = 1, channels: int = 32, time_dim: int = 32):
        super().__init__()
        self.time_embed = SinusoidalTimeEmbedding(time_dim)
        self.time_proj = nn.Linear(time_dim, channels)
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.mid = nn.Conv2d(channels, channels, 3, padding=1)
        self.out = nn.Conv2d(channels, in_channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x, t):
        h = self.act(self.inp(x)) + self.time_proj(self.time_embed(t).to(x.dtype))[:, :, None, None]
        return self.out(self.act(self.mid(h)))


def shape_of(setting: dict) -> tuple[int, ...]:
    return tuple(setting["shape"]) if "shape" in setting else (setting["dim"],)


def build(setting: dict, device, num_steps=None, seed=0) -> DiffFlow:
    torch.manual_seed(seed)
    n = num_steps or setting["num_steps"]
    if "shape" in setting:
        c = setting["shape"][0]
        m = DiffFlow(SmallConvNet(c, setting["channels"]), SmallConvNet(c, setting["channels"]), setting["shape"],
                     num_steps=n)
    else:
        m = DiffFlow.mlp(setting["dim"], hidden=setting["hidden"], depth=setting["depth"], num_steps=n)
    # The output layers start at zero (an untrained model is pure diffusion). Give them small weights so that
    # every gradient path carries non-zero values, as in a model under training.
    with torch.no_grad():
        for net in (m.drift, m.score):
            nn.init.normal_(net.out.weight, std=0.05)
            nn.init.normal_(net.out.bias, std=0.05)
    return m.to(device)


def data(setting: dict, device, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B, shape = setting["batch"], shape_of(setting)
    if shape == (2,):  # a ring of 8 Gaussians, the usual 2-D toy
        k = torch.randint(0, 8, (B,), generator=g).double() * (2 * torch.pi / 8)
        x = torch.stack([torch.cos(k), torch.sin(k)], 1) * 2 + 0.1 * torch.randn(B, 2, generator=g, dtype=torch.double)
        return x.float().to(device)
    return torch.rand(B, *shape, generator=g).to(device) * 2 - 1  # image-like values in [-1, 1]


def describe(setting: dict) -> str:
    if "shape" in setting:
        return (f"images {setting['shape']} SmallConvNet({setting['channels']} channels) N={setting['num_steps']} "
                f"B={setting['batch']}")
    return (f"D={setting['dim']} MLP {setting['depth']}x{setting['hidden']} N={setting['num_steps']} "
            f"B={setting['batch']}")


def params_of(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- iteration callables
def model_iteration(model: DiffFlow, x0, device, gradient: str, backend: str, memory_budget=None):
    gen = torch.Generator(device=device).manual_seed(2)

    def it():
        model.gradient, model.backend, model.memory_budget = gradient, backend, memory_budget
        for p in model.parameters():
            p.grad = None
        loss = model.loss(x0, gen)
        loss.backward()
        return loss
    return it


def original_iteration(model: DiffFlow, x0, device):
    runner = OriginalDesign(model)
    gen = torch.Generator(device=device).manual_seed(2)

    def it():
        for p in model.parameters():
            p.grad = None
        loss = runner.loss(x0, gen)
        loss.backward()
        return loss
    return it


def floor_iteration(model: DiffFlow, x0, device, recompute: bool = True):
    """The network work of one iteration alone (see the module docstring): with ``recompute``, the adjoint's (no-grad
    forwards, then each state re-evaluated with grad and pulled back); without, each network evaluated once with
    grad at every state and pulled back once."""
    N, B = model.num_steps, x0.shape[0]
    gen = torch.Generator(device=device).manual_seed(3)
    xs = [x0] + [torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype) for _ in range(N)]
    cf = [torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype) for _ in range(N + 1)]
    cs = [torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype) for _ in range(N + 1)]
    t = model.time_grid(B, device=device).to(x0.dtype)
    params = params_of(model)

    def nets(i):
        x = xs[i].detach().requires_grad_(torch.is_grad_enabled())
        return x, [model.drift(x, t[:, i])] + ([model.score(x, t[:, i])] if i > 0 else [])

    def it():
        for p in model.parameters():
            p.grad = None
        with torch.set_grad_enabled(not recompute):  # the forward walk's evaluations
            graphs = [nets(i) for i in range(N + 1)]
        grads = [None] * len(params)
        for i in range(N, -1, -1):  # the backward walk: one VJP per state onto (x_i, parameters)
            x, outs = graphs.pop()
            if recompute:
                x, outs = nets(i)
            got = torch.autograd.grad(outs, (x, *params), [cf[i]] + ([cs[i]] if i > 0 else []), allow_unused=True)
            for k, gk in enumerate(got[1:]):
                if gk is not None:
                    if grads[k] is None:
                        grads[k] = gk
                    else:
                        grads[k].add_(gk)
        return grads
    return it


def _warm(it, model):
    """``it`` run once (warm), the grads it made cleared: the measured call starts from the same baseline on every
    device."""
    it()
    for p in model.parameters():
        p.grad = None
    return it


def check_original_matches(setting_name: str, device) -> dict:
    """Same seed, same noise: the original design must give the adjoint's gradients (a sanity check)."""
    s = dict(SETTINGS[setting_name], batch=min(SETTINGS[setting_name]["batch"], 256), num_steps=8)
    model = build(s, device).double()
    x0 = data(s, device).double()
    out = {}
    for name, it in (("adjoint", model_iteration(model, x0, device, "adjoint", "torch")),
                     ("original", original_iteration(model, x0, device))):
        loss = it()
        out[name] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    num = max(float((a - b).abs().max()) for a, b in zip(out["adjoint"][1], out["original"][1]))
    den = max(float(a.abs().max()) for a in out["adjoint"][1])
    return {"setting": setting_name, "float64": True, "batch": s["batch"], "num_steps": s["num_steps"],
            "max_abs_grad_diff": num, "max_abs_grad": den, "rel": num / den,
            "loss_adjoint": out["adjoint"][0], "loss_original": out["original"][0]}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the records to this file")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--repeats", type=int, default=10, help="timed iterations per variant (upper bound)")
    ap.add_argument("--max-time", type=float, default=None, help="seconds of timed iterations per variant")
    ap.add_argument("--mem-steps", nargs="+", type=int, default=[10, 30, 100])
    ap.add_argument("--budget-fraction", type=float, default=0.1,
                    help="auto@budget's memory budget as a fraction of autograd's measured peak")
    ap.add_argument("--no-mem", action="store_true")
    ap.add_argument("--no-sample", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the original-vs-adjoint gradient check")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one adjoint iteration")
    ap.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    C.add_cpu_args(ap)
    args = ap.parse_args(argv)

    device = C.pick_device(args.device)
    clock = C.setup_cpu(args.threads, args.clock, device)
    repeats = 3 if args.quick else args.repeats
    max_time = args.max_time if args.max_time is not None else (
        2.0 if args.quick else (10.0 if device.type == "cpu" else 3.0))
    auto = C.resolved_auto(device)
    meta = C.machine_info(device)
    meta.update(clock=clock, auto_backend=auto, settings={k: SETTINGS[k] for k in args.settings}, repeats=repeats,
                max_time_s=max_time,
                targets={"auto_over_autograd_max": TARGET_AUTO_VS_AUTOGRAD,
                         "auto_speedup_vs_original_min": TARGET_AUTO_SPEEDUP_VS_ORIGINAL,
                         "auto_over_floor_no_recompute_max": TARGET_AUTO_VS_FLOOR_NO_RECOMPUTE,
                         "auto_at_budget_peak_max": "budget + stored states",
                         "adjoint_fused_speedup_vs_original": TARGET_SPEEDUP_VS_ORIGINAL,
                         "adjoint_fused_over_floor_max": TARGET_VS_FLOOR,
                         "adjoint_peak_ex_states_N100_over_N10_max": TARGET_MEM_GROWTH,
                         "adjoint_over_autograd_peak_N100_max": TARGET_MEM_VS_AUTOGRAD})
    print(f"# train_step  device={device}  torch={torch.__version__}  threads={torch.get_num_threads()}  "
          f"clock={clock}  cpu={meta['cpu_model']}  auto backend -> {auto}  load={meta['loadavg_at_start']}")
    records: list[dict] = []
    t_start = time.perf_counter()

    if not args.no_check:
        chk = check_original_matches(args.settings[0], device)
        meta["original_vs_adjoint_check"] = chk
        print(f"# check: original design vs adjoint gradients (float64, B={chk['batch']}, N={chk['num_steps']}): "
              f"max rel diff {chk['rel']:.1e}")

    for sname in args.settings:
        s = SETTINGS[sname]
        model = build(s, device)
        x0 = data(s, device)
        E = x0.element_size()
        states = (s["num_steps"] + 1) * x0.numel() * E
        # the budget of auto@budget: a tenth of the fastest autograd's peak (measured first)
        ag_backend = auto
        ag_peak = C.measure_peak_bytes(_warm(model_iteration(model, x0, device, "autograd", ag_backend), model), device)
        budget = int(ag_peak * args.budget_fraction)
        variants = [(f"auto+{auto}", model_iteration(model, x0, device, "auto", "auto", None)),
                    ("auto@budget", model_iteration(model, x0, device, "auto", "auto", budget)),
                    (f"adjoint+{auto}", model_iteration(model, x0, device, "adjoint", "auto"))]
        if auto != "torch":
            variants.append(("adjoint+torch", model_iteration(model, x0, device, "adjoint", "torch")))
        variants.append(("autograd+torch", model_iteration(model, x0, device, "autograd", "torch")))
        if auto != "torch":
            variants.append((f"autograd+{auto}", model_iteration(model, x0, device, "autograd", "auto")))
        variants += [("original", original_iteration(model, x0, device)), ("floor", floor_iteration(model, x0, device)),
                     ("floor-no-recompute", floor_iteration(model, x0, device, recompute=False))]
        variants = dict(variants)
        variants["auto@budget"]()
        plan = dict(model.last_gradient_plan)
        times = C.time_interleaved(variants, device, repeats=repeats, warmup=2, min_block_s=0.0,
                                   max_total_s=max_time * len(variants))
        for name, st in times.items():
            records.append(dict(kind="train_iter", setting=sname, variant=name, device=str(device),
                                num_steps=s["num_steps"], batch=s["batch"], shape=list(shape_of(s)), **st))
        # peak memory of the gradient modes at this setting's N
        peaks = {f"autograd+{ag_backend}": ag_peak}
        for name in (f"auto+{auto}", "auto@budget", f"adjoint+{auto}"):
            peaks[name] = C.measure_peak_bytes(_warm(variants[name], model), device)
        for name, peak in peaks.items():
            records.append(dict(kind="peak_memory_mode", setting=sname, variant=name, num_steps=s["num_steps"],
                                device=str(device), peak_bytes=peak, states_bytes=states))
        base = times[f"auto+{auto}"]["median_s"]
        rows = [[name, f"{st['median_s'] * 1e3:.1f}", f"{st['min_s'] * 1e3:.1f}", st["repeats"],
                 f"{st['median_s'] / base:.2f}", f"{st['median_s'] / times['floor-no-recompute']['median_s']:.2f}",
                 f"{peaks[name] / 2**20:.2f}" if name in peaks else ""]
                for name, st in times.items()]
        print(f"\n## training iteration, {sname}: {describe(s)}")
        print(C.fmt_table(["variant", "median_ms", "min_ms", "n", "x_auto", "x_floor_no_recompute", "peak_MiB"], rows))
        t_auto, t_adj = base, times[f"adjoint+{auto}"]["median_s"]
        t_ag = min(st["median_s"] for name, st in times.items() if name.startswith("autograd"))
        t_orig, t_fnr = times["original"]["median_s"], times["floor-no-recompute"]["median_s"]
        t_bud = times["auto@budget"]["median_s"]
        frac = plan["recompute_fraction"]
        pred = (t_auto + frac * (t_adj - t_auto)) / t_auto
        summary = dict(
            kind="train_summary", setting=sname, device=str(device), plan=plan, budget_bytes=budget,
            auto_over_autograd=t_auto / t_ag, auto_speedup_vs_original=t_orig / t_auto, auto_over_floor_no_recompute=
            t_auto / t_fnr, adjoint_speedup_vs_original=t_orig / t_adj, budget_predicted_ratio=pred,
            budget_measured_ratio=t_bud / t_auto, budget_peak_bytes=peaks["auto@budget"], states_bytes=states,
            autograd_peak_bytes=ag_peak)
        summary.update(
            auto_vs_autograd_met=summary["auto_over_autograd"] <= TARGET_AUTO_VS_AUTOGRAD,
            auto_vs_original_met=summary["auto_speedup_vs_original"] >= TARGET_AUTO_SPEEDUP_VS_ORIGINAL,
            auto_vs_floor_met=summary["auto_over_floor_no_recompute"] <= TARGET_AUTO_VS_FLOOR_NO_RECOMPUTE,
            budget_peak_met=peaks["auto@budget"] <= budget + states)
        records.append(summary)

        def met(flag):
            return "met" if flag else "MISSED"
        print(f"auto+{auto} (no limit): {summary['auto_over_autograd']:.3f}x the fastest autograd (target <= "
              f"{TARGET_AUTO_VS_AUTOGRAD}: {met(summary['auto_vs_autograd_met'])}); "
              f"{summary['auto_speedup_vs_original']:.2f}x faster than the original design (target >= "
              f"{TARGET_AUTO_SPEEDUP_VS_ORIGINAL}: {met(summary['auto_vs_original_met'])}); "
              f"{summary['auto_over_floor_no_recompute']:.3f}x floor-no-recompute (target <= "
              f"{TARGET_AUTO_VS_FLOOR_NO_RECOMPUTE}: {met(summary['auto_vs_floor_met'])})")
        print(f"auto@budget: budget {budget / 2**20:.2f} MiB = {args.budget_fraction} x autograd peak "
              f"{ag_peak / 2**20:.2f} MiB; plan keeps {plan['kept']}/{plan['states']} states' graphs "
              f"({plan['graph_bytes_per_state'] / 2**20:.2f} MiB each), recomputes {frac:.0%} of the network "
              f"evaluations; peak {peaks['auto@budget'] / 2**20:.2f} MiB vs budget + states "
              f"{(budget + states) / 2**20:.2f} MiB ({met(summary['budget_peak_met'])}); time / auto(no limit): "
              f"predicted {pred:.3f}, measured {t_bud / t_auto:.3f} (adjoint end: {t_adj / t_auto:.3f})")
        print(f"adjoint+{auto}: {summary['adjoint_speedup_vs_original']:.2f}x faster than the original design")

        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            it = variants[f"auto+{auto}"]
            it()
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                it()
                C.sync(device)
            key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=25))

        if not args.no_sample:
            rows = []
            gen = torch.Generator(device=device).manual_seed(4)

            def sampler(backend):
                def run():
                    model.backend = backend
                    return model.sample(s["batch"], generator=gen)
                return run
            backends = list(dict.fromkeys(["auto", "torch"]))
            stats = C.time_interleaved({b: sampler(b) for b in backends}, device, repeats=repeats, warmup=2,
                                       min_block_s=0.0, max_total_s=max_time)
            for backend, st in stats.items():
                label = f"{backend}->{C.resolved_auto(device)}" if backend == "auto" else backend
                sps = s["batch"] / st["median_s"]
                records.append(dict(kind="sample", setting=sname, backend=label, device=str(device), n=s["batch"],
                                    num_steps=s["num_steps"], samples_per_s=sps, **st))
                rows.append([label, f"{st['median_s'] * 1e3:.1f}", f"{sps:,.0f}"])
            model.backend = "auto"
            print(f"\n## sampling, {sname}: model.sample({s['batch']}) Euler-Maruyama, N={s['num_steps']}")
            print(C.fmt_table(["backend", "median_ms", "samples/s"], rows))

        if not args.no_mem:
            rows, peaks = [], {}
            E = x0.element_size()
            for N in args.mem_steps:
                mN = build(s, device, num_steps=N)
                states = (N + 1) * x0.numel() * E
                for grad in ("adjoint", "auto", "autograd", "original"):
                    it = (original_iteration(mN, x0, device) if grad == "original"
                          else model_iteration(mN, x0, device, grad, "auto"))
                    it()  # warm
                    for p in mN.parameters():  # the grads made by the measured iteration count, on both devices
                        p.grad = None
                    peak = C.measure_peak_bytes(it, device)
                    peaks[(grad, N)] = (peak, states)
                    ex = peak - states if grad in ("adjoint", "original") else peak
                    records.append(dict(kind="peak_memory", setting=sname, gradient=grad, num_steps=N,
                                        device=str(device), peak_bytes=peak, states_bytes=states,
                                        peak_minus_states_bytes=peak - states,
                                        method="cuda.max_memory_allocated" if device.type == "cuda"
                                        else "LiveTensorBytes dispatch mode"))
                    rows.append([grad, N, f"{peak / 2**20:.2f}", f"{states / 2**20:.2f}", f"{ex / 2**20:.2f}"])
                del mN
            print(f"\n## peak memory of one training iteration, {sname} (MiB above the pre-iteration baseline)")
            print(C.fmt_table(["gradient", "N", "peak", "states", "peak-states"], rows))
            lo, hi = min(args.mem_steps), max(args.mem_steps)
            if ("adjoint", lo) in peaks and ("adjoint", hi) in peaks:
                (p_lo, s_lo), (p_hi, s_hi) = peaks[("adjoint", lo)], peaks[("adjoint", hi)]
                growth = (p_hi - s_hi) / max(1, p_lo - s_lo)
                vs_ag = p_hi / peaks[("autograd", hi)][0]
                summ = dict(kind="memory_summary", setting=sname, device=str(device), n_lo=lo, n_hi=hi,
                            adjoint_growth_ex_states=growth, adjoint_over_autograd=vs_ag,
                            growth_met=growth <= TARGET_MEM_GROWTH, vs_autograd_met=vs_ag <= TARGET_MEM_VS_AUTOGRAD)
                records.append(summ)
                print(f"adjoint peak-minus-states N={hi} / N={lo}: {growth:.2f}x (target <= {TARGET_MEM_GROWTH}: "
                      f"{met(summ['growth_met'])}); adjoint / autograd peak at N={hi}: "
                      f"{vs_ag:.3f} (target <= {TARGET_MEM_VS_AUTOGRAD}: {met(summ['vs_autograd_met'])})")

    return C.finish(args, meta, records, t_start)


if __name__ == "__main__":
    raise SystemExit(main())
