"""Azimuthal integration of every frame, as pyFAI users know it: 1-D profiles and 2-D cakes.

Both run the per-frame kernel of `diffdask.reduce.kernel` with a bin index computed once from
the stack's geometry: a pixel falls in the bin that holds its centre (pyFAI's
``method="no"`` splitting), the bin's intensity is the mean of its good pixels (no solid
angle or polarisation correction: the frames are taken as they are), and with
``error_model="poisson"`` each pixel's variance is max(1, I) as in pyFAI, giving

- ``sigma`` = √(Σ var) / N, the standard error of the bin mean (pyFAI's ``result.sigma``),
- ``std`` = √(Σ var / N), the standard deviation of a pixel (pyFAI's ``result.std``),

for N good finite pixels in the bin of that frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from diffdask.checks import check_int
from diffdask.errors import GeometryError, ParameterError
from diffdask.frames import CheckedStack, checked, frame_coords, provenance
from diffdask.geometry import pixel_radius_map
from diffdask.reduce._graph import resolve_center, run_fused
from diffdask.reduce.kernel import MAX_BINS, build_plan, check_mask, uniform_bin_index

#: Radial units: name → (coordinate name, units attr, long name).
RADIAL_UNITS = {
    "q_nm^-1": ("q_inv_nm", "nm^-1", "momentum transfer q = 4π sinθ/λ"),
    "2th_deg": ("two_theta_deg", "degree", "scattering angle 2θ"),
    "r_px": ("radius_px", "pixel", "distance from the beam centre"),
}
ERROR_MODELS = (None, "poisson")


def _radial_map(stack: CheckedStack, unit: str, center: Any) -> np.ndarray:
    shape, geometry = stack.frame_shape, stack.geometry
    if not isinstance(unit, str) or unit not in RADIAL_UNITS:
        raise ParameterError(f"unit must be one of {sorted(RADIAL_UNITS)}, got {unit!r}.")
    if unit == "r_px":
        return pixel_radius_map(shape, resolve_center(shape, geometry, center))
    if geometry is None:
        raise GeometryError(
            f"unit={unit!r} needs the detector geometry (wavelength, distance, pixel size); build the stack "
            "with make_frame_stack(..., geometry=Geometry(...)), or use unit='r_px'."
        )
    if center is not None:
        geometry = geometry.with_beam_center(resolve_center(shape, geometry, center))
    if unit == "q_nm^-1":
        return np.asarray(geometry.q_inv_nm)
    return np.degrees(geometry.two_theta_rad)


def _azimuth_deg(stack: CheckedStack, center: Any) -> np.ndarray:
    shape = stack.frame_shape
    cy, cx = resolve_center(shape, stack.geometry, center)
    pixel_radius_map(shape, (cy, cx))  # validates the centre
    y = np.arange(shape[0], dtype=float)[:, None] - cy
    x = np.arange(shape[1], dtype=float)[None, :] - cx
    return np.degrees(np.arctan2(np.broadcast_to(y, shape), np.broadcast_to(x, shape)))


def _span(span: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(s) for s in span)
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be a (low, high) pair, got {span!r}.") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ParameterError(f"{name} must be finite with low < high, got {span!r}.")
    return lo, hi


def _radial_span(values: np.ndarray, mask: np.ndarray, span: Any) -> tuple[float, float]:
    if span is not None:
        return _span(span, "radial_range")
    v = values[mask]
    lo, hi = float(v.min()), float(v.max())
    # The farthest pixel belongs in the last bin, not just past it.
    return lo, float(np.nextafter(hi, np.inf)) if hi > lo else lo + 1.0


def _check_error_model(error_model: Any) -> None:
    if error_model not in ERROR_MODELS:
        raise ParameterError(f"error_model must be None or 'poisson', got {error_model!r}.")


def _result(
    ds: xr.Dataset, out: dict[str, Any], dims: tuple[str, ...], shape: tuple[int, ...], coords: dict[str, Any],
    name: str, params: dict[str, Any],
) -> xr.Dataset:
    units = ds["frames"].attrs.get("units")
    n = ds.sizes["frame"]
    iattrs = {"long_name": "mean of the good pixels in the bin", **({"units": units} if units else {})}
    data_vars: dict[str, Any] = {
        "intensity": (("frame",) + dims, out["mean"].reshape((n,) + shape), iattrs),
        "count": (("frame",) + dims, out["count"].reshape((n,) + shape), {"long_name": "good finite pixels"}),
    }
    if "sem" in out:
        data_vars["sigma"] = (
            ("frame",) + dims, out["sem"].reshape((n,) + shape),
            {"long_name": "standard error of the bin mean (Poisson)", **({"units": units} if units else {})},
        )  # fmt: skip
        data_vars["std"] = (
            ("frame",) + dims, out["std"].reshape((n,) + shape),
            {"long_name": "standard deviation of the bin's pixels (Poisson)", **({"units": units} if units else {})},
        )  # fmt: skip
    return xr.Dataset(data_vars, coords={**frame_coords(ds), **coords}, attrs=provenance(name, **params))


def integrate1d(
    ds: xr.Dataset,
    npt: int,
    unit: str = "q_nm^-1",
    radial_range: tuple[float, float] | None = None,
    azimuth_range: tuple[float, float] | None = None,
    error_model: str | None = None,
    center: tuple[float, float] | None = None,
) -> xr.Dataset:
    """Azimuthally averaged profile of every frame on a uniform radial grid, lazily.

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack; ``unit`` in q or 2θ needs its geometry.
    npt : int
        Number of radial bins.
    unit : {"q_nm^-1", "2th_deg", "r_px"}
        Radial unit of the grid: q = 4π sinθ/λ in nm⁻¹, 2θ in degrees, or pixels.
    radial_range : (float, float), optional
        Grid span [low, high) in ``unit``; by default from the nearest to the farthest good
        pixel.
    azimuth_range : (float, float), optional
        Keep only pixels with azimuth χ = atan2(y − cy, x − cx) in [low, high) degrees.
    error_model : {None, "poisson"}
        With "poisson", also ``sigma`` and ``std`` (see the module notes).
    center : (float, float), optional
        Beam centre (row, column) in pixels, overriding the geometry's.

    Returns
    -------
    xarray.Dataset
        ``intensity`` and ``count`` (``frame``, ``radial``), with "poisson" ``sigma`` and
        ``std``; coordinates on ``radial``: the bin centres, named for the unit
        (``q_inv_nm``, ``two_theta_deg`` or ``radius_px``). NaN in a bin without good pixels.

    Raises
    ------
    ParameterError
        For an unknown unit or error model, ``npt`` < 1, or an empty or reversed range.
    GeometryError
        For q/2θ without a geometry, or a centre off the detector.
    """
    stack = checked(ds)
    ds = stack.ds
    npt = check_int("npt", npt, 1, MAX_BINS, "bins")
    _check_error_model(error_model)
    mask = check_mask(stack.mask)
    radial = _radial_map(stack, unit, center)
    lo, hi = _radial_span(radial, mask, radial_range)
    index = uniform_bin_index(radial, lo, (hi - lo) / npt, npt)
    if azimuth_range is not None:
        alo, ahi = _span(azimuth_range, "azimuth_range")
        chi = _azimuth_deg(stack, center)
        index = np.where((chi >= alo) & (chi < ahi), index, -1)
    plan = build_plan(mask, index, npt)
    out = run_fused(ds, plan, None, com=False, bins=True, name="integrate1d", variance=error_model == "poisson")
    cname, cunits, long_name = RADIAL_UNITS[unit]
    centres = lo + (np.arange(npt) + 0.5) * (hi - lo) / npt
    coords = {cname: ("radial", centres, {"units": cunits, "long_name": f"{long_name}, bin centre"})}
    params = {"npt": npt, "unit": unit, "radial_range": (lo, hi), "azimuth_range": azimuth_range,
              "error_model": error_model}  # fmt: skip
    return _result(ds, out, ("radial",), (npt,), coords, "integrate1d", params)


def integrate2d(
    ds: xr.Dataset,
    npt_rad: int,
    npt_azim: int = 360,
    unit: str = "q_nm^-1",
    radial_range: tuple[float, float] | None = None,
    azimuth_range: tuple[float, float] | None = None,
    error_model: str | None = None,
    center: tuple[float, float] | None = None,
) -> xr.Dataset:
    """The "cake" of every frame: mean intensity on a (χ, radial) grid, lazily.

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack; ``unit`` in q or 2θ needs its geometry.
    npt_rad, npt_azim : int
        Number of radial and azimuthal bins.
    unit : {"q_nm^-1", "2th_deg", "r_px"}
        Radial unit, as in `integrate1d`.
    radial_range : (float, float), optional
        Radial span in ``unit``; by default the good pixels' span.
    azimuth_range : (float, float), optional
        Azimuth span in degrees, χ = atan2(y − cy, x − cx) (rows down, columns right);
        default (−180, 180).
    error_model : {None, "poisson"}
        As in `integrate1d`.
    center : (float, float), optional
        Beam centre (row, column) in pixels, overriding the geometry's.

    Returns
    -------
    xarray.Dataset
        ``intensity`` and ``count`` (``frame``, ``chi``, ``radial``) and with "poisson"
        ``sigma`` and ``std``; coordinates ``chi_deg`` (bin centres, degrees) and the
        radial bin centres as in `integrate1d`.

    Raises
    ------
    ParameterError, GeometryError
        As in `integrate1d`.
    """
    stack = checked(ds)
    ds = stack.ds
    npt_rad = check_int("npt_rad", npt_rad, 1, MAX_BINS, "bins")
    npt_azim = check_int("npt_azim", npt_azim, 1, MAX_BINS, "bins")
    _check_error_model(error_model)
    mask = check_mask(stack.mask)
    radial = _radial_map(stack, unit, center)
    lo, hi = _radial_span(radial, mask, radial_range)
    if azimuth_range is None:
        alo, ahi = -180.0, float(np.nextafter(180.0, np.inf))  # atan2 reaches +180 exactly
    else:
        alo, ahi = _span(azimuth_range, "azimuth_range")
    kr = uniform_bin_index(radial, lo, (hi - lo) / npt_rad, npt_rad)
    ka = uniform_bin_index(_azimuth_deg(stack, center), alo, (ahi - alo) / npt_azim, npt_azim)
    index = np.where((kr >= 0) & (ka >= 0), ka * npt_rad + kr, -1)
    plan = build_plan(mask, index, npt_rad * npt_azim)
    out = run_fused(ds, plan, None, com=False, bins=True, name="integrate2d", variance=error_model == "poisson")
    cname, cunits, long_name = RADIAL_UNITS[unit]
    coords = {
        cname: ("radial", lo + (np.arange(npt_rad) + 0.5) * (hi - lo) / npt_rad,
                {"units": cunits, "long_name": f"{long_name}, bin centre"}),
        "chi_deg": ("chi", alo + (np.arange(npt_azim) + 0.5) * (ahi - alo) / npt_azim,
                    {"units": "degree", "long_name": "azimuth χ, bin centre"}),
    }  # fmt: skip
    params = {"npt_rad": npt_rad, "npt_azim": npt_azim, "unit": unit, "radial_range": (lo, hi),
              "azimuth_range": (alo, ahi), "error_model": error_model}  # fmt: skip
    return _result(ds, out, ("chi", "radial"), (npt_azim, npt_rad), coords, "integrate2d", params)

