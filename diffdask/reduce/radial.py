"""Radial profiles (angular averages, the PSD of single-particle imaging) per frame and per dataset."""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from diffdask.backend import array_namespace
from diffdask.blocks import reduce_frames
from diffdask.frames import frame_coords, provenance
from diffdask.geometry import Geometry
from diffdask.reduce._graph import Annuli, prepare, radius_coords, run_fused
from diffdask.reduce.kernel import BinPlan


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
    ds, geometry, plan, annuli = prepare(ds, radial=True, bin_width_px=bin_width_px, n_bins=n_bins, center=center)
    out = run_fused(ds, plan, None, com=False, bins=True, name="radial_profile")
    return _profile_array(out["mean"], ds, geometry, plan, annuli)


def _profile_array(
    data: Any, ds: xr.Dataset, geometry: Geometry | None, plan: BinPlan, annuli: Annuli
) -> xr.DataArray:
    attrs = provenance(
        "radial_profile", bin_width_px=annuli.bin_width_px, n_bins=annuli.n_bins, center_yx=annuli.center_yx
    )
    attrs["long_name"] = "mean of good pixels in each annulus"
    if ds["frames"].attrs.get("units"):
        attrs["units"] = ds["frames"].attrs["units"]
    return xr.DataArray(
        data,
        dims=("frame", "radius"),
        coords={**frame_coords(ds), **radius_coords(plan, annuli, geometry)},
        name="radial_profile",
        attrs=attrs,
    )


def pixel_sums(block: Any, mask: Any) -> dict[str, Any]:
    """Partial sums of a block over its frames, for dataset-wide means (`reduce_frames` kernel).

    Returns
    -------
    dict
        ``sum`` (ny, nx), float64: sum over the block's frames of each good, finite pixel;
        ``count`` (ny, nx), int64: number of frames in which the pixel was good and finite.
    """
    xp = array_namespace(block)
    good = xp.isfinite(block) & xp.asarray(mask)
    s = xp.where(good, block, 0).sum(axis=0, dtype=xp.float64)
    return {"sum": s, "count": good.sum(axis=0, dtype=xp.int64)}


def _bin_image(total: np.ndarray, count: np.ndarray, plan: BinPlan) -> np.ndarray:
    # Pixel sums over all frames → bin means (np.bincount adds in pixel order).
    k = plan.bin_index.ravel()
    sel = k >= 0
    sums = np.bincount(k[sel], weights=total.ravel()[sel], minlength=plan.n_bins)
    counts = np.bincount(k[sel], weights=count.ravel()[sel], minlength=plan.n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


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
    one binning of the summed image. The pixel sums are added chunk by chunk, so unlike the
    per-frame results this one can change in its last bits (~1e-15 relative) with the
    chunking; it is the same bits for a given chunking on any number of workers.

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
    ds, geometry, plan, annuli = prepare(ds, radial=True, bin_width_px=bin_width_px, n_bins=n_bins, center=center)
    frames = ds["frames"].data
    if not isinstance(frames, da.Array):
        frames = da.asarray(frames)
    parts = reduce_frames(
        pixel_sums,
        frames,
        {"sum": (plan.shape, np.float64), "count": (plan.shape, np.int64)},
        kwargs={"mask": plan.mask},
        split_every=split_every,
        name="mean_profile",
    )
    profile = da.map_blocks(
        _bin_image, parts["sum"], parts["count"], plan=plan, drop_axis=1, chunks=((plan.n_bins,),), dtype=np.float64
    )
    attrs = provenance(
        "mean_profile", bin_width_px=annuli.bin_width_px, n_bins=annuli.n_bins, center_yx=annuli.center_yx
    )
    attrs["long_name"] = "dataset mean of good pixels in each annulus"
    return xr.DataArray(
        profile, dims=("radius",), coords=radius_coords(plan, annuli, geometry), name="mean_profile", attrs=attrs
    )
