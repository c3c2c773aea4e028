"""Detector geometry refined per frame from diffuse background rings.

A network gives a beam centre and a detector tilt to a pixel and a degree; the rings of
amorphous scatterers (water, a polymer jet or tape, the air path) carry the geometry to a
fraction of that. `refine_geometry` fits, frame by frame, the model

    μ(pixel) = P ΔΩ / max(ΔΩ) · Σₖ aₖ exp(−(q − qₖ)² / 2σₖ²) + c

to the photon counts, where q, the polarisation factor P and the solid angle ΔΩ of every
pixel follow from the beam centre, the pitch and yaw of the detector and its distance (the
five refined parameters, see `Geometry.tilted_maps`), and the ring amplitudes aₖ and the flat
level c are solved linearly at each step (variable projection). The ring positions qₖ and
widths σₖ are given, as a calibrant's d-spacings are: they fix the distance, which a ring of
unknown position cannot tell from a tilt.

The fit minimises Pearson's χ² with weights 1/μ taken from the previous round (iteratively
reweighted, so the weights follow the Poisson variance and not the noisy counts); pixels of
Bragg spots, zingers and streaks, more than ``reject_sigma`` standard deviations above the
model (or whose 3×3 neighbourhood is, which catches the faint tails of bright spots), are left
out with their neighbours before the next round; the first round fits a low local percentile
of the counts, which the spots barely touch, so that the first model already sits on the rings.
Standard errors come from the curvature of χ² at the minimum, inflated by the reduced χ² of
the pixels and of 4×4-pixel tiles when either exceeds 1 (faint spots left in make residuals
that agree over a few pixels), so each frame says how well its rings pin its geometry; on
simulated frames the misses scatter as these errors say. A frame whose rings are too weak (no
ring amplitude ``min_ring_snr`` times its error) keeps its starting values and is flagged
``refined = False``: a flat background carries no ring.

The fit converges from anywhere within about ±10 pixels and ±3° of the truth (tested from
the nominal geometry); the per-frame fit is NumPy/SciPy work on the CPU, about ten frames per
second per core for a 128×128 detector (a frame without rings is declined in milliseconds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from scipy import ndimage, optimize

from diffdask._version import __version__
from diffdask.backend import to_cpu
from diffdask.blocks import map_frames, reduce_frames
from diffdask.errors import GeometryError, ParameterError, SchemaError
from diffdask.frames import FRAME_DIMS, get_geometry, get_mask, validate
from diffdask.geometry import Geometry

#: Per-frame geometry values refined, in the order of the fit's parameter vector.
GEOMETRY_FIELDS = ("beam_center_y", "beam_center_x", "pitch_deg", "yaw_deg", "distance_m")
#: From those user units (pixels, degrees, metres) to the fit's (pixels, radians, metres).
_TO_FIT = np.array([1.0, 1.0, math.pi / 180, math.pi / 180, 1.0])
#: The fit ends when a step changes χ² or the parameters by less than this fraction.
TOLERANCE = 1e-10
#: Floor of the model counts used as Poisson variance (photons), so that empty pixels keep a weight.
VARIANCE_FLOOR = 0.5
#: Percentile and window (pixels) of the spot-suppressing filter of the first round.
PREFILTER_PERCENTILE = 25
PREFILTER_SIZE = 7
#: Most model evaluations of one round of a frame's fit (a converging fit takes 30–60).
MAX_EVALUATIONS = 300
#: Side of the pixel tiles whose summed residuals reveal correlated misfit.
TILE = 4


def _disc(radius: float) -> np.ndarray:
    r = math.floor(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy * yy + xx * xx <= radius * radius


def _design(x: np.ndarray, geometry: Geometry, rings: np.ndarray, polarization: str, good: np.ndarray) -> np.ndarray:
    # Columns: one ring profile per ring (times P ΔΩ) and the flat level, at the good pixels.
    g = Geometry(geometry.shape, geometry.pixel_size_m, x[4], geometry.wavelength_m, (x[0], x[1]))
    maps = g.tilted_maps(x[2], x[3], polarization)
    q = 2.0 * math.pi * np.sqrt((maps["scattering_vectors_inv_nm"] ** 2).sum(axis=0))[good]
    omega = maps["solid_angle_sr"]
    weight = (maps["polarization_factor"] * omega / omega.max())[good]
    columns = [weight * np.exp(-0.5 * ((q - q0) / width) ** 2) for q0, width in rings]
    columns.append(np.ones_like(q))
    return np.stack(columns, axis=1)


def _tile_chi2(residual: np.ndarray, variance: np.ndarray, use: np.ndarray) -> float:
    # Reduced χ² of the residuals summed over TILE×TILE pixel tiles (the good pixels of each).
    ny, nx = use.shape
    sums = np.zeros((2, ny, nx))
    sums[0][use], sums[1][use] = residual, variance
    ty, tx = ny // TILE, nx // TILE
    tiles = sums[:, : ty * TILE, : tx * TILE].reshape(2, ty, TILE, tx, TILE).sum(axis=(2, 4))
    filled = tiles[1] > 0
    return float(np.mean(tiles[0][filled] ** 2 / tiles[1][filled])) if filled.any() else 1.0


def _project(design: np.ndarray, counts: np.ndarray, sqrt_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Weighted linear least squares for the amplitudes; returns them and the weighted residual.
    a = design * sqrt_w[:, None]
    b = counts * sqrt_w
    # Normal equations of a few columns: 5× faster than an SVD per call, and the fit calls
    # this a hundred times per frame; lstsq only when rings fall off the detector.
    try:
        amplitudes = np.linalg.solve(a.T @ a, a.T @ b)
    except np.linalg.LinAlgError:
        amplitudes = np.linalg.lstsq(a, b, rcond=None)[0]
    return amplitudes, b - a @ amplitudes


def _ring_snr(design: np.ndarray, counts: np.ndarray, sqrt_w: np.ndarray, n_rings: int, inflate: float) -> float:
    """Largest ring amplitude over its standard error (weighted fit at a fixed geometry)."""
    weighted = design * sqrt_w[:, None]
    amplitudes = _project(design, counts, sqrt_w)[0]
    try:
        variance = np.diag(np.linalg.inv(weighted.T @ weighted))[:n_rings] * inflate
    except np.linalg.LinAlgError:
        return 0.0
    err = np.sqrt(np.maximum(variance, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.nanmax(np.where(err > 0, amplitudes[:n_rings] / err, 0.0)))


def _model_map(design: np.ndarray, counts: np.ndarray, good: np.ndarray, fit: np.ndarray | None = None,
               sqrt_w: np.ndarray | None = None) -> np.ndarray:
    # Ring model of a frame at a fixed geometry on its good pixels (design holds their rows),
    # amplitudes fitted on the `fit` subset of them (all by default, weights sqrt_w), floored
    # at VARIANCE_FLOOR because it serves as the Poisson variance; 0 off the good pixels.
    fit = np.ones(design.shape[0], bool) if fit is None else fit
    weights = np.ones(int(fit.sum())) if sqrt_w is None else sqrt_w
    amplitudes = _project(design[fit], counts[good][fit], weights)[0]
    model = np.zeros(good.shape)
    model[good] = np.maximum(design @ amplitudes, VARIANCE_FLOOR)
    return model


def _spot_free(counts: np.ndarray, model: np.ndarray, good: np.ndarray, reject_sigma: float,
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


def _spot_free_model(design: np.ndarray, counts: np.ndarray, floor_image: np.ndarray, good: np.ndarray,
                     reject_sigma: float, spot_radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Spot-free pixels and the ring model at a fixed geometry (``design``: rows of ``good``).

    The amplitudes come first from the spot-blind low percentile, then from the counts off the
    spots that model reveals; the spots are judged again against the second model.
    """
    model = _model_map(design, floor_image, good)
    use = _spot_free(counts, model, good, reject_sigma, spot_radius_px)
    model = _model_map(design, counts, good, use[good], 1.0 / np.sqrt(model[use]))
    return _spot_free(counts, model, good, reject_sigma, spot_radius_px), model


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
    floor_image = ndimage.percentile_filter(np.where(mask, counts_all, 0.0), PREFILTER_PERCENTILE,
                                            size=PREFILTER_SIZE, mode="nearest")
    if good.sum() <= len(rings) + 6:
        return fail
    # No ring worth the name at the start (a flat background): decline before fitting noise.
    # Judged against the spot-blind model only: at an unfitted start, a refit on the counts
    # takes the misplaced rings' pixels for spots and can decline a frame that has rings.
    design = _design(x, geometry, rings, polarization, good)
    model = _model_map(design, floor_image, good)
    clean = _spot_free(counts_all, model, good, reject_sigma, spot_radius_px)
    snr = _ring_snr(design[clean[good]], counts_all[clean], 1.0 / np.sqrt(model[clean]), len(rings), 1.0)
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
            return _project(_design(full, geometry, rings, polarization, use), counts, sqrt_w)[1]

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
        model = _model_map(_design(x, geometry, rings, polarization, good), counts_all, good)
        use = _spot_free(counts_all, model, good, reject_sigma, spot_radius_px)
        sqrt_w = 1.0 / np.sqrt(model[use])
    # χ² and errors of the last round's fit, on its pixels and weights.
    design = _design(x, geometry, rings, polarization, use)
    amplitudes, res = _project(design, counts, sqrt_w)
    dof = max(counts.size - int(free.sum()) - design.shape[1], 1)
    chi2 = float(res @ res) / dof
    # Poisson weights make the covariance absolute. Misfit inflates it: a χ² above 1, or
    # residuals that agree over a few pixels (faint spots below the rejection threshold) —
    # seen as a χ² above 1 of the residuals summed in tiles. A χ² below 1 (near-empty pixels
    # at the variance floor) does not shrink it.
    inflate = max(chi2, _tile_chi2(counts - design @ amplitudes, 1.0 / sqrt_w**2, use), 1.0)
    try:
        cov = np.linalg.inv(result.jac.T @ result.jac) * inflate
    except np.linalg.LinAlgError:
        return fail
    snr = _ring_snr(design, counts, sqrt_w, len(rings), inflate)
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
        fit = refine_frame(frames[i], mask, geometry, np.asarray(start[i], dtype=float) * _TO_FIT, rings, **options)
        out["parameters"][i] = fit["parameters"] / _TO_FIT
        out["errors"][i] = fit["errors"] / _TO_FIT
        for key in ("chi2_reduced", "ring_snr", "refined"):
            out[key][i] = fit[key]
    return out


