"""Image data sources on small files written in the exact formats; the dequantising transform."""

from __future__ import annotations

import gzip
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from diffflow_ext.data import DataSourceError, Dequantize, data_source_from_state, get_data_source
from diffflow_ext.data.images import read_cifar10_bin

MNIST_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"


def _idx(arr: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, ">u4").tobytes() + arr.astype(np.uint8).tobytes()


def _write_mnist(root: Path, n_train=12, n_test=5, gz=True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    tr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    te = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    labels = (("train-labels-idx1-ubyte", np.arange(n_train) % 10), ("t10k-labels-idx1-ubyte", np.arange(n_test)))
    for stem, a in (("train-images-idx3-ubyte", tr), ("t10k-images-idx3-ubyte", te), *labels):
        data = _idx(np.asarray(a))
        if gz:
            with gzip.open(root / (stem + ".gz"), "wb") as fh:
                fh.write(data)
        else:
            (root / stem).write_bytes(data)
    return tr, te


# ----------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files(tmp_path, gz):
    tr, te = _write_mnist(tmp_path / "MNIST" / "raw", gz=gz)
    src = get_data_source("mnist", data_dir=tmp_path)
    assert src.kind == "image" and src.shape == (1, 28, 28) and src.levels == 256
    assert src.splits == ("train", "test")
    np.testing.assert_array_equal(src.split("train")[:, 0].numpy(), tr)
    np.testing.assert_array_equal(src.heldout()[:, 0].numpy(), te)


def test_mnist_pad_and_val(tmp_path):
    tr, te = _write_mnist(tmp_path)
    src = get_data_source("mnist", data_dir=tmp_path, pad_to=32, val=4)
    assert src.shape == (1, 32, 32)
    x = src.split("train")
    assert len(x) == 8 and len(src.split("val")) == 4 and len(src.split("test")) == 5
    np.testing.assert_array_equal(x[:, 0, 2:30, 2:30].numpy(), tr[:8])  # centred
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, 0][:, border] == 0).all()  # padding is black
    np.testing.assert_array_equal(src.split("val")[:, 0, 2:30, 2:30].numpy(), tr[8:])
    with pytest.raises(DataSourceError, match="pad_to=20"):
        get_data_source("mnist", data_dir=tmp_path, pad_to=20)
    with pytest.raises(DataSourceError, match="leaves no training"):
        get_data_source("mnist", data_dir=tmp_path, val=12)


def test_mnist_errors(tmp_path):
    with pytest.raises(DataSourceError, match="--data-dir"):
        get_data_source("mnist")
    with pytest.raises(DataSourceError, match="never downloads"):
        get_data_source("mnist", data_dir=tmp_path)
    with pytest.raises(DataSourceError, match="not a directory"):
        get_data_source("mnist", data_dir=tmp_path / "nope")
    with pytest.raises(DataSourceError, match="do not apply to mnist.*pad_to"):
        get_data_source("mnist", data_dir=tmp_path, padding=32)


@pytest.mark.skipif(not (MNIST_ROOT / "t10k-images-idx3-ubyte.gz").exists(), reason="no local MNIST copy")
def test_mnist_real_copy():
    src = get_data_source("mnist", data_dir=MNIST_ROOT)
    assert src.split_size("train") == 60000 and src.split_size("test") == 10000
    assert src.shape == (1, 28, 28)
    assert abs(float(src.split("train").double().mean()) - 33.318) < 0.01  # pixel mean from the README


# ----------------------------------------------------------------------------- CIFAR-10


def _cifar_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    lab = rng.integers(0, 10, n, dtype=np.uint8)
    rec = np.concatenate([lab[:, None], img.reshape(n, -1)], axis=1)
    path.write_bytes(rec.tobytes())
    return img, lab


