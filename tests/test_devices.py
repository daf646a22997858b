"""Device selection (``--device``), the process-group helpers (gloo on CPU), mixed precision wiring, and CUDA
training runs that skip cleanly without a GPU."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffflow_ext.checkpoint import load_checkpoint
from diffflow_ext.training import TrainConfig, train
from diffflow_ext.training.devices import resolve_device
from diffflow_ext.training.distributed import DistContext, local_shards, setup

TINY = dict(data="checkerboard", hidden=16, depth=2, num_steps=4, progressive=None, batch_size=64, lr=1e-2,
            ema=0.9, eval_every=0, final_ode=0, final_samples=100, seed=1)
HAS_CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------- device selection


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend this machine has ``n`` GPUs (device selection only; nothing runs on them)."""

    def make(n: int, current: int = 0):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)

    return make


def test_cpu_and_auto_without_cuda(fake_cuda):
    fake_cuda(0)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", local_rank=1, world_size=2) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA"])
def test_cuda_without_a_gpu_is_a_one_line_error_naming_the_flag(fake_cuda, spec):
    fake_cuda(0)
    with pytest.raises(ValueError, match="--device") as ei:
        resolve_device(spec)
    assert "\n" not in str(ei.value) and "cpu" in str(ei.value)


def test_auto_and_cuda_pick_the_current_gpu_in_one_process(fake_cuda):
    fake_cuda(2, current=1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_torchrun_uses_one_gpu_per_process_from_local_rank(fake_cuda):
    fake_cuda(4)
    assert [resolve_device("auto", local_rank=r, world_size=4) for r in range(4)] == [
        torch.device("cuda", r) for r in range(4)]
    assert resolve_device("cuda", local_rank=3, world_size=8) == torch.device("cuda", 3)
    with pytest.raises(ValueError, match="LOCAL_RANK=4 needs cuda:4 but only 4"):
        resolve_device("cuda", local_rank=4, world_size=8)
    with pytest.raises(ValueError, match="under torchrun"):
        resolve_device("cuda:1", local_rank=0, world_size=2)


@pytest.mark.parametrize("spec", ["cuda:2", "cuda:-1", "cuda:x", "tpu", "gpu", ""])
def test_bad_device_specs(fake_cuda, spec):
    fake_cuda(2)
    with pytest.raises(ValueError, match="--device"):
        resolve_device(spec)


def test_single_process_setup_has_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = setup("cpu")
    assert (ctx.rank, ctx.world, ctx.device, ctx.distributed, ctx.is_main) == (0, 1, torch.device("cpu"), False, True)
    assert ctx.broadcast({"a": 1}) == {"a": 1} and ctx.any(True) and not ctx.any(False)
    st = {"noise0": torch.arange(5, dtype=torch.uint8)}
    assert ctx.gather_states(st) is st
    ctx.barrier()
    ctx.close()


@pytest.mark.parametrize("shards,world", [(1, 1), (4, 1), (4, 2), (6, 3), (8, 8)])
def test_local_shards_partition_the_shards_in_order(shards, world):
    parts = [local_shards(shards, r, world) for r in range(world)]
    assert sum(parts, []) == list(range(shards))
    assert len({len(p) for p in parts}) == 1


def test_shards_must_be_a_multiple_of_the_process_count():
    with pytest.raises(ValueError, match="--shards"):
        local_shards(3, 0, 2)


# ----------------------------------------------------------------------------- collectives over gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = setup("cpu")
    try:
        res = {
            "backend": ctx.backend, "rank": ctx.rank, "world": ctx.world,
            "bcast": ctx.broadcast({"out": "/x"} if ctx.rank == 0 else None),
            "any_one": ctx.any(ctx.rank == 1), "any_none": ctx.any(False),
            "gather": {k: v.tolist() for k, v in ctx.gather_states(
                {f"noise{ctx.rank}": torch.full((3,), ctx.rank + 7, dtype=torch.uint8)}).items()},
        }
        res["on_main"] = ctx.on_main(lambda: 10 * ctx.rank + 5)  # rank 0's result everywhere

        def refuse():
            raise FileExistsError("--out r: already holds a training run")

        try:
            ctx.on_main(refuse)
        except FileExistsError as e:  # raised on rank 0 only, seen on every rank
            res["on_main_error"] = str(e)
        torch.save(res, os.path.join(out, f"r{rank}.pt"))
    finally:
        ctx.close()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_process_group_helpers_over_gloo(tmp_path):
    mp.start_processes(_collective_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for r in range(2):
        res = torch.load(tmp_path / f"r{r}.pt")
        assert res["backend"] == "gloo" and res["rank"] == r and res["world"] == 2
        assert res["bcast"] == {"out": "/x"}
        assert res["any_one"] is True and res["any_none"] is False  # a Ctrl-C on one rank stops every rank
        assert res["gather"] == {"noise0": [7, 7, 7], "noise1": [8, 8, 8]}
        assert res["on_main"] == 5 and res["on_main_error"] == "--out r: already holds a training run"


# ----------------------------------------------------------------------------- mixed precision wiring


@pytest.mark.parametrize("precision,name", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_precision_reaches_the_model_and_the_checkpoint(tmp_path, precision, name):
    seen = {}

    def hook(state, stats):
        seen["autocast"] = state.model.autocast_dtype
        seen["param_dtypes"] = {p.dtype for p in state.model.parameters()}
        seen["scaler"] = state.scaler is not None

    s = train(TrainConfig(**TINY, iters=3, precision=precision, out=str(tmp_path / precision)), progress=False,
              final_eval=False, log=lambda m: None, hooks=[hook])
    assert seen["autocast"] == getattr(torch, name)
    assert seen["param_dtypes"] == {torch.float32}  # weights (and states) stay float32
    assert seen["scaler"] == (precision == "fp16")
    ck = load_checkpoint(s["checkpoint"])
    assert ck.model_config["autocast_dtype"] == name
    assert ("grad_scaler" in ck.extra) == (precision == "fp16")


def test_fp16_resume_is_exact(tmp_path):
    """The grad scaler's state is checkpointed: 2 + 2 steps equal 4 steps."""
    kw = dict(TINY, precision="fp16")
    full = train(TrainConfig(**kw, iters=4, out=str(tmp_path / "full")), progress=False, final_eval=False,
                 log=lambda m: None)
    train(TrainConfig(**kw, iters=2, out=str(tmp_path / "part")), progress=False, final_eval=False, log=lambda m: None)
    res = train(TrainConfig(**kw, iters=4, out=str(tmp_path / "part")), resume=str(tmp_path / "part"),
                progress=False, final_eval=False, log=lambda m: None)
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(res["checkpoint"])
    assert a.extra["grad_scaler"] == b.extra["grad_scaler"]
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k


def test_memory_budget_and_gradient_plan_are_reported(tmp_path):
    msgs = []
    s = train(TrainConfig(**{**TINY, "gradient": "auto", "memory_budget": float(2**20)}, iters=2,
                          out=str(tmp_path / "m")), progress=False, final_eval=False, log=msgs.append)
    plan = s["gradient_plan"]
    assert plan["states"] == 5 and plan["kept"] + plan["recomputed"] == 5 and plan["budget_bytes"] == 2**20
    assert any(m.startswith("gradient auto: keeps") for m in msgs), msgs


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_training_puts_model_data_and_generators_on_the_gpu_and_resumes_exactly(tmp_path):
    seen = {}

    def hook(state, stats):
        seen["params"] = {p.device.type for p in state.model.parameters()}
        seen["gens"] = {g.device.type for g in state.noise.values()}

    kw = dict(TINY, device="cuda")
    full = train(TrainConfig(**kw, iters=4, out=str(tmp_path / "full")), progress=False, log=lambda m: None,
                 hooks=[hook])
    assert seen == {"params": {"cuda"}, "gens": {"cuda"}}
    assert full["device"].startswith("cuda") and full["metrics"]["fraction_finite"] == 1.0
    train(TrainConfig(**kw, iters=2, out=str(tmp_path / "part")), progress=False, final_eval=False, log=lambda m: None)
    res = train(TrainConfig(**kw, iters=4, out=str(tmp_path / "part")), resume=str(tmp_path / "part"),
                progress=False, final_eval=False, log=lambda m: None)
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(res["checkpoint"])
    assert a.extra["device_type"] == "cuda"
    for k in a.tensors:
        if k.startswith(("model/", "ema/", "optim/", "rng/gen/")):
            assert torch.equal(a.tensors[k], b.tensors[k]), k


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_trains(tmp_path, precision):
    s = train(TrainConfig(**TINY, device="cuda", precision=precision, iters=20, out=str(tmp_path / precision)),
              progress=False, final_eval=False, log=lambda m: None)
    assert s["step"] == 20 and s["final_loss"] == s["final_loss"]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_resume_on_another_device_type_is_refused(tmp_path):
    from diffflow_ext.checkpoint import CheckpointError

    train(TrainConfig(**TINY, device="cpu", iters=2, out=str(tmp_path / "c")), progress=False, final_eval=False,
          log=lambda m: None)
    with pytest.raises(CheckpointError, match="--device cpu"):
        train(TrainConfig(**TINY, device="cuda", iters=4), resume=str(tmp_path / "c"), progress=False,
              final_eval=False, log=lambda m: None)


def test_distctx_defaults_are_cpu_single_process():
    c = DistContext()
    assert c.device == torch.device("cpu") and not c.distributed
