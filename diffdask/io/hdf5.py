"""HDF5 and CXI input: lazy frame stacks over HDF5 datasets, and streaming ingest into Zarr.

Frames are read per Dask chunk by the worker that needs them (the file is opened inside the
task), so files larger than memory stream through in bounded memory, and the HDF5 chunking
need not match the store's.

CXI files (cxidb.org) carry more than the frames; when present these are picked up:

- ``entry_1/instrument_1/detector_1/mask``: 2-D pixel mask, 0 = good (CXI bit flags);
- ``.../detector_1/distance``, ``x_pixel_size``, ``y_pixel_size`` (m) and
  ``entry_1/instrument_1/source_1/wavelength`` (m) or ``energy`` (J): the geometry;
- ``.../detector_1/corner_position`` (x, y, z of the first pixel's outer corner relative to
  the beam, m): the beam centre.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import dask.array as da
import h5py
import numpy as np
import xarray as xr
from dask.base import tokenize

from diffdask.errors import SchemaError, StoreFormatError
from diffdask.frames import frames_per_chunk, make_frame_stack
from diffdask.geometry import Geometry
from diffdask.io.location import Location

CXI_DATA = "entry_1/data_1/data"
CXI_DETECTOR = "entry_1/instrument_1/detector_1"
CXI_SOURCE = "entry_1/instrument_1/source_1"
#: Planck constant × speed of light, J·m (exact SI values).
HC_J_M = 6.62607015e-34 * 299792458.0


def _open_file(loc: Location) -> h5py.File:
    try:
        if loc.is_local:
            return h5py.File(loc.fs_path, "r")
        return h5py.File(loc.fs.open(loc.fs_path, "rb"), "r")
    except OSError as exc:
        raise StoreFormatError(
            f"{loc.url!r} cannot be read as HDF5 ({exc}); the file is truncated, corrupt or still "
            "being written. Copy it again from the source."
        ) from exc


class _HDF5Frames:
    """Array-like view of an HDF5 dataset that opens the file on every read (picklable)."""

    def __init__(self, loc: Location, dataset: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.loc, self.dataset, self.shape, self.dtype = loc, dataset, shape, dtype
        self.ndim = len(shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        with _open_file(self.loc) as f:
            try:
                return np.asarray(f[self.dataset][key])
            except (OSError, KeyError) as exc:
                raise StoreFormatError(
                    f"reading {self.dataset!r}[{key}] from {self.loc.url!r} failed ({exc}); the file is "
                    "truncated or corrupt."
                ) from exc


def _datasets_3d(f: h5py.File) -> list[str]:
    found: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.ndim == 3:
            found.append(name)

    f.visititems(visit)
    return found


def _scalar(f: h5py.File, path: str) -> float | None:
    if path not in f:
        return None
    return float(np.asarray(f[path][()]).ravel()[0])


def _cxi_geometry(f: h5py.File, shape: tuple[int, int]) -> Geometry | None:
    distance = _scalar(f, f"{CXI_DETECTOR}/distance")
    px = _scalar(f, f"{CXI_DETECTOR}/x_pixel_size")
    py = _scalar(f, f"{CXI_DETECTOR}/y_pixel_size")
    wavelength = _scalar(f, f"{CXI_SOURCE}/wavelength")
    if wavelength is None:
        energy = _scalar(f, f"{CXI_SOURCE}/energy")
        wavelength = HC_J_M / energy if energy else None
    if distance is None or px is None or wavelength is None:
        return None
    py = py or px
    center = None
    if f"{CXI_DETECTOR}/corner_position" in f:
        corner = np.asarray(f[f"{CXI_DETECTOR}/corner_position"][()], dtype=float).ravel()
        # The corner is the outer corner of pixel (0, 0); its centre is half a pixel inside.
        center = (-corner[1] / py - 0.5, -corner[0] / px - 0.5)
    return Geometry(shape, (py, px), distance, wavelength, center)


def _cxi_mask(f: h5py.File, shape: tuple[int, int]) -> np.ndarray | None:
    path = f"{CXI_DETECTOR}/mask"
    if path not in f:
        return None
    m = np.asarray(f[path][()])
    if m.shape != shape:
        warnings.warn(
            f"ignoring CXI mask {path} of shape {m.shape} (not one {shape} detector mask); pass mask=... "
            "to give the good-pixel mask explicitly.",
            UserWarning,
            stacklevel=3,
        )
        return None
    return m == 0


def open_hdf5(
    src: Any,
    dataset: str = CXI_DATA,
    mask: Any = None,
    geometry: Geometry | None = None,
    chunks: int | None = None,
    per_frame: Mapping[str, str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Open an HDF5 dataset of frames as a lazy frame stack.

    Parameters
    ----------
    src : str or os.PathLike
        HDF5 or CXI file (local path or fsspec URL).
    dataset : str
        Path of the 3-D (frame, y, x) dataset inside the file.
    mask : array_like of bool or str, optional
        Good-pixel mask (True = good), or the path of a mask dataset in the file in the CXI
        convention (0 = good, any set bit = bad). Defaults to the CXI detector mask if present.
    geometry : Geometry, optional
        Detector geometry; defaults to the one in the CXI metadata if complete.
    chunks : int, optional
        Frames per Dask chunk (≈ 96 MiB by default), independent of the HDF5 chunking.
    per_frame : mapping of str to str, optional
        Per-frame variables to carry along: ``{name: HDF5 path}`` of datasets whose first axis
        runs over the frames (labels, scan positions, photon energies), read lazily.
    storage_options : mapping, optional
        fsspec options for remote files.

    Returns
    -------
    xarray.Dataset
        Frame stack; attrs ``source`` and ``source_dataset`` record the origin.

    Raises
    ------
    StoreNotFoundError
        The file does not exist.
    StoreFormatError
        Not an HDF5 file, truncated or corrupt, or ``dataset`` is not in it.
    SchemaError
        The dataset is not 3-D numeric frames, or the mask does not fit.
    """
    loc = Location.of(src, storage_options)
    loc.require()
    if not loc.is_hdf5_file():
        raise StoreFormatError(
            f"{loc.url!r} is not an HDF5 file (no HDF5 signature); give an HDF5/CXI file or open a Zarr "
            "store with open_frames."
        )
    with _open_file(loc) as f:
        if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
            candidates = _datasets_3d(f)
            raise StoreFormatError(
                f"{loc.url!r} has no dataset {dataset!r}. 3-D datasets in the file: "
                f"{candidates or 'none'}; pass one as dataset=..."
            )
        d = f[dataset]
        shape, dtype = tuple(int(s) for s in d.shape), d.dtype
        if len(shape) != 3:
            raise SchemaError(
                f"{dataset!r} in {loc.url!r} has shape {shape}; diffdask needs a 3-D (frame, y, x) stack."
            )
        frame_shape = shape[1:]
        if isinstance(mask, str):
            if mask not in f:
                raise StoreFormatError(f"{loc.url!r} has no mask dataset {mask!r}.")
            mask = np.asarray(f[mask][()]) == 0
        elif mask is None:
            mask = _cxi_mask(f, frame_shape)
        if geometry is None:
            geometry = _cxi_geometry(f, frame_shape)
        extra = {}
        for name, path in (per_frame or {}).items():
            if path not in f or not isinstance(f[path], h5py.Dataset):
                raise StoreFormatError(f"{loc.url!r} has no dataset {path!r} (per-frame variable {name!r}).")
            if f[path].ndim == 0 or f[path].shape[0] != shape[0]:
                raise SchemaError(
                    f"per-frame dataset {path!r} has shape {f[path].shape}; its first axis must have one "
                    f"entry per frame ({shape[0]})."
                )
            extra[name] = (path, tuple(int(s) for s in f[path].shape), f[path].dtype)
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise SchemaError(f"{dataset!r} in {loc.url!r} holds {dtype}, not numeric photon counts.")
    n = chunks or frames_per_chunk(frame_shape, dtype)
    stamp = (loc.fs.info(loc.fs_path).get("size"), loc.fs.modified(loc.fs_path) if loc.is_local else None)

    def lazy(path: str, shape: tuple[int, ...], dtype: np.dtype) -> da.Array:
        return da.from_array(
            _HDF5Frames(loc, path, shape, dtype),
            chunks=(n,) + (-1,) * (len(shape) - 1),
            name=f"hdf5-{tokenize(loc.url, path, stamp)}",
            meta=np.empty((0,) * len(shape), dtype=dtype),
            asarray=True,
            fancy=False,
        )

    return make_frame_stack(
        lazy(dataset, shape, dtype),
        mask=mask,
        geometry=geometry,
        per_frame={name: lazy(*spec) for name, spec in extra.items()},
        attrs={"source": loc.url, "source_dataset": dataset},
        chunks=n,
    )
