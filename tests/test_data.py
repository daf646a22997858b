"""Datasets: seeded generators, exact supports, user point files, local MNIST."""

from __future__ import annotations

import gzip
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffflow_ext.data import DataFileError, load_mnist, load_points, toy2d
from diffflow_ext.data.mnist import read_idx

ALL = list(toy2d.DATASETS)
SHARP = [n for n, d in toy2d.DATASETS.items() if d.sharp]
MNIST_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"


def test_registry_names():
    assert set(ALL) == {
        "checkerboard", "olympic_rings", "four_rings", "2spirals", "8gaussians",
        "moons", "swissroll", "sierpinski_carpet", "fractal_tree",
    }
    assert set(SHARP) == {
        "checkerboard", "olympic_rings", "four_rings", "2spirals", "sierpinski_carpet", "fractal_tree",
    }
    assert toy2d.get("Checkerboard") is toy2d.DATASETS["checkerboard"]
    assert toy2d.get("tree").name == "fractal_tree"


def test_unknown_name_lists_valid_names():
    with pytest.raises(toy2d.UnknownDatasetError) as ei:
        toy2d.get("checkers")
    msg = str(ei.value)
    assert "checkers" in msg and all(n in msg for n in ALL)
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("name", ALL)
def test_shape_dtype_scale_determinism(name):
    ds = toy2d.get(name)
    x = ds.sample(3000, generator=7)
    assert x.shape == (3000, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert x.abs().max() < 1.6 and x.std(0).min() > 0.15  # about [-1, 1]
    assert torch.equal(x, ds.sample(3000, generator=7))
    assert torch.equal(x, ds.sample(3000, np.random.default_rng(7)))
    assert not torch.equal(x, ds.sample(3000, generator=8))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(ds.sample(100, g1), ds.sample(100, g2))
    assert ds.sample(5, 0, dtype=torch.float64).dtype == torch.float64
    assert ds.sample(0, 0).shape == (0, 2)
    # module-level function is the same generator
    fn = {"2spirals": "two_spirals", "8gaussians": "eight_gaussians"}.get(name, name)
    assert torch.equal(getattr(toy2d, fn)(50, 1), ds.sample(50, 1))


@pytest.mark.parametrize("name", SHARP)
def test_generated_points_are_in_support_exactly(name):
    ds = toy2d.get(name)
    x = ds.sample(20000, generator=1)
    assert ds.contains(x, tol=0.0).all()          # float32 points, zero tolerance
    assert ds.contains(x.double().numpy()).all()  # numpy input
    d = ds.distance(x)
    assert d.shape == (20000,) and d.max() <= 1e-6


@pytest.mark.parametrize("name", SHARP)
def test_support_is_not_trivial(name):
    ds = toy2d.get(name)
    u = np.random.default_rng(0).uniform(-1.2, 1.2, (20000, 2))
    frac = ds.contains(u).mean()
    assert 0.05 < frac < 0.6
    far = np.array([[5.0, 5.0], [-3.0, 0.0]])
    assert not ds.contains(far).any()
    # a Gaussian blob around the data leaks far outside
    g = np.random.default_rng(1).normal(0, 0.6, (5000, 2))
    assert ds.contains(g).mean() < 0.7


@pytest.mark.parametrize("name", SHARP)
def test_distance_is_lipschitz_and_tolerance_monotone(name):
    ds = toy2d.get(name)
    rng = np.random.default_rng(2)
    p = rng.uniform(-1.2, 1.2, (3000, 2))
    q = p + rng.normal(0, 0.01, p.shape)
    dp, dq = ds.distance(p), ds.distance(q)
    assert np.all(np.abs(dp - dq) <= np.linalg.norm(p - q, axis=1) + 1e-9)
    assert (ds.contains(p, 0.0) <= ds.contains(p, 0.05)).all()
    assert np.array_equal(ds.contains(p), dp <= ds.tol + 1e-6)


def _carpet_boxes(level):
    digits = [(i, j) for i in range(3) for j in range(3) if (i, j) != (1, 1)]
    lo = []
    for combo in itertools.product(digits, repeat=level):
        u = sum(np.array(d, float) * 3.0 ** -(k + 1) for k, d in enumerate(combo))
        lo.append(u)
    lo = 2 * np.array(lo) - 1
    return lo, lo + 2 * 3.0**-level


def test_carpet_distance_matches_union_of_cells():
    ds = toy2d.get("sierpinski_carpet")
    lo, hi = _carpet_boxes(ds.level)
    p = np.random.default_rng(3).uniform(-1.3, 1.3, (3000, 2))
    ref = toy2d._box_distance(p, lo, hi).min(1)
    np.testing.assert_allclose(ds.distance(p), ref, atol=1e-12)


@pytest.mark.parametrize("name", ["2spirals", "fractal_tree"])
def test_capsule_distance_pruning_is_exact(name):
    ds = toy2d.get(name)
    p = np.random.default_rng(4).uniform(-1.3, 1.3, (4000, 2))
    np.testing.assert_array_equal(ds.distance(p), ds._caps._brute(p))


def test_checkerboard_geometry():
    ds = toy2d.get("checkerboard")
    assert ds.contains([[-0.75, -0.75], [-0.25, -0.25], [0.75, 0.75]]).all()
    assert not ds.contains([[-0.25, -0.75], [0.25, -0.25], [1.2, 0.0]]).any()
    assert ds.distance([[1.5, 0.75]])[0] == pytest.approx(0.5)


def test_rings_geometry():
    ds = toy2d.get("four_rings")
    pts = np.array([[0.25, 0.0], [0.0, -0.5], [0.75 / math.sqrt(2)] * 2, [1.0, 0.0], [0.375, 0.0], [0.0, 0.0]])
    assert ds.contains(pts).tolist() == [True] * 4 + [False, False]
    assert ds.distance([[0.375, 0.0]])[0] == pytest.approx(0.125 - 0.03)


def test_smooth_sets_have_no_contains():
    with pytest.raises(NotImplementedError, match="smooth"):
        toy2d.get("moons").contains(np.zeros((3, 2)))


def test_contains_validates_shape():
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        toy2d.get("checkerboard").contains(np.zeros((3, 3)))


def test_bad_generator_type():
    with pytest.raises(TypeError, match="generator"):
        toy2d.get("moons").sample(3, generator="seed")


# ----------------------------------------------------------------------------- user files


def test_load_npy_and_csv_any_dim(tmp_path):
    a = np.random.default_rng(0).normal(size=(50, 3))
    np.save(tmp_path / "p.npy", a)
    x = load_points(tmp_path / "p.npy")
    assert x.shape == (50, 3) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), a, rtol=1e-6)
    np.savetxt(tmp_path / "p.csv", a, delimiter=",", header="x,y,z", comments="")
    np.testing.assert_allclose(load_points(tmp_path / "p.csv", dtype=torch.float64).numpy(), a)
    np.savetxt(tmp_path / "q.csv", a[:, :1], delimiter=",")
    assert load_points(tmp_path / "q.csv").shape == (50, 1)
    np.save(tmp_path / "i.npy", np.arange(10).reshape(5, 2))
    assert load_points(tmp_path / "i.npy").shape == (5, 2)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: np.save(p / "f.npy", np.zeros(10)), "2-D array"),
        (lambda p: np.save(p / "f.npy", np.array([[1.0, np.nan], [0, 0]])), "non-finite"),
        (lambda p: np.save(p / "f.npy", np.array([[{}], [1]], dtype=object), allow_pickle=True), "pickle"),
        (lambda p: np.save(p / "f.npy", np.array([["a", "b"]])), "numeric"),
        (lambda p: np.save(p / "f.npy", np.zeros((1, 2))), "at least"),
        (lambda p: (p / "f.csv").write_text("x,y\n1,2\n3,oops\n"), "not numeric"),
        (lambda p: (p / "f.csv").write_text("1,2\n3\n"), "different numbers of columns"),
        (lambda p: (p / "f.csv").write_text(""), "no rows"),
        (lambda p: (p / "f.json").write_text("[]"), "unsupported file type"),
        (lambda p: (p / "f.npy").write_bytes(b"\x93NUMPY garbage"), "cannot read|not a numeric"),
    ],
)
def test_load_points_errors(tmp_path, make, match):
    make(tmp_path)
    (f,) = list(tmp_path.iterdir())
    with pytest.raises(DataFileError, match=match):
        load_points(f)


