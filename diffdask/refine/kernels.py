"""Per-frame geometry fits and the block kernels of the refinement graphs.

Pure NumPy/SciPy on blocks of frames, whatever holds them (`refine_kernel` for `map_frames`,
`run_normal_equations_kernel` for `reduce_frames`); the graphs around them are built in
`diffdask.refine.graph`. The fit's parameter vector is the beam centre row and column
(pixels), pitch and yaw (radians) and distance (m); the kernels take and give user units
(degrees for the angles), converted with `TO_FIT`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize

from diffdask.backend import to_cpu
from diffdask.errors import GeometryError
from diffdask.geometry import Geometry
from diffdask.refine.model import (
    percentile_floor,
    project_amplitudes,
    ring_design,
    ring_model,
    ring_snr,
    spot_free,
    spot_free_model,
    tile_chi2,
)

#: Per-frame geometry values refined, in the order of the fit's parameter vector.
GEOMETRY_FIELDS = ("beam_center_y", "beam_center_x", "pitch_deg", "yaw_deg", "distance_m")
#: From those user units (pixels, degrees, metres) to the fit's (pixels, radians, metres).
TO_FIT = np.array([1.0, 1.0, math.pi / 180, math.pi / 180, 1.0])
#: The fit ends when a step changes χ² or the parameters by less than this fraction.
TOLERANCE = 1e-10
#: Most model evaluations of one round of a frame's fit (a converging fit takes 30–60).
MAX_EVALUATIONS = 300
#: Finite-difference steps of the shared fit: centre (pixels), pitch, yaw (radians), distance (× distance).
_RUN_STEPS = np.array([1e-3, 1e-3, 1e-5, 1e-5, 1e-6])


def refine_frame(
    image: np.ndarray,
    mask: np.ndarray,
    geometry: Geometry,
    start: Sequence[float],
    rings: np.ndarray,
    *,
    polarization: str = "x",
    fit_distance: bool = True,
    exclude_radius_px: float = 0.0,
    reject_sigma: float = 4.0,
    spot_radius_px: float = 2.0,
    rounds: int = 3,
    min_ring_snr: float = 10.0,
) -> dict[str, Any]:
    """Refine the geometry of one frame from its background rings.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Photon counts.
    mask : ndarray of bool, shape (ny, nx)
        True for good pixels.
    geometry : Geometry
        Detector shape, pixel size and wavelength (its centre and distance are not used).
    start : sequence of 5 floats
        Starting beam centre row and column (pixels), pitch and yaw (radians), distance (m).
    rings : ndarray, shape (k, 2)
        Centre and Gaussian width σ of each ring, q in nm⁻¹.
    polarization : {"x", "y", "none"}
        Beam polarisation.
    fit_distance : bool
        Refine the distance too (else it stays at ``start[4]``).
    exclude_radius_px : float
        Leave out pixels within this radius of the starting beam centre (a beamstop shadow).
    reject_sigma : float
        Pixels this many standard deviations above the model (spots) are left out of the
        next round, with their neighbours within ``spot_radius_px``.
    spot_radius_px : float
        Radius of the neighbourhood rejected with each such pixel (spot tails), pixels.
    rounds : int
        Reweighting rounds (≥ 1).
    min_ring_snr : float
        Refined only if some ring amplitude is at least this many standard errors.

    Returns
    -------
    dict
        ``parameters`` (5,) and ``errors`` (5,) in the units of ``start`` (errors NaN and
        parameters = ``start`` when not refined; a fixed distance has error 0),
        ``chi2_reduced``, ``ring_snr`` (largest amplitude / its error) and ``refined``.
    """
    x = np.asarray(start, dtype=float).copy()
    ny, nx = geometry.shape
    yy, xx = np.indices((ny, nx))
    good = mask & np.isfinite(image)
    if exclude_radius_px > 0:
        good &= (yy - x[0]) ** 2 + (xx - x[1]) ** 2 > exclude_radius_px**2
    counts_all = np.where(np.isfinite(image), image, 0.0).astype(np.float64)
    free = np.array([True, True, True, True, bool(fit_distance)])
    lower = np.array([-0.5, -0.5, -math.radians(45), -math.radians(45), 0.5 * x[4]])
    upper = np.array([ny - 0.5, nx - 0.5, math.radians(45), math.radians(45), 2.0 * x[4]])
    x = np.clip(x, lower, upper)
    fail = {"parameters": np.asarray(start, dtype=float), "errors": np.full(5, np.nan), "chi2_reduced": np.nan,
            "ring_snr": 0.0, "refined": False}
    use = good.copy()
    # Round 0 fits a low local percentile of the counts, which Bragg spots barely touch, to
    # place the rings; later rounds fit the counts themselves with the spots left out.
    floor_image = percentile_floor(counts_all, mask)
    if good.sum() <= len(rings) + 6:
        return fail
    # No ring worth the name at the start (a flat background): decline before fitting noise.
    # Judged against the spot-blind model only: at an unfitted start, a refit on the counts
    # takes the misplaced rings' pixels for spots and can decline a frame that has rings.
    design = ring_design(x, geometry, rings, polarization, good)
    model = ring_model(design, floor_image, good)
    clean = spot_free(counts_all, model, good, reject_sigma, spot_radius_px)
    snr = ring_snr(design[clean[good]], counts_all[clean], 1.0 / np.sqrt(model[clean]), len(rings), 1.0)
    if snr < min_ring_snr / 2:
        return {**fail, "ring_snr": snr}
    sqrt_w = np.ones(int(use.sum()))
    n_rounds = max(int(rounds), 1)
    for round_ in range(n_rounds):
        counts = (floor_image if round_ == 0 else counts_all)[use]
        if counts.size <= len(rings) + 6:
            return fail

        def residual(p: np.ndarray, counts: np.ndarray = counts, use: np.ndarray = use,
                     sqrt_w: np.ndarray = sqrt_w) -> np.ndarray:
            full = x.copy()
            full[free] = p
            return project_amplitudes(ring_design(full, geometry, rings, polarization, use), counts, sqrt_w)[1]

        try:
            result = optimize.least_squares(residual, x[free], x_scale="jac", ftol=TOLERANCE, xtol=TOLERANCE,
                                            gtol=TOLERANCE, method="lm", max_nfev=MAX_EVALUATIONS)
        except GeometryError:  # a step took the centre off the detector or the distance below 0
            return fail
        if np.any(result.x < lower[free]) or np.any(result.x > upper[free]):
            return fail
        x[free] = result.x
        if round_ == n_rounds - 1:
            break
        # Reweight with the model and drop the pixels far above it before the next round.
        model = ring_model(ring_design(x, geometry, rings, polarization, good), counts_all, good)
        use = spot_free(counts_all, model, good, reject_sigma, spot_radius_px)
        sqrt_w = 1.0 / np.sqrt(model[use])
    # χ² and errors of the last round's fit, on its pixels and weights.
    design = ring_design(x, geometry, rings, polarization, use)
    amplitudes, res = project_amplitudes(design, counts, sqrt_w)
    dof = max(counts.size - int(free.sum()) - design.shape[1], 1)
    chi2 = float(res @ res) / dof
    # Poisson weights make the covariance absolute. Misfit inflates it: a χ² above 1, or
    # residuals that agree over a few pixels (faint spots below the rejection threshold) —
    # seen as a χ² above 1 of the residuals summed in tiles. A χ² below 1 (near-empty pixels
    # at the variance floor) does not shrink it.
    inflate = max(chi2, tile_chi2(counts - design @ amplitudes, 1.0 / sqrt_w**2, use), 1.0)
    try:
        cov = np.linalg.inv(result.jac.T @ result.jac) * inflate
    except np.linalg.LinAlgError:
        return fail
    snr = ring_snr(design, counts, sqrt_w, len(rings), inflate)
    errors = np.zeros(5)
    errors[free] = np.sqrt(np.maximum(np.diag(cov), 0.0))
    if not (result.success and snr >= min_ring_snr and np.all(np.isfinite(errors))):
        return {**fail, "chi2_reduced": chi2, "ring_snr": snr}
    return {"parameters": x, "errors": errors, "chi2_reduced": chi2, "ring_snr": snr, "refined": True}


def refine_kernel(block: np.ndarray, *, start: np.ndarray, mask: np.ndarray, geometry: Geometry, rings: np.ndarray,
                  options: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`refine_frame` over a block of frames (a `map_frames` kernel).

    ``start`` holds the block's starting values (n, 5) in user units (pixels, degrees,
    metres); the outputs are in the same units.
    """
    frames = to_cpu(block)  # a nonlinear fit per frame: SciPy on the host, whatever holds the block
    n = frames.shape[0]
    out = {"parameters": np.empty((n, 5)), "errors": np.empty((n, 5)), "chi2_reduced": np.empty(n),
           "ring_snr": np.empty(n), "refined": np.empty(n, dtype=bool)}
    for i in range(n):
        fit = refine_frame(frames[i], mask, geometry, np.asarray(start[i], dtype=float) * TO_FIT, rings, **options)
        out["parameters"][i] = fit["parameters"] / TO_FIT
        out["errors"][i] = fit["errors"] / TO_FIT
        for key in ("chi2_reduced", "ring_snr", "refined"):
            out[key][i] = fit[key]
    return out


