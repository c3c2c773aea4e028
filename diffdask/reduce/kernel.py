"""The compiled per-frame reduction kernel and the binning plan it reads.

Every per-frame reduction — total intensity, centre of mass, radial and azimuthal ("cake")
bin sums and counts, Poisson variance sums, lit pixels, non-finite pixels — is computed by
`reduce_block` in one pass over each frame:

- Frames go through in groups of `LANES` (8), one detector row at a time. Each pixel is
  read once: converted to float64, NaN/inf tested (``|v| < ∞`` is false exactly for NaN
  and ±inf) and zeroed, multiplied by the mask, counted as lit or non-finite, and added to its
  column's ``Σ_i v`` and ``Σ_i (i − ry)·v`` (per-column accumulators: the loop over a row
  vectorises without reassociating any sum); the cleaned value also goes into a small
  pixel-major buffer of the group's row (a transpose, in L1).
- From that buffer the bin scatter is a vector add over the group's frames: per bin ``k``,
  ``Σ v`` in two copies for even and odd columns (two independent add chains, through the
  precomputed int32 bin index). At the end of the group the column sums are added in column order:
  ``total = Σ_j colsum_j``, ``Σy·I = Σ_j colmom_j``, ``Σx·I = Σ_j (j − rx)·colsum_j``, and each
  bin is ``even + odd``.
- Without bins (`center_of_mass`, `lit_pixels`) the same per-column sums run frame by frame
  with no transpose; the sums and their order are the same, so the bits are too.

Every sum is float64 and its order is fixed by the geometry alone, so a frame's results are
the same bits whatever the chunking, the thread or worker count, the CPU model or the BLAS
library (no BLAS is used, and the kernel is compiled without ``fastmath``, which would let
the compiler reassociate sums differently on different CPUs); each frame is its own lane,
so its sums do not depend on the frames beside it. NaN/inf pixels are skipped inline; only
the per-bin pixel counts of a frame that holds some take a second, scalar look at it.

Frames are read in their own dtype (uint8 … uint64, int8 … int64, float32, float64: numba
compiles one specialisation per dtype and converts each pixel to float64 as it reads it);
no chunk is ever copied to another type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np

from diffdask.checks import check_int, check_positive
from diffdask.errors import GeometryError, ParameterError, SchemaError
from diffdask.geometry import pixel_radius_map

#: Frame dtypes the kernel reads directly.
KERNEL_DTYPES = tuple(
    np.dtype(t)
    for t in ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64")
)


@dataclass(frozen=True, eq=False)
class BinPlan:
    """Precomputed geometry of the per-frame reductions: mask, bin index, gather order.

    Build it with `build_plan`; graph builders pass it as a kernel keyword argument, so a
    Dask graph holds it once.

    Attributes
    ----------
    shape : tuple of int
        Detector shape ``(ny, nx)``.
    mask : ndarray of bool, shape (ny, nx)
        Good pixels.
    bin_index : ndarray of int32, shape (ny, nx)
        Bin of each pixel; −1 for masked pixels and pixels outside every bin.
    n_bins : int
        Number of bins (0: no binning).
    bin_counts : ndarray of int64, shape (n_bins,)
        Good pixels in each bin.
    """

    shape: tuple[int, int]
    mask: np.ndarray
    bin_index: np.ndarray
    n_bins: int
    bin_counts: np.ndarray
    good: np.ndarray = field(repr=False)  # float64 0/1 mask, multiplied into each pixel
    scatter_index: np.ndarray = field(repr=False)  # int32 (ny, nx): bin, or n_bins for no bin

    @property
    def reference_yx(self) -> tuple[float, float]:
        """Origin of the first moments, the array centre (pixels): keeps Σy·I well scaled."""
        return ((self.shape[0] - 1) / 2.0, (self.shape[1] - 1) / 2.0)

    def __dask_tokenize__(self) -> tuple:
        from dask.base import tokenize

        return ("BinPlan", self.shape, tokenize(self.mask), tokenize(self.bin_index), self.n_bins)


def build_plan(mask: Any, bin_index: Any = None, n_bins: int = 0) -> BinPlan:
    """Build the plan of the kernel from a mask and an optional per-pixel bin index.

    Parameters
    ----------
    mask : array of bool, shape (ny, nx)
        Good pixels (True).
    bin_index : array of int, shape (ny, nx), optional
        Bin of each pixel in ``[0, n_bins)``, or −1 (or any negative value, or ≥ ``n_bins``)
        for a pixel in no bin. Masked pixels are left out whatever their index.
    n_bins : int
        Number of bins; 0 without ``bin_index``.

    Raises
    ------
    SchemaError
        If the mask is not 2-D or has no good pixel.
    GeometryError
        If the bin index does not have the mask's shape.
    """
    mask = check_mask(mask)
    ny, nx = mask.shape
    if n_bins > MAX_BINS:
        raise ParameterError(f"{n_bins} bins are more than the kernel holds ({MAX_BINS}); use fewer.")
    if bin_index is None:
        index = np.full(mask.shape, -1, dtype=np.int64)
        n_bins = 0
    else:
        index = np.asarray(bin_index)
        if index.shape != mask.shape:
            raise GeometryError(f"the bin index has shape {index.shape}; it must match the detector {mask.shape}.")
        index = index.astype(np.int64)
    index = np.where(mask & (index >= 0) & (index < n_bins), index, -1).astype(np.int32)
    flat = index.ravel()
    return BinPlan(
        shape=(ny, nx),
        mask=mask,
        bin_index=index,
        n_bins=int(n_bins),
        bin_counts=np.bincount(flat[flat >= 0], minlength=int(n_bins)).astype(np.int64),
        good=mask.astype(np.float64),
        scatter_index=np.where(index >= 0, index, int(n_bins)).astype(np.int32),
    )


def check_mask(mask: Any) -> np.ndarray:
    """The mask as a 2-D bool array with at least one good pixel, or a `SchemaError`."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise SchemaError(f"the mask must be 2-D (y, x), got shape {mask.shape}.")
    if not mask.any():
        raise SchemaError(
            "every pixel of the mask is bad (False), so nothing can be reduced; "
            "the mask is True for good pixels — did you pass its inverse?"
        )
    return mask


