"""benchmarks/tune_2d.py: its command line refuses bad input in one line, and its tuning-only analogue sets are
exact (membership, distance, entropy)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
tune_2d = pytest.importorskip("tune_2d")


def test_no_arguments_is_one_line_error_not_a_traceback():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_2d.py")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "name, sets, iters" in lines[0], r.stderr


@pytest.mark.parametrize("argv, names", [
    (["x", "sharp_8", "0"], "ITERS"),
    (["x", "sharp_8", "ten"], "ITERS"),
    (["x", "sharp_1003", "10"], "held-out"),
    (["x", "sierpinski_carpet", "10"], "fine_grid"),
    (["x", "fractal_tree", "10"], "thin_tree"),
    (["x", "moons", "10"], "no sharp support"),
    (["x", "nope", "10"], "unknown dataset"),
    (["x", "sharp_8", "10", "{bad"], "not valid JSON"),
    (["x", "sharp_8", "10", "[1]"], "JSON object"),
    (["x", "sharp_8", "10", '{"foo": 1}'], "unknown field 'foo'"),
    (["x", "sharp_8", "10", '{"lr": -1}'], "lr"),
])
def test_bad_arguments_name_what_was_wrong(argv, names, capsys):
    with pytest.raises(SystemExit) as e:
        tune_2d.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0], err


def test_good_arguments_parse():
    a = tune_2d.parse_args(["x", "sharp_8,fine_grid,thin_tree,checkerboard", "5", '{"batch_size": 512, "_fs": 2}'])
    assert [d.name for d in a.datasets] == ["sharp_8", "fine_grid", "thin_tree", "checkerboard"]
    assert a.iters == 5 and a.opts == {"batch_size": 512} and a.scale == {"_fs": 2.0}


def test_fine_grid_membership_distance_and_entropy_are_exact():
    ds = tune_2d.FineGrid()
    x = ds.sample_numpy(50_000, 0)
    assert np.abs(x).max() <= 1 and (ds.distance(x) == 0).all()
    # the support's area is 4 (14/16)^3: a uniform sample of the square lands inside with that probability
    u = np.random.default_rng(1).uniform(-1, 1, (200_000, 2))
    p, se = ds.contains(u).mean(), np.sqrt(0.67 * 0.33 / 200_000)
    assert abs(p - (14 / 16) ** 3) < 5 * se
    assert ds.entropy == pytest.approx(np.log(4 * (14 / 16) ** 3))
    # the distance is a lower bound of the distance to a dense sample, and within its spacing
    q = np.random.default_rng(2).uniform(-1.05, 1.05, (200, 2))
    brute = np.sqrt(((q[:, None] - x[None, ::2]) ** 2).sum(-1)).min(1)
    exact = ds.distance(q)
    assert (exact <= brute + 1e-12).all() and np.abs(exact - brute).max() < 0.02


def test_thin_tree_samples_are_inside():
    ds = tune_2d.ThinTree()
    x = ds.sample_numpy(5000, 0)
    assert ds.contains(x, tol=0.0).all() and np.abs(x).max() <= 1