def test_cifar10_binary_batches(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    imgs = [_cifar_batch(d / f"data_batch_{k}.bin", 3, k)[0] for k in range(1, 6)]
    te, lab = _cifar_batch(d / "test_batch.bin", 4, 9)
    x, y = read_cifar10_bin(d / "test_batch.bin")
    np.testing.assert_array_equal(x.numpy(), te)
    np.testing.assert_array_equal(y.numpy(), lab)
    # the record layout: 1 label byte, then the red plane row-major, then green, then blue
    raw = np.frombuffer((d / "test_batch.bin").read_bytes(), np.uint8)
    assert x[0, 0, 0, 1] == raw[1 + 1] and x[0, 1, 0, 0] == raw[1 + 1024] and x[1, 2, 31, 31] == raw[2 * 3073 - 1]
    src = get_data_source("cifar10", data_dir=tmp_path, val=5)
    assert src.shape == (3, 32, 32) and src.levels == 256
    np.testing.assert_array_equal(torch.cat([src.split("train"), src.split("val")]).numpy(), np.concatenate(imgs))
    np.testing.assert_array_equal(src.split("test").numpy(), te)


def test_cifar10_refuses_pickles_and_bad_files(tmp_path):
    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    (py / "data_batch_1").write_bytes(pickle.dumps({"data": 1}))
    with pytest.raises(DataSourceError, match="pickled.*never unpickled"):
        get_data_source("cifar10", data_dir=tmp_path)
    empty = tmp_path / "e"
    empty.mkdir()
    with pytest.raises(DataSourceError, match="not found.*nothing is downloaded"):
        get_data_source("cifar10", data_dir=empty)
    (empty / "data_batch_1.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(DataSourceError, match="whole number of CIFAR-10 binary records"):
        get_data_source("cifar10", data_dir=empty)


# ----------------------------------------------------------------------------- sklearn digits


def test_digits_fixed_split():
    from sklearn.datasets import load_digits

    src = get_data_source("digits", seed=5)
    assert src.shape == (1, 8, 8) and src.levels == 17
    parts = [src.split(k) for k in ("train", "val", "test")]
    assert [len(p) for p in parts] == [1257, 180, 360]
    allx = torch.cat(parts)
    assert allx.dtype == torch.uint8 and int(allx.max()) == 16
    ref = np.rint(load_digits().images).astype(np.uint8)
    # a permutation of all 1797 images, independent of the training seed
    assert sorted(map(bytes, allx[:, 0].numpy())) == sorted(map(bytes, ref))
    assert torch.equal(get_data_source("digits", seed=0).split("test"), parts[2])
    assert math.isclose(src.log_det, 64 * math.log(2 / 17))


# ----------------------------------------------------------------------------- arrays and PNG folders


def test_npy_layouts(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (20, 5, 6, 3), dtype=np.uint8)  # NHWC
    np.save(tmp_path / "hwc.npy", a)
    src = get_data_source(str(tmp_path / "hwc.npy"), holdout=0.25)
    assert src.kind == "image" and src.shape == (3, 5, 6)
    allx = torch.cat([src.split("train"), src.split("test")])
    assert len(src.split("test")) == 5
    assert sorted(map(bytes, allx.numpy())) == sorted(map(bytes, a.transpose(0, 3, 1, 2).copy()))
    np.save(tmp_path / "chw.npy", a.transpose(0, 3, 1, 2))
    assert get_data_source(str(tmp_path / "chw.npy")).shape == (3, 5, 6)
    np.save(tmp_path / "grey.npy", a[..., 0])
    assert get_data_source(str(tmp_path / "grey.npy")).shape == (1, 5, 6)
    np.save(tmp_path / "amb.npy", np.zeros((4, 3, 6, 3), np.uint8))
    with pytest.raises(DataSourceError, match="layout"):
        get_data_source(str(tmp_path / "amb.npy"))
    assert get_data_source(str(tmp_path / "amb.npy"), layout="nhwc").shape == (3, 3, 6)
    np.save(tmp_path / "f.npy", a.astype(np.float32) / 255)
    with pytest.raises(DataSourceError, match="uint8"):
        get_data_source(str(tmp_path / "f.npy"))
    np.save(tmp_path / "big.npy", a.astype(np.int32) + 200)
    with pytest.raises(DataSourceError, match="0..255"):
        get_data_source(str(tmp_path / "big.npy"))
    # a 2-D .npy is still a point file
    np.save(tmp_path / "pts.npy", rng.normal(size=(30, 3)))
    assert get_data_source(str(tmp_path / "pts.npy")).kind == "points"


def test_npz_splits_and_no_pickles(tmp_path):
    rng = np.random.default_rng(2)
    tr, te = rng.integers(0, 17, (10, 8, 8), dtype=np.uint8), rng.integers(0, 17, (4, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", train=tr, test=te)
    src = get_data_source(str(tmp_path / "d.npz"), levels=17)
    assert src.levels == 17 and src.splits == ("train", "test")
    np.testing.assert_array_equal(src.split("test")[:, 0].numpy(), te)
    np.savez(tmp_path / "one.npz", images=tr)
    assert len(get_data_source(str(tmp_path / "one.npz")).split("test")) == 1
    np.savez(tmp_path / "two.npz", a=tr, b=te)
    with pytest.raises(DataSourceError, match="'train'"):
        get_data_source(str(tmp_path / "two.npz"))
    np.savez(tmp_path / "obj.npz", train=np.array([{"x": 1}], dtype=object))
    with pytest.raises(DataSourceError, match="pickle"):
        get_data_source(str(tmp_path / "obj.npz"))


def test_forged_array_header_is_refused_before_allocating(tmp_path):
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 64, 64)})
    (tmp_path / "huge.npy").write_bytes(buf.getvalue() + b"\x00" * 100)
    with pytest.raises(DataSourceError, match="claims shape"):
        get_data_source(str(tmp_path / "huge.npy"))
    import zipfile

    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("train.npy", buf.getvalue() + b"\x00" * 100)
    with pytest.raises(DataSourceError, match="claims shape"):
        get_data_source(str(tmp_path / "huge.npz"))


def test_png_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (10, 7, 9), dtype=np.uint8)
    (tmp_path / "g" / "sub").mkdir(parents=True)
    for i, g in enumerate(grey):
        Image.fromarray(g, mode="L").save(tmp_path / "g" / ("sub" if i % 2 else "") / f"{i:02d}.png")
    src = get_data_source(str(tmp_path / "g"), holdout=0.2)
    assert src.shape == (1, 7, 9) and len(src.split("test")) == 2
    allx = torch.cat([src.split("train"), src.split("test")])[:, 0].numpy()
    assert sorted(map(bytes, allx)) == sorted(map(bytes, grey))
    rgb = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    (tmp_path / "c").mkdir()
    for i, c in enumerate(rgb):
        Image.fromarray(c, mode="RGB").save(tmp_path / "c" / f"{i}.png")
    s2 = get_data_source(str(tmp_path / "c"), holdout=0.34)
    assert s2.shape == (3, 4, 5)
    allx = torch.cat([s2.split("train"), s2.split("test")]).numpy().transpose(0, 2, 3, 1)
    assert sorted(map(bytes, allx)) == sorted(map(bytes, rgb))
    Image.fromarray(grey[0][:5], mode="L").save(tmp_path / "c" / "odd.png")
    with pytest.raises(DataSourceError, match="different sizes"):
        get_data_source(str(tmp_path / "c"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no .png"):
        get_data_source(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- transform, stream, state


def test_dequantize_roundtrip_and_range():
    t = Dequantize(256, (1, 4, 4))
    x = torch.arange(256, dtype=torch.uint8).reshape(16, 1, 4, 4)
    z = t.to_model(x, torch.Generator().manual_seed(0))
    assert z.dtype == torch.float32 and z.min() >= -1 and z.max() < 1
    assert torch.equal(t.to_data(z), x)  # every dequantised value stays in its bin
    zc = t.to_model(x, False)  # bin centres
    torch.testing.assert_close(zc, (2 * (x.float() + 0.5) / 256 - 1))
    assert torch.equal(t.to_data(torch.tensor([-5.0, 5.0])), torch.tensor([0, 255], dtype=torch.uint8))
    assert math.isclose(t.log_det, 16 * math.log(2 / 256))
    assert math.isclose(-t.log_det / (16 * math.log(2)), 7.0)  # the +7 bits/dim
    with pytest.raises(DataSourceError, match="levels"):
        Dequantize(1)


def test_train_batch_is_a_function_of_the_rng():
    src = get_data_source("digits")
    a = src.train_batch(64, np.random.default_rng(4))
    b = src.train_batch(64, np.random.default_rng(4))
    assert a.shape == (64, 1, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a, src.train_batch(64, np.random.default_rng(5)))
    # dequantised: values are not on the bin centres, and map back to training images
    assert (torch.frac((a + 1) / 2 * 17) != 0.5).any()
    train = {bytes(v) for v in src.split("train").numpy()}
    assert all(bytes(v) in train for v in src.to_data(a).numpy())


def test_state_roundtrip_and_changed_data(tmp_path):
    rng = np.random.default_rng(6)
    np.save(tmp_path / "a.npy", rng.integers(0, 256, (30, 4, 4), dtype=np.uint8))
    src = get_data_source(str(tmp_path / "a.npy"), seed=3, holdout=0.2)
    st = src.state()
    import json

    st = json.loads(json.dumps(st))  # JSON-able
    again = data_source_from_state(st)
    assert torch.equal(again.split("test"), src.split("test")) and again.shape == src.shape
    np.save(tmp_path / "a.npy", rng.integers(0, 256, (30, 4, 4), dtype=np.uint8))
    with pytest.raises(DataSourceError, match="changed since training"):
        data_source_from_state(st)


def test_fifos_are_refused_without_blocking(tmp_path):
    import os

    for name in ("f.npy", "f.npz", "f.csv"):
        os.mkfifo(tmp_path / name)
        with pytest.raises(DataSourceError, match="FIFO"):
            get_data_source(str(tmp_path / name))
    (tmp_path / "power").mkdir()
    os.mkfifo(tmp_path / "power" / "data.npy")
    with pytest.raises(DataSourceError, match="FIFO"):
        get_data_source("power", data_dir=tmp_path)