def uniform_bin_index(value: np.ndarray, lo: float, width: float, n_bins: int) -> np.ndarray:
    """Bin k of each value with ``lo + k·w ≤ value < lo + (k + 1)·w`` as computed in float64.

    ``floor((value − lo)/w)`` can land one bin off where the value is a multiple of ``w`` in
    decimal but not in binary; the result is corrected so the inequality holds exactly.
    Values outside ``[lo, lo + n_bins·w)`` (and NaN) get −1.
    """
    v = np.asarray(value, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        k = np.floor((v - lo) / width)
        k = np.where(lo + k * width > v, k - 1, k)
        k = np.where(lo + (k + 1) * width <= v, k + 1, k)
        ok = np.isfinite(k) & (k >= 0) & (k < n_bins)
    return np.where(ok, k, -1).astype(np.int64)


def radial_bins(
    shape: tuple[int, int], center_yx: tuple[float, float], bin_width_px: Any, n_bins: Any, mask: np.ndarray
) -> tuple[np.ndarray, int]:
    """Annulus index of each pixel (bin k: k·w ≤ r < (k + 1)·w) and the number of bins.

    Raises
    ------
    ParameterError
        For a bin width that is not a positive number or ``n_bins`` that is not a positive integer.
    GeometryError
        For a centre off the detector.
    """
    width = check_positive("bin_width_px", bin_width_px, "pixels")
    r = pixel_radius_map(shape, center_yx)  # validates the centre
    k = uniform_bin_index(r, 0.0, width, np.iinfo(np.int32).max)
    if n_bins is None:
        n_bins = int(k[mask].max()) + 1
    else:
        n_bins = check_int("n_bins", n_bins, 1, MAX_BINS, "bins")
    return np.where(k < n_bins, k, -1), n_bins


#: Most bins a plan may have: the kernel keeps 2 × 8 float64 accumulators per bin (and as many
#: for variances), 0.5 GiB at this size — already far more bins than a detector has pixels.
MAX_BINS = 2**22


# ---------------------------------------------------------------------------- compiled passes
# No fastmath: the sums must be evaluated exactly in the order written, on every CPU.
_jit = numba.njit(cache=True, nogil=True, boundscheck=False)


#: Frames reduced side by side: each accumulator holds one value per frame of a group, so
#: the scatter into bins is a vector add over frames (8 float64 = one AVX-512 register). A
#: frame's sums do not depend on which frames share its group.
LANES = 8


@_jit
def _reduce_frames(
    block, good, thr, bins, nb, do_com, do_lit, do_bins, do_var, total, sy, sx, lit, bad, acc_out, var_out,
):  # pragma: no cover - compiled
    n, ny, nx = block.shape
    ry = (ny - 1) / 2.0
    rx = (nx - 1) / 2.0
    L = LANES
    vals = np.zeros((nx, L))  # the group's current row, cleaned, pixel-major (a transpose)
    pois = np.zeros((nx, L))  # max(1, v) of its good finite pixels (Poisson variance)
    colsum = np.empty((L, nx))
    colmom = np.empty((L, nx))
    acc = np.empty((2, nb + 1, L))  # by column parity (two independent add chains); bin nb: none
    var = np.empty((2, nb + 1, L))
    for g0 in range(0, n, L):
        m = min(L, n - g0)
        if m < L:
            vals[:] = 0.0
            pois[:] = 0.0
        colsum[:] = 0.0
        colmom[:] = 0.0
        acc[:] = 0.0
        var[:] = 0.0
        for i in range(ny):
            w = i - ry
            gi = good[i]
            ti = thr[i]
            for f in range(m):
                row = block[g0 + f, i]
                cs = colsum[f]
                cm = colmom[f]
                nl = 0
                nbad = 0
                if do_bins:
                    for j in range(nx):
                        v = np.float64(row[j])
                        fin = abs(v) < np.inf
                        v = (v if fin else 0.0) * gi[j]
                        cs[j] += v
                        cm[j] += w * v
                        nl += fin & (v > ti[j])
                        nbad += (not fin) & (gi[j] > 0.0)
                        vals[j, f] = v
                else:
                    for j in range(nx):
                        v = np.float64(row[j])
                        fin = abs(v) < np.inf
                        v = (v if fin else 0.0) * gi[j]
                        cs[j] += v
                        cm[j] += w * v
                        nl += fin & (v > ti[j])
                        nbad += (not fin) & (gi[j] > 0.0)
                if i == 0:
                    lit[g0 + f] = nl
                    bad[g0 + f] = nbad
                else:
                    lit[g0 + f] += nl
                    bad[g0 + f] += nbad
                if do_var:
                    for j in range(nx):
                        x = np.float64(row[j])
                        pois[j, f] = max(1.0, x) if abs(x) < np.inf and gi[j] > 0.0 else 0.0
            if do_bins:
                bi = bins[i]
                for j in range(nx):
                    k = bi[j]
                    par = j & 1
                    for f in range(L):
                        acc[par, k, f] += vals[j, f]
                if do_var:
                    for j in range(nx):
                        k = bi[j]
                        par = j & 1
                        for f in range(L):
                            var[par, k, f] += pois[j, f]
        for f in range(m):
            if do_com:
                t = 0.0
                my = 0.0
                mx = 0.0
                for j in range(nx):
                    t += colsum[f, j]
                    my += colmom[f, j]
                    mx += (j - rx) * colsum[f, j]
                total[g0 + f] = t
                sy[g0 + f] = my
                sx[g0 + f] = mx
            if do_bins:
                for k in range(nb):
                    acc_out[g0 + f, k] = acc[0, k, f] + acc[1, k, f]
                if do_var:
                    for k in range(nb):
                        var_out[g0 + f, k] = var[0, k, f] + var[1, k, f]


@_jit
def _pixel_frames(block, good, thr, total, sy, sx, lit, bad):  # pragma: no cover - compiled
    # Without bins there is nothing to scatter: frame by frame, row by row, the same per-column
    # sums in the same order as `_reduce_frames` (so both give the same bits), without the
    # transpose that the vector scatter needs.
    n, ny, nx = block.shape
    ry = (ny - 1) / 2.0
    rx = (nx - 1) / 2.0
    colsum = np.empty(nx)
    colmom = np.empty(nx)
    for f in range(n):
        colsum[:] = 0.0
        colmom[:] = 0.0
        nl = 0
        nbad = 0
        for i in range(ny):
            w = i - ry
            for j in range(nx):
                v = np.float64(block[f, i, j])
                g = good[i, j]
                fin = abs(v) < np.inf
                v = (v if fin else 0.0) * g
                colsum[j] += v
                colmom[j] += w * v
                nl += fin & (v > thr[i, j])
                nbad += (not fin) & (g > 0.0)
        t = 0.0
        my = 0.0
        mx = 0.0
        for j in range(nx):
            t += colsum[j]
            my += colmom[j]
            mx += (j - rx) * colsum[j]
        total[f] = t
        sy[f] = my
        sx[f] = mx
        lit[f] = nl
        bad[f] = nbad


@_jit
def _bin_counts(block, bins, nb, bad, base, cnt):  # pragma: no cover - compiled
    # Good pixels per bin and frame: the plan's counts, less the frame's NaN/inf pixels
    # (a scalar pass only over the frames that hold some).
    n, ny, nx = block.shape
    for f in range(n):
        cnt[f, :] = base
        if bad[f] == 0:
            continue
        for i in range(ny):
            for j in range(nx):
                k = bins[i, j]
                v = np.float64(block[f, i, j])
                if k < nb and not abs(v) < np.inf:
                    cnt[f, k] -= 1


def _threshold_map(plan: BinPlan, threshold: float) -> np.ndarray:
    # Compared in float64 with each pixel converted exactly: lit means value > threshold.
    return np.where(plan.mask, float(threshold), np.inf)


def reduce_block(
    block: Any,
    plan: BinPlan,
    threshold: float | None = None,
    com: bool = True,
    bins: bool = True,
    variance: bool = False,
) -> dict[str, Any]:
    """Per-frame sums of a block of frames, in one read of each pixel.

    Parameters
    ----------
    block : array, shape (n, ny, nx)
        Frames, NumPy (this kernel) or CuPy (`diffdask.reduce.gpu`, same results to 1e-12
        relative); NaN/inf pixels count as masked in their frame.
    plan : BinPlan
        From `build_plan` for this detector.
    threshold : float, optional
        Count lit pixels (good, finite, value > threshold); skipped when None.
    com : bool
        Return the totals and first moments.
    bins : bool
        Return the bin sums and counts (the plan must have bins).
    variance : bool
        Also return the Poisson variance sums, Σ max(1, v) per bin (pyFAI's
        ``error_model="poisson"``).

    Returns
    -------
    dict of str to array
        With ``com``: ``total``, ``sum_y``, ``sum_x`` (n,), float64: Σv, Σ(i − ry)·v,
        Σ(j − rx)·v over the good finite pixels (moments about the array centre
        `BinPlan.reference_yx`), and ``n_nonfinite`` (n,), int32: good pixels that were
        NaN/inf. With a threshold: ``lit`` (n,), int32. With ``bins``: ``bin_sum`` (n, n_bins),
        float64; ``bin_count`` (n, n_bins), int32 (good finite pixels); with ``variance``,
        ``bin_var`` (n, n_bins), float64.

    Raises
    ------
    SchemaError
        For a block that is not (n, ny, nx) frames of the plan's shape, or not real numbers.
    """
    from diffdask.backend import array_namespace

    xp = array_namespace(block)
    check_block(block, plan)
    if xp is not np:
        from diffdask.reduce.gpu import reduce_block_gpu

        return reduce_block_gpu(block, plan, threshold, com, bins, variance)
    if bins and plan.n_bins == 0:
        raise ParameterError("this plan has no bins; build it with a bin index.")
    if block.dtype.byteorder not in "=|" or not block.flags.c_contiguous:
        block = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("="))
    n = block.shape[0]
    do_lit = threshold is not None
    nb = plan.n_bins if bins else 0
    out = {
        "total": np.empty(n),
        "sum_y": np.empty(n),
        "sum_x": np.empty(n),
        "n_nonfinite": np.zeros(n, dtype=np.int32),
        "lit": np.zeros(n, dtype=np.int32),
        "bin_sum": np.empty((n, nb)),
        "bin_count": np.empty((n, nb), dtype=np.int32),
        "bin_var": np.empty((n, nb if variance else 0)),
    }
    thr = _threshold_map(plan, threshold) if do_lit else plan.good
    idx = plan.scatter_index
    if not bins:
        _pixel_frames(block, plan.good, thr, out["total"], out["sum_y"], out["sum_x"], out["lit"], out["n_nonfinite"])
    else:
        _reduce_frames(
            block, plan.good, thr, idx, nb, com, do_lit, bins, variance,
            out["total"], out["sum_y"], out["sum_x"], out["lit"], out["n_nonfinite"], out["bin_sum"], out["bin_var"],
        )  # fmt: skip
        _bin_counts(block, idx, nb, out["n_nonfinite"], plan.bin_counts.astype(np.int32), out["bin_count"])
    keep = []
    if com:
        keep += ["total", "sum_y", "sum_x", "n_nonfinite"]
    if do_lit:
        keep.append("lit")
    if bins:
        keep += ["bin_sum", "bin_count"] + (["bin_var"] if variance else [])
    return {k: out[k] for k in keep}


def check_block(block: Any, plan: BinPlan) -> None:
    """Raise `SchemaError` unless ``block`` is (n, ny, nx) real-valued frames of the plan's shape."""
    shape = getattr(block, "shape", None)
    if getattr(block, "ndim", None) != 3 or tuple(shape[1:]) != plan.shape:
        raise SchemaError(
            f"a block must be (n, ny, nx) frames of shape {plan.shape}, got shape {shape}; "
            "stack single frames with frames[None] and check the detector shape."
        )
    if np.dtype(block.dtype) not in KERNEL_DTYPES:
        raise SchemaError(
            f"frames of dtype {block.dtype} cannot be reduced; the kernel reads "
            f"{', '.join(str(d) for d in KERNEL_DTYPES)} (convert e.g. with frames.astype('float32'))."
        )
