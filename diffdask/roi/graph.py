"""Graph builders of the region of interest: scan maps, RoI, its growth, DPC, scan images.

The per-frame CoM and totals are one lazy pass over the frames (`diffdask.center_of_mass`);
the whole-scan kernels then run as one task on a few numbers per frame.
"""

from __future__ import annotations

import math
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from diffdask.blocks import map_frames
from diffdask.checks import check_int, check_seed
from diffdask.errors import GeometryError, ParameterError, SchemaError
from diffdask.frames import frame_coords, get_geometry, provenance, validate
from diffdask.reduce import center_of_mass
from diffdask.roi.grid import on_raster
from diffdask.roi.kernels import MAP_INPUTS, MAP_OUTPUTS, ROI_OUTPUTS, grow_kernel, maps_kernel, roi_kernel
from diffdask.roi.phase import DPC_OUTPUTS, dpc_kernel

_ATTRS: dict[str, dict[str, str]] = {
    "scan_y": {"units": "m", "long_name": "scan position, y"},
    "scan_x": {"units": "m", "long_name": "scan position, x"},
    "grid_y": {"units": "scan step", "long_name": "scan row (raster) or y / step (irregular)"},
    "grid_x": {"units": "scan step", "long_name": "scan column (raster) or x / step (irregular)"},
    "com_dy": {"units": "pixel", "long_name": "CoM row minus its mean over the scan"},
    "com_dx": {"units": "pixel", "long_name": "CoM column minus its mean over the scan"},
    "com_std_y": {"long_name": "standardised CoM row (eq. 2)"},
    "com_std_x": {"long_name": "standardised CoM column (eq. 2)"},
    "com_magnitude": {"long_name": "magnitude of the standardised CoM vector"},
    "empty": {"long_name": "frame without counts (left out of maps and RoI)"},
    "absorption_map": {"long_name": "ln of the mean-filtered total counts"},
    "com_map": {"long_name": "ln of the mean-filtered standardised CoM magnitude"},
    "in_absorption": {"long_name": "in the low-transmission k-means cluster"},
    "in_com": {"long_name": "in the high-CoM-magnitude k-means cluster"},
    "in_roi": {"long_name": "in the region of interest"},
    "phase_gradient_y": {"units": "rad/m", "long_name": "phase gradient along y from the CoM deflection"},
    "phase_gradient_x": {"units": "rad/m", "long_name": "phase gradient along x from the CoM deflection"},
    "dpc_phase": {"units": "rad", "long_name": "phase integrated from the gradients (mean zero)"},
}


def _check_stack(ds: Any) -> xr.Dataset:
    ds = validate(ds)
    missing = [n for n in ("scan_y", "scan_x") if n not in ds]
    if missing:
        raise SchemaError(
            f"the stack has no {' or '.join(missing)}: a region of interest needs the scan position of "
            "every frame; add per-frame scan_y and scan_x in metres (make_frame_stack(per_frame=...))."
        )
    for name in ("scan_y", "scan_x"):
        if ds[name].dims != ("frame",) or ds[name].dtype.kind not in "iuf":
            raise SchemaError(
                f"{name} must be a real number per frame (dims ('frame',)), got dims {ds[name].dims} "
                f"and dtype {ds[name].dtype}."
            )
    if ds.sizes["frame"] < 2:
        raise SchemaError(
            f"the stack has {ds.sizes['frame']} frame; a region of interest needs a scan of several positions."
        )
    return ds


def _inputs(ds: xr.Dataset) -> da.Array:
    """The five per-frame columns the scan kernels need, as one single-chunk array."""
    com = center_of_mass(ds)
    columns = [da.asarray(ds["scan_y"].data), da.asarray(ds["scan_x"].data)]
    columns += [com[name].data for name in ("total", "com_y", "com_x")]
    # Every later step needs the whole scan at once (means, windows, k-means): a few numbers
    # per frame, so one chunk even for millions of frames.
    return da.stack([c.astype(np.float64) for c in columns], axis=1).rechunk({0: -1, 1: -1})


