"""diffdask: Dask-distributed analysis of X-ray diffraction frame stacks.

The public API is re-exported here lazily (PEP 562): ``import diffdask`` loads no submodule,
and ``diffdask.summarize`` imports `diffdask.reduce` on first use. No module of the package
imports this one, so importing any part of diffdask never runs through the root (the import
graph is checked by ``tests/test_architecture.py``).
"""

from __future__ import annotations

import importlib
from typing import Any

from diffdask._version import __version__

#: Where each public name lives: ``{module: names}``; a name that is a submodule of
#: diffdask (``latent``, ``metrics``, ``backend``) is listed under its own module.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "diffdask.backend": ("backend", "gpu_available", "to_cpu", "to_gpu"),
    "diffdask.blocks": ("generate_frames", "map_frames", "pair_blocks", "reduce_frames"),
    "diffdask.cluster": ("connect",),
    "diffdask.commonlines": ("AbsoluteEmbedding", "cc_matrix", "CLPCA", "clpca", "embed", "line_samples", "rotation_invariant_features"),
    "diffdask.emc": ("bootstrap", "EMC2D", "EMC3D", "EMCDetector", "EMCResult", "Detector3D", "quaternion_set"),
    "diffdask.errors": ("BackendError", "ClusterError", "DiffdaskError", "GeometryError", "IncompleteStoreError", "NonFinitePixelsWarning", "ParameterError", "SchemaError", "StoreExistsError", "StoreFormatError", "StoreNotFoundError"),
    "diffdask.frames": ("get_geometry", "get_mask", "make_frame_stack", "validate"),
    "diffdask.geometry": ("Geometry",),
    "diffdask.io": ("ingest_hdf5", "list_results", "open_frames", "open_hdf5", "open_results", "save_frames", "save_results", "store_info"),
    "diffdask.io.dragonfly": ("read_emc", "read_emc_output", "write_emc", "write_emc_output"),
    "diffdask.latent": ("fit_latent", "flag_outliers", "latent", "LatentModel", "sort_single_hits"),
    "diffdask.metrics": ("metrics",),
    "diffdask.reduce": ("center_of_mass", "find_hits", "fit_sphere_diameter", "integrate1d", "integrate2d", "lit_pixels", "mean_profile", "psd_contrast", "radial_profile", "size_filter", "summarize"),
    "diffdask.refine": ("refine_geometry", "refine_run_geometry"),
    "diffdask.roi": ("differential_phase", "find_roi", "grow_roi", "scan_grid", "scan_maps"),
    "diffdask.simulate": ("detector_mask", "Particle", "simulate_bragg", "simulate_ptycho", "simulate_spi"),
}

_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted([*_WHERE, "__version__"], key=str.lower)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'diffdask' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module == f"diffdask.{name}" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
