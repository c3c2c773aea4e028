"""Dragonfly interoperability: sparse ``.emc`` photon files, HDF5 detector files, EMC outputs.

Dragonfly (Ayyer et al. 2016, J. Appl. Cryst. 49, 1320) stores photons as a sparse list per frame
over the pixels of a detector file. diffdask reads them into an ordinary frame stack:

- ``frames`` (frame, y, x) photon counts; the Dragonfly pixel ``t`` sits at the grid position
  given by its detector-plane coordinates (row from Dragonfly's x, column from its y, so frames
  and EMC models share one orientation);
- ``emc_mask`` (y, x) uint8 with Dragonfly's meaning kept: 0 = used in the likelihood, 1 = merged
  only, 2 = bad (also for grid positions that hold no detector pixel); ``mask`` = ``emc_mask < 2``;
- ``corr`` (y, x) solid angle × polarisation; ``emc_x``, ``emc_y`` (y, x) detector-plane
  coordinates in pixels; ``emc_pixel`` (y, x) the Dragonfly pixel index (−1 where none);
- attrs ``emc_detd_px`` and ``emc_ewald_rad_vox``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import dask.array as da
import h5py
import numpy as np
import scipy.sparse as sp
import xarray as xr
from dask.base import tokenize

from diffdask.errors import SchemaError, StoreFormatError
from diffdask.frames import make_frame_stack
from diffdask.io.location import Location

EMC_HEADER_BYTES = 1024


def _read_detector(path: str) -> dict[str, Any]:
    loc = Location.of(path)
    loc.require()
    try:
        with h5py.File(loc.fs_path, "r") as f:
            missing = [k for k in ("qx", "qy", "qz", "corr", "mask", "detd", "ewald_rad") if k not in f]
            if missing:
                raise StoreFormatError(
                    f"{path!r} is not a Dragonfly HDF5 detector file: datasets {missing} are missing."
                )
            det = {k: np.asarray(f[k][()]) for k in ("qx", "qy", "qz", "corr", "mask")}
            det["detd"] = float(np.asarray(f["detd"][()]))
            det["ewald_rad"] = float(np.asarray(f["ewald_rad"][()]))
    except OSError as exc:
        raise StoreFormatError(f"{path!r} cannot be read as an HDF5 detector file ({exc}).") from exc
    n = det["qx"].size
    if any(det[k].size != n for k in ("qy", "qz", "corr", "mask")):
        raise StoreFormatError(f"{path!r}: qx, qy, qz, corr and mask must all have one entry per pixel.")
    return det


class _EMCPhotons:
    """A sparse ``.emc`` photon file, read lazily: only the requested frames' photons."""

    def __init__(self, path: str) -> None:
        loc = Location.of(path)
        loc.require()
        self.path = loc.fs_path
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            header = np.frombuffer(f.read(EMC_HEADER_BYTES), dtype="<i4")
            if header.size < EMC_HEADER_BYTES // 4:
                raise StoreFormatError(
                    f"{path!r} is shorter than the 1024-byte .emc header; the file is truncated."
                )
            num_data, num_pix, kind = (int(v) for v in header[:3])
            if num_data < 0 or num_pix <= 0 or kind != 0:
                raise StoreFormatError(
                    f"{path!r} is not a sparse Dragonfly .emc file (header: num_data={num_data}, "
                    f"num_pix={num_pix}, type={kind}; only type 0 is supported)."
                )
            counts = np.frombuffer(f.read(8 * num_data), dtype="<i4")
        if counts.size != 2 * num_data:
            raise StoreFormatError(f"{path!r} is truncated inside its per-frame photon counts.")
        ones, multi = counts[:num_data].astype(np.int64), counts[num_data:].astype(np.int64)
        self.ones_accum = np.concatenate([[0], np.cumsum(ones)])
        self.multi_accum = np.concatenate([[0], np.cumsum(multi)])
        self.off_place_ones = EMC_HEADER_BYTES + 8 * num_data
        self.off_place_multi = self.off_place_ones + 4 * int(self.ones_accum[-1])
        self.off_count_multi = self.off_place_multi + 4 * int(self.multi_accum[-1])
        expected = self.off_count_multi + 4 * int(self.multi_accum[-1])
        if size < expected:
            raise StoreFormatError(
                f"{path!r} is truncated: its header and counts need {expected} bytes, the file has {size}. "
                "Copy the file again."
            )
        self.num_data, self.num_pix = num_data, num_pix

    def _section(self, f: Any, offset: int, start: int, stop: int) -> np.ndarray:
        f.seek(offset + 4 * start)
        return np.frombuffer(f.read(4 * (stop - start)), dtype="<i4").astype(np.int64)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Photon counts of frames ``start:stop`` as a CSR matrix (frames × pixels)."""
        a0, a1 = int(self.ones_accum[start]), int(self.ones_accum[stop])
        m0, m1 = int(self.multi_accum[start]), int(self.multi_accum[stop])
        with open(self.path, "rb") as f:
            place_ones = self._section(f, self.off_place_ones, a0, a1)
            place_multi = self._section(f, self.off_place_multi, m0, m1)
            count_multi = self._section(f, self.off_count_multi, m0, m1)
        for places in (place_ones, place_multi):
            if places.size and (places.min() < 0 or places.max() >= self.num_pix):
                raise StoreFormatError(
                    f"{self.path!r} lists photons at pixels outside 0..{self.num_pix - 1}; the file is corrupt."
                )
        n = stop - start
        frame_ones = np.repeat(np.arange(n), np.diff(self.ones_accum[start : stop + 1]))
        frame_multi = np.repeat(np.arange(n), np.diff(self.multi_accum[start : stop + 1]))
        csr = sp.csr_matrix(
            (
                np.concatenate([np.ones(place_ones.size, np.int64), count_multi]),
                (np.concatenate([frame_ones, frame_multi]), np.concatenate([place_ones, place_multi])),
            ),
            shape=(n, self.num_pix),
        )
        csr.sum_duplicates()
        return csr


class _SparseFrames:
    """Dense (frame, y, x) view of a photon file, densified per requested block of frames."""

    def __init__(self, photons: _EMCPhotons, grid_index: np.ndarray, shape: tuple[int, int], dtype: Any) -> None:
        self.photons, self.grid_index, self.frame_shape = photons, grid_index, shape
        self.dtype = np.dtype(dtype)
        self.shape = (photons.num_data, *shape)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = key[0].indices(self.shape[0])
        rows = self.photons.rows(start, stop)
        if rows.nnz and rows.data.max() > np.iinfo(self.dtype).max:
            raise StoreFormatError(
                f"frames {start}..{stop} of {self.photons.path!r} hold {int(rows.data.max())} photons in one "
                f"pixel, more than {self.dtype} can hold; the file is corrupt or not photon counts."
            )
        out = np.zeros((rows.shape[0], self.frame_shape[0] * self.frame_shape[1]), dtype=self.dtype)
        coo = rows.tocoo()
        out[coo.row, self.grid_index[coo.col]] = coo.data
        return out.reshape(rows.shape[0], *self.frame_shape)[(slice(None), *key[1:])]


def _grid(det: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Detector-plane coordinates (pixels) and the grid row/column of each Dragonfly pixel."""
    factor = det["detd"] / (det["qz"] + det["ewald_rad"])
    x, y = det["qx"] * factor, det["qy"] * factor
    rows = np.rint(x - x.min()).astype(np.int64)
    cols = np.rint(y - y.min()).astype(np.int64)
    if np.abs(x - x.min() - rows).max() > 0.25 or np.abs(y - y.min() - cols).max() > 0.25:
        raise StoreFormatError(
            "the detector pixels do not lie on a regular grid of unit spacing in detector-plane pixel "
            "coordinates; diffdask frame stacks need a pixel grid."
        )
    shape = (int(rows.max()) + 1, int(cols.max()) + 1)
    flat = rows * shape[1] + cols
    if np.unique(flat).size != flat.size:
        raise StoreFormatError("two detector pixels fall on the same grid position; the detector file is corrupt.")
    return x, y, rows, cols


