"""MAF tabular sets on small synthetic files in the standard formats, against MAF's own preprocessing.

The ``_maf_*`` functions restate github.com/gpapamak/maf ``datasets/*.py`` (pandas replaced by numpy with
the same conventions: pandas ``std`` has ``ddof=1``, ``DataFrame.corr`` is Pearson).
"""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from diffflow_ext.data import DataSourceError, get_data_source


def _maf_power(data):
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    N = data.shape[0]
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)
    voltage_noise = 0.01 * rng.rand(N, 1)
    gap_noise = 0.001 * rng.rand(N, 1)
    sm_noise = rng.rand(N, 3)
    time_noise = np.zeros((N, 1))
    noise = np.hstack((gap_noise, voltage_noise, sm_noise, time_noise))
    data = data + noise
    N_test = int(0.1 * data.shape[0])
    data_test = data[-N_test:]
    data = data[0:-N_test]
    N_validate = int(0.1 * data.shape[0])
    data_validate = data[-N_validate:]
    data_train = data[0:-N_validate]
    data = np.vstack((data_train, data_validate))
    mu, s = data.mean(axis=0), data.std(axis=0)
    return (data_train - mu) / s, (data_validate - mu) / s, (data_test - mu) / s


def _check(src, ref, dims):
    assert src.kind == "tabular" and src.shape == (dims,) and src.splits == ("train", "val", "test")
    for k, r in zip(("train", "val", "test"), ref):
        np.testing.assert_allclose(src.split(k).numpy(), r, rtol=1e-12, atol=1e-12)
    # the model-space transform is a standardisation by train statistics, accounted for in log_det
    z = src.to_model(src.split("train"), dtype=torch.float64)
    np.testing.assert_allclose(z.mean(0).numpy(), 0, atol=1e-9)
    np.testing.assert_allclose(z.std(0, unbiased=False).numpy(), 1, atol=1e-9)
    assert src.log_det == pytest.approx(-np.log(ref[0].std(0)).sum())


def test_power(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(503, 8)) * np.arange(1, 9)
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", raw)
    src = get_data_source("power", data_dir=tmp_path)
    _check(src, _maf_power(raw.copy()), 6)
    assert [len(src.split(k)) for k in ("train", "val", "test")] == [408, 45, 50]
    np.save(tmp_path / "power" / "data.npy", raw[:, :7])
    with pytest.raises(DataSourceError, match="8 columns"):
        get_data_source("power", data_dir=tmp_path)


def _maf_clean_gas(names, data):
    keep = [i for i, n in enumerate(names) if n not in ("Meth", "Eth", "Time")]
    data = data[:, keep]

    def corr_numbers(d):
        return (np.corrcoef(d, rowvar=False) > 0.98).sum(axis=1)

    B = corr_numbers(data)
    while np.any(B > 1):
        data = np.delete(data, np.where(B > 1)[0][0], axis=1)
        B = corr_numbers(data)
    data = (data - data.mean(0)) / data.std(0, ddof=1)
    N_test = int(0.1 * data.shape[0])
    data_test, data_train = data[-N_test:], data[0:-N_test]
    N_validate = int(0.1 * data_train.shape[0])
    return data_train[0:-N_validate], data_train[-N_validate:], data_test


def _gas_table(n=300, seed=1):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 10))
    base[:, 3] = 2 * base[:, 2] + 1e-3 * rng.normal(size=n)  # corr > 0.98 with column 2: one is dropped
    names = ["Time", "Meth", "Eth"] + [f"s{i}" for i in range(10)]
    return names, np.hstack([rng.normal(size=(n, 3)), base])


def test_gas_csv(tmp_path):
    names, data = _gas_table()
    (tmp_path / "gas").mkdir()
    np.savetxt(tmp_path / "gas" / "ethylene_CO.csv", data, delimiter=",", header=",".join(names), comments="")
    src = get_data_source("gas", data_dir=tmp_path)
    ref = _maf_clean_gas(names, data)
    assert ref[0].shape[1] == 9  # one of the correlated pair removed
    _check(src, ref, 9)


def test_gas_pickle_needs_opt_in(tmp_path):
    (tmp_path / "gas").mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "gas" / "ethylene_CO.pickle").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataSourceError, match="allow_pickle=True"):
        get_data_source("gas", data_dir=tmp_path)
    assert not marker.exists()
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(DataSourceError, match="pandas"):
            get_data_source("gas", data_dir=tmp_path, allow_pickle=True)
        assert not marker.exists()


