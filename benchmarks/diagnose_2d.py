"""Diagnose DiffFlow training on a sharp 2-D set (docs/quality_2d.md, "Diagnosis").

Trains the default model (3x64 MLPs, T=0.05, Adam 5e-3 with 0.95/100 decay, EMA 0.995, batch 1024, progressive
N 10->30 over 800 iterations, clip 1) and every 250 iterations prints, for the EMA weights: the prior term and the
transition terms of the loss, mean / covariance eigenvalues of x_N and its correlation with x_0, the drift size at
x_0 and mid-way, the fraction inside the support (lam 0.5 and 1), the -ELBO and the exact entropy.

    python benchmarks/diagnose_2d.py default 8 1000          # variant, sharp2d seed, iterations
    python benchmarks/diagnose_2d.py g1,g=1.0 8 750          # override: T, g, beta (fixed base drift), hidden, lr
    python benchmarks/diagnose_2d.py vp,T=1.0,g=2.828,beta=8.0 0 750
"""

import copy
import json
import sys
import time

import numpy as np
import torch

from diffflow_ext import DiffFlow
from diffflow_ext.data import sharp2d
from diffflow_ext.gradients.walk import forward_walk
from diffflow_ext.networks import SinusoidalTimeEmbedding, TimeMLP
from diffflow_ext.schedules import ProgressiveSteps
from diffflow_ext.training.ema import EMA


class LinDrift(torch.nn.Module):
    def __init__(self, beta):
        super().__init__()
        self.beta = beta

    def forward(self, x, t):
        return -0.5 * self.beta * x


class Resid(torch.nn.Module):
    """A fixed base drift plus a learned residual."""

    def __init__(self, base, net):
        super().__init__()
        self.base, self.net = base, net

    def forward(self, x, t):
        return self.base(x, t) + self.net(x, t)


def mlp(hidden, T):
    m = TimeMLP(2, hidden, 3, 32)
    if T != 0.05:
        m.time_embed = SinusoidalTimeEmbedding(32, 1.0 / T, 2000.0 * 0.05 / T)
    return m


def main():
    torch.set_num_threads(1)
    variant, seed_set = sys.argv[1], int(sys.argv[2])
    iters = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
    ds = sharp2d.generate(seed_set)
    rng = np.random.default_rng(0)
    ref = ds.sample_numpy(100000, np.random.default_rng(1))
    mean, std = ref.mean(0), ref.std(0)

    def to_model(x):
        return (x - mean) / std

    def to_data(z):
        return z * std + mean

    cfg = dict(T=0.05, g=0.2, beta=0.0, hidden=64, lr=5e-3, prog=(10, 30, 800), fixed=False, t0=1e-3, exp=0.9)
    for kv in variant.split(",")[1:]:
        k, v = kv.split("=")
        cfg[k] = tuple(map(int, v.split(":"))) if k == "prog" else type(cfg[k])(json.loads(v))
    torch.manual_seed(0)
    base = LinDrift(cfg["beta"])
    drift = base if cfg["fixed"] else Resid(base, mlp(cfg["hidden"], cfg["T"]))
    kw = dict(num_steps=cfg["prog"][1], t_start=cfg["t0"], t_end=cfg["T"], time_exponent=cfg["exp"],
              diffusion=cfg["g"])
    model = DiffFlow(drift, mlp(cfg["hidden"], cfg["T"]), (2,), gradient="autograd" if cfg["fixed"] else "adjoint",
                     **kw)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.StepLR(opt, 100, 0.95)
    ema = EMA(model, 0.995)
    prog = ProgressiveSteps(*cfg["prog"])
    gen = torch.Generator().manual_seed(1)
    t0 = time.process_time()
    print("variant", variant, cfg, ds, flush=True)

    def evaluate(it):
        m = copy.deepcopy(DiffFlow(model.drift, model.score, (2,), **kw))
        m.load_state_dict({**m.state_dict(), **ema.shadow})
        with torch.no_grad():
            z = torch.from_numpy(to_model(ds.sample_numpy(2000, np.random.default_rng(5)))).float()
            tr = m.forward_trajectory(z, torch.Generator().manual_seed(3))
            xN = tr[-1].double()
            walk = m._walk(z, m.time_grid(2000), torch.Generator().manual_seed(4))
            total = forward_walk(walk, z, keep_states=False).loss.mean().item()
            prior = m.prior_nll(tr[-1]).mean().item()
            f0 = m.drift(z, torch.full((2000,), cfg["t0"])).norm(dim=1).mean().item()
            fmid = m.drift(tr[len(tr) // 2], torch.full((2000,), cfg["T"] / 2)).norm(dim=1).mean().item()
            inside = {}
            for lam in (0.5, 1.0):
                s = m.sample(4000, lam=lam, generator=torch.Generator().manual_seed(7)).double().numpy()
                inside[lam] = float(ds.contains(to_data(s)).mean())
            nb = m.nll_bound(z, torch.Generator().manual_seed(9)).nats.mean().item() + float(np.log(std).sum())
        print(json.dumps({
            "it": it, "cpu": round(time.process_time() - t0, 1), "prior": round(prior, 3),
            "trans": round(total - prior, 3), "xN_mean": [round(v, 3) for v in xN.mean(0).tolist()],
            "xN_cov_eig": [round(v, 3) for v in torch.linalg.eigvalsh(torch.cov(xN.T)).tolist()],
            "xN_corr_x0": [round(float(np.corrcoef(xN[:, d], z[:, d].double())[0, 1]), 3) for d in range(2)],
            "|f(x0,t0)|": round(f0, 2), "|f(mid)|": round(fmid, 2), "in_lam0.5": inside[0.5],
            "in_lam1": inside[1.0], "nelbo": round(nb, 3), "H": round(ds.entropy, 3)}), flush=True)

    evaluate(0)
    for it in range(1, iters + 1):
        x = torch.from_numpy(to_model(ds.sample_numpy(1024, rng))).float()
        opt.zero_grad()
        model.loss(x, gen, num_steps=prog(it - 1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model)
        if it % 250 == 0:
            evaluate(it)


if __name__ == "__main__":
    main()
