"""Evaluation: data-space likelihoods (bits/dim done right), sample metrics, FID, checkpoint evaluation.

* :func:`bits_per_dim` / :func:`data_nll` -- negative ELBO or probability-flow ODE likelihood on a held-out
  split, in data space (dequantisation and the scaling's log-Jacobian included; see :mod:`.bits`);
* :func:`sliced_wasserstein`, :func:`wasserstein2_emd`, :func:`fraction_in_support` -- sample metrics;
* :func:`compute_fid` -- FID with torch-fidelity and user-provided Inception weights (:mod:`.fid`);
* :func:`evaluate_model`, :func:`evaluate_checkpoint` -- everything at once (``metrics.json``, ``diffflow eval``).
"""

from .bits import BOUNDS, BitsPerDim, bits_per_dim, bpd_offset, data_nll
from .fid import FID_ENV, FIDError, compute_fid, fid_from_features, inception_extractor, resolve_fid_weights
from .report import batch_seed, evaluate_checkpoint, evaluate_model, sample_model, sampling_seed
from .samples import fraction_in_support, sliced_wasserstein, wasserstein2_emd

__all__ = [
    "BOUNDS", "BitsPerDim", "bits_per_dim", "bpd_offset", "data_nll",
    "FID_ENV", "FIDError", "compute_fid", "fid_from_features", "inception_extractor", "resolve_fid_weights",
    "batch_seed", "evaluate_checkpoint", "evaluate_model", "sample_model", "sampling_seed",
    "fraction_in_support", "sliced_wasserstein", "wasserstein2_emd",
]
