"""diffdask: Dask-distributed analysis of X-ray diffraction frame stacks."""

from diffdask.blocks import map_frames, pair_blocks, reduce_frames
from diffdask.cluster import connect
from diffdask.commonlines import (
    CLPCA,
    AbsoluteEmbedding,
    cc_matrix,
    clpca,
    embed,
    line_samples,
    rotation_invariant_features,
)
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
from diffdask.io import (
    ingest_hdf5,
    list_results,
    open_frames,
    open_hdf5,
    open_results,
    save_frames,
    save_results,
    store_info,
)

__version__ = "0.1.0"

__all__ = [
    "CLPCA",
    "AbsoluteEmbedding",
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
    "cc_matrix",
    "clpca",
    "connect",
    "embed",
    "get_geometry",
    "get_mask",
    "ingest_hdf5",
    "line_samples",
    "list_results",
    "make_frame_stack",
    "map_frames",
    "open_frames",
    "open_hdf5",
    "open_results",
    "pair_blocks",
    "reduce_frames",
    "rotation_invariant_features",
    "save_frames",
    "save_results",
    "store_info",
    "validate",
]
