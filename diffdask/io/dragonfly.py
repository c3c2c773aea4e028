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
  ``emc_qx``, ``emc_qy``, ``emc_qz`` (y, x) the file's q-vectors in voxels (3D EMC uses them);
- attrs ``emc_detd_px`` and ``emc_ewald_rad_vox``.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


def read_detector(path: str) -> dict[str, Any]:
    """A Dragonfly HDF5 detector file as a dict: ``qx, qy, qz, corr, mask`` per pixel, ``detd``, ``ewald_rad``."""
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
        ``emc_pixel`` and the q-vectors ``emc_qx``, ``emc_qy``, ``emc_qz`` (see module docstring). Frames are densified lazily per chunk.

    Raises
    ------
    StoreNotFoundError
        A file is missing.
    StoreFormatError
        Truncated or malformed files.
    SchemaError
        The photons file and detector have different pixel counts.
    """
    det = read_detector(detector_path)
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
        **{f"emc_q{axis}": (("y", "x"), on_grid(det[f"q{axis}"].astype(float), np.nan, float)) for axis in "xyz"},
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


def read_quaternions(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a Dragonfly quaternion file: a count, then ``w x y z weight`` per line.

    Returns
    -------
    quaternions : ndarray, shape (R, 4)
        Unit quaternions, scalar first, as written.
    weights : ndarray, shape (R,)
        Weights divided by their sum (as ``emc`` does).
    """
    loc = Location.of(path)
    loc.require()
    with open(loc.fs_path) as f:
        first = f.readline().split()
        try:
            count = int(first[0])
            table = np.loadtxt(f, ndmin=2, max_rows=count)
        except (IndexError, ValueError) as exc:
            raise StoreFormatError(
                f"{path!r} is not a Dragonfly quaternion file (a count, then 'w x y z weight' per line): {exc}."
            ) from exc
    if count < 1 or table.shape != (count, 5):
        raise StoreFormatError(
            f"{path!r} announces {first[0] if first else 'no'} quaternions but holds a {table.shape} table; "
            "each line needs 5 numbers (w x y z weight)."
        )
    norms = np.linalg.norm(table[:, :4], axis=1)
    if not np.all(np.abs(norms - 1.0) < 1e-6) or not np.all(table[:, 4] > 0):
        raise StoreFormatError(f"{path!r} holds quaternions that are not unit length or weights that are not positive.")
    return table[:, :4], table[:, 4] / table[:, 4].sum()


def write_quaternions(path: str, quaternions: np.ndarray, weights: np.ndarray) -> None:
    """Write a Dragonfly quaternion file (``%+17.15f`` columns, as ``make_quaternion``)."""
    q = np.asarray(quaternions, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    with open(path, "w") as f:
        f.write(f"{q.shape[0]}\n")
        np.savetxt(f, np.column_stack([q, w]), fmt="%+17.15f")


@dataclass(frozen=True)
class DragonflyConfig:
    """The ``[emc]`` settings of a Dragonfly ``config.ini``, with paths resolved.

    Attributes
    ----------
    path : str
        The config file.
    photons, detector : str
        ``in_photons_file`` and ``in_detector_file``.
    quaternions : str or None
        ``in_quat_file``; when None, ``num_div`` gives the level of a generated set.
    num_div : int or None
    recon_type : str
        ``"3d"``, ``"2d"``, ...
    output_folder : str
    start_model_file : str or None
    log_file : str or None
    need_scaling : bool
    beta : float or None
        None: Dragonfly's per-frame β from the photon count.
    beta_schedule : (float, int)
    alpha : float
    point_group : str or None
    num_modes, num_rot : int or None
        2D settings.
    """

    path: str
    photons: str
    detector: str
    quaternions: str | None
    num_div: int | None
    recon_type: str
    output_folder: str
    start_model_file: str | None
    log_file: str | None
    need_scaling: bool
    beta: float | None
    beta_schedule: tuple[float, int]
    alpha: float
    point_group: str | None
    num_modes: int | None
    num_rot: int | None


def read_dragonfly_config(path: str) -> DragonflyConfig:
    """Read the ``[emc]`` section of a Dragonfly ``config.ini``.

    ``section:::key`` values are looked up in the named section (recursively); relative paths
    are taken from the config file's folder, as Dragonfly's tools run from there.

    Raises
    ------
    StoreNotFoundError
        The file is missing.
    StoreFormatError
        No ``[emc]`` section, a missing required key, a reference that does not resolve, or a
        value that is not a number where one is needed.
    """
    loc = Location.of(path)
    loc.require()
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    try:
        parser.read(loc.fs_path)
    except configparser.Error as exc:
        raise StoreFormatError(f"{path!r} is not a Dragonfly config file ({exc}).") from exc
    if not parser.has_section("emc"):
        raise StoreFormatError(f"{path!r} has no [emc] section; give the config file Dragonfly's emc reads.")
    folder = os.path.dirname(os.path.abspath(loc.fs_path))

    def value(section: str, key: str, seen: tuple[str, ...] = ()) -> str | None:
        if not parser.has_option(section, key):
            return None
        raw = parser.get(section, key).strip()
        if ":::" in raw:
            ref_section, ref_key = raw.split(":::", 1)
            if f"{ref_section}:::{ref_key}" in seen or not parser.has_option(ref_section, ref_key):
                raise StoreFormatError(f"{path!r}: [{section}] {key} = {raw} refers to a key that does not exist.")
            return value(ref_section, ref_key, (*seen, raw))
        return raw

    def file(key: str, required: bool = False) -> str | None:
        raw = value("emc", key)
        if raw is None:
            if required:
                raise StoreFormatError(f"{path!r}: [emc] needs {key}.")
            return None
        return raw if os.path.isabs(raw) else os.path.join(folder, raw)

    def number(key: str, kind: type, default: Any) -> Any:
        raw = value("emc", key)
        if raw is None:
            return default
        try:
            return kind(float(raw)) if kind is int else kind(raw)
        except ValueError as exc:
            raise StoreFormatError(f"{path!r}: [emc] {key} = {raw!r} is not a number.") from exc

    schedule = (value("emc", "beta_schedule") or "1 1000000").split()
    try:
        beta_schedule = (float(schedule[0]), int(float(schedule[1])))
    except (IndexError, ValueError) as exc:
        raise StoreFormatError(f"{path!r}: [emc] beta_schedule must be 'factor period', got {schedule!r}.") from exc
    output = file("output_folder") or os.path.join(folder, "data", "output")
    return DragonflyConfig(
        path=os.path.abspath(loc.fs_path),
        photons=file("in_photons_file", required=True) or "",
        detector=file("in_detector_file", required=True) or "",
        quaternions=file("in_quat_file"),
        num_div=number("num_div", int, None),
        recon_type=(value("emc", "recon_type") or "3d").lower(),
        output_folder=output,
        start_model_file=file("start_model_file"),
        log_file=file("log_file"),
        need_scaling=bool(number("need_scaling", int, 0)),
        beta=number("beta", float, None),
        beta_schedule=beta_schedule,
        alpha=number("alpha", float, 0.0),
        point_group=value("emc", "point_group"),
        num_modes=number("num_modes", int, None),
        num_rot=number("num_rot", int, None),
    )
