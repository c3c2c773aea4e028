"""Differential phase contrast: phase gradients from the CoM deflection, Fourier integration."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from diffdask.errors import ParameterError
from diffdask.roi.grid import on_raster
from diffdask.roi.kernels import maps_kernel

DPC_OUTPUTS: dict[str, tuple[tuple[int, ...], Any]] = {
    "grid_y": ((), np.float64),
    "grid_x": ((), np.float64),
    "phase_gradient_y": ((), np.float64),
    "phase_gradient_x": ((), np.float64),
    "dpc_phase": ((), np.float64),
}


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
        The arrays of `DPC_OUTPUTS`, one value per frame.
    """
    block = np.asarray(block, dtype=np.float64)
    maps = maps_kernel(block)
    gy, gx = maps["grid_y"], maps["grid_x"]
    if not on_raster(gy, gx):
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
