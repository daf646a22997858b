"""The generated sharp 2-D family: exact membership, exact distance, exact entropy (checked by Monte Carlo)."""

import json
import math

import numpy as np
import pytest

from diffflow_ext.data import sharp2d, toy2d

# two sets of every kind: one from the tuning part, one from the held-out part
SEEDS = [s for k in range(len(sharp2d.KINDS)) for s in (k, 1000 + (k - 1000) % len(sharp2d.KINDS))]


def test_every_kind_is_covered_and_the_split_is_disjoint():
    assert {sharp2d.generate(s).kind for s in SEEDS} == set(sharp2d.KINDS)
    assert not set(sharp2d.TUNING_SEEDS) & set(sharp2d.HELDOUT_SEEDS)
    assert len(sharp2d.HELDOUT_SEEDS) >= 100


@pytest.mark.parametrize("seed", SEEDS)
def test_samples_lie_in_the_support_and_inside_the_box(seed):
    ds = sharp2d.generate(seed)
    x = ds.sample_numpy(20_000, 0)
    assert np.abs(x).max() <= 1.0
    d = ds.distance(x)
    assert d.max() <= 1e-9, d.max()
    assert ds.contains(x, tol=0.0).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_distance_is_exact_against_a_dense_sample_of_the_set(seed):
    """The exact distance is a lower bound of the distance to any point of the set, and a dense sample of the
    set comes within its spacing of it."""
    ds = sharp2d.generate(seed)
    dense = ds.sample_numpy(100_000, 1)
    q = np.random.default_rng(2).uniform(-1.1, 1.1, size=(200, 2))
    exact = ds.distance(q)
    brute = np.sqrt(((q[:, None, :] - dense[None, ::2]) ** 2).sum(-1)).min(1)  # 50k points
    assert (exact <= brute + 1e-12).all()
    assert np.max(brute - exact) < 0.03  # sample spacing (thin pieces are dense; wide ones have points at the edge)
    outside = exact > 0
    assert outside.sum() > 30


@pytest.mark.parametrize("seed", SEEDS)
def test_area_and_entropy_are_exact_against_monte_carlo(seed):
    ds = sharp2d.generate(seed)
    rng = np.random.default_rng(3)
    # area: hit fraction of uniform points in [-1, 1]^2 (the set lies inside), 5 standard errors
    n = 200_000
    u = rng.uniform(-1, 1, size=(n, 2))
    hit = ds.distance(u) == 0
    p = ds.area / 4
    assert abs(hit.mean() - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-4
    # per-piece mass: the share of samples in each piece equals its weight
    x = ds.sample_numpy(50_000, 4)
    per_piece = np.stack([piece.distance(x) == 0 for piece in ds.pieces], 1)
    assert (per_piece.sum(1) == 1).all()  # pieces are disjoint
    share = per_piece.mean(0)
    assert np.all(np.abs(share - ds.weights) < 5 * np.sqrt(ds.weights * (1 - ds.weights) / len(x)) + 1e-4)
    # entropy: -E[log p(x)] over samples equals the closed form
    lp = ds.log_density(x)
    assert np.isfinite(lp).all()
    assert abs(-lp.mean() - ds.entropy) < 5 * lp.std() / math.sqrt(len(x)) + 1e-9
    # and the density integrates to one over the support (area-weighted MC of p)
    lu = ds.log_density(u)
    integral = 4 * np.where(np.isfinite(lu), np.exp(lu), 0.0).mean()
    assert abs(integral - 1.0) < 0.03


def test_piece_areas_match_their_closed_forms():
    sq = sharp2d.Polygon(np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=float))
    assert sq.area == pytest.approx(1.0)
    ring = sharp2d.AnnulusSector(np.zeros(2), 0.5, 1.0, 0.3, math.pi / 2)
    assert ring.area == pytest.approx(math.pi / 4 * 0.75)
    rng = np.random.default_rng(5)
    u = rng.uniform(-1, 1, size=(400_000, 2))
    assert 4 * (ring.distance(u) == 0).mean() == pytest.approx(ring.area, abs=0.01)
    # a point beside the sector's straight edge is at its perpendicular distance from it
    p = np.array([[0.75 * math.cos(0.3) + 0.1 * math.sin(0.3), 0.75 * math.sin(0.3) - 0.1 * math.cos(0.3)]])
    assert ring.distance(p)[0] == pytest.approx(0.1, abs=1e-12)


def test_generation_is_deterministic_and_reachable_by_name():
    a, b = sharp2d.generate(1003), toy2d.get("sharp_1003")
    assert a.name == b.name == "sharp_1003"
    np.testing.assert_array_equal(a.sample_numpy(100, 7), b.sample_numpy(100, 7))
    assert sharp2d.generate(1004).entropy != a.entropy
    with pytest.raises(ValueError, match="seed"):
        sharp2d.generate(-1)


def test_most_sets_are_not_separable_in_the_coordinates():
    """A product of the two marginals puts a large share of its mass outside the support (no stripes trick)."""
    outside = []
    for s in sharp2d.HELDOUT_SEEDS[:12]:
        ds = sharp2d.generate(s)
        x = ds.sample_numpy(20_000, 0)
        prod = np.stack([x[:, 0], np.random.default_rng(1).permutation(x[:, 1])], 1)
        outside.append(1 - ds.contains(prod).mean())
    assert np.median(outside) > 0.3


