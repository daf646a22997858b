"""Datasets: procedural 2-D toys (:mod:`.toy2d`), users' point files (:mod:`.files`), local MNIST."""

from . import toy2d
from .files import DataFileError, load_points
from .mnist import load_mnist
from .toy2d import DATASETS, UnknownDatasetError

__all__ = ["toy2d", "DATASETS", "UnknownDatasetError", "load_points", "DataFileError", "load_mnist"]
