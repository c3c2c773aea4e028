"""The common-line cross-correlation matrix as a blocked Dask matrix of GEMM-plus-max tiles.

CC[i, j] = max over line angles (θ, θ′) — and Ewald tilts β — of the Pearson correlation
between line θ of average i and line θ′ of average j. Each line is centred and scaled to
unit norm once (per block of averages), so a whole tile of Pearson coefficients is one
matrix product (n_i·A × L) · (L × n_j·A), reshaped to (n_i, A, n_j, A) and reduced by a max
over both angle axes. With unmeasured pixels the correlation is taken over the samples both
lines measured (masked Pearson), from six products of weighted sums. Only the i ≤ j tiles
are computed; the full (M·A)² correlation matrix is never held anywhere.

Only the maximum is wanted, so by default (unmasked lines) a tile is screened first: the
lines, written in the tile's leading principal radial profiles plus their residual norm,
give in one low-rank float32 GEMM an upper bound of every correlation with a proven error
bound; only the angle pairs that can hold a pair's maximum are then recomputed in full
precision. The result is the dense one (float64, equal to rounding, ~1e-15) for about a
third of the work on oversampled averages; near-ties fall back to the dense product.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diffdask.backend import array_namespace
from diffdask.blocks import map_frames, pair_blocks
from diffdask.commonlines.lines import (
    as_average_stack,
    line_grid,
    sample_block,
    sampling_inputs,
)
from diffdask.errors import ParameterError
from diffdask.geometry import Geometry

#: Bytes of correlation values one tile step may hold at once (rows of the i block are
#: processed in groups that fit); it bounds a task's memory whatever the block size.
STEP_BYTES = 64 * 2**20
#: A line whose spread about its mean is below this fraction of its norm counts as constant.
CONSTANT_LINE = 1e-12
#: Float32 screening: safety factor on the rounding bound; the largest fraction of angle
#: pairs kept as candidates (over a step) before the step is recomputed densely in float64
#: (a gathered dot product costs ~20 GEMM flops each); candidates recomputed per batch.
SCREEN_SAFETY = 2.0
SCREEN_CANDIDATES = 1 / 64
GATHER = 16384
#: Low-rank screening: the rank leaves at most this residual norm in the lines of this
#: quantile of the averages (a unit line's residual e widens the candidate band by ~2e²).
SCREEN_RESIDUAL = 0.01
SCREEN_QUANTILE = 0.9
#: Target bytes of one block of normalised lines (sets the default block size).
BLOCK_BYTES = 32 * 2**20


def normalised_lines(block: Any, *, dtype: Any, **sampling: Any) -> dict[str, Any]:
    """Lines ready for the tile kernel: centred, unit-norm values (and their weights).

    Parameters
    ----------
    block : array
        A block of averages, as for `sample_block`.
    dtype : numpy dtype
        Floating type of the output.
    **sampling
        Keywords of `sample_block`.

    Returns
    -------
    dict
        ``{"lines": array of shape (n, C, T, A, L)}``: C = 1 holds the centred, unit-norm
        lines (a Pearson coefficient is then a dot product); with a mask C = 2 holds values
        centred and scaled over each line's own measured samples (for numerical
        conditioning; Pearson is invariant to both) and the sample weights.
    """
    xp = array_namespace(block)
    values, weights = sample_block(block, **sampling)
    values = values.astype(dtype, copy=False)
    if weights is not None:
        weights = weights.astype(dtype, copy=False)
        count = weights.sum(axis=-1, keepdims=True)
        mean = (weights * values).sum(axis=-1, keepdims=True) / xp.where(count > 0, count, 1)
    else:
        mean = values.mean(axis=-1, keepdims=True)
    scale = xp.sqrt((values * values).sum(axis=-1, keepdims=True))
    values = values - mean if weights is None else (values - mean) * weights
    norm = xp.sqrt((values * values).sum(axis=-1, keepdims=True))
    # A constant line (its spread lost in rounding) correlates with nothing: it becomes the
    # zero vector, CC 0 (or, masked, it never qualifies).
    constant = norm <= CONSTANT_LINE * scale
    values = xp.where(constant, 0, values / xp.where(constant, 1, norm))
    if weights is None:
        return {"lines": values[:, None]}
    return {"lines": xp.stack([values, weights], axis=1)}


def _pearson(a: Any, b: Any, min_overlap: int) -> Any:
    """Correlations of every line of ``a`` with every line of ``b``.

    ``a`` (C, p, L) and ``b`` (C, q, L) hold C = 1 unit lines, or C = 2 (values, weights);
    returns (p, q). With weights, pairs with fewer than ``min_overlap`` jointly measured
    samples, or no variance on them, get −inf (never a maximum).
    """
    xp = array_namespace(a)
    if a.shape[0] == 1:
        return a[0] @ b[0].T
    x, u = a[0], a[1]
    y, v = b[0], b[1]
    ux, vy = u * x, v * y
    # Weighted sums over the samples both lines measured (weights w = u·v), one GEMM each.
    w = u @ v.T
    sx, sy = ux @ v.T, u @ vy.T
    sxx, syy = (ux * x) @ v.T, u @ (vy * y).T
    sxy = ux @ vy.T
    safe_w = xp.where(w > 0, w, 1)
    cov = sxy - sx * sy / safe_w
    vx = sxx - sx * sx / safe_w
    vy_ = syy - sy * sy / safe_w
    # Spread lost in rounding (a line constant on the joint samples) is no spread.
    good = (w >= min_overlap) & (vx > CONSTANT_LINE * sxx) & (vy_ > CONSTANT_LINE * syy) & (vx > 0) & (vy_ > 0)
    r = cov / xp.sqrt(xp.where(good, vx * vy_, 1))
    return xp.where(good, r, -xp.inf)


def _dense_max(r: Any, with_angles: bool) -> tuple[Any, Any, Any]:
    """Max of correlations ``r`` (s, A, n_j, A) over both angle axes, and where (or None)."""
    xp = array_namespace(r)
    over_b = r.max(axis=3)
    best = over_b.max(axis=1)
    if not with_angles:
        return best, None, None
    ia = over_b.argmax(axis=1)
    ib = xp.take_along_axis(r.argmax(axis=3), ia[:, None, :], axis=1)[:, 0]
    return best, ia, ib


def _screen_vectors(a: Any, b: Any, n_a: int) -> tuple[Any, Any, Any, Any, int]:
    """Low-rank float32 surrogates of unit lines ``a`` (p, L) and ``b`` (q, L) for screening.

    Both sets of lines are written in the leading eigenvectors of their joint Gram matrix
    (the tile's own principal radial profiles), x = x̃ + r with ‖r‖ = e. Appending e to the
    coefficients, [x̃, e_x]·[ỹ, e_y] = x̃·ỹ + e_x·e_y ≥ x·y ≥ x̃·ỹ − e_x·e_y, so one GEMM of
    rank k + 1 bounds every correlation from above within 2·e_x·e_y. The rank is the
    smallest that leaves SCREEN_RESIDUAL of most averages' lines; when that needs more than
    half of L, the lines themselves are used (k = L, e = 0).

    Returns
    -------
    a_screen, b_screen : array, float32, shape (p, k + 1), (q, k + 1)
    e_a, e_b : array, shape (p // n_a,), (q // n_a,)
        Largest residual norm over the lines of each average.
    k : int
    """
    xp = array_namespace(a)
    n_l = a.shape[1]
    _, vectors = xp.linalg.eigh(a.T @ a + b.T @ b)
    vectors = vectors[:, ::-1]
    coef_a, coef_b = a @ vectors, b @ vectors
    # Residual energy beyond rank k, summed from the tail: no cancellation in 1 − ‖x̃‖².
    tail_a = xp.sqrt(xp.cumsum((coef_a * coef_a)[:, ::-1], axis=1)[:, ::-1])
    per_average = tail_a.reshape(-1, n_a, n_l).max(axis=1)
    fits = xp.flatnonzero(xp.quantile(per_average, SCREEN_QUANTILE, axis=0) <= SCREEN_RESIDUAL)
    k = int(fits[0]) if fits.size else n_l
    if k > n_l // 2:
        zeros = xp.zeros(a.shape[0] // n_a), xp.zeros(b.shape[0] // n_a)
        return a.astype(xp.float32), b.astype(xp.float32), *zeros, n_l
    tail_b = xp.sqrt(xp.cumsum((coef_b[:, k:] * coef_b[:, k:])[:, ::-1], axis=1)[:, -1])
    e_a, e_b = tail_a[:, k], tail_b
    a_screen = xp.concatenate([coef_a[:, :k], e_a[:, None]], axis=1).astype(xp.float32)
    b_screen = xp.concatenate([coef_b[:, :k], e_b[:, None]], axis=1).astype(xp.float32)
    return a_screen, b_screen, e_a.reshape(-1, n_a).max(axis=1), e_b.reshape(-1, n_a).max(axis=1), k


def _screened_max(
    lhs: Any, rhs: Any, lhs_screen: Any, rhs_screen: Any, e_lhs: Any, e_rhs: Any, k: int, n_a: int, with_angles: bool
) -> tuple[Any, Any, Any]:
    """`_dense_max` of unit lines ``lhs`` · ``rhs`` (float64), from screening surrogates.

    U = surrogate products (`_screen_vectors`) bound the correlations c from above, within
    2·e_x·e_y, and float32 adds at most δ = 2·(k + 3)·2⁻²⁴ (vectors of norm ≤ √2). Hence the
    exact maximum of a pair (i, j) lies among the angle pairs with U ≥ max U − 2·E_i·E_j − 2δ
    (E the largest residual of an average's lines). Only those candidates are recomputed in
    float64: the result is the float64 one at the cost of a rank-(k + 1) float32 GEMM. When
    near-ties make candidates too many (e.g. two spheres), the step is computed densely.
    """
    xp = array_namespace(lhs)
    s, n_j = lhs.shape[0] // n_a, rhs.shape[0] // n_a
    upper = (lhs_screen @ rhs_screen.T).reshape(s, n_a, n_j, n_a)
    margin = 2 * e_lhs[:, None] * e_rhs[None, :] + SCREEN_SAFETY * (k + 3) * float(xp.finfo(xp.float32).eps)
    over_b = upper.max(axis=3)
    floor = over_b.max(axis=1) - margin
    # Candidates found line by line of ``lhs`` first: a comparison over A× fewer values.
    i, p, j = xp.nonzero(over_b >= floor[:, None, :])
    hit, q = xp.nonzero(upper[i, p, j] >= floor[i, j][:, None])
    i, p, j = i[hit], p[hit], j[hit]
    if i.size > SCREEN_CANDIDATES * s * n_j * n_a * n_a:
        return _dense_max((lhs @ rhs.T).reshape(s, n_a, n_j, n_a), with_angles)
    rows, cols = i * n_a + p, j * n_a + q
    exact = xp.concatenate(
        [
            xp.einsum("kl,kl->k", lhs[rows[c : c + GATHER]], rhs[cols[c : c + GATHER]])
            for c in range(0, rows.size, GATHER)
        ]
    )
    pair = i * n_j + j
    # Sorted by pair, best first; ties keep the lowest (θ, θ′) as the dense argmax does.
    order = xp.lexsort(xp.stack([-exact, pair]))
    starts = xp.flatnonzero(xp.diff(pair[order], prepend=-1))[: s * n_j]
    first = order[starts]
    best = exact[first].reshape(s, n_j)
    if not with_angles:
        return best, None, None
    return best, p[first].reshape(s, n_j), q[first].reshape(s, n_j)


def cc_tile(
    a: Any,
    b: Any,
    *,
    tilt_pairs: Sequence[tuple[int, int]],
    angles: np.ndarray,
    tilts: np.ndarray,
    with_angles: bool,
    min_overlap: int,
    screen: bool,
) -> dict[str, Any]:
    """The tile kernel: best common-line correlation of every average in ``a`` with ``b``.

    Parameters
    ----------
    a, b : array, shape (n_i, C, T, A, L) and (n_j, C, T, A, L)
        Outputs of `normalised_lines`.
    tilt_pairs : sequence of (int, int)
        Tilt indices compared: line grid of ``a`` at tilt β with ``b`` at −β.
    angles : ndarray, shape (A,)
        Line angles, radians (for the argmax output).
    tilts : ndarray, shape (T,)
        Tilts β, radians.
    with_angles : bool
        Also return the maximising angles.
    min_overlap : int
        Masked Pearson: fewest jointly measured samples of a counted pair of lines.
    screen : bool
        Unmasked lines: find the maximum from low-rank float32 upper bounds and recompute
        its candidates in the lines' precision (`_screened_max`); the result is that of the
        dense product.

    Returns
    -------
    dict
        ``"cc"`` (n_i, n_j): the maximum (NaN where no pair of lines qualified); with
        ``with_angles`` also ``"angles"`` (n_i, n_j, 3): θ of the line in ``a``, θ′ in
        ``b`` and the tilt β of ``a``'s arc, radians.
    """
    xp = array_namespace(a)
    n_i, n_j = a.shape[0], b.shape[0]
    n_c, n_a, n_l = a.shape[1], a.shape[3], a.shape[4]
    screen = screen and n_c == 1
    best = xp.full((n_i, n_j), -xp.inf, dtype=a.dtype)
    where = xp.zeros((n_i, n_j, 3), dtype=xp.float64) if with_angles else None
    # Rows of ``a`` are taken in groups small enough that a step's correlations (and the
    # weighted sums of the masked case) fit in STEP_BYTES.
    per_row = n_a * n_j * n_a * a.dtype.itemsize * (7 if n_c == 2 else 1)
    step = max(1, STEP_BYTES // per_row)
    angles_x = xp.asarray(angles)
    for ta, tb in tilt_pairs:
        rhs = xp.ascontiguousarray(b[:, :, tb].transpose(1, 0, 2, 3)).reshape(n_c, n_j * n_a, n_l)
        if screen:
            lhs_all = xp.ascontiguousarray(a[:, 0, ta]).reshape(n_i * n_a, n_l)
            a_screen, b_screen, e_a, e_b, rank = _screen_vectors(lhs_all, rhs[0], n_a)
        for start in range(0, n_i, step):
            stop = min(start + step, n_i)
            lhs = xp.ascontiguousarray(a[start:stop, :, ta].transpose(1, 0, 2, 3)).reshape(
                n_c, (stop - start) * n_a, n_l
            )
            if screen:
                m, ia, ib = _screened_max(
                    lhs[0], rhs[0], a_screen[start * n_a : stop * n_a], b_screen, e_a[start:stop], e_b, rank, n_a,
                    with_angles,
                )
            else:
                m, ia, ib = _dense_max(_pearson(lhs, rhs, min_overlap).reshape(stop - start, n_a, n_j, n_a), with_angles)
            better = m > best[start:stop]
            best[start:stop] = xp.where(better, m, best[start:stop])
            if with_angles:
                found = xp.stack([angles_x[ia], angles_x[ib], xp.full(ia.shape, float(tilts[ta]))], axis=-1)
                where[start:stop] = xp.where(better[..., None], found, where[start:stop])
    out = {"cc": xp.where(xp.isneginf(best), xp.nan, best)}
    if with_angles:
        out["angles"] = where
    return out


def _mirror_angles(block: Any) -> Any:
    """The (j, i) tile of angles from the (i, j) one: swap θ and θ′, negate β."""
    swapped = block.swapaxes(0, 1)
    xp = array_namespace(block)
    return xp.stack([swapped[..., 1], swapped[..., 0], -swapped[..., 2]], axis=-1)


def _unit_diagonal(block: Any, block_info: dict | None = None) -> Any:
    """Set CC[i, i] = 1 (an average with itself) in the tiles the diagonal crosses."""
    (r0, r1), (c0, c1) = block_info[0]["array-location"]
    lo, hi = max(r0, c0), min(r1, c1)
    if lo >= hi:
        return block
    block = block.copy()
    idx = np.arange(lo, hi)
    block[idx - r0, idx - c0] = 1
    return block


def default_block_size(n_averages: int, bytes_per_average: int) -> int:
    """Averages per block so that a block's normalised lines take about `BLOCK_BYTES`."""
    return int(max(1, min(n_averages, BLOCK_BYTES // max(1, bytes_per_average))))


def cc_matrix(
    averages: Any,
    n_angles: int = 180,
    mask_radius: float = 20,
    interp: str = "nearest",
    *,
    mask: Any = None,
    full_circle: bool = False,
    tilts_deg: Sequence[float] | None = None,
    geometry: Geometry | None = None,
    min_overlap: int = 10,
    block_size: int | None = None,
    dtype: Any = np.float64,
    screen: bool = True,
    return_angles: bool = False,
) -> Any:
    """The common-line cross-correlation matrix of a stack of averages, lazily.

    Parameters
    ----------
    averages : array_like, dask.array.Array, xarray.Dataset, str or os.PathLike
        ``(M, S, S)`` averages centred at ``(S // 2, S // 2)`` (NumPy, CuPy-backed Dask or
        in memory), a frame stack whose ``frames`` are the averages (its ``mask`` and
        geometry are used), or the path of such a store.
    n_angles : int
        Number of line angles θ_i = i·π/n_angles (≥ 2).
    mask_radius : float
        Samples within this radius (pixels) of the centre are left out.
    interp : {"nearest", "bilinear"}
        Interpolation of the line samples.
    mask : array_like of bool, shape (S, S) or (M, S, S), optional
        True = measured pixel. With unmeasured pixels each pair of lines is correlated over
        the samples both measured (masked Pearson); samples reading any unmeasured pixel
        count as unmeasured.
    full_circle : bool
        Line angles over [0, 2π) (a line and its reverse), for data without Friedel symmetry.
    tilts_deg : sequence of float, optional
        Search Ewald common arcs over these tilts β (degrees, made symmetric about 0) as well
        as straight lines; the other average's arc is taken at −β.
    geometry : Geometry, optional
        Detector geometry for the arcs (defaults to the frame stack's).
    min_overlap : int
        Masked Pearson: pairs of lines with fewer jointly measured samples are skipped.
    block_size : int, optional
        Averages per tile side; by default about 32 MiB of lines per block. The result does
        not depend on it.
    dtype : {float64, float32}
        Output type. float64 is exact (to rounding); float32 is faster where float32 GEMMs
        are (CC to ~1e-5).
    screen : bool
        Without a mask: bound every correlation from above with a low-rank float32 product
        (the lines in their own principal radial profiles, plus the residual norms) and
        recompute in full precision only the angle pairs that can hold the maximum — the
        dense result (to rounding) for a fraction of the work. False computes every
        correlation.
    return_angles : bool
        Also return the maximising angles.

    Returns
    -------
    cc : dask.array.Array, shape (M, M)
        Symmetric, CC[i, i] = 1. NaN where no pair of lines could be correlated (masked case).
    angles : dask.array.Array, shape (M, M, 3), float64
        Only with ``return_angles``: (θ of average i, θ′ of average j, tilt β of i's arc) in
        radians at the maximum; angles[j, i] = (θ′, θ, −β).

    Raises
    ------
    SchemaError
        Averages not a square (M, S, S) stack, or a mask of the wrong shape.
    ParameterError
        n_angles < 2, mask_radius ≥ S/2 − 1, unknown ``interp``, bad tilts, or NaN/inf at
        measured pixels (raised at compute time for lazy input).

    Notes
    -----
    The lines of each block are sampled once (a map over blocks of averages, one sparse
    product per block), then tiles (i ≤ j) are formed by `diffdask.blocks.pair_blocks`.
    """
    if int(min_overlap) < 2:
        raise ParameterError(f"min_overlap must be ≥ 2 samples (a correlation needs two), got {min_overlap!r}.")
    stack = as_average_stack(averages, mask, None, dtype)
    grid = line_grid(stack.size, n_angles, mask_radius, full_circle, tilts_deg, geometry or stack.geometry)
    n_c = 1 if stack.mask is None else 2
    n_t, n_a, n_l = grid.shape
    itemsize = np.dtype(dtype).itemsize
    size = block_size or default_block_size(stack.data.shape[0], n_c * n_t * n_a * n_l * itemsize)
    stack = as_average_stack(stack.data, stack.mask, size, dtype)
    data, sampling = sampling_inputs(stack, grid, interp)
    lines = map_frames(
        normalised_lines,
        data,
        {"lines": ((n_c, n_t, n_a, n_l), dtype)},
        kwargs={**sampling, "dtype": np.dtype(dtype)},
        name="common-lines",
    )["lines"]
    outputs = {"cc": ((), dtype)}
    if return_angles:
        outputs["angles"] = ((3,), np.float64)
    tiles = pair_blocks(
        cc_tile,
        lines,
        outputs,
        kwargs={
            "tilt_pairs": [(t, n_t - 1 - t) for t in range(n_t)],
            "angles": grid.angles_rad,
            "tilts": grid.tilts_rad,
            "with_angles": bool(return_angles),
            "min_overlap": int(min_overlap),
            "screen": bool(screen),
        },
        mirror={"angles": _mirror_angles} if return_angles else None,
        name="cc-matrix",
    )
    cc = tiles["cc"].map_blocks(_unit_diagonal, dtype=tiles["cc"].dtype)
    return (cc, tiles["angles"]) if return_angles else cc
