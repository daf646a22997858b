"""Every metric of a trained model on a data source, and the evaluation of a training checkpoint.

:func:`evaluate_model` is deterministic for a given ``seed`` (all randomness from seeded generators), so
``metrics.json`` written by training equals what ``diffflow eval`` recomputes. Likelihoods are data-space
figures (:mod:`.bits`); sample metrics compare samples mapped back to data space with the held-out split:

* points / tabular: ``nelbo_nats``, ``ode_nll_nats`` (+ ``_se``, ``_bits_per_dim``), sliced and exact W2,
  and for sharp 2-D toys the share of samples inside the exact support;
* images: ``nelbo_bits_per_dim`` / ``ode_bits_per_dim`` (+ ``_se``; with ``levels``, ``bpd_draws``,
  ``bpd_offset``), and FID when Inception weights are given (``fid_weights`` or ``$DIFFFLOW_FID_WEIGHTS``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from .bits import bits_per_dim, bpd_offset
from .fid import FID_ENV, compute_fid
from .samples import sliced_wasserstein, wasserstein2_emd

__all__ = ["batch_seed", "sampling_seed", "sample_model", "evaluate_model", "evaluate_checkpoint"]


def sampling_seed(seed: int) -> int:
    """The seed :func:`evaluate_model` samples with for evaluation seed ``seed`` (likelihoods use ``seed + 1``
    and ``seed + 2``): draw samples elsewhere with ``sample_model(..., seed=sampling_seed(seed))``."""
    return int(seed) + 3


def batch_seed(seed: int, index: int) -> int:
    """The seed of sampling batch ``index`` (independent streams per batch, so batches may be drawn on any
    process in any order and still give the samples of a single-process run)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0] >> 1)


