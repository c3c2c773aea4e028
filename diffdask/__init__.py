"""diffdask: Dask-distributed analysis of X-ray diffraction frame stacks."""

from diffdask.blocks import generate_frames, map_frames, pair_blocks, reduce_frames
from diffdask.cluster import connect
from diffdask.emc import EMC2D, EMCDetector, EMCResult, bootstrap
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
from diffdask.io.dragonfly import read_emc, read_emc_output, write_emc, write_emc_output
from diffdask.simulate import Particle, detector_mask, simulate_bragg, simulate_ptycho, simulate_spi
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
from diffdask.roi import find_roi, grow_roi, scan_grid, scan_maps

__version__ = "0.1.0"

__all__ = [
    "EMC2D",
    "EMCDetector",
    "EMCResult",
    "BackendError",
    "ClusterError",
    "DiffdaskError",
    "Geometry",
    "GeometryError",
    "IncompleteStoreError",
    "NonFinitePixelsWarning",
    "ParameterError",
    "Particle",
    "SchemaError",
    "StoreExistsError",
    "StoreFormatError",
    "StoreNotFoundError",
    "__version__",
    "bootstrap",
    "connect",
    "detector_mask",
    "generate_frames",
    "center_of_mass",
    "connect",
    "find_hits",
    "find_roi",
    "fit_sphere_diameter",
    "get_geometry",
    "get_mask",
    "grow_roi",
    "ingest_hdf5",
    "list_results",
    "lit_pixels",
    "make_frame_stack",
    "map_frames",
    "mean_profile",
    "open_frames",
    "open_hdf5",
    "open_results",
    "pair_blocks",
    "read_emc",
    "read_emc_output",
    "reduce_frames",
    "save_frames",
    "save_results",
    "scan_grid",
    "scan_maps",
    "simulate_bragg",
    "simulate_ptycho",
    "simulate_spi",
    "psd_contrast",
    "radial_profile",
    "reduce_frames",
    "save_frames",
    "save_results",
    "size_filter",
    "store_info",
    "summarize",
    "validate",
    "write_emc",
    "write_emc_output",
]
