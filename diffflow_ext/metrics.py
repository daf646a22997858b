"""Compatibility shim: the evaluation moved to :mod:`diffflow_ext.evaluation`.

``evaluate_model(model, standardizer, heldout, dataset=...)`` (the pre-registry call of the trainer) is
still accepted: it is adapted to a :class:`~diffflow_ext.data.DataSource` over ``heldout``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .evaluation import evaluate_checkpoint, fraction_in_support, sliced_wasserstein, wasserstein2_emd
from .evaluation import evaluate_model as _evaluate_model

__all__ = ["sliced_wasserstein", "wasserstein2_emd", "fraction_in_support", "evaluate_model", "evaluate_checkpoint"]


def evaluate_model(model, source, heldout: Any = None, *, dataset=None, **kwargs):
    """:func:`diffflow_ext.evaluation.evaluate_model`; also takes the legacy ``(model, standardizer, heldout,
    dataset=toy)`` form."""
    from .data import DataSource, Standardize

    if isinstance(source, DataSource):
        return _evaluate_model(model, source, **kwargs)
    pts = torch.as_tensor(np.asarray(heldout, dtype=np.float64))
    src = DataSource("heldout", kind="points", shape=(pts.shape[1],), transform=Standardize(source.mean, source.std),
                     splits={"train": pts, "test": pts}, support=dataset)
    kwargs.setdefault("n_heldout", None)
    return _evaluate_model(model, src, **kwargs)