def _maf_hepmass(train, test):
    train = train[train[:, 0] == 1][:, 1:]
    test = test[test[:, 0] == 1][:, 1:]
    test = test[:, :-1]
    mu, s = train.mean(0), train.std(0, ddof=1)
    train, test = (train - mu) / s, (test - mu) / s
    remove = []
    for i, feature in enumerate(train.T):
        c = Counter(feature)
        max_count = np.array([v for k, v in sorted(c.items())])[0]
        if max_count > 5:
            remove.append(i)
    keep = np.array([i for i in range(train.shape[1]) if i not in remove])
    train, test = train[:, keep], test[:, keep]
    n_val = int(train.shape[0] * 0.1)
    return train[0:-n_val], train[-n_val:], test


def test_hepmass(tmp_path):
    rng = np.random.default_rng(2)
    n, f = 400, 6
    tr = np.hstack([rng.integers(0, 2, (n, 1)), rng.normal(size=(n, f))])
    tr[:40, 3] = tr[:, 3].min() - 1  # the smallest value repeats 40 times: feature 2 is dropped
    te = np.hstack([rng.integers(0, 2, (90, 1)), rng.normal(size=(90, f + 1))])  # the extra test column
    (tmp_path / "hepmass").mkdir()
    hdr = "# label," + ",".join(f"f{i}" for i in range(f))
    np.savetxt(tmp_path / "hepmass" / "1000_train.csv", tr, delimiter=",", header=hdr, comments="")
    np.savetxt(tmp_path / "hepmass" / "1000_test.csv", te, delimiter=",", header=hdr + ",mass", comments="")
    ref = _maf_hepmass(tr, te)
    assert ref[0].shape[1] == f - 1
    _check(get_data_source("hepmass", data_dir=tmp_path), ref, f - 1)
    # the same test rows with a header one name short and a trailing delimiter on every row
    lines = (tmp_path / "hepmass" / "1000_test.csv").read_text().splitlines()
    (tmp_path / "hepmass" / "1000_test.csv").write_text("\n".join([hdr] + [ln + "," for ln in lines[1:]]) + "\n")
    _check(get_data_source("hepmass", data_dir=tmp_path), ref, f - 1)


def test_miniboone(tmp_path):
    raw = np.random.default_rng(3).normal(size=(211, 5)) * 3 + 1
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", raw)
    n_test = int(0.1 * 211)
    rest = raw[:-n_test]
    n_val = int(0.1 * len(rest))
    tr, va, te = rest[:-n_val], rest[-n_val:], raw[-n_test:]
    both = np.vstack((tr, va))
    mu, s = both.mean(0), both.std(0)
    _check(get_data_source("miniboone", data_dir=tmp_path), ((tr - mu) / s, (va - mu) / s, (te - mu) / s), 5)


@pytest.mark.parametrize("fmt", ["hdf5", "npz"])
def test_bsds300(tmp_path, fmt):
    rng = np.random.default_rng(4)
    parts = {k: rng.normal(size=(n, 7)) for k, n in (("train", 50), ("validation", 10), ("test", 12))}
    (tmp_path / "BSDS300").mkdir()
    if fmt == "hdf5":
        h5py = pytest.importorskip("h5py")
        with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
            for k, v in parts.items():
                f.create_dataset(k, data=v)
    else:
        np.savez(tmp_path / "BSDS300" / "BSDS300.npz", **parts)
    _check(get_data_source("bsds300", data_dir=tmp_path), tuple(parts.values()), 7)


def test_missing_files_are_clear(tmp_path):
    for name in ("power", "gas", "hepmass", "miniboone", "bsds300"):
        with pytest.raises(DataSourceError, match="not .*found|none of"):
            get_data_source(name, data_dir=tmp_path)
        with pytest.raises(DataSourceError, match="--data-dir"):
            get_data_source(name)


def test_moved_data_folder(tmp_path):
    from diffflow_ext.data import data_source_from_state

    (tmp_path / "a" / "miniboone").mkdir(parents=True)
    np.save(tmp_path / "a" / "miniboone" / "data.npy", np.random.default_rng(5).normal(size=(100, 4)))
    st = get_data_source("miniboone", data_dir=tmp_path / "a").state()
    assert st["source"]["options"]["data_dir"] == str((tmp_path / "a").resolve())
    (tmp_path / "a").rename(tmp_path / "b")
    with pytest.raises(DataSourceError, match="is gone; pass --data-dir"):
        data_source_from_state(st)
    src = data_source_from_state(st, data_dir=tmp_path / "b")
    assert src.shape == (4,) and src.split_size("test") == 10