def test_load_points_missing(tmp_path):
    with pytest.raises(DataFileError, match="not found"):
        load_points(tmp_path / "nope.npy")


# ----------------------------------------------------------------------------- MNIST


def test_read_idx_roundtrip_and_truncation(tmp_path):
    img = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + np.array([2, 3, 4], ">u4").tobytes() + img.tobytes()
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as fh:
        fh.write(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), img)
    (tmp_path / "t").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "t")
    (tmp_path / "bad").write_bytes(b"PK\x03\x04....")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")


def test_mnist_missing_root_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_mnist(tmp_path)


@pytest.mark.skipif(not (MNIST_ROOT / "t10k-images-idx3-ubyte.gz").exists(), reason="no local MNIST copy")
def test_mnist_local_copy():
    x, y = load_mnist(MNIST_ROOT, "test")
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (10000,) and y.min() == 0 and y.max() == 9
    assert y[:5].tolist() == [7, 2, 1, 0, 4]


# ----------------------------------------------------------------------------- data-source registry


def test_registry_lists_every_kind():
    from diffflow_ext.data import DATA_KINDS, data_source_names

    names = data_source_names()
    assert set(ALL) <= set(names)
    assert {"mnist", "cifar10", "digits"} <= set(data_source_names("image"))
    assert set(data_source_names("tabular")) == {"power", "gas", "hepmass", "miniboone", "bsds300"}
    assert DATA_KINDS == ("points", "tabular", "image")


