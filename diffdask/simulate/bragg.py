"""Crystallography still images: Bragg spots of randomly oriented crystals on a tilted detector.

For each frame a unit cell (a, b, c, α, β, γ) and an orientation R are drawn; reciprocal
lattice points s_hkl = R B (h, k, l) (B = (A⁻¹)ᵀ, A the cell's column matrix) near the
Ewald sphere light up with partiality exp(−e²/2w²), where e = |s + ẑ/λ| − 1/λ is the
excitation error and w = |s| η + 1/L the width from the mosaic spread η and the domain size
L. A spot's photons are N₀ exp(−B|s|²/2) X P, with X ~ Exp(1) (Wilson statistics of
acentric reflections), B the Debye–Waller factor and P the polarisation factor; it lands
where the diffracted ray s + ẑ/λ meets the detector, spread by a Gaussian point-spread.

The detector of each frame has its own beam centre, pitch, yaw and distance (the labels);
the background holds diffuse rings of water (d ≈ 3.2 Å) and of a polymer/air path
(d ≈ 4.8 Å) modelled as Gaussian peaks in |s| times P ΔΩ; fixed hot and dead pixels and a
beamstop shadow at the frame's beam centre complete the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from diffdask._version import __version__
from diffdask.blocks import generate_frames
from diffdask.checks import (
    check_choice,
    check_fraction,
    check_nonnegative,
    check_positive,
    check_range,
    check_seed,
)
from diffdask.errors import ParameterError
from diffdask.frames import FRAME_DIMS, MASK_DIMS, frames_per_chunk, validate
from diffdask.geometry import Geometry, ray_polarization_factor
from diffdask.simulate.common import (
    STREAM_DETECTOR,
    STREAM_NOISE,
    STREAM_PARAMETERS,
    frame_rng,
    quaternion_to_matrix,
    random_quaternion,
)

VARIANTS = ("standard", "flat", "binary")
#: Centres (nm⁻¹, = 1/d) and widths of the diffuse background rings: liquid water's first
#: peak at d ≈ 3.2 Å and the amorphous polymer/air-path peak at d ≈ 4.8 Å.
WATER_RING = (1.0 / 0.32, 0.35)
PLASTIC_RING = (1.0 / 0.48, 0.25)
#: Spots are drawn out to this many point-spread σ from their centre.
SPOT_RADIUS_SIGMA = 4.0
#: Reflections below this partiality are skipped.
MIN_PARTIALITY = 1e-4
#: Value of hot pixels (a saturated 16-bit readout).
HOT_PIXEL_VALUE = 65535.0


def cell_matrix(lengths_nm: Any, angles_deg: Any) -> np.ndarray:
    """Real-space cell as columns a, b, c (nm), a along x and b in the xy plane.

    Raises
    ------
    ParameterError
        If the angles give no cell (non-positive volume).
    """
    a, b, c = (float(v) for v in lengths_nm)
    al, be, ga = (math.radians(float(v)) for v in angles_deg)
    cx = math.cos(be)
    cy = (math.cos(al) - math.cos(be) * math.cos(ga)) / math.sin(ga)
    cz2 = 1.0 - cx**2 - cy**2
    if cz2 <= 0:
        raise ParameterError(f"cell angles {tuple(angles_deg)}° make no unit cell (zero or negative volume).")
    return np.array(
        [[a, b * math.cos(ga), c * cx], [0.0, b * math.sin(ga), c * cy], [0.0, 0.0, c * math.sqrt(cz2)]]
    )


@dataclass(frozen=True)
class BraggModel:
    """Ranges and settings of the Bragg simulator (picklable, hashable by Dask)."""

    cell_lengths_nm: tuple[float, float]
    cell_angles_deg: tuple[float, float]
    mosaicity_rad: float
    domain_size_nm: float
    b_factor_nm2: float
    spot_photons: float
    spot_sigma_px: float
    beam_center_jitter_px: float
    max_tilt_rad: float
    fixed_tilt_rad: tuple[float, float] | None
    distance_range_m: tuple[float, float]
    water_photons: float
    plastic_photons: float
    flat_photons: float
    beamstop_radius_px: float
    variant: str
    binary_threshold_photons: float
    noise: bool
    polarization: str
    seed: int


def _frame_parameters(model: BraggModel, geometry: Geometry, frame: int) -> dict[str, Any]:
    rng = frame_rng(model.seed, STREAM_PARAMETERS, frame)
    lengths = rng.uniform(*model.cell_lengths_nm, size=3)
    angles = rng.uniform(*model.cell_angles_deg, size=3)
    quat = random_quaternion(rng)
    cy, cx = geometry.beam_center_yx
    j = model.beam_center_jitter_px
    center = (cy + rng.uniform(-j, j), cx + rng.uniform(-j, j))
    ny, nx = geometry.shape
    center = (float(np.clip(center[0], -0.5, ny - 0.5)), float(np.clip(center[1], -0.5, nx - 0.5)))
    pitch, yaw = rng.uniform(-model.max_tilt_rad, model.max_tilt_rad, size=2)
    if model.fixed_tilt_rad is not None:  # drawn all the same, so every other draw stays put
        pitch, yaw = model.fixed_tilt_rad
    distance = rng.uniform(*model.distance_range_m)
    water, plastic = rng.uniform(0.5, 1.5, size=2)
    return {
        "lengths": lengths,
        "angles": angles,
        "quaternion": quat,
        "center": center,
        "pitch": float(pitch),
        "yaw": float(yaw),
        "distance": float(distance),
        "water": float(water),
        "plastic": float(plastic),
        # The same generator then draws the reflections' Wilson intensities, whose number
        # is known only once the reflections are found.
        "rng": rng,
    }


def bragg_reflections(
    cell: np.ndarray, rotation: np.ndarray, wavelength_nm: float, s_max_inv_nm: float, width: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reflections near the Ewald sphere.

    Parameters
    ----------
    cell : ndarray, shape (3, 3)
        Real-space cell columns a, b, c (nm).
    rotation : ndarray, shape (3, 3)
        Crystal orientation (active rotation).
    wavelength_nm : float
        Wavelength, nm.
    s_max_inv_nm : float
        Largest |s| to consider, nm⁻¹.
    width : (float, float)
        Mosaic spread η (rad) and inverse domain size 1/L (nm⁻¹): w = |s| η + 1/L.

    Returns
    -------
    hkl : ndarray of int, shape (n, 3)
    s : ndarray, shape (n, 3)
        Laboratory scattering vectors of the reflections, nm⁻¹.
    partiality : ndarray, shape (n,)
        exp(−e²/2w²) of each reflection (≥ `MIN_PARTIALITY`).
    """
    recip = rotation @ np.linalg.inv(cell).T  # columns a*, b*, c* in the laboratory
    radius = 1.0 / wavelength_nm
    k_in = np.array([0.0, 0.0, radius])
    # Partiality ≥ MIN_PARTIALITY needs |e| ≤ δ = √(2 ln(1/MIN_PARTIALITY)) w_max: keep the
    # lattice points in the shell R − δ ≤ |s + k_in| ≤ R + δ. For each (h, k) the points
    # p + l c* lie on a line; the shell cuts it in at most two l-intervals (quadratics), so
    # only points near the Ewald sphere are ever generated.
    delta = math.sqrt(2.0 * math.log(1.0 / MIN_PARTIALITY)) * (s_max_inv_nm * width[0] + width[1])
    h_max = np.ceil(s_max_inv_nm * np.linalg.norm(cell, axis=0)).astype(int)
    hh, kk = np.meshgrid(np.arange(-h_max[0], h_max[0] + 1), np.arange(-h_max[1], h_max[1] + 1), indexing="ij")
    hh, kk = hh.ravel(), kk.ravel()
    p = hh[:, None] * recip[:, 0] + kk[:, None] * recip[:, 1] + k_in
    d = recip[:, 2]
    qa = d @ d
    qb = 2.0 * p @ d
    pp = np.einsum("ij,ij->i", p, p)

    def roots(r: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        disc = qb**2 - 4.0 * qa * (pp - r * r)
        root = np.sqrt(np.maximum(disc, 0.0))
        return disc >= 0, (-qb - root) / (2.0 * qa), (-qb + root) / (2.0 * qa)

    hit_out, l1, l2 = roots(radius + delta)
    hit_in, l3, l4 = roots(max(radius - delta, 0.0))
    # Integer l in [l1, l2] minus the open interval (l3, l4) of the inner sphere.
    lo = np.ceil(l1).astype(int)
    hi = np.floor(l2).astype(int)
    mid_hi = np.where(hit_in, np.floor(l3).astype(int), hi)
    mid_lo = np.where(hit_in, np.ceil(l4).astype(int), hi + 1)
    segments = [(lo, np.minimum(mid_hi, hi)), (np.maximum(mid_lo, lo), hi)]
    pieces_hk, pieces_l = [], []
    for start, stop in segments:
        count = np.where(hit_out, np.maximum(stop - start + 1, 0), 0)
        owner = np.repeat(np.arange(hh.size), count)
        offset = np.arange(owner.size) - np.repeat(np.cumsum(count) - count, count)
        pieces_hk.append(owner)
        pieces_l.append(start[owner] + offset)
    owner = np.concatenate(pieces_hk)
    hkl = np.stack([hh[owner], kk[owner], np.concatenate(pieces_l)], axis=1)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    s = hkl @ recip.T
    s_len = np.linalg.norm(s, axis=1)
    excitation = np.linalg.norm(s + k_in, axis=1) - radius
    w = s_len * width[0] + width[1]
    partiality = np.exp(-0.5 * (excitation / w) ** 2)
    keep = (partiality >= MIN_PARTIALITY) & (s_len <= s_max_inv_nm)
    return hkl[keep], s[keep], partiality[keep]


def _render_spots(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, photons: np.ndarray, sigma: float) -> np.ndarray:
    # A Gaussian point-spread of integral `photons`, sampled at pixel centres in a window.
    ny, nx = shape
    half = int(math.ceil(SPOT_RADIUS_SIGMA * sigma))
    offsets = np.arange(-half, half + 1)
    r0 = np.round(rows).astype(int)[:, None, None] + offsets[None, :, None]
    c0 = np.round(cols).astype(int)[:, None, None] + offsets[None, None, :]
    r0, c0 = np.broadcast_arrays(r0, c0)
    weight = np.exp(-((r0 - rows[:, None, None]) ** 2 + (c0 - cols[:, None, None]) ** 2) / (2 * sigma**2))
    weight *= (photons / (2 * math.pi * sigma**2))[:, None, None]
    inside = (r0 >= 0) & (r0 < ny) & (c0 >= 0) & (c0 < nx)
    # bincount sums in input order: fast and the same bytes every time.
    return np.bincount((r0 * nx + c0)[inside], weights=weight[inside], minlength=ny * nx).reshape(shape)


def bragg_kernel(start: int, stop: int, *, model: BraggModel, geometry: Geometry, hot: np.ndarray, dead: np.ndarray) -> dict[str, np.ndarray]:
    """Simulate Bragg frames ``start, ..., stop − 1`` (a `generate_frames` kernel).

    Parameters
    ----------
    start, stop : int
        Global frame range.
    model : BraggModel
        Crystal, detector-variation and background settings.
    geometry : Geometry
        Nominal detector (shape, pixel size, wavelength, nominal beam centre and distance).
    hot, dead : ndarray of bool, shape (ny, nx)
        Fixed hot and dead pixels of the detector.

    Returns
    -------
    dict
        ``frames`` (n, ny, nx) float32 and the per-frame labels.
    """
    n = stop - start
    ny, nx = geometry.shape
    lam_nm = geometry.wavelength_m * 1e9
    frames = np.empty((n, ny, nx), dtype=np.float32)
    labels = {k: np.empty(n) for k in ("beam_center_y", "beam_center_x", "pitch_deg", "yaw_deg", "distance_m")}
    quats = np.empty((n, 4))
    cells = np.empty((n, 6))
    n_spots = np.empty(n, dtype=np.int32)
    for i in range(n):
        par = _frame_parameters(model, geometry, start + i)
        g = Geometry(geometry.shape, geometry.pixel_size_m, par["distance"], geometry.wavelength_m, par["center"])
        maps = g.tilted_maps(par["pitch"], par["yaw"], model.polarization)
        s_len = np.sqrt((maps["scattering_vectors_inv_nm"] ** 2).sum(axis=0))
        cell = cell_matrix(par["lengths"], par["angles"])
        rot = quaternion_to_matrix(par["quaternion"])
        hkl, s, partiality = bragg_reflections(
            cell, rot, lam_nm, float(s_len.max()), (model.mosaicity_rad, 1.0 / model.domain_size_nm)
        )
        s_abs = np.linalg.norm(s, axis=1)
        wilson = par["rng"].exponential(1.0, size=len(hkl))
        k_out = s + np.array([0.0, 0.0, 1.0 / lam_nm])
        rows, cols = g.project_directions(k_out.T, par["pitch"], par["yaw"])
        p_spot = ray_polarization_factor((k_out / np.linalg.norm(k_out, axis=1, keepdims=True)).T, model.polarization)
        photons = model.spot_photons * np.exp(-0.5 * model.b_factor_nm2 * s_abs**2) * wilson * partiality * p_spot
        margin = SPOT_RADIUS_SIGMA * model.spot_sigma_px + 1
        on = np.isfinite(rows) & (rows > -margin) & (rows < ny - 1 + margin) & (cols > -margin) & (cols < nx - 1 + margin)
        spots = _render_spots((ny, nx), rows[on], cols[on], photons[on], model.spot_sigma_px)
        n_spots[i] = int(np.count_nonzero(on & (photons >= model.binary_threshold_photons)))
        if model.variant == "binary":
            image = (spots >= model.binary_threshold_photons).astype(np.float64)
        else:
            # Diffuse rings scale with P ΔΩ; normalised to the detector's largest ΔΩ so that
            # *_photons is the ring's peak photons per pixel at the detector's centre.
            weight = maps["polarization_factor"] * maps["solid_angle_sr"] / maps["solid_angle_sr"].max()
            if model.variant == "flat":
                background = np.full((ny, nx), model.flat_photons)
            else:
                water = model.water_photons * par["water"] * np.exp(-0.5 * ((s_len - WATER_RING[0]) / WATER_RING[1]) ** 2)
                plastic = model.plastic_photons * par["plastic"] * np.exp(
                    -0.5 * ((s_len - PLASTIC_RING[0]) / PLASTIC_RING[1]) ** 2
                )
                background = (water + plastic) * weight
            mu = spots + background
            image = frame_rng(model.seed, STREAM_NOISE, start + i).poisson(mu).astype(np.float64) if model.noise else mu
            image[hot] = HOT_PIXEL_VALUE
            image[dead] = 0.0
        if model.beamstop_radius_px > 0:
            image[g.radius_px <= model.beamstop_radius_px] = 0.0
        frames[i] = image
        labels["beam_center_y"][i], labels["beam_center_x"][i] = par["center"]
        labels["pitch_deg"][i] = math.degrees(par["pitch"])
        labels["yaw_deg"][i] = math.degrees(par["yaw"])
        labels["distance_m"][i] = par["distance"]
        quats[i] = par["quaternion"]
        cells[i, :3], cells[i, 3:] = par["lengths"], par["angles"]
    return {"frames": frames, **labels, "orientation": quats, "cell": cells, "n_spots": n_spots}


def _fixed_tilt(tilt_deg: Any) -> tuple[float, float] | None:
    if tilt_deg is None:
        return None
    try:
        pitch, yaw = (float(v) for v in tilt_deg)
    except (TypeError, ValueError):
        raise ParameterError(f"tilt_deg must be a (pitch, yaw) pair in degrees, got {tilt_deg!r}.") from None
    if not all(math.isfinite(v) and abs(v) < 45 for v in (pitch, yaw)):
        raise ParameterError(f"tilt_deg angles must be finite and within ±45°, got {tilt_deg!r}.")
    return math.radians(pitch), math.radians(yaw)


def simulate_bragg(
    n_frames: int,
    geometry: Geometry,
    cell_lengths_nm: float | tuple[float, float] = (4.0, 10.0),
    cell_angles_deg: float | tuple[float, float] = (80.0, 100.0),
    mosaicity_deg: float = 0.1,
    domain_size_nm: float = 200.0,
    b_factor_nm2: float = 0.3,
    spot_photons: float = 2000.0,
    spot_sigma_px: float = 0.8,
    beam_center_jitter_px: float = 10.0,
    max_tilt_deg: float = 3.0,
    tilt_deg: tuple[float, float] | None = None,
    distance_m: float | tuple[float, float] | None = None,
    water_photons: float = 20.0,
    plastic_photons: float = 5.0,
    flat_photons: float = 5.0,
    hot_pixel_fraction: float = 1e-4,
    dead_pixel_fraction: float = 1e-4,
    beamstop_radius_px: float = 6.0,
    variant: str = "standard",
    binary_threshold_photons: float = 20.0,
    noise: bool = True,
    polarization: str = "x",
    seed: int = 0,
    chunks: int | None = None,
) -> xr.Dataset:
    """A lazy stack of simulated crystallography still images with geometry labels.

    Parameters
    ----------
    n_frames : int
        Number of images.
    geometry : Geometry
        Nominal detector: shape, pixel size, wavelength, nominal beam centre and distance.
    cell_lengths_nm, cell_angles_deg : float or (float, float)
        Each of a, b, c (nm) and α, β, γ (degrees) is drawn uniformly per frame from these.
    mosaicity_deg : float
        Mosaic spread η, degrees (≥ 0).
    domain_size_nm : float
        Coherent domain size L, nm; together with η sets the reflection width.
    b_factor_nm2 : float
        Debye–Waller B, nm² (0.3 nm² = 30 Å²).
    spot_photons : float
        Mean photons of a fully excited reflection at |s| → 0.
    spot_sigma_px : float
        Gaussian point-spread of a spot, pixels.
    beam_center_jitter_px : float
        Beam centre drawn uniformly within ± this of the nominal one (per axis), pixels.
    max_tilt_deg : float
        Pitch and yaw drawn uniformly within ± this, degrees.
    tilt_deg : (float, float), optional
        One (pitch, yaw) for every frame, degrees (a run with a fixed detector; with
        ``beam_center_jitter_px=0`` and a single ``distance_m`` the whole geometry is fixed).
    distance_m : float or (float, float), optional
        Detector distance range, metres; defaults to ±10 % of ``geometry.distance_m``.
    water_photons, plastic_photons : float
        Peak photons per pixel of the water and polymer background rings (each scaled per
        frame by a factor drawn in [0.5, 1.5]).
    flat_photons : float
        Photons per pixel of the ``"flat"`` variant's uniform background.
    hot_pixel_fraction, dead_pixel_fraction : float
        Fractions in [0, 1] of fixed hot (saturated) and dead (zero) pixels, masked.
    beamstop_radius_px : float
        Radius of the beamstop shadow around each frame's beam centre (0 for none).
    variant : {"standard", "flat", "binary"}
        Background rings, a flat background, or binary spot images (1 where a spot gives at
        least ``binary_threshold_photons`` per pixel, no noise or background).
    binary_threshold_photons : float
        Threshold of the binary variant, photons per pixel; also sets which spots ``n_spots``
        counts.
    noise : bool
        Poisson counts (ignored by the binary variant).
    polarization : {"x", "y", "none"}
        Beam polarisation.
    seed : int
        Seed of every random choice; frame f uses generators keyed by (seed, f).
    chunks : int, optional
        Frames per Dask chunk.

    Returns
    -------
    xarray.Dataset
        ``frames`` float32, ``mask`` (hot and dead pixels False), labels ``beam_center_y``,
        ``beam_center_x`` (pixels), ``pitch_deg``, ``yaw_deg``, ``distance_m``, and the
        ground truth ``orientation`` (quaternion), ``cell`` (a, b, c in nm, α, β, γ in
        degrees) and ``n_spots``.
    """
    if not isinstance(geometry, Geometry):
        raise ParameterError(f"geometry must be a diffdask.Geometry, got {type(geometry).__name__}.")
    seed = check_seed(seed)
    variant = check_choice("variant", variant, VARIANTS)
    polarization = check_choice("polarization", polarization, ("x", "y", "none"))
    dist = (0.9 * geometry.distance_m, 1.1 * geometry.distance_m) if distance_m is None else check_range("distance_m", distance_m, "m")
    angles = check_range("cell_angles_deg", cell_angles_deg, "degrees")
    if angles[0] <= 0 or angles[1] >= 180:
        raise ParameterError(f"cell angles must lie in (0°, 180°), got {cell_angles_deg!r}.")
    tilt = check_nonnegative("max_tilt_deg", max_tilt_deg, "degrees")
    if tilt >= 45:
        raise ParameterError(f"max_tilt_deg must be below 45°, got {max_tilt_deg!r}.")
    model = BraggModel(
        cell_lengths_nm=check_range("cell_lengths_nm", cell_lengths_nm, "nm"),
        cell_angles_deg=angles,
        mosaicity_rad=math.radians(check_nonnegative("mosaicity_deg", mosaicity_deg, "degrees")),
        domain_size_nm=check_positive("domain_size_nm", domain_size_nm, "nm"),
        b_factor_nm2=check_nonnegative("b_factor_nm2", b_factor_nm2, "nm²"),
        spot_photons=check_positive("spot_photons", spot_photons, "photons"),
        spot_sigma_px=check_positive("spot_sigma_px", spot_sigma_px, "pixels"),
        beam_center_jitter_px=check_nonnegative("beam_center_jitter_px", beam_center_jitter_px, "pixels"),
        max_tilt_rad=math.radians(tilt),
        fixed_tilt_rad=_fixed_tilt(tilt_deg),
        distance_range_m=dist,
        water_photons=check_nonnegative("water_photons", water_photons, "photons"),
        plastic_photons=check_nonnegative("plastic_photons", plastic_photons, "photons"),
        flat_photons=check_nonnegative("flat_photons", flat_photons, "photons"),
        beamstop_radius_px=check_nonnegative("beamstop_radius_px", beamstop_radius_px, "pixels"),
        variant=variant,
        binary_threshold_photons=check_positive("binary_threshold_photons", binary_threshold_photons, "photons"),
        noise=bool(noise),
        polarization=polarization,
        seed=seed,
    )
    hot_frac = check_fraction("hot_pixel_fraction", hot_pixel_fraction)
    dead_frac = check_fraction("dead_pixel_fraction", dead_pixel_fraction)
    # Hot and dead pixels belong to the detector, not to a frame: one draw for the whole run.
    rng = frame_rng(seed, STREAM_DETECTOR, 0)
    draw = rng.random(geometry.shape)
    hot = draw < hot_frac
    dead = (draw >= hot_frac) & (draw < hot_frac + dead_frac)
    if variant == "binary":
        hot[:] = dead[:] = False
    shape = tuple(geometry.shape)
    n_chunk = int(chunks) if chunks is not None else min(frames_per_chunk(shape, np.float32), 64)
    outputs = {
        "frames": (shape, np.float32),
        "beam_center_y": ((), np.float64),
        "beam_center_x": ((), np.float64),
        "pitch_deg": ((), np.float64),
        "yaw_deg": ((), np.float64),
        "distance_m": ((), np.float64),
        "orientation": ((4,), np.float64),
        "cell": ((6,), np.float64),
        "n_spots": ((), np.int32),
    }
    arrays = generate_frames(
        bragg_kernel, n_frames, n_chunk, outputs, {"model": model, "geometry": geometry, "hot": hot, "dead": dead},
        name="simulate-bragg",
    )
    data: dict[str, Any] = {"frames": (FRAME_DIMS, arrays["frames"]), "mask": (MASK_DIMS, ~(hot | dead))}
    for name in ("beam_center_y", "beam_center_x", "pitch_deg", "yaw_deg", "distance_m", "n_spots"):
        data[name] = (("frame",), arrays[name])
    data["orientation"] = (("frame", "quaternion"), arrays["orientation"])
    data["cell"] = (("frame", "cell_parameter"), arrays["cell"])
    attrs = {
        **geometry.to_attrs(),
        "units": "binary" if variant == "binary" else "photons",
        "simulation": {
            "simulator": "bragg",
            "diffdask_version": __version__,
            "seed": seed,
            "cell_lengths_nm": list(model.cell_lengths_nm),
            "cell_angles_deg": list(model.cell_angles_deg),
            "mosaicity_deg": float(mosaicity_deg),
            "domain_size_nm": model.domain_size_nm,
            "b_factor_nm2": model.b_factor_nm2,
            "spot_photons": model.spot_photons,
            "spot_sigma_px": model.spot_sigma_px,
            "beam_center_jitter_px": model.beam_center_jitter_px,
            "max_tilt_deg": tilt,
            "tilt_deg": None if tilt_deg is None else [float(v) for v in tilt_deg],
            "distance_range_m": list(dist),
            "water_photons": model.water_photons,
            "plastic_photons": model.plastic_photons,
            "flat_photons": model.flat_photons,
            "hot_pixel_fraction": hot_frac,
            "dead_pixel_fraction": dead_frac,
            "beamstop_radius_px": model.beamstop_radius_px,
            "variant": variant,
            "binary_threshold_photons": model.binary_threshold_photons,
            "noise": model.noise,
            "polarization": polarization,
        },
    }
    return validate(xr.Dataset(data, attrs=attrs))
