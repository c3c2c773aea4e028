"""Shared plumbing of the reduction graph builders: validation, binning plan, coordinates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from diffdask.backend import array_namespace
from diffdask.blocks import map_frames
from diffdask.errors import GeometryError
from diffdask.frames import checked
from diffdask.geometry import Geometry
from diffdask.reduce.kernel import BinPlan, build_plan, check_mask, radial_bins, reduce_block


@dataclass(frozen=True)
class Annuli:
    """Radial binning in pixels: bin k holds k·w ≤ r < (k + 1)·w around ``center_yx``."""

    center_yx: tuple[float, float]
    bin_width_px: float
    n_bins: int

    @property
    def radius_px(self) -> np.ndarray:
        """Bin centres, pixels."""
        return (np.arange(self.n_bins) + 0.5) * self.bin_width_px


def resolve_center(shape: tuple[int, int], geometry: Geometry | None, center: Any) -> tuple[float, float]:
    """Centre of the bins: ``center`` if given, else the beam centre, else the array centre."""
    if center is not None:
        try:
            cy, cx = (float(c) for c in center)
        except (TypeError, ValueError):
            raise GeometryError(f"center must be (row, column) in pixels, got {center!r}.") from None
        return (cy, cx)
    if geometry is not None:
        return geometry.beam_center_yx
    return ((shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0)


def prepare(
    ds: Any,
    radial: bool,
    bin_width_px: float = 1.0,
    n_bins: int | None = None,
    center: Any = None,
) -> tuple[xr.Dataset, Geometry | None, BinPlan, Annuli | None]:
    """Validate a frame stack and build its kernel plan (with annuli when ``radial``)."""
    stack = checked(ds)
    ds, geometry, shape = stack.ds, stack.geometry, stack.frame_shape
    mask = check_mask(stack.mask)
    if not radial:
        return ds, geometry, build_plan(mask), None
    c = resolve_center(shape, geometry, center)
    index, nb = radial_bins(shape, c, bin_width_px, n_bins, mask)
    return ds, geometry, build_plan(mask, index, nb), Annuli(c, float(bin_width_px), nb)


def finish_block(
    block: Any,
    plan: BinPlan,
    threshold: float | None = None,
    com: bool = True,
    bins: bool = True,
    variance: bool = False,
) -> dict[str, Any]:
    """The kernel's sums of a block turned into per-frame results (the `map_frames` kernel).

    Returns
    -------
    dict of str to array
        With ``com``: ``total``, ``com_y``, ``com_x`` (float64, pixel-index units, NaN where
        the total is 0) and ``n_nonfinite``; with a threshold ``lit``; with ``bins``
        ``mean`` (n, n_bins, NaN for a bin without good pixels) and ``count``; with
        ``variance`` ``sem`` = √(Σ var)/N and ``std`` = √(Σ var / N) (pyFAI's Poisson model).
    """
    xp = array_namespace(block)
    sums = reduce_block(block, plan=plan, threshold=threshold, com=com, bins=bins, variance=variance)
    out: dict[str, Any] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        if com:
            total = sums["total"]
            empty = total == 0
            safe = xp.where(empty, 1.0, total)
            ry, rx = plan.reference_yx
            out["total"] = total
            out["com_y"] = xp.where(empty, xp.nan, ry + sums["sum_y"] / safe)
            out["com_x"] = xp.where(empty, xp.nan, rx + sums["sum_x"] / safe)
            out["n_nonfinite"] = sums["n_nonfinite"]
        if threshold is not None:
            out["lit"] = sums["lit"]
        if bins:
            count = sums["bin_count"]
            none = count == 0
            n = xp.where(none, 1, count).astype(xp.float64)
            out["mean"] = xp.where(none, xp.nan, sums["bin_sum"] / n)
            out["count"] = count
            if variance:
                out["sem"] = xp.where(none, xp.nan, xp.sqrt(sums["bin_var"]) / n)
                out["std"] = xp.where(none, xp.nan, xp.sqrt(sums["bin_var"] / n))
    return out


def run_fused(
    ds: xr.Dataset,
    plan: BinPlan,
    threshold: float | None,
    com: bool,
    bins: bool,
    name: str,
    variance: bool = False,
) -> dict[str, da.Array]:
    """Lazy outputs of `finish_block` over the whole stack, one kernel call per chunk."""
    frames = ds["frames"].data
    if not isinstance(frames, da.Array):
        frames = da.asarray(frames)
    outputs: dict[str, tuple[tuple[int, ...], Any]] = {}
    if com:
        outputs.update(
            total=((), np.float64), com_y=((), np.float64), com_x=((), np.float64), n_nonfinite=((), np.int32)
        )
    if bins:
        outputs.update(mean=((plan.n_bins,), np.float64), count=((plan.n_bins,), np.int32))
        if variance:
            outputs.update(sem=((plan.n_bins,), np.float64), std=((plan.n_bins,), np.float64))
    if threshold is not None:
        outputs["lit"] = ((), np.int32)
    return map_frames(
        finish_block,
        frames,
        outputs,
        kwargs={"plan": plan, "threshold": threshold, "com": com, "bins": bins, "variance": variance},
        name=name,
    )


def radius_coords(plan: BinPlan, annuli: Annuli, geometry: Geometry | None) -> dict[str, Any]:
    """Coordinates of the ``radius`` dim: bin centres, good pixels per bin, q when known."""
    r = annuli.radius_px
    coords: dict[str, Any] = {
        "radius_px": ("radius", r, {"units": "pixel", "long_name": "bin centre radius"}),
        "n_pixels": ("radius", plan.bin_counts, {"long_name": "good pixels in the bin"}),
    }
    if geometry is not None and len(set(geometry.pixel_size_yx_m)) == 1:
        coords["q_inv_nm"] = ("radius", geometry.q_of_radius_px(r), {"units": "nm^-1", "long_name": "q at bin centre"})
    return coords


def nonfinite_attrs() -> dict[str, Any]:
    """Attributes of the per-frame count of NaN/inf good pixels (left out of every sum)."""
    return {"long_name": "good pixels that were NaN/inf (skipped)"}


def total_attrs(units: Any) -> dict[str, Any]:
    """Attributes of a per-frame total (in the frames' units when they have some)."""
    attrs = {"long_name": "sum of good pixels"}
    if units:
        attrs["units"] = units
    return attrs