@torch.no_grad()
def sample_model(model, n: int, *, lam: float | None = 1.0, seed: int = 0, batch_size: int = 1000, method: str = "em",
                 sampler_options: dict | None = None, batches=None, **sample_kwargs) -> torch.Tensor:
    """``n`` model-space samples (CPU) in batches of ``batch_size``; batch ``i`` draws from a generator seeded
    with :func:`batch_seed(seed, i) <batch_seed>`. ``batches``: only these batch indices (e.g. this rank's
    share ``range(rank, n_batches, world)``), concatenated in the given order. ``sample_kwargs`` (e.g.
    ``num_steps``, ``denoise``) go to ``model.sample``."""
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    n_batches = -(-int(n) // int(batch_size))
    extra = {"sampler_options": dict(sampler_options)} if sampler_options else {}
    if lam is not None:  # samplers without a lambda (heun, ode) refuse one
        extra["lam"] = lam
    extra.update(sample_kwargs)
    out = []
    for i in (range(n_batches) if batches is None else batches):
        if not 0 <= i < n_batches:
            raise ValueError(f"batches: index {i} out of range for {n} samples in batches of {batch_size}")
        gen = torch.Generator(device=device).manual_seed(batch_seed(seed, i))
        m = min(batch_size, n - i * batch_size)
        out.append(model.sample(m, generator=gen, method=method, **extra).cpu())
    if not out:
        shape = tuple(getattr(model, "data_shape", ()))
        return torch.empty((0, *shape))
    return torch.cat(out)


def _metric(out: dict, name: str, fn) -> None:
    """``out[name] = fn()``; a metric that fails on degenerate samples (e.g. a singular matrix, overflow) is
    reported as ``None`` with the reason in ``out["unavailable"]`` instead of failing the whole evaluation."""
    try:
        v = fn()
        out[name] = v if math.isfinite(v) else None
        if out[name] is None:
            out.setdefault("unavailable", {})[name] = f"non-finite value {v}"
    except (np.linalg.LinAlgError, FloatingPointError, OverflowError, ValueError) as e:
        out[name] = None
        out.setdefault("unavailable", {})[name] = f"{type(e).__name__}: {str(e)[:200]}"


def _put(out: dict, nats: str, bpd: str, r) -> None:
    out[f"{nats}_nats"] = r.nats
    out[f"{nats}_nats_se"] = r.nats_se
    out[f"{bpd}_bits_per_dim"] = r.bits_per_dim
    out[f"{bpd}_bits_per_dim_se"] = r.bits_per_dim_se


def evaluate_model(
    model,
    source,
    *,
    split: str = "test",
    n_heldout: int | None = 5000,
    n_samples: int = 5000,
    n_nll: int | None = 2000,
    n_ode: int | None = 500,
    n_ot: int = 1000,
    lam: float | None = 1.0,
    seed: int = 0,
    ode: bool = True,
    draws: int | None = None,
    batch_size: int = 500,
    fid: bool | None = None,
    fid_weights: str | os.PathLike | None = None,
    fid_extractor=None,
    fid_reference: str | None = None,
    fid_n_reference: int | None = None,
    method: str = "em",
    sampler_options: dict | None = None,
    ode_options: dict | None = None,
    samples: torch.Tensor | None = None,
    return_samples: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], np.ndarray]:
    """Metrics of ``model`` on ``source`` (a :class:`~diffflow_ext.data.DataSource`), see the module docstring.

    ``n_nll`` / ``n_ode`` examples of ``split`` for the ELBO / ODE likelihoods (``None``: the whole split),
    ``n_samples`` samples (sampler ``lam``; ``None`` for samplers without one). ``fid``: ``None`` computes FID
    for images when weights are
    available, ``True`` requires them, ``False`` skips; the reference is the first ``fid_n_reference`` images
    (default all) of split ``fid_reference`` (default: ``split``; e.g. ``"train"`` for CIFAR-10).
    ``method`` / ``sampler_options`` choose the sampler; ``ode_options``: keyword arguments of the ODE likelihood
    (:meth:`DiffFlow.log_prob`: ``rtol``, ``atol``, ``method`` of the trace, ``solver``...), stated in the output;
    ``samples``: model-space samples drawn elsewhere (e.g. gathered from several ranks with
    :func:`sample_model`), used instead of sampling here. Samples are returned in data space (``uint8`` images).
    """
    x_ref = source.heldout(n_heldout, split=split)
    out: dict[str, Any] = {"data_kind": source.kind, "split": split if not source.streaming else "heldout draw",
                           "n_heldout": int(len(x_ref)), "dim": int(source.dim), "seed": int(seed),
                           "lam": None if lam is None else float(lam)}
    if source.levels:
        out.update(levels=int(source.levels), bpd_offset=bpd_offset(source),
                   bpd_draws=int(draws if draws is not None else 3))

    # likelihoods (data space)
    common = dict(split=split, draws=draws, batch_size=batch_size)
    if n_nll is None or n_nll > 0:
        r = bits_per_dim(model, source, n=n_nll, bound="elbo", seed=seed + 1, **common)
        _put(out, "nelbo", "nelbo", r)
        out["nelbo_n"] = r.n
    if ode and (n_ode is None or n_ode > 0):
        r = bits_per_dim(model, source, n=n_ode, bound="ode", seed=seed + 2, **common, **(ode_options or {}))
        _put(out, "ode_nll", "ode", r)
        out["ode_n"] = r.n
        if ode_options:
            out["ode_options"] = dict(ode_options)

    # samples
    if samples is None:
        z = sample_model(model, n_samples, lam=lam, seed=sampling_seed(seed), batch_size=batch_size, method=method,
                         sampler_options=sampler_options)
    else:
        z = torch.as_tensor(samples).cpu()
        n_samples = len(z)
    out["sampler"] = method
    finite = torch.isfinite(z.reshape(len(z), -1)).all(1)
    out["n_samples"] = int(n_samples)
    out["fraction_finite"] = float(finite.double().mean())
    if source.kind == "image":
        samples = source.to_data(torch.where(finite.reshape(-1, *[1] * (z.ndim - 1)), z, torch.zeros_like(z)))
        want_fid = fid is True or (fid is None and (fid_weights is not None or fid_extractor is not None
                                                    or os.environ.get(FID_ENV)))
        if want_fid:
            ref_split = fid_reference or split
            ref = source.heldout(fid_n_reference, split=ref_split)
            out.update(compute_fid(samples, ref, weights=fid_weights, extractor=fid_extractor,
                                   reference_split=ref_split, device=next(iter(model.parameters())).device))
        samples_np = samples.numpy()
    else:
        samples_np = source.to_data(z).numpy().reshape(n_samples, -1)
        s_ok = samples_np[finite.numpy()]
        ref = x_ref.double().numpy().reshape(len(x_ref), -1)
        if len(s_ok) >= 2:
            _metric(out, "sliced_wasserstein", lambda: sliced_wasserstein(s_ok, ref, seed=seed))
            _metric(out, "w2_emd", lambda: wasserstein2_emd(s_ok, ref, n=n_ot, seed=seed))
        if source.support is not None and getattr(source.support, "sharp", False):
            inside = source.contains(np.where(finite.numpy()[:, None], samples_np, 1e9))
            out["fraction_in_support"] = float(inside.mean())
            out["support_tol"] = float(source.support.tol)
            out["fraction_in_support_heldout"] = float(source.contains(ref).mean())
    for k, v in list(out.items()):
        if isinstance(v, float) and math.isnan(v):
            out[k] = None
    return (out, samples_np) if return_samples else out