def test_unknown_source_lists_the_names():
    from diffflow_ext.data import DataSourceError, UnknownDataSourceError, get_data_source

    with pytest.raises(UnknownDataSourceError) as ei:
        get_data_source("mnistt")
    msg = str(ei.value)
    assert "'mnistt'" in msg and "mnist" in msg and "checkerboard" in msg and "\n" not in msg
    assert isinstance(ei.value, DataSourceError) and isinstance(ei.value, ValueError)
    with pytest.raises(DataSourceError, match="do not apply to checkerboard"):
        get_data_source("checkerboard", holdout=0.2)
    with pytest.raises(DataSourceError, match="seed"):
        get_data_source("checkerboard", seed=-1)


def test_toy_source_stream_heldout_and_support():
    from diffflow_ext.data import get_data_source

    src = get_data_source("Tree", seed=4)  # aliases and case as in toy2d.get
    assert src.name == "fractal_tree" and src.kind == "points" and src.streaming and src.shape == (2,)
    ds = toy2d.get("tree")
    # the transform is the standardisation of 100k seeded points; the held-out set a fixed seeded draw
    ref = ds.sample_numpy(100_000, np.random.default_rng([4, 1]))
    np.testing.assert_allclose(src.transform.mean.numpy(), ref.mean(0))
    np.testing.assert_allclose(src.transform.std.numpy(), ref.std(0))
    np.testing.assert_array_equal(src.heldout(300).numpy(), ds.sample_numpy(300, np.random.default_rng([4, 2])))
    b = src.train_batch(64, np.random.default_rng(0), dtype=torch.float64)
    np.testing.assert_allclose(src.to_data(b).numpy(), ds.sample_numpy(64, np.random.default_rng(0)), atol=1e-12)
    assert src.contains(src.heldout(100)).all()
    assert src.log_det == pytest.approx(-np.log(ref.std(0)).sum())
    with pytest.raises(Exception, match="no exact support"):
        get_data_source("moons").contains(np.zeros((2, 2)))


def test_point_file_source_split_and_state(tmp_path):
    import json

    from diffflow_ext.data import DataSourceError, data_source_from_state, get_data_source

    a = np.random.default_rng(0).normal(size=(100, 3)) * [1, 5, 0.1]
    np.save(tmp_path / "p.npy", a)
    src = get_data_source(str(tmp_path / "p.npy"), seed=2, holdout=0.2)
    tr, te = src.split("train").numpy(), src.split("test").numpy()
    assert src.kind == "points" and len(tr) == 80 and len(te) == 20
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te]), 0), np.sort(a, 0))
    np.testing.assert_allclose(src.transform.std.numpy(), tr.std(0))  # train statistics only
    st = json.loads(json.dumps(src.state()))
    again = data_source_from_state(st)
    assert torch.equal(again.split("test"), src.split("test"))
    np.save(tmp_path / "p.npy", a + 1)
    with pytest.raises(DataSourceError, match="changed since training"):
        data_source_from_state(st)
    with pytest.raises(DataSourceError, match="not found"):
        get_data_source(str(tmp_path / "nope.csv"))
    whole = get_data_source(str(tmp_path / "p.npy"), holdout=0.0)
    assert whole.info["test_is_train"] and len(whole.split("test")) == 100


def test_legacy_checkpoint_state_is_read():
    from diffflow_ext.data import data_source_from_state

    old = {"name": "checkerboard", "seed": 3, "holdout": 0.1, "dim": 2, "kind": "toy", "mean": [0.1, 0.2],
           "std": [0.5, 0.6]}
    src = data_source_from_state(old)
    assert src.name == "checkerboard" and src.transform.std.tolist() == [0.5, 0.6]
    np.testing.assert_array_equal(src.heldout(10).numpy(),
                                  toy2d.get("checkerboard").sample_numpy(10, np.random.default_rng([3, 2])))


