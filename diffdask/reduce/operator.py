"""One precomputed linear operator for every per-frame reduction, and the fused kernel.

Centre of mass, total intensity and radial bin sums are all linear in the pixel values, so
they are the columns of one product ``X @ W`` of the flattened block ``X`` (frames × pixels)
with a weight matrix ``W`` built once from the mask and the binning:

==========  ===============================================================================
column      weight of pixel (i, j)
==========  ===============================================================================
``ones``    1 for every pixel, masked or not: a NaN/inf anywhere in a frame makes this
            column non-finite, which flags the frame for the slow, cleaned path
``good``    mask(i, j): the total intensity of good pixels
``dy``      mask(i, j) · (i − ry): first moment along rows (about the array centre ry, so
            float32 sums keep their precision)
``dx``      mask(i, j) · (j − rx)
bin k       mask(i, j) · [k·w ≤ r(i, j) < (k + 1)·w]
==========  ===============================================================================

The bin columns are sparse: a band of a few detector rows only meets a narrow range of
radii. ``W`` is therefore stored as row bands, each with the four fixed columns and only the
bins it meets; each band is one dense GEMM on a contiguous slice of ``X`` (no copy) and the
product costs about half the flops of the full dense ``W`` (measured faster than both the
dense product and a SciPy CSR product, which needs a transposed copy of the block).

Frames are assumed finite: the fast path never inspects pixels. Frames whose ``ones``
column comes out non-finite are redone with their NaN/inf pixels masked (per-frame good-pixel
counts from the same operator), so non-finite pixels never reach a result and cost nothing
when absent. Lit pixels are counted in the same call on the same converted block.

Threads: kernels run one per Dask thread, and Dask runs one thread per core, so BLAS is held
to one thread while kernels of this module run in the process (a reference-counted
`threadpoolctl` limit, restored two seconds after the last kernel returns). Dask's
distributed workers already start with ``OPENBLAS_NUM_THREADS=1``; this covers the threaded
scheduler and user-made thread pools.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from diffdask.backend import array_namespace
from diffdask.errors import GeometryError, ParameterError, SchemaError
from diffdask.geometry import Geometry, pixel_radius_map

#: Number of fixed leading columns of the operator: ones, good, dy, dx.
N_FIXED = 4
#: Frames are placed at GEMM row positions ≡ stack index (mod this): a multiple of the
#: register tile heights of common BLAS kernels (4, 6, 8, 12, 16, 24), see `PixelOperator.apply`.
ROW_ALIGN = 48
#: Pixels per row band of the operator (whole detector rows; measured on 128×128 frames,
#: bands of 256–2048 pixels are within 10 % of each other and about 1.4× the dense product).
BAND_PIXELS = 512


class _SingleThreadBlas:
    """Hold BLAS to one thread while kernels run (thread-safe, re-entrant).

    A plain ``threadpool_limits`` context per call would let one Dask thread restore the
    original limit while another is still inside a GEMM, so kernels in flight are counted.
    Changing OpenBLAS's thread count is itself slow (measured: a 20 000-frame centre of mass
    went from 0.5 s to 6 s when the limit was set and restored around every chunk), so the
    original limit comes back only after `RESTORE_AFTER_S` seconds without any kernel.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._generation = 0
        self._controller: ThreadpoolController | None = None
        self._limiter: Any = None

    def __enter__(self) -> None:
        with self._lock:
            if self._limiter is None:
                if self._controller is None:
                    self._controller = ThreadpoolController()
                self._limiter = self._controller.limit(limits=1, user_api="blas")
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._generation += 1
                timer = threading.Timer(RESTORE_AFTER_S, self._restore, args=(self._generation,))
                timer.daemon = True
                timer.start()

    def _restore(self, generation: int) -> None:
        with self._lock:
            if self._depth == 0 and self._generation == generation and self._limiter is not None:
                self._limiter.restore_original_limits()
                self._limiter = None


#: Seconds without a running kernel after which BLAS gets its original thread count back.
RESTORE_AFTER_S = 2.0
#: Enter around NumPy BLAS work inside a Dask task (reference-counted, see `_SingleThreadBlas`).
BLAS_ONE_THREAD = _SingleThreadBlas()
_NO_LIMIT = contextlib.nullcontext()


