"""Shared helpers for the benchmark scripts: timing, machine description, memory tracking, JSON output.

Timing model (``time_fn``): a few warm-up calls, then ``repeats`` timed *blocks*; each block runs the
callable ``inner`` times back to back between two device synchronisations (``inner`` is calibrated so
that a block lasts at least ``min_block_s``, which keeps timer resolution and launch jitter out of
microsecond-scale ops). The reported time is the median over blocks of the per-call time, on the wall clock
by default or on the process CPU clock (``--clock cpu``, for shared machines; see :func:`setup_cpu`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # an installed diffflow_ext / PYTHONPATH wins; else this checkout
    sys.path.append(str(ROOT))


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line naming the argument (no usage block), like the ``diffflow`` command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------- devices
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to this torch build")
    return dev


# ----------------------------------------------------------------------------- timing
CLOCKS = ("wall", "cpu")
_CLOCK = {"name": "wall"}


def setup_cpu(threads: int | None, clock: str, device: torch.device) -> str:
    """Apply ``--threads`` / ``--clock``; returns the clock in use (always ``wall`` on CUDA).

    ``cpu`` times with :func:`time.process_time` (CPU seconds of this process, all threads): on a shared,
    oversubscribed machine it is far more stable than wall time, because time spent descheduled does not count.
    It is meaningful with ``--threads 1`` (with more threads, OpenMP spin-waiting at barriers is counted too).
    """
    if threads:
        torch.set_num_threads(threads)
    if clock not in CLOCKS:
        raise SystemExit(f"--clock: expected one of {CLOCKS}, got {clock!r}")
    if device.type == "cuda" and clock != "wall":
        print("# --clock cpu is meaningless with CUDA (host time only); timing with the wall clock")
        clock = "wall"
    _CLOCK["name"] = clock
    return clock


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    repeats: int = 20,
    warmup: int = 3,
    min_block_s: float = 2e-3,
    max_total_s: float = 3.0,
    min_repeats: int = 3,
) -> dict:
    """Median per-call seconds of ``fn`` (see the module docstring); returns a dict of statistics.

    Both clocks are recorded for every block (``wall_median_s``, ``cpu_median_s``); ``median_s``, ``min_s`` and
    ``iqr_s`` use the clock chosen by :func:`setup_cpu` (wall by default). ``max_total_s`` caps the timed part:
    slow calls get fewer blocks, never fewer than ``min_repeats``.
    """
    return time_interleaved({"fn": fn}, device, repeats=repeats, warmup=warmup, min_block_s=min_block_s,
                            max_total_s=max_total_s, min_repeats=min_repeats)["fn"]


def _stats(wall: list[float], cpu: list[float], inner: int) -> dict:
    use_cpu = _CLOCK["name"] == "cpu"
    samples = sorted(cpu if use_cpu else wall)
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {
        "median_s": statistics.median(samples),
        "min_s": samples[0],
        "iqr_s": q[2] - q[0],
        "wall_median_s": statistics.median(wall),
        "cpu_median_s": statistics.median(cpu),
        "clock": _CLOCK["name"],
        "repeats": len(samples),
        "inner": inner,
    }


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    repeats: int = 20,
    warmup: int = 3,
    min_block_s: float = 2e-3,
    max_total_s: float = 3.0,
    min_repeats: int = 3,
) -> dict[str, dict]:
    """Like :func:`time_fn` for several callables whose *ratios* matter: their timed blocks are interleaved
    round-robin (the order rotating every round), so that all of them see the same machine conditions --
    on a shared machine, load that comes and goes then shifts every callable alike instead of one of them.
    ``max_total_s`` is the budget of the whole group."""
    use_cpu = _CLOCK["name"] == "cpu"
    names = list(fns)
    inner, est = {}, {}
    for k in names:
        for _ in range(max(1, warmup)):
            fns[k]()
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fns[k]()
        sync(device)
        one = max(time.process_time() - c0 if use_cpu else time.perf_counter() - t0, 1e-7)
        inner[k] = max(1, int(min_block_s / one))
        est[k] = one * inner[k]
    rounds = max(min_repeats, min(repeats, int(max_total_s / sum(est.values()))))
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    for r in range(rounds):
        for j in range(len(names)):
            k = names[(j + r) % len(names)]
            fn, n = fns[k], inner[k]
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                fn()
            sync(device)
            wall[k].append((time.perf_counter() - t0) / n)
            cpu[k].append((time.process_time() - c0) / n)
    return {k: _stats(wall[k], cpu[k], inner[k]) for k in names}


# ----------------------------------------------------------------------------- memory
class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak of the bytes held by live tensor storages created while the mode is active (CPU).

    Every op output passes through ``__torch_dispatch__``; a storage is counted once when it first appears
    (``nbytes``) and uncounted when the storage object dies (``weakref.finalize`` on the untyped storage,
    whose Python object lives exactly as long as the C++ storage). This counts what the program *holds*,
    independent of the allocator's caching -- the CPU analogue of ``torch.cuda.max_memory_allocated``
    minus the memory allocated before the measured region. Storages that existed before entering the mode
    (parameters, inputs) are not counted, nor are outputs aliasing an input (views of a parameter such as the
    transposed weights a linear layer saves for backward, in-place results); ``.grad`` buffers created inside
    are.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}

    def _free(self, key: int, n: int) -> None:
        if self._seen.pop(key, None) is not None:
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # outputs that alias an input (views such as ``aten.t`` of a weight, in-place ops) hold no new memory
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                n = st.nbytes()
                key = st.data_ptr()
                if n == 0 or key in self._seen or key in inputs:
                    continue
                self._seen[key] = n
                self.live += n
                weakref.finalize(st, self._free, key, n)
                if self.live > self.peak:
                    self.peak = self.live
        return out


def measure_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` (caching allocator statistics) after a reset.
    CPU: :class:`LiveTensorBytes` (exact live-storage accounting through a dispatch mode).
    """
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    with LiveTensorBytes() as mode:
        fn()
    return int(mode.peak)


