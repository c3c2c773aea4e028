"""Sampling of common lines (and Ewald common arcs) from 2-D class averages.

Convention (Dragonfly's ``utils/py_src/calc_cc.py``, kept exactly): an average of shape
``(S, S)`` has its centre at index ``(S // 2, S // 2)``; line ``i`` is the full diameter at
angle θ_i = i·π/n_angles over [0, π) (Friedel symmetry assumed), sampled at the signed
integer radii r ∈ [−S//2, S − S//2) with |r| > mask_radius, at array index
``(r·cos θ_i + S//2, r·sin θ_i + S//2)`` — the *first* index from the cosine. Nearest
sampling rounds both indices to the nearest integer (half to even, as ``np.round``).

Options beyond Dragonfly:

- ``full_circle=True``: the same full diameters at θ_i = i·2π/n_angles over [0, 2π), so
  a line and its reverse are both candidates and no Friedel symmetry is assumed;
- Ewald common arcs: at a tilt β between two views, the points of a view common to the
  other satisfy cos(φ − ψ) = tan(β/2)·tan θ (φ the azimuth, θ half the scattering angle).
  Written about the arc's direction α = ψ + π/2 at the origin, the sample at signed
  radius r sits at azimuth α − sign(r)·arcsin(tan(β/2)·tan θ(|r|)); β = 0 gives the
  straight diameter. The other view sees the same arc with −β.

Samples beyond the last pixel (possible only for even S, at r = −S/2) take the edge pixel,
as Dragonfly's spline evaluation does. All interpolation is a precomputed sparse operator
(CSR, samples × S²) applied to a whole block of averages in one sparse-dense product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from diffdask.backend import array_namespace, library_of, to_cpu
from diffdask.blocks import map_frames
from diffdask.errors import ParameterError, SchemaError
from diffdask.frames import checked
from diffdask.geometry import Geometry

INTERPOLATIONS = ("nearest", "bilinear")


@dataclass(frozen=True)
class LineGrid:
    """Where the common lines of an ``(S, S)`` average are sampled.

    Attributes
    ----------
    size : int
        Side S of the averages, pixels.
    radii_px : ndarray, shape (n_r,)
        Signed sample radii along a line, pixels.
    angles_rad : ndarray, shape (n_angles,)
        Line angles θ_i, radians.
    tilts_rad : ndarray, shape (n_tilts,)
        Ewald tilts β, radians (``[0.0]`` for straight lines); symmetric about 0.
    rows, cols : ndarray, shape (n_tilts, n_angles, n_r)
        Fractional array indices of the samples (first index from the cosine).
    """

    size: int
    radii_px: np.ndarray
    angles_rad: np.ndarray
    tilts_rad: np.ndarray
    rows: np.ndarray
    cols: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n_tilts, n_angles, n_r)``."""
        return self.rows.shape  # type: ignore[return-value]


def check_averages_shape(shape: Sequence[int]) -> int:
    """Side S of a stack of square averages of ``shape`` (M, S, S).

    Raises
    ------
    SchemaError
        If the stack is not 3-D, empty, or its averages are not square.
    """
    if len(shape) != 3:
        raise SchemaError(
            f"averages must be a 3-D stack (M, S, S), got shape {tuple(shape)}; a single average "
            "needs a leading axis: averages[None]."
        )
    m, ny, nx = (int(s) for s in shape)
    if ny != nx:
        raise SchemaError(
            f"averages must be square (S × S, centred at S // 2), got {ny} × {nx}; crop or pad them "
            "symmetrically about the beam centre first."
        )
    if m < 1 or ny < 1:
        raise SchemaError(f"the stack of averages is empty: shape {tuple(shape)}.")
    return nx


