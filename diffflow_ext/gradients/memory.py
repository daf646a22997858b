"""Memory budgets and checkpointing plans for the ``"auto"`` gradient mode.

A *budget* is what one training iteration may spend on saved network activations (the networks' autograd
graphs) beyond what the stochastic adjoint always holds: the states ``x_0..x_N`` (``(N+1) B D`` elements).
It is given as bytes (an ``int``, or a float above 1), as a fraction in ``(0, 1]`` of the memory free at the
time of the call (CUDA: free device memory plus the allocator's cached but unused blocks; CPU: ``MemAvailable`` of
``/proc/meminfo``), or ``None`` for no limit.

A *plan* says, for each state ``i = 0..N``, whether the networks' graphs made in the forward walk are kept
(no recomputation in the backward walk) or dropped (the networks are re-run at ``x_i``, with the first
pass's RNG state, in the backward walk). With every state stored, each dropped state costs exactly one
recomputation of the networks at that state, whichever it is; the schedules differ in peak memory:

* ``"end"`` keeps the ``k`` states nearest the noise end (``i > N - k``). The backward walk visits them
  first and frees each graph after its VJP, so no recomputed graph ever coexists with the kept ones:
  peak ``k G``. Optimal for stored states, and the default.
* ``"uniform"``: the ``k`` kept states evenly spaced over the trajectory (the classic uniform
  checkpointing layout); peak ``k G`` plus one recomputed graph.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

__all__ = ["CHECKPOINT_SCHEDULES", "check_memory_budget", "resolve_memory_budget",
           "available_memory", "Plan", "make_plan", "work_bytes"]

CHECKPOINT_SCHEDULES = ("end", "uniform")


def check_memory_budget(value: object, name: str = "memory_budget") -> int | float | None:
    """Validate a budget: ``None`` (no limit), bytes (an ``int >= 0``, or a float > 1) or a fraction of free
    memory (a float in ``(0, 1]``). Returns None, an int of bytes or a float fraction."""
    expected = "expected bytes (an int >= 0), a fraction of free memory in (0, 1] or None"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: {expected}, got {type(value).__name__} {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name}: {expected}, got {value}")
        return value
    if math.isinf(value) and value > 0:
        return None
    if not value > 0 or math.isnan(value):
        raise ValueError(f"{name}: {expected}, got {value!r}")
    return value if value <= 1.0 else int(value)


def available_memory(device: torch.device) -> int:
    """Bytes free now on ``device`` (see the module docstring)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62  # unknown: no limit


def resolve_memory_budget(budget: int | float | None, device: torch.device) -> float:
    """Bytes (``inf`` for no limit) of a validated budget, fractions resolved against the memory free now."""
    if budget is None:
        return math.inf
    if isinstance(budget, float):
        return budget * available_memory(device)
    return float(budget)


@dataclass
class Plan:
    """Which states keep their graphs. ``graph_bytes``: measured bytes of one interior state's graphs
    (drift and score; 0 when not measured), ``budget_bytes``: the resolved budget."""

    keep: list[bool]
    schedule: str
    graph_bytes: int = 0
    budget_bytes: float = math.inf

    @property
    def num_kept(self) -> int:
        return sum(self.keep)

    @property
    def num_recomputed(self) -> int:
        return len(self.keep) - self.num_kept

    def recompute_fraction(self) -> float:
        """Fraction of the walk's network evaluations that the backward walk repeats (state 0 has only the
        drift, each other state the drift and the score: weights 1/2 and 1, approximately)."""
        w = [0.5] + [1.0] * (len(self.keep) - 1)
        return sum(wi for wi, k in zip(w, self.keep) if not k) / sum(w)

    def summary(self) -> dict:
        return {"schedule": self.schedule, "states": len(self.keep), "kept": self.num_kept,
                "recomputed": self.num_recomputed, "recompute_fraction": self.recompute_fraction(),
                "graph_bytes_per_state": self.graph_bytes,
                "budget_bytes": self.budget_bytes}


def _kept_indices(num_states: int, k: int, schedule: str) -> set[int]:
    if k <= 0:
        return set()
    if k >= num_states:
        return set(range(num_states))
    if schedule == "end":
        return set(range(num_states - k, num_states))
    # uniform: k points evenly over [0, num_states), the last state included
    step = num_states / k
    return {num_states - 1 - int(j * step) for j in range(k)}


def work_bytes(graph_bytes: int, param_bytes: int, state_bytes: int) -> int:
    """What the backward walk needs besides the kept graphs: VJP workspace (half a state's graphs), the running
    and one fresh set of parameter grads, and the adjoint's state-sized buffers."""
    return graph_bytes // 2 + 2 * param_bytes + 8 * state_bytes


def make_plan(num_states: int, schedule: str, budget_bytes: float, graph_bytes: int, work_bytes: int) -> Plan:
    """Keep as many graphs as fit: ``k G + work <= budget``, where ``G`` is one state's graphs and ``work`` what
    the walk needs besides them (VJP workspace, gradient buffers). ``"uniform"`` also holds one recomputed graph
    next to the kept ones; ``"end"`` never does (see the module docstring)."""
    if budget_bytes <= 0:
        k = 0
    elif math.isinf(budget_bytes) or num_states * graph_bytes + work_bytes <= budget_bytes:
        k = num_states
    elif graph_bytes <= 0:
        k = 0
    else:
        extra = graph_bytes if schedule == "uniform" else 0
        k = min(num_states - 1, int(max(0.0, budget_bytes - work_bytes - extra) // graph_bytes))
    kept = _kept_indices(num_states, k, schedule)
    return Plan([i in kept for i in range(num_states)], schedule, graph_bytes, budget_bytes)
