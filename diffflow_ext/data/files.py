"""Users' own point data: ``.npy`` or ``.csv`` files of ``(n, d)`` points, any dimension ``d``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_points", "DataFileError"]


class DataFileError(ValueError):
    """A data file that cannot be used as a set of points (with the reason)."""


def _read_csv(path: Path) -> np.ndarray:
    with open(path, "r", encoding="utf-8-sig") as fh:
        lines = [ln.strip() for ln in fh]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise DataFileError(f"{path}: the CSV file has no rows")
    delim = "," if "," in lines[0] else (";" if ";" in lines[0] else None)

    def parse(ln: str, lineno: int) -> list[float]:
        cells = ln.split(delim) if delim else ln.split()
        try:
            return [float(c) for c in cells]
        except ValueError:
            raise DataFileError(
                f"{path}: row {lineno} is not numeric: {ln[:80]!r} (only a single header row is allowed)"
            ) from None

    rows: list[list[float]] = []
    start = 0
    try:
        rows.append(parse(lines[0], 1))
    except DataFileError:
        start = 1  # header
    else:
        start = 1
    if not rows and len(lines) == 1:
        raise DataFileError(f"{path}: the CSV file has a header but no data rows")
    for i, ln in enumerate(lines[start:], start=start + 1):
        rows.append(parse(ln, i))
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise DataFileError(f"{path}: rows have different numbers of columns: {sorted(widths)}")
    return np.asarray(rows, dtype=np.float64)


def load_points(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, min_points: int = 2) -> torch.Tensor:
    """Load points ``(n, d)`` from a ``.npy`` (numeric, no pickles) or ``.csv`` file.

    A 1-D array is refused (ambiguous: reshape to ``(n, 1)`` yourself); NaN/inf values, non-numeric
    content, fewer than ``min_points`` rows or zero columns give a :class:`DataFileError`.
    """
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"data file not found: {p}")
    if p.is_dir():
        raise DataFileError(f"{p} is a directory, expected a .npy or .csv file of points")
    ext = p.suffix.lower()
    if ext == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as e:
            raise DataFileError(f"{p}: not a numeric .npy array ({e}); object/pickled arrays are refused") from None
        except (OSError, EOFError) as e:
            raise DataFileError(f"{p}: cannot read .npy file ({e})") from None
        if not isinstance(arr, np.ndarray):
            raise DataFileError(f"{p}: expected a single array, got {type(arr).__name__}")
        if arr.dtype.kind not in "biuf":
            raise DataFileError(f"{p}: expected a numeric array, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    elif ext in (".csv", ".txt", ".tsv"):
        arr = _read_csv(p)
    else:
        raise DataFileError(f"{p}: unsupported file type {ext!r}; use .npy or .csv (rows = points, columns = dims)")
    if arr.ndim != 2:
        raise DataFileError(
            f"{p}: expected a 2-D array (n_points, dim), got shape {arr.shape}"
            + (" (for 1-D data save it as shape (n, 1))" if arr.ndim == 1 else "")
        )
    n, d = arr.shape
    if d < 1:
        raise DataFileError(f"{p}: points have zero columns")
    if n < min_points:
        raise DataFileError(f"{p}: need at least {min_points} points, got {n}")
    bad = ~np.isfinite(arr)
    if bad.any():
        r = int(np.argwhere(bad)[0][0])
        raise DataFileError(f"{p}: {int(bad.sum())} non-finite values (NaN/inf), first in row {r}")
    return torch.from_numpy(arr).to(dtype)
