"""Process-group setup and the few collectives the trainer needs (DDP over gloo on CPU, NCCL on GPUs).

Sharding: the global batch is split into ``shards`` equal shards (a multiple of the world size); shard
``k`` always uses noise stream ``k``, so a run with K processes equals one process with the same
``shards`` (up to the rounding of the gradient all-reduce).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .devices import resolve_device

__all__ = ["DistContext", "setup", "local_shards"]


@dataclass
class DistContext:
    """Where this process sits: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    created: bool = False  # whether we created the process group (and so destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def broadcast(self, obj: Any) -> Any:
        """``obj`` of rank 0 on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on rank 0 only; its result -- or its exception, raised on every rank -- on all ranks
        (so a bad ``--out`` stops every process with the same one-line error instead of leaving them waiting)."""
        if not self.distributed:
            return fn()
        box: tuple[str, Any] | None = None
        if self.is_main:
            try:
                box = ("ok", fn())
            except Exception as e:  # noqa: BLE001 -- re-raised on every rank just below
                box = ("error", e)
        kind, value = self.broadcast(box)
        if kind == "error":
            raise value
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.distributed:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather_states(self, states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Merge every rank's ``name -> uint8 state`` dicts (generator states of the local shards)."""
        if not self.distributed:
            return states
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, {k: v.cpu().tolist() for k, v in states.items()})
        merged: dict[str, torch.Tensor] = {}
        for d in out:
            for k, v in d.items():
                merged[k] = torch.tensor(v, dtype=torch.uint8)
        return merged

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (a list in rank order) on rank 0; ``None`` on the other ranks."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.created = False


def setup(device: str = "auto") -> DistContext:
    """Join (or create) the process group from torchrun's environment and pick this process's device.

    Single process (no ``WORLD_SIZE`` > 1): no process group. Under torchrun: one GPU per process
    (``cuda:LOCAL_RANK``) with NCCL, or gloo when training on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank=local_rank, world_size=world)
    if world <= 1:
        return DistContext(device=dev)
    import torch.distributed as dist

    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend)
        created = True
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=dev,
                       backend=dist.get_backend(), created=created)


def local_shards(shards: int, rank: int, world: int) -> list[int]:
    """The shard indices (noise streams) of ``rank``."""
    if shards % world:
        raise ValueError(f"--shards ({shards}) must be a multiple of the number of processes ({world})")
    return list(range(rank * shards // world, (rank + 1) * shards // world))
