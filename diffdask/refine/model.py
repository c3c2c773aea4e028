"""The ring model of one frame at a fixed geometry, and the rejection of its Bragg spots.

Pure NumPy/SciPy on one frame's pixels. The model is linear in the ring amplitudes and the
flat level (see `diffdask.refine`): `ring_design` gives its columns at the good pixels and
`project_amplitudes` solves for them by weighted least squares, which the nonlinear fits of
`diffdask.refine.kernels` call at every step (variable projection).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from diffdask.geometry import Geometry

#: Floor of the model counts used as Poisson variance (photons), so that empty pixels keep a weight.
VARIANCE_FLOOR = 0.5
#: Percentile and window (pixels) of the spot-suppressing filter of the first round.
PREFILTER_PERCENTILE = 25
PREFILTER_SIZE = 7
#: Side of the pixel tiles whose summed residuals reveal correlated misfit.
TILE = 4


def _disc(radius: float) -> np.ndarray:
    r = math.floor(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy * yy + xx * xx <= radius * radius


def geometry_at(geometry: Geometry, x: np.ndarray) -> Geometry:
    """``geometry`` (shape, pixel size, wavelength) with the centre and distance of ``x``.

    Parameters
    ----------
    geometry : Geometry
        Detector shape, pixel size and wavelength.
    x : ndarray, shape (5,)
        Beam centre row and column (pixels), pitch and yaw (radians), distance (m).

    Raises
    ------
    GeometryError
        If the centre or distance is not usable (e.g. a distance ≤ 0).
    """
    return Geometry(geometry.shape, geometry.pixel_size_m, x[4], geometry.wavelength_m, (x[0], x[1]))


def ring_design(x: np.ndarray, geometry: Geometry, rings: np.ndarray, polarization: str,
                good: np.ndarray) -> np.ndarray:
    """Columns of the linear model at the ``good`` pixels, geometry ``x`` (see `geometry_at`).

    One ring profile per ring of ``rings`` ((k, 2): centre and width σ, nm⁻¹) times the
    polarisation factor and the relative solid angle, then the flat level (ones).
    """
    maps = geometry_at(geometry, x).tilted_maps(x[2], x[3], polarization)
    q = 2.0 * math.pi * np.sqrt((maps["scattering_vectors_inv_nm"] ** 2).sum(axis=0))[good]
    omega = maps["solid_angle_sr"]
    weight = (maps["polarization_factor"] * omega / omega.max())[good]
    columns = [weight * np.exp(-0.5 * ((q - q0) / width) ** 2) for q0, width in rings]
    columns.append(np.ones_like(q))
    return np.stack(columns, axis=1)


def percentile_floor(counts: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Low local percentile of a frame's counts (photons), which Bragg spots barely touch.

    The first round of every fit places the rings on this image rather than on the counts.
    """
    return ndimage.percentile_filter(np.where(mask, counts, 0.0), PREFILTER_PERCENTILE, size=PREFILTER_SIZE,
                                     mode="nearest")


def tile_chi2(residual: np.ndarray, variance: np.ndarray, use: np.ndarray) -> float:
    """Reduced χ² of the residuals summed over TILE×TILE pixel tiles (the ``use`` pixels of each).

    ``residual`` and ``variance`` (photons, photons²) hold the values of the ``use`` pixels.
    """
    ny, nx = use.shape
    sums = np.zeros((2, ny, nx))
    sums[0][use], sums[1][use] = residual, variance
    ty, tx = ny // TILE, nx // TILE
    tiles = sums[:, : ty * TILE, : tx * TILE].reshape(2, ty, TILE, tx, TILE).sum(axis=(2, 4))
    filled = tiles[1] > 0
    return float(np.mean(tiles[0][filled] ** 2 / tiles[1][filled])) if filled.any() else 1.0


