"""Users' own point data: ``(n, d)`` points in ``.npy``, ``.npz`` (one array), ``.csv`` / ``.tsv`` / ``.txt``
(optionally gzip-compressed: ``.csv.gz``) files, any dimension ``d``.

The loader is defensive: it reads only regular files (a FIFO or ``/dev/zero`` is refused without reading),
checks a ``.npy`` header (dtype, shape, Fortran order) against the file size and the available memory before
allocating, never unpickles (object arrays are refused), and reports problems with the file name, the row
and the column -- but never quotes the file's content (the path may come from a checkpoint's metadata).

CSV rules: ``#`` comments and blank lines are skipped; the delimiter is ``,``, ``;``, tab or whitespace (from
the first row); a first row is a header only if EVERY cell is a column name (starts with a letter, ``_`` or
a quote, and is not a number) -- a first row mixing numbers and text is an error, never silently dropped.

Values: NaN/inf are errors; so are values that overflow the requested dtype, constant columns, and gross
outliers (a value more than ``outlier_limit`` robust standard deviations -- 1.4826 x the median absolute
deviation -- from its column's median, default 1e6: e.g. one 1e30 among values of order 1), which would
make the standardised data degenerate. ``outliers="warn"`` turns the last check into a warning.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import stat
import warnings
import zipfile
from array import array
from pathlib import Path
from typing import IO

import numpy as np
import torch

from .._resources import fmt_bytes, mem_available

__all__ = ["load_points", "check_regular_file", "DataFileError", "POINT_FILE_TYPES"]

POINT_FILE_TYPES = (".npy", ".npz", ".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")
_NAME = re.compile(r"""^["'_A-Za-z]""")


class DataFileError(ValueError):
    """A data file that cannot be used as a set of points (the one-line message names the file and why)."""


