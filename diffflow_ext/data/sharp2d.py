"""A seeded family of random sharp-boundary 2-D point sets with exact membership and exact entropy.

Every set is a mixture of *disjoint* pieces, each uniform on its piece; the pieces are convex polygons
(boxes, rotated rectangles, triangles, regular and random convex polygons, glyph strokes) and annulus
sectors (full rings, arcs, thin curves, discs). Because the pieces are disjoint and each is uniform, the
density is piecewise constant and both the support and the entropy are exact::

    h = -sum_k w_k log(w_k / A_k)        (nats; A_k the area of piece k, w_k its mass)

::

    from diffflow_ext.data import sharp2d
    ds = sharp2d.generate(1003)        # a Toy2D: ds.sample(n, generator), ds.contains(x), ds.distance(x)
    ds.entropy                          # exact differential entropy in nats
    sharp2d.HELDOUT_SEEDS[:12]          # the held-out part (never used for tuning)

``toy2d.get("sharp_1003")`` (and so ``diffflow train sharp_1003``) gives the same set.

Kinds (``seed % 6``): ``boxes`` (random unions of rotated rectangles and boxes), ``polygons`` (random convex
polygons and triangles), ``lattice`` (a rotated grid of identical shapes with cells missing), ``rings``
(annuli and annulus sectors), ``curves`` (thin arcs and thin straight strokes, width 0.03-0.06), ``glyphs``
(a rotated two/three-character seven-segment string of thin strokes). Every set is scaled into
``[-1, 1]^2`` (like the built-ins); most are rotated by a random angle, so they are not separable in the
coordinates.

Seeds are split once, for good: :data:`TUNING_SEEDS` (0..999) may be looked at while choosing defaults;
:data:`HELDOUT_SEEDS` (1000..1999) are only ever reported on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .toy2d import Toy2D, _as_points, as_numpy_rng

__all__ = ["KINDS", "TUNING_SEEDS", "HELDOUT_SEEDS", "SharpSet", "Polygon", "AnnulusSector", "generate"]

KINDS = ("boxes", "polygons", "lattice", "rings", "curves", "glyphs")
TUNING_SEEDS = range(0, 1000)
HELDOUT_SEEDS = range(1000, 2000)
_MARGIN = 0.03  # minimum gap between pieces (so a thin-set tolerance never merges two pieces)


# ----------------------------------------------------------------------------- pieces


def _seg_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of points ``(n, 2)`` to the segment ``a-b``."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-300), 0.0, 1.0)
    return np.sqrt(((p - a - t[:, None] * ab) ** 2).sum(1))


@dataclass
class Polygon:
    """A convex polygon, vertices counter-clockwise ``(m, 2)``."""

    v: np.ndarray

    def __post_init__(self):
        v = np.asarray(self.v, dtype=np.float64)
        if _signed_area(v) < 0:
            v = v[::-1].copy()
        self.v = v

    @property
    def area(self) -> float:
        return _signed_area(self.v)

    def transform(self, rot: np.ndarray, shift: np.ndarray, scale: float) -> "Polygon":
        return Polygon((self.v @ rot.T) * scale + shift)

    def bounds(self) -> tuple[np.ndarray, float]:
        c = self.v.mean(0)
        return c, float(np.sqrt(((self.v - c) ** 2).sum(1)).max())

    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        return self.v.min(0), self.v.max(0)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        # fan triangulation, triangle by area, uniform in the triangle (reflection trick)
        a, b, c = self.v[0], self.v[1:-1], self.v[2:]
        areas = 0.5 * np.abs((b[:, 0] - a[0]) * (c[:, 1] - a[1]) - (b[:, 1] - a[1]) * (c[:, 0] - a[0]))
        k = rng.choice(len(areas), size=n, p=areas / areas.sum())
        u, w = rng.random(n), rng.random(n)
        flip = u + w > 1
        u, w = np.where(flip, 1 - u, u), np.where(flip, 1 - w, w)
        return a + u[:, None] * (b[k] - a) + w[:, None] * (c[k] - a)

    def distance(self, p: np.ndarray) -> np.ndarray:
        v, w = self.v, np.roll(self.v, -1, axis=0)
        e = w - v
        cross = e[None, :, 0] * (p[:, None, 1] - v[None, :, 1]) - e[None, :, 1] * (p[:, None, 0] - v[None, :, 0])
        inside = (cross >= 0).all(1)
        d = np.min(np.stack([_seg_distance(p, v[i], w[i]) for i in range(len(v))], 1), 1)
        return np.where(inside, 0.0, d)


@dataclass
class AnnulusSector:
    """``{r_in <= |x - c| <= r_out, angle in [phi0, phi0 + span]}``; ``span = 2 pi`` is a full annulus
    (``r_in = 0``: a disc or a circular sector)."""

    c: np.ndarray
    r_in: float
    r_out: float
    phi0: float = 0.0
    span: float = 2 * math.pi

    @property
    def full(self) -> bool:
        return self.span >= 2 * math.pi - 1e-12

    @property
    def area(self) -> float:
        return 0.5 * self.span * (self.r_out**2 - self.r_in**2)

    def transform(self, rot: np.ndarray, shift: np.ndarray, scale: float) -> "AnnulusSector":
        ang = math.atan2(rot[1, 0], rot[0, 0])
        return AnnulusSector(np.asarray(self.c) @ rot.T * scale + shift, self.r_in * scale, self.r_out * scale,
                             self.phi0 + ang, self.span)

    def bounds(self) -> tuple[np.ndarray, float]:
        return np.asarray(self.c, dtype=np.float64), self.r_out

    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        # conservative (the full disc): only used to fit the set into [-1, 1]^2
        c = np.asarray(self.c, dtype=np.float64)
        return c - self.r_out, c + self.r_out

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        r = np.sqrt(self.r_in**2 + rng.random(n) * (self.r_out**2 - self.r_in**2))
        phi = self.phi0 + rng.random(n) * self.span
        return np.asarray(self.c) + np.stack([r * np.cos(phi), r * np.sin(phi)], 1)

    def _edge(self, angle: float) -> tuple[np.ndarray, np.ndarray]:
        u = np.array([math.cos(angle), math.sin(angle)])
        return self.c + self.r_in * u, self.c + self.r_out * u

    def distance(self, p: np.ndarray) -> np.ndarray:
        q = p - self.c
        rho = np.sqrt((q**2).sum(1))
        radial = np.maximum(np.maximum(self.r_in - rho, rho - self.r_out), 0.0)
        if self.full:
            return radial
        rel = np.mod(np.arctan2(q[:, 1], q[:, 0]) - self.phi0, 2 * math.pi)
        in_span = rel <= self.span
        # outside the angular span the nearest point lies on one of the two radial edges
        d_edges = np.minimum(_seg_distance(p, *self._edge(self.phi0)),
                             _seg_distance(p, *self._edge(self.phi0 + self.span)))
        return np.where(in_span, radial, d_edges)


def _signed_area(v: np.ndarray) -> float:
    x, y = v[:, 0], v[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _rot(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s], [s, c]])


def _rect(cx, cy, w, h, angle=0.0) -> Polygon:
    v = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    return Polygon(v @ _rot(angle).T + np.array([cx, cy]))


def _regular(cx, cy, r, m, angle=0.0) -> Polygon:
    th = angle + 2 * math.pi * np.arange(m) / m
    return Polygon(np.stack([cx + r * np.cos(th), cy + r * np.sin(th)], 1))


# ----------------------------------------------------------------------------- the set


class SharpSet(Toy2D):
    """A mixture of disjoint uniform pieces (see the module docstring); exact ``distance`` and ``entropy``."""

    sharp = True

    def __init__(self, name: str, kind: str, pieces: list, weights: np.ndarray, tol: float, description: str = ""):
        self.name, self.kind, self.pieces = name, kind, list(pieces)
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.tol = float(tol)
        self.description = description or f"generated sharp set ({kind}, {len(pieces)} pieces)"

    @property
    def areas(self) -> np.ndarray:
        return np.array([p.area for p in self.pieces])

    @property
    def area(self) -> float:
        """Area of the support (the pieces are disjoint)."""
        return float(self.areas.sum())

    @property
    def entropy(self) -> float:
        """Exact differential entropy in nats: ``-sum_k w_k log(w_k / A_k)``."""
        w = self.weights
        return float(-(w * np.log(w / self.areas)).sum())

    def log_density(self, points) -> np.ndarray:
        """Exact ``log p(x)`` (``-inf`` outside the support)."""
        p = _as_points(points)
        out = np.full(len(p), -np.inf)
        for piece, w in zip(self.pieces, self.weights):
            out = np.where(piece.distance(p) == 0, np.log(w / piece.area), out)
        return out

    def _sample(self, n, rng):
        counts = rng.multinomial(n, self.weights)
        out = np.concatenate([piece.sample(int(c), rng) for piece, c in zip(self.pieces, counts)])
        return out[rng.permutation(n)]

    def distance(self, points):
        p = _as_points(points)
        return np.min(np.stack([piece.distance(p) for piece in self.pieces], 1), 1)

    def __repr__(self) -> str:
        return f"<SharpSet {self.name!r} kind={self.kind} pieces={len(self.pieces)} entropy={self.entropy:.4f}>"


# ----------------------------------------------------------------------------- generators of each kind


def _place(rng, make, count, radius_range, tries=400):
    """Place up to ``count`` pieces from ``make(rng, r) -> piece`` with bounding circles apart by _MARGIN."""
    out, circles = [], []
    for _ in range(tries):
        if len(out) >= count:
            break
        r = rng.uniform(*radius_range)
        c = rng.uniform(-1 + r, 1 - r, size=2)
        if any(np.hypot(*(c - c2)) < r + r2 + _MARGIN for c2, r2 in circles):
            continue
        piece = make(rng, c, r)
        pc, pr = piece.bounds()
        circles.append((pc, pr))
        out.append(piece)
    return out


def _boxes(rng):
    def make(rng, c, r):
        a = rng.uniform(0.35, 1.0)  # aspect
        w = 2 * r / math.sqrt(1 + a * a)
        angle = 0.0 if rng.random() < 0.5 else rng.uniform(0, math.pi)
        return _rect(c[0], c[1], w, a * w, angle)

    return _place(rng, make, int(rng.integers(3, 8)), (0.12, 0.4)), 0.0


def _polygons(rng):
    def make(rng, c, r):
        if rng.random() < 0.4:
            return _regular(c[0], c[1], r, int(rng.integers(3, 7)), rng.uniform(0, 2 * math.pi))
        m = int(rng.integers(3, 9))
        th = np.sort(rng.uniform(0, 2 * math.pi, size=m))
        return Polygon(np.stack([c[0] + r * np.cos(th), c[1] + r * np.sin(th)], 1))

    pieces = [p for p in _place(rng, make, int(rng.integers(3, 8)), (0.12, 0.45)) if p.area > 0.01]
    return pieces, 0.0


def _lattice(rng):
    m, k = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    pitch = 2.0 / max(m, k)
    shape = rng.choice(["square", "disc", "triangle", "hexagon", "diamond"])
    fill = rng.uniform(0.45, 0.8)
    pieces = []
    for i in range(m):
        for j in range(k):
            if rng.random() < 0.2:  # missing cells break the symmetry
                continue
            cx, cy = (i - (m - 1) / 2) * pitch, (j - (k - 1) / 2) * pitch
            r = fill * pitch / 2
            if shape == "square":
                pieces.append(_rect(cx, cy, 2 * r / math.sqrt(2), 2 * r / math.sqrt(2)))
            elif shape == "disc":
                pieces.append(AnnulusSector(np.array([cx, cy]), 0.0, r))
            elif shape == "triangle":
                pieces.append(_regular(cx, cy, r, 3, math.pi / 2))
            elif shape == "hexagon":
                pieces.append(_regular(cx, cy, r, 6))
            else:
                pieces.append(_regular(cx, cy, r, 4))
    if not pieces:
        pieces.append(_rect(0.0, 0.0, pitch * fill, pitch * fill))
    return pieces, 0.0


def _rings(rng):
    pieces = []
    if rng.random() < 0.5:  # concentric rings and sectors around one centre
        n = int(rng.integers(2, 5))
        radii = np.linspace(0.25, 1.0, n)
        hw = rng.uniform(0.04, 0.09)
        for r in radii:
            if rng.random() < 0.5:
                pieces.append(AnnulusSector(np.zeros(2), r - hw, r + hw))
            else:
                span = rng.uniform(0.8, 1.7) * math.pi
                pieces.append(AnnulusSector(np.zeros(2), r - hw, r + hw, rng.uniform(0, 2 * math.pi), span))
    else:  # separate rings and sectors

        def make(rng, c, r):
            hw = rng.uniform(0.03, 0.08) * r / 0.3
            span = 2 * math.pi if rng.random() < 0.5 else rng.uniform(0.6, 1.6) * math.pi
            r_in = 0.0 if rng.random() < 0.15 else r - 2 * hw
            return AnnulusSector(c, max(r_in, 0.0), r, rng.uniform(0, 2 * math.pi), span)

        pieces = _place(rng, make, int(rng.integers(2, 6)), (0.15, 0.5))
    return pieces, 0.01


def _curves(rng):
    def make(rng, c, r):
        hw = rng.uniform(0.015, 0.03)
        if rng.random() < 0.5:  # a thin arc
            return AnnulusSector(c, r - 2 * hw, r, rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 1.5) * math.pi)
        return _rect(c[0], c[1], 2 * r, 2 * hw, rng.uniform(0, math.pi))  # a thin straight stroke

    return _place(rng, make, int(rng.integers(3, 8)), (0.15, 0.5)), 0.01


_SEGMENTS = {  # seven-segment glyphs: a top, b upper right, c lower right, d bottom, e lower left, f upper left, g mid
    "0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg", "5": "acdfg", "6": "acdefg", "7": "abc",
    "8": "abcdefg", "9": "abcdfg", "A": "abcefg", "C": "adef", "E": "adefg", "F": "aefg", "H": "bcefg",
    "L": "def", "P": "abefg", "U": "bcdef",
}


def _glyph(ch: str, x0: float, w: float, h: float, t: float) -> list[Polygon]:
    """Strokes of one glyph in the box ``[x0, x0 + w] x [-h/2, h/2]``, stroke width ``t``; strokes do not touch."""
    gap = 1.5 * t  # strokes end short of the corners, so pieces stay apart
    half = h / 2
    horiz = {"a": half - t / 2, "g": 0.0, "d": -half + t / 2}
    pieces = []
    for s in _SEGMENTS[ch]:
        if s in horiz:
            pieces.append(_rect(x0 + w / 2, horiz[s], w - 2 * gap, t))
        else:
            x = x0 + (w - t / 2 if s in "bc" else t / 2)
            y = half / 2 if s in "bf" else -half / 2
            pieces.append(_rect(x, y, t, half - 2 * gap))
    return pieces


def _glyphs(rng):
    n = int(rng.integers(2, 4))
    text = "".join(rng.choice(list(_SEGMENTS), size=n))
    w, h, t = 0.5, 0.9, rng.uniform(0.06, 0.1)
    pieces = []
    for i, ch in enumerate(text):
        pieces += _glyph(ch, i * (w + 0.2), w, h, t)
    return pieces, 0.01, text


# ----------------------------------------------------------------------------- public


def _fit(pieces, rng, rotate: bool):
    """Rotate by a random angle (if ``rotate``) and fit the union into ``[-1, 1]^2`` (centred)."""
    rot = _rot(rng.uniform(0, math.pi)) if rotate else np.eye(2)
    pieces = [p.transform(rot, np.zeros(2), 1.0) for p in pieces]
    lo = np.min([p.extent()[0] for p in pieces], 0)
    hi = np.max([p.extent()[1] for p in pieces], 0)
    scale = 1.9 / float((hi - lo).max())
    shift = -(lo + hi) / 2 * scale
    return [p.transform(np.eye(2), shift, scale) for p in pieces]


def generate(seed: int) -> SharpSet:
    """The generated sharp set number ``seed`` (a non-negative integer); deterministic."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    seed = int(seed)
    kind = KINDS[seed % len(KINDS)]
    rng = as_numpy_rng(np.random.SeedSequence([seed, 0x5A4B]))
    text = ""
    if kind == "glyphs":
        pieces, tol, text = _glyphs(rng)
    else:
        pieces, tol = {"boxes": _boxes, "polygons": _polygons, "lattice": _lattice, "rings": _rings,
                       "curves": _curves}[kind](rng)
    pieces = _fit(pieces, rng, rotate=kind != "boxes" or rng.random() < 0.5)
    areas = np.array([p.area for p in pieces])
    # mass per piece: its area times a random factor in [0.5, 2] (non-uniform density across pieces)
    weights = areas * np.exp(rng.uniform(math.log(0.5), math.log(2.0), size=len(pieces)))
    desc = f"generated sharp set #{seed}: {kind}" + (f" {text!r}" if text else "") + f", {len(pieces)} pieces"
    return SharpSet(f"sharp_{seed}", kind, pieces, weights, tol, desc)
