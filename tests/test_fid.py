"""FID plumbing: weights resolution and safe loading, statistics against a scipy reference, a stand-in extractor,
and (slow) torch-fidelity's InceptionV3 with randomly initialised weights written to a local file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffflow_ext.evaluation import FID_ENV, FIDError, compute_fid, evaluate_model, fid_from_features
from diffflow_ext.evaluation.fid import extract_features, inception_extractor, resolve_fid_weights

pytest.importorskip("torch_fidelity")


def _pool_features(x: torch.Tensor) -> torch.Tensor:
    """A small stand-in for Inception: 2x2 average-pooled pixels of a (B, 3, H, W) uint8 batch."""
    assert x.dtype == torch.uint8 and x.shape[1] == 3
    return torch.nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1)


def _images(n, seed, shape=(1, 8, 8), shift=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, *shape), generator=g)
    return (x + shift).clamp(0, 255).to(torch.uint8)


def test_missing_weights_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.delenv(FID_ENV, raising=False)
    with pytest.raises(FIDError) as ei:
        resolve_fid_weights(None)
    msg = str(ei.value)
    assert "--fid-weights" in msg and FID_ENV in msg and "\n" not in msg
    with pytest.raises(FIDError, match="--fid-weights .*nope.pth: no such file"):
        resolve_fid_weights(tmp_path / "nope.pth")
    monkeypatch.setenv(FID_ENV, str(tmp_path / "gone.pth"))
    with pytest.raises(FIDError, match=f"{FID_ENV} .*gone.pth: no such file"):
        resolve_fid_weights(None)
    (tmp_path / "w.pth").write_bytes(b"x")
    monkeypatch.setenv(FID_ENV, str(tmp_path / "w.pth"))
    assert resolve_fid_weights(None) == tmp_path / "w.pth"
    assert resolve_fid_weights(tmp_path / "w.pth") == tmp_path / "w.pth"


def test_weights_files_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"fc.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(FIDError, match="not a readable Inception weights file"):
        inception_extractor(tmp_path / "evil.pth")
    assert not marker.exists()
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 64)
    with pytest.raises(FIDError, match="not a readable"):
        inception_extractor(tmp_path / "junk.pth")
    torch.save({"w": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(FIDError, match="not torch-fidelity's InceptionV3 weights"):
        inception_extractor(tmp_path / "other.pth")


def test_fid_statistics_match_scipy_reference():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 5))
    b = rng.normal(size=(250, 5)) @ np.diag([1.0, 2.0, 0.5, 1.0, 1.5]) + 0.3
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert fid_from_features(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(ref, rel=1e-8)


def test_compute_fid_with_a_stand_in_extractor():
    x = _images(200, 0)
    same = compute_fid(x, x.clone(), extractor=_pool_features, reference_split="test")
    assert abs(same["fid"]) < 1e-3  # vs traces of ~1e4: round-off of the eigenvalue square roots
    assert same["fid_n_samples"] == 200 and same["fid_n_reference"] == 200 and same["fid_reference_split"] == "test"
    fids = [compute_fid(_images(200, 1, shift=s), x, extractor=_pool_features)["fid"] for s in (0, 10, 30)]
    assert 0 < fids[0] < fids[1] < fids[2]
    # a pure shift by s moves the mean of every (4-pixel average) feature by s: FID >= 12 features * s^2
    assert fids[2] > 12 * 30**2 * 0.9
    rgb = _images(10, 2, shape=(3, 8, 8))
    assert extract_features(rgb, _pool_features).shape == (10, 12)
    with pytest.raises(ValueError, match="uint8"):
        extract_features(rgb.float(), _pool_features)


def test_evaluate_model_reports_fid_with_its_provenance():
    from diffflow_ext import DiffFlow, TimeMLP
    from diffflow_ext.data import get_data_source

    torch.manual_seed(0)
    src = get_data_source("digits")
    m = DiffFlow(TimeMLP(64, 32, 1), TimeMLP(64, 32, 1), (1, 8, 8), num_steps=3)
    res = evaluate_model(m, src, n_samples=50, n_nll=0, ode=False, fid_extractor=_pool_features)
    assert math.isfinite(res["fid"]) and res["fid"] > 0
    assert res["fid_n_samples"] == 50 and res["fid_n_reference"] == 360 and res["fid_reference_split"] == "test"
    with pytest.raises(FIDError, match="--fid-weights"):
        evaluate_model(m, src, n_samples=10, n_nll=0, ode=False, fid=True, fid_weights=Path("/nonexistent.pth"))


@pytest.mark.slow
def test_inception_plumbing_with_random_weights(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as mp:  # build the architecture without any weights, then save its random init
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        calls = []
        real = extract_features

        def spy(images, extractor, **kw):
            f = real(images, extractor, **kw)
            calls.append(f)
            return f

        mp = pytest.MonkeyPatch()
        mp.setattr("diffflow_ext.evaluation.fid.extract_features", spy)
        try:
            res = compute_fid(_images(2, 3), _images(2, 4), weights=tmp_path / "inception.pth", batch_size=2)
        finally:
            mp.undo()
    finally:
        torch.set_num_threads(threads)
    assert math.isfinite(res["fid"]) and res["fid_features"].startswith("inception")
    assert [tuple(f.shape) for f in calls] == [(2, 2048), (2, 2048)] and all(torch.isfinite(f).all() for f in calls)


def test_reference_statistics_are_cached_and_the_reference_split_is_chosen():
    from diffflow_ext import DiffFlow, TimeMLP
    from diffflow_ext.data import get_data_source

    seen = []

    def counting(x):
        seen.append(len(x))
        return _pool_features(x)

    ref = _images(50, 7)
    a = compute_fid(_images(20, 8), ref, extractor=counting, batch_size=100)
    b = compute_fid(_images(20, 8), ref.clone(), extractor=counting, batch_size=100)
    assert a == b and seen == [50, 20, 20]  # the reference's features were extracted once
    torch.manual_seed(0)
    src = get_data_source("digits")
    m = DiffFlow(TimeMLP(64, 32, 1), TimeMLP(64, 32, 1), (1, 8, 8), num_steps=3)
    res = evaluate_model(m, src, n_samples=20, n_nll=0, ode=False, fid_extractor=_pool_features,
                         fid_reference="train", fid_n_reference=500)
    assert res["fid_reference_split"] == "train" and res["fid_n_reference"] == 500