def _assemble(ds: xr.Dataset, arrays: dict[str, da.Array], columns: da.Array, attrs: dict[str, Any]) -> xr.Dataset:
    units = ds["frames"].attrs.get("units") or ds.attrs.get("units")
    input_attrs = {
        "scan_y": _ATTRS["scan_y"],
        "scan_x": _ATTRS["scan_x"],
        "total": {"long_name": "absorption contrast T: sum of good pixels", **({"units": units} if units else {})},
        "com_y": {"units": "pixel", "long_name": "centre of mass, row (eq. 1)"},
        "com_x": {"units": "pixel", "long_name": "centre of mass, column (eq. 1)"},
    }
    data: dict[str, Any] = {name: ("frame", columns[:, i], dict(input_attrs[name])) for i, name in enumerate(MAP_INPUTS)}
    for name, arr in arrays.items():
        data[name] = ("frame", arr, dict(_ATTRS[name]))
    return xr.Dataset(data, coords=frame_coords(ds), attrs=attrs)


def scan_maps(ds: xr.Dataset) -> xr.Dataset:
    """Absorption and centre-of-mass maps over the scan positions, lazily.

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack with per-frame ``scan_y`` and ``scan_x`` (metres).

    Returns
    -------
    xarray.Dataset
        On ``frame``: ``scan_y``, ``scan_x`` (m); ``grid_y``, ``grid_x`` (position in scan
        steps: row and column of a detected raster, else position / estimated step);
        ``total`` (absorption contrast T^k, the frames' units); ``com_y``, ``com_x`` (eq. 1,
        pixels); ``com_dy``, ``com_dx`` (CoM minus its mean over the scan, pixels: the CoM
        vector about the calibrated beam centre); ``com_std_y``, ``com_std_x`` (eq. 2,
        dimensionless) and ``com_magnitude``; ``empty`` (frames without counts, NaN in the
        CoM maps). Arrange a variable as an image with `scan_grid`.

    Raises
    ------
    SchemaError
        Without ``scan_y``/``scan_x``, with a single frame; when computed, for non-finite
        positions or a single position repeated.
    ParameterError
        When computed, if every frame is empty.

    Notes
    -----
    One pass over the frames (`diffdask.center_of_mass`), then one task over the whole scan.
    """
    ds = _check_stack(ds)
    columns = _inputs(ds)
    arrays = map_frames(maps_kernel, columns, MAP_OUTPUTS, name="scan-maps")
    return _assemble(ds, arrays, columns, provenance("scan_maps"))


