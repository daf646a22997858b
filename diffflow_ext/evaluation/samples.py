"""Sample-quality metrics between point clouds ``(n, d)`` in data units (POT for optimal transport)."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["as_points", "sliced_wasserstein", "wasserstein2_emd", "fraction_in_support"]


def as_points(x) -> np.ndarray:
    """``(n, ...)`` tensor / array -> float64 numpy ``(n, d)``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    return a.reshape(a.shape[0], -1)


def _finite_points(name: str, x) -> np.ndarray:
    """``as_points`` that refuses non-finite values (a distance of NaN samples is no number)."""
    a = as_points(x)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).any(axis=1).sum())
        raise ValueError(f"{name}: {bad} of {len(a)} points are not finite (NaN or inf)")
    return a


def sliced_wasserstein(a, b, *, n_projections: int = 500, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two point clouds (uniform weights)."""
    import ot

    a, b = _finite_points("sliced_wasserstein", a), _finite_points("sliced_wasserstein", b)
    return float(ot.sliced_wasserstein_distance(a, b, n_projections=n_projections, seed=seed))


def wasserstein2_emd(a, b, *, n: int = 1000, seed: int = 0) -> float:
    """Exact W2 (``sqrt(ot.emd2)`` with squared Euclidean cost) between random subsamples of size ``n``."""
    import ot

    a, b = _finite_points("wasserstein2_emd", a), _finite_points("wasserstein2_emd", b)
    rng = np.random.default_rng(seed)
    a = a[rng.permutation(len(a))[:n]]
    b = b[rng.permutation(len(b))[:n]]
    M = ot.dist(a, b, metric="sqeuclidean")
    w = ot.emd2(np.full(len(a), 1.0 / len(a)), np.full(len(b), 1.0 / len(b)), M, numItermax=1_000_000)
    return float(math.sqrt(max(float(w), 0.0)))


def fraction_in_support(dataset, samples, tol: float | None = None) -> float:
    """Share of ``samples`` inside ``dataset``'s support (a sharp :class:`~diffflow_ext.data.toy2d.Toy2D` or a
    :class:`~diffflow_ext.data.DataSource` with a support)."""
    return float(dataset.contains(as_points(samples), tol).mean())
