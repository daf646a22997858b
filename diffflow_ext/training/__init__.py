"""The training side of diffflow_ext, in layers that import only downward.

* :mod:`.config` -- :class:`TrainConfig` (every option of ``diffflow train``) and its validation;
* :mod:`.data` -- training data in model space (interim; the registry in :mod:`diffflow_ext.data` replaces it);
* :mod:`.ema` -- the EMA of the weights;
* :mod:`.devices`, :mod:`.distributed` -- device selection, process groups, shards;
* :mod:`.run` -- the run folder (what may be written or replaced; logs, TensorBoard);
* :mod:`.loop` -- :func:`train_step` and :func:`train` (the loop with evaluation hooks).

Names are imported lazily so that lower layers (e.g. the evaluation) can import :mod:`.config` or
:mod:`.data` without pulling in the loop.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "config", "parse_progressive": "config",
    "DataSource": "data", "Standardizer": "data",
    "EMA": "ema",
    "resolve_device": "devices",
    "DistContext": "distributed",
    "train": "loop", "train_step": "loop", "TrainState": "loop", "StepStats": "loop", "NonFiniteError": "loop",
    "CHECKPOINT_NAME": "run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
