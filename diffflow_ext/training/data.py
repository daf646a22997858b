"""Training data in model space: :class:`Standardizer` and :class:`DataSource` (2-D toys and point files).

Interim home: the data-source registry of :mod:`diffflow_ext.data` (engineer I) replaces this module;
the trainer uses only the interface below (``dim``, ``train_batch``, ``heldout``, ``standardizer``,
``state``/``from_state``), so the swap is local.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..data import toy2d
from ..data.files import load_points

__all__ = ["Standardizer", "DataSource"]


class Standardizer:
    """Per-dimension affine map between data units and model units ``z = (x - mean) / std``."""

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        if (self.std <= 0).any() or not np.isfinite(self.std).all():
            raise ValueError("data has a constant (zero-variance) or non-finite dimension; cannot standardise")

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardizer":
        return cls(x.mean(0), x.std(0))

    def to_model(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.std

    def to_data(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) * self.std + self.mean

    @property
    def log_scale(self) -> float:
        """``sum(log std)``: add to model-space NLL (nats) to get data-space NLL."""
        return float(np.log(self.std).sum())

    def state(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}


def _sha256_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float64).tobytes()).hexdigest()


class DataSource:
    """Training stream + held-out set for a toy dataset name or a ``.npy``/``.csv`` file."""

    def __init__(self, name: str, *, seed: int, holdout: float, toy=None, points=None, standardizer=None, sha=None):
        self.name, self.seed, self.holdout_frac = name, int(seed), float(holdout)
        self.toy = toy
        self.train_points: np.ndarray | None = None
        self.heldout_points: np.ndarray | None = None
        self.points: np.ndarray | None = points
        if toy is not None:
            self.dim = 2
            if standardizer is None:
                standardizer = Standardizer.fit(toy.sample_numpy(100_000, np.random.default_rng([self.seed, 1])))
        else:
            assert points is not None
            self.dim = points.shape[1]
            self.sha = _sha256_array(points)
            if sha is not None and sha != self.sha:
                raise ValueError(f"data file {name} changed since training (content hash differs)")
            perm = np.random.default_rng([self.seed, 3]).permutation(len(points))
            n_hold = int(round(self.holdout_frac * len(points))) if self.holdout_frac > 0 else 0
            if self.holdout_frac > 0:
                n_hold = max(1, n_hold)
            if len(points) - n_hold < 2:
                raise ValueError(
                    f"data file {name}: only {len(points)} points, too few to train with holdout={holdout}")
            self.heldout_points = points[perm[:n_hold]]
            self.train_points = points[perm[n_hold:]]
            if standardizer is None:
                standardizer = Standardizer.fit(self.train_points)
        self.standardizer = standardizer

    @classmethod
    def build(cls, spec: str, *, seed: int, holdout: float = 0.1) -> "DataSource":
        spec = str(spec)
        looks_like_file = any(spec.lower().endswith(e) for e in (".npy", ".csv", ".txt", ".tsv")) or os.sep in spec
        if looks_like_file or Path(spec).is_file():
            pts = load_points(spec, dtype=torch.float64).numpy()
            return cls(str(Path(spec).resolve()), seed=seed, holdout=holdout, points=pts)
        return cls(toy2d.get(spec).name, seed=seed, holdout=holdout, toy=toy2d.get(spec))

    def state(self) -> dict:
        s = {"name": self.name, "seed": self.seed, "holdout": self.holdout_frac, "dim": self.dim,
             "kind": "toy" if self.toy is not None else "file", **self.standardizer.state()}
        if self.toy is None:
            s["sha256"] = self.sha
        return s

    @classmethod
    def from_state(cls, s: dict) -> "DataSource":
        std = Standardizer(s["mean"], s["std"])
        if s["kind"] == "toy":
            return cls(s["name"], seed=s["seed"], holdout=s["holdout"], toy=toy2d.get(s["name"]), standardizer=std)
        pts = load_points(s["name"], dtype=torch.float64).numpy()
        return cls(s["name"], seed=s["seed"], holdout=s["holdout"], points=pts, standardizer=std, sha=s.get("sha256"))

    def train_batch(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` training points in data units (consumes ``rng``)."""
        if self.toy is not None:
            return self.toy.sample_numpy(n, rng)
        return self.train_points[rng.integers(0, len(self.train_points), size=n)]

    def heldout(self, n: int) -> np.ndarray:
        """Held-out points in data units (deterministic)."""
        if self.toy is not None:
            return self.toy.sample_numpy(n, np.random.default_rng([self.seed, 2]))
        if self.heldout_points is None or len(self.heldout_points) == 0:
            return self.train_points[:n]
        return self.heldout_points[:n]
