#!/usr/bin/env python
"""Throughput of the fused DiffFlow step ops against the eager reference and torch.compile of it.

For every size, op and mode (``fwd``; ``fwdbwd`` = forward + the backward that training needs), this times

* each available backend of this install for the device, called through the public op
  (``diffflow_ext.ops.<op>(..., backend=name)``, so argument checks are included; ``torch`` is the
  reference math behind the public API),
* ``eager``: the reference function (``diffflow_ext.ops.reference.<op>_ref``) called directly,
* ``compile``: ``torch.compile(<op>_ref, dynamic=False)``, compiled once per shape and mode before timing
  (the compile time is reported separately, never in the timings),

and reports the median time, the achieved bandwidth of the bytes the op *must* move (byte model below), the
same-run bandwidth of a plain ``dst.copy_(src)`` moving the same number of bytes (``src`` and ``dst`` of
``bytes/2`` each: one read + one write), the fraction of that copy bandwidth, and the speed-ups. The timed blocks of
all implementations of one (size, op, mode) and of its copy are interleaved round-robin
(``_common.time_interleaved``), so that their ratios hold even on a machine shared with other work.

Byte model (``E`` = element size of the data dtype, ``S`` = size of the accumulation dtype used for the
per-sample ``(B,)`` tensors dt / g / weight / half_sqnorm; ``BD`` = number of data elements):

============== ====== ======================================================================================
op             mode   bytes that must be moved
============== ====== ======================================================================================
em_step        fwd    read x, drift, noise; write x_next                            4 BD E + 2 B S
em_step        fwdbwd fwd + read grad_out, write grad_drift (grad_x may alias       6 BD E + 2 B S
                      grad_out: d x_next / dx = I, so it need not be written)
backward_noise fwd    read x_prev, x_next, drift, score; write delta, half_sqnorm   5 BD E + 3 B S
backward_noise fwdbwd fwd + read delta and w; write 4 grads (x_prev, x_next,        10 BD E + 4 B S
                      drift, score; all are per-sample multiples of delta)
flow_step      fwd    read x_prev, x, drift, score, noise; write x_next, h          6 BD E + 4 B S
flow_step      fwdbwd fwd + save delta (write + read) + read grad_x_next, w;       13 BD E + 5 B S
                      write 4 grads (x_prev, x, drift, score)
adjoint_step   fwd    read x_prev, x, drift, score, adj_next, adj_direct;          10 BD E + 4 B S
                      write adj_prev, cot_x, cot_drift, cot_score (not differentiable: no fwdbwd)
============== ====== ======================================================================================

The backward is the one of training: ``loss = (half_sqnorm * w).sum()`` (and ``(x_next * c).sum()`` for
ops returning a state), computed as ``torch.autograd.grad(outputs, inputs, grad_outputs=(c, w))`` -- the
same gradients without materialising the scalar loss -- w.r.t. the state/drift/score inputs (never the
noise, dt or g).

Usage::

    python benchmarks/step_throughput.py [--json FILE] [--sizes toy tabular mnist cifar large]
        [--ops backward_noise em_step flow_step adjoint_step] [--backends cpu torch ...] [--repeats 20]
        [--device cpu|cuda] [--dtype float32] [--modes fwd fwdbwd] [--no-compile] [--quick]
"""

from __future__ import annotations

import argparse
import time
import warnings

import _common as C  # noqa: E402  (puts the checkout on sys.path)
import torch

from diffflow_ext import ops  # noqa: E402
from diffflow_ext.ops import reference  # noqa: E402
from diffflow_ext.ops.reference import acc_dtype  # noqa: E402

SIZES = {
    "toy": (5000, 2),  # 2-D toy data, the paper's batch
    "tabular": (1024, 64),
    "mnist": (64, 784),
    "cifar": (128, 3072),
    "large": (256, 65536),
}

