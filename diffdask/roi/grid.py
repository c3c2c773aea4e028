"""Scan geometry: the scan step along each axis, raster detection and neighbourhoods.

Positions of a raster are replaced by their row and column indices; irregular positions
(fly scans, spirals, large position errors) are measured in units of the estimated step.
Either way a neighbourhood is every position within a Chebyshev distance, in steps.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from diffdask.errors import SchemaError

#: Largest misfit of a position from its raster node, in steps, for the scan to count as a
#: raster (position errors of a quarter step would already blur a 3 × 3 window).
GRID_TOLERANCE_STEPS = 0.25
#: A detected raster may leave at most this many nodes per position unvisited (partial
#: last line, skipped points); sparser "grids" are coincidences of irregular positions.
GRID_MAX_FILL = 2.0
#: Neighbours examined per position when estimating the scan step along each axis.
STEP_NEIGHBOURS = 8


def check_positions(y: np.ndarray, x: np.ndarray) -> None:
    """Refuse scan positions that cannot make a map.

    Parameters
    ----------
    y, x : ndarray, shape (n_frames,)
        Scan positions, metres.

    Raises
    ------
    SchemaError
        For NaN or inf positions, or one position shared by every frame.
    """
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(x))):
        raise SchemaError("scan_y/scan_x hold NaN or inf; every frame needs a finite scan position (metres).")
    if np.ptp(y) == 0 and np.ptp(x) == 0:
        raise SchemaError("all frames share one scan position; a region of interest needs a scan over the object.")


def _axis_steps(y: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """Scan step along y and x: median distance to the nearest neighbour lying along that axis.

    A neighbour lies along y when its |Δy| exceeds its |Δx|; the step is its |Δy|. On a raster
    this is the row and column pitch; on a fly scan the line spacing and the spacing along
    the line; on a spiral about the mean spacing in both.
    """
    points = np.column_stack([y, x])
    k = min(STEP_NEIGHBOURS + 1, len(y))
    _, idx = cKDTree(points).query(points, k=k)
    dy = np.abs(y[idx[:, 1:]] - y[:, None])
    dx = np.abs(x[idx[:, 1:]] - x[:, None])
    steps = []
    for along, across in ((dy, dx), (dx, dy)):
        # Neighbours come sorted by distance: the first one along the axis is the nearest.
        hit = along > across
        has = hit.any(axis=1)
        first = np.argmax(hit, axis=1)
        values = along[np.flatnonzero(has), first[has]]
        steps.append(float(np.median(values)) if values.size else math.nan)
    sy, sx = steps
    # A single line (or column) has no neighbours across it: use the other pitch.
    sy = sy if math.isfinite(sy) else sx
    sx = sx if math.isfinite(sx) else sy
    return sy, sx


def _grid_axis(v: np.ndarray, step: float) -> tuple[np.ndarray, float]:
    """Node index of each coordinate on a lattice of pitch ≈ ``step``; worst misfit in steps."""
    index = np.rint((v - v.min()) / step)
    if np.ptp(index) > 0:
        # Refit pitch and origin: one line's error in the first estimate would grow by the
        # number of lines across the scan.
        step, origin = np.polyfit(index, v, 1)
        index = np.rint((v - origin) / step)
        misfit = np.abs((v - origin) / step - index).max()
        return index - index.min(), float(misfit)
    return index, 0.0


def scan_coordinates(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in scan steps: raster row/column indices, or y/step and x/step otherwise."""
    sy, sx = _axis_steps(y, x)
    row, misfit_y = _grid_axis(y, sy)
    col, misfit_x = _grid_axis(x, sx)
    nodes = (row.max() + 1) * (col.max() + 1)
    distinct = len(np.unique(row * (col.max() + 1) + col)) == len(y)
    if max(misfit_y, misfit_x) <= GRID_TOLERANCE_STEPS and distinct and nodes <= GRID_MAX_FILL * len(y):
        return row, col
    return (y - y.min()) / sy, (x - x.min()) / sx


def neighbourhoods(gy: np.ndarray, gx: np.ndarray, half_width_steps: float) -> sparse.csr_matrix:
    """0/1 matrix: row k marks the positions within ``half_width_steps`` (Chebyshev) of k."""
    points = np.column_stack([gy, gx])
    # Half a step of slack: a window of h steps on a raster with small position errors.
    lists = cKDTree(points).query_ball_point(points, half_width_steps + 0.5, p=np.inf)
    lengths = np.fromiter((len(n) for n in lists), dtype=np.int64, count=len(lists))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([np.asarray(n, dtype=np.int64) for n in lists])
    n = len(gy)
    return sparse.csr_matrix((np.ones(len(indices)), indices, indptr), shape=(n, n))


def on_raster(gy: np.ndarray, gx: np.ndarray) -> bool:
    """Whether scan coordinates from `scan_coordinates` are raster rows and columns.

    Parameters
    ----------
    gy, gx : ndarray, shape (n_frames,)
        Positions in scan steps.

    Returns
    -------
    bool
        True when every coordinate is a whole number of steps (a detected raster).
    """
    return bool(np.all(gy == np.rint(gy)) and np.all(gx == np.rint(gx)))
