"""Lit pixels and hit finding (the psocake / Hummingbird lit-pixel hit finder)."""

from __future__ import annotations

import xarray as xr

from diffdask.checks import check_finite, check_int
from diffdask.frames import frame_coords, provenance
from diffdask.reduce._graph import prepare, run_fused


def lit_pixels(ds: xr.Dataset, threshold: float) -> xr.DataArray:
    """Number of good pixels above ``threshold`` in each frame, lazily.

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack.
    threshold : float
        A pixel is lit when its value is strictly greater than this (frame units, e.g.
        photons or ADU). NaN/inf and masked pixels are never lit.

    Returns
    -------
    xarray.DataArray
        ``lit_pixels`` on ``frame``, int32.
    """
    t = check_finite("threshold", threshold, "the frames\' units")
    ds, _, plan, _ = prepare(ds, radial=False)
    out = run_fused(ds, plan, t, com=False, bins=False, name="lit_pixels")
    return xr.DataArray(
        out["lit"],
        dims=("frame",),
        coords=frame_coords(ds),
        name="lit_pixels",
        attrs={**provenance("lit_pixels", threshold=t), "long_name": f"good pixels > {t}"},
    )


def find_hits(ds: xr.Dataset, threshold: float, min_lit: int) -> xr.DataArray:
    """Flag frames with at least ``min_lit`` lit pixels (pixels above ``threshold``), lazily.

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack.
    threshold : float
        Pixel threshold (frame units): lit means value > threshold.
    min_lit : int
        A frame is a hit when it has ``min_lit`` or more lit pixels. (Hummingbird's
        ``countLitPixels(hitscoreThreshold=h)`` calls a hit at more than h: use
        ``min_lit = h + 1``.)

    Returns
    -------
    xarray.DataArray
        ``is_hit`` on ``frame``, bool.
    """
    m = check_int("min_lit", min_lit, 0, what="pixels")
    lit = lit_pixels(ds, threshold)
    hit = lit >= m
    hit.name = "is_hit"
    hit.attrs = {**provenance("find_hits", threshold=float(threshold), min_lit=m), "long_name": "lit-pixel hit"}
    return hit