# op -> (tensor input names, per-sample input names, differentiable inputs, state outputs, per-sample outputs,
#        bytes(BD, B, E, S, mode))
OPS = {
    "backward_noise": dict(
        tensors=("x_prev", "x_next", "drift", "score"), scalars=("dt", "g"),
        grad_inputs=("x_prev", "x_next", "drift", "score"), grad_outputs=("h",), outputs=("delta", "h"),
        bytes={"fwd": lambda bd, b, e, s: 5 * bd * e + 3 * b * s,
               "fwdbwd": lambda bd, b, e, s: 10 * bd * e + 4 * b * s},
    ),
    "em_step": dict(
        tensors=("x", "drift", "noise"), scalars=("dt", "g"),
        grad_inputs=("x", "drift"), grad_outputs=("x_next",), outputs=("x_next",),
        bytes={"fwd": lambda bd, b, e, s: 4 * bd * e + 2 * b * s,
               "fwdbwd": lambda bd, b, e, s: 6 * bd * e + 2 * b * s},
    ),
    "flow_step": dict(
        tensors=("x_prev", "x", "drift", "score", "noise"), scalars=("dt_prev", "dt", "g"),
        grad_inputs=("x_prev", "x", "drift", "score"), grad_outputs=("x_next", "h"), outputs=("x_next", "h"),
        bytes={"fwd": lambda bd, b, e, s: 6 * bd * e + 4 * b * s,
               "fwdbwd": lambda bd, b, e, s: 13 * bd * e + 5 * b * s},
    ),
    "adjoint_step": dict(
        tensors=("x_prev", "x", "drift", "score", "weight", "adj_next", "adj_direct"),
        scalars=("dt_prev", "dt", "g"), grad_inputs=(), grad_outputs=(), outputs=("adj_prev", "cot_x", "cot_drift",
                                                                                   "cot_score"),
        bytes={"fwd": lambda bd, b, e, s: 10 * bd * e + 4 * b * s},
    ),
}
PER_SAMPLE_TENSORS = {"weight"}  # (B,) tensors among the op's positional "tensors"
REF = {name: getattr(reference, f"{name}_ref") for name in OPS}
COPY = "_copy"


def make_inputs(op: str, B: int, D: int, dtype, device, gen: torch.Generator) -> list[torch.Tensor]:
    """Positional arguments of the op, in the reference order, with plausible DiffFlow magnitudes."""
    spec = OPS[op]
    acc = acc_dtype(dtype)
    args = []
    names = [n for n in spec["tensors"]]
    # positional order of the reference functions
    order = {
        "backward_noise": ("x_prev", "x_next", "drift", "score", "dt", "g"),
        "em_step": ("x", "drift", "noise", "dt", "g"),
        "flow_step": ("x_prev", "x", "drift", "score", "noise", "dt_prev", "dt", "g"),
        "adjoint_step": ("x_prev", "x", "drift", "score", "weight", "adj_next", "adj_direct", "dt_prev", "dt", "g"),
    }[op]
    assert set(order) == set(names) | set(spec["scalars"])
    for n in order:
        if n in ("dt", "dt_prev"):
            args.append((1.5e-3 + 1e-4 * torch.rand(B, generator=gen)).to(device=device, dtype=acc))
        elif n == "g":
            args.append((0.2 + 0.01 * torch.rand(B, generator=gen)).to(device=device, dtype=acc))
        elif n in PER_SAMPLE_TENSORS:
            args.append(torch.rand(B, generator=gen).to(device=device, dtype=acc))
        else:
            args.append(torch.randn(B, D, generator=gen).to(device=device, dtype=dtype))
    return list(args), list(order)


def impl_fn(op: str, impl: str, compiled: dict):
    if impl == "eager":
        return REF[op]
    if impl == "compile":
        if op not in compiled:
            compiled[op] = torch.compile(REF[op], dynamic=False)
        return compiled[op]
    public = getattr(ops, op)
    return lambda *a: public(*a, backend=impl)


def make_call(op: str, fn, args: list, names: list, mode: str, gen: torch.Generator):
    """A zero-argument callable running one measurement of ``fn`` in ``mode``."""
    spec = OPS[op]
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(*args)
        return call
    # fwdbwd: leaves for the differentiable inputs, cotangents for the outputs that carry the loss
    args = [a.detach().requires_grad_(n in spec["grad_inputs"]) for a, n in zip(args, names)]
    leaves = [a for a, n in zip(args, names) if n in spec["grad_inputs"]]
    ref_out = REF[op](*[a.detach() for a in args])
    ref_out = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    cots = {}
    for out_name, t in zip(spec["outputs"], ref_out):
        if out_name in spec["grad_outputs"]:
            cots[out_name] = torch.rand(t.shape, generator=gen).to(device=t.device, dtype=t.dtype)

    def call():
        out = fn(*args)
        out = out if isinstance(out, tuple) else (out,)
        outs = [o for o, n in zip(out, spec["outputs"]) if n in cots]
        return torch.autograd.grad(outs, leaves, [cots[n] for n in spec["outputs"] if n in cots])
    return call


