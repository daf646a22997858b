"""The tabular density-estimation sets of the masked-autoregressive-flow (MAF) papers, from a local folder.

Point ``--data-dir`` at the unpacked MAF data (Papamakarios et al. 2017, ``data.tar.gz``): the loaders
look for the standard preprocessed files in ``DIR`` or ``DIR/<set>/`` and apply the MAF repository's own
preprocessing and splits (``github.com/gpapamak/maf``, ``datasets/*.py``), reproduced exactly:

========== ============================= ====== =====================================================
name       file                          dims   preprocessing and splits
========== ============================= ====== =====================================================
power      ``power/data.npy``            6      shuffle (``RandomState(42)``), drop columns 3 and 1, add
                                                uniform noise (gap 0.001, voltage 0.01, sub-metering 1,
                                                time 0), test = last 10%, val = last 10% of the rest,
                                                standardise by train+val statistics
gas        ``gas/ethylene_CO.pickle``    8      drop Meth, Eth, Time; repeatedly drop the first column
           (or a ``ethylene_CO.csv``)           correlated > 0.98 with another; standardise by all rows
                                                (``ddof=1``); test = last 10%, val = last 10% of rest
hepmass    ``hepmass/1000_{train,test}`` 21     keep signal rows (label 1), drop the label (and the
           ``.csv``                             test file's extra last column); standardise by train
                                                (``ddof=1``); drop features whose smallest value
                                                repeats > 5 times; val = last 10% of train
miniboone  ``miniboone/data.npy``        43     test = last 10%, val = last 10% of the rest,
                                                standardise by train+val statistics
bsds300    ``BSDS300/BSDS300.hdf5``      63     the file's own train / validation / test (needs
           (or ``BSDS300.npz``)                 ``h5py``; an ``.npz`` with the same keys does not)
========== ============================= ====== =====================================================

GAS ships as a *pandas pickle*. Unpickling runs code from the file, so it is refused unless you pass
``allow_pickle=True`` (and have pandas) for a file you trust; or convert it once yourself to
``ethylene_CO.csv`` (``pd.read_pickle(f).to_csv("ethylene_CO.csv", index=False)``), which needs no opt-in.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .base import DataSource, DataSourceError, Standardize, register_data_source

__all__ = ["TABULAR_SETS", "tabular_source", "load_power", "load_gas", "load_hepmass", "load_miniboone",
           "load_bsds300"]

Splits = tuple[np.ndarray, np.ndarray, np.ndarray]


def _find(root: Path, sub: str, *names: str) -> Path | None:
    from .sources import regular_file

    for d in (root / sub, root / sub.lower(), root / sub.upper(), root):
        for n in names:
            if (d / n).exists() and not (d / n).is_dir():
                return regular_file(d / n)  # a FIFO or device is refused, not opened
    return None


def _need(root: Path, sub: str, *names: str) -> Path:
    f = _find(root, sub, *names)
    if f is None:
        raise DataSourceError(f"{sub}: none of {', '.join(names)} found in {root} or {root / sub}; point --data-dir "
                              "at the unpacked MAF data folder (nothing is downloaded)")
    return f


def _load_npy(path: Path) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataSourceError(f"{path}: not a numeric .npy array ({e})") from None
    if a.ndim != 2 or a.dtype.kind not in "iuf":
        raise DataSourceError(f"{path}: expected a 2-D numeric array, got {a.dtype} {a.shape}")
    return a.astype(np.float64)


def _split_tail(data: np.ndarray) -> Splits:
    """MAF's split: test = last 10% (``int``), validation = last 10% of the remainder."""
    n_test = int(0.1 * data.shape[0])
    test, rest = data[-n_test:], data[:-n_test]
    n_val = int(0.1 * rest.shape[0])
    return rest[:-n_val], rest[-n_val:], test


