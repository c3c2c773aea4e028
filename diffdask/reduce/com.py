"""Centre of mass and total intensity of each frame (Lin et al., eq. 1)."""

from __future__ import annotations

import xarray as xr

from diffdask.reduce._graph import (
    frame_coords,
    prepare,
    provenance,
    run_fused,
    total_attrs,
)


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
        at integers; NaN for a frame whose total is 0) and ``total`` (sum of the good pixels,
        in the frames' units).

    Raises
    ------
    SchemaError
        If ``ds`` is not a frame stack or its mask has no good pixel.

    Notes
    -----
    One product of each chunk with a (pixels × 4) weight matrix; the frames are read once.
    """
    ds, _, op = prepare(ds, radial=False)
    out = run_fused(ds, op, None, com=True, radial=False, name="center_of_mass")
    coords = frame_coords(ds)
    units = ds["frames"].attrs.get("units")
    return xr.Dataset(
        {
            "com_y": ("frame", out["com_y"], {"units": "pixel", "long_name": "centre of mass, row"}),
            "com_x": ("frame", out["com_x"], {"units": "pixel", "long_name": "centre of mass, column"}),
            "total": ("frame", out["total"], total_attrs(units)),
        },
        coords=coords,
        attrs=provenance("center_of_mass"),
    )