def _copy_fn(n: int, device):
    """``dst.copy_(src)`` for two fresh float32 buffers of ``n`` elements (one read + one write)."""
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write one record per measurement to this file")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument("--backends", nargs="+", default=None,
                    help="fused backends to time (default: every available backend for the device)")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--repeats", type=int, default=21, help="timed blocks per measurement (upper bound)")
    ap.add_argument("--max-time", type=float, default=None,
                    help="seconds of timed blocks per measurement (default 1.5 on cpu, 0.25 on cuda)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--compile-ops", nargs="+", default=None, choices=list(OPS),
                    help="ops that get the torch.compile baseline (default: all on cpu; backward_noise on cuda, "
                         "where every fresh Triton compile costs seconds of a short GPU lease)")
    ap.add_argument("--quick", action="store_true", help="few repeats, short blocks: a smoke run")
    C.add_cpu_args(ap)
    args = ap.parse_args(argv)

    device = C.pick_device(args.device)
    clock = C.setup_cpu(args.threads, args.clock, device)
    dtype = getattr(torch, args.dtype)
    acc = acc_dtype(dtype)
    E, S = torch.tensor([], dtype=dtype).element_size(), torch.tensor([], dtype=acc).element_size()
    max_time = args.max_time if args.max_time is not None else (1.5 if device.type == "cpu" else 0.25)
    min_block = 2e-3 if device.type == "cpu" else 1e-3
    repeats = args.repeats
    if args.quick:
        repeats, max_time, min_block = 5, 0.2, 5e-4

    available = C.device_backends(device)
    backends = args.backends if args.backends is not None else available
    missing = [b for b in backends if b not in available]
    if missing:
        print(f"skipping backends not available for {device.type}: {missing} (available: {available})")
    backends = [b for b in backends if b in available]
    default_compile = list(OPS) if device.type == "cpu" else ["backward_noise"]
    compile_ops = set() if args.no_compile else set(args.compile_ops or default_compile)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                               4096)

    meta = C.machine_info(device)
    meta.update(compile_ops=sorted(compile_ops), dtype=args.dtype, clock=clock, backends_timed=backends,
                auto_backend=C.resolved_auto(device), repeats=repeats, max_time_s=max_time, min_block_s=min_block)
    print(f"# step_throughput  device={device}  dtype={args.dtype}  torch={torch.__version__}  "
          f"threads={torch.get_num_threads()}  clock={clock}  cpu={meta['cpu_model']}  load={meta['loadavg_at_start']}")
    print(f"# fused backends timed: {backends or '(none)'}   auto -> {meta['auto_backend']}")
    gen = torch.Generator().manual_seed(0)
    records: list[dict] = []
    compiled: dict[str, object] = {}
    t_start = time.perf_counter()

    for size in args.sizes:
        B, D = SIZES[size]
        rows = []
        for op in args.ops:
            base_args, names = make_inputs(op, B, D, dtype, device, gen)
            for mode in args.modes:
                if mode not in OPS[op]["bytes"]:
                    continue
                nbytes = OPS[op]["bytes"][mode](B * D, B, E, S)
                impls = list(backends) + ["eager"] + (["compile"] if op in compile_ops else [])
                fns, compile_s = {}, {}
                for impl in impls:
                    fns[impl] = make_call(op, impl_fn(op, impl, compiled), base_args, names, mode, gen)
                    if impl == "compile":  # compile now, outside the timings
                        t0 = time.perf_counter()
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            fns[impl]()
                        C.sync(device)
                        compile_s[impl] = time.perf_counter() - t0
                # the practical limit, in the same rounds: dst.copy_(src) moving the same number of bytes
                n_copy = max(1, nbytes // 2 // 4)
                fns[COPY] = _copy_fn(n_copy, device)
                results = C.time_interleaved(fns, device, repeats=repeats, max_total_s=max_time * len(fns),
                                             min_block_s=min_block)
                del fns[COPY]  # frees its buffers
                cg = 2 * n_copy * 4 / results.pop(COPY)["median_s"] / 1e9
                for impl in results:
                    results[impl]["compile_s"] = compile_s.get(impl)
                for impl, st in results.items():
                    gbps = nbytes / st["median_s"] / 1e9
                    rec = dict(
                        op=op, backend=impl, size=size, B=B, D=D, dtype=args.dtype, device=str(device), mode=mode,
                        median_s=st["median_s"], min_s=st["min_s"], iqr_s=st["iqr_s"], repeats=st["repeats"],
                        inner=st["inner"], clock=st["clock"], wall_median_s=st["wall_median_s"],
                        cpu_median_s=st["cpu_median_s"], bytes=nbytes, GBps=gbps, copy_GBps=cg,
                        fraction_of_copy=gbps / cg,
                        speedup_vs_eager=results["eager"]["median_s"] / st["median_s"],
                        speedup_vs_compile=(results["compile"]["median_s"] / st["median_s"]
                                            if "compile" in results else None),
                        compile_s=st["compile_s"],
                    )
                    records.append(rec)
                    rows.append([op, mode, impl, f"{st['median_s'] * 1e6:.1f}", f"{gbps:.2f}", f"{cg:.2f}",
                                 f"{100 * gbps / cg:.0f}%", f"{rec['speedup_vs_eager']:.2f}x",
                                 "-" if rec["speedup_vs_compile"] is None else f"{rec['speedup_vs_compile']:.2f}x"])
        print(f"\n## {size}: B={B} D={D} ({B * D:,} elements, {args.dtype}, {device})")
        print(C.fmt_table(["op", "mode", "impl", "median_us", "GB/s", "copy_GB/s", "%copy", "vs_eager",
                           "vs_compile"], rows))
    return C.finish(args, meta, records, t_start)


if __name__ == "__main__":
    raise SystemExit(main())
