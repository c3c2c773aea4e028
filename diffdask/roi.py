"""Ptychography region of interest from absorption and centre-of-mass maps (Lin et al.).

Before an expensive reconstruction, keep only the diffraction patterns whose scan position
sees the object. Two maps over the scan positions, both read from the frames in one pass:

- absorption contrast: the total counts T^k of each frame, low where the object absorbs;
- scattering: the centre of mass O^k of each frame (eq. 1), standardised over the scan
  (eq. 2) so that its origin is the calibrated beam centre; its magnitude is large where
  phase gradients in the object deflect the beam (edges, internal structure).

Each map is mean-filtered over a filter_size × filter_size neighbourhood of scan positions,
taken on a log scale and split in two by k-means. The region of interest is the union of
the low-transmission cluster and the high-magnitude cluster: absorption finds dense interiors
but misses weakly absorbing parts, the CoM finds edges but misses flat interiors.

Raster scans are detected from ``scan_y``/``scan_x`` and arranged on their grid (rows and
columns of scan steps); irregular positions (fly scans, spirals, large position errors) are
measured in units of the estimated scan step. Either way a neighbourhood is every position
within a Chebyshev distance of half the window plus half a step, so on a raster it is exactly
the square window, and grown or shrunk regions (`grow_roi`) move their border by whole steps.

The same CoM field gives differential phase contrast (`differential_phase`): the deflection
is the phase gradient, integrated to a phase map on a raster.

The per-frame CoM is one lazy pass over the frames (`diffdask.center_of_mass`); everything
after it works on a few numbers per scan position and runs as one task over the whole scan,
so the result does not depend on the chunking of the frames.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from scipy import sparse
from scipy.spatial import cKDTree

from diffdask.blocks import map_frames
from diffdask.errors import GeometryError, ParameterError, SchemaError
from diffdask.frames import frame_coords, get_geometry, provenance, validate
from diffdask.reduce import center_of_mass

#: Largest misfit of a position from its raster node, in steps, for the scan to count as a
#: raster (position errors of a quarter step would already blur a 3 × 3 window).
GRID_TOLERANCE_STEPS = 0.25
#: A detected raster may leave at most this many nodes per position unvisited (partial
#: last line, skipped points); sparser "grids" are coincidences of irregular positions.
GRID_MAX_FILL = 2.0
#: Neighbours examined per position when estimating the scan step along each axis.
STEP_NEIGHBOURS = 8

_MAP_INPUTS = ("scan_y", "scan_x", "total", "com_y", "com_x")
_MAP_OUTPUTS: dict[str, tuple[tuple[int, ...], Any]] = {
    "grid_y": ((), np.float64),
    "grid_x": ((), np.float64),
    "com_dy": ((), np.float64),
    "com_dx": ((), np.float64),
    "com_std_y": ((), np.float64),
    "com_std_x": ((), np.float64),
    "com_magnitude": ((), np.float64),
    "empty": ((), bool),
}
_ROI_OUTPUTS: dict[str, tuple[tuple[int, ...], Any]] = {
    **_MAP_OUTPUTS,
    "absorption_map": ((), np.float64),
    "com_map": ((), np.float64),
    "in_absorption": ((), bool),
    "in_com": ((), bool),
    "in_roi": ((), bool),
}
_DPC_OUTPUTS: dict[str, tuple[tuple[int, ...], Any]] = {
    "grid_y": ((), np.float64),
    "grid_x": ((), np.float64),
    "phase_gradient_y": ((), np.float64),
    "phase_gradient_x": ((), np.float64),
    "dpc_phase": ((), np.float64),
}
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


# --------------------------------------------------------------------------- kernels


def _check_positions(y: np.ndarray, x: np.ndarray) -> None:
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


def _scan_coordinates(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in scan steps: raster row/column indices, or y/step and x/step otherwise."""
    sy, sx = _axis_steps(y, x)
    row, misfit_y = _grid_axis(y, sy)
    col, misfit_x = _grid_axis(x, sx)
    nodes = (row.max() + 1) * (col.max() + 1)
    distinct = len(np.unique(row * (col.max() + 1) + col)) == len(y)
    if max(misfit_y, misfit_x) <= GRID_TOLERANCE_STEPS and distinct and nodes <= GRID_MAX_FILL * len(y):
        return row, col
    return (y - y.min()) / sy, (x - x.min()) / sx


