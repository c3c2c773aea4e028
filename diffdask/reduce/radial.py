"""Radial profiles (angular averages, the PSD of single-particle imaging) per frame and per dataset."""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from diffdask.blocks import reduce_frames
from diffdask.geometry import Geometry
from diffdask.reduce._graph import (
    frame_coords,
    prepare,
    provenance,
    radius_coords,
    run_fused,
)
from diffdask.reduce.operator import N_FIXED, PixelOperator, pixel_sums


def radial_profile(
    ds: xr.Dataset,
    bin_width_px: float = 1.0,
    n_bins: int | None = None,
    center: tuple[float, float] | None = None,
) -> xr.DataArray:
    """Mean intensity of the good pixels in annuli around the beam centre, per frame, lazily.

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack. NaN/inf pixels count as masked in their frame.
    bin_width_px : float
        Annulus width w, pixels: bin k holds the pixels with k·w ≤ r < (k + 1)·w, where
        r = hypot(i − cy, j − cx) for the pixel at row i, column j.
    n_bins : int, optional
        Number of bins; by default enough to reach the farthest good pixel.
    center : tuple of float, optional
        Centre (row, column), pixel-index units; default the geometry's beam centre, else
        the array centre.

    Returns
    -------
    xarray.DataArray
        ``radial_profile`` with dims (``frame``, ``radius``), in the frames' units per pixel;
        NaN for a bin with no good pixel. Coordinates on ``radius``: ``radius_px`` (bin
        centres, pixels), ``n_pixels`` (good pixels per bin) and, with a geometry of square
        pixels, ``q_inv_nm`` (q at the bin centre, nm⁻¹).

    Raises
    ------
    ParameterError
        For ``bin_width_px`` ≤ 0 or ``n_bins`` < 1.
    GeometryError
        For a centre off the detector.
    SchemaError
        If ``ds`` is not a frame stack or its mask has no good pixel.
    """
    ds, geometry, op = prepare(ds, radial=True, bin_width_px=bin_width_px, n_bins=n_bins, center=center)
    out = run_fused(ds, op, None, com=False, radial=True, name="radial_profile")
    return _profile_array(out["radial"], ds, geometry, op)


def _profile_array(data: Any, ds: xr.Dataset, geometry: Geometry | None, op: PixelOperator) -> xr.DataArray:
    attrs = provenance("radial_profile", bin_width_px=op.bin_width_px, n_bins=op.n_bins, center_yx=op.center_yx)
    attrs["long_name"] = "mean of good pixels in each annulus"
    if ds["frames"].attrs.get("units"):
        attrs["units"] = ds["frames"].attrs["units"]
    return xr.DataArray(
        data,
        dims=("frame", "radius"),
        coords={**frame_coords(ds), **radius_coords(op, geometry)},
        name="radial_profile",
        attrs=attrs,
    )


def _bin_image(total: np.ndarray, count: np.ndarray, op: PixelOperator) -> np.ndarray:
    # Pixel sums over all frames → bin means: the operator applied to two (1, pixels) rows.
    rows = np.stack([total.ravel(), count.ravel().astype(np.float64)])
    sums = op.apply(rows)[:, N_FIXED:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums[1] > 0, sums[0] / sums[1], np.nan)


def mean_profile(
    ds: xr.Dataset,
    bin_width_px: float = 1.0,
    n_bins: int | None = None,
    center: tuple[float, float] | None = None,
    split_every: int = 8,
) -> xr.DataArray:
    """Dataset-wide radial average: mean of every good pixel of every frame in each annulus.

    Used to normalise frames before learning (Zhuang et al. 2022 divide the patterns by it)
    and as the PSD of a selection. A tree reduction of per-chunk pixel sums (float64), then
    one binning of the summed image.

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack (select frames first, e.g. ``ds.isel(frame=hits)``, for a selection).
    bin_width_px, n_bins, center
        As in `radial_profile`.
    split_every : int
        Fan-in of the reduction tree.

    Returns
    -------
    xarray.DataArray
        ``mean_profile`` on ``radius`` with the coordinates of `radial_profile`. Without
        NaN/inf pixels it equals the mean over frames of the per-frame profiles.
    """
    ds, geometry, op = prepare(ds, radial=True, bin_width_px=bin_width_px, n_bins=n_bins, center=center)
    frames = ds["frames"].data
    if not isinstance(frames, da.Array):
        frames = da.asarray(frames)
    parts = reduce_frames(
        pixel_sums,
        frames,
        {"sum": (op.shape, np.float64), "count": (op.shape, np.int64)},
        kwargs={"mask": op.mask},
        split_every=split_every,
        name="mean_profile",
    )
    profile = da.map_blocks(
        _bin_image, parts["sum"], parts["count"], op=op, drop_axis=1, chunks=((op.n_bins,),), dtype=np.float64
    )
    attrs = provenance("mean_profile", bin_width_px=op.bin_width_px, n_bins=op.n_bins, center_yx=op.center_yx)
    attrs["long_name"] = "dataset mean of good pixels in each annulus"
    return xr.DataArray(
        profile, dims=("radius",), coords=radius_coords(op, geometry), name="mean_profile", attrs=attrs
    )
