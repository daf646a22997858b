"""Baselines a user would pick instead of DiffFlow, in the same interface: a fixed-drift (DDPM-like)
diffusion trained by denoising score matching or by the DiffFlow objective, and zuko's neural spline flow."""

from .fixed_drift import LinearDrift, dsm_loss, fixed_drift_diffusion, time_features_for, transition
from .nsf import NSF, zuko_available

__all__ = ["LinearDrift", "dsm_loss", "fixed_drift_diffusion", "time_features_for", "transition", "NSF",
           "zuko_available"]
