"""Data-space likelihoods (bits/dim done right) against known answers; the evaluation report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffflow_ext import DiffFlow, NLLBound, TimeMLP
from diffflow_ext.data import DataSource, ImageSource, Standardize, get_data_source
from diffflow_ext.evaluation import batch_seed, bits_per_dim, data_nll, evaluate_model, sample_model, sampling_seed

LN2 = math.log(2)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _StandIn(nn.Module):
    """A model with a known density in model space (both estimators return it exactly)."""

    def __init__(self, shape, kind: str):
        super().__init__()
        self.data_shape, self.kind = tuple(shape), kind
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))  # device / dtype of the inputs

    def _nll(self, z):
        z = z.reshape(len(z), -1).double()
        D = z.shape[1]
        if self.kind == "uniform":  # uniform on [-1, 1]^D
            assert (z.abs() <= 1).all()
            return torch.full((len(z),), D * math.log(2.0), dtype=torch.float64)
        return 0.5 * (z**2).sum(1) + 0.5 * D * math.log(2 * math.pi)  # standard normal

    def nll_bound(self, z, generator=None, num_steps=None):
        nats = self._nll(z)
        return NLLBound(nats, nats / (z[0].numel() * LN2))

    def log_prob(self, z, generator=None, **kw):
        return -self._nll(z)


def _uniform_images(n, shape, levels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (n, *shape), generator=g, dtype=torch.uint8)


def _image_source(x, levels):
    return ImageSource("test-images", splits={"train": x, "test": x}, levels=levels)


@pytest.mark.parametrize("levels", [256, 17, 2])
@pytest.mark.parametrize("bound", ["elbo", "ode"])
def test_uniform_model_scores_exactly_log2_levels(levels, bound):
    src = _image_source(_uniform_images(40, (1, 4, 4), levels), levels)
    r = bits_per_dim(_StandIn((1, 4, 4), "uniform"), src, bound=bound, draws=2)
    assert r.bits_per_dim == pytest.approx(math.log2(levels), abs=1e-12)
    assert r.model_bits_per_dim == pytest.approx(1.0, abs=1e-12)  # uniform on [-1, 1]: 1 bit per dimension
    assert r.offset_bits_per_dim == pytest.approx(math.log2(levels / 2), abs=1e-12)  # +7 for 256 levels
    assert r.levels == levels and r.n == 40 and r.draws == 2 and r.bits_per_dim_se == pytest.approx(0, abs=1e-12)
    assert f"{levels} grey levels" in r.describe()


def test_gaussian_model_matches_the_analytic_expectation():
    """E_u[nll_data] for a standard normal in model space, z = -1 + 2 (x + u) / K:
    per pixel 0.5 (m^2 + (2/K)^2 / 12) + 0.5 log(2 pi) + log(K / 2), m = -1 + 2 (x + 1/2) / K."""
    K, shape = 256, (3, 2, 2)
    x = _uniform_images(30, shape, K, seed=1)
    src = _image_source(x, K)
    nll = data_nll(_StandIn(shape, "gauss"), src, x, draws=400, seed=3)
    m = -1 + 2 * (x.double() + 0.5) / K
    ref = (0.5 * (m**2 + (2 / K) ** 2 / 12) + 0.5 * math.log(2 * math.pi) + math.log(K / 2)).flatten(1).sum(1)
    se = nll.std(1) / math.sqrt(400)
    assert ((nll.mean(1) - ref).abs() < 4 * se + 1e-9).all()
    # one draw is an exact function of the dequantisation noise, reproducible from the seed
    assert torch.equal(data_nll(_StandIn(shape, "gauss"), src, x, draws=2, seed=3), nll[:, :2])


def test_points_report_data_space_nll_exactly():
    """A standard normal in standardised space is N(mean, diag(std^2)) in data space."""
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(0)
    pts = rng.normal([3.0, -1.0, 0.5], [10.0, 0.1, 2.0], size=(200, 3))
    t = Standardize.fit(pts)
    src = DataSource("pts", kind="points", shape=(3,), transform=t,
                     splits={"train": torch.from_numpy(pts), "test": torch.from_numpy(pts[:50])})
    nll = data_nll(_StandIn((3,), "gauss"), src, src.heldout())[:, 0]
    ref = -multivariate_normal(t.mean.numpy(), np.diag(t.std.numpy() ** 2)).logpdf(pts[:50])
    np.testing.assert_allclose(nll.numpy(), ref, rtol=1e-10)
    r = bits_per_dim(_StandIn((3,), "gauss"), src)
    assert r.levels is None and r.bits_per_dim == pytest.approx(ref.mean() / (3 * LN2), rel=1e-10)
    assert r.offset_bits_per_dim == pytest.approx(np.log(t.std.numpy()).sum() / (3 * LN2))


def _flat_diffflow(shape, **kw):
    D = math.prod(shape)
    return DiffFlow(TimeMLP(D, 64, 2), TimeMLP(D, 64, 2), shape, num_steps=kw.pop("num_steps", 10),
                    gradient="autograd", **kw)


def test_no_model_beats_8_bits_on_uniform_random_bytes():
    """Uniformly random 8-bit images have entropy 8 bits/dim: a trained DiffFlow's data-space figures (an upper
    bound on its discrete NLL) cannot go below it, while its model-space figure is ~7 bits lower."""
    torch.manual_seed(0)
    shape = (1, 4, 4)
    x = _uniform_images(4000, shape, 256, seed=2)
    src = ImageSource("u8", splits={"train": x[:3000], "test": x[3000:3400]}, levels=256)
    model = _flat_diffflow(shape)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(150):
        opt.zero_grad()
        model.loss(src.train_batch(256, rng), gen).backward()
        opt.step()
    elbo = bits_per_dim(model, src, draws=2, seed=0)
    ode = bits_per_dim(model, src, n=60, bound="ode", draws=1, seed=0)
    for r in (elbo, ode):
        assert r.bits_per_dim >= 8.0 - 3 * r.bits_per_dim_se, r.describe()
        assert r.bits_per_dim < 8.6, r.describe()  # the model learned something close to uniform
        assert r.model_bits_per_dim == pytest.approx(r.bits_per_dim - 7.0)


def test_bits_per_dim_validates_arguments():
    src = get_data_source("digits")
    m = _StandIn((1, 8, 8), "gauss")
    with pytest.raises(ValueError, match="bound"):
        bits_per_dim(m, src, bound="exact")
    with pytest.raises(ValueError, match="draws"):
        bits_per_dim(m, src, draws=0)
    with pytest.raises(ValueError, match="only to bound='ode'"):
        data_nll(m, src, src.heldout(2), rtol=1e-3)


# ----------------------------------------------------------------------------- report


def test_sample_batches_are_independent_of_the_split():
    torch.manual_seed(0)
    m = _flat_diffflow((2,), num_steps=4)
    full = sample_model(m, 23, seed=5, batch_size=5)
    assert full.shape == (23, 2)
    ranks = [sample_model(m, 23, seed=5, batch_size=5, batches=range(r, 5, 2)) for r in range(2)]
    order = [*range(0, 5, 2), *range(1, 5, 2)]
    pieces = dict(zip(order, torch.cat(ranks).split([5 if i < 4 else 3 for i in order])))
    assert torch.equal(torch.cat([pieces[i] for i in range(5)]), full)
    assert batch_seed(5, 0) != batch_seed(5, 1) != batch_seed(6, 0)
    with pytest.raises(ValueError, match="out of range"):
        sample_model(m, 23, batch_size=5, batches=[5])


def test_evaluate_model_on_a_toy_is_deterministic_and_complete():
    torch.manual_seed(0)
    src = get_data_source("checkerboard")
    m = _flat_diffflow((2,), num_steps=5)
    kw = dict(n_heldout=500, n_samples=300, n_nll=200, n_ode=20, n_ot=200, seed=3)
    a, s = evaluate_model(m, src, return_samples=True, **kw)
    b = evaluate_model(m, src, **kw)
    assert a == b
    for k in ("nelbo_nats", "nelbo_bits_per_dim", "ode_nll_nats", "ode_bits_per_dim", "sliced_wasserstein",
              "w2_emd", "fraction_in_support", "fraction_in_support_heldout"):
        assert isinstance(a[k], float) and math.isfinite(a[k]), k
    assert a["fraction_in_support_heldout"] == 1.0 and 0 < a["fraction_in_support"] < 1
    assert s.shape == (300, 2) and s.dtype == np.float64
    # samples drawn elsewhere with the same seeds give the same report
    z = sample_model(m, 300, seed=sampling_seed(3), batch_size=500)
    assert evaluate_model(m, src, samples=z, **kw) == a


def test_evaluate_model_on_images_states_levels_and_offset():
    torch.manual_seed(0)
    src = get_data_source("digits")
    m = _flat_diffflow((1, 8, 8), num_steps=4)
    res, s = evaluate_model(m, src, n_samples=16, n_nll=40, n_ode=0, return_samples=True, fid=False)
    assert res["levels"] == 17 and res["bpd_offset"] == pytest.approx(math.log2(8.5))
    assert res["bpd_draws"] == 3 and res["nelbo_n"] == 40 and res["split"] == "test"
    assert res["nelbo_bits_per_dim"] > math.log2(17)
    assert s.shape == (16, 1, 8, 8) and s.dtype == np.uint8 and s.max() <= 16
    assert "fid" not in res


def test_legacy_metrics_call_still_works():
    from diffflow_ext.metrics import evaluate_model as legacy

    class Std:
        mean, std = np.zeros(2), np.ones(2)

    torch.manual_seed(0)
    m = _flat_diffflow((2,), num_steps=4)
    ds = get_data_source("checkerboard")
    res = legacy(m, Std(), ds.heldout(300).numpy(), dataset=ds.support, n_samples=200, n_nll=100, ode=False)
    assert res["n_heldout"] == 300 and "fraction_in_support" in res and "nelbo_nats" in res


# ----------------------------------------------------------------------------- pictures


def test_tile_images_places_every_image():
    from diffflow_ext.plotting import _unit, tile_images

    x = torch.arange(5 * 2 * 3, dtype=torch.float64).reshape(5, 1, 2, 3) / 29
    t = tile_images(x.numpy(), nrow=2, pad=1)
    assert t.shape == (3 * 3 + 1, 2 * 4 + 1, 1)
    for k in range(5):
        r, c = divmod(k, 2)
        np.testing.assert_array_equal(t[1 + 3 * r:3 + 3 * r, 1 + 4 * c:4 + 4 * c, 0], x[k, 0].numpy())
    assert (t[7:9, 5:8] == 1.0).all()  # the empty sixth cell is background
    d = torch.tensor([[[[0, 16]]]], dtype=torch.uint8)
    np.testing.assert_allclose(_unit(d, 17)[0, 0, 0], [0.0, 1.0])  # 17 grey levels: 16 is white


def test_image_pictures_are_written(tmp_path):
    from diffflow_ext import plotting

    src = get_data_source("digits")
    p = plotting.sample_grid(src.heldout(30), tmp_path / "g.png", title="digits", levels=17)
    assert p.stat().st_size > 1000
    with pytest.raises(ValueError, match="C, H, W"):
        plotting.sample_grid(torch.zeros(3, 2, 4, 4, dtype=torch.uint8), tmp_path / "bad.png")
    torch.manual_seed(0)
    m = _flat_diffflow((1, 8, 8), num_steps=4)
    q = plotting.trajectory_strip(m, src.to_model(src.heldout(3)), tmp_path / "s.png", to_unit=src.transform.to_unit,
                                  columns=4)
    assert q.stat().st_size > 1000


def test_a_failing_metric_is_reported_unavailable():
    from diffflow_ext.evaluation.report import _metric

    out: dict = {}
    _metric(out, "ok", lambda: 1.5)

    def singular():
        raise np.linalg.LinAlgError("Singular matrix")

    _metric(out, "w2_emd", singular)
    _metric(out, "swd", lambda: float("nan"))
    assert out["ok"] == 1.5 and out["w2_emd"] is None and out["swd"] is None
    assert "Singular" in out["unavailable"]["w2_emd"] and "non-finite" in out["unavailable"]["swd"]


def test_eval_of_an_image_run_recomputes_metrics_json(tmp_path, capsys):
    import json

    from diffflow_ext.cli import main

    out = tmp_path / "run"
    rc = main(["train", "digits", "--iters", "2", "--out", str(out), "--no-progress", "-b", "16",
               "--final-samples", "24", "--final-ode", "0", "--eval-every", "0"])
    assert rc == 0
    saved = json.loads((out / "metrics.json").read_text())
    saved.pop("training")
    assert saved["levels"] == 17 and saved["data_kind"] == "image" and saved["nelbo_n"] == 360
    capsys.readouterr()
    assert main(["eval", str(out), "--n-samples", "24", "--n-ode", "0"]) == 0
    again = json.loads(capsys.readouterr().out)
    for k in ("nelbo_bits_per_dim", "nelbo_bits_per_dim_se", "bpd_offset", "levels", "fraction_finite"):
        assert again[k] == saved[k], k


def test_samplers_without_lambda_and_undecodable_titles(tmp_path):
    from diffflow_ext import plotting

    torch.manual_seed(0)
    m = _flat_diffflow((2,), num_steps=4)
    z = sample_model(m, 10, lam=None, method="heun", seed=1, batch_size=5)
    assert z.shape == (10, 2) and torch.isfinite(z).all()
    res = evaluate_model(m, get_data_source("checkerboard"), n_heldout=200, n_samples=50, n_nll=20, ode=False,
                         lam=None, method="heun")
    assert res["lam"] is None and res["sampler"] == "heun"
    assert plotting.plot_points(z, tmp_path / "p.png", title="d\udcff.npy: step 2").is_file()


def test_sample_distances_refuse_non_finite_points():
    """A distance of samples holding NaN/inf is no number: a clear error, never a NaN result."""
    from diffflow_ext.evaluation import sliced_wasserstein, wasserstein2_emd

    a = np.random.default_rng(0).normal(size=(200, 2))
    assert sliced_wasserstein(a, a) == pytest.approx(0.0, abs=1e-12)
    for bad_value in (np.nan, np.inf):
        b = a.copy()
        b[7, 1] = bad_value
        for fn in (sliced_wasserstein, wasserstein2_emd):
            with pytest.raises(ValueError, match="1 of 200 points are not finite"):
                fn(b, a)