def run_normal_equations_kernel(block: Any, *, x: np.ndarray, reference: np.ndarray | None, mask: np.ndarray,
                                geometry: Geometry, rings: np.ndarray, free: np.ndarray,
                                options: Mapping[str, Any]) -> dict[str, Any]:
    """Gauss–Newton sums of a block of frames that share one geometry (a `reduce_frames` kernel).

    With ``reference`` None (the first round) each frame's low local percentile is fitted with
    unit weights, as the first round of `refine_frame` does. Otherwise the ring amplitudes are
    solved at ``reference`` (pixels, radians, metres), the Bragg spots rejected against that
    model and the pixels weighted by it — fixed within a round, so χ² compares across steps.
    The weighted residuals r at ``x`` and their derivatives J with respect to the free
    parameters (forward differences, amplitudes re-solved at each step: variable projection)
    add to JᵀJ, Jᵀr and χ².
    """
    frames = to_cpu(block)
    ny, nx = geometry.shape
    steps = _RUN_STEPS * np.array([1, 1, 1, 1, x[4]])
    points = [x] + [x + np.eye(5)[k] * steps[k] for k in np.flatnonzero(free)]
    # One design per geometry for the whole block, every pixel; frames pick their rows.
    everywhere = np.ones((ny, nx), bool)
    designs = [ring_design(p, geometry, rings, options["polarization"], everywhere) for p in points]
    anchor = x if reference is None else reference
    ref_design = designs[0] if reference is None else ring_design(reference, geometry, rings,
                                                                  options["polarization"], everywhere)
    yy, xx = np.indices((ny, nx))
    beamstop = (yy - anchor[0]) ** 2 + (xx - anchor[1]) ** 2 <= options["exclude_radius_px"] ** 2
    n_free = int(free.sum())
    out = {"jtj": np.zeros((n_free, n_free)), "jtr": np.zeros(n_free), "chi2": 0.0, "dof": 0.0,
           "tile_chi2": 0.0, "frames": 0.0}
    for image in frames:
        counts = np.where(np.isfinite(image), image, 0.0).astype(np.float64)
        good = mask & np.isfinite(image) & ~beamstop
        floor_image = percentile_floor(counts, mask)
        if reference is None:
            use, target, model = good, floor_image, np.where(good, 1.0, 0.0)
        else:
            use, model = spot_free_model(ref_design[good.ravel()], counts, floor_image, good,
                                         options["reject_sigma"], options["spot_radius_px"])
            target = counts
        if int(use.sum()) <= designs[0].shape[1] + n_free:
            continue
        rows = use.ravel()
        sqrt_w = 1.0 / np.sqrt(model[use])
        amplitudes, r0 = project_amplitudes(designs[0][rows], target[use], sqrt_w)
        jac = np.stack([(project_amplitudes(d[rows], target[use], sqrt_w)[1] - r0) / steps[k]
                        for d, k in zip(designs[1:], np.flatnonzero(free))], axis=1)
        out["jtj"] += jac.T @ jac
        out["jtr"] += jac.T @ r0
        out["chi2"] += float(r0 @ r0)
        out["dof"] += r0.size - designs[0].shape[1]
        out["tile_chi2"] += tile_chi2(target[use] - designs[0][rows] @ amplitudes, model[use], use)
        out["frames"] += 1
    return out