def find_roi(ds: xr.Dataset, filter_size: int = 3, n_init: int = 10, seed: int = 0) -> xr.Dataset:
    """Region of interest of a ptychography scan from absorption and CoM maps (Lin et al.).

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack with per-frame ``scan_y`` and ``scan_x`` (metres).
    filter_size : int
        Width of the mean-filter window in scan steps (odd; 1 = no filtering; the paper's 3).
    n_init : int
        k-means restarts; the best of them (lowest inertia) is kept.
    seed : int
        Seed of the k-means starts; the same seed gives the same region on any cluster.

    Returns
    -------
    xarray.Dataset
        Every variable of `scan_maps`, and on ``frame``: ``absorption_map`` (ln of the
        mean-filtered totals), ``com_map`` (ln of the mean-filtered standardised CoM
        magnitude), ``in_absorption`` (low-transmission cluster), ``in_com``
        (high-magnitude cluster), ``in_roi`` (their union; False for empty frames); 0-d
        ``n_in_roi`` and ``roi_fraction`` (kept frames and their fraction of the scan).
        Join it to the stack with ``ds.assign(in_roi=roi.in_roi)`` and select with
        ``ds.isel(frame=roi.in_roi.values)``.

    Raises
    ------
    SchemaError, ParameterError
        As `scan_maps`; ParameterError for a ``filter_size``, ``n_init`` or ``seed`` out of
        range.

    Notes
    -----
    The k-means split runs on the log of each filtered map (the scale the paper shows them
    on): totals and CoM magnitudes span decades between background and object. To store the
    region beside the frames, save the per-frame variables (``diffdask roi`` does), e.g.
    ``save_results(roi.drop_vars(["n_in_roi", "roi_fraction"]), store, "roi")``.
    """
    size = check_int("filter_size", filter_size, 1, what="scan steps")
    if size % 2 == 0:
        raise ParameterError(f"filter_size must be odd so that the window is centred on each position, got {size}.")
    n_init = check_int("n_init", n_init, 1, what="restarts")
    seed = check_seed(seed)
    ds = _check_stack(ds)
    columns = _inputs(ds)
    arrays = map_frames(
        roi_kernel, columns, ROI_OUTPUTS, kwargs={"filter_size": size, "n_init": n_init, "seed": seed}, name="find-roi"
    )
    attrs = provenance("find_roi", filter_size=size, n_init=n_init, seed=seed)
    return _with_counts(_assemble(ds, arrays, columns, attrs))


def _with_counts(roi: xr.Dataset) -> xr.Dataset:
    n_in = roi["in_roi"].sum()
    return roi.assign(
        n_in_roi=n_in.assign_attrs(long_name="frames in the region of interest"),
        roi_fraction=(n_in / roi.sizes["frame"]).assign_attrs(long_name="fraction of frames kept"),
    )


def grow_roi(roi: xr.Dataset, steps: int) -> xr.Dataset:
    """Move the border of a region of interest outwards (or inwards) by whole scan steps.

    Parameters
    ----------
    roi : xarray.Dataset
        Output of `find_roi` (``in_roi``, ``grid_y``, ``grid_x``).
    steps : int
        Border change in scan steps along x and y (the paper's border size): a position
        joins the region when a region position lies within ``steps`` steps of it along both
        axes (a (2·steps + 1)² square on a raster). Negative values shrink: a position
        leaves when a scanned position outside the region lies that close. Unscanned space
        beyond the field of view does not count as outside.

    Returns
    -------
    xarray.Dataset
        ``roi`` with ``in_roi``, ``n_in_roi`` and ``roi_fraction`` replaced, and the total
        border change recorded in ``attrs["border_steps"]``.
    """
    # Negative steps shrink the region: no lower bound.
    steps = check_int("steps", steps, what="scan steps")
    if not isinstance(roi, xr.Dataset) or not {"in_roi", "grid_y", "grid_x"} <= set(roi.variables):
        raise SchemaError("grow_roi takes the Dataset from find_roi (with in_roi, grid_y and grid_x).")
    columns = da.stack(
        [da.asarray(roi[n].data).astype(np.float64) for n in ("in_roi", "grid_y", "grid_x")], axis=1
    ).rechunk({0: -1, 1: -1})
    grown = map_frames(grow_kernel, columns, {"in_roi": ((), bool)}, kwargs={"steps": steps}, name="grow-roi")
    attrs = {**roi.attrs, "border_steps": int(roi.attrs.get("border_steps", 0)) + steps}
    out = roi.drop_vars(["n_in_roi", "roi_fraction"], errors="ignore")
    out = out.assign(in_roi=("frame", grown["in_roi"], dict(_ATTRS["in_roi"])))
    return _with_counts(out).assign_attrs(attrs)


