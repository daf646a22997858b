"""The training side of diffflow_ext, in layers that import only downward.

* :mod:`.config` -- :class:`TrainConfig` (every option of ``diffflow train``) and its validation;
* :mod:`.ema` -- the EMA of the weights;
* :mod:`.devices`, :mod:`.distributed` -- device selection, process groups, shards;
* :mod:`.run` -- the run folder (what may be written or replaced; logs, TensorBoard);
* :mod:`.loop` -- :func:`train_step` and :func:`train` (the loop with evaluation hooks).

Names are imported lazily so that other layers (e.g. the CLI) can import :mod:`.config` without pulling in
the loop. Data sources live in :mod:`diffflow_ext.data`, networks in :mod:`diffflow_ext.networks`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "config", "parse_progressive": "config",
    "EMA": "ema",
    "resolve_device": "devices",
    "DistContext": "distributed",
    "train": "loop", "train_step": "loop", "TrainState": "loop", "StepStats": "loop", "NonFiniteError": "loop",
    "build_data": "loop", "build_model": "loop",
    "CHECKPOINT_NAME": "run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
