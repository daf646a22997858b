"""Procedural 2-D toy datasets (no image files), scaled to about ``[-1, 1]``.

Every dataset is an instance of :class:`Toy2D` in :data:`DATASETS`::

    from diffflow_ext.data import toy2d
    ds = toy2d.get("checkerboard")           # or toy2d.DATASETS["checkerboard"]
    x = ds.sample(5000, generator=0)         # torch.float32 (5000, 2); also toy2d.checkerboard(5000, 0)
    ds.contains(x)                            # numpy bool (5000,), all True for generated points
    ds.distance(x)                            # numpy float64 distance to the support (0 inside)

``generator`` may be ``None`` (fresh entropy), an ``int`` seed, a :class:`numpy.random.Generator`
(advanced in place) or a :class:`torch.Generator` (one 62-bit seed is drawn from it, so it advances
by one draw). The same seed always gives the same points.

Sharp sets (``ds.sharp is True``: checkerboard, olympic_rings, four_rings, 2spirals, sierpinski_carpet,
fractal_tree) have a support with an exact geometric description, the one the generator samples from,
and expose :meth:`Toy2D.distance` (Euclidean distance to the support; exact for every set) and
:meth:`Toy2D.contains` ``= distance <= tol + 1e-6``. The ``1e-6`` slack only absorbs float32
round-off of generated points. The default ``tol`` (``ds.tol``) is 0 for the area sets (checkerboard,
carpet) and 0.01 -- about a third of the band width -- for the thin sets (rings, spirals, tree).
Smooth sets (8gaussians, moons, swissroll) have no support; their ``contains`` raises. Their
``log_density(x)`` is exact (8gaussians) or exact up to a converged quadrature over the curve (moons, swissroll),
so their entropy can be estimated as ``-mean log_density`` of a sample.

Geometry (all in data units):

* ``checkerboard``: 4x4 board on ``[-1,1]^2`` with cells of side 0.5; the 8 cells with even
  ``row + col`` are filled uniformly.
* ``olympic_rings``: five annuli of radius ~0.308 and half-width 0.025 in the Olympic layout,
  ``x`` in about ``[-1, 1]``; uniform on the union.
* ``four_rings``: four concentric annuli of radii 0.25, 0.5, 0.75, 1.0 and half-width 0.03; uniform
  on the union (ring mass proportional to its area).
* ``2spirals``: two opposite Archimedean spirals ``r = theta / (3 pi)``, ``theta in [0, 3 pi]``, as
  polylines (2 x 600 segments) thickened by 0.04; points = polyline point (arc-length uniform) +
  offset uniform in a disc of radius 0.04, so every point is within 0.04 of the polyline.
* ``8gaussians``: eight isotropic Gaussians (std 0.1) at radius 0.8.
* ``moons``: the two interleaving half circles with Gaussian noise 0.04.
* ``swissroll``: 2-D swiss roll ``t (cos t, sin t)``, ``t in [1.5 pi, 4.5 pi]``, noise 0.035.
* ``sierpinski_carpet``: level-4 Sierpinski carpet on ``[-1,1]^2`` (smallest hole 2/81), uniform.
* ``fractal_tree``: binary tree of depth 8 (255 branches, angle +-28 deg, length ratio 0.72),
  each branch a capsule whose half-width shrinks from 0.03 by 0.8 per level; fitted into
  ``[-1,1]^2``; points uniform along each branch and in its cross-section disc.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = [
    "Toy2D",
    "DATASETS",
    "names",
    "get",
    "sample",
    "as_numpy_rng",
    "UnknownDatasetError",
]

_SLACK = 1e-6  # float32 round-off of generated points


class UnknownDatasetError(KeyError, ValueError):
    """Raised for a dataset name that is not in :data:`DATASETS`."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def as_numpy_rng(generator: Any = None) -> np.random.Generator:
    """A :class:`numpy.random.Generator` from ``None`` / int seed / numpy Generator / torch.Generator."""
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        return np.random.default_rng(seed)
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return np.random.default_rng(int(generator))
    if isinstance(generator, np.random.SeedSequence):
        return np.random.default_rng(generator)
    raise TypeError(
        f"generator must be None, an int seed, a numpy.random.Generator or a torch.Generator, "
        f"got {type(generator).__name__}"
    )