def evaluate_checkpoint(
    path,
    *,
    data: str | None = None,
    data_dir: str | os.PathLike | None = None,
    split: str = "test",
    seed: int | None = None,
    use_ema: bool = True,
    device=None,
    return_samples: bool = False,
    **options: Any,
):
    """Evaluate a training checkpoint: load it, rebuild its data source (``data_dir`` if the data moved),
    compute :func:`evaluate_model`.

    ``data`` evaluates on other data of the same shape instead (a name or a file; a point file is used
    whole), in the training run's model space. Deterministic for a given ``seed`` (default: the run's
    evaluation seed). ``options``: the keyword arguments of :func:`evaluate_model` (``n_samples``, ``n_nll``,
    ``draws``, ``fid_weights``, ``samples``...).
    """
    from ..checkpoint import CheckpointError, load_checkpoint
    from ..data import data_source_from_state, get_data_source

    ck = load_checkpoint(path)
    extra = ck.extra
    if "train_config" not in extra or "data" not in extra:
        raise CheckpointError(f"{ck.path}: not a training checkpoint (no data/training info)")
    tc = extra["train_config"] if isinstance(extra["train_config"], dict) else {}
    src = data_source_from_state(extra["data"], data_dir=data_dir)
    model = ck.build_model(use_ema=use_ema)
    if device is not None:
        model = model.to(device)
    seed = int(tc.get("eval_seed", 1234)) if seed is None else int(seed)
    target = src
    if data is not None:
        other = get_data_source(data, data_dir=data_dir, seed=int(tc.get("seed", 0)))
        if other.shape != src.shape:
            raise ValueError(f"--data has sample shape {other.shape}, the model was trained on {src.shape}")
        if other.levels != src.levels:
            raise ValueError(f"--data has {other.levels} grey levels, the model was trained on {src.levels}")
        if other.info.get("holdout") is not None:  # a point file: evaluate on all of it
            from ..data.sources import points_source

            parts = [other.split("train")] + ([] if other.info.get("test_is_train") else [other.split("test")])
            other = points_source(torch.cat(parts), other.name, holdout=0.0, kind=other.kind)
        elif not other.streaming and split not in other.splits:
            raise ValueError(f"--data {data}: no {split!r} split (has {', '.join(other.splits)})")
        other.transform = src.transform  # the model's space is the training run's
        target = other
    res = evaluate_model(model, target, split=split, seed=seed, return_samples=return_samples, **options)
    if return_samples:
        res, samples = res
    res.update({"step": ck.step, "weights": "ema" if (use_ema and ck.has_ema) else "raw", "data": data or src.name})
    return (res, samples) if return_samples else res
