"""Shared plumbing of the reduction graph builders: validation, operator, coordinates."""

from __future__ import annotations

import math
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from diffdask.blocks import map_frames
from diffdask.errors import ParameterError
from diffdask.frames import get_geometry, get_mask, validate
from diffdask.geometry import Geometry
from diffdask.reduce.operator import (
    PixelOperator,
    build_operator,
    reduce_block,
    resolve_center,
    work_dtype,
)


def prepare(
    ds: Any,
    radial: bool,
    bin_width_px: float = 1.0,
    n_bins: int | None = None,
    center: Any = None,
) -> tuple[xr.Dataset, Geometry | None, PixelOperator]:
    """Validate a frame stack and build its reduction operator."""
    ds = validate(ds)
    shape = tuple(ds["frames"].shape[1:])
    geometry = get_geometry(ds)
    op = build_operator(
        get_mask(ds),
        center_yx=resolve_center(shape, geometry, center) if radial else None,
        bin_width_px=bin_width_px,
        n_bins=n_bins,
        radial=radial,
    )
    return ds, geometry, op


def check_threshold(threshold: Any) -> float:
    """A lit-pixel threshold as a finite float."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ParameterError(f"threshold must be a number (same units as the frames), got {threshold!r}.") from None
    if not math.isfinite(t):
        raise ParameterError(f"threshold must be finite, got {threshold!r}.")
    return t


def check_min_lit(min_lit: Any) -> int:
    """A minimum number of lit pixels as a non-negative int."""
    if isinstance(min_lit, bool) or not isinstance(min_lit, (int, np.integer)) or min_lit < 0:
        raise ParameterError(f"min_lit must be a non-negative integer number of pixels, got {min_lit!r}.")
    return int(min_lit)


def run_fused(
    ds: xr.Dataset,
    op: PixelOperator,
    threshold: float | None,
    com: bool,
    radial: bool,
    name: str,
) -> dict[str, da.Array]:
    """Lazy outputs of `reduce_block` over the whole stack, one kernel call per chunk."""
    frames = ds["frames"].data
    if not isinstance(frames, da.Array):
        frames = da.asarray(frames)
    fdt = work_dtype(frames.dtype)
    outputs: dict[str, tuple[tuple[int, ...], Any]] = {}
    if com:
        outputs.update(total=((), np.float64), com_y=((), np.float64), com_x=((), np.float64))
    if radial:
        outputs["radial"] = ((op.n_bins,), fdt)
    if threshold is not None:
        outputs["lit"] = ((), np.int32)
    return map_frames(
        reduce_block,
        frames,
        outputs,
        kwargs={"op": op, "threshold": threshold, "com": com, "radial": radial},
        name=name,
        pass_offset=True,
    )


def frame_coords(ds: xr.Dataset) -> dict[str, Any]:
    """The stack's coordinates along ``frame`` (to carry into per-frame results)."""
    return {k: v for k, v in ds.coords.items() if v.dims == ("frame",)}


def radius_coords(op: PixelOperator, geometry: Geometry | None) -> dict[str, Any]:
    """Coordinates of the ``radius`` dim: bin centres, good pixels per bin, q when known."""
    r = op.radius_px
    coords: dict[str, Any] = {
        "radius_px": ("radius", r, {"units": "pixel", "long_name": "bin centre radius"}),
        "n_pixels": ("radius", op.bin_counts, {"long_name": "good pixels in the bin"}),
    }
    if geometry is not None and len(set(geometry.pixel_size_yx_m)) == 1:
        coords["q_inv_nm"] = ("radius", geometry.q_of_radius_px(r), {"units": "nm^-1", "long_name": "q at bin centre"})
    return coords


def total_attrs(units: Any) -> dict[str, Any]:
    """Attributes of a per-frame total (in the frames' units when they have some)."""
    attrs = {"long_name": "sum of good pixels"}
    if units:
        attrs["units"] = units
    return attrs


def provenance(function: str, **params: Any) -> dict[str, Any]:
    """Attributes that record what made a result (function, parameters, version)."""
    from diffdask import __version__

    attrs: dict[str, Any] = {"diffdask_function": f"diffdask.{function}", "diffdask_version": __version__}
    for k, v in params.items():
        if v is None:
            continue
        attrs[k] = list(v) if isinstance(v, tuple) else v
    return attrs
