"""Whole-scan kernels: standardised CoM maps, filtered log maps split by k-means, region growth.

Each kernel takes one chunk holding every frame of the scan, a few numbers per frame, and
returns per-frame arrays (a `diffdask.blocks.map_frames` kernel): means, windows and k-means
need the whole scan at once.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from diffdask.errors import ParameterError
from diffdask.roi.grid import check_positions, neighbourhoods, scan_coordinates

#: Columns of the kernels' input block, in order.
MAP_INPUTS = ("scan_y", "scan_x", "total", "com_y", "com_x")
MAP_OUTPUTS: dict[str, tuple[tuple[int, ...], Any]] = {
    "grid_y": ((), np.float64),
    "grid_x": ((), np.float64),
    "com_dy": ((), np.float64),
    "com_dx": ((), np.float64),
    "com_std_y": ((), np.float64),
    "com_std_x": ((), np.float64),
    "com_magnitude": ((), np.float64),
    "empty": ((), bool),
}
ROI_OUTPUTS: dict[str, tuple[tuple[int, ...], Any]] = {
    **MAP_OUTPUTS,
    "absorption_map": ((), np.float64),
    "com_map": ((), np.float64),
    "in_absorption": ((), bool),
    "in_com": ((), bool),
    "in_roi": ((), bool),
}


def _standardise(v: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deviation from the scan mean and eq. 2's (v − mean)/σ over the good frames."""
    mean = v[good].mean()
    sigma = v[good].std()
    dev = np.where(good, v - mean, np.nan)
    # No spread at all (an empty field without noise): no CoM contrast rather than 0/0.
    std = dev / sigma if sigma > 0 else np.where(good, 0.0, np.nan)
    return dev, std


def maps_kernel(block: np.ndarray) -> dict[str, np.ndarray]:
    """Scan maps of a whole scan (a `map_frames` kernel on one chunk holding every frame).

    Parameters
    ----------
    block : ndarray, shape (n_frames, 5)
        Columns ``scan_y``, ``scan_x`` (m), ``total``, ``com_y``, ``com_x`` (pixels).

    Returns
    -------
    dict
        The arrays of `MAP_OUTPUTS`, one value per frame.
    """
    block = np.asarray(block, dtype=np.float64)
    y, x, total, cy, cx = block.T
    check_positions(y, x)
    good = np.isfinite(total) & (total > 0) & np.isfinite(cy) & np.isfinite(cx)
    if not good.any():
        raise ParameterError(
            "every frame is empty (no positive counts): nothing to map; check the mask and the frames."
        )
    gy, gx = scan_coordinates(y, x)
    dy, sy = _standardise(cy, good)
    dx, sx = _standardise(cx, good)
    return {
        "grid_y": gy,
        "grid_x": gx,
        "com_dy": dy,
        "com_dx": dx,
        "com_std_y": sy,
        "com_std_x": sx,
        "com_magnitude": np.hypot(sy, sx),
        "empty": ~good,
    }


def _filtered_log(values: np.ndarray, good: np.ndarray, window: sparse.csr_matrix) -> np.ndarray:
    """ln of the mean over each neighbourhood's good frames (NaN for empty frames)."""
    weight = good.astype(np.float64)
    sums = window @ np.where(good, values, 0.0)
    counts = window @ weight
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = sums / counts
    # A zero mean (a perfectly flat, noise-free CoM field) maps to the smallest log there is,
    # not −inf, so that k-means still sees a number.
    out = np.log(np.maximum(mean, np.finfo(np.float64).tiny))
    return np.where(good, out, np.nan)


def _two_means(values: np.ndarray, good: np.ndarray, n_init: int, seed: int, high: bool) -> np.ndarray:
    """Members of the high (or low) cluster of a 2-means split of the good values."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    v = values[good]
    member = np.zeros(len(values), dtype=bool)
    if np.ptp(v) == 0:
        # One value everywhere: this map has no contrast and selects nothing.
        return member
    km = KMeans(n_clusters=2, n_init=n_init, random_state=seed)
    # One thread: a few thousand 1-D points gain nothing from OpenMP, whose spinning threads
    # cost seconds on a worker that shares its cores with the other Dask threads.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        # Heavily tied maps give fewer distinct points than n_init seeds; the split is still valid.
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = km.fit_predict(v[:, None])
    centres = km.cluster_centers_[:, 0]
    wanted = int(np.argmax(centres)) if high else int(np.argmin(centres))
    member[np.flatnonzero(good)] = labels == wanted
    return member


def roi_kernel(block: np.ndarray, filter_size: int, n_init: int, seed: int) -> dict[str, np.ndarray]:
    """Region of interest of a whole scan (a `map_frames` kernel on one chunk of every frame).

    Parameters
    ----------
    block : ndarray, shape (n_frames, 5)
        Columns ``scan_y``, ``scan_x`` (m), ``total``, ``com_y``, ``com_x`` (pixels).
    filter_size : int
        Odd width of the mean-filter window, in scan steps.
    n_init, seed : int
        k-means restarts and seed.

    Returns
    -------
    dict
        The arrays of `ROI_OUTPUTS`, one value per frame.
    """
    maps = maps_kernel(block)
    total = np.asarray(block, dtype=np.float64)[:, 2]
    good = ~maps["empty"]
    window = neighbourhoods(maps["grid_y"], maps["grid_x"], (filter_size - 1) / 2)
    absorption = _filtered_log(total, good, window)
    scattering = _filtered_log(maps["com_magnitude"], good, window)
    in_absorption = _two_means(absorption, good, n_init, seed, high=False)
    in_com = _two_means(scattering, good, n_init, seed, high=True)
    return {
        **maps,
        "absorption_map": absorption,
        "com_map": scattering,
        "in_absorption": in_absorption,
        "in_com": in_com,
        "in_roi": in_absorption | in_com,
    }


def grow_kernel(block: np.ndarray, steps: int) -> dict[str, np.ndarray]:
    """Grow (or shrink) a region by ``steps`` scan steps; block columns in_roi, grid_y, grid_x."""
    block = np.asarray(block, dtype=np.float64)
    inside = block[:, 0] > 0.5
    points = block[:, 1:3]
    # Shrinking the region is growing its complement: a position stays only if no scanned
    # position outside the region lies within |steps| steps. Unscanned space around the
    # field of view is unknown, not outside, so the scan's own edge never erodes.
    seed_set = inside if steps >= 0 else ~inside
    grown = seed_set.copy()
    if steps != 0 and seed_set.any():
        tree = cKDTree(points[seed_set])
        near = tree.query_ball_point(points, abs(steps) + 0.5, p=np.inf, return_length=True)
        grown = np.asarray(near) > 0
    return {"in_roi": grown if steps >= 0 else ~grown}
