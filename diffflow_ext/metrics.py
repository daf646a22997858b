"""Sample-quality and likelihood metrics, and the evaluation of a checkpoint.

Primitives (numpy / torch arrays of points ``(n, d)`` in data units):

* :func:`sliced_wasserstein` -- sliced 2-Wasserstein distance (POT ``ot.sliced_wasserstein_distance``);
* :func:`wasserstein2_emd` -- exact 2-Wasserstein distance between two subsamples (POT ``ot.emd2``);
* :func:`fraction_in_support` -- share of samples inside a sharp 2-D dataset's support.

:func:`evaluate_checkpoint` computes every metric of a trained model deterministically from a checkpoint
and a seed, so ``metrics.json`` written by training equals what ``diffflow eval`` recomputes.
Likelihoods are reported in data units: the trainer standardises data ``z = (x - mean) / std``, so
``log p(x) = log p(z) - sum(log std)``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

__all__ = [
    "sliced_wasserstein",
    "wasserstein2_emd",
    "fraction_in_support",
    "evaluate_model",
    "evaluate_checkpoint",
]


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    return a.reshape(a.shape[0], -1)


def sliced_wasserstein(a, b, *, n_projections: int = 500, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two point clouds (uniform weights)."""
    import ot

    return float(ot.sliced_wasserstein_distance(_np(a), _np(b), n_projections=n_projections, seed=seed))


def wasserstein2_emd(a, b, *, n: int = 1000, seed: int = 0) -> float:
    """Exact W2 (``sqrt(ot.emd2)`` with squared Euclidean cost) between random subsamples of size ``n``."""
    import ot

    a, b = _np(a), _np(b)
    rng = np.random.default_rng(seed)
    a = a[rng.permutation(len(a))[:n]]
    b = b[rng.permutation(len(b))[:n]]
    M = ot.dist(a, b, metric="sqeuclidean")
    w = ot.emd2(np.full(len(a), 1.0 / len(a)), np.full(len(b), 1.0 / len(b)), M, numItermax=1_000_000)
    return float(math.sqrt(max(float(w), 0.0)))


def fraction_in_support(dataset, samples, tol: float | None = None) -> float:
    """Share of ``samples`` inside ``dataset``'s support (a sharp :class:`~diffflow_ext.data.toy2d.Toy2D`)."""
    return float(dataset.contains(_np(samples), tol).mean())


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    v = v.double()
    return float(v.mean()), float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else 0.0


@torch.no_grad()
def evaluate_model(
    model,
    standardizer,
    heldout: np.ndarray,
    *,
    dataset=None,
    n_samples: int = 5000,
    n_nll: int = 2000,
    n_ode: int = 500,
    n_ot: int = 1000,
    lam: float = 1.0,
    seed: int = 0,
    ode: bool = True,
    return_samples: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], np.ndarray]:
    """Metrics of ``model`` against held-out points ``heldout`` (data units, ``(n, d)``).

    ``standardizer`` maps data to model space (``.to_model`` / ``.to_data`` / ``.log_scale``).
    All randomness comes from generators seeded with ``seed``.
    """

    dtype = next(model.parameters()).dtype
    heldout = np.asarray(heldout, dtype=np.float64)
    d = heldout.shape[1]
    out: dict[str, Any] = {"n_heldout": int(len(heldout)), "dim": int(d), "seed": int(seed), "lam": float(lam)}

    # likelihood bounds on held-out points
    z = torch.from_numpy(standardizer.to_model(heldout[:n_nll])).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    nb = model.nll_bound(z, generator=gen)
    nats = nb.nats.double() + standardizer.log_scale
    m, se = _mean_se(nats)
    out["nelbo_nats"] = m
    out["nelbo_nats_se"] = se
    out["nelbo_bits_per_dim"] = m / (d * math.log(2))
    if ode and n_ode > 0:
        zo = torch.from_numpy(standardizer.to_model(heldout[:n_ode])).to(dtype)
        with torch.enable_grad():
            lp = model.log_prob(zo, generator=torch.Generator().manual_seed(seed + 2))
        nll = -(lp.detach().double() - standardizer.log_scale)
        m, se = _mean_se(nll)
        out["ode_nll_nats"] = m
        out["ode_nll_nats_se"] = se
        out["ode_bits_per_dim"] = m / (d * math.log(2))

    # samples
    gen = torch.Generator().manual_seed(seed + 3)
    zs = model.sample(n_samples, lam=lam, generator=gen)
    samples = standardizer.to_data(zs.double().numpy().reshape(n_samples, -1))
    finite = np.isfinite(samples).all(1)
    out["n_samples"] = int(n_samples)
    out["fraction_finite"] = float(finite.mean())
    s_ok = samples[finite]
    if len(s_ok) >= 2:
        out["sliced_wasserstein"] = sliced_wasserstein(s_ok, heldout, seed=seed)
        out["w2_emd"] = wasserstein2_emd(s_ok, heldout, n=n_ot, seed=seed)
    if dataset is not None and getattr(dataset, "sharp", False) and d == 2:
        inside = dataset.contains(np.where(finite[:, None], samples, 1e9))
        out["fraction_in_support"] = float(inside.mean())
        out["support_tol"] = float(dataset.tol)
        out["fraction_in_support_heldout"] = float(dataset.contains(heldout).mean())
    return (out, samples) if return_samples else out


def evaluate_checkpoint(
    path,
    *,
    data: str | None = None,
    n_samples: int = 5000,
    n_heldout: int = 5000,
    n_nll: int = 2000,
    n_ode: int = 500,
    lam: float = 1.0,
    seed: int | None = None,
    use_ema: bool = True,
    ode: bool = True,
    return_samples: bool = False,
):
    """Evaluate a training checkpoint (see :mod:`diffflow_ext.train`): load, rebuild data, compute metrics.

    ``data`` overrides the held-out data (dataset name or file; a file is used whole); by default the
    held-out data of the training run is rebuilt. Deterministic for a given ``seed`` (default: the
    run's evaluation seed).
    """
    from .checkpoint import load_checkpoint
    from .training.config import TrainConfig
    from .training.data import DataSource

    ck = load_checkpoint(path)
    extra = ck.extra
    if "train_config" not in extra or "data" not in extra:
        from .checkpoint import CheckpointError

        raise CheckpointError(f"{ck.path}: not a training checkpoint (no data/training info)")
    cfg = TrainConfig.from_dict(extra["train_config"])
    src = DataSource.from_state(extra["data"])
    model = ck.build_model(use_ema=use_ema)
    seed = cfg.eval_seed if seed is None else int(seed)
    if data is None:
        heldout, dataset = src.heldout(n_heldout), src.toy
    else:
        other = DataSource.build(data, seed=cfg.seed, holdout=0.0)
        if other.dim != src.dim:
            raise ValueError(f"--data has dimension {other.dim}, the model was trained on dimension {src.dim}")
        heldout = other.heldout(n_heldout) if other.toy is not None else other.points
        dataset = other.toy
    res = evaluate_model(
        model, src.standardizer, heldout, dataset=dataset, n_samples=n_samples, n_nll=n_nll, n_ode=n_ode,
        lam=lam, seed=seed, ode=ode, return_samples=return_samples,
    )
    if return_samples:
        res, samples = res
    res.update({"step": ck.step, "weights": "ema" if (use_ema and ck.has_ema) else "raw", "data": data or src.name})
    return (res, samples) if return_samples else res