def _starting_values(ds: xr.Dataset, geometry: Geometry, initial: Any) -> da.Array:
    n = ds.sizes["frame"]
    if initial is None:
        nominal = [*geometry.beam_center_yx, 0.0, 0.0, geometry.distance_m]
        return da.from_array(np.tile(np.asarray(nominal, dtype=float), (n, 1)), chunks=(ds["frames"].chunks[0], 5))
    if isinstance(initial, xr.DataArray) and "output" in initial.dims:
        initial = {str(k): initial.sel(output=k) for k in initial["output"].values}
    if not isinstance(initial, (Mapping, xr.Dataset)):
        raise ParameterError(
            "initial must be a Dataset or mapping of per-frame beam_center_y, beam_center_x, pitch_deg, yaw_deg "
            f"(and optionally distance_m), or a predict(...).predictions array; got {type(initial).__name__}."
        )
    missing = [f for f in GEOMETRY_FIELDS[:4] if f not in initial]
    if missing:
        raise ParameterError(f"initial lacks {missing}; give per-frame {list(GEOMETRY_FIELDS[:4])} "
                             "(distance_m is optional and defaults to the nominal distance).")
    columns = []
    for name in GEOMETRY_FIELDS:
        if name == "distance_m" and name not in initial:
            columns.append(da.full(n, geometry.distance_m, chunks=ds["frames"].chunks[0]))
            continue
        value = initial[name]
        value = value.data if isinstance(value, xr.DataArray) else value
        arr = value if isinstance(value, da.Array) else da.asarray(np.asarray(value, dtype=float))
        if arr.shape != (n,):
            raise ParameterError(f"initial {name!r} has shape {arr.shape}; it needs one value per frame, ({n},).")
        columns.append(arr.astype(float))
    return da.stack(columns, axis=1)


