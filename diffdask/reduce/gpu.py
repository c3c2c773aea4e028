"""The GPU twin of `diffdask.reduce.kernel.reduce_block` (numba-cuda kernels on CuPy blocks).

`reduce_block` sends a CuPy block here, so a frame stack moved to the GPU
(`diffdask.backend.to_gpu`) is reduced on the device by the same graph builders. The outputs
are those of the CPU kernel, equal to 1e-12 relative: every float sum is a block reduction in
a fixed order (each thread sums a fixed stride of the pixels, then a shared-memory tree), so
the GPU result is also the same bits on every run; no float atomics are used.

- ``_pixel_kernel``: one thread block per frame: total, Σ(i − ry)·v, Σ(j − rx)·v, lit and
  non-finite counts.
- ``_bin_kernel``: one 32-thread block per (bin, frame) over the bin's pixels, listed once
  per plan in bin order: bin sum, good finite pixel count, Poisson variance sum.

The kernels also run in numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) on NumPy arrays,
which is how the CPU-only test suite checks them against the CPU kernel.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
from numba import cuda

from diffdask.backend import array_namespace
from diffdask.errors import BackendError, ParameterError

#: Threads per block of the pixel kernel (a power of two, for the tree reduction).
PIXEL_THREADS = 256
#: Threads per block of the bin kernel (one warp).
BIN_THREADS = 32

_KERNELS: dict[str, Any] = {}
# The plans' arrays on the device, per plan (kept off the plan, which is pickled to workers).
_DEVICE_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_cuda() -> None:
    if not cuda.is_available():
        raise BackendError(
            "no CUDA device is usable here (no GPU or no CUDA driver); reduce these frames on the "
            "CPU (leave them as NumPy) or run on a GPU node with diffdask[gpu] installed."
        )


def _kernels() -> dict[str, Any]:
    if _KERNELS:
        return _KERNELS
    _check_cuda()
    from numba import float64, int32

    @cuda.jit
    def pixel_kernel(block, good, thr, do_lit, total, sy, sx, lit, bad):  # pragma: no cover - device
        f = cuda.blockIdx.x
        t = cuda.threadIdx.x
        ny = block.shape[1]
        nx = block.shape[2]
        ry = (ny - 1) / 2.0
        rx = (nx - 1) / 2.0
        s_t = cuda.shared.array(PIXEL_THREADS, float64)
        s_y = cuda.shared.array(PIXEL_THREADS, float64)
        s_x = cuda.shared.array(PIXEL_THREADS, float64)
        s_l = cuda.shared.array(PIXEL_THREADS, int32)
        s_b = cuda.shared.array(PIXEL_THREADS, int32)
        a_t = 0.0
        a_y = 0.0
        a_x = 0.0
        a_l = 0
        a_b = 0
        p = t
        while p < ny * nx:
            i = p // nx
            j = p - i * nx
            v = float(block[f, i, j])
            g = good[i, j]
            if v - v == 0.0:
                v = v * g
                a_t += v
                a_y += (i - ry) * v
                a_x += (j - rx) * v
                if do_lit and v > thr[i, j]:
                    a_l += 1
            elif g > 0.0:
                a_b += 1
            p += PIXEL_THREADS
        s_t[t] = a_t
        s_y[t] = a_y
        s_x[t] = a_x
        s_l[t] = a_l
        s_b[t] = a_b
        cuda.syncthreads()
        step = PIXEL_THREADS // 2
        while step > 0:
            if t < step:
                s_t[t] += s_t[t + step]
                s_y[t] += s_y[t + step]
                s_x[t] += s_x[t + step]
                s_l[t] += s_l[t + step]
                s_b[t] += s_b[t + step]
            cuda.syncthreads()
            step //= 2
        if t == 0:
            total[f] = s_t[0]
            sy[f] = s_y[0]
            sx[f] = s_x[0]
            lit[f] = s_l[0]
            bad[f] = s_b[0]

    @cuda.jit
    def bin_kernel(block, perm, offsets, do_var, acc, cnt, var):  # pragma: no cover - device
        k = cuda.blockIdx.x
        f = cuda.blockIdx.y
        t = cuda.threadIdx.x
        nx = block.shape[2]
        s_s = cuda.shared.array(BIN_THREADS, float64)
        s_v = cuda.shared.array(BIN_THREADS, float64)
        s_c = cuda.shared.array(BIN_THREADS, int32)
        a_s = 0.0
        a_v = 0.0
        a_c = 0
        p = offsets[k] + t
        while p < offsets[k + 1]:
            q = perm[p]
            i = q // nx
            v = float(block[f, i, q - i * nx])
            if v - v == 0.0:
                a_s += v
                a_c += 1
                if do_var:
                    a_v += max(1.0, v)
            p += BIN_THREADS
        s_s[t] = a_s
        s_v[t] = a_v
        s_c[t] = a_c
        cuda.syncthreads()
        step = BIN_THREADS // 2
        while step > 0:
            if t < step:
                s_s[t] += s_s[t + step]
                s_v[t] += s_v[t + step]
                s_c[t] += s_c[t + step]
            cuda.syncthreads()
            step //= 2
        if t == 0:
            acc[f, k] = s_s[0]
            cnt[f, k] = s_c[0]
            if do_var:
                var[f, k] = s_v[0]

    _KERNELS.update(pixel=pixel_kernel, bins=bin_kernel)
    return _KERNELS


def _device_plan(plan: Any, xp: Any, threshold: float | None) -> dict[str, Any]:
    # The plan's arrays on the device, built once per plan and threshold.
    cache = _DEVICE_PLANS.setdefault(plan, {})
    key = (xp.__name__, threshold)
    if key not in cache:
        flat = plan.bin_index.ravel()
        order = np.argsort(flat, kind="stable")
        order = order[flat[order] >= 0].astype(np.int32)
        offsets = np.searchsorted(flat[order], np.arange(plan.n_bins + 1)).astype(np.int64)
        thr = np.where(plan.mask, np.inf if threshold is None else float(threshold), np.inf)
        cache[key] = {
            "good": xp.asarray(plan.good),
            "thr": xp.asarray(thr),
            "perm": xp.asarray(order),
            "offsets": xp.asarray(offsets),
        }
    return cache[key]


def reduce_block_gpu(
    block: Any,
    plan: Any,
    threshold: float | None = None,
    com: bool = True,
    bins: bool = True,
    variance: bool = False,
) -> dict[str, Any]:
    """`diffdask.reduce.kernel.reduce_block` on the GPU; same arguments and outputs.

    Raises
    ------
    BackendError
        Where no CUDA device (or simulator) is usable.
    """
    if bins and plan.n_bins == 0:
        raise ParameterError("this plan has no bins; build it with a bin index.")
    kernels = _kernels()
    xp = array_namespace(block)
    n = int(block.shape[0])
    dev = _device_plan(plan, xp, threshold)
    out: dict[str, Any] = {}
    if n == 0:
        block = xp.zeros((1,) + tuple(block.shape[1:]), dtype=block.dtype)[:0]
    if com or threshold is not None:
        total, sy, sx = xp.empty(n), xp.empty(n), xp.empty(n)
        lit, bad = xp.zeros(n, dtype=xp.int32), xp.zeros(n, dtype=xp.int32)
        if n:
            kernels["pixel"][n, PIXEL_THREADS](
                block, dev["good"], dev["thr"], threshold is not None, total, sy, sx, lit, bad
            )
        if com:
            out.update(total=total, sum_y=sy, sum_x=sx, n_nonfinite=bad)
        if threshold is not None:
            out["lit"] = lit
    if bins:
        acc = xp.empty((n, plan.n_bins))
        cnt = xp.empty((n, plan.n_bins), dtype=xp.int32)
        var = xp.empty((n, plan.n_bins if variance else 1))
        if n:
            kernels["bins"][(plan.n_bins, n), BIN_THREADS](block, dev["perm"], dev["offsets"], variance, acc, cnt, var)
        out.update(bin_sum=acc, bin_count=cnt)
        if variance:
            out["bin_var"] = var
    return out

