"""Checkpoints: round trip, exact resume, refusal of pickles, clear errors for truncated/corrupt files."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffflow_ext import DiffFlow
from diffflow_ext.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from diffflow_ext.training import TrainConfig, train
from diffflow_ext.training.ema import EMA

TINY = dict(data="checkerboard", hidden=16, depth=2, num_steps=4, progressive=None, batch_size=64, lr=1e-2,
            lr_decay=0.9, lr_decay_every=2, ema=0.9, clip=1.0, eval_every=0, seed=3)


def _tiny_state(tmp_path: Path) -> tuple[Path, DiffFlow, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = DiffFlow.mlp(2, hidden=8, depth=1, num_steps=3)
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    sch = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    ema = EMA(m, 0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        m.loss(torch.randn(32, 2, generator=g), g).backward()
        opt.step()
        sch.step()
        ema.update(m)
    rng = np.random.default_rng(5)
    rng.random(3)
    p = save_checkpoint(tmp_path / "c.safetensors", model=m, optimizer=opt, scheduler=sch, ema=ema, step=3,
                        generators={"noise0": g}, numpy_rngs={"data": rng}, extra={"note": "x"})
    return p, m, opt


def test_roundtrip_restores_everything(tmp_path):
    p, m, opt = _tiny_state(tmp_path)
    ck = load_checkpoint(p)
    assert ck.step == 3 and ck.extra == {"note": "x"} and ck.has_ema
    m2 = DiffFlow.from_config(ck.model_config)
    opt2 = torch.optim.Adam(m2.parameters(), 1e-3)
    sch2 = torch.optim.lr_scheduler.StepLR(opt2, 2, 0.5)
    ema2 = EMA(m2, 0.9)
    g2, rng2 = torch.Generator(), np.random.default_rng(0)
    torch.manual_seed(123)
    ck.restore(model=m2, optimizer=opt2, scheduler=sch2, ema=ema2, generators={"noise0": g2},
               numpy_rngs={"data": rng2})
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"][0]["lr"] == s2["param_groups"][0]["lr"]
    for k in s1["state"]:
        for key in s1["state"][k]:
            assert torch.equal(torch.as_tensor(s1["state"][k][key]), torch.as_tensor(s2["state"][k][key]))
    assert sch2.last_epoch == 3 and ema2.num_updates == 3
    assert np.random.default_rng(5).random(4)[3] == rng2.random()
    # the model built from the checkpoint uses the EMA weights
    built = ck.build_model(use_ema=True)
    assert torch.equal(built.state_dict()["drift.out.weight"], ema2.shadow["drift.out.weight"])


def test_atomic_save_leaves_no_temp_files(tmp_path):
    p, _, _ = _tiny_state(tmp_path)
    _tiny_state(tmp_path)  # overwrite in place
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.safetensors"]
    assert load_checkpoint(p).step == 3


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def test_crafted_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"model": _Evil()}))
    with pytest.raises(CheckpointError, match="refus.*pickle|pickle.*refused"):
        load_checkpoint(evil)
    # a torch.save zip archive with the same payload, named like a .pt
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Evil()))
    for name in ("evil.pt", "evil_zip.safetensors"):
        (tmp_path / name).write_bytes(buf.getvalue())
        with pytest.raises(CheckpointError, match="pickle"):
            load_checkpoint(tmp_path / name)
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_truncated_and_corrupt_files_give_clear_errors(tmp_path):
    p, _, _ = _tiny_state(tmp_path)
    blob = p.read_bytes()
    for n in (0, 5, 20, len(blob) // 2, len(blob) - 1):
        q = tmp_path / f"t{n}.safetensors"
        q.write_bytes(blob[:n])
        with pytest.raises(CheckpointError, match="truncated|corrupt|not a"):
            load_checkpoint(q)
    # flip one byte of tensor payload: checksum catches it
    bad = bytearray(blob)
    bad[-3] ^= 0xFF
    q = tmp_path / "flip.safetensors"
    q.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(q)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_foreign_safetensors_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a diffflow_ext checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


def _ckpt_tensors(path):
    ck = load_checkpoint(path)
    return {k: v for k, v in ck.tensors.items()}, ck


@pytest.mark.parametrize("grid", ["fixed", "flexible"])
def test_resume_is_exact(tmp_path, grid):
    k, m = 3, 3
    kw = dict(TINY, grid=grid, progressive="2:4:4")
    full = train(TrainConfig(**kw, iters=k + m, out=str(tmp_path / "full")), progress=False, final_eval=False)
    train(TrainConfig(**kw, iters=k, out=str(tmp_path / "part")), progress=False, final_eval=False)
    resumed = train(TrainConfig(**kw, iters=k + m, out=str(tmp_path / "part")),
                    resume=str(tmp_path / "part" / "checkpoint.safetensors"), progress=False, final_eval=False)
    assert full["step"] == resumed["step"] == k + m and resumed["steps_run"] == m
    a, cka = _ckpt_tensors(full["checkpoint"])
    b, ckb = _ckpt_tensors(resumed["checkpoint"])
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert cka.meta["rng_numpy"] == ckb.meta["rng_numpy"]
    assert cka.meta["scheduler"] == ckb.meta["scheduler"]


def test_resume_refuses_non_training_checkpoint(tmp_path):
    p, _, _ = _tiny_state(tmp_path)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        train(TrainConfig(**TINY, iters=1, out=str(tmp_path / "x")), resume=str(p), progress=False)


def test_safetensors_header_length_starting_with_pickle_marker_is_not_mistaken_for_pickle(tmp_path):
    """A safetensors file whose header length has 0x80 (pickle's protocol marker) as first byte is read as
    safetensors (it was once refused as a pickle, depending on the metadata's length)."""
    from safetensors.torch import save_file

    f = tmp_path / "checkpoint.safetensors"
    for pad in range(256):
        save_file({"x": torch.zeros(2)}, str(f), metadata={"format": "other", "pad": "a" * pad})
        if f.read_bytes()[:1] == b"\x80":
            break
    assert f.read_bytes()[:1] == b"\x80"
    with pytest.raises(CheckpointError, match="not a diffflow_ext checkpoint"):
        load_checkpoint(f)


def test_long_config_lists_and_lambda_scheduler_round_trip(tmp_path):
    """The metadata schema admits what real runs store: a per-grid-point g of N+1 values, a LambdaLR state."""
    m = DiffFlow.mlp(2, hidden=8, depth=1, num_steps=200, diffusion=[0.2 + 1e-3 * i for i in range(201)])
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 ** it)
    sch.step()
    p = save_checkpoint(tmp_path / "c.safetensors", model=m, optimizer=opt, scheduler=sch, step=1)
    ck = load_checkpoint(p)
    assert ck.build_model().config() == m.config()
    sch2 = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 ** it)
    ck.restore(scheduler=sch2, restore_global_rng=False)
    assert sch2.last_epoch == 1


def test_save_refuses_what_load_would_refuse(tmp_path):
    m = DiffFlow.mlp(2, hidden=8, depth=1, num_steps=3)
    with pytest.raises(CheckpointError, match="meta.step"):
        save_checkpoint(tmp_path / "c.safetensors", model=m, step=-1)
    with pytest.raises(CheckpointError, match="generator state"):
        save_checkpoint(tmp_path / "c.safetensors", model=m, generators={"g": torch.zeros(3)})
    assert not any(tmp_path.iterdir())