def line_grid(
    size: int,
    n_angles: int = 180,
    mask_radius: float = 20,
    full_circle: bool = False,
    tilts_deg: Sequence[float] | None = None,
    geometry: Geometry | None = None,
) -> LineGrid:
    """Sample positions of the common lines (or arcs) of ``(size, size)`` averages.

    Parameters
    ----------
    size : int
        Side S of the averages, pixels.
    n_angles : int
        Number of line angles (≥ 2).
    mask_radius : float
        Samples with |r| ≤ mask_radius pixels are left out (beam stop, saturated centre).
    full_circle : bool
        Angles over [0, 2π) instead of [0, π) (no Friedel symmetry assumed).
    tilts_deg : sequence of float, optional
        Tilts β (degrees) at which Ewald common arcs are sampled; the grid is made symmetric
        (every β also as −β). Omitted: straight lines only.
    geometry : Geometry, optional
        Needed with ``tilts_deg``: gives the scattering angle at each radius (square pixels,
        flat detector); only its pixel size and distance are used.

    Returns
    -------
    LineGrid

    Raises
    ------
    ParameterError
        For n_angles < 2, a mask radius that leaves fewer than 3 samples per line
        (mask_radius ≥ S/2 − 1), tilts without a geometry, or a tilt so large that an arc
        leaves the detector plane (tan(β/2)·tan θ ≥ 1 at the outer radius).
    """
    size = int(size)
    if isinstance(n_angles, bool) or int(n_angles) != n_angles or int(n_angles) < 2:
        raise ParameterError(f"n_angles must be an integer ≥ 2, got {n_angles!r}.")
    n_angles = int(n_angles)
    mask_radius = float(mask_radius)
    if not math.isfinite(mask_radius) or mask_radius < 0:
        raise ParameterError(f"mask_radius must be a finite number of pixels ≥ 0, got {mask_radius!r}.")
    center = size // 2
    radii = np.arange(size, dtype=np.float64) - center
    radii = radii[np.abs(radii) > mask_radius]
    if radii.size < 3:
        raise ParameterError(
            f"mask_radius {mask_radius:g} px leaves {radii.size} samples per line of a {size}×{size} "
            f"average (radii reach only S/2 = {size / 2:g} px); use mask_radius < {size / 2 - 1:g}."
        )
    span = 2.0 * np.pi if full_circle else np.pi
    # i·(π/n), not i·π/n: the same rounding as Dragonfly, so nearest indices agree exactly.
    angles = np.arange(n_angles) * (span / n_angles)
    if tilts_deg is None:
        tilts = np.zeros(1)
        bend = np.zeros((1, radii.size))
    else:
        if geometry is None:
            raise ParameterError(
                "Ewald common arcs (tilts_deg) need the detector geometry for the scattering angle "
                "at each radius: pass geometry=Geometry(...) (or the stack's dd.get_geometry(ds))."
            )
        given = np.abs(np.asarray(tilts_deg, dtype=np.float64).ravel())
        if given.size == 0 or not np.all(np.isfinite(given)):
            raise ParameterError(f"tilts_deg must be a non-empty list of finite angles, got {tilts_deg!r}.")
        tilts = np.deg2rad(np.unique(np.concatenate([-given, given])))
        half_theta = 0.5 * geometry.two_theta_of_radius_px(np.abs(radii))
        t = np.tan(tilts / 2.0)[:, None] * np.tan(half_theta)[None, :]
        if np.any(np.abs(t) >= 1.0):
            raise ParameterError(
                f"a tilt of {np.rad2deg(tilts.max()):.3g}° has no common arc out to radius "
                f"{np.abs(radii).max():g} px (tan(β/2)·tan θ ≥ 1); use smaller tilts."
            )
        bend = np.arcsin(t)
    # Each half of the arc bends by arcsin(tan(β/2) tan θ) towards the same side.
    phi = angles[None, :, None] - np.sign(radii)[None, None, :] * bend[:, None, :]
    rows = center + radii * np.cos(phi)
    cols = center + radii * np.sin(phi)
    return LineGrid(size, radii, angles, tilts, rows, cols)


