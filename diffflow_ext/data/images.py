"""Image data sources (never download anything; every loader reads a local copy the user points at).

=============  =====================================================================  ==========  ========
name           files                                                                  shape       levels
=============  =====================================================================  ==========  ========
``mnist``      the IDX files (``train-images-idx3-ubyte[.gz]``...) under ``--data-dir``  1x28x28     256
               (also ``raw/``, ``MNIST/raw/``); ``pad_to=32`` pads with black as in      (1x32x32)
               the paper
``cifar10``    the official *binary* batches ``data_batch_1.bin`` ... ``data_batch_5.bin``  3x32x32     256
               and ``test_batch.bin`` (also under ``cifar-10-batches-bin/``); the
               pickled Python batches are refused (no unpickling, ever)
``digits``     scikit-learn's bundled 8x8 digits (offline), values 0..16               1x8x8       17
PATH.npz       ``uint8`` images: arrays ``train`` (+ ``test``, ``val``) or one array      any         256
PATH.npy       one ``uint8`` array ``(n, H, W)``, ``(n, H, W, C)`` or ``(n, C, H, W)``   any         256
DIR/           a folder of ``.png`` files of one size (grey -> 1 channel, else RGB)    any         256
=============  =====================================================================  ==========  ========

Splits: ``train`` and ``test`` (the official ones for MNIST and CIFAR-10; ``val`` = the last ``val``
training images when ``val > 0``, the usual 50000/10000 MNIST validation split with ``val=10000``).
``digits`` has a fixed split (seeded permutation, seed 0, independent of the training seed):
1257 train / 180 val / 360 test. Arrays without a test split and PNG folders are split at random
(``seed``, ``holdout`` share, default 0.1) like point files.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from .base import DataSourceError, ImageSource, register_data_source
from .mnist import load_mnist

__all__ = [
    "mnist_source",
    "cifar10_source",
    "digits_source",
    "array_image_source",
    "png_folder_source",
    "read_cifar10_bin",
    "to_nchw",
]

_CIFAR_RECORD = 1 + 3 * 32 * 32


def _int_option(name: str, v, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise DataSourceError(f"{name}: expected an integer >= {lo}, got {v!r}")
    return int(v)


def _split_val(train: torch.Tensor, val: int, name: str) -> dict[str, torch.Tensor]:
    val = _int_option("val", val)
    if val == 0:
        return {"train": train}
    if val >= len(train):
        raise DataSourceError(f"{name}: val={val} leaves no training images (have {len(train)})")
    return {"train": train[:-val], "val": train[-val:]}


def _random_split(x: torch.Tensor, *, seed: int, holdout: float, name: str) -> dict[str, torch.Tensor]:
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise DataSourceError(f"holdout: expected a fraction in (0, 1) for {name} (it has no test split), "
                              f"got {holdout!r}")
    n = len(x)
    n_hold = max(1, int(round(holdout * n)))
    if n - n_hold < 1:
        raise DataSourceError(f"{name}: only {n} images, too few to hold out {holdout:.0%}")
    perm = torch.from_numpy(np.random.default_rng([int(seed), 3]).permutation(n))
    return {"train": x[perm[n_hold:]], "test": x[perm[:n_hold]]}


def _pad(x: torch.Tensor, pad_to: int | None, name: str) -> torch.Tensor:
    if pad_to is None:
        return x
    pad_to = _int_option("pad_to", pad_to, 1)
    h, w = x.shape[-2:]
    if pad_to < max(h, w):
        raise DataSourceError(f"pad_to={pad_to} is smaller than the {name} images ({h}x{w})")
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    return torch.nn.functional.pad(x, (left, pad_to - w - left, top, pad_to - h - top), value=0)


# ----------------------------------------------------------------------------- MNIST


@register_data_source("mnist", kind="image", needs_dir=True,
                      help="MNIST from the IDX files in --data-dir (1x28x28, 256 levels; pad_to=32 as in the paper)")
def mnist_source(*, data_dir, seed: int = 0, pad_to: int | None = None, val: int = 0) -> ImageSource:
    try:
        tr, _ = load_mnist(data_dir, "train")
        te, _ = load_mnist(data_dir, "test")
    except (FileNotFoundError, ValueError) as e:
        raise DataSourceError(str(e)) from None
    tr, te = _pad(tr[:, None], pad_to, "MNIST"), _pad(te[:, None], pad_to, "MNIST")
    return ImageSource("mnist", splits={**_split_val(tr, val, "mnist"), "test": te}, levels=256,
                       info={"padded_to": pad_to})


# ----------------------------------------------------------------------------- CIFAR-10


def read_cifar10_bin(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """One official CIFAR-10 *binary* batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes,
    row-major 32x32). Returns ``(images uint8 (n, 3, 32, 32), labels int64 (n,))``."""
    from .sources import regular_file

    p = regular_file(Path(path))
    try:
        raw = np.fromfile(p, dtype=np.uint8)
    except OSError as e:
        raise DataSourceError(f"{p}: cannot read ({e})") from None
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise DataSourceError(f"{p}: {raw.size} bytes is not a whole number of CIFAR-10 binary records "
                              f"({_CIFAR_RECORD} bytes each); is this the binary version (cifar-10-binary.tar.gz)?")
    rec = raw.reshape(-1, _CIFAR_RECORD)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataSourceError(f"{p}: label byte {int(labels.max())} > 9; not a CIFAR-10 binary batch")
    return torch.from_numpy(rec[:, 1:].reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _cifar_dir(root: Path) -> Path:
    for d in (root, root / "cifar-10-batches-bin"):
        if (d / "data_batch_1.bin").is_file():
            return d
    for d in (root, root / "cifar-10-batches-py"):
        if (d / "data_batch_1").is_file():
            raise DataSourceError(f"{d} holds the pickled Python CIFAR-10 batches, which are never unpickled; "
                                  "use the binary version (cifar-10-binary.tar.gz: data_batch_1.bin ...)")
    raise DataSourceError(f"CIFAR-10 binary batches (data_batch_1.bin ... test_batch.bin) not found in {root} "
                          "or its cifar-10-batches-bin/; nothing is downloaded: point --data-dir at your copy")


@register_data_source("cifar10", kind="image", needs_dir=True, aliases=("cifar-10", "cifar"),
                      help="CIFAR-10 from the official binary batches in --data-dir (3x32x32, 256 levels)")
def cifar10_source(*, data_dir, seed: int = 0, val: int = 0) -> ImageSource:
    d = _cifar_dir(Path(data_dir))
    parts = []
    for k in range(1, 6):
        f = d / f"data_batch_{k}.bin"
        if not f.is_file():
            raise DataSourceError(f"CIFAR-10: {f} is missing (need data_batch_1.bin ... data_batch_5.bin)")
        parts.append(read_cifar10_bin(f)[0])
    if not (d / "test_batch.bin").is_file():
        raise DataSourceError(f"CIFAR-10: {d / 'test_batch.bin'} is missing")
    tr, te = torch.cat(parts), read_cifar10_bin(d / "test_batch.bin")[0]
    return ImageSource("cifar10", splits={**_split_val(tr, val, "cifar10"), "test": te}, levels=256)


# ----------------------------------------------------------------------------- sklearn digits

DIGITS_SPLIT = (1257, 180, 360)  # train / val / test, seeded permutation (seed 0)


@register_data_source("digits", kind="image",
                      help="scikit-learn's 8x8 digits, offline (1x8x8, 17 grey levels; 1257/180/360 split)")
def digits_source(*, data_dir=None, seed: int = 0) -> ImageSource:
    from sklearn.datasets import load_digits

    x = load_digits().images  # (1797, 8, 8) float64 with integer values 0..16
    x = torch.from_numpy(np.rint(x).astype(np.uint8))[:, None]
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    n_tr, n_va, _ = DIGITS_SPLIT
    splits = {"train": x[perm[:n_tr]], "val": x[perm[n_tr:n_tr + n_va]], "test": x[perm[n_tr + n_va:]]}
    return ImageSource("digits", splits=splits, levels=17)


# ----------------------------------------------------------------------------- arrays and folders


def to_nchw(a: np.ndarray, name: str, layout: str = "auto") -> np.ndarray:
    """``(n, H, W)`` / ``(n, H, W, C)`` / ``(n, C, H, W)`` -> ``(n, C, H, W)``; C in {1, 3} (``auto`` guesses
    from which axis has 1 or 3 entries and refuses when both could be)."""
    if layout not in ("auto", "nchw", "nhwc"):
        raise DataSourceError(f"layout: expected 'auto', 'nchw' or 'nhwc', got {layout!r}")
    if a.ndim == 3:
        return a[:, None]
    if a.ndim != 4:
        raise DataSourceError(f"{name}: expected images (n, H, W), (n, H, W, C) or (n, C, H, W), got shape {a.shape}")
    if layout == "auto":
        first, last = a.shape[1] in (1, 3), a.shape[3] in (1, 3)
        if first == last:
            raise DataSourceError(f"{name}: cannot tell the channel axis of shape {a.shape}; pass layout='nchw' "
                                  "or 'nhwc'")
        layout = "nchw" if first else "nhwc"
    a = a if layout == "nchw" else a.transpose(0, 3, 1, 2)
    if a.shape[1] not in (1, 3):
        raise DataSourceError(f"{name}: {a.shape[1]} channels; expected 1 (grey) or 3 (RGB)")
    return np.ascontiguousarray(a)


def _as_uint8(a: np.ndarray, name: str, levels: int) -> torch.Tensor:
    if a.dtype.kind not in "ui":
        raise DataSourceError(f"{name}: images must be integers 0..{levels - 1} (uint8), got dtype {a.dtype}; "
                              "convert float images with np.round(x * 255).astype(np.uint8)")
    if a.size and (a.min() < 0 or a.max() >= levels):
        raise DataSourceError(f"{name}: pixel values must lie in 0..{levels - 1}, found {a.min()}..{a.max()}")
    return torch.from_numpy(a.astype(np.uint8))


def _npy_header(fh) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(fh)
    return tuple(shape), np.dtype(dtype)


def _check_array_sizes(p: Path) -> None:
    """Refuse an array whose header claims more data than the file holds, before anything is allocated."""
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                for info in z.infolist():
                    with z.open(info) as fh:
                        shape, dtype = _npy_header(fh)
                    if math.prod(shape) * dtype.itemsize > info.file_size:
                        raise DataSourceError(f"{p}: array {info.filename} claims shape {shape} ({dtype}), more "
                                              f"than its {info.file_size} bytes (truncated or forged header)")
        else:
            with open(p, "rb") as fh:
                shape, dtype = _npy_header(fh)
            if math.prod(shape) * dtype.itemsize > p.stat().st_size:
                raise DataSourceError(f"{p}: header claims shape {shape} ({dtype}), more than the file's "
                                      f"{p.stat().st_size} bytes (truncated or forged header)")
    except DataSourceError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataSourceError(f"{p}: not a readable .npy/.npz array file ({str(e)[:120]})") from None


def array_image_source(path: str | os.PathLike, *, seed: int = 0, holdout: float = 0.1, levels: int = 256,
                       layout: str = "auto") -> ImageSource:
    """Images from a ``.npy`` array or a ``.npz`` archive (``train`` [+ ``test``, ``val``] or a single array);
    never unpickles."""
    p = Path(path)
    name = str(p.resolve())
    _check_array_sizes(p)
    try:
        loaded = np.load(p, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                keys = list(loaded.files)
                if "train" in keys:
                    arrays = {k: loaded[k] for k in ("train", "val", "test") if k in keys}
                elif len(keys) == 1:
                    arrays = {"all": loaded[keys[0]]}
                else:
                    raise DataSourceError(f"{p}: a .npz with several arrays needs one called 'train' (and "
                                          f"optionally 'test', 'val'); found {keys}")
        else:
            arrays = {"all": loaded}
    except DataSourceError:
        raise
    except ValueError as e:
        raise DataSourceError(f"{p}: not a numeric array file ({e}); pickled/object arrays are refused") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataSourceError(f"{p}: cannot read ({e})") from None
    t = {k: _as_uint8(to_nchw(v, f"{p.name}[{k}]", layout), f"{p.name}[{k}]", levels) for k, v in arrays.items()}
    shapes = {tuple(v.shape[1:]) for v in t.values()}
    if len(shapes) != 1:
        raise DataSourceError(f"{p}: the arrays have different image shapes {sorted(shapes)}")
    if "all" in t:
        splits = _random_split(t["all"], seed=seed, holdout=holdout, name=p.name)
    elif "test" not in t:
        splits = {**_random_split(t["train"], seed=seed, holdout=holdout, name=p.name),
                  **({"val": t["val"]} if "val" in t else {})}
    else:
        splits = t
    return ImageSource(name, splits=splits, levels=levels, info={"file": name})


def png_folder_source(path: str | os.PathLike, *, seed: int = 0, holdout: float = 0.1,
                      levels: int = 256) -> ImageSource:
    """All ``*.png`` files under a folder (recursively, sorted), one size; greyscale if every file is."""
    from PIL import Image

    root = Path(path)
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() == ".png" and f.is_file())
    if not files:
        raise DataSourceError(f"{root}: no .png files in this folder")
    imgs, grey = [], True
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                grey &= im.mode in ("1", "L", "LA", "I;16", "I")
                imgs.append(im.copy())
        except OSError as e:
            raise DataSourceError(f"{f}: not a readable PNG ({e})") from None
    arrs = [np.asarray(im.convert("L" if grey else "RGB")) for im in imgs]
    sizes = {a.shape[:2] for a in arrs}
    if len(sizes) != 1:
        raise DataSourceError(f"{root}: PNG files have different sizes {sorted(sizes)[:4]}; resize them to one size")
    x = np.stack(arrs)
    x = x[:, None] if grey else x.transpose(0, 3, 1, 2)
    t = _as_uint8(np.ascontiguousarray(x), root.name, levels)
    return ImageSource(str(root.resolve()), splits=_random_split(t, seed=seed, holdout=holdout, name=root.name),
                       levels=levels, info={"files": len(files)})
