"""Built-in data sources for points: the procedural 2-D toys and users' point files; path dispatch.

Image sources live in :mod:`.images`, tabular sets in :mod:`.tabular`; importing this module registers all.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from . import toy2d
from .base import (
    _ALIASES,
    _NAME_RESOLVERS,
    DataSource,
    DataSourceError,
    Standardize,
    _check_options,
    register_data_source,
)
from .files import DataFileError, check_regular_file, load_points

__all__ = ["ToySource", "points_source", "source_from_path", "path_options"]


class ToySource(DataSource):
    """A procedural 2-D toy: a streaming sampler, standardised by the statistics of 100k seeded points."""

    def __init__(self, toy: toy2d.Toy2D, *, seed: int = 0):
        self.toy = toy
        fit = toy.sample_numpy(100_000, np.random.default_rng([int(seed), 1]))
        super().__init__(toy.name, kind="points", shape=(2,), transform=Standardize.fit(fit),
                         support=toy if toy.sharp else None, spec={"name": toy.name, "options": {"seed": int(seed)}},
                         info={"sharp": bool(toy.sharp)})

    def _draw(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        return torch.from_numpy(self.toy.sample_numpy(int(n), rng))


def _register_toy(name: str, toy: toy2d.Toy2D) -> None:
    @register_data_source(name, kind="points", help=toy.description)
    def _factory(*, data_dir=None, seed: int = 0) -> DataSource:
        return ToySource(toy, seed=seed)


def _resolve_generated(key: str) -> bool:
    """Register ``sharp_SEED`` (the generated sharp family, :mod:`.sharp2d`) on first use."""
    if not re.fullmatch(r"sharp_\d{1,9}", key):
        return False
    _register_toy(key, toy2d.get(key))
    return True


for _n in toy2d.DATASETS:
    _register_toy(_n, toy2d.DATASETS[_n])
_NAME_RESOLVERS["sharp_SEED"] = _resolve_generated
for _a, _t in getattr(toy2d, "_ALIASES", {}).items():
    _ALIASES.setdefault(_a, _t)


def points_source(points, name: str, *, seed: int = 0, holdout: float = 0.1, kind: str = "points") -> DataSource:
    """A finite set of ``(n, d)`` points split at random (seeded) into train / test (``holdout`` share).

    With ``holdout=0`` the test split *is* the training set (``info["test_is_train"]``).
    """
    pts = torch.as_tensor(np.asarray(points, dtype=np.float64))
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise DataSourceError(f"holdout: expected a fraction in [0, 1), got {holdout!r}")
    n = len(pts)
    n_hold = max(1, int(round(holdout * n))) if holdout > 0 else 0
    if n - n_hold < 2:
        raise DataSourceError(f"{name}: only {n} points, too few to train with holdout={holdout}")
    perm = torch.from_numpy(np.random.default_rng([int(seed), 3]).permutation(n))
    train = pts[perm[n_hold:]]
    test = pts[perm[:n_hold]] if n_hold else train
    return DataSource(name, kind=kind, shape=(pts.shape[1],), transform=Standardize.fit(train),
                      splits={"train": train, "test": test},
                      info={"test_is_train": n_hold == 0, "holdout": float(holdout)})


def _npy_ndim(path: Path) -> int | None:
    from .images import _npy_header

    try:
        with open(path, "rb") as fh:
            return len(_npy_header(fh)[0])  # header only, no data read
    except Exception:  # noqa: BLE001 -- let the real loader produce the precise error
        return None


def regular_file(p: Path) -> Path:
    """``p`` if it is a non-empty regular file, else a one-line :class:`DataSourceError` (FIFOs and devices are
    refused without opening them)."""
    try:
        check_regular_file(p)
    except DataFileError as e:
        raise DataSourceError(str(e).replace("give a file of points", "give a data file")) from None
    return p


def path_options(path: str | os.PathLike) -> list[str]:
    """Option names a path source accepts (see :func:`source_from_path`)."""
    from .base import _option_names
    from .images import array_image_source, png_folder_source

    p = Path(path)
    if p.is_dir():
        return _option_names(png_folder_source) or []
    if p.is_file() and _is_image_array(p):
        return _option_names(array_image_source) or []
    return _option_names(_point_file_options) or []


def source_from_path(path: str | os.PathLike, *, seed: int = 0, **options) -> DataSource:
    """A source for a file or folder: points (``.csv``/``.txt``/``.npy`` of ``(n, d)``), images (``.npz``,
    ``.npy`` of ``uint8`` with 3 or 4 axes, or a folder of PNG files)."""
    from .images import array_image_source, png_folder_source

    p = Path(path)
    if not p.exists():
        raise DataSourceError(f"data file not found: {p}")
    if p.is_dir():
        _check_options(f"a PNG folder ({p.name})", png_folder_source, options)
        return png_folder_source(p, seed=seed, **options)
    regular_file(p)  # a FIFO or device is refused without opening it (nothing blocks)
    if _is_image_array(p):
        _check_options(f"an image array ({p.name})", array_image_source, options)
        return array_image_source(p, seed=seed, **options)
    _check_options(f"a point file ({p.name})", _point_file_options, options)
    if options.get("outliers", "error") not in ("error", "warn", "ignore"):
        raise DataSourceError(f"outliers: expected 'error', 'warn' or 'ignore', got {options['outliers']!r}")
    try:
        pts = load_points(p, dtype=torch.float64, outliers=options.get("outliers", "error"))
    except DataFileError as e:
        raise DataSourceError(str(e)) from None
    return points_source(pts, str(p.resolve()), seed=seed, holdout=options.get("holdout", 0.1))


def _point_file_options(*, holdout: float = 0.1, outliers: str = "error") -> None:
    """The options of a point file: ``holdout`` share for the test split; ``outliers`` for gross outliers
    (``"error"``, ``"warn"``, ``"ignore"``; see :func:`~diffflow_ext.data.files.load_points`)."""


def _is_image_array(p: Path) -> bool:
    """``.npy`` with 3+ axes, or ``.npz`` unless it holds exactly one 2-D array (then it is a point file)."""
    ext = p.suffix.lower()
    if ext == ".npy":
        return (_npy_ndim(p) or 0) >= 3
    if ext != ".npz":
        return False
    import zipfile

    from .images import _npy_header

    try:
        with zipfile.ZipFile(p) as z:
            members = z.infolist()
            if len(members) != 1:
                return True
            with z.open(members[0]) as fh:
                return len(_npy_header(fh)[0]) != 2
    except Exception:  # noqa: BLE001 -- the image loader reports the precise problem
        return True


from . import images as _images  # noqa: E402,F401  (registers the image sources)
from . import tabular as _tabular  # noqa: E402,F401  (registers the tabular sets)