def interpolation_operator(rows: np.ndarray, cols: np.ndarray, size: int, interp: str) -> sp.csr_matrix:
    """Sparse operator from an ``(S, S)`` image (raveled) to its values at fractional indices.

    Parameters
    ----------
    rows, cols : ndarray
        Fractional array indices (any shape; raveled in C order), clamped to the image.
    size : int
        Side S of the image.
    interp : {"nearest", "bilinear"}
        Nearest pixel (``np.round``) or bilinear weights of the four neighbours.

    Returns
    -------
    scipy.sparse.csr_matrix, shape (rows.size, S²)
        Explicit zeros are removed, so a pixel never touched by a sample never reaches it.
    """
    if interp not in INTERPOLATIONS:
        raise ParameterError(f"interp must be one of {INTERPOLATIONS}, got {interp!r}.")
    r = np.clip(np.asarray(rows, dtype=np.float64).ravel(), 0, size - 1)
    c = np.clip(np.asarray(cols, dtype=np.float64).ravel(), 0, size - 1)
    n = r.size
    if interp == "nearest":
        idx = np.round(r).astype(np.int64) * size + np.round(c).astype(np.int64)
        op = sp.csr_matrix((np.ones(n), (np.arange(n), idx)), shape=(n, size * size))
    else:
        r0 = np.clip(np.floor(r), 0, max(size - 2, 0)).astype(np.int64)
        c0 = np.clip(np.floor(c), 0, max(size - 2, 0)).astype(np.int64)
        fr, fc = r - r0, c - c0
        r1, c1 = np.minimum(r0 + 1, size - 1), np.minimum(c0 + 1, size - 1)
        sample = np.repeat(np.arange(n), 4)
        pix = np.stack([r0 * size + c0, r0 * size + c1, r1 * size + c0, r1 * size + c1], axis=1).ravel()
        w = np.stack([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc], axis=1).ravel()
        op = sp.coo_matrix((w, (sample, pix)), shape=(n, size * size)).tocsr()
    op.eliminate_zeros()
    op.sum_duplicates()
    return op


def apply_operator(op: Any, images: Any) -> Any:
    """``op`` applied to each image of a block: (n, S, S) → (n, n_samples) in one product.

    ``op`` is a SciPy CSR matrix for NumPy blocks; CuPy blocks get it as a
    ``cupyx.scipy.sparse`` matrix (converted here, so nothing imports CuPy up front).
    """
    flat = images.reshape(images.shape[0], -1)
    if library_of(images) == "cupy":
        import cupyx.scipy.sparse as csp

        op = csp.csr_matrix(op)
    return (op @ flat.T).T


@dataclass(frozen=True)
class AverageStack:
    """Averages coerced for the common-line graphs.

    Attributes
    ----------
    data : dask.array.Array, shape (M, S, S)
        The averages, float, chunked along M only.
    mask : ndarray of bool, shape (S, S) or (M, S, S), or None
        True = measured pixel; None when every pixel is measured.
    geometry : Geometry or None
        The geometry stored with a frame stack, if any.
    """

    data: Any
    mask: np.ndarray | None
    geometry: Geometry | None

    @property
    def size(self) -> int:
        """Side S of the averages, pixels."""
        return int(self.data.shape[-1])