def _checked(ds: xr.Dataset, rings: Any, polarization: str, fit_distance: bool, exclude_radius_px: float,
             reject_sigma: float, spot_radius_px: float, rounds: int) -> tuple[Geometry, np.ndarray, dict[str, Any]]:
    # The checks every refinement makes at the door; returns the geometry, rings and options.
    geometry = get_geometry(ds)
    if geometry is None:
        raise SchemaError("geometry refinement needs the detector's nominal geometry in the dataset attrs "
                          "(wavelength_m, distance_m, pixel_size_m, beam_center_yx).")
    ring_array = np.asarray(rings, dtype=float)
    if ring_array.ndim != 2 or ring_array.shape[1] != 2 or len(ring_array) == 0:
        raise ParameterError(f"rings must be a non-empty list of (q centre, q width) pairs in nm⁻¹, got {rings!r}.")
    if not np.all(np.isfinite(ring_array)) or np.any(ring_array <= 0):
        raise ParameterError(f"ring centres and widths must be positive and finite (nm⁻¹), got {rings!r}.")
    if polarization not in ("x", "y", "none"):
        raise ParameterError(f"polarization must be 'x', 'y' or 'none', got {polarization!r}.")
    for name, value in (("exclude_radius_px", exclude_radius_px), ("reject_sigma", reject_sigma),
                        ("spot_radius_px", spot_radius_px)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ParameterError(f"{name} must be a finite number ≥ 0, got {value!r}.")
    if not isinstance(rounds, int) or rounds < 1:
        raise ParameterError(f"rounds must be an integer ≥ 1, got {rounds!r}.")
    options = {"polarization": polarization, "fit_distance": bool(fit_distance),
               "exclude_radius_px": float(exclude_radius_px), "reject_sigma": float(reject_sigma),
               "spot_radius_px": float(spot_radius_px), "rounds": rounds}
    return geometry, ring_array, options


def refine_geometry(
    ds: xr.Dataset,
    rings: Sequence[tuple[float, float]],
    initial: Any = None,
    *,
    polarization: str = "x",
    fit_distance: bool = True,
    exclude_radius_px: float = 0.0,
    reject_sigma: float = 4.0,
    spot_radius_px: float = 2.0,
    rounds: int = 3,
    min_ring_snr: float = 10.0,
) -> xr.Dataset:
    """Beam centre, detector tilt and distance of every frame, refined from its background rings.

    Each frame is fitted on its own (see the module docstring for the model), starting from
    ``initial`` — typically a network's prediction (`diffdask.ml.predict` with a
    `GeometryRegressor`), which lands within the fit's basin (about a pixel, a degree, 10 %).

    Parameters
    ----------
    ds : xarray.Dataset
        Frame stack with geometry attrs (pixel size, wavelength, nominal distance and centre).
    rings : sequence of (float, float)
        Centre q₀ and Gaussian width σ of each background ring, nm⁻¹ (q = 4π sinθ/λ);
        e.g. liquid water ≈ (19.6, 2.2).
    initial : Dataset, mapping or DataArray, optional
        Per-frame starting ``beam_center_y``, ``beam_center_x`` (pixels), ``pitch_deg``,
        ``yaw_deg`` (degrees) and optionally ``distance_m``; a `predict` result's
        ``predictions`` array (an ``output`` dimension naming them) works as is. Default:
        the nominal geometry, untilted.
    polarization : {"x", "y", "none"}
        Beam polarisation.
    fit_distance : bool
        Refine the distance (True), or keep the starting one.
    exclude_radius_px : float
        Leave out pixels within this radius of each frame's starting centre (beamstop).
    reject_sigma : float
        Pixels this many standard deviations above the model (Bragg spots) are rejected.
    spot_radius_px : float
        Rejected pixels take their neighbours within this radius with them (spot tails).
    rounds : int
        Reweighting and rejection rounds.
    min_ring_snr : float
        A frame is refined only if a ring's amplitude is this many standard errors.

    Returns
    -------
    xarray.Dataset
        Lazy, on ``frame``: the five `GEOMETRY_FIELDS`, each with an ``*_error`` (one standard
        error from the χ² curvature; NaN if not refined, 0 for a fixed distance),
        ``chi2_reduced``, ``ring_snr`` and ``refined`` (False: the frame keeps its starting
        values). attrs record the parameters.

    Raises
    ------
    SchemaError
        Not a frame stack, or no geometry attrs.
    ParameterError
        Bad rings, options or starting values.
    """
    ds = validate(ds)
    geometry, ring_array, options = _checked(ds, rings, polarization, fit_distance, exclude_radius_px, reject_sigma,
                                             spot_radius_px, rounds)
    if not (isinstance(min_ring_snr, (int, float)) and math.isfinite(min_ring_snr) and min_ring_snr >= 0):
        raise ParameterError(f"min_ring_snr must be a finite number ≥ 0, got {min_ring_snr!r}.")
    options["min_ring_snr"] = float(min_ring_snr)
    start = _starting_values(ds, geometry, initial)
    out = map_frames(
        refine_kernel, ds["frames"].data,
        {"parameters": ((5,), np.float64), "errors": ((5,), np.float64), "chi2_reduced": ((), np.float64),
         "ring_snr": ((), np.float64), "refined": ((), bool)},
        kwargs={"mask": np.asarray(get_mask(ds)), "geometry": geometry, "rings": ring_array, "options": options},
        name="refine-geometry", per_frame={"start": start},
    )
    data: dict[str, Any] = {}
    for j, field in enumerate(GEOMETRY_FIELDS):
        data[field] = ((FRAME_DIMS[0],), out["parameters"][:, j])
        data[f"{field}_error"] = ((FRAME_DIMS[0],), out["errors"][:, j])
    for key in ("chi2_reduced", "ring_snr", "refined"):
        data[key] = ((FRAME_DIMS[0],), out[key])
    attrs = {"refinement": {"rings_q_inv_nm": ring_array.tolist(), **options,
                            "diffdask_version": __version__}}
    return xr.Dataset(data, coords={"frame": ds["frame"]} if "frame" in ds.coords else None, attrs=attrs)


#: Finite-difference steps of the shared fit: centre (pixels), pitch, yaw (radians), distance (× distance).
_RUN_STEPS = np.array([1e-3, 1e-3, 1e-5, 1e-5, 1e-6])


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
    designs = [_design(p, geometry, rings, options["polarization"], everywhere) for p in points]
    anchor = x if reference is None else reference
    ref_design = designs[0] if reference is None else _design(reference, geometry, rings, options["polarization"],
                                                               everywhere)
    yy, xx = np.indices((ny, nx))
    beamstop = (yy - anchor[0]) ** 2 + (xx - anchor[1]) ** 2 <= options["exclude_radius_px"] ** 2
    n_free = int(free.sum())
    out = {"jtj": np.zeros((n_free, n_free)), "jtr": np.zeros(n_free), "chi2": 0.0, "dof": 0.0,
           "tile_chi2": 0.0, "frames": 0.0}
    for image in frames:
        counts = np.where(np.isfinite(image), image, 0.0).astype(np.float64)
        good = mask & np.isfinite(image) & ~beamstop
        floor_image = ndimage.percentile_filter(np.where(mask, counts, 0.0), PREFILTER_PERCENTILE,
                                                size=PREFILTER_SIZE, mode="nearest")
        if reference is None:
            use, target, model = good, floor_image, np.where(good, 1.0, 0.0)
        else:
            use, model = _spot_free_model(ref_design[good.ravel()], counts, floor_image, good,
                                          options["reject_sigma"], options["spot_radius_px"])
            target = counts
        if int(use.sum()) <= designs[0].shape[1] + n_free:
            continue
        rows = use.ravel()
        sqrt_w = 1.0 / np.sqrt(model[use])
        amplitudes, r0 = _project(designs[0][rows], target[use], sqrt_w)
        jac = np.stack([(_project(d[rows], target[use], sqrt_w)[1] - r0) / steps[k]
                        for d, k in zip(designs[1:], np.flatnonzero(free))], axis=1)
        out["jtj"] += jac.T @ jac
        out["jtr"] += jac.T @ r0
        out["chi2"] += float(r0 @ r0)
        out["dof"] += r0.size - designs[0].shape[1]
        out["tile_chi2"] += _tile_chi2(target[use] - designs[0][rows] @ amplitudes, model[use], use)
        out["frames"] += 1
    return out


def refine_run_geometry(
    ds: xr.Dataset,
    rings: Sequence[tuple[float, float]],
    initial: Mapping[str, float] | None = None,
    *,
    polarization: str = "x",
    fit_distance: bool = True,
    exclude_radius_px: float = 0.0,
    reject_sigma: float = 4.0,
    spot_radius_px: float = 2.0,
    rounds: int = 3,
    max_iterations: int = 30,
    progress: Any = None,
) -> xr.Dataset:
    """One beam centre, tilt and distance for a whole run, from the background rings of all frames.

    The detector of a run does not move between frames: fitting every frame with one shared
    geometry (each frame keeps its own ring amplitudes and its own rejected spots) pins the
    geometry √N times better than one frame does — to hundredths of a degree where one frame
    gives tenths. The model, weights and spot rejection are those of `refine_geometry`; the
    fit is Levenberg–Marquardt on the summed normal equations.

    Iterative: each iteration is one pass over the frames (a tree reduction of JᵀJ, Jᵀr and
    χ² over the chunks) and computes a 5×5 system; persist ``ds`` first (``ds.persist()``) if it
    fits in the cluster's memory, else every iteration reads it again.

    Parameters
    ----------
    ds : xarray.Dataset
        Frame stack with geometry attrs.
    rings : sequence of (float, float)
        Centre and Gaussian width σ of each background ring, q in nm⁻¹.
    initial : mapping, optional
        Starting ``beam_center_y``, ``beam_center_x`` (pixels), ``pitch_deg``, ``yaw_deg``
        (degrees) and optionally ``distance_m``; default: the nominal geometry, untilted.
    polarization, fit_distance, exclude_radius_px, reject_sigma, spot_radius_px
        As in `refine_geometry` (the beamstop is excluded around each round's starting centre).
    rounds : int
        Rounds of spot rejection and reweighting (the first fits the spot-blind percentile).
    max_iterations : int
        Most Levenberg–Marquardt steps tried per round.
    progress : callable, optional
        Called as ``progress(iteration, values)`` after each accepted step, values in user units.

    Returns
    -------
    xarray.Dataset
        Scalars: the five `GEOMETRY_FIELDS` and their ``*_error`` (one standard error from the
        summed curvature, inflated by χ² > 1 as in `refine_geometry`), ``chi2_reduced``,
        ``n_frames`` (frames that held enough spot-free pixels) and ``iterations``.

    Raises
    ------
    SchemaError, ParameterError
        As `refine_geometry`; ParameterError also if no frame holds enough usable pixels.
    """
    ds = validate(ds)
    geometry, ring_array, options = _checked(ds, rings, polarization, fit_distance, exclude_radius_px, reject_sigma,
                                             spot_radius_px, rounds)
    del options["rounds"]
    if not isinstance(max_iterations, int) or max_iterations < 1:
        raise ParameterError(f"max_iterations must be an integer ≥ 1, got {max_iterations!r}.")
    start = {"beam_center_y": geometry.beam_center_yx[0], "beam_center_x": geometry.beam_center_yx[1],
             "pitch_deg": 0.0, "yaw_deg": 0.0, "distance_m": geometry.distance_m, **dict(initial or {})}
    unknown = sorted(set(start) - set(GEOMETRY_FIELDS))
    if unknown:
        raise ParameterError(f"initial has unknown entries {unknown}; use {list(GEOMETRY_FIELDS)}.")
    try:
        x = np.array([float(start[f]) for f in GEOMETRY_FIELDS]) * _TO_FIT
    except (TypeError, ValueError):
        raise ParameterError(f"initial values must be numbers (pixels, degrees, metres), got {initial!r}.") from None
    try:
        Geometry(geometry.shape, geometry.pixel_size_m, x[4], geometry.wavelength_m, (x[0], x[1]))
    except GeometryError as exc:
        raise ParameterError(f"initial geometry is not usable: {exc}") from None
    free = np.array([True, True, True, True, bool(fit_distance)])
    frames = ds["frames"].data
    mask = np.asarray(get_mask(ds))

    def sums(at: np.ndarray, reference: np.ndarray | None) -> dict[str, Any]:
        try:
            Geometry(geometry.shape, geometry.pixel_size_m, at[4], geometry.wavelength_m, (at[0], at[1]))
        except GeometryError:
            return {"chi2": np.inf, "dof": 1.0}
        out = reduce_frames(
            run_normal_equations_kernel, frames,
            {"jtj": ((int(free.sum()),) * 2, np.float64), "jtr": ((int(free.sum()),), np.float64),
             "chi2": ((), np.float64), "dof": ((), np.float64), "tile_chi2": ((), np.float64),
             "frames": ((), np.float64)},
            kwargs={"x": at, "reference": reference, "mask": mask, "geometry": geometry, "rings": ring_array,
                    "free": free, "options": options},
            name="refine-run")
        return {k: np.asarray(v) for k, v in zip(out, dask.compute(*out.values()))}

    iterations = 0
    # Rounds as in refine_frame: the spot-blind percentile first, then the counts with spots
    # rejected and weights set at the previous round's geometry.
    for reference_round in range(rounds):
        reference = None if reference_round == 0 else x.copy()
        current = sums(x, reference)
        if current.get("frames", 0) == 0:
            raise ParameterError("no frame holds enough spot-free pixels on the rings; check the rings, mask and "
                                 "exclude_radius_px.")
        damping = 1e-3
        for _ in range(max_iterations):
            a, g = current["jtj"], current["jtr"]
            step = -np.linalg.solve(a + damping * np.diag(np.diag(a)), g)
            trial = x.copy()
            trial[free] += step
            candidate = sums(trial, reference)
            if candidate["chi2"] < current["chi2"]:
                x, current, damping = trial, candidate, damping / 10
                iterations += 1
                if progress is not None:
                    progress(iterations, dict(zip(GEOMETRY_FIELDS, x / _TO_FIT)))
                # Converged when the step is a hundredth of the standard errors.
                if np.all(np.abs(step) < 1e-2 * np.sqrt(np.diag(np.linalg.inv(a)))):
                    break
            else:
                damping *= 10
                if damping > 1e8:
                    break
    chi2 = float(current["chi2"] / current["dof"])
    tile_chi2 = float(current["tile_chi2"] / current["frames"])
    errors = np.zeros(5)
    errors[free] = np.sqrt(np.diag(np.linalg.inv(current["jtj"])) * max(chi2, tile_chi2, 1.0))
    values = x / _TO_FIT
    data: dict[str, Any] = {}
    for j, field in enumerate(GEOMETRY_FIELDS):
        data[field] = values[j]
        data[f"{field}_error"] = errors[j] / _TO_FIT[j]
    data.update(chi2_reduced=chi2, n_frames=int(current["frames"]), iterations=iterations)
    attrs = {"refinement": {"rings_q_inv_nm": ring_array.tolist(), **options, "shared": True,
                            "diffdask_version": __version__}}
    return xr.Dataset({k: ((), v) for k, v in data.items()}, attrs=attrs)
