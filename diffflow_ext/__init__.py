"""diffflow_ext: Diffusion Normalizing Flow (Zhang & Chen, NeurIPS 2021) for PyTorch."""

from . import ops
from .ops import available_backends

__all__ = ["ops", "available_backends"]
__version__ = "0.1.0"
