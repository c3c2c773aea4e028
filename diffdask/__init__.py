"""diffdask: Dask-distributed analysis of X-ray diffraction frame stacks."""

from diffdask.blocks import map_frames, pair_blocks, reduce_frames
from diffdask.errors import (
    BackendError,
    ClusterError,
    DiffdaskError,
    GeometryError,
    IncompleteStoreError,
    NonFinitePixelsWarning,
    ParameterError,
    SchemaError,
    StoreExistsError,
    StoreFormatError,
    StoreNotFoundError,
)
from diffdask.frames import get_geometry, get_mask, make_frame_stack, validate
from diffdask.geometry import Geometry

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "ClusterError",
    "DiffdaskError",
    "Geometry",
    "GeometryError",
    "IncompleteStoreError",
    "NonFinitePixelsWarning",
    "ParameterError",
    "SchemaError",
    "StoreExistsError",
    "StoreFormatError",
    "StoreNotFoundError",
    "__version__",
    "get_geometry",
    "get_mask",
    "make_frame_stack",
    "map_frames",
    "pair_blocks",
    "reduce_frames",
    "validate",
]
