"""Frechet Inception Distance with torch-fidelity and an Inception weights file the user provides.

Install the extra (``pip install ".[fid]"``) and pass the weights of torch-fidelity's InceptionV3
(``weights-inception-2015-12-05-6726825d.pth``, the TF-FID port) with ``--fid-weights PATH`` or the
environment variable ``DIFFFLOW_FID_WEIGHTS``. Nothing is ever downloaded. The weights file is read with
``torch.load(weights_only=True)`` (no arbitrary unpickling); ``.safetensors`` files work as well.

Images are ``uint8`` ``(n, C, H, W)``; grey images are repeated to 3 channels (the usual MNIST FID) and the
extractor resizes to 299x299 itself. FID uses torch-fidelity's statistics (``fid_features_to_statistics``,
``fid_statistics_to_metric``) on the 2048-d pool features. Any callable ``uint8 (B, 3, H, W) -> (B, F)``
can stand in for Inception (``extractor=``), which is how the plumbing is tested.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["FID_ENV", "FIDError", "resolve_fid_weights", "inception_extractor", "extract_features",
           "fid_from_features", "compute_fid"]

FID_ENV = "DIFFFLOW_FID_WEIGHTS"


class FIDError(RuntimeError):
    """FID cannot be computed (missing extra, missing or unreadable weights); one line saying what to do."""


def resolve_fid_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file from ``path`` (``--fid-weights``) or ``$DIFFFLOW_FID_WEIGHTS``; a clear error if neither."""
    src = "--fid-weights"
    if path is None or str(path) == "":
        path, src = os.environ.get(FID_ENV) or None, FID_ENV
    if path is None:
        raise FIDError(f"FID needs the Inception weights file: pass --fid-weights PATH or set {FID_ENV} "
                       "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth; nothing is downloaded)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FIDError(f"{src} {p}: no such file (the Inception weights for FID)")
    return p


def _load_state_dict(p: Path) -> dict:
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any failure is a bad weights file
        raise FIDError(f"{p}: not a readable Inception weights file ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FIDError(f"{p}: expected a state dict of tensors (torch-fidelity's InceptionV3 weights)")
    return sd


_EXTRACTORS: dict[tuple, Callable] = {}
_REFERENCE_STATS: OrderedDict[tuple, dict] = OrderedDict()


def inception_extractor(weights: str | os.PathLike | None = None, *, device=None
                        ) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch-fidelity's InceptionV3 (2048-d pool features) with the given weights file, on ``device``.

    Built once per (file, size, modification time, device) in a process: periodic evaluations reuse it."""
    p = resolve_fid_weights(weights)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, str(device or "cpu"))
    if key not in _EXTRACTORS:
        _EXTRACTORS.clear()  # one network at a time (~100 MB)
        _EXTRACTORS[key] = _build_inception(p, device)
    return _EXTRACTORS[key]


def _build_inception(p: Path, device) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise FIDError('FID needs torch-fidelity: pip install ".[fid]"') from None
    sd = _load_state_dict(p)
    # torch-fidelity loads its weights file with an unrestricted torch.load; hand it a file we just wrote from
    # the safely loaded tensors instead of the user's file.
    with tempfile.TemporaryDirectory() as d:
        safe = Path(d) / "inception.pt"
        torch.save(sd, safe)
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(safe))
        except RuntimeError as e:
            raise FIDError(f"{p}: these are not torch-fidelity's InceptionV3 weights ({str(e)[:120]})") from None
    net = net.to(device or "cpu").eval()

    def extract(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(x.to(net.fc.weight.device))[0]

    return extract


def extract_features(images: torch.Tensor, extractor: Callable[[torch.Tensor], torch.Tensor], *,
                     batch_size: int = 100) -> torch.Tensor:
    """Features ``(n, F)`` float64 (CPU) of ``uint8`` images ``(n, C, H, W)`` (C = 1 is repeated to 3)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images: expected a uint8 tensor (n, C, H, W), got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected 1 or 3 channels, got {images.shape[1]}")
    feats = []
    for i in range(0, len(images), batch_size):
        b = images[i:i + batch_size]
        if b.shape[1] == 1:
            b = b.expand(-1, 3, -1, -1).contiguous()
        feats.append(extractor(b).detach().double().cpu().reshape(len(b), -1))
    return torch.cat(feats)


def _statistics(f: torch.Tensor) -> dict:
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(f.double().cpu())


def _fid(s1: dict, s2: dict) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return float(fid_statistics_to_metric(s1, s2, False)[KEY_METRIC_FID])


def fid_from_features(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """FID between two feature sets ``(n, F)`` (torch-fidelity's statistics and matrix square root)."""
    if len(f1) < 2 or len(f2) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(f1)} and {len(f2)}")
    return _fid(_statistics(f1), _statistics(f2))


def compute_fid(
    samples: torch.Tensor,
    reference: torch.Tensor,
    *,
    weights: str | os.PathLike | None = None,
    extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reference_split: str = "test",
    batch_size: int = 100,
    device=None,
) -> dict:
    """FID of ``samples`` against ``reference`` (both ``uint8`` ``(n, C, H, W)``).

    Returns ``{"fid", "fid_n_samples", "fid_n_reference", "fid_reference_split", "fid_features"}`` so every
    reported FID states its sample count and reference split (FID is biased upwards at small n). The
    reference statistics are cached in the process (keyed by the extractor and the reference's content
    hash), so periodic evaluations extract the reference features once.
    """
    from ..data.base import sha256_array

    if len(samples) < 2 or len(reference) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(samples)} and {len(reference)}")
    ext = extractor if extractor is not None else inception_extractor(weights, device=device)
    key = (ext, sha256_array(reference))
    ref_stats = _REFERENCE_STATS.get(key)
    if ref_stats is None:
        ref_stats = _statistics(extract_features(reference, ext, batch_size=batch_size))
        _REFERENCE_STATS[key] = ref_stats
        while len(_REFERENCE_STATS) > 4:
            _REFERENCE_STATS.popitem(last=False)
    fid = _fid(_statistics(extract_features(samples, ext, batch_size=batch_size)), ref_stats)
    return {"fid": fid, "fid_n_samples": int(len(samples)), "fid_n_reference": int(len(reference)),
            "fid_reference_split": reference_split,
            "fid_features": "inception-v3-compat pool 2048" if extractor is None else getattr(
                extractor, "__name__", type(extractor).__name__)}
