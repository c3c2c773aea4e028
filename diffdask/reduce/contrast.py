"""PSD contrast γ (Assalauova et al. 2022, eq. 5): how deep the fringes of a radial profile are."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import xarray as xr

from diffdask.checks import check_int
from diffdask.errors import ParameterError, SchemaError


def _extrema(y: np.ndarray, tolerance: float) -> tuple[list[float], list[float]]:
    """Minima and maxima after the central maximum, by a hysteresis (zig-zag) scan.

    A running maximum M is confirmed once the profile falls below it by more than
    ``tolerance · max(|M|, floor)``, a running minimum m once the profile rises above it by
    ``tolerance · max(|m|, floor)`` (floor = 10⁻³ of the profile's largest magnitude, so a
    zero minimum is not confirmed by round-off). Noise smaller than that never makes a
    turn, so a noisy profile gives the same fringes as a smooth one.
    """
    y = y[np.isfinite(y)]
    if y.size < 3:
        return [], []
    floor = 1e-3 * float(np.max(np.abs(y)))
    minima: list[float] = []
    maxima: list[float] = []
    seeking_max, central_seen = True, False
    cur = float(y[0])
    for v in map(float, y[1:]):
        band = tolerance * max(abs(cur), floor)
        if seeking_max:
            if v > cur:
                cur = v
            elif cur - v > band:
                if central_seen:
                    maxima.append(cur)
                central_seen = True
                seeking_max, cur = False, v
        else:
            if v < cur:
                cur = v
            elif v - cur > band:
                minima.append(cur)
                seeking_max, cur = True, v
    return minima, maxima


def _contrast_1d(y: np.ndarray, n_pairs: int, tolerance: float) -> float:
    minima, maxima = _extrema(np.asarray(y, dtype=np.float64), tolerance)
    if len(maxima) < n_pairs:
        return math.nan
    lo, hi = np.asarray(minima[:n_pairs]), np.asarray(maxima[:n_pairs])
    return float(np.mean((hi - lo) / (hi + lo)))


def _contrast_rows(y: np.ndarray, n_pairs: int, tolerance: float) -> np.ndarray:
    flat = y.reshape(-1, y.shape[-1])
    out = np.array([_contrast_1d(row, n_pairs, tolerance) for row in flat], dtype=np.float64)
    return out.reshape(y.shape[:-1])


def psd_contrast(profile: Any, n_pairs: int = 3, tolerance: float = 0.2) -> Any:
    """Contrast γ of the fringes of a radial profile (PSD), eq. 5 of Assalauova et al. (2022).

    γ = (1/N) Σᵢ (I_max,i − I_min,i) / (I_max,i + I_min,i) over the first N pairs of a local
    minimum and the local maximum after it, counted from the central maximum outwards.

    Parameters
    ----------
    profile : xarray.DataArray or array_like
        Radial profile(s): a DataArray with a ``radius`` dim (e.g. from `radial_profile` or
        `mean_profile`, any other dims are kept), or an array whose last axis is radius.
        NaN bins (no good pixel) are skipped.
    n_pairs : int
        N, the number of minimum/maximum pairs (3 in the paper).
    tolerance : float
        Relative size of a turn that counts as an extremum (0.2: the profile must come back
        by 20 % of the extreme value). Noise of a few per cent never makes such a turn, while
        real fringes (I_max/I_min of 2 or more) always do; raise it for noisier profiles,
        lower it for washed-out fringes.

    Returns
    -------
    float, ndarray or xarray.DataArray
        γ in [0, 1] for positive profiles; NaN where fewer than ``n_pairs`` fringes are found.
    """
    n_pairs = check_int("n_pairs", n_pairs, 1, what="fringe pairs")
    try:
        tol = float(tolerance)
    except (TypeError, ValueError):
        raise ParameterError(f"tolerance must be a number, got {tolerance!r}.") from None
    if not 0 < tol < 1:
        raise ParameterError(f"tolerance must be in (0, 1), got {tolerance!r}.")
    n_pairs = int(n_pairs)
    if isinstance(profile, xr.DataArray):
        if "radius" not in profile.dims:
            raise SchemaError(f"a profile needs a 'radius' dim, got dims {profile.dims}.")
        result = xr.apply_ufunc(
            _contrast_rows,
            profile,
            input_core_dims=[["radius"]],
            kwargs={"n_pairs": n_pairs, "tolerance": tol},
            dask="parallelized",
            output_dtypes=[np.float64],
        )
        result.name = "psd_contrast"
        result.attrs = {"long_name": f"PSD contrast over {n_pairs} fringe pairs", "n_pairs": n_pairs}
        return result
    y = np.asarray(profile, dtype=np.float64)
    if y.ndim < 1:
        raise SchemaError("a profile must have a radius axis (last axis); got a scalar.")
    out = _contrast_rows(y, n_pairs, tol)
    return float(out) if out.ndim == 0 else out