def _standardise(train, val, test, ref) -> Splits:
    mu, s = ref.mean(0), ref.std(0)
    return (train - mu) / s, (val - mu) / s, (test - mu) / s


def load_power(root: Path) -> Splits:
    data = _load_npy(_need(root, "power", "data.npy"))
    if data.shape[1] != 8:
        raise DataSourceError(f"POWER data.npy must have 8 columns (MAF's file), got {data.shape[1]}")
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)
    voltage = 0.01 * rng.rand(n, 1)
    gap = 0.001 * rng.rand(n, 1)
    sm = rng.rand(n, 3)
    data = data + np.hstack((gap, voltage, sm, np.zeros((n, 1))))
    tr, va, te = _split_tail(data)
    return _standardise(tr, va, te, np.vstack((tr, va)))


def _read_csv_header(path: Path, *, strict: bool = True) -> tuple[list[str], np.ndarray]:
    """A numeric CSV with one header row. ``strict=False`` allows rows with more values than header names and a
    trailing delimiter (HEPMASS's test file, which MAF calls "messed up")."""
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().strip()
        first = fh.readline().strip()
    names = [c.strip().strip('"').lstrip("# ").strip() for c in header.split(",")]
    fields = first.split(",")
    usecols = range(len(fields) - 1) if fields and fields[-1].strip() == "" else None
    try:
        data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2, usecols=usecols)
    except ValueError as e:
        raise DataSourceError(f"{path}: not a numeric CSV with one header row ({str(e)[:120]})") from None
    if strict and data.shape[1] != len(names):
        raise DataSourceError(f"{path}: header has {len(names)} names, rows have {data.shape[1]} values")
    return names, data


def load_gas(root: Path, *, allow_pickle: bool = False) -> Splits:
    csv = _find(root, "gas", "ethylene_CO.csv")
    if csv is not None:
        names, data = _read_csv_header(csv)
    else:
        pkl = _need(root, "gas", "ethylene_CO.pickle", "ethylene_CO.csv")
        if allow_pickle is not True:
            raise DataSourceError(f"{pkl} is a pandas pickle, and unpickling runs code from the file: pass "
                                  "allow_pickle=True (--data-option allow_pickle=true) if you trust it, or convert "
                                  "it to ethylene_CO.csv once")
        try:
            import pandas as pd
        except ImportError:
            raise DataSourceError("reading ethylene_CO.pickle needs pandas (pip install pandas)") from None
        df = pd.read_pickle(pkl)
        names, data = [str(c) for c in df.columns], df.to_numpy(dtype=np.float64)
    drop = [names.index(c) for c in ("Meth", "Eth", "Time") if c in names]
    if len(drop) != 3:
        raise DataSourceError(f"GAS: expected columns Meth, Eth and Time, found {names}")
    keep = [i for i in range(len(names)) if i not in drop]
    data = data[:, keep]
    while True:  # MAF: drop the first column correlated > 0.98 with another, until none is
        b = (np.corrcoef(data, rowvar=False) > 0.98).sum(1)
        if not np.any(b > 1):
            break
        data = np.delete(data, int(np.where(b > 1)[0][0]), axis=1)
    data = (data - data.mean(0)) / data.std(0, ddof=1)
    return _split_tail(data)


def load_hepmass(root: Path) -> Splits:
    _, tr = _read_csv_header(_need(root, "hepmass", "1000_train.csv"), strict=False)
    _, te = _read_csv_header(_need(root, "hepmass", "1000_test.csv"), strict=False)
    tr = tr[tr[:, 0] == 1][:, 1:]
    te = te[te[:, 0] == 1][:, 1:]
    if te.shape[1] == tr.shape[1] + 1:  # MAF: "the data set is messed up" -- the test file has an extra column
        te = te[:, :-1]
    if te.shape[1] != tr.shape[1]:
        raise DataSourceError(f"HEPMASS: train has {tr.shape[1]} features, test {te.shape[1]}")
    mu, s = tr.mean(0), tr.std(0, ddof=1)
    tr, te = (tr - mu) / s, (te - mu) / s
    keep = [j for j in range(tr.shape[1]) if Counter(tr[:, j].tolist())[tr[:, j].min()] <= 5]
    tr, te = tr[:, keep], te[:, keep]
    n_val = int(0.1 * tr.shape[0])
    return tr[:-n_val], tr[-n_val:], te