def _file_type(p: Path) -> str:
    name = p.name.lower()
    for ext in sorted(POINT_FILE_TYPES, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    raise DataFileError(f"{p}: unsupported file type {''.join(p.suffixes[-2:]) or '(none)'!r}; use one of "
                        f"{', '.join(POINT_FILE_TYPES)} (rows = points, columns = dimensions)")


def check_regular_file(p: str | os.PathLike) -> int:
    """The size of ``p`` if it is a non-empty regular file; else a one-line :class:`DataFileError` (not found, a
    directory, a FIFO or device -- refused without opening it, so nothing blocks -- or empty)."""
    p = Path(p)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise DataFileError(f"data file not found: {p}") from None
    except OSError as e:
        raise DataFileError(f"{p}: cannot read data file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataFileError(f"{p} is a directory, expected a file of points ({', '.join(POINT_FILE_TYPES)})")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
            stat.S_ISBLK(st.st_mode) else "not a regular file"
        raise DataFileError(f"{p}: not a regular file ({kind}); give a file of points")
    if st.st_size == 0:
        raise DataFileError(f"{p}: the file is empty (no rows)")
    return st.st_size


def _need_memory(p: Path, nbytes: int, what: str) -> None:
    avail = mem_available()
    if avail is not None and nbytes > avail:
        raise DataFileError(f"{p}: {what} needs {fmt_bytes(nbytes)} of memory, only {fmt_bytes(avail)} is available")


# ----------------------------------------------------------------------------- .npy / .npz


def _read_npy(fh: IO[bytes], total: int, p: Path, where: str = "") -> np.ndarray:
    """Validate a .npy stream's header against ``total`` (its byte size), then read the array."""
    fmt = np.lib.format
    w = f"{p}{where}"
    try:
        version = fmt.read_magic(fh)
    except ValueError:
        raise DataFileError(f"{w}: not a .npy file (no NUMPY magic string; pickles are refused)") from None
    try:
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
        else:
            raise DataFileError(f"{w}: unsupported .npy format version {version}; save with numpy.save")
    except (ValueError, SyntaxError, TypeError) as e:
        raise DataFileError(f"{w}: cannot read the .npy header (corrupt: {str(e).splitlines()[0][:80]})") from None
    if dtype.hasobject:
        raise DataFileError(f"{w}: object arrays are refused (loading them would unpickle); save a numeric array")
    if dtype.names is not None or dtype.subdtype is not None:
        raise DataFileError(f"{w}: structured dtype {dtype} is not supported; save a plain 2-D numeric array")
    if dtype.kind not in "biuf":
        raise DataFileError(f"{w}: expected a numeric array (bool, integer or float), got dtype {dtype}")
    _check_shape(w, tuple(shape))
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    have = total - fh.tell()
    if nbytes != have:
        raise DataFileError(f"{w}: the header says shape {tuple(shape)} of {dtype} ({fmt_bytes(nbytes)}, {nbytes} "
                            f"bytes) but the file holds {max(have, 0)} bytes of data (truncated or corrupt)")
    _need_memory(p, nbytes + count * 8, f"an array of shape {tuple(shape)}")
    buf = bytearray(nbytes)
    view, got = memoryview(buf), 0
    while got < nbytes:
        k = fh.readinto(view[got:])
        if not k:
            raise DataFileError(f"{w}: truncated .npy data ({got} of {nbytes} bytes)")
        got += k
    arr = np.frombuffer(buf, dtype=dtype, count=count)
    return arr.reshape(shape, order="F" if fortran else "C")


def _read_npz(p: Path) -> np.ndarray:
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataFileError(f"{p}: not a valid .npz (zip) file ({e})") from None
    with zf:
        members = [i for i in zf.infolist() if not i.is_dir()]
        if len(members) != 1:
            names = ", ".join(i.filename.removesuffix(".npy") for i in members[:8])
            raise DataFileError(f"{p}: expected exactly one array in the .npz file, found {len(members)}"
                                + (f" ({names})" if names else "") + "; save the points alone")
        info = members[0]
        if not info.filename.endswith(".npy"):
            raise DataFileError(f"{p}: the .npz member {info.filename!r} is not a .npy array")
        try:
            with zf.open(info) as fh:
                return _read_npy(fh, info.file_size, p, f" (array {info.filename.removesuffix('.npy')!r})")
        except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError) as e:
            raise DataFileError(f"{p}: cannot read the .npz file ({str(e)[:100]})") from None


# ----------------------------------------------------------------------------- CSV


def _is_name(cell: str) -> bool:
    if not cell or not _NAME.match(cell):
        return False
    try:
        float(cell)
    except ValueError:
        return True
    return False  # "nan", "inf", "infinity" are numbers


def _to_float(cell: str) -> float:
    c = cell.strip()
    if len(c) >= 2 and c[0] == c[-1] and c[0] in "\"'":
        c = c[1:-1].strip()
    if "_" in c:  # Python's float() accepts 1_000; a CSV value with "_" is a typo
        raise ValueError
    return float(c)


def _read_csv(p: Path, gz: bool, default_delim: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (values (n, d) float64, line number of each row)."""
    opener = gzip.open if gz else open
    values = array("d")
    lines_of_rows = array("l")
    width = None
    delim = default_delim
    first_line = None
    header_line = None
    avail = mem_available()
    limit = avail // 2 if avail is not None else None
    try:
        with opener(p, "rt", encoding="utf-8-sig", newline="") as fh:
            for lineno, raw in enumerate(fh, start=1):
                ln = raw.strip()
                if not ln or ln.startswith("#"):
                    continue
                if width is None and first_line is None:
                    if delim is None:
                        delim = next((d for d in (",", ";", "\t") if d in ln), None)
                    cells = [c.strip() for c in (ln.split(delim) if delim else ln.split())]
                    first_line = lineno
                    if all(_is_name(c) for c in cells):
                        width = len(cells)  # a header of column names
                        header_line = lineno
                        continue
                cells = [c.strip() for c in (ln.split(delim) if delim else ln.split())]
                if width is None:
                    width = len(cells)
                elif len(cells) != width:
                    ref = "the header" if header_line is not None else "the first row"
                    raise DataFileError(f"{p}: rows have different numbers of columns: line {lineno} has "
                                        f"{len(cells)}, {ref} (line {first_line}) has {width}")
                for j, c in enumerate(cells, start=1):
                    if not c:
                        raise DataFileError(f"{p}: line {lineno}, column {j} is empty")
                    try:
                        values.append(_to_float(c))
                    except ValueError:
                        hint = (" (a header row must consist of column names only)" if lineno == first_line
                                else "")
                        raise DataFileError(f"{p}: line {lineno}, column {j} is not numeric{hint}") from None
                lines_of_rows.append(lineno)
                if limit is not None and len(values) * 8 > limit:
                    raise DataFileError(f"{p}: the file holds more values than fit in memory "
                                        f"({fmt_bytes(limit)} available for it)")
    except UnicodeDecodeError as e:
        raise DataFileError(f"{p}: not a UTF-8 text file (undecodable byte at offset {e.start}); "
                            "expected numbers separated by commas") from None
    except (OSError, EOFError) as e:
        raise DataFileError(f"{p}: cannot read the file ({str(e)[:100]})") from None
    if first_line is None:
        raise DataFileError(f"{p}: the file has no rows (only blank or # comment lines)")
    if not lines_of_rows:
        raise DataFileError(f"{p}: the file has a header but no data rows")
    arr = np.frombuffer(values, dtype=np.float64).reshape(len(lines_of_rows), width)
    return arr, np.frombuffer(lines_of_rows, dtype=np.int64 if lines_of_rows.itemsize == 8 else np.int32)


# ----------------------------------------------------------------------------- checks


def _check_shape(w: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        hint = {0: " (a single number)", 1: " (for 1-D data save it as shape (n, 1))"}.get(
            len(shape), " (flatten each point: shape (n, d))")
        raise DataFileError(f"{w}: expected a 2-D array (n_points, dim), got shape {shape}{hint}")
    if shape[1] < 1:
        raise DataFileError(f"{w}: the points have zero columns (shape {shape})")


def _where(rows: np.ndarray | None, i: int, j: int) -> str:
    return f"row {i + 1}, column {j + 1}" + (f" (line {int(rows[i])})" if rows is not None else "")


def _check_values(p: Path, arr: np.ndarray, rows: np.ndarray | None, dtype: torch.dtype, min_points: int,
                  outliers: str, outlier_limit: float) -> None:
    n, d = arr.shape
    if n < min_points:
        raise DataFileError(f"{p}: need at least {min_points} points, got {n}")
    bad = ~np.isfinite(arr)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        kind = "NaN" if np.isnan(arr[i, j]) else "infinite"
        raise DataFileError(f"{p}: {int(bad.sum())} non-finite value(s); the first, at {_where(rows, i, j)}, is {kind}")
    if dtype.is_floating_point:
        big = float(torch.finfo(dtype).max)
        over = np.abs(arr) > big
        if over.any():
            i, j = np.argwhere(over)[0]
            raise DataFileError(f"{p}: the value at {_where(rows, i, j)} overflows {dtype} (|x| > {big:.3g})")
    for j in range(d if n > 1 else 0):
        col = arr[:, j]
        if col.min() == col.max():
            raise DataFileError(f"{p}: column {j + 1} is constant (every row holds the same value); drop it")
    med = np.median(arr, axis=0)
    dev = np.abs(arr - med)
    scale = 1.4826 * np.median(dev, axis=0)
    for j in np.flatnonzero(scale == 0):  # more than half the column equal: use the typical non-zero deviation
        nz = dev[:, j][dev[:, j] > 0]
        scale[j] = np.median(nz) if nz.size else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(scale > 0, dev / np.where(scale > 0, scale, 1.0), 0.0)
    far = z > outlier_limit
    if far.any():
        i, j = np.unravel_index(int(np.argmax(z)), z.shape)
        msg = (f"{p}: {int(far.sum())} gross outlier(s); the largest, at {_where(rows, i, j)}, is {z[i, j]:.3g} "
               f"robust standard deviations from the column's median (limit {outlier_limit:g}): a data error? "
               "(standardising would squash every other point)")
        if outliers == "error":
            raise DataFileError(msg + "; fix the file, or pass --data-option outliers=warn (Python: outliers='warn')")
        if outliers == "warn":
            warnings.warn(msg, stacklevel=3)


def load_points(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    min_points: int = 2,
    outliers: str = "error",
    outlier_limit: float = 1e6,
) -> torch.Tensor:
    """Load points ``(n, d)`` from a ``.npy``, ``.npz`` (exactly one array) or ``.csv``/``.tsv``/``.txt``
    (optionally ``.gz``) file; see the module docstring for the rules.

    ``outliers``: ``"error"`` (default), ``"warn"`` or ``"ignore"`` for values more than ``outlier_limit`` robust
    standard deviations from their column's median. Every problem raises :class:`DataFileError` naming the file
    (and the row and column), without quoting the file's content.
    """
    if outliers not in ("error", "warn", "ignore"):
        raise ValueError(f"outliers: expected 'error', 'warn' or 'ignore', got {outliers!r}")
    if isinstance(min_points, bool) or not isinstance(min_points, int) or min_points < 1:
        raise ValueError(f"min_points: expected a positive integer, got {min_points!r}")
    if not (isinstance(outlier_limit, (int, float)) and outlier_limit > 0):
        raise ValueError(f"outlier_limit: expected a positive number, got {outlier_limit!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch dtype, got {dtype!r}")
    p = Path(path)
    size = check_regular_file(p)
    ext = _file_type(p)
    rows = None
    if ext == ".npy":
        try:
            with open(p, "rb") as fh:
                arr = _read_npy(fh, size, p)
        except OSError as e:
            raise DataFileError(f"{p}: cannot read the file ({e.strerror or e})") from None
    elif ext == ".npz":
        arr = _read_npz(p)
    else:
        arr, rows = _read_csv(p, ext.endswith(".gz"), "\t" if ext.startswith(".tsv") else None)
    _check_shape(str(p), arr.shape)
    arr = np.asarray(arr, dtype=np.float64)
    _check_values(p, arr, rows, dtype, min_points, outliers, outlier_limit)
    return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)