def read_emc(photons_path: str, detector_path: str, chunks: int | None = None) -> xr.Dataset:
    """Read Dragonfly sparse photons and detector files as a frame stack.

    Parameters
    ----------
    photons_path : str
        Sparse ``.emc`` photon file (type 0).
    detector_path : str
        Dragonfly HDF5 detector file (``qx, qy, qz, corr, mask, detd, ewald_rad``).
    chunks : int, optional
        Frames per Dask chunk.

    Returns
    -------
    xarray.Dataset
        Frame stack of uint16 counts with ``emc_mask``, ``corr``, ``emc_x``, ``emc_y``,
        ``emc_pixel`` (see module docstring). Frames are densified lazily per chunk.

    Raises
    ------
    StoreNotFoundError
        A file is missing.
    StoreFormatError
        Truncated or malformed files.
    SchemaError
        The photons file and detector have different pixel counts.
    """
    det = _read_detector(detector_path)
    photons = _EMCPhotons(photons_path)
    num_pix = photons.num_pix
    if num_pix != det["qx"].size:
        raise SchemaError(
            f"{photons_path!r} has {num_pix} pixels per frame but detector {detector_path!r} has "
            f"{det['qx'].size}; use the detector file the photons were written with."
        )
    x, y, rows, cols = _grid(det)
    shape = (int(rows.max()) + 1, int(cols.max()) + 1)
    flat = rows * shape[1] + cols

    def on_grid(values: np.ndarray, fill: Any, dtype: Any) -> np.ndarray:
        out = np.full(shape[0] * shape[1], fill, dtype=dtype)
        out[flat] = values
        return out.reshape(shape)

    emc_mask = on_grid(det["mask"].astype(np.uint8), 2, np.uint8)
    # uint16 holds any count a detector pixel records in one XFEL shot.
    dtype = np.uint16
    frames = da.from_array(_SparseFrames(photons, flat, shape, dtype), chunks=(chunks or 4096, -1, -1),
                           name=f"emc-{tokenize(os.path.abspath(photons_path), os.path.getmtime(photons.path))}",
                           meta=np.empty((0, 0, 0), dtype), asarray=True, fancy=False)
    ds = make_frame_stack(frames, mask=emc_mask < 2, attrs={
        "source": os.fspath(photons_path),
        "emc_detector": os.fspath(detector_path),
        "emc_detd_px": det["detd"],
        "emc_ewald_rad_vox": det["ewald_rad"],
    }, chunks=chunks or 4096)
    return ds.assign(
        emc_mask=(("y", "x"), emc_mask),
        corr=(("y", "x"), on_grid(det["corr"].astype(float), 0.0, float)),
        emc_x=(("y", "x"), on_grid(x, np.nan, float)),
        emc_y=(("y", "x"), on_grid(y, np.nan, float)),
        emc_pixel=(("y", "x"), on_grid(np.arange(num_pix), -1, np.int64)),
    )


