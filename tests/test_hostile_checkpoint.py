"""Hostile inputs to the checkpoint loader (issue 10): damaged and crafted files, property-based.

Every case must end in a :class:`CheckpointError` whose one-line message names the file -- or, where the
damage is semantically invisible (e.g. a header whitespace byte changed into another whitespace byte), in a
checkpoint equal to the original. No other exception type, no hang, no allocation driven by the file's claims.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from _guards import no_hang
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffflow_ext import DiffFlow
from diffflow_ext.checkpoint import VERSION, CheckpointError, _digest, load_checkpoint, save_checkpoint
from diffflow_ext.training.ema import EMA

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])




def _make_blob(tmp: Path) -> bytes:
    torch.manual_seed(0)
    m = DiffFlow.mlp(2, hidden=8, depth=1, num_steps=3)
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    sch = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    ema = EMA(m, 0.9)
    g = torch.Generator().manual_seed(1)
    opt.zero_grad()
    m.loss(torch.randn(16, 2, generator=g), g).backward()
    opt.step()
    sch.step()
    ema.update(m)
    rng = np.random.default_rng(5)
    p = save_checkpoint(tmp / "c.safetensors", model=m, optimizer=opt, scheduler=sch, ema=ema, step=1,
                        generators={"noise0": g}, numpy_rngs={"data": rng},
                        extra={"data": {"mean": [0.0, 0.0], "std": [1.0, 2.0]}, "note": "x"})
    return p.read_bytes()


@pytest.fixture(scope="module")
def blob(tmp_path_factory) -> bytes:
    return _make_blob(tmp_path_factory.mktemp("ck"))


def _split(b: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def _tensors_of(header: dict, data: bytes) -> dict[str, torch.Tensor]:
    from diffflow_ext.checkpoint import _ST_DTYPES

    out = {}
    for k, v in header.items():
        if k != "__metadata__":
            a, b = v["data_offsets"]
            t = torch.frombuffer(bytearray(data[a:b]) or bytearray(1), dtype=torch.uint8)[: b - a]
            out[k] = t.view(_ST_DTYPES[v["dtype"]]).reshape(v["shape"])
    return out


def _resign(header: dict, data: bytes) -> bytes:
    """What an attacker who knows the format does after editing: recompute the checksum."""
    md = header["__metadata__"]
    md["sha256"] = _digest(_tensors_of(header, data), md)
    return _join(header, data)


def _same(a, b) -> None:
    assert a.meta == b.meta
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k


def _expect_clean_error(path: Path, *, match: str | None = None):
    with no_hang():
        try:
            ck = load_checkpoint(path)
        except CheckpointError as e:
            msg = str(e)
            assert "\n" not in msg and str(path) in msg, msg
            if match:
                assert any(w in msg for w in match.split("|")), msg
            return None
    return ck


def _use(ck) -> None:
    """Everything a user does with a loaded checkpoint: only CheckpointError may come out."""
    try:
        m = ck.build_model()
        m2 = DiffFlow.mlp(2, hidden=8, depth=1, num_steps=3)
        opt = torch.optim.Adam(m2.parameters(), 1e-2)
        ck.restore(model=m2, optimizer=opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 2, 0.5),
                   ema=EMA(m2, 0.9), generators={"noise0": torch.Generator()},
                   numpy_rngs={"data": np.random.default_rng(0)})
        assert m is not None
    except CheckpointError as e:
        assert "\n" not in str(e)


# ----------------------------------------------------------------------------- damage


@SETTINGS
@given(pos=st.integers(0, 10**9), xor=st.integers(1, 255))
def test_any_flipped_byte_is_refused_or_harmless(tmp_path, blob, pos, xor):
    pos %= len(blob)
    bad = bytearray(blob)
    bad[pos] ^= xor
    p = tmp_path / "flip.safetensors"
    p.write_bytes(bytes(bad))
    ck = _expect_clean_error(p)
    if ck is not None:  # e.g. a padding space turned into a tab: same content
        q = tmp_path / "orig.safetensors"
        q.write_bytes(blob)
        _same(ck, load_checkpoint(q))


@SETTINGS
@given(n=st.integers(0, 10**9))
def test_any_truncation_is_refused(tmp_path, blob, n):
    n %= len(blob)
    p = tmp_path / "t.safetensors"
    p.write_bytes(blob[:n])
    assert _expect_clean_error(p, match="truncated|not a|empty|invalid") is None


@SETTINGS
@given(junk=st.binary(min_size=0, max_size=300))
def test_arbitrary_bytes_are_refused(tmp_path, junk):
    p = tmp_path / "j.safetensors"
    p.write_bytes(junk)
    assert _expect_clean_error(p) is None


@pytest.mark.parametrize("path", ["std", "step"])
def test_metadata_edit_without_resigning_fails_the_checksum(tmp_path, blob, path):
    header, data = _split(blob)
    meta = json.loads(header["__metadata__"]["meta"])
    if path == "std":
        meta["extra"]["data"]["std"][0] = 1.5  # one digit: 1.0 -> 1.5
    else:
        meta["step"] += 1
    header["__metadata__"]["meta"] = json.dumps(meta)
    p = tmp_path / "e.safetensors"
    p.write_bytes(_join(header, data))
    assert _expect_clean_error(p, match="checksum") is None


def test_version_1_checkpoints_are_refused_with_the_reason(tmp_path, blob):
    header, data = _split(blob)
    header["__metadata__"]["version"] = "1"
    p = tmp_path / "v1.safetensors"
    p.write_bytes(_resign(header, data))
    assert _expect_clean_error(p, match="version") is None
    assert VERSION == 2


# ----------------------------------------------------------------------------- crafted (checksum recomputed)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)


def _paths(x, prefix=()):
    yield prefix
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(x, list) and len(x) <= 8:
        for i, v in enumerate(x):
            yield from _paths(v, prefix + (i,))


@SETTINGS
@given(data=st.data(), value=JSON)
def test_crafted_metadata_gives_clean_error_or_works(tmp_path, blob, data, value):
    header, payload = _split(blob)
    meta = json.loads(header["__metadata__"]["meta"])
    paths = [p for p in _paths(meta) if p]
    path = data.draw(st.sampled_from(paths))
    d = meta
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    header["__metadata__"]["meta"] = json.dumps(meta)
    p = tmp_path / "c.safetensors"
    p.write_bytes(_resign(header, payload))
    ck = _expect_clean_error(p)
    if ck is not None:
        _use(ck)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["model_config"]["drift"]["kwargs"].update(hidden=10**12), "fit"),
    (lambda m: m["model_config"]["score"]["kwargs"].update(dim=10**9), "dim: network 'mlp' got 1000000000"),
    (lambda m: m["model_config"].update(num_steps=10**12), "num_steps"),
    (lambda m: m["model_config"].update(data_shape="x"), "data_shape"),
    (lambda m: m.update(step=-1), "meta.step"),
    (lambda m: m["ema"].update(decay=2.0), "meta.ema.decay"),
    (lambda m: m["optimizer"]["param_groups"][0].update(lr=float("nan")), "lr"),
    (lambda m: m["rng_numpy"]["data"]["state"].update(state="x"), "rng_numpy"),
    (lambda m: m.update(rng_python=[3, [0] * 10, None]), "rng_python"),
    (lambda m: m.update(bogus=1), "unknown"),
])
def test_crafted_metadata_named_in_error(tmp_path, blob, edit, match):
    header, payload = _split(blob)
    meta = json.loads(header["__metadata__"]["meta"])
    edit(meta)
    header["__metadata__"]["meta"] = json.dumps(meta)
    p = tmp_path / "c.safetensors"
    p.write_bytes(_resign(header, payload))
    with no_hang(), pytest.raises(CheckpointError, match=match):
        load_checkpoint(p).build_model()


def test_deeply_nested_metadata_is_refused(tmp_path, blob):
    header, payload = _split(blob)
    meta = header["__metadata__"]["meta"]
    header["__metadata__"]["meta"] = meta[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    p = tmp_path / "d.safetensors"
    p.write_bytes(_resign(header, payload))
    assert _expect_clean_error(p, match="nested") is None


@SETTINGS
@given(data=st.data())
def test_crafted_tensor_entries_are_refused_before_allocation(tmp_path, blob, data):
    header, payload = _split(blob)
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    if field == "dtype":
        value = data.draw(st.sampled_from(["F64", "F16", "I64", "U8", "BOOL", "bogus", 3]))
    elif field == "shape":
        value = data.draw(st.lists(st.integers(-1, 2**62), max_size=4) | st.just("x"))
    else:
        value = data.draw(st.lists(st.integers(-5, 2**62), min_size=0, max_size=3))
    if header[name][field] == value:
        return
    header[name][field] = value
    p = tmp_path / "h.safetensors"
    p.write_bytes(_join(header, payload))
    ck = _expect_clean_error(p)
    if ck is not None:  # a consistent change (e.g. F32 [2,8] -> F64 [2,4] over the same bytes) still fails the sum
        pytest.fail("a changed tensor entry was accepted")


# ----------------------------------------------------------------------------- not a file


def test_fifo_device_and_directories_are_refused_without_blocking(tmp_path, blob):
    os.mkfifo(tmp_path / "fifo.safetensors")
    assert _expect_clean_error(tmp_path / "fifo.safetensors", match="FIFO") is None
    with no_hang(), pytest.raises(CheckpointError, match="device"):
        load_checkpoint("/dev/zero")
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="without checkpoint.safetensors"):
        load_checkpoint(tmp_path / "run")
    os.mkfifo(tmp_path / "run" / "checkpoint.safetensors")
    with no_hang(), pytest.raises(CheckpointError, match="FIFO"):
        load_checkpoint(tmp_path / "run")
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "checkpoint.safetensors").write_bytes(blob)
    assert load_checkpoint(tmp_path / "ok").step == 1


def test_restore_checks_everything_before_modifying_anything(tmp_path, blob):
    p = tmp_path / "c.safetensors"
    p.write_bytes(blob)
    ck = load_checkpoint(p)
    torch.manual_seed(3)
    m = DiffFlow.mlp(2, hidden=8, depth=1, num_steps=3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    wrong = DiffFlow.mlp(2, hidden=9, depth=1, num_steps=3)
    opt = torch.optim.Adam(wrong.parameters(), 1e-2)
    with pytest.raises(CheckpointError, match="optimizer state"):
        ck.restore(model=m, optimizer=opt)
    for k, v in m.state_dict().items():  # the model was not touched
        assert torch.equal(v, before[k])
    with pytest.raises(CheckpointError, match="generator"):
        ck.restore(generators={"noise0": torch.Generator(), "other": torch.Generator()})
