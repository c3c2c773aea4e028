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
from diffdask.reduce import (
    center_of_mass,
    find_hits,
    fit_sphere_diameter,
    lit_pixels,
    mean_profile,
    psd_contrast,
    radial_profile,
    size_filter,
    summarize,
)

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
    "center_of_mass",
    "find_hits",
    "fit_sphere_diameter",
    "get_geometry",
    "get_mask",
    "lit_pixels",
    "make_frame_stack",
    "map_frames",
    "mean_profile",
    "pair_blocks",
    "psd_contrast",
    "radial_profile",
    "reduce_frames",
    "size_filter",
    "summarize",
    "validate",
]
