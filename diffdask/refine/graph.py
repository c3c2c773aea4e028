"""Dask graph builders of the geometry refinement: per frame, and one geometry for a run.

They check the parameters at the door, lay the kernels of `diffdask.refine.kernels` over the
frame stack's chunks and gather the results as Datasets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from diffdask._version import __version__
from diffdask.blocks import map_frames, reduce_frames
from diffdask.checks import check_choice, check_int, check_nonnegative
from diffdask.errors import GeometryError, ParameterError, SchemaError
from diffdask.frames import FRAME_DIMS, CheckedStack, checked
from diffdask.geometry import Geometry
from diffdask.refine.kernels import GEOMETRY_FIELDS, TO_FIT, refine_kernel, run_normal_equations_kernel
from diffdask.refine.model import geometry_at


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


def _checked(stack: CheckedStack, rings: Any, polarization: str, fit_distance: bool, exclude_radius_px: float,
             reject_sigma: float, spot_radius_px: float, rounds: int) -> tuple[Geometry, np.ndarray, dict[str, Any]]:
    # The checks every refinement makes at the door; returns the geometry, rings and options.
    geometry = stack.geometry
    if geometry is None:
        raise SchemaError("geometry refinement needs the detector's nominal geometry in the dataset attrs "
                          "(wavelength_m, distance_m, pixel_size_m, beam_center_yx).")
    ring_array = np.asarray(rings, dtype=float)
    if ring_array.ndim != 2 or ring_array.shape[1] != 2 or len(ring_array) == 0:
        raise ParameterError(f"rings must be a non-empty list of (q centre, q width) pairs in nm⁻¹, got {rings!r}.")
    if not np.all(np.isfinite(ring_array)) or np.any(ring_array <= 0):
        raise ParameterError(f"ring centres and widths must be positive and finite (nm⁻¹), got {rings!r}.")
    options = {"polarization": check_choice("polarization", polarization, ("x", "y", "none")),
               "fit_distance": bool(fit_distance),
               "exclude_radius_px": check_nonnegative("exclude_radius_px", exclude_radius_px, "pixels"),
               "reject_sigma": check_nonnegative("reject_sigma", reject_sigma, "standard deviations"),
               "spot_radius_px": check_nonnegative("spot_radius_px", spot_radius_px, "pixels"),
               "rounds": check_int("rounds", rounds, minimum=1)}
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
    stack = checked(ds)
    ds = stack.ds
    geometry, ring_array, options = _checked(stack, rings, polarization, fit_distance, exclude_radius_px, reject_sigma,
                                             spot_radius_px, rounds)
    options["min_ring_snr"] = check_nonnegative("min_ring_snr", min_ring_snr, "standard errors")
    start = _starting_values(ds, geometry, initial)
    out = map_frames(
        refine_kernel, stack.frames,
        {"parameters": ((5,), np.float64), "errors": ((5,), np.float64), "chi2_reduced": ((), np.float64),
         "ring_snr": ((), np.float64), "refined": ((), bool)},
        kwargs={"mask": stack.mask, "geometry": geometry, "rings": ring_array, "options": options},
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
    stack = checked(ds)
    ds = stack.ds
    geometry, ring_array, options = _checked(stack, rings, polarization, fit_distance, exclude_radius_px, reject_sigma,
                                             spot_radius_px, rounds)
    rounds = options.pop("rounds")
    max_iterations = check_int("max_iterations", max_iterations, minimum=1)
    start = {"beam_center_y": geometry.beam_center_yx[0], "beam_center_x": geometry.beam_center_yx[1],
             "pitch_deg": 0.0, "yaw_deg": 0.0, "distance_m": geometry.distance_m, **dict(initial or {})}
    unknown = sorted(set(start) - set(GEOMETRY_FIELDS))
    if unknown:
        raise ParameterError(f"initial has unknown entries {unknown}; use {list(GEOMETRY_FIELDS)}.")
    try:
        x = np.array([float(start[f]) for f in GEOMETRY_FIELDS]) * TO_FIT
    except (TypeError, ValueError):
        raise ParameterError(f"initial values must be numbers (pixels, degrees, metres), got {initial!r}.") from None
    try:
        geometry_at(geometry, x)
    except GeometryError as exc:
        raise ParameterError(f"initial geometry is not usable: {exc}") from None
    free = np.array([True, True, True, True, bool(fit_distance)])
    frames, mask = stack.frames, stack.mask

    def sums(at: np.ndarray, reference: np.ndarray | None) -> dict[str, Any]:
        try:
            geometry_at(geometry, at)
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
                    progress(iterations, dict(zip(GEOMETRY_FIELDS, x / TO_FIT)))
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
    values = x / TO_FIT
    data: dict[str, Any] = {}
    for j, field in enumerate(GEOMETRY_FIELDS):
        data[field] = values[j]
        data[f"{field}_error"] = errors[j] / TO_FIT[j]
    data.update(chi2_reduced=chi2, n_frames=int(current["frames"]), iterations=iterations)
    attrs = {"refinement": {"rings_q_inv_nm": ring_array.tolist(), **options, "shared": True,
                            "diffdask_version": __version__}}
    return xr.Dataset({k: ((), v) for k, v in data.items()}, attrs=attrs)
