"""Ptychography scans: a focused probe stepped over a phase-and-absorption phantom.

The sample is a set of ellipsoidal particles ("cells", each with a denser nucleus) on an
empty background. Its transmission in the projection approximation is

    T(x, y) = exp(−(2π/λ) (β + iδ) t(x, y)),

t the projected thickness and n = 1 − δ + iβ the refractive index of the material. At scan
position r_k the far-field intensity on a detector of N pixels of pitch p at distance D is

    I_k(u) = |FFT[P(r) T(r + r_k)]|²,

sampled in the object plane at dx = λD/(N p) (small-angle Fraunhofer diffraction), with the
zero frequency on pixel N//2. The probe P is normalised to the frame's photon count, so Σ I
is the transmitted photons (Parseval); a fly scan averages sub-exposures along its line.
The phantom is analytic, so each chunk evaluates only the patches it needs: a scan of any
length never holds the whole object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
from scipy.special import j1

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
from diffdask.geometry import Geometry
from diffdask.simulate.common import (
    STREAM_DETECTOR,
    STREAM_NOISE,
    STREAM_PARAMETERS,
    frame_rng,
)

PROBES = ("airy", "gaussian", "aperture")
SCANS = ("raster", "fly")
#: Root of J1 that makes the Airy disc's first dark ring, 2π k_c r₀ = 3.8317.
AIRY_FIRST_ZERO = 3.831705970207512
#: Nucleus of a cell: size and extra density relative to the cell.
NUCLEUS_SCALE = 0.4
NUCLEUS_EXTRA_DENSITY = 0.5
#: Attempts at placing a particle without overlapping the others.
PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class PtychoSample:
    """An analytic phantom: ellipsoidal cells with nuclei on an empty background.

    Attributes
    ----------
    centers_m : ndarray, shape (k, 2)
        Particle centres (y, x), metres.
    semi_axes_m : ndarray, shape (k, 3)
        In-plane semi-axes (a, b) and half-thickness c along the beam, metres.
    angles_rad : ndarray, shape (k,)
        In-plane rotation of each particle's a-axis from +x, radians.
    densities : ndarray, shape (k,)
        Relative density of each particle (scales δ and β).
    delta, beta : float
        Refractive-index decrements of the material at unit density.
    wavelength_m : float
        X-ray wavelength, metres.
    """

    centers_m: np.ndarray
    semi_axes_m: np.ndarray
    angles_rad: np.ndarray
    densities: np.ndarray
    delta: float
    beta: float
    wavelength_m: float

    def thickness(self, y_m: np.ndarray, x_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Density-weighted projected thickness (metres) and footprint on a grid.

        Parameters
        ----------
        y_m, x_m : ndarray
            Broadcastable coordinates, metres.

        Returns
        -------
        thickness : ndarray
            Σ_k ρ_k t_k(y, x), metres of unit-density material.
        footprint : ndarray of bool
            True where any particle is.
        """
        y, x = np.broadcast_arrays(np.asarray(y_m, dtype=float), np.asarray(x_m, dtype=float))
        total = np.zeros(y.shape)
        footprint = np.zeros(y.shape, dtype=bool)
        if y.size == 0:
            return total, footprint
        y_lo, y_hi, x_lo, x_hi = y.min(), y.max(), x.min(), x.max()
        reach = self.semi_axes_m[:, :2].max(axis=1) if len(self.densities) else np.zeros(0)
        cy_all, cx_all = self.centers_m[:, 0], self.centers_m[:, 1]
        # Only particles whose bounding square meets the grid's: a patch sees a handful.
        near = np.flatnonzero(
            (cy_all + reach >= y_lo) & (cy_all - reach <= y_hi) & (cx_all + reach >= x_lo) & (cx_all - reach <= x_hi)
        )
        for i in near:
            (cy, cx), (a, b, c), angle, rho = self.centers_m[i], self.semi_axes_m[i], self.angles_rad[i], self.densities[i]
            cos, sin = math.cos(angle), math.sin(angle)
            dx, dy = x - cx, y - cy
            u, v = dx * cos + dy * sin, -dx * sin + dy * cos
            for scale, density in ((1.0, rho), (NUCLEUS_SCALE, rho * NUCLEUS_EXTRA_DENSITY)):
                # Chord of an ellipsoid: 2c √(1 − (u/a)² − (v/b)²).
                q = 1.0 - (u / (a * scale)) ** 2 - (v / (b * scale)) ** 2
                inside = q > 0
                total[inside] += density * 2.0 * c * scale * np.sqrt(q[inside])
                if scale == 1.0:
                    footprint |= inside
        return total, footprint

    def transmission(self, y_m: np.ndarray, x_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Complex transmission T = exp(−(2π/λ)(β + iδ)t) and footprint on a grid."""
        t, footprint = self.thickness(y_m, x_m)
        k = 2.0 * math.pi / self.wavelength_m
        return np.exp(-k * (self.beta + 1j * self.delta) * t), footprint


def make_sample(
    extent_m: tuple[float, float],
    particle_diameter_m: tuple[float, float],
    coverage: float,
    aspect: tuple[float, float],
    delta: float,
    beta: float,
    wavelength_m: float,
    seed: int,
) -> PtychoSample:
    """Place non-overlapping cells over a rectangle centred on the origin.

    Parameters
    ----------
    extent_m : (float, float)
        Height and width of the region, metres.
    particle_diameter_m : (float, float)
        Range of in-plane diameters (long axis), metres.
    coverage : float
        Fraction of the region the cells aim to cover, in [0, 1).
    aspect : (float, float)
        Range of the short/long in-plane axis ratio.
    delta, beta : float
        Refractive-index decrements of the material.
    wavelength_m : float
        Wavelength, metres.
    seed : int
        Seed; the sample depends on nothing else.
    """
    rng = frame_rng(seed, STREAM_DETECTOR, 0)
    height, width = extent_m
    mean_area = math.pi / 4 * np.mean(particle_diameter_m) ** 2 * np.mean(aspect)
    target = int(round(coverage * height * width / mean_area))
    centers, axes, angles, dens = [], [], [], []
    for _ in range(target):
        for _ in range(PLACEMENT_TRIES):
            d = rng.uniform(*particle_diameter_m)
            a, b = d / 2, d / 2 * rng.uniform(*aspect)
            # Half-thickness between the two in-plane semi-axes: cells are flattened.
            c = rng.uniform(b, a) / 2 if a > b else a / 2
            if height < 2 * a or width < 2 * a:
                break
            cy = rng.uniform(-height / 2 + a, height / 2 - a)
            cx = rng.uniform(-width / 2 + a, width / 2 - a)
            if all(math.hypot(cy - p[0], cx - p[1]) >= a + q[0] for p, q in zip(centers, axes)):
                centers.append((cy, cx))
                axes.append((a, b, c))
                angles.append(rng.uniform(0, math.pi))
                dens.append(rng.uniform(0.6, 1.4))
                break
    return PtychoSample(
        centers_m=np.array(centers, dtype=float).reshape(-1, 2),
        semi_axes_m=np.array(axes, dtype=float).reshape(-1, 3),
        angles_rad=np.array(angles, dtype=float),
        densities=np.array(dens, dtype=float),
        delta=float(delta),
        beta=float(beta),
        wavelength_m=float(wavelength_m),
    )


def make_probe(
    shape: tuple[int, int], pixel_m: tuple[float, float], kind: str, diameter_m: float, defocus_m: float, wavelength_m: float
) -> np.ndarray:
    """A probe on the object-plane grid, normalised to Σ|P|² = 1.

    Parameters
    ----------
    shape : (int, int)
        Grid (detector) shape.
    pixel_m : (float, float)
        Object-plane pixel (y, x), metres.
    kind : {"airy", "gaussian", "aperture"}
        ``"airy"``: focus of a circular lens, first dark ring at ``diameter_m``/2;
        ``"gaussian"``: Gaussian beam with intensity FWHM ``diameter_m``; ``"aperture"``:
        uniformly lit pinhole of diameter ``diameter_m`` just upstream of the sample.
    diameter_m : float
        Probe size, metres.
    defocus_m : float
        Distance of the sample from the focus (Fresnel propagation of the probe), metres.
    wavelength_m : float
        Wavelength, metres.
    """
    ny, nx = shape
    y = (np.arange(ny) - ny // 2)[:, None] * pixel_m[0]
    x = (np.arange(nx) - nx // 2)[None, :] * pixel_m[1]
    fy = np.fft.fftfreq(ny, pixel_m[0])[:, None]
    fx = np.fft.fftfreq(nx, pixel_m[1])[None, :]
    f2 = fy**2 + fx**2
    if kind == "airy":
        # The focus of a lens with a circular pupil of cut-off k_c: first zero at
        # r₀ = 3.8317/(2π k_c), so k_c = 3.8317/(π d).
        pupil = (np.sqrt(f2) <= AIRY_FIRST_ZERO / (math.pi * diameter_m)).astype(complex)
        probe = np.fft.fftshift(np.fft.ifft2(pupil))
    elif kind == "gaussian":
        sigma = diameter_m / (2.0 * math.sqrt(2.0 * math.log(2.0)))  # FWHM of |P|²
        probe = np.exp(-(y**2 + x**2) / (4.0 * sigma**2)).astype(complex)
    else:
        probe = (np.hypot(y, x) <= diameter_m / 2).astype(complex)
    if defocus_m:
        # Fresnel transfer function of free space over the defocus distance.
        transfer = np.exp(-1j * math.pi * wavelength_m * defocus_m * f2)
        probe = np.fft.fftshift(np.fft.ifft2(np.fft.fft2(np.fft.ifftshift(probe)) * transfer))
    return probe / math.sqrt(float((np.abs(probe) ** 2).sum()))


def airy_radial_intensity(r_m: np.ndarray, diameter_m: float) -> np.ndarray:
    """Normalised Airy intensity [2 J1(x)/x]² with its first zero at ``diameter_m``/2."""
    x = AIRY_FIRST_ZERO * np.asarray(r_m, dtype=float) / (diameter_m / 2)
    xs = np.where(x == 0, 1.0, x)
    return np.where(x == 0, 1.0, (2 * j1(xs) / xs) ** 2)


def scan_positions(n_frames: int, step_m: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Raster grid of ``n_frames`` positions (y, x) in metres, centred on the origin.

    Lines run along x; ``cols = ceil(√n)`` points per line, the last line may be partial.
    """
    cols = int(math.ceil(math.sqrt(n_frames)))
    rows = int(math.ceil(n_frames / cols))
    idx = np.arange(n_frames)
    r, c = idx // cols, idx % cols
    pos = np.stack([(r - (rows - 1) / 2) * step_m, (c - (cols - 1) / 2) * step_m], axis=1)
    return pos, (rows, cols)


@dataclass(frozen=True)
class PtychoModel:
    """Settings of the ptychography kernel (picklable, hashable by Dask)."""

    sample: PtychoSample
    probe: np.ndarray
    pixel_m: tuple[float, float]
    step_m: float
    photons_per_frame: float
    fly_substeps: int
    position_jitter_m: float
    in_object_threshold: float
    noise: bool
    seed: int


def ptycho_kernel(start: int, stop: int, *, model: PtychoModel, nominal: np.ndarray) -> dict[str, np.ndarray]:
    """Simulate ptychography frames ``start, ..., stop − 1`` (a `generate_frames` kernel).

    Parameters
    ----------
    start, stop : int
        Global frame range.
    model : PtychoModel
        Sample, probe and scan settings.
    nominal : ndarray, shape (n_frames, 2)
        Nominal scan positions (y, x), metres.

    Returns
    -------
    dict
        ``frames`` (n, ny, nx) float32 photons, ``scan_y``, ``scan_x`` (metres, the true
        positions), ``footprint_fraction`` and ``in_object``.
    """
    n = stop - start
    ny, nx = model.probe.shape
    py, px = model.pixel_m
    gy = (np.arange(ny) - ny // 2)[:, None] * py
    gx = (np.arange(nx) - nx // 2)[None, :] * px
    weight = np.abs(model.probe) ** 2
    frames = np.empty((n, ny, nx), dtype=np.float32)
    pos = np.empty((n, 2))
    fraction = np.empty(n)
    # A fly scan moves the sample by one step along x during each exposure.
    sub = (np.arange(model.fly_substeps) + 0.5) / model.fly_substeps - 0.5 if model.fly_substeps > 1 else np.zeros(1)
    for i in range(n):
        frame = start + i
        jitter = frame_rng(model.seed, STREAM_PARAMETERS, frame).normal(0.0, model.position_jitter_m, 2)
        pos[i] = nominal[frame] + (jitter if model.position_jitter_m > 0 else 0.0)
        intensity = np.zeros((ny, nx))
        fraction[i] = 0.0
        for shift in sub:
            t, footprint = model.sample.transmission(pos[i, 0] + gy, pos[i, 1] + shift * model.step_m + gx)
            exit_wave = np.fft.ifftshift(model.probe * t)
            intensity += np.abs(np.fft.fftshift(np.fft.fft2(exit_wave, norm="ortho"))) ** 2
            fraction[i] += float((weight * footprint).sum())
        intensity *= model.photons_per_frame / sub.size
        fraction[i] /= sub.size
        if model.noise:
            frames[i] = frame_rng(model.seed, STREAM_NOISE, frame).poisson(intensity)
        else:
            frames[i] = intensity
    return {
        "frames": frames,
        "scan_y": pos[:, 0].copy(),
        "scan_x": pos[:, 1].copy(),
        "footprint_fraction": fraction,
        "in_object": fraction >= model.in_object_threshold,
    }


def simulate_ptycho(
    n_frames: int,
    geometry: Geometry,
    probe: str = "airy",
    probe_diameter_m: float = 1e-6,
    defocus_m: float = 0.0,
    overlap: float = 0.7,
    scan: str = "raster",
    fly_substeps: int = 5,
    position_jitter_m: float = 0.0,
    particle_diameter_m: float | tuple[float, float] = (1e-6, 3e-6),
    particle_aspect: float | tuple[float, float] = (0.6, 1.0),
    coverage: float = 0.25,
    delta: float = 1e-5,
    beta: float = 5e-7,
    photons_per_frame: float = 1e6,
    in_object_threshold: float = 0.1,
    noise: bool = True,
    seed: int = 0,
    chunks: int | None = None,
) -> xr.Dataset:
    """A lazy stack of far-field ptychography frames with scan positions and RoI labels.

    Parameters
    ----------
    n_frames : int
        Number of scan positions (a raster of ⌈√n⌉ points per line).
    geometry : Geometry
        Detector; it sets the object-plane pixel λD/(N p). The beam centre of the result is
        pixel (ny//2, nx//2), where the FFT puts the zero frequency.
    probe : {"airy", "gaussian", "aperture"}
        Probe model, see `make_probe`.
    probe_diameter_m : float
        Probe size, metres (first dark ring, FWHM or pinhole diameter).
    defocus_m : float
        Sample distance from the focus, metres (a defocused probe spreads its structure).
    overlap : float
        Linear overlap 1 − step/diameter of neighbouring probes, in [0, 1).
    scan : {"raster", "fly"}
        Step-and-shoot raster, or continuous motion along x averaged over ``fly_substeps``
        sub-exposures.
    fly_substeps : int
        Sub-exposures per fly-scan frame (≥ 1).
    position_jitter_m : float
        Standard deviation of the random error of each position (recorded in the labels).
    particle_diameter_m, particle_aspect : float or (float, float)
        Long in-plane diameter (metres) and short/long axis ratio ranges of the cells.
    coverage : float
        Fraction in [0, 1) of the scanned area covered by cells.
    delta, beta : float
        Refractive-index decrements of the cells' material (≥ 0).
    photons_per_frame : float
        Photons in the probe per exposure.
    in_object_threshold : float
        ``in_object`` is True where at least this fraction of the probe's photons falls on a
        cell.
    noise : bool
        Poisson counts if True, else expected photons.
    seed : int
        Seed of the sample, the position errors and the noise; frame f uses generators
        keyed by (seed, f).
    chunks : int, optional
        Frames per Dask chunk.

    Returns
    -------
    xarray.Dataset
        ``frames`` float32 photons, ``mask``, per-frame ``scan_y``, ``scan_x`` (metres),
        ``footprint_fraction`` and ``in_object``; the sample's parameters in attrs (rebuild
        its transmission and ground-truth footprint with `ptycho_sample`).
    """
    if not isinstance(geometry, Geometry):
        raise ParameterError(f"geometry must be a diffdask.Geometry, got {type(geometry).__name__}.")
    seed = check_seed(seed)
    probe = check_choice("probe", probe, PROBES)
    scan = check_choice("scan", scan, SCANS)
    diameter = check_positive("probe_diameter_m", probe_diameter_m, "m")
    ov = check_fraction("overlap", overlap)
    if ov >= 1:
        raise ParameterError("overlap must be below 1 (a step of zero); typical ptychography uses 0.6–0.8.")
    substeps = int(fly_substeps)
    if substeps < 1 or substeps != fly_substeps:
        raise ParameterError(f"fly_substeps must be an integer ≥ 1, got {fly_substeps!r}.")
    if scan == "raster":
        substeps = 1
    if isinstance(n_frames, bool) or int(n_frames) != n_frames or n_frames < 1:
        raise ParameterError(f"n_frames must be a positive integer, got {n_frames!r}.")
    ny, nx = geometry.shape
    pixel_m = tuple(geometry.wavelength_m * geometry.distance_m / (n * p) for n, p in zip((ny, nx), geometry.pixel_size_yx_m))
    step = diameter * (1.0 - ov)
    nominal, (rows, cols) = scan_positions(int(n_frames), step)
    extent = ((rows - 1) * step + diameter, (cols - 1) * step + diameter)
    sample_kwargs = {
        "extent_m": extent,
        "particle_diameter_m": check_range("particle_diameter_m", particle_diameter_m, "m"),
        "coverage": check_fraction("coverage", coverage),
        "aspect": check_range("particle_aspect", particle_aspect),
        "delta": check_nonnegative("delta", delta),
        "beta": check_nonnegative("beta", beta),
        "wavelength_m": geometry.wavelength_m,
        "seed": seed,
    }
    if sample_kwargs["aspect"][1] > 1:
        raise ParameterError(f"particle_aspect is a short/long axis ratio in (0, 1], got {particle_aspect!r}.")
    if sample_kwargs["coverage"] >= 1:
        raise ParameterError("coverage must be below 1: cells need empty background around them.")
    sample = make_sample(**sample_kwargs)
    model = PtychoModel(
        sample=sample,
        probe=make_probe((ny, nx), pixel_m, probe, diameter, float(defocus_m), geometry.wavelength_m),
        pixel_m=pixel_m,
        step_m=step,
        photons_per_frame=check_positive("photons_per_frame", photons_per_frame, "photons"),
        fly_substeps=substeps,
        position_jitter_m=check_nonnegative("position_jitter_m", position_jitter_m, "m"),
        in_object_threshold=check_fraction("in_object_threshold", in_object_threshold),
        noise=bool(noise),
        seed=seed,
    )
    shape = (ny, nx)
    n_chunk = int(chunks) if chunks is not None else min(frames_per_chunk(shape, np.float32), 256)
    outputs = {
        "frames": (shape, np.float32),
        "scan_y": ((), np.float64),
        "scan_x": ((), np.float64),
        "footprint_fraction": ((), np.float64),
        "in_object": ((), bool),
    }
    arrays = generate_frames(ptycho_kernel, n_frames, n_chunk, outputs, {"model": model, "nominal": nominal}, name="simulate-ptycho")
    centered = geometry.with_beam_center((ny // 2, nx // 2))
    data: dict[str, Any] = {"frames": (FRAME_DIMS, arrays["frames"]), "mask": (MASK_DIMS, np.ones(shape, dtype=bool))}
    for name in ("scan_y", "scan_x", "footprint_fraction", "in_object"):
        data[name] = (("frame",), arrays[name])
    attrs = {
        **centered.to_attrs(),
        "units": "photons",
        "object_pixel_m": list(pixel_m),
        "simulation": {
            "simulator": "ptycho",
            "diffdask_version": __version__,
            "seed": seed,
            "probe": probe,
            "probe_diameter_m": diameter,
            "defocus_m": float(defocus_m),
            "overlap": ov,
            "step_m": step,
            "scan": scan,
            "scan_shape": [rows, cols],
            "fly_substeps": substeps,
            "position_jitter_m": model.position_jitter_m,
            "sample": {k: list(v) if isinstance(v, tuple) else v for k, v in sample_kwargs.items()},
            "n_particles": int(len(sample.densities)),
            "photons_per_frame": model.photons_per_frame,
            "in_object_threshold": model.in_object_threshold,
            "noise": model.noise,
        },
    }
    return validate(xr.Dataset(data, attrs=attrs))


def object_ground_truth(ds: xr.Dataset, pixel_m: float | None = None) -> xr.Dataset:
    """The phantom of a `simulate_ptycho` stack over its scanned field: transmission and footprint.

    Parameters
    ----------
    ds : xarray.Dataset
        A stack made by `simulate_ptycho`.
    pixel_m : float, optional
        Sampling of the maps, metres; defaults to the object-plane pixel of the frames.

    Returns
    -------
    xarray.Dataset
        ``transmission`` (complex, y_m × x_m), ``footprint`` (bool: True on a cell, the ground
        truth of a region-of-interest selection) and ``thickness_m``, on coordinates ``y_m``
        and ``x_m`` in the frame of ``scan_y``/``scan_x``.
    """
    sample = ptycho_sample(ds)
    step = float(pixel_m) if pixel_m is not None else float(min(ds.attrs["object_pixel_m"]))
    height, width = ds.attrs["simulation"]["sample"]["extent_m"]
    y = np.arange(-height / 2, height / 2 + step / 2, step)
    x = np.arange(-width / 2, width / 2 + step / 2, step)
    thickness, footprint = sample.thickness(y[:, None], x[None, :])
    k = 2.0 * math.pi / sample.wavelength_m
    transmission = np.exp(-k * (sample.beta + 1j * sample.delta) * thickness)
    dims = ("y_m", "x_m")
    return xr.Dataset(
        {"transmission": (dims, transmission), "footprint": (dims, footprint), "thickness_m": (dims, thickness)},
        coords={"y_m": y, "x_m": x},
    )


def ptycho_sample(ds: xr.Dataset) -> PtychoSample:
    """Rebuild the phantom of a `simulate_ptycho` stack from its attrs (ground truth)."""
    sim = ds.attrs.get("simulation", {})
    if sim.get("simulator") != "ptycho":
        raise ParameterError("this dataset was not made by simulate_ptycho (attrs['simulation'] is missing or differs).")
    kw = dict(sim["sample"])
    for k in ("extent_m", "particle_diameter_m", "aspect"):
        kw[k] = tuple(kw[k])
    return make_sample(**kw)