def as_average_stack(
    averages: Any, mask: Any = None, block_size: int | None = None, dtype: Any = np.float64
) -> AverageStack:
    """Coerce averages (array, Dask array, frame stack or store path) and their mask.

    Parameters
    ----------
    averages : array_like, dask.array.Array, xarray.Dataset, str or os.PathLike
        ``(M, S, S)`` averages, a frame stack whose ``frames`` are the averages (its ``mask``
        is used unless ``mask`` is given), or the path of such a store.
    mask : array_like of bool, shape (S, S) or (M, S, S), optional
        True = measured pixel.
    block_size : int, optional
        Averages per Dask chunk.
    dtype : {float64, float32}
        Floating type the averages are cast to.

    Raises
    ------
    SchemaError
        Not a square stack, a mask of the wrong shape, or non-numeric data.
    ParameterError
        NaN/inf at measured pixels of in-memory averages, or a bad block size.
    """
    import dask.array as da
    import xarray as xr

    geometry = None
    if isinstance(averages, (str,)) or hasattr(averages, "__fspath__"):
        from diffdask.io import open_frames

        averages = open_frames(averages)
    if isinstance(averages, xr.Dataset):
        stack = checked(averages)
        geometry = stack.geometry
        if mask is None and "mask" in averages.variables:
            mask = stack.mask
        averages = stack.frames
    elif isinstance(averages, xr.DataArray):
        averages = averages.data
    in_memory = not isinstance(averages, da.Array)
    arr = np.asarray(averages) if in_memory else averages
    size = check_averages_shape(arr.shape)
    if arr.dtype.kind not in "biuf":
        raise SchemaError(f"averages must be real numbers, got dtype {arr.dtype}.")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != bool:
            raise SchemaError(f"mask must be bool (True = measured pixel), got {mask.dtype}; use mask.astype(bool).")
        if mask.shape not in ((size, size), tuple(arr.shape)):
            raise SchemaError(
                f"mask has shape {mask.shape}; it must be ({size}, {size}) for all averages or "
                f"{tuple(arr.shape)} for one mask per average."
            )
        if mask.all():
            mask = None
    if in_memory and arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if mask is not None:
            bad &= mask
        if bad.any():
            raise ParameterError(nonfinite_message(int(bad.sum()), np.flatnonzero(bad.any(axis=(1, 2)))))
    if block_size is not None and (int(block_size) != block_size or int(block_size) < 1):
        raise ParameterError(f"block_size must be an integer ≥ 1 (averages per tile side), got {block_size!r}.")
    chunks = {0: int(block_size) if block_size else "auto", 1: -1, 2: -1}
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ParameterError(f"dtype must be float64 or float32, got {dtype}.")
    data = (da.from_array(arr, chunks=chunks) if in_memory else arr.rechunk(chunks)).astype(dtype)
    return AverageStack(data, mask, geometry)


def nonfinite_message(n_pixels: int, which: np.ndarray) -> str:
    """The error message for NaN/inf at measured pixels of the averages ``which``."""
    listed = ", ".join(str(int(i)) for i in which[:5]) + (", ..." if len(which) > 5 else "")
    return (
        f"{n_pixels} measured pixels of the averages are NaN or inf (averages {listed}); a correlation "
        "through them is undefined. Mark them unmeasured with mask=np.isfinite(averages) (one mask per "
        "average) or a shared mask, which switches to the masked Pearson correlation."
    )


def sample_block(
    block: Any,
    *,
    op: sp.csr_matrix,
    pattern: sp.csr_matrix | None,
    mask: np.ndarray | None,
    shape: tuple[int, int, int],
    per_average_mask: bool,
) -> tuple[Any, Any]:
    """Sum-normalised line samples of a block of averages and their weights.

    Parameters
    ----------
    block : array, shape (n, S, S), or (n, 2, S, S) with ``per_average_mask``
        Averages (NumPy or CuPy); with a per-average mask, ``block[:, 1]`` is the mask
        as 0/1.
    op : scipy.sparse.csr_matrix, shape (T·A·L, S²)
        Interpolation operator of the line grid.
    pattern : scipy.sparse.csr_matrix or None
        ``op`` with unit entries (which pixels each sample reads); needed with a mask.
    mask : ndarray of bool, shape (S, S), or None
        Shared mask (True = measured).
    shape : tuple of int
        ``(T, A, L)`` of the grid.
    per_average_mask : bool
        Whether the block carries its own mask.

    Returns
    -------
    values : array, shape (n, T, A, L)
        Samples of each average divided by its sum over measured pixels (an average summing
        to 0 is left unscaled); 0 at unmeasured samples.
    weights : array, shape (n, T, A, L), or None
        1 where every pixel a sample reads is measured, else 0; None without a mask.
    """
    xp = array_namespace(block)
    if per_average_mask:
        images, good = block[:, 0], block[:, 1] > 0.5
    else:
        images = block
        good = None if mask is None else xp.asarray(mask)[None]
    bad = ~xp.isfinite(images)
    if good is not None:
        bad &= good
    if bool(bad.any()):
        n_bad = int(bad.sum())
        raise ParameterError(nonfinite_message(n_bad, np.flatnonzero(to_cpu(bad.any(axis=(1, 2))))))
    if good is not None:
        images = xp.where(good, images, 0)
    total = images.sum(axis=(1, 2))
    total = xp.where(total == 0, 1, total)
    values = apply_operator(op, images / total[:, None, None]).reshape((images.shape[0],) + tuple(shape))
    if good is None:
        return values, None
    misses = apply_operator(pattern, xp.broadcast_to(~good, images.shape).astype(images.dtype))
    weights = (misses == 0).astype(values.dtype).reshape(values.shape)
    return values * weights, weights