def _neighbourhoods(gy: np.ndarray, gx: np.ndarray, half_width_steps: float) -> sparse.csr_matrix:
    """0/1 matrix: row k marks the positions within ``half_width_steps`` (Chebyshev) of k."""
    points = np.column_stack([gy, gx])
    # Half a step of slack: a window of h steps on a raster with small position errors.
    lists = cKDTree(points).query_ball_point(points, half_width_steps + 0.5, p=np.inf)
    lengths = np.fromiter((len(n) for n in lists), dtype=np.int64, count=len(lists))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([np.asarray(n, dtype=np.int64) for n in lists])
    n = len(gy)
    return sparse.csr_matrix((np.ones(len(indices)), indices, indptr), shape=(n, n))


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
        The arrays of `_MAP_OUTPUTS`, one value per frame.
    """
    block = np.asarray(block, dtype=np.float64)
    y, x, total, cy, cx = block.T
    _check_positions(y, x)
    good = np.isfinite(total) & (total > 0) & np.isfinite(cy) & np.isfinite(cx)
    if not good.any():
        raise ParameterError(
            "every frame is empty (no positive counts): nothing to map; check the mask and the frames."
        )
    gy, gx = _scan_coordinates(y, x)
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
        The arrays of `_ROI_OUTPUTS`, one value per frame.
    """
    maps = maps_kernel(block)
    total = np.asarray(block, dtype=np.float64)[:, 2]
    good = ~maps["empty"]
    window = _neighbourhoods(maps["grid_y"], maps["grid_x"], (filter_size - 1) / 2)
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


def _pitch(index: np.ndarray, position: np.ndarray) -> float:
    """Raster pitch (metres per row or column) fitted to the positions, NaN for one line."""
    return float(np.polyfit(index, position, 1)[0]) if np.ptp(index) > 0 else math.nan


def _mirrored(g: np.ndarray, odd_axis: int) -> np.ndarray:
    """Even extension of a phase image seen through its gradient along ``odd_axis``.

    Mirroring the phase about the image edges makes it periodic without jumps; its gradient
    along the mirrored axis changes sign there. FFT integration of the extended field has
    no wrap-around errors at the edges of the scan.
    """
    sign_x = -1.0 if odd_axis == 1 else 1.0
    sign_y = -1.0 if odd_axis == 0 else 1.0
    top = np.concatenate([g, sign_x * g[:, ::-1]], axis=1)
    return np.concatenate([top, sign_y * top[::-1, :]], axis=0)


def integrate_gradient(grad_y: np.ndarray, grad_x: np.ndarray, step_y: float, step_x: float) -> np.ndarray:
    """Least-squares phase from its gradient images (Frankot–Chellappa, mirrored edges).

    Parameters
    ----------
    grad_y, grad_x : ndarray, shape (rows, cols)
        ∂φ/∂y and ∂φ/∂x on a raster, rad/m.
    step_y, step_x : float
        Raster pitch, metres.

    Returns
    -------
    ndarray, shape (rows, cols)
        φ in radians, mean zero over the extended image.
    """
    rows, cols = grad_y.shape
    fy = np.fft.fft2(_mirrored(grad_y, 0))
    fx = np.fft.fft2(_mirrored(grad_x, 1))
    ky = 2 * np.pi * np.fft.fftfreq(2 * rows, step_y)[:, None]
    kx = 2 * np.pi * np.fft.fftfreq(2 * cols, step_x)[None, :]
    k2 = kx**2 + ky**2
    k2[0, 0] = 1.0
    # ∂φ/∂x ↔ i kx φ̂: the least-squares φ̂ is −i (kx Ĝx + ky Ĝy) / |k|².
    spectrum = -1j * (kx * fx + ky * fy) / k2
    spectrum[0, 0] = 0.0
    return np.fft.ifft2(spectrum).real[:rows, :cols]