def differential_phase(ds: xr.Dataset) -> xr.Dataset:
    """Differential phase contrast: phase gradients from the CoM and their integral, lazily.

    A phase gradient ∇φ deflects the beam by λ∇φ/2π, moving the centre of mass on a detector
    at distance D by λD∇φ/(2π p) pixels; so ∂φ/∂y = 2π p_y ΔO_y/(λD) and likewise for x,
    with ΔO the CoM minus its median over the scan (the undeflected beam). On a raster the
    two gradient maps are integrated to a phase map by least squares in Fourier space.

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack with ``scan_y``/``scan_x`` (metres) and a geometry (wavelength,
        distance, pixel size). Detector rows must run along ``scan_y`` and columns along
        ``scan_x`` with the same sense (as in `diffdask.simulate_ptycho`); flip or transpose
        the positions first if the instrument differs.

    Returns
    -------
    xarray.Dataset
        On ``frame``: ``scan_y``, ``scan_x``, ``grid_y``, ``grid_x``, ``phase_gradient_y``,
        ``phase_gradient_x`` (rad/m) and ``dpc_phase`` (rad, mean zero; NaN for empty
        frames). Arrange as images with `scan_grid`.

    Raises
    ------
    GeometryError
        Without a detector geometry.
    SchemaError, ParameterError
        As `scan_maps`; ParameterError, when computed, for positions that are not a raster.
    """
    ds = _check_stack(ds)
    geometry = get_geometry(ds)
    if geometry is None:
        raise GeometryError(
            "differential phase contrast needs the detector geometry (wavelength, distance, pixel size); "
            "pass geometry= to make_frame_stack."
        )
    scale = tuple(2 * math.pi * p / (geometry.wavelength_m * geometry.distance_m) for p in geometry.pixel_size_yx_m)
    columns = _inputs(ds)
    arrays = map_frames(dpc_kernel, columns, DPC_OUTPUTS, kwargs={"radians_per_pixel": scale}, name="dpc")
    data: dict[str, Any] = {name: ("frame", columns[:, i], dict(_ATTRS[name])) for i, name in enumerate(MAP_INPUTS[:2])}
    for name, arr in arrays.items():
        data[name] = ("frame", arr, dict(_ATTRS[name]))
    return xr.Dataset(data, coords=frame_coords(ds), attrs=provenance("differential_phase"))


def scan_grid(result: xr.Dataset, name: str) -> xr.DataArray:
    """One per-frame variable of `scan_maps`/`find_roi` as an image on its raster grid.

    Parameters
    ----------
    result : xarray.Dataset
        Output of `scan_maps` or `find_roi` (computed or lazy: the variable is loaded).
    name : str
        Per-frame variable to arrange (``"absorption_map"``, ``"in_roi"``...).

    Returns
    -------
    xarray.DataArray
        Dims (``scan_row``, ``scan_col``), coordinates ``y_m``/``x_m`` (mean position of each
        row/column, metres); NaN (or False for booleans) at unvisited nodes.

    Raises
    ------
    ParameterError
        If the positions are not a raster (irregular scans have no image: plot them at their
        positions instead).
    """
    if name not in result or result[name].dims != ("frame",):
        raise ParameterError(f"{name!r} is not a per-frame variable of this result.")
    gy, gx = result["grid_y"].values, result["grid_x"].values
    if not on_raster(gy, gx):
        raise ParameterError("these scan positions are not on a raster; plot the values at scan_y/scan_x instead.")
    row, col = gy.astype(int), gx.astype(int)
    values = result[name].values
    fill: Any = False if values.dtype == bool else np.nan
    image = np.full((row.max() + 1, col.max() + 1), fill, dtype=values.dtype if values.dtype == bool else float)
    image[row, col] = values
    y, x = result["scan_y"].values, result["scan_x"].values
    coords = {
        "y_m": ("scan_row", np.bincount(row, y) / np.maximum(np.bincount(row), 1), {"units": "m"}),
        "x_m": ("scan_col", np.bincount(col, x) / np.maximum(np.bincount(col), 1), {"units": "m"}),
    }
    return xr.DataArray(image, dims=("scan_row", "scan_col"), coords=coords, name=name, attrs=result[name].attrs)