def _sampled_lines(block: Any, **kwargs: Any) -> dict[str, Any]:
    values, weights = sample_block(block, **kwargs)
    if weights is not None:
        values = array_namespace(values).where(weights > 0, values, np.nan)
    return {"lines": values}


def line_samples(
    averages: Any,
    n_angles: int = 180,
    mask_radius: float = 20,
    interp: str = "nearest",
    *,
    mask: Any = None,
    full_circle: bool = False,
    tilts_deg: Sequence[float] | None = None,
    geometry: Geometry | None = None,
    block_size: int | None = None,
) -> Any:
    """Intensities along the common lines of each average, lazily.

    Each average is divided by its sum (over measured pixels), then sampled on the grid of
    `line_grid` (Dragonfly's convention, see the module docstring).

    Parameters
    ----------
    averages : array_like, dask.array.Array, xarray.Dataset, str or os.PathLike
        ``(M, S, S)`` averages, a frame stack of them, or its store.
    n_angles : int
        Number of line angles (≥ 2).
    mask_radius : float
        Radius (pixels) within which samples are left out.
    interp : {"nearest", "bilinear"}
        Interpolation of the samples.
    mask : array_like of bool, shape (S, S) or (M, S, S), optional
        True = measured pixel; samples reading an unmeasured pixel are NaN.
    full_circle, tilts_deg, geometry
        See `line_grid`.
    block_size : int, optional
        Averages per Dask chunk.

    Returns
    -------
    dask.array.Array
        Shape ``(M, n_angles, n_r)`` for straight lines, ``(M, n_tilts, n_angles, n_r)`` with
        ``tilts_deg``; float64.
    """
    stack = as_average_stack(averages, mask, block_size)
    grid = line_grid(stack.size, n_angles, mask_radius, full_circle, tilts_deg, geometry or stack.geometry)
    data, kwargs = sampling_inputs(stack, grid, interp)
    out = map_frames(
        _sampled_lines, data, {"lines": (grid.shape, stack.data.dtype)}, kwargs=kwargs, name="line-samples"
    )["lines"]
    return out if tilts_deg is not None else out[:, 0]


def sampling_inputs(stack: AverageStack, grid: LineGrid, interp: str) -> tuple[Any, dict[str, Any]]:
    """The Dask array and kernel keywords of `sample_block` for ``stack`` on ``grid``."""
    import dask.array as da

    op = interpolation_operator(grid.rows, grid.cols, grid.size, interp)
    pattern = None
    if stack.mask is not None:
        pattern = op.copy()
        pattern.data[:] = 1.0
    per_average = stack.mask is not None and stack.mask.ndim == 3
    data = stack.data
    if per_average:
        m = da.from_array(stack.mask, chunks=(data.chunks[0], -1, -1)).astype(data.dtype)
        data = da.stack([data, m], axis=1)
    kwargs = {
        "op": op,
        "pattern": pattern,
        "mask": None if per_average else stack.mask,
        "shape": grid.shape,
        "per_average_mask": per_average,
    }
    return data, kwargs
