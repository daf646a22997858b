"""Data sources: one registry for 2-D toys, users' point files, tabular sets and image sets.

    from diffflow_ext.data import get_data_source
    src = get_data_source("digits")                        # or "checkerboard", "mnist" (data_dir=...), "x.npy"
    x = src.train_batch(128, np.random.default_rng(0))     # model space, (128, *src.shape)
    test = src.heldout()                                    # data space (uint8 images / float64 points)

See :mod:`.base` for the :class:`DataSource` interface, :mod:`.images` and :mod:`.tabular` for the sets.
"""

from . import sources, toy2d  # sources: registers the built-in sources
from .base import (
    DATA_KINDS,
    DATA_SOURCES,
    DataSource,
    DataSourceError,
    Dequantize,
    ImageSource,
    Standardize,
    Transform,
    UnknownDataSourceError,
    data_source_from_state,
    data_source_names,
    data_source_options,
    get_data_source,
    register_data_source,
)
from .files import DataFileError, load_points
from .mnist import load_mnist
from .toy2d import DATASETS, UnknownDatasetError

__all__ = [
    "sources", "toy2d", "DATASETS", "UnknownDatasetError", "load_points", "DataFileError", "load_mnist",
    "DATA_KINDS", "DATA_SOURCES", "DataSource", "DataSourceError", "UnknownDataSourceError", "ImageSource",
    "Transform", "Standardize", "Dequantize", "register_data_source", "get_data_source", "data_source_names",
    "data_source_options", "data_source_from_state",
]