@dataclass(frozen=True)
class _Band:
    start: int  # first flat pixel index of the band
    stop: int
    lo: int  # first radial bin the band meets
    hi: int  # one past the last bin
    weights: np.ndarray  # (stop - start, N_FIXED + hi - lo), float32


@dataclass(frozen=True, eq=False)
class PixelOperator:
    """The weight matrix of the fused reductions, stored as row bands.

    Build it with `build_operator`; kernels take it as a keyword argument, so a Dask graph
    holds it once.

    Attributes
    ----------
    shape : tuple of int
        Detector shape ``(ny, nx)``.
    mask : ndarray of bool, shape (ny, nx)
        Good pixels.
    n_bins : int
        Number of radial bins (0: centre of mass and totals only).
    bin_width_px : float
        Radial bin width, pixels.
    center_yx : tuple of float
        Centre of the radial bins, pixel-index units.
    bin_counts : ndarray of int64, shape (n_bins,)
        Good pixels in each bin.
    """

    shape: tuple[int, int]
    mask: np.ndarray
    n_bins: int
    bin_width_px: float
    center_yx: tuple[float, float]
    bin_counts: np.ndarray
    bands: tuple[_Band, ...]
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def reference_yx(self) -> tuple[float, float]:
        """Origin of the ``dy``/``dx`` moment columns: the array centre, pixels."""
        return ((self.shape[0] - 1) / 2.0, (self.shape[1] - 1) / 2.0)

    @property
    def radius_px(self) -> np.ndarray:
        """Bin centres, pixels."""
        return (np.arange(self.n_bins) + 0.5) * self.bin_width_px

    def bin_map(self) -> np.ndarray:
        """Radial bin of each pixel, shape (ny, nx), int64; −1 for masked or unbinned pixels."""
        out = np.full(self.shape[0] * self.shape[1], -1, dtype=np.int64)
        for band in self.bands:
            ind = band.weights[:, N_FIXED:]
            hit = ind.any(axis=1)
            out[band.start : band.stop][hit] = band.lo + ind[hit].argmax(axis=1)
        return out.reshape(self.shape)

    def __dask_tokenize__(self) -> tuple:
        from dask.base import tokenize

        return ("PixelOperator", self.shape, tokenize(self.mask), self.n_bins, self.bin_width_px, self.center_yx)

    # The device/dtype copies of the weights are rebuilt where the operator lands.
    def __getstate__(self) -> dict[str, Any]:
        names = ("shape", "mask", "n_bins", "bin_width_px", "center_yx", "bin_counts", "bands")
        return {k: getattr(self, k) for k in names}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "_cache", {})

    def _weights(self, xp: Any, dtype: Any) -> list[Any]:
        key = (xp.__name__, np.dtype(dtype).str)
        w = self._cache.get(key)
        if w is None:
            w = [xp.asarray(b.weights, dtype=dtype) for b in self.bands]
            self._cache[key] = w
        return w

    def _flat(self, xp: Any, name: str, dtype: Any, build: Any) -> Any:
        key = (xp.__name__, name, np.dtype(dtype).str)
        a = self._cache.get(key)
        if a is None:
            a = xp.asarray(build(), dtype=dtype)
            self._cache[key] = a
        return a

    def apply(self, x: Any, frame_offset: int = 0) -> Any:
        """``x @ W`` for a flattened block ``x`` (n, ny·nx); returns (n, N_FIXED + n_bins).

        ``frame_offset`` is the stack index of the block's first frame. Optimised GEMM
        kernels round a row differently depending on its position in the product (modulo
        their register tile), so every frame is computed at row position ≡ its stack index
        (mod `ROW_ALIGN`): the aligned body of the block is multiplied in place and the
        ragged head and tail through small zero-padded buffers. A frame's result is then the
        same bits whatever the chunking.
        """
        xp = array_namespace(x)
        n = x.shape[0]
        out = xp.zeros((n, N_FIXED + self.n_bins), dtype=x.dtype)
        lead = int(frame_offset) % ROW_ALIGN
        head = min(n, (ROW_ALIGN - lead) % ROW_ALIGN)
        body = (n - head) // ROW_ALIGN * ROW_ALIGN
        pieces = []  # (rows of out, operand, rows of the product to keep)
        if head:
            buf = xp.zeros((ROW_ALIGN, x.shape[1]), dtype=x.dtype)
            buf[lead : lead + head] = x[:head]
            pieces.append((slice(0, head), buf, slice(lead, lead + head)))
        if body:
            pieces.append((slice(head, head + body), x[head : head + body], slice(None)))
        tail = n - head - body
        if tail:
            buf = xp.zeros((ROW_ALIGN, x.shape[1]), dtype=x.dtype)
            buf[:tail] = x[head + body :]
            pieces.append((slice(head + body, n), buf, slice(0, tail)))
        # NaN/inf pixels make their frame's row non-finite on purpose (see the module notes).
        with np.errstate(invalid="ignore", over="ignore"):
            for band, w in zip(self.bands, self._weights(xp, x.dtype)):
                for rows, operand, keep in pieces:
                    part = (operand[:, band.start : band.stop] @ w)[keep]
                    out[rows, :N_FIXED] += part[:, :N_FIXED]
                    out[rows, N_FIXED + band.lo : N_FIXED + band.hi] += part[:, N_FIXED:]
        return out

    def threshold_map(self, xp: Any, threshold: float, dtype: Any) -> Any:
        """Per-pixel threshold: ``threshold`` on good pixels, +inf on masked ones (never lit).

        In float32 the threshold is rounded down to the float32 below it, so that
        ``x > t32`` holds exactly when ``x > threshold`` for every float32 ``x``.
        """
        t = np.asarray(threshold, dtype=dtype)
        if float(t) > float(threshold):  # compared in float64 (a bare float would be cast down)
            t = np.nextafter(t, np.asarray(-np.inf, dtype=dtype))

        def build() -> np.ndarray:
            return np.where(self.mask.ravel(), t, np.inf)

        return self._flat(xp, f"threshold={float(t)!r}", dtype, build)