def load_miniboone(root: Path) -> Splits:
    tr, va, te = _split_tail(_load_npy(_need(root, "miniboone", "data.npy")))
    return _standardise(tr, va, te, np.vstack((tr, va)))


def load_bsds300(root: Path) -> Splits:
    npz = _find(root, "BSDS300", "BSDS300.npz")
    if npz is not None:
        with np.load(npz, allow_pickle=False) as f:
            got = {k: f[k] for k in ("train", "validation", "test") if k in f.files}
    else:
        h5 = _need(root, "BSDS300", "BSDS300.hdf5", "BSDS300.npz")
        try:
            import h5py
        except ImportError:
            raise DataSourceError(f"reading {h5} needs h5py (pip install h5py), or convert it to BSDS300.npz "
                                  "with arrays train, validation, test") from None
        with h5py.File(h5, "r") as f:
            got = {k: np.asarray(f[k]) for k in ("train", "validation", "test") if k in f}
    if set(got) != {"train", "validation", "test"}:
        raise DataSourceError(f"BSDS300: need arrays train, validation, test; found {sorted(got)}")
    return tuple(np.asarray(got[k], dtype=np.float64) for k in ("train", "validation", "test"))  # type: ignore


TABULAR_SETS = {"power": load_power, "gas": load_gas, "hepmass": load_hepmass, "miniboone": load_miniboone,
                "bsds300": load_bsds300}
_DIMS = {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63}


def tabular_source(name: str, data_dir: str | os.PathLike, **options) -> DataSource:
    """One MAF tabular set as a source with splits train / val / test (MAF's), standardised by train stats
    on top of MAF's preprocessing (close to the identity; its log-Jacobian is accounted for)."""
    tr, va, te = TABULAR_SETS[name](Path(data_dir), **options)
    for k, a in (("train", tr), ("val", va), ("test", te)):
        if a.ndim != 2 or len(a) < 2 or not np.isfinite(a).all():
            raise DataSourceError(f"{name}: the {k} split is empty or has non-finite values after preprocessing")
    splits = {"train": torch.from_numpy(np.ascontiguousarray(tr)), "val": torch.from_numpy(np.ascontiguousarray(va)),
              "test": torch.from_numpy(np.ascontiguousarray(te))}
    return DataSource(name, kind="tabular", shape=(tr.shape[1],), transform=Standardize.fit(splits["train"]),
                      splits=splits, info={"maf_dims": _DIMS[name]})


def _register(name: str, help: str) -> None:
    if name == "gas":
        @register_data_source(name, kind="tabular", needs_dir=True, help=help)
        def _gas(*, data_dir, seed: int = 0, allow_pickle: bool = False) -> DataSource:
            return tabular_source(name, data_dir, allow_pickle=allow_pickle)
        return

    @register_data_source(name, kind="tabular", needs_dir=True, help=help)
    def _factory(*, data_dir, seed: int = 0) -> DataSource:
        return tabular_source(name, data_dir)


for _n, _h in (("power", "UCI household power (MAF preprocessing, 6-d)"),
               ("gas", "UCI gas sensors, ethylene + CO (MAF preprocessing, 8-d)"),
               ("hepmass", "UCI HEPMASS signal events (MAF preprocessing, 21-d)"),
               ("miniboone", "UCI MiniBooNE (MAF preprocessing, 43-d)"),
               ("bsds300", "BSDS300 8x8 patches (MAF's hdf5, 63-d)")):
    _register(_n, _h)
