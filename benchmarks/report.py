#!/usr/bin/env python
"""Markdown tables from the JSON files of ``step_throughput.py`` and ``train_step.py``.

    python benchmarks/report.py STEP_JSON [TRAIN_JSON] [--ops backward_noise ...] [--modes fwd fwdbwd]

Used to fill docs/benchmarks.md; works for CPU and GPU results alike.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def md(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def meta_line(meta: dict) -> str:
    keys = ("cpu_model", "cpu_count", "torch_threads", "torch", "device", "gpu", "clock", "git_commit", "time",
            "loadavg_at_start")
    return "; ".join(f"{k}={meta[k]}" for k in keys if k in meta)


def step_tables(doc: dict, ops=None, modes=None) -> str:
    recs = doc["records"]
    by = defaultdict(dict)
    order = []
    for r in recs:
        if ops and r["op"] not in ops or modes and r["mode"] not in modes:
            continue
        key = (r["op"], r["mode"], r["size"])
        if key not in by:
            order.append(key)
        by[key][r["backend"]] = r
    op_i = {o: i for i, o in enumerate(dict.fromkeys(r["op"] for r in recs))}
    size_i = {z: i for i, z in enumerate(dict.fromkeys(r["size"] for r in recs))}
    order.sort(key=lambda k: (op_i[k[0]], k[1], size_i[k[2]]))  # op, then mode, then size
    impls = list(dict.fromkeys(r["backend"] for r in recs))
    fused = [i for i in impls if i not in ("eager", "compile", "torch")]
    parts = [f"_{meta_line(doc['meta'])}_", ""]
    headers = ["op", "mode", "size (BxD)"] + [f"{i} us" for i in impls] + \
        [f"{f} GB/s (% copy)" for f in fused] + ["copy GB/s"] + \
        [f"{f} vs eager" for f in fused] + [f"{f} vs compile" for f in fused]
    rows = []
    for key in order:
        g = by[key]
        any_r = next(iter(g.values()))
        row = [key[0], key[1], f"{key[2]} ({any_r['B']}x{any_r['D']})"]
        row += [f"{g[i]['median_s'] * 1e6:.1f}" if i in g else "-" for i in impls]
        row += [f"{g[f]['GBps']:.2f} ({100 * g[f]['fraction_of_copy']:.0f}%)" if f in g else "-" for f in fused]
        row += [f"{any_r['copy_GBps']:.1f}"]
        row += [f"{g[f]['speedup_vs_eager']:.2f}x" if f in g else "-" for f in fused]
        row += [f"{g[f]['speedup_vs_compile']:.2f}x" if f in g and g[f]["speedup_vs_compile"] else "-"
                for f in fused]
        rows.append(row)
    parts.append(md(headers, rows))
    return "\n".join(parts)


def train_tables(doc: dict) -> str:
    recs = doc["records"]
    parts = [f"_{meta_line(doc['meta'])}_", ""]
    chk = doc["meta"].get("original_vs_adjoint_check")
    if chk:
        parts += [f"Original design vs adjoint gradients (float64, B={chk['batch']}, N={chk['num_steps']}): "
                  f"max relative difference {chk['rel']:.1e}.", ""]
    settings = list(dict.fromkeys(r["setting"] for r in recs))
    for s in settings:
        it = [r for r in recs if r["setting"] == s and r["kind"] == "train_iter"]
        if it:
            base = next((r["median_s"] for r in it if r["variant"].startswith("auto+")), it[0]["median_s"])
            fnr = next((r["median_s"] for r in it if r["variant"] == "floor-no-recompute"), None)
            peaks = {r["variant"]: r["peak_bytes"] for r in recs
                     if r["setting"] == s and r["kind"] == "peak_memory_mode"}
            r0 = it[0]
            shape = r0.get("shape", [r0.get("dim")])
            parts += [f"**Training iteration, `{s}`** (shape={tuple(shape)}, N={r0['num_steps']}, B={r0['batch']})", ""]
            parts.append(md(["variant", "median ms", "min ms", "x auto", "x floor-no-recompute", "peak MiB"],
                            [[r["variant"], f"{r['median_s'] * 1e3:.1f}", f"{r['min_s'] * 1e3:.1f}",
                              f"{r['median_s'] / base:.2f}", f"{r['median_s'] / fnr:.2f}" if fnr else "",
                              f"{peaks[r['variant']] / 2**20:.2f}" if r["variant"] in peaks else ""] for r in it]))
            parts.append("")
        for r in (r for r in recs if r["setting"] == s and r["kind"] == "train_summary"):
            if "auto_over_autograd" not in r:
                continue

            def met(key):
                return "met" if r[key] else "MISSED"
            parts += [f"auto (no limit): {r['auto_over_autograd']:.3f}x the fastest autograd "
                      f"({met('auto_vs_autograd_met')}), {r['auto_speedup_vs_original']:.2f}x faster than the original "
                      f"({met('auto_vs_original_met')}), {r['auto_over_floor_no_recompute']:.3f}x floor-no-recompute "
                      f"({met('auto_vs_floor_met')}); auto@budget: budget {r['budget_bytes'] / 2**20:.2f} MiB, keeps "
                      f"{r['plan']['kept']}/{r['plan']['states']}, peak {r['budget_peak_bytes'] / 2**20:.2f} MiB vs "
                      f"budget + states {(r['budget_bytes'] + r['states_bytes']) / 2**20:.2f} MiB "
                      f"({met('budget_peak_met')}); time / auto predicted {r['budget_predicted_ratio']:.3f}, measured "
                      f"{r['budget_measured_ratio']:.3f}.", ""]
        smp = [r for r in recs if r["setting"] == s and r["kind"] == "sample"]
        if smp:
            parts += [f"**Sampling, `{s}`** (`model.sample({smp[0]['n']})`, Euler-Maruyama, N={smp[0]['num_steps']})",
                      ""]
            parts.append(md(["backend", "median ms", "samples/s"],
                            [[r["backend"], f"{r['median_s'] * 1e3:.1f}", f"{r['samples_per_s']:,.0f}"] for r in smp]))
            parts.append("")
        mem = [r for r in recs if r["setting"] == s and r["kind"] == "peak_memory"]
        if mem:
            parts += [f"**Peak memory of one iteration, `{s}`** (MiB above the pre-iteration baseline; "
                      f"{mem[0]['method']})", ""]
            parts.append(md(["gradient", "N", "peak", "stored states", "peak - states"],
                            [[r["gradient"], r["num_steps"], f"{r['peak_bytes'] / 2**20:.2f}",
                              f"{r['states_bytes'] / 2**20:.2f}" if r["gradient"] in ("adjoint", "original") else "-",
                              f"{r['peak_minus_states_bytes'] / 2**20:.2f}"
                              if r["gradient"] in ("adjoint", "original") else "-"]
                             for r in mem]))
            parts.append("")
        for r in recs:
            if r["setting"] == s and r["kind"] == "memory_summary":
                parts += [f"adjoint peak minus states, N={r['n_hi']} / N={r['n_lo']}: "
                          f"{r['adjoint_growth_ex_states']:.2f}x (target <= 1.3: "
                          f"{'met' if r['growth_met'] else 'MISSED'}); adjoint / autograd peak at N={r['n_hi']}: "
                          f"{r['adjoint_over_autograd']:.3f} "
                          f"(target <= 0.2: {'met' if r['vs_autograd_met'] else 'MISSED'}).",
                          ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="JSON files of step_throughput.py and/or train_step.py")
    ap.add_argument("--ops", nargs="+", default=None)
    ap.add_argument("--modes", nargs="+", default=None)
    args = ap.parse_args(argv)
    for f in args.files:
        doc = json.load(open(f))
        kind = "step" if doc["records"] and "op" in doc["records"][0] else "train"
        print(step_tables(doc, args.ops, args.modes) if kind == "step" else train_tables(doc))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
