"""All per-frame reductions in one pass over the data."""

from __future__ import annotations

import xarray as xr

from diffdask.errors import ParameterError
from diffdask.reduce._graph import (
    check_min_lit,
    check_threshold,
    frame_coords,
    prepare,
    provenance,
    radius_coords,
    run_fused,
)
from diffdask.reduce.com import _total_attrs


def summarize(
    ds: xr.Dataset,
    threshold: float | None = None,
    min_lit: int | None = None,
    bin_width_px: float = 1.0,
    n_bins: int | None = None,
    center: tuple[float, float] | None = None,
) -> xr.Dataset:
    """Centre of mass, totals, radial profiles, lit pixels and hits in one pass, lazily.

    Every chunk of frames is read (and decompressed) once and goes through one kernel call
    (`diffdask.reduce.operator.reduce_block`); computing any subset of the result reads the
    data once too. Store it beside the frames with ``diffdask.io.save_results``.

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack.
    threshold : float, optional
        Lit-pixel threshold (frame units, lit = value > threshold); without it there are no
        ``lit_pixels`` / ``is_hit``.
    min_lit : int, optional
        Lit pixels that make a hit (needs ``threshold``).
    bin_width_px, n_bins, center
        Radial binning, as in `radial_profile`.

    Returns
    -------
    xarray.Dataset
        On ``frame``: ``com_y``, ``com_x``, ``total`` (as `center_of_mass`),
        ``radial_profile`` (``frame``, ``radius``), and with a threshold ``lit_pixels``
        (int32) and with ``min_lit`` ``is_hit`` (bool). On ``radius``: ``mean_profile``, the
        mean of the per-frame profiles (same pass).

    Raises
    ------
    ParameterError
        For invalid binning, threshold or ``min_lit`` (or ``min_lit`` without ``threshold``).
    GeometryError, SchemaError
        As in `radial_profile`.
    """
    t = None if threshold is None else check_threshold(threshold)
    m = None if min_lit is None else check_min_lit(min_lit)
    if m is not None and t is None:
        raise ParameterError("min_lit needs a threshold: pass threshold=... (the pixel value that counts as lit).")
    ds, geometry, op = prepare(ds, radial=True, bin_width_px=bin_width_px, n_bins=n_bins, center=center)
    out = run_fused(ds, op, t, com=True, radial=True, name="summarize")
    units = ds["frames"].attrs.get("units")
    profile_attrs = {"long_name": "mean of good pixels in each annulus"}
    if units:
        profile_attrs["units"] = units
    data_vars = {
        "com_y": ("frame", out["com_y"], {"units": "pixel", "long_name": "centre of mass, row"}),
        "com_x": ("frame", out["com_x"], {"units": "pixel", "long_name": "centre of mass, column"}),
        "total": ("frame", out["total"], _total_attrs(units)),
        "radial_profile": (("frame", "radius"), out["radial"], profile_attrs),
    }
    if t is not None:
        data_vars["lit_pixels"] = ("frame", out["lit"], {"long_name": f"good pixels > {t}"})
    if m is not None:
        data_vars["is_hit"] = ("frame", out["lit"] >= m, {"long_name": f"at least {m} lit pixels"})
    result = xr.Dataset(
        data_vars,
        coords={**frame_coords(ds), **radius_coords(op, geometry)},
        attrs=provenance(
            "summarize",
            threshold=t,
            min_lit=m,
            bin_width_px=op.bin_width_px,
            n_bins=op.n_bins,
            center_yx=op.center_yx,
        ),
    )
    mean = result["radial_profile"].mean("frame", skipna=True)
    result["mean_profile"] = mean.assign_attrs(long_name="mean over frames of the radial profiles")
    return result