def write_emc(ds: xr.Dataset, photons_path: str, detector_path: str | None = None) -> None:
    """Write a frame stack as a Dragonfly sparse ``.emc`` file (and its detector file).

    Pixels are listed in Dragonfly order: ``emc_pixel`` when the stack came from `read_emc`,
    else the good pixels (``mask``) in row-major order. Frames must hold non-negative integer
    counts. The detector file needs ``emc_x``, ``emc_y``, ``corr`` (as written by `read_emc`) or
    a `Geometry` (flat detector: coordinates from the beam centre, ``corr`` = solid angle ×
    polarisation normalised to mean 1, ``emc_mask`` 0 where good).

    Raises
    ------
    SchemaError
        Non-integer or negative counts, or no way to place the pixels.
    """
    from diffdask.emc.detector import EMCDetector

    emc_det = EMCDetector.from_dataset(ds, all_pixels=True)
    fr = ds["frames"].data
    if not (np.issubdtype(fr.dtype, np.integer) or np.issubdtype(fr.dtype, np.floating)):
        raise SchemaError(f"frames must be photon counts, got {fr.dtype}.")
    ones_l, multi_l, po, pm, cm = [], [], [], [], []
    for block in fr.blocks if isinstance(fr, da.Array) else [fr]:
        b = np.asarray(block).reshape(block.shape[0], -1)[:, emc_det.pixels]
        if np.issubdtype(b.dtype, np.floating):
            if not np.all(np.isfinite(b)) or np.any(b != np.rint(b)):
                raise SchemaError("write_emc needs integer photon counts; these frames hold fractions or NaN.")
        if np.any(b < 0):
            raise SchemaError("write_emc needs non-negative photon counts; these frames hold negative values.")
        b = b.astype(np.int64)
        for row in b:
            one = np.flatnonzero(row == 1)
            many = np.flatnonzero(row > 1)
            ones_l.append(one.size)
            multi_l.append(many.size)
            po.append(one)
            pm.append(many)
            cm.append(row[many])
    header = np.zeros(EMC_HEADER_BYTES // 4, dtype="<i4")
    header[:3] = (len(ones_l), emc_det.pixels.size, 0)
    with open(photons_path, "wb") as f:
        f.write(header.tobytes())
        for arr in (ones_l, multi_l):
            f.write(np.asarray(arr, dtype="<i4").tobytes())
        for parts in (po, pm, cm):
            f.write(np.concatenate(parts).astype("<i4").tobytes() if parts else b"")
    if detector_path is not None:
        emc_det.write_dragonfly(detector_path)


def read_emc_output(path: str) -> dict[str, Any]:
    """Read a Dragonfly ``output_NNN.h5`` file into a dict of arrays.

    Keys are the datasets present (``intens``, ``inter_weight``, ``scale``, ``orientations``,
    ``occupancies``, ``likelihood``, ``mutual_info``); sparse probabilities come back as
    ``probabilities`` = (place, prob) lists of per-frame arrays when present.
    """
    loc = Location.of(path)
    loc.require()
    out: dict[str, Any] = {}
    try:
        with h5py.File(loc.fs_path, "r") as f:
            for key in ("intens", "inter_weight", "scale", "orientations", "occupancies", "likelihood", "mutual_info"):
                if key in f:
                    out[key] = np.asarray(f[key][()])
            if "probabilities/place" in f:
                out["probabilities"] = (
                    [np.asarray(p, dtype=np.int64) for p in f["probabilities/place"][()]],
                    [np.asarray(p, dtype=np.float64) for p in f["probabilities/prob"][()]],
                )
    except OSError as exc:
        raise StoreFormatError(f"{path!r} cannot be read as a Dragonfly output file ({exc}).") from exc
    if "intens" not in out:
        raise StoreFormatError(f"{path!r} has no 'intens' dataset; it is not a Dragonfly output file.")
    return out


def write_emc_output(
    path: str,
    intens: np.ndarray,
    *,
    inter_weight: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    orientations: np.ndarray | None = None,
    occupancies: np.ndarray | None = None,
    likelihood: np.ndarray | None = None,
    mutual_info: np.ndarray | None = None,
    probabilities: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None = None,
    num_rot: int | None = None,
) -> None:
    """Write EMC results in Dragonfly's ``output_NNN.h5`` layout (readable by Dragonfly's tools)."""
    with h5py.File(path, "w") as f:
        f["intens"] = np.asarray(intens, dtype=np.float64)
        for key, value, dtype in (
            ("inter_weight", inter_weight, np.float64),
            ("scale", scale, np.float64),
            ("orientations", orientations, np.int32),
            ("occupancies", occupancies, np.float64),
            ("likelihood", likelihood, np.float64),
            ("mutual_info", mutual_info, np.float64),
        ):
            if value is not None:
                f[key] = np.asarray(value, dtype=dtype)
        if probabilities is not None:
            place, prob = probabilities
            g = f.create_group("probabilities")
            g["num_rot"] = np.array([num_rot or 0], dtype=np.int32)
            g.create_dataset("place", data=np.array([np.asarray(p, np.int32) for p in place] + [None], dtype=object)[:-1],
                             dtype=h5py.vlen_dtype(np.int32))
            g.create_dataset("prob", data=np.array([np.asarray(p, np.float64) for p in prob] + [None], dtype=object)[:-1],
                             dtype=h5py.vlen_dtype(np.float64))