def resolve_center(ds_shape: tuple[int, int], geometry: Geometry | None, center: Any) -> tuple[float, float]:
    """Centre of the radial bins: ``center`` if given, else the beam centre, else the array centre."""
    if center is not None:
        try:
            return tuple(center)  # type: ignore[return-value]
        except TypeError:
            raise GeometryError(f"center must be (row, column) in pixels, got {center!r}.") from None
    if geometry is not None:
        return geometry.beam_center_yx
    return ((ds_shape[0] - 1) / 2.0, (ds_shape[1] - 1) / 2.0)


def _bin_index(r: np.ndarray, width: float) -> np.ndarray:
    # floor(r / w) can land one bin off where r is a multiple of w in decimal but not in
    # binary; correct it so that k·w ≤ r < (k + 1)·w holds as computed in float64.
    k = np.floor(r / width)
    k = np.where(k * width > r, k - 1, k)
    k = np.where((k + 1) * width <= r, k + 1, k)
    return k.astype(np.int64)


def build_operator(
    mask: np.ndarray,
    center_yx: tuple[float, float] | None = None,
    bin_width_px: float = 1.0,
    n_bins: int | None = None,
    radial: bool = True,
) -> PixelOperator:
    """Build the weight matrix of the fused reductions.

    Parameters
    ----------
    mask : ndarray of bool, shape (ny, nx)
        Good pixels (True).
    center_yx : tuple of float, optional
        Centre of the radial bins (row, column), pixels; the array centre if omitted.
    bin_width_px : float
        Radial bin width w, pixels: bin k holds k·w ≤ r < (k + 1)·w.
    n_bins : int, optional
        Number of bins; by default enough to hold the farthest good pixel.
    radial : bool
        Include the radial bins (False: centre of mass and totals only).

    Raises
    ------
    SchemaError
        If the mask has no good pixel.
    ParameterError
        For a bin width or a number of bins that is not positive.
    GeometryError
        For a centre off the detector.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise SchemaError(f"the mask must be 2-D (y, x), got shape {mask.shape}.")
    if not mask.any():
        raise SchemaError(
            "every pixel of the mask is bad (False), so nothing can be reduced; "
            "the mask is True for good pixels — did you pass its inverse?"
        )
    shape = (int(mask.shape[0]), int(mask.shape[1]))
    ny, nx = shape
    try:
        width = float(bin_width_px)
    except (TypeError, ValueError):
        raise ParameterError(f"bin_width_px must be a number of pixels, got {bin_width_px!r}.") from None
    if not math.isfinite(width) or width <= 0:
        raise ParameterError(f"bin_width_px must be a positive number of pixels, got {bin_width_px!r}.")
    if center_yx is None:
        center_yx = ((ny - 1) / 2.0, (nx - 1) / 2.0)
    r = pixel_radius_map(shape, center_yx)  # validates the centre
    center = (float(center_yx[0]), float(center_yx[1]))
    if radial:
        k = _bin_index(r, width)
        if n_bins is None:
            n_bins = int(k[mask].max()) + 1
        elif isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
            raise ParameterError(f"n_bins must be a positive integer, got {n_bins!r}.")
        n_bins = int(n_bins)
        binned = mask & (k < n_bins)
    else:
        n_bins = 0
        k = np.zeros(shape, dtype=np.int64)
        binned = np.zeros(shape, dtype=bool)
    bin_counts = np.bincount(k[binned], minlength=n_bins).astype(np.int64)

    ry, rx = (ny - 1) / 2.0, (nx - 1) / 2.0
    good = mask.astype(np.float64)
    fixed = np.stack(
        [
            np.ones(shape),
            good,
            good * (np.arange(ny) - ry)[:, None],
            good * (np.arange(nx) - rx)[None, :],
        ],
        axis=-1,
    ).reshape(ny * nx, N_FIXED)
    k_flat, binned_flat = k.ravel(), binned.ravel()
    # Same bands with or without bins, so totals and centres of mass come out bit-identical
    # from center_of_mass and summarize.
    rows = max(1, BAND_PIXELS // nx)
    bands = []
    for y0 in range(0, ny, rows):
        start, stop = y0 * nx, min(ny, y0 + rows) * nx
        sel = binned_flat[start:stop]
        kb = k_flat[start:stop]
        lo, hi = (int(kb[sel].min()), int(kb[sel].max()) + 1) if sel.any() else (0, 0)
        w = np.zeros((stop - start, N_FIXED + hi - lo), dtype=np.float32)
        w[:, :N_FIXED] = fixed[start:stop]
        idx = np.flatnonzero(sel)
        w[idx, N_FIXED + kb[idx] - lo] = 1.0
        bands.append(_Band(start, stop, lo, hi, w))
    return PixelOperator(
        shape=shape,
        mask=mask,
        n_bins=n_bins,
        bin_width_px=width,
        center_yx=center,
        bin_counts=bin_counts,
        bands=tuple(bands),
    )


def work_dtype(dtype: Any) -> np.dtype:
    """Float type a block is reduced in: float64 for float64 and wide integers, else float32.

    float32 holds every integer below 2²⁴ exactly, so uint8/uint16 photon counts lose nothing.
    """
    dtype = np.dtype(dtype)
    if dtype == np.float64 or (dtype.kind in "iu" and dtype.itemsize > 2):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def reduce_block(
    block: Any,
    op: PixelOperator,
    threshold: float | None = None,
    com: bool = True,
    radial: bool = True,
    frame_offset: int = 0,
) -> dict[str, Any]:
    """The fused kernel: centre of mass, totals, radial profiles and lit pixels of a block.

    Parameters
    ----------
    block : array, shape (n, ny, nx)
        Frames (NumPy or CuPy); NaN/inf pixels count as masked in their frame.
    op : PixelOperator
        Built by `build_operator` for this detector.
    threshold : float, optional
        Count lit pixels (good, finite, value > threshold); skipped when None.
    com : bool
        Return ``total``, ``com_y``, ``com_x``.
    radial : bool
        Return ``radial`` (needs an operator with bins).
    frame_offset : int
        Stack index of the block's first frame (passed by `map_frames`); it makes the
        results independent of the chunking (see `PixelOperator.apply`).

    Returns
    -------
    dict of str to array
        ``total`` (n,): sum of good pixels; ``com_y``, ``com_x`` (n,), float64: centre of mass
        in pixel-index units, NaN where the total is 0; ``radial`` (n, n_bins): mean of the
        good pixels of each bin, NaN for a bin with none; ``lit`` (n,), int32.
    """
    xp = array_namespace(block)
    if getattr(block, "ndim", None) != 3 or tuple(block.shape[1:]) != op.shape:
        raise ParameterError(
            f"a block must be (n, ny, nx) frames of shape {op.shape}, got shape {getattr(block, 'shape', None)}."
        )
    n = block.shape[0]
    dtype = work_dtype(block.dtype)
    x = block.reshape(n, -1).astype(dtype, copy=False)
    out: dict[str, Any] = {}
    lit = None
    if threshold is not None:
        above = x > op.threshold_map(xp, threshold, dtype)
        lit = above.sum(axis=1, dtype=xp.int32)
    if not (com or radial):
        # Lit pixels only: a plain row sum flags the frames with NaN/inf pixels.
        with np.errstate(invalid="ignore", over="ignore"):
            bad = xp.flatnonzero(~xp.isfinite(x.sum(axis=1)))
        if lit is not None:
            if bad.size:
                xb = x[bad]
                good = xp.isfinite(xb) & xp.asarray(op.mask.ravel())
                lit[bad] = ((xb > op.threshold_map(xp, threshold, dtype)) & good).sum(axis=1, dtype=xp.int32)
            out["lit"] = lit
        return out
    with BLAS_ONE_THREAD if xp is np else _NO_LIMIT:
        sums = op.apply(x, frame_offset)
    counts = None
    bad = xp.flatnonzero(~xp.isfinite(sums[:, 0]))
    if bad.size:
        # Frames with NaN/inf pixels: mask those pixels in those frames only.
        xb = x[bad]
        good = xp.isfinite(xb) & xp.asarray(op.mask.ravel())
        vb = xp.where(good, xb, 0).astype(dtype, copy=False)
        # Redo the flagged frames at the same GEMM positions (mod ROW_ALIGN) as the fast path
        # would use, so their results do not depend on the chunking or on which other frames
        # were flagged: frame i goes to slot (frame_offset + i) mod ROW_ALIGN of buffer k,
        # where k counts the earlier flagged frames with that slot. Per-frame good-pixel counts
        # are sums of ones, exact in any order.
        slots = (bad + frame_offset) % ROW_ALIGN
        rank = xp.zeros_like(bad)
        for slot in xp.unique(slots).tolist():
            same = xp.flatnonzero(slots == slot)
            rank[same] = xp.arange(same.size)
        rows = rank * ROW_ALIGN + slots
        buf = xp.zeros((int(rank.max()) + 1) * ROW_ALIGN * x.shape[1], dtype=dtype).reshape(-1, x.shape[1])
        buf[rows] = vb
        with BLAS_ONE_THREAD if xp is np else _NO_LIMIT:
            sums[bad] = op.apply(buf)[rows]
            cb = op.apply(good.astype(dtype))
        counts = (bad, cb)
        if lit is not None:
            lit[bad] = ((vb > op.threshold_map(xp, threshold, dtype)) & good).sum(axis=1, dtype=xp.int32)
    if com:
        s = sums[:, 1:N_FIXED].astype(xp.float64)
        total = s[:, 0]
        empty = total == 0
        safe = xp.where(empty, 1.0, total)
        ry, rx = op.reference_yx
        out["total"] = total
        out["com_y"] = xp.where(empty, xp.nan, ry + s[:, 1] / safe)
        out["com_x"] = xp.where(empty, xp.nan, rx + s[:, 2] / safe)
    if radial:
        if op.n_bins == 0:
            raise ParameterError("this operator has no radial bins; build it with radial=True.")
        n_good = xp.broadcast_to(xp.asarray(op.bin_counts, dtype=dtype), (n, op.n_bins)).copy()
        if counts is not None:
            n_good[counts[0]] = counts[1][:, N_FIXED:]
        bins = sums[:, N_FIXED:]
        out["radial"] = xp.where(n_good > 0, bins / xp.where(n_good > 0, n_good, 1), xp.nan)
    if lit is not None:
        out["lit"] = lit
    return out


def pixel_sums(block: Any, mask: Any) -> dict[str, Any]:
    """Partial sums of a block over its frames, for dataset-wide means (`reduce_frames` kernel).

    Returns
    -------
    dict
        ``sum`` (ny, nx), float64: sum over the block's frames of each good, finite pixel;
        ``count`` (ny, nx), int64: number of frames in which the pixel was good and finite.
    """
    xp = array_namespace(block)
    s = block.sum(axis=0, dtype=xp.float64)
    n = block.shape[0]
    m = xp.asarray(mask)
    if bool(xp.isfinite(s).all()):
        count = xp.where(m, n, 0).astype(xp.int64)
    else:
        good = xp.isfinite(block) & m
        s = xp.where(good, block, 0).sum(axis=0, dtype=xp.float64)
        count = good.sum(axis=0, dtype=xp.int64)
    return {"sum": xp.where(m, s, 0.0), "count": count}
