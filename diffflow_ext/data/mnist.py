"""Local MNIST loader for the original gzipped IDX files (never downloads).

``load_mnist(root, split="train")`` looks for ``train-images-idx3-ubyte.gz`` (etc., also uncompressed)
in ``root``, ``root/raw`` and ``root/MNIST/raw`` (torchvision's layout).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_mnist", "read_idx"]

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally ``.gz``) into a numpy array, validating the header and size."""
    from .files import DataFileError, check_regular_file

    p = Path(path)
    try:
        check_regular_file(p)  # FIFOs / devices refused without opening
    except DataFileError as e:
        raise ValueError(str(e)) from None
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{p}: cannot read IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{p}: not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    dt = np.dtype(_DTYPES[data[2]])
    need = int(np.prod(dims)) * dt.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != need:
        raise ValueError(f"{p}: IDX payload has {len(body)} bytes, header says {need} (truncated file?)")
    return np.frombuffer(body, dtype=dt).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for d in (root, root / "raw", root / "MNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    raise FileNotFoundError(
        f"MNIST file {stem}(.gz) not found under {root} (looked in ., raw/, MNIST/raw/); "
        "this loader never downloads: point it at your copy of the IDX files"
    )


def load_mnist(root: str | os.PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (n, 28, 28), labels int64 (n,))`` for ``split`` in {"train", "test"}."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    root = Path(root)
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"MNIST {split}: inconsistent shapes {images.shape} / {labels.shape}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
