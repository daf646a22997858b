"""Proxy runs used to choose the 2-D point defaults (docs/quality_2d.md, "Tuning"): train the ``points`` defaults
plus overrides on TUNING sets only for a short budget, report the fraction of samples inside the support at
lam 0, 0.5 and 1 (3000 samples each), and the training CPU seconds (one thread).

    python benchmarks/tune_2d.py NAME SETS ITERS [JSON_OVERRIDES]
    python benchmarks/tune_2d.py base sharp_8,sharp_10,sharp_11,checkerboard 800
    python benchmarks/tune_2d.py g-rise sharp_8,sharp_10,sharp_11,checkerboard 800 \\
        '{"diffusion": {"start": 0.2, "end": 1.0}, "lr": 0.02, "lr_schedule": "cosine"}'

Override keys are TrainConfig fields, plus ``_fs`` / ``_ss``: a constant factor on the drift's / score's output
(preconditioning ablation). Held-out sets (sharp2d.HELDOUT_SEEDS) are refused.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_2d as q  # noqa: E402

import diffflow_ext.training.loop as loop  # noqa: E402
from diffflow_ext.data import sharp2d  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    name, sets, iters = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
    opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    scale = {k: float(opts.pop(k)) for k in ("_fs", "_ss") if k in opts}
    for s in sets:
        if s.startswith("sharp_") and int(s[6:]) in sharp2d.HELDOUT_SEEDS:
            raise SystemExit(f"{s} is a held-out set: tune on sharp2d.TUNING_SEEDS and the built-ins only")
    build = loop.build_state

    def build_state(cfg, data, ctx, shards):
        st = build(cfg, data, ctx, shards)
        for net, key in ((st.model.drift, "_fs"), (st.model.score, "_ss")):
            if key in scale:
                net.out.register_forward_hook(lambda m, i, o, c=scale[key]: o * c)
        return st

    loop.build_state = build_state
    rows = []
    for s in sets:
        data = q.Points(s, seed=0)
        t0 = time.process_time()
        model, _ = q.train_model("diffflow", data, 0, None, iters, opts)
        row = {"set": s, "cpu": round(time.process_time() - t0, 1)}
        for lam in (0.0, 0.5, 1.0):
            x = data.x(q.draw(model, 3000, 1, lam=lam))
            ok = np.isfinite(x).all(1)
            row[f"in{lam}"] = round(float(data.ds.contains(np.where(ok[:, None], x, 1e9)).mean()) * 100, 1)
        rows.append(row)
        print(name, json.dumps(row), flush=True)
    mean = {k: round(float(np.mean([r[k] for r in rows])), 1) for k in ("in0.0", "in0.5", "in1.0")}
    print("SUMMARY", name, iters, json.dumps(opts), json.dumps(scale), json.dumps(mean),
          "min0.5", min(r["in0.5"] for r in rows), "cpu", round(sum(r["cpu"] for r in rows), 1), flush=True)


if __name__ == "__main__":
    main()
