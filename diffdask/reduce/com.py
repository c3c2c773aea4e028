"""Centre of mass and total intensity of each frame (Lin et al., eq. 1)."""

from __future__ import annotations

import xarray as xr

from diffdask.frames import frame_coords, provenance
from diffdask.reduce._graph import nonfinite_attrs, prepare, run_fused, total_attrs


def center_of_mass(ds: xr.Dataset) -> xr.Dataset:
    """Centre of mass and total intensity of the good pixels of each frame, lazily.

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack. NaN/inf pixels count as masked in their frame; negative values are
        data and weigh negatively.

    Returns
    -------
    xarray.Dataset
        On ``frame``: ``com_y``, ``com_x`` (pixel-index units, row and column, pixel centres
        at integers; NaN for a frame whose total is 0), ``total`` (sum of the good pixels,
        in the frames' units) and ``n_nonfinite`` (int32: good pixels that were NaN/inf and
        were left out).

    Raises
    ------
    SchemaError
        If ``ds`` is not a frame stack or its mask has no good pixel.

    Notes
    -----
    One call of the compiled kernel (`diffdask.reduce.kernel`) per chunk: each pixel is read
    once and summed in float64 in a fixed order, so the result is the same bits for any
    chunking, thread count or CPU.
    """
    ds, _, plan, _ = prepare(ds, radial=False)
    out = run_fused(ds, plan, None, com=True, bins=False, name="center_of_mass")
    coords = frame_coords(ds)
    units = ds["frames"].attrs.get("units")
    return xr.Dataset(
        {
            "com_y": ("frame", out["com_y"], {"units": "pixel", "long_name": "centre of mass, row"}),
            "com_x": ("frame", out["com_x"], {"units": "pixel", "long_name": "centre of mass, column"}),
            "total": ("frame", out["total"], total_attrs(units)),
            "n_nonfinite": ("frame", out["n_nonfinite"], nonfinite_attrs()),
        },
        coords=coords,
        attrs=provenance("center_of_mass"),
    )