# ----------------------------------------------------------------------------- machine / output
def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:  # noqa: BLE001 - best effort description
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    import diffflow_ext

    info = {
        "cpu_model": _lscpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "available_backends": {k: v["available"] for k, v in diffflow_ext.available_backends().items()},
        "backend_reasons": {k: v["reason"] for k, v in diffflow_ext.available_backends().items()},
        "diffflow_ext_path": str(Path(diffflow_ext.__file__).parent),
        "git_commit": _git_commit(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_at_start": _loadavg(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = p.name
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other processes on a shared machine distort CPU timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def write_json(path: str | None, meta: dict, records: list[dict]) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"meta": meta, "records": records}, indent=1, default=str) + "\n")
    print(f"wrote {len(records)} records to {p}")


def device_backends(device: torch.device) -> list[str]:
    """Names of the step-op backends available for tensors on ``device`` (``available_backends()``)."""
    import diffflow_ext

    out = []
    for name, st in diffflow_ext.available_backends().items():
        if st["available"] and device.type in st["devices"]:
            out.append(name)
    return out


def resolved_auto(device: torch.device) -> str:
    from diffflow_ext.ops.backends import resolve

    return resolve("auto", device).name


def fmt_table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_cpu_args(ap) -> None:
    """``--threads`` and ``--clock``, shared by the benchmark scripts."""
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--clock", default="wall", choices=list(CLOCKS),
                    help="wall (default) or cpu = process CPU time, for shared machines with --threads 1")


def finish(args, meta: dict, records: list, t_start: float) -> int:
    """Common script epilogue: total wall time on stdout, JSON (``--json``) written."""
    meta["wall_s"] = time.perf_counter() - t_start
    print(f"\n# total wall time {meta['wall_s']:.0f} s")
    write_json(args.json, meta, records)
    return 0