def _as_points(points: Any) -> np.ndarray:
    if isinstance(points, torch.Tensor):
        points = points.detach().to("cpu", torch.float64).numpy()
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"points must have shape (n, 2), got {tuple(p.shape)}")
    return p


class Toy2D:
    """A seeded 2-D point generator; subclasses implement :meth:`_sample`."""

    name: str = ""
    sharp: bool = False
    tol: float = 0.0
    description: str = ""
    #: exact differential entropy in nats where it has a closed form (uniform on a set of known area), else None
    entropy: float | None = None

    def _sample(self, n: int, rng: np.random.Generator) -> np.ndarray:  # (n, 2) float64
        raise NotImplementedError

    def sample_numpy(self, n: int, generator: Any = None) -> np.ndarray:
        """``n`` points as a float64 numpy array ``(n, 2)``."""
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = as_numpy_rng(generator)
        if n == 0:
            return np.zeros((0, 2))
        out = self._sample(n, rng)
        assert out.shape == (n, 2), (self.name, out.shape)
        return out

    def sample(self, n: int, generator: Any = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``n`` points as a torch tensor ``(n, 2)`` (float32 by default)."""
        return torch.from_numpy(self.sample_numpy(n, generator)).to(dtype)

    __call__ = sample

    def distance(self, points: Any) -> np.ndarray:
        """Euclidean distance of each point to the support (0 inside); sharp sets only."""
        raise NotImplementedError(
            f"dataset {self.name!r} is smooth (no sharp support); distance/contains are defined for: "
            + ", ".join(n for n, d in DATASETS.items() if d.sharp)
        )

    def contains(self, points: Any, tol: float | None = None) -> np.ndarray:
        """Boolean ``(n,)``: point within ``tol`` (default :attr:`tol`) of the support (+1e-6 slack)."""
        d = self.distance(points)
        t = self.tol if tol is None else float(tol)
        return d <= t + _SLACK

    def fraction_in_support(self, points: Any, tol: float | None = None) -> float:
        c = self.contains(points, tol)
        return float(c.mean()) if c.size else float("nan")

    def __repr__(self) -> str:
        return f"<Toy2D {self.name!r} sharp={self.sharp}>"


# ----------------------------------------------------------------------------- helpers


def _box_distance(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Distance of points ``(n,2)`` to axis-aligned boxes ``(m,2)``: ``(n, m)``."""
    d = np.maximum(np.maximum(lo[None] - p[:, None], p[:, None] - hi[None]), 0.0)
    return np.sqrt((d**2).sum(-1))


def _seg_dist(qx, qy, ax, ay, abx, aby, L2, r):
    """Broadcast distance of points to capsules (clamped at 0)."""
    apx, apy = qx - ax, qy - ay
    t = np.clip((apx * abx + apy * aby) / L2, 0.0, 1.0)
    dx, dy = apx - t * abx, apy - t * aby
    return np.maximum(np.sqrt(dx * dx + dy * dy) - r, 0.0)


class _Capsules:
    """Union of capsules (thick segments) with an exact, pruned distance query.

    Segments are grouped in runs of ``group`` consecutive segments with a bounding circle; each
    point is tested exactly against its ``k`` nearest groups (by lower bound), and points whose
    next group's lower bound is not larger than the distance found fall back to brute force,
    so the answer is always the exact minimum over all segments.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, radius: np.ndarray, group: int = 16, k: int = 4):
        m = len(a)
        G = -(-m // group)
        pad = G * group - m
        # pad by repeating the last segment (does not change the minimum)
        idx = np.concatenate([np.arange(m), np.full(pad, m - 1)]).astype(np.int64)
        self.ax, self.ay = a[idx, 0], a[idx, 1]
        self.abx, self.aby = b[idx, 0] - a[idx, 0], b[idx, 1] - a[idx, 1]
        self.L2 = np.maximum(self.abx**2 + self.aby**2, 1e-300)
        self.r = radius[idx]
        self.group, self.G, self.k = group, G, min(k, G)
        ends = np.concatenate([a[idx].reshape(G, group, 2), b[idx].reshape(G, group, 2)], 1)
        self.center = ends.mean(1)
        self.R = np.sqrt(((ends - self.center[:, None]) ** 2).sum(-1)).max(1) + self.r.reshape(G, group).max(1)

    def _brute(self, p: np.ndarray, chunk: int = 512) -> np.ndarray:
        out = np.empty(len(p))
        for s in range(0, len(p), chunk):
            q = p[s : s + chunk]
            out[s : s + chunk] = _seg_dist(
                q[:, :1], q[:, 1:], self.ax, self.ay, self.abx, self.aby, self.L2, self.r
            ).min(1)
        return out

    def distance(self, p: np.ndarray, chunk: int = 4096) -> np.ndarray:
        out = np.empty(len(p))
        offs = np.arange(self.group)
        for s in range(0, len(p), chunk):
            q = p[s : s + chunk]
            lb = np.maximum(np.sqrt(((q[:, None] - self.center[None]) ** 2).sum(-1)) - self.R, 0.0)
            if self.k < self.G:
                part = np.argpartition(lb, self.k, axis=1)
                near, nxt = part[:, : self.k], np.take_along_axis(lb, part[:, self.k : self.k + 1], 1)[:, 0]
            else:
                near, nxt = np.broadcast_to(np.arange(self.G), (len(q), self.G)), np.full(len(q), np.inf)
            seg = (near[:, :, None] * self.group + offs).reshape(len(q), -1)
            d = _seg_dist(
                q[:, :1], q[:, 1:], self.ax[seg], self.ay[seg], self.abx[seg], self.aby[seg], self.L2[seg], self.r[seg]
            ).min(1)
            bad = d > nxt
            if bad.any():
                d[bad] = self._brute(q[bad])
            out[s : s + chunk] = d
        return out


def _sample_capsules(n, rng, a, b, radius, weights) -> np.ndarray:
    """Uniform along a segment (picked with prob. ``weights``) plus offset uniform in its disc."""
    w = weights / weights.sum()
    k = rng.choice(len(w), size=n, p=w)
    t = rng.random(n)
    base = a[k] + t[:, None] * (b[k] - a[k])
    r = radius[k] * np.sqrt(rng.random(n))
    phi = rng.random(n) * 2 * math.pi
    return base + np.stack([r * np.cos(phi), r * np.sin(phi)], 1)


class _Annuli(Toy2D):
    sharp = True
    tol = 0.01

    def __init__(self, centers, radii, half_width):
        self.centers = np.asarray(centers, dtype=np.float64)
        self.radii = np.asarray(radii, dtype=np.float64)
        self.half_width = float(half_width)

    def _sample(self, n, rng):
        r_in, r_out = self.radii - self.half_width, self.radii + self.half_width
        area = r_out**2 - r_in**2
        k = rng.choice(len(area), size=n, p=area / area.sum())
        r = np.sqrt(r_in[k] ** 2 + rng.random(n) * area[k])
        phi = rng.random(n) * 2 * math.pi
        return self.centers[k] + np.stack([r * np.cos(phi), r * np.sin(phi)], 1)

    def distance(self, points):
        p = _as_points(points)
        rho = np.sqrt(((p[:, None, :] - self.centers[None]) ** 2).sum(-1))  # (n, m)
        return np.maximum(np.abs(rho - self.radii[None]) - self.half_width, 0.0).min(1)


# ----------------------------------------------------------------------------- datasets


class Checkerboard(Toy2D):
    name = "checkerboard"
    sharp = True
    tol = 0.0
    description = "4x4 checkerboard on [-1,1]^2, 8 filled cells of side 0.5"
    entropy = math.log(2.0)  # uniform on 8 cells of area 1/4

    def __init__(self):
        cells = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
        self.lo = np.array([[-1 + 0.5 * j, -1 + 0.5 * i] for i, j in cells], dtype=np.float64)  # (x, y)
        self.hi = self.lo + 0.5

    def _sample(self, n, rng):
        k = rng.integers(0, len(self.lo), size=n)
        return self.lo[k] + 0.5 * rng.random((n, 2))

    def distance(self, points):
        return _box_distance(_as_points(points), self.lo, self.hi).min(1)


class OlympicRings(_Annuli):
    name = "olympic_rings"
    description = "five thin annuli in the Olympic layout"

    def __init__(self):
        s = 1.0 / 3.25
        centers = np.array([[-2.2, 0.5], [0.0, 0.5], [2.2, 0.5], [-1.1, -0.5], [1.1, -0.5]]) * s
        super().__init__(centers, np.full(5, s), 0.025)


class FourRings(_Annuli):
    name = "four_rings"
    description = "four thin concentric annuli, radii 0.25..1"

    def __init__(self):
        super().__init__(np.zeros((4, 2)), [0.25, 0.5, 0.75, 1.0], 0.03)
        # disjoint annuli, uniform on their union: area sum 4 pi r w
        self.entropy = math.log(float((4 * math.pi * self.radii * self.half_width).sum()))


class TwoSpirals(Toy2D):
    name = "2spirals"
    sharp = True
    tol = 0.01
    description = "two opposite Archimedean spiral arms thickened by 0.04"
    half_width = 0.04

    def __init__(self, segments: int = 600):
        th = np.linspace(0.0, 3 * math.pi, segments + 1)
        r = th / (3 * math.pi)
        arm = np.stack([-np.cos(th) * r, np.sin(th) * r], 1)
        a = np.concatenate([arm[:-1], -arm[:-1]])
        b = np.concatenate([arm[1:], -arm[1:]])
        self.a, self.b = a, b
        self.radius = np.full(len(a), self.half_width)
        self.length = np.sqrt(((b - a) ** 2).sum(-1))
        self._caps = _Capsules(a, b, self.radius)

    def _sample(self, n, rng):
        return _sample_capsules(n, rng, self.a, self.b, self.radius, self.length)

    def distance(self, points):
        return self._caps.distance(_as_points(points))


def _log_gauss_curve(p: np.ndarray, curve: np.ndarray, std: float, chunk: int = 2048) -> np.ndarray:
    """``log mean_k N(p; curve_k, std^2 I)`` for points ``(n, 2)`` and curve points ``(m, 2)`` (logsumexp)."""
    out = np.empty(len(p))
    for i in range(0, len(p), chunk):
        d2 = ((p[i:i + chunk, None, :] - curve[None]) ** 2).sum(-1) / (-2 * std * std)
        top = d2.max(1)
        out[i:i + chunk] = top + np.log(np.exp(d2 - top[:, None]).mean(1))
    return out - math.log(2 * math.pi * std * std)


class EightGaussians(Toy2D):
    name = "8gaussians"
    description = "8 Gaussians (std 0.1) on a circle of radius 0.8"

    def _sample(self, n, rng):
        ang = rng.integers(0, 8, size=n) * (math.pi / 4)
        c = 0.8 * np.stack([np.cos(ang), np.sin(ang)], 1)
        return c + 0.1 * rng.standard_normal((n, 2))

    def log_density(self, points) -> np.ndarray:
        """Exact ``log p(x)`` of the mixture (nats)."""
        ang = np.arange(8) * (math.pi / 4)
        return _log_gauss_curve(_as_points(points), 0.8 * np.stack([np.cos(ang), np.sin(ang)], 1), 0.1)


class Moons(Toy2D):
    name = "moons"
    description = "two interleaving half circles with noise"

    def _sample(self, n, rng):
        which = rng.integers(0, 2, size=n)
        t = rng.random(n) * math.pi
        x = np.where(which == 0, np.cos(t), 1 - np.cos(t))
        y = np.where(which == 0, np.sin(t), 0.5 - np.sin(t))
        p = np.stack([x, y], 1) + 0.06 * rng.standard_normal((n, 2))
        return (p - np.array([0.5, 0.25])) / 1.5

    def log_density(self, points, nodes: int = 4000) -> np.ndarray:
        """``log p(x)`` (nats): the uniform mixture over the two half circles of N(c(t), 0.06^2 I), integrated over
        ``t`` by the midpoint rule with ``nodes`` nodes per half circle (relative error far below 1e-4)."""
        t = (np.arange(nodes) + 0.5) * (math.pi / nodes)
        curve = np.concatenate([np.stack([np.cos(t), np.sin(t)], 1), np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)])
        p = _as_points(points) * 1.5 + np.array([0.5, 0.25])
        return _log_gauss_curve(p, curve, 0.06) + 2 * math.log(1.5)


class SwissRoll(Toy2D):
    name = "swissroll"
    description = "2-D swiss roll with noise"

    def _sample(self, n, rng):
        t = 1.5 * math.pi * (1 + 2 * rng.random(n))
        p = np.stack([t * np.cos(t), t * np.sin(t)], 1) + 0.5 * rng.standard_normal((n, 2))
        return p / 14.2

    def log_density(self, points, nodes: int = 8000) -> np.ndarray:
        """``log p(x)`` (nats): N(c(t), 0.5^2 I) averaged over ``t`` uniform in ``[1.5 pi, 4.5 pi]`` by the
        midpoint rule with ``nodes`` nodes (spacing ~0.02 along the curve against a noise std of 0.5)."""
        t = 1.5 * math.pi * (1 + 2 * (np.arange(nodes) + 0.5) / nodes)
        curve = np.stack([t * np.cos(t), t * np.sin(t)], 1)
        return _log_gauss_curve(_as_points(points) * 14.2, curve, 0.5) + 2 * math.log(14.2)


class SierpinskiCarpet(Toy2D):
    name = "sierpinski_carpet"
    sharp = True
    tol = 0.0
    description = "level-4 Sierpinski carpet on [-1,1]^2"
    level = 4
    entropy = math.log(4 * (8 / 9) ** 4)  # uniform on the carpet

    _digits = np.array([(i, j) for i in range(3) for j in range(3) if (i, j) != (1, 1)])

    def _sample(self, n, rng):
        u = np.zeros((n, 2))
        cell = 1.0
        for _ in range(self.level):
            cell /= 3
            u += self._digits[rng.integers(0, 8, size=n)] * cell
        u += rng.random((n, 2)) * cell
        return 2 * u - 1

    def distance(self, points):
        p = _as_points(points)
        # outside the square: distance to the square (its boundary belongs to the carpet)
        lo, hi = np.array([[-1.0, -1.0]]), np.array([[1.0, 1.0]])
        dist = _box_distance(p, lo, hi)[:, 0]
        inside = dist == 0
        u = (p[inside] + 1) / 2  # [0,1]^2
        d_in = np.zeros(u.shape[0])
        done = np.zeros(u.shape[0], dtype=bool)
        size = 1.0
        origin = np.zeros_like(u)
        for _ in range(self.level):
            size /= 3
            digit = np.clip(np.floor((u - origin) / size), 0, 2)
            hole = (digit == 1).all(1) & ~done
            # open hole (origin + size*(1,1), +size): distance to its boundary
            hlo = origin + size
            hhi = hlo + size
            gap = np.minimum(np.minimum(u - hlo, hhi - u).min(1), size)
            d_in = np.where(hole, np.maximum(gap, 0.0), d_in)
            done |= hole
            origin = origin + digit * size
        dist[inside] = 2 * d_in  # back to [-1,1] units
        return dist


class FractalTree(Toy2D):
    name = "fractal_tree"
    sharp = True
    tol = 0.01
    description = "binary fractal tree (depth 8) of thin capsules"

    def __init__(self, depth: int = 8, angle_deg: float = 28.0, ratio: float = 0.72, width: float = 0.03):
        segs, rads = [], []

        def grow(x, y, ang, length, level):
            x2, y2 = x + length * math.cos(ang), y + length * math.sin(ang)
            segs.append((x, y, x2, y2))
            rads.append(level)
            if level + 1 < depth:
                d = math.radians(angle_deg)
                grow(x2, y2, ang + d, length * ratio, level + 1)
                grow(x2, y2, ang - d, length * ratio, level + 1)

        grow(0.0, 0.0, math.pi / 2, 1.0, 0)
        s = np.array(segs)
        a, b = s[:, :2], s[:, 2:]
        pts = np.concatenate([a, b])
        lo, hi = pts.min(0), pts.max(0)
        center = (lo + hi) / 2
        scale = (2 - 2 * width) / (hi - lo).max()
        self.a = (a - center) * scale
        self.b = (b - center) * scale
        self.radius = width * 0.8 ** np.array(rads, dtype=np.float64)
        self.length = np.sqrt(((self.b - self.a) ** 2).sum(-1))
        self._caps = _Capsules(self.a, self.b, self.radius, group=8)

    def _sample(self, n, rng):
        return _sample_capsules(n, rng, self.a, self.b, self.radius, self.length * self.radius)

    def distance(self, points):
        return self._caps.distance(_as_points(points))


DATASETS: dict[str, Toy2D] = {
    d.name: d
    for d in [
        Checkerboard(),
        OlympicRings(),
        FourRings(),
        TwoSpirals(),
        EightGaussians(),
        Moons(),
        SwissRoll(),
        SierpinskiCarpet(),
        FractalTree(),
    ]
}

_ALIASES = {
    "rings": "four_rings",
    "olympic": "olympic_rings",
    "spirals": "2spirals",
    "two_spirals": "2spirals",
    "carpet": "sierpinski_carpet",
    "sierpinski": "sierpinski_carpet",
    "tree": "fractal_tree",
    "8_gaussians": "8gaussians",
    "swiss_roll": "swissroll",
}


def names() -> list[str]:
    return list(DATASETS)


def get(name: str) -> Toy2D:
    """The dataset called ``name`` (case-insensitive, '-' == '_'); clear error listing valid names."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key.startswith("sharp_") and key[6:].isdigit():  # the generated family, see diffflow_ext.data.sharp2d
        from .sharp2d import generate

        return generate(int(key[6:]))
    if key not in DATASETS:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}, sharp_SEED (a generated set) "
            f"(or a path to a .npy / .csv file of points)"
        )
    return DATASETS[key]


def sample(name: str, n: int, generator: Any = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return get(name).sample(n, generator, dtype=dtype)


def _make_fn(ds: Toy2D) -> Callable[..., torch.Tensor]:
    def fn(n: int, generator: Any = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ds.sample(n, generator, dtype=dtype)

    fn.__name__ = ds.name
    fn.__doc__ = f"{ds.description}: ``(n, 2)`` tensor; see :class:`Toy2D`."
    return fn


checkerboard = _make_fn(DATASETS["checkerboard"])
olympic_rings = _make_fn(DATASETS["olympic_rings"])
four_rings = _make_fn(DATASETS["four_rings"])
two_spirals = _make_fn(DATASETS["2spirals"])
eight_gaussians = _make_fn(DATASETS["8gaussians"])
moons = _make_fn(DATASETS["moons"])
swissroll = _make_fn(DATASETS["swissroll"])
sierpinski_carpet = _make_fn(DATASETS["sierpinski_carpet"])
fractal_tree = _make_fn(DATASETS["fractal_tree"])
__all__ += [
    "checkerboard",
    "olympic_rings",
    "four_rings",
    "two_spirals",
    "eight_gaussians",
    "moons",
    "swissroll",
    "sierpinski_carpet",
    "fractal_tree",
]
