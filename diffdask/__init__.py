"""diffdask: Dask-distributed analysis of X-ray diffraction frame stacks."""

from diffdask import latent, metrics
from diffdask.blocks import generate_frames, map_frames, pair_blocks, reduce_frames
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
from diffdask.latent import LatentModel, fit_latent, flag_outliers, sort_single_hits
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
from diffdask.refine import refine_geometry, refine_run_geometry
from diffdask.roi import differential_phase, find_roi, grow_roi, scan_grid, scan_maps
from diffdask.simulate import (
    Particle,
    detector_mask,
    simulate_bragg,
    simulate_ptycho,
    simulate_spi,
)

__version__ = "0.1.0"

__all__ = [
    "AbsoluteEmbedding",
    "BackendError",
    "CLPCA",
    "ClusterError",
    "DiffdaskError",
    "EMC2D",
    "EMCDetector",
    "EMCResult",
    "Geometry",
    "GeometryError",
    "IncompleteStoreError",
    "LatentModel",
    "NonFinitePixelsWarning",
    "ParameterError",
    "Particle",
    "SchemaError",
    "StoreExistsError",
    "StoreFormatError",
    "StoreNotFoundError",
    "__version__",
    "bootstrap",
    "cc_matrix",
    "center_of_mass",
    "clpca",
    "connect",
    "detector_mask",
    "differential_phase",
    "embed",
    "find_hits",
    "fit_latent",
    "find_roi",
    "fit_sphere_diameter",
    "flag_outliers",
    "generate_frames",
    "get_geometry",
    "get_mask",
    "grow_roi",
    "ingest_hdf5",
    "latent",
    "line_samples",
    "list_results",
    "lit_pixels",
    "make_frame_stack",
    "map_frames",
    "mean_profile",
    "metrics",
    "open_frames",
    "open_hdf5",
    "open_results",
    "pair_blocks",
    "psd_contrast",
    "radial_profile",
    "read_emc",
    "read_emc_output",
    "reduce_frames",
    "refine_geometry",
    "refine_run_geometry",
    "rotation_invariant_features",
    "save_frames",
    "save_results",
    "scan_grid",
    "scan_maps",
    "simulate_bragg",
    "simulate_ptycho",
    "simulate_spi",
    "size_filter",
    "sort_single_hits",
    "store_info",
    "summarize",
    "validate",
    "write_emc",
    "write_emc_output",
]
