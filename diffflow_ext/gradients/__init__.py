"""Gradient modes of the DiffFlow loss.

* ``"autograd"``: the walk unrolled with autograd's graph kept (every step op differentiated by autograd).
* ``"adjoint"``: the stochastic adjoint -- keep the states, recompute the networks at each state in the
  backward walk; graph memory O(1) in N.
* ``"auto"``: keep the networks' graphs for as many states as a memory budget allows and recompute the rest
  (:mod:`.memory`); the step math stays fused (``ops.adjoint_step``) in both.
"""

from .checkpointed import SavedBytes, checkpointed_loss, measure_graph_bytes
from .memory import (
    CHECKPOINT_SCHEDULES,
    Plan,
    available_memory,
    check_memory_budget,
    make_plan,
    resolve_memory_budget,
    work_bytes,
)
from .walk import RngSnapshot, Walk, WalkResult, call_network, forward_walk, frozen_running_stats, running_stat_modules

GRADIENT_MODES = ("auto", "adjoint", "autograd")

__all__ = [
    "measure_graph_bytes",
    "GRADIENT_MODES",
    "CHECKPOINT_SCHEDULES",
    "Plan",
    "SavedBytes",
    "Walk",
    "WalkResult",
    "RngSnapshot",
    "available_memory",
    "call_network",
    "check_memory_budget",
    "checkpointed_loss",
    "forward_walk",
    "frozen_running_stats",
    "make_plan",
    "resolve_memory_budget",
    "running_stat_modules",
    "work_bytes",
]