def project_amplitudes(design: np.ndarray, counts: np.ndarray, sqrt_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted linear least squares for the amplitudes; returns them and the weighted residual."""
    a = design * sqrt_w[:, None]
    b = counts * sqrt_w
    # Normal equations of a few columns: 5× faster than an SVD per call, and the fit calls
    # this a hundred times per frame; lstsq only when rings fall off the detector.
    try:
        amplitudes = np.linalg.solve(a.T @ a, a.T @ b)
    except np.linalg.LinAlgError:
        amplitudes = np.linalg.lstsq(a, b, rcond=None)[0]
    return amplitudes, b - a @ amplitudes


def ring_snr(design: np.ndarray, counts: np.ndarray, sqrt_w: np.ndarray, n_rings: int, inflate: float) -> float:
    """Largest ring amplitude over its standard error (weighted fit at a fixed geometry).

    ``inflate`` scales the variances (a reduced χ² above 1); 0 when the fit is singular.
    """
    weighted = design * sqrt_w[:, None]
    amplitudes = project_amplitudes(design, counts, sqrt_w)[0]
    try:
        variance = np.diag(np.linalg.inv(weighted.T @ weighted))[:n_rings] * inflate
    except np.linalg.LinAlgError:
        return 0.0
    err = np.sqrt(np.maximum(variance, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.nanmax(np.where(err > 0, amplitudes[:n_rings] / err, 0.0)))


def ring_model(design: np.ndarray, counts: np.ndarray, good: np.ndarray, fit: np.ndarray | None = None,
               sqrt_w: np.ndarray | None = None) -> np.ndarray:
    """Ring model of a frame (photons) at a fixed geometry on its ``good`` pixels, 0 off them.

    ``design`` holds the rows of the good pixels; the amplitudes are fitted on the ``fit``
    subset of them (all by default, weights ``sqrt_w``). Floored at `VARIANCE_FLOOR` because
    it serves as the Poisson variance.
    """
    fit = np.ones(design.shape[0], bool) if fit is None else fit
    weights = np.ones(int(fit.sum())) if sqrt_w is None else sqrt_w
    amplitudes = project_amplitudes(design[fit], counts[good][fit], weights)[0]
    model = np.zeros(good.shape)
    model[good] = np.maximum(design @ amplitudes, VARIANCE_FLOOR)
    return model


def spot_free(counts: np.ndarray, model: np.ndarray, good: np.ndarray, reject_sigma: float,
              spot_radius_px: float) -> np.ndarray:
    """Good pixels that belong to no Bragg spot, judged against the ring model (photons)."""
    floor = np.maximum(model, VARIANCE_FLOOR)
    excess = np.where(good, counts - floor, 0.0)
    # A pixel is a spot's if it, or the 3×3 sum around it (which sees the faint tails of a
    # spot none of whose pixels alone stands out), lies reject_sigma above the model.
    box_excess = ndimage.uniform_filter(excess, 3, mode="constant")
    box_model = ndimage.uniform_filter(np.where(good, floor, 0.0), 3, mode="constant")
    spots = (excess > reject_sigma * np.sqrt(floor)) | (
        box_excess > reject_sigma * np.sqrt(np.maximum(box_model, VARIANCE_FLOOR / 9) / 9))
    return good & ~ndimage.binary_dilation(spots & good, structure=_disc(spot_radius_px))


def spot_free_model(design: np.ndarray, counts: np.ndarray, floor_image: np.ndarray, good: np.ndarray,
                    reject_sigma: float, spot_radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Spot-free pixels and the ring model at a fixed geometry (``design``: rows of ``good``).

    The amplitudes come first from the spot-blind low percentile, then from the counts off the
    spots that model reveals; the spots are judged again against the second model.
    """
    model = ring_model(design, floor_image, good)
    use = spot_free(counts, model, good, reject_sigma, spot_radius_px)
    model = ring_model(design, counts, good, use[good], 1.0 / np.sqrt(model[use]))
    return spot_free(counts, model, good, reject_sigma, spot_radius_px), model
