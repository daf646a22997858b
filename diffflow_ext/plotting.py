"""Pictures (matplotlib, Agg backend).

* 2-D / vector data: :func:`samples_vs_data`, :func:`trajectory_figure`, :func:`plot_points`;
* images: :func:`sample_grid` (a grid of samples) and :func:`trajectory_strip` (the forward SDE carrying
  data to noise and the backward SDE carrying noise to data, one row per example).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["samples_vs_data", "trajectory_figure", "plot_points", "sample_grid", "trajectory_strip", "tile_images"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _text(s) -> str:
    """A title matplotlib can draw: file names may hold undecodable bytes (lone surrogates), shown escaped."""
    return str(s).encode("utf-8", "backslashreplace").decode("utf-8")


def _save(plt, fig, path, dpi: int = 110) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def _limits(*arrays: np.ndarray, q: float = 0.5) -> tuple[tuple[float, float], tuple[float, float]]:
    a = np.concatenate([x[np.isfinite(x).all(1)][:, :2] for x in arrays])
    lo, hi = np.percentile(a, q, axis=0), np.percentile(a, 100 - q, axis=0)
    pad = 0.08 * (hi - lo) + 1e-6
    return (lo[0] - pad[0], hi[0] + pad[0]), (lo[1] - pad[1], hi[1] + pad[1])


def _draw(ax, pts: np.ndarray, lims, bins: int = 120) -> None:
    pts = pts[np.isfinite(pts).all(1)]
    if pts.shape[1] == 1:
        ax.hist(pts[:, 0], bins=100, range=lims[0], density=True, color="C0")
        return
    if len(pts) >= 4000:
        ax.hist2d(pts[:, 0], pts[:, 1], bins=bins, range=lims, cmap="magma")
    else:
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.6)
        ax.set_xlim(*lims[0])
        ax.set_ylim(*lims[1])
    ax.set_aspect("equal")


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(len(x), -1)


def plot_points(points, path, title: str = "") -> Path:
    plt = _plt()
    p = _np(points)
    fig, ax = plt.subplots(figsize=(5, 5))
    _draw(ax, p, _limits(p))
    ax.set_title(_text(title))
    return _save(plt, fig, path, dpi=110)


def samples_vs_data(samples, data, path, *, title: str = "", support=None, metrics: dict | None = None) -> Path:
    """Side-by-side 2-D histograms (first two dimensions) of held-out data and model samples."""
    plt = _plt()
    s, d = _np(samples), _np(data)
    lims = _limits(d, q=0.0) if d.shape[1] >= 1 else None
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    _draw(axes[0], d, lims)
    axes[0].set_title("data (held-out)")
    _draw(axes[1], s, lims)
    sub = "DiffFlow samples"
    if metrics and "fraction_in_support" in metrics:
        sub += f" ({100 * metrics['fraction_in_support']:.1f}% in support)"
    axes[1].set_title(sub)
    if d.shape[1] > 2:
        for ax in axes:
            ax.set_xlabel("dim 0")
            ax.set_ylabel("dim 1")
    if title:
        fig.suptitle(_text(title))
    return _save(plt, fig, path, dpi=110)


@torch.no_grad()
def trajectory_figure(model, data_model_space, path, *, seed: int = 0, columns: int = 6, lam: float = 1.0) -> Path:
    """Top row: forward SDE from data (t_0) to noise (t_N); bottom row: backward SDE from noise to data.

    Drawn in model (standardised) units, first two dimensions.
    """
    plt = _plt()
    fwd, bwd, t = _trajectories(model, data_model_space, seed, lam)
    N = fwd.shape[0] - 1
    idx = sorted(set(np.linspace(0, N, columns).round().astype(int).tolist()))
    f_np = [_np(fwd[i]) for i in idx]
    b_np = [_np(bwd[i]) for i in idx]
    lims = _limits(*f_np, *b_np, q=0.5)
    fig, axes = plt.subplots(2, len(idx), figsize=(2.6 * len(idx), 5.6), squeeze=False)
    for c, i in enumerate(idx):
        _draw(axes[0, c], f_np[c], lims, bins=120)
        axes[0, c].set_title(f"forward t={t[i]:.3g}", fontsize=9)
        _draw(axes[1, c], b_np[c], lims, bins=120)
        axes[1, c].set_title(f"backward t={t[i]:.3g}", fontsize=9)
        for r in range(2):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
    fig.suptitle("trajectories: data -> noise (top), noise -> data (bottom)")
    return _save(plt, fig, path, dpi=100)


# ----------------------------------------------------------------------------- images


def _trajectories(model, x_model, seed: int, lam: float):
    """Forward states from ``x_model`` and backward states from noise, ``(N+1, B, ...)`` each, on the CPU."""
    p = next(model.parameters())
    x0 = torch.as_tensor(np.asarray(x_model) if not isinstance(x_model, torch.Tensor) else x_model)
    x0 = x0.to(device=p.device, dtype=p.dtype)
    gen = torch.Generator(device=p.device)
    fwd = model.forward_trajectory(x0, generator=gen.manual_seed(seed + 11)).cpu()
    kw = {} if lam is None else {"lam": lam}
    _, bwd = model.sample(len(x0), generator=gen.manual_seed(seed + 12), return_trajectory=True, **kw)
    return fwd, bwd.cpu(), model.timestamps.detach().cpu().numpy()


def _unit(images, levels: int | None) -> np.ndarray:
    """``(n, C, H, W)`` uint8 (``levels`` grey levels, default 256) or float in ``[0, 1]`` -> float ``[0, 1]``."""
    x = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (n, C, H, W) with C in (1, 3) or (n, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8 or not x.is_floating_point():
        x = x.double() / ((levels or 256) - 1)
    return x.double().clamp(0, 1).numpy()


def tile_images(x: np.ndarray, nrow: int, pad: int = 1, fill: float = 1.0) -> np.ndarray:
    """Tile ``(n, C, H, W)`` images row-major into one ``(rows*(H+pad)+pad, nrow*(W+pad)+pad, C)`` array."""
    n, c, h, w = x.shape
    rows = max(1, -(-n // nrow))
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), fill, dtype=np.float64)
    for k in range(n):
        r, col = divmod(k, nrow)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = (
            x[k].transpose(1, 2, 0))
    return out


def _show(ax, tile: np.ndarray) -> None:
    if tile.shape[2] == 1:
        ax.imshow(tile[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(tile, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def sample_grid(images, path, *, title: str = "", nrow: int | None = None, levels: int | None = None,
                max_images: int = 100) -> Path:
    """A grid of (at most ``max_images``) images: ``uint8`` with ``levels`` grey levels (default 256; the
    8x8 digits have 17) or floats in ``[0, 1]``, shaped ``(n, C, H, W)`` or ``(n, H, W)``."""
    plt = _plt()
    x = _unit(images, levels)[:max_images]
    if len(x) == 0:
        raise ValueError("images: no images to draw")
    nrow = nrow or int(math.ceil(math.sqrt(len(x))))
    tile = tile_images(x, nrow)
    scale = max(4.0, min(12.0, tile.shape[1] / 40))
    fig, ax = plt.subplots(figsize=(scale, scale * tile.shape[0] / tile.shape[1] + (0.4 if title else 0)))
    _show(ax, tile)
    if title:
        ax.set_title(_text(title), fontsize=10)
    return _save(plt, fig, path, dpi=110)


@torch.no_grad()
def trajectory_strip(model, x_model, path, *, seed: int = 0, lam: float = 1.0, to_unit=None, columns: int = 8,
                     title: str = "") -> Path:
    """Forward (data -> noise, from ``x_model``, model space ``(k, C, H, W)``) and backward (noise -> data)
    trajectories of ``k`` images at ``columns`` grid times: one row per example, forward block on top.

    ``to_unit`` maps model-space values to ``[0, 1]`` (a source's ``transform.to_unit``; default: ``[-1, 1]``
    -> ``[0, 1]``); noisy states beyond the range are clipped.
    """
    plt = _plt()
    to_unit = to_unit or (lambda z: ((z + 1) / 2).clamp(0, 1))
    fwd, bwd, t = _trajectories(model, x_model, seed, lam)
    N, k = fwd.shape[0] - 1, fwd.shape[1]
    idx = sorted(set(np.linspace(0, N, columns).round().astype(int).tolist()))

    def block(states, order):
        cells = [to_unit(states[i]).reshape(k, *states.shape[2:]) for i in order]  # each (k, C, H, W)
        x = torch.stack(cells, 1).reshape(k * len(order), *states.shape[2:])  # row = example, column = time
        return _unit(x.float(), None)

    top = tile_images(block(fwd, idx), len(idx))
    bottom = tile_images(block(bwd, idx[::-1]), len(idx))
    fig, axes = plt.subplots(2, 1, figsize=(1.1 * len(idx) + 1, 1.1 * 2 * k + 1.2))
    _show(axes[0], top)
    axes[0].set_title("forward: data -> noise, t = " + ", ".join(f"{t[i]:.3g}" for i in idx), fontsize=9)
    _show(axes[1], bottom)
    axes[1].set_title("backward: noise -> data, t = " + ", ".join(f"{t[i]:.3g}" for i in idx[::-1]), fontsize=9)
    if title:
        fig.suptitle(_text(title))
    return _save(plt, fig, path, dpi=110)