@pytest.mark.parametrize("name", ["checkerboard", "four_rings", "sierpinski_carpet"])
def test_builtin_entropies_are_the_log_of_the_support_area(name):
    """These built-ins are uniform on their support, so entropy = log(area); area by Monte Carlo in [-1.1, 1.1]^2."""
    ds = toy2d.get(name)
    u = np.random.default_rng(6).uniform(-1.1, 1.1, size=(400_000, 2))
    p = math.exp(ds.entropy) / 4.84
    hit = (ds.distance(u) == 0).mean()
    assert abs(hit - p) < 5 * math.sqrt(p * (1 - p) / len(u))
    assert toy2d.get("olympic_rings").entropy is None  # overlapping rings: no closed form


@pytest.mark.slow
def test_short_default_training_on_a_generated_set_lands_most_samples_inside(tmp_path):
    """The issue-8 scenario in small: a .npy file of a generated (tuning) set, the 'points' defaults, fewer
    iterations (600 instead of the default count; ~1 CPU-minute). Untrained, about 20% of samples land inside
    this set of rotated boxes (sharp_0); the old defaults (g 0.2, lr 5e-3) measured 82% at 500 iterations
    (docs/quality_2d.md), the session-13 ones 85-91% on other tuning sets at 800; the current ones (trained Fourier
    features of x, backward-SDE samples) measured 91.4% here (session 15), so > 85% leaves room for platform
    round-off while the stripe solution (~50%) or an untrained model (~20%) fail."""
    from diffflow_ext.training import train
    from diffflow_ext.training.config import resolve_config

    ds = sharp2d.generate(0)
    path = tmp_path / "points.npy"
    np.save(path, ds.sample_numpy(20_000, 0).astype(np.float32))
    torch_threads = __import__("torch").get_num_threads()
    __import__("torch").set_num_threads(1)
    try:
        cfg = resolve_config("points", {"data": str(path), "out": str(tmp_path / "run"), "iters": 600,
                                        "final_ode": 0, "final_samples": 4000, "eval_every": 0})
        train(cfg, progress=False, pictures=False, log=lambda s: None)
    finally:
        __import__("torch").set_num_threads(torch_threads)
    samples = np.load(tmp_path / "run" / "samples.npy")
    inside = ds.contains(samples).mean()
    assert inside > 0.85, inside


def test_generated_sets_are_data_sources_for_train_sample_and_eval(tmp_path, capsys):
    """``diffflow train sharp_N`` (any seed, registered on first use), then ``sample`` and ``eval`` of that run in
    a registry that has never seen the name (as in a new process); unknown names still fail with the list."""
    from diffflow_ext.cli import main
    from diffflow_ext.data import base, get_data_source

    src = get_data_source("SHARP_1003")
    ds = sharp2d.generate(1003)
    x = src.heldout(500).numpy()
    assert src.kind == "points" and src.name == "sharp_1003" and ds.contains(x).all()
    assert "sharp_1003" not in base.data_source_names()  # the family is listed once, as sharp_SEED
    with pytest.raises(base.UnknownDataSourceError, match="sharp_SEED"):
        get_data_source("sharp_12x")
    out = tmp_path / "run"
    tiny = ["--iters", "3", "--batch-size", "64", "--hidden", "8", "--depth", "1", "-N", "3", "--final-samples",
            "300", "--final-ode", "20", "--eval-every", "0", "--no-progress"]
    assert main(["train", "sharp_1003", "--out", str(out), *tiny]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert 0 <= saved["fraction_in_support"] <= 1 and saved["fraction_in_support_heldout"] == 1.0
    for key in ("sharp_1003",):
        base.DATA_SOURCES.pop(key)
        base._GENERATED.discard(key)
    capsys.readouterr()
    assert main(["eval", str(out), "--n-samples", "300", "--n-ode", "0", "--n-nll", "50"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["data"] == "sharp_1003" and 0 <= res["fraction_in_support"] <= 1
    assert main(["sample", str(out), "-n", "50", "--out", str(tmp_path / "s.npy"), "--png", "none"]) == 0
    assert np.load(tmp_path / "s.npy").shape == (50, 2)


# the smooth built-ins (Gaussian noise around a curve): no support, but an exact density, so an exact entropy
SMOOTH_BOXES = {"8gaussians": (1.3, 1.3), "moons": (1.25, 0.8), "swissroll": (1.2, 1.2)}


@pytest.mark.parametrize("name", sorted(SMOOTH_BOXES))
def test_smooth_log_density_is_normalised_and_converged(name):
    ds = toy2d.get(name)
    hx, hy = SMOOTH_BOXES[name]
    assert np.abs(ds.sample_numpy(20_000, 3)).max(0).tolist() < [hx - 0.05, hy - 0.05]  # the box holds the mass
    u = np.random.default_rng(0).uniform([-hx, -hy], [hx, hy], size=(30_000, 2))
    p = np.exp(ds.log_density(u)) * (4 * hx * hy)
    assert abs(p.mean() - 1) < 5 * p.std() / np.sqrt(len(p)) + 1e-3
    x = ds.sample_numpy(300, 1)
    if name == "8gaussians":  # closed form
        c = 0.8 * np.exp(1j * np.arange(8) * np.pi / 4)
        d2 = np.abs((x[:, 0] + 1j * x[:, 1])[:, None] - c[None]) ** 2
        ref = np.log(np.exp(-d2 / 0.02).mean(1) / (2 * np.pi * 0.01))
    else:  # quadrature with 4x the nodes
        ref = ds.log_density(x, nodes=4 * ds.log_density.__defaults__[0])
    assert np.abs(ds.log_density(x) - ref).max() < 1e-4