def test_register_a_custom_source():
    from diffflow_ext.data import DATA_SOURCES, DataSource, Standardize, get_data_source, register_data_source

    @register_data_source("unit-test-line", kind="points", help="points on a line")
    def _line(*, data_dir=None, seed: int = 0, n: int = 50):
        x = torch.linspace(-1, 1, n, dtype=torch.float64)[:, None].repeat(1, 2)
        x[:, 1] += 0.01 * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return DataSource("unit-test-line", kind="points", shape=(2,), transform=Standardize.fit(x),
                          splits={"train": x, "test": x})

    try:
        src = get_data_source("unit-test-line", n=20, seed=1)
        assert src.split_size("train") == 20
        assert src.state()["source"] == {"name": "unit-test-line", "options": {"seed": 1, "data_dir": None, "n": 20}}
        with pytest.raises(Exception, match="valid: n"):
            get_data_source("unit-test-line", m=3)
    finally:
        DATA_SOURCES.pop("unit-test-line")


def test_data_source_options():
    from diffflow_ext.data import data_source_options

    assert data_source_options("checkerboard") == []
    assert data_source_options("mnist") == ["pad_to", "val"]
    assert data_source_options("gas") == ["allow_pickle"]
    assert data_source_options("pts.csv") == ["holdout", "outliers"]


@pytest.mark.parametrize("patch, match", [
    ({"transform": {"name": "standardize", "mean": [0.0, 0.0], "std": [1.0, 0.0]}}, r"std\[1\] must be a pos"),
    ({"transform": {"name": "standardize", "mean": [0.0, float("inf")], "std": [1.0, 1.0]}}, "mean.1. must be finite"),
    ({"transform": {"name": "standardize", "mean": [0.0, 0.0], "std": ["x", 1.0]}}, "list of numbers"),
    ({"transform": {"name": "standardize", "mean": [0.0], "std": [1.0]}}, "does not fit"),
    ({"transform": {"name": "bogus"}}, "unknown transform"),
    ({"kind": "bogus"}, "kind must be one of"),
    ({"shape": [10**12]}, "shape must be"),
    ({"shape": [3]}, "do not match"),
    ({"source": {"name": 3}}, "source must be"),
    ({"sha256": {"train": 5}}, "sha256"),
])
def test_crafted_stored_state_is_refused(tmp_path, patch, match):
    from diffflow_ext.data import DataSourceError, data_source_from_state, get_data_source

    np.save(tmp_path / "p.npy", np.random.default_rng(0).normal(size=(40, 2)))
    st = {**get_data_source(str(tmp_path / "p.npy")).state(), **patch}
    with pytest.raises(DataSourceError, match=match) as ei:
        data_source_from_state(st)
    assert "\n" not in str(ei.value)


def test_changed_file_is_refused_before_it_is_parsed(tmp_path):
    from diffflow_ext.data import DataSourceError, data_source_from_state, get_data_source

    np.save(tmp_path / "p.npy", np.random.default_rng(0).normal(size=(40, 2)))
    st = get_data_source(str(tmp_path / "p.npy")).state()
    np.save(tmp_path / "p.npy", np.zeros((1, 2)))  # would fail parsing ("at least 2 points") if read
    with pytest.raises(DataSourceError, match="changed since training"):
        data_source_from_state(st)


def test_point_file_options_outliers_and_npz(tmp_path):
    from diffflow_ext.data import DataSourceError, data_source_options, get_data_source

    a = np.random.default_rng(0).normal(size=(200, 2))
    a[5, 1] = 1e30
    np.save(tmp_path / "o.npy", a)
    with pytest.raises(DataSourceError, match="outliers"):
        get_data_source(str(tmp_path / "o.npy"))
    with pytest.warns(UserWarning):
        assert get_data_source(str(tmp_path / "o.npy"), outliers="warn").kind == "points"
    with pytest.raises(DataSourceError, match="'error', 'warn' or 'ignore'"):
        get_data_source(str(tmp_path / "o.npy"), outliers="drop")
    np.savez(tmp_path / "p.npz", pts=np.random.default_rng(1).normal(size=(30, 3)))
    src = get_data_source(str(tmp_path / "p.npz"), outliers="ignore")
    assert src.kind == "points" and src.shape == (3,)
    assert data_source_options(str(tmp_path / "p.npz")) == ["holdout", "outliers"]
