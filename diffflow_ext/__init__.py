"""diffflow_ext: Diffusion Normalizing Flow (Zhang & Chen, NeurIPS 2021) for PyTorch.

``DiffFlow`` is the model; ``ops`` holds the fused step ops and their reference twins;
``available_backends()`` says which kernels this install has.
"""

from . import ops
from .model import GRADIENT_MODES, DiffFlow, NLLBound
from .networks import SinusoidalTimeEmbedding, TimeMLP
from .ops import available_backends
from .samplers import SAMPLERS
from .schedules import Diffusion, ProgressiveSteps

__all__ = [
    "DiffFlow",
    "NLLBound",
    "GRADIENT_MODES",
    "TimeMLP",
    "SinusoidalTimeEmbedding",
    "Diffusion",
    "ProgressiveSteps",
    "SAMPLERS",
    "ops",
    "available_backends",
]
__version__ = "0.1.0"
