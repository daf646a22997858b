"""The training loop on every kind of data source: images (the 8x8 digits, a .npz of uint8 images) and
higher-dimensional vectors, with their outputs (metrics, samples, pictures) and exact resume.

Tiny budgets (an MLP, N=4, a few dozen steps); about 10 s in all on a quiet machine.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffflow_ext.checkpoint import load_checkpoint
from diffflow_ext.data import get_data_source
from diffflow_ext.evaluation import evaluate_model
from diffflow_ext.training import TrainConfig, train
from diffflow_ext.training.loop import build_model

IMG = dict(hidden=64, depth=2, num_steps=4, progressive=None, batch_size=64, lr=5e-3, lr_decay=1.0, ema=0.0,
           eval_every=0, final_ode=0, final_samples=64, seed=0)


def _quiet(**kw):
    return dict(progress=False, log=lambda s: None, **kw)


def test_short_image_training_lowers_the_bound_and_writes_image_outputs(tmp_path):
    src = get_data_source("digits")
    cfg = TrainConfig(data="digits", iters=60, out=str(tmp_path / "d"), **IMG)
    before = evaluate_model(build_model(cfg, src.shape, torch.device("cpu")).eval(), src, n_nll=180, ode=False,
                            n_samples=8, draws=1, seed=0)["nelbo_bits_per_dim"]
    s = train(cfg, source=src, **_quiet())
    m = s["metrics"]
    assert m["levels"] == 17 and m["data_kind"] == "image"
    # 60 steps lower the test-split bound clearly (measured: 4.87 -> 4.62 bits/dim; a bound on 17 grey
    # levels is positive)
    assert 0 < m["nelbo_bits_per_dim"] < before - 0.15, (before, m["nelbo_bits_per_dim"])
    samples = np.load(tmp_path / "d" / "samples.npy")
    assert samples.dtype == np.uint8 and samples.shape == (64, 1, 8, 8) and samples.max() <= 16
    for name in ("samples.png", "trajectories.png", "metrics.json", "log.jsonl"):
        assert (tmp_path / "d" / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["training"]["step"] == 60


def test_image_run_resumes_exactly(tmp_path):
    """Dequantisation noise and batch indices come from the checkpointed data stream: 3 + 3 steps == 6 steps."""
    kw = dict(IMG, data="digits")
    full = train(TrainConfig(**kw, iters=6, out=str(tmp_path / "full")), final_eval=False, **_quiet())
    train(TrainConfig(**kw, iters=3, out=str(tmp_path / "part")), final_eval=False, **_quiet())
    res = train(TrainConfig(**kw, iters=6, out=str(tmp_path / "part")), resume=str(tmp_path / "part"),
                final_eval=False, **_quiet())
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(res["checkpoint"])
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k


def test_npz_images_and_vector_files_train(tmp_path):
    rng = np.random.default_rng(0)
    imgs = (rng.random((120, 6, 6, 1)) * 256).astype(np.uint8)  # NHWC, 256 levels
    np.savez(tmp_path / "imgs.npz", images=imgs)
    s = train(TrainConfig(data=str(tmp_path / "imgs.npz"), iters=3, out=str(tmp_path / "i"), **IMG), **_quiet())
    assert s["metrics"]["levels"] == 256 and np.load(tmp_path / "i" / "samples.npy").shape == (64, 1, 6, 6)
    pts = rng.normal(size=(300, 5)) * [1, 2, 3, 4, 5]
    np.save(tmp_path / "pts.npy", pts)
    s = train(TrainConfig(data=str(tmp_path / "pts.npy"), iters=3, out=str(tmp_path / "p"), **IMG), **_quiet())
    assert s["metrics"]["dim"] == 5 and np.load(tmp_path / "p" / "samples.npy").shape == (64, 5)
    assert (tmp_path / "p" / "samples.png").exists()
    np.save(tmp_path / "one.npy", rng.normal(size=(300, 1)))  # 1-D data: pictures too
    s = train(TrainConfig(data=str(tmp_path / "one.npy"), iters=2, out=str(tmp_path / "o"), **IMG), **_quiet())
    assert s["metrics"]["dim"] == 1 and (tmp_path / "o" / "samples.png").exists()


@pytest.mark.parametrize("data", ["digits", "checkerboard"])
def test_batches_are_drawn_on_the_training_device_in_model_space(data):
    """The loop's batch: model space, the requested dtype, shape (B, *source.shape)."""
    src = get_data_source(data)
    x = src.train_batch(16, np.random.default_rng(0), device=torch.device("cpu"), dtype=torch.float64)
    assert x.dtype == torch.float64 and tuple(x.shape) == (16, *src.shape)
    if data == "digits":
        assert float(x.min()) >= -1 and float(x.max()) <= 1


def test_periodic_evaluation_watches_the_validation_split(tmp_path):
    """Curves that users pick iterations or early stopping from are drawn on the validation split where the
    source has one (digits: 180 validation images); the final metrics stay on the test split."""
    kw = dict(IMG, data="digits", eval_every=2, eval_samples=16)
    s = train(TrainConfig(**kw, iters=3, out=str(tmp_path / "v")), **_quiet())
    evals = [json.loads(line)["eval"] for line in (tmp_path / "v" / "log.jsonl").read_text().splitlines()
             if "eval" in json.loads(line)]
    assert [e["split"] for e in evals] == ["val"] and evals[0]["nelbo_n"] == 180
    assert s["metrics"]["split"] == "test"
