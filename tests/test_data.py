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
    assert set(SHARP) == {"checkerboard", "olympic_rings", "four_rings", "2spirals", "sierpinski_carpet", "fractal_tree"}
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