def dpc_kernel(block: np.ndarray, radians_per_pixel: tuple[float, float]) -> dict[str, np.ndarray]:
    """Differential phase contrast of a whole raster scan (a `map_frames` kernel on one chunk).

    Parameters
    ----------
    block : ndarray, shape (n_frames, 5)
        Columns ``scan_y``, ``scan_x`` (m), ``total``, ``com_y``, ``com_x`` (pixels).
    radians_per_pixel : (float, float)
        Phase gradient (rad/m) of a CoM shift of one pixel along y and x: 2π p / (λ D).

    Returns
    -------
    dict
        The arrays of `_DPC_OUTPUTS`, one value per frame.
    """
    block = np.asarray(block, dtype=np.float64)
    maps = maps_kernel(block)
    gy, gx = maps["grid_y"], maps["grid_x"]
    if not (np.all(gy == np.rint(gy)) and np.all(gx == np.rint(gx))):
        raise ParameterError(
            "differential phase contrast integrates on a raster; these scan positions are irregular "
            "(use the phase gradients of a raster scan, or resample the CoM maps onto a grid first)."
        )
    good = ~maps["empty"]
    row, col = gy.astype(int), gx.astype(int)
    grads = []
    for com, scale in ((block[:, 3], radians_per_pixel[0]), (block[:, 4], radians_per_pixel[1])):
        # The undeflected beam is the median CoM: most positions of a scan see background,
        # while the mean is pulled by the object's deflections.
        grads.append(np.where(good, (com - np.median(com[good])) * scale, np.nan))
    step_y, step_x = _pitch(row, block[:, 0]), _pitch(col, block[:, 1])
    step_y = step_y if math.isfinite(step_y) else step_x
    step_x = step_x if math.isfinite(step_x) else step_y
    images = []
    for g in grads:
        # Unvisited nodes and empty frames add no slope.
        image = np.zeros((row.max() + 1, col.max() + 1))
        image[row[good], col[good]] = g[good]
        images.append(image)
    phase = integrate_gradient(images[0], images[1], step_y, step_x)[row, col]
    return {
        "grid_y": gy,
        "grid_x": gx,
        "phase_gradient_y": grads[0],
        "phase_gradient_x": grads[1],
        "dpc_phase": np.where(good, phase, np.nan),
    }


# --------------------------------------------------------------------------- graph builders


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


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ParameterError(f"{name} must be an integer ≥ {minimum}, got {value!r}.")
    return int(value)


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
    data: dict[str, Any] = {name: ("frame", columns[:, i], dict(input_attrs[name])) for i, name in enumerate(_MAP_INPUTS)}
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
    arrays = map_frames(maps_kernel, columns, _MAP_OUTPUTS, name="scan-maps")
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
    size = _check_int("filter_size", filter_size, 1)
    if size % 2 == 0:
        raise ParameterError(f"filter_size must be odd so that the window is centred on each position, got {size}.")
    n_init = _check_int("n_init", n_init, 1)
    seed = _check_int("seed", seed, 0)
    ds = _check_stack(ds)
    columns = _inputs(ds)
    arrays = map_frames(
        roi_kernel, columns, _ROI_OUTPUTS, kwargs={"filter_size": size, "n_init": n_init, "seed": seed}, name="find-roi"
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
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ParameterError(f"steps must be a whole number of scan steps (negative shrinks), got {steps!r}.")
    steps = int(steps)
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
    arrays = map_frames(dpc_kernel, columns, _DPC_OUTPUTS, kwargs={"radians_per_pixel": scale}, name="dpc")
    data: dict[str, Any] = {name: ("frame", columns[:, i], dict(_ATTRS[name])) for i, name in enumerate(_MAP_INPUTS[:2])}
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
    if not (np.all(gy == np.rint(gy)) and np.all(gx == np.rint(gx))):
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
