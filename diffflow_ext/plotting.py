"""Pictures: samples beside data, and forward / backward trajectories (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["samples_vs_data", "trajectory_figure", "plot_points"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


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
    ax.set_title(title)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


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
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


@torch.no_grad()
def trajectory_figure(model, data_model_space, path, *, seed: int = 0, columns: int = 6, lam: float = 1.0) -> Path:
    """Top row: forward SDE from data (t_0) to noise (t_N); bottom row: backward SDE from noise to data.

    Drawn in model (standardised) units, first two dimensions.
    """
    plt = _plt()
    dtype = next(model.parameters()).dtype
    x0 = torch.as_tensor(np.asarray(data_model_space), dtype=dtype)
    fwd = model.forward_trajectory(x0, generator=torch.Generator().manual_seed(seed + 11))
    _, bwd = model.sample(len(x0), lam=lam, generator=torch.Generator().manual_seed(seed + 12), return_trajectory=True)
    N = fwd.shape[0] - 1
    idx = sorted(set(np.linspace(0, N, columns).round().astype(int).tolist()))
    t = model.timestamps.numpy()
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
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
