"""All per-frame reductions in one pass over the data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import xarray as xr

from diffdask.checks import check_finite, check_int
from diffdask.errors import ParameterError
from diffdask.frames import frame_coords, provenance
from diffdask.reduce._graph import nonfinite_attrs, prepare, radius_coords, run_fused, total_attrs

#: The groups of results `summarize` can include.
PARTS = ("com", "radial", "hits")


def summarize(
    ds: xr.Dataset,
    threshold: float | None = None,
    min_lit: int | None = None,
    bin_width_px: float = 1.0,
    n_bins: int | None = None,
    center: tuple[float, float] | None = None,
    include: Sequence[str] | None = None,
) -> xr.Dataset:
    """Centre of mass, totals, radial profiles, lit pixels and hits in one pass, lazily.

    Every chunk of frames is read (and decompressed) once and goes through one call of the
    compiled kernel (`diffdask.reduce.kernel.reduce_block`), in the same task as its read;
    computing any subset of the result reads the data once too. Every value is the same bits
    for any chunking, thread or worker count and CPU. Store it beside the frames with ``diffdask.io.save_results``.

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
    include : sequence of {"com", "radial", "hits"}, optional
        Which results to compute; by default "com" and "radial", and "hits" when a
        threshold is given. Leaving one out also leaves its work out of the kernel.

    Returns
    -------
    xarray.Dataset
        On ``frame``: ``com_y``, ``com_x``, ``total``, ``n_nonfinite`` (as `center_of_mass`),
        ``radial_profile`` (``frame``, ``radius``), and with a threshold ``lit_pixels``
        (int32) and with ``min_lit`` ``is_hit`` (bool); only the parts in ``include``. Every
        variable is aligned on ``frame``: the dataset-wide profile is `mean_profile` (its own
        pass) or, from these results without touching the frames again,
        ``result.radial_profile.mean("frame")``.

    Raises
    ------
    ParameterError
        For invalid binning, threshold or ``min_lit`` (or ``min_lit`` without ``threshold``).
    GeometryError, SchemaError
        As in `radial_profile`.
    """
    if include is None:
        parts: tuple[str, ...] = PARTS if threshold is not None else ("com", "radial")
    else:
        parts = (include,) if isinstance(include, str) else tuple(include)
    if not parts or set(parts) - set(PARTS):
        raise ParameterError(f"include must name some of {PARTS}, got {include!r}.")
    com, radial, hits = (p in parts for p in PARTS)
    t = None if threshold is None else check_finite("threshold", threshold, "the frames\' units")
    m = None if min_lit is None else check_int("min_lit", min_lit, 0, what="pixels")
    if (m is not None or hits) and t is None:
        raise ParameterError(
            "lit pixels and hits need a threshold: pass threshold=... (the pixel value that counts as lit)."
        )
    if not hits:
        t = m = None
    ds, geometry, plan, annuli = prepare(ds, radial=radial, bin_width_px=bin_width_px, n_bins=n_bins, center=center)
    out = run_fused(ds, plan, t, com=com, bins=radial, name="summarize")
    units = ds["frames"].attrs.get("units")
    data_vars: dict[str, Any] = {}
    if com:
        data_vars["com_y"] = ("frame", out["com_y"], {"units": "pixel", "long_name": "centre of mass, row"})
        data_vars["com_x"] = ("frame", out["com_x"], {"units": "pixel", "long_name": "centre of mass, column"})
        data_vars["total"] = ("frame", out["total"], total_attrs(units))
        data_vars["n_nonfinite"] = ("frame", out["n_nonfinite"], nonfinite_attrs())
    if radial:
        profile_attrs = {"long_name": "mean of good pixels in each annulus"}
        if units:
            profile_attrs["units"] = units
        data_vars["radial_profile"] = (("frame", "radius"), out["mean"], profile_attrs)
    if t is not None:
        data_vars["lit_pixels"] = ("frame", out["lit"], {"long_name": f"good pixels > {t}"})
    if m is not None:
        data_vars["is_hit"] = ("frame", out["lit"] >= m, {"long_name": f"at least {m} lit pixels"})
    params: dict[str, Any] = {"include": [p for p in PARTS if p in parts], "threshold": t, "min_lit": m}
    coords = frame_coords(ds)
    if radial:
        params.update(bin_width_px=annuli.bin_width_px, n_bins=annuli.n_bins, center_yx=annuli.center_yx)
        coords.update(radius_coords(plan, annuli, geometry))
    return xr.Dataset(data_vars, coords=coords, attrs=provenance("summarize", **params))
