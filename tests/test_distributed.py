"""Data-parallel training (DistributedDataParallel over gloo on CPU) equals one process on the combined batch.

The model's loss runs the networks inside a custom autograd Function (the stochastic adjoint); the
parameter gradients it returns reach the parameters through autograd's AccumulateGrad, so DDP's hooks
fire and the plain ``DDP(model)`` wrapper (``DiffFlow.forward`` is ``loss``) all-reduces them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import diffflow_ext
from diffflow_ext import DiffFlow
from diffflow_ext.checkpoint import load_checkpoint
from diffflow_ext.training import train
from diffflow_ext.training.config import resolve_config

# where the imported package lives (source tree or site-packages), for subprocesses
ROOT = Path(diffflow_ext.__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")

B, WORLD = 48, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(dtype):
    torch.manual_seed(0)
    return DiffFlow.mlp(2, hidden=16, depth=2, num_steps=5, grid="flexible").to(dtype)


def _batch(dtype):
    return torch.randn(B, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)


def _shard_gen(k):
    return torch.Generator().manual_seed(100 + k)


DTYPES = {"float32": (torch.float32, 1e-6), "float64": (torch.float64, 1e-10)}


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        for name, (dtype, _) in DTYPES.items():
            model = _model(dtype)
            ddp = DDP(model)
            x = _batch(dtype)[rank * (B // WORLD):(rank + 1) * (B // WORLD)]
            loss = ddp(x, _shard_gen(rank))  # DiffFlow.forward == loss: mean over the shard
            loss.backward()  # DDP averages over ranks == mean over the combined batch
            grads = {k: p.grad.detach().double().numpy() for k, p in model.named_parameters()}
            np.savez(os.path.join(out_dir, f"{name}_rank{rank}.npz"), **grads)
        # both ranks leave together: a rank that tears gloo down while its peer is still in the group's last
        # collective aborted now and then ("terminate called without an active exception", ~1 run in 10)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_grads(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return out


@pytest.mark.parametrize("name", list(DTYPES))
def test_ddp_gradients_equal_single_process(ddp_grads, name):
    dtype, tol = DTYPES[name]
    model = _model(dtype)
    x = _batch(dtype)
    for k in range(WORLD):  # the combined batch, shard k with its own noise stream
        (model.loss(x[k * (B // WORLD):(k + 1) * (B // WORLD)], _shard_gen(k)) / WORLD).backward()
    ref = {k: p.grad.detach().double().numpy() for k, p in model.named_parameters()}
    for r in range(WORLD):
        got = np.load(ddp_grads / f"{name}_rank{r}.npz")
        assert set(got.files) == set(ref)
        for k in ref:
            scale = max(1.0, float(np.abs(ref[k]).max()))
            np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=tol * scale, err_msg=k)
    assert any(np.abs(v).max() > 0 for v in ref.values())


def _torchrun_train(tmp_path, data: str, args: list[str]) -> None:
    """``torchrun --nproc_per_node 2 -m diffflow_ext.train DATA --out tmp_path/ddp ARGS``; must succeed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "diffflow_ext.train", data, "--out", str(tmp_path / "ddp"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_torchrun_trainer_equals_single_process(tmp_path):
    common = ["--shards", "2", "--iters", "3", "--dtype", "float64", "--hidden", "16", "--depth", "2", "-N", "4",
              "--batch-size", "64", "--grid", "flexible", "--lr", "1e-2", "--ema", "0.9", "--eval-every", "0",
              "--final-ode", "0", "--final-samples", "1200", "--no-progress", "--seed", "5"]
    _torchrun_train(tmp_path, "checkerboard", common)
    # the same options as the command line above, with the same per-kind presets the CLI applies
    cfg = resolve_config("points", dict(
        data="checkerboard", out=str(tmp_path / "one"), shards=2, iters=3, dtype="float64", hidden=16, depth=2,
        num_steps=4, progressive=None, batch_size=64, grid="flexible", lr=1e-2, ema=0.9, eval_every=0, final_ode=0,
        final_samples=1200, seed=5))
    train(cfg, progress=False, final_eval=False)
    a = load_checkpoint(tmp_path / "ddp" / "checkpoint.safetensors")
    b = load_checkpoint(tmp_path / "one" / "checkpoint.safetensors")
    assert a.meta["extra"]["world_size"] == 2 and b.meta["extra"]["world_size"] == 1
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        if k.startswith(("model/", "ema/", "optim/")):
            torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=1e-10, atol=1e-10, msg=k)
        elif k.startswith("rng/gen/"):  # both noise streams were gathered and advanced identically
            assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert a.meta["rng_numpy"] == b.meta["rng_numpy"]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["step"] == 3 and m["training"]["world_size"] == 2
    # the final samples were drawn by both ranks (batches 0, 2 on rank 0, batch 1 on rank 1) and gathered: the
    # metrics equal a single-process evaluation of the same checkpoint
    from diffflow_ext.evaluation import evaluate_checkpoint

    single = evaluate_checkpoint(tmp_path / "ddp" / "checkpoint.safetensors", n_samples=1200, n_ode=0, ode=False,
                                 lam=cfg.eval_lam)
    m.pop("training")
    assert m == json.loads(json.dumps(single))


def test_torchrun_early_stopping_equals_single_process(tmp_path):
    """--keep-best/--patience under torchrun: rank 0 evaluates, every rank follows its decisions (saves the best
    checkpoint together, stops together); the result equals one process with the same shards."""
    # lr 0.7 makes the validation -ELBO turn up (measured: best at step 12, early stop at 14 of 16)
    common = ["--shards", "2", "--iters", "16", "--dtype", "float64", "--network", "mlp", "--hidden", "16",
              "--depth", "1", "-N", "3", "--batch-size", "32", "--lr", "0.7", "--ema", "0", "--eval-every", "2",
              "--eval-samples", "16", "--keep-best", "--patience", "1", "--final-ode", "0", "--final-samples", "32",
              "--no-progress"]
    _torchrun_train(tmp_path, "digits", common)
    cfg = resolve_config("image", dict(
        data="digits", out=str(tmp_path / "one"), shards=2, iters=16, dtype="float64", network="mlp", hidden=16,
        depth=1, num_steps=3, batch_size=32, lr=0.7, ema=0.0, eval_every=2, eval_samples=16, keep_best=True,
        patience=1, final_ode=0, final_samples=32), "digits")
    one = train(cfg, progress=False, final_eval=False, log=lambda s: None)
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["training"]["best"]["step"] == one["best"]["step"] == m["step"]
    assert m["training"]["stopped_early_at"] == one["stopped_early_at"] == 14 and one["best"]["step"] == 12
    a, b = (load_checkpoint(tmp_path / d / "best.safetensors") for d in ("ddp", "one"))
    assert a.step == b.step and a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        if k.startswith("model/"):
            torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=1e-10, atol=1e-10, msg=k)
