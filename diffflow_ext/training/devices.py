"""Device selection for training: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:K`` (one GPU per process under torchrun)."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(spec: str = "auto", *, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The ``torch.device`` this process trains on.

    ``auto``: CUDA when available, else the CPU. ``cuda`` (or ``auto`` with CUDA) under ``torchrun`` uses
    ``cuda:LOCAL_RANK`` (one GPU per process); an explicit ``cuda:K`` is for a single process. Errors are
    one line naming ``--device`` and what is available.
    """
    s = str(spec).strip().lower()
    if s == "cpu":
        return torch.device("cpu")
    if s == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        s = "cuda"
    if s == "cuda" or s.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: no CUDA GPU is available here (torch.cuda.is_available() is "
                             "False); use --device cpu or --device auto")
        count = torch.cuda.device_count()
        if s == "cuda":
            index = local_rank if world_size > 1 else torch.cuda.current_device()
            if index >= count:
                raise ValueError(f"--device {spec}: process with LOCAL_RANK={local_rank} needs cuda:{index} but "
                                 f"only {count} GPU(s) are visible; start at most {count} processes per node")
            return torch.device("cuda", index)
        try:
            index = int(s.split(":", 1)[1])
        except ValueError:
            index = -1
        if index < 0 or index >= count:
            raise ValueError(f"--device {spec}: expected cuda:K with 0 <= K < {count} (visible GPUs)")
        if world_size > 1:
            raise ValueError(f"--device {spec}: under torchrun every process uses cuda:LOCAL_RANK; "
                             "pass --device cuda (or auto)")
        return torch.device("cuda", index)
    raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:K")
