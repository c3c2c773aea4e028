"""Single-particle imaging (SPI) frames: single and multiple hits of particle ensembles.

Expected photons per pixel of a shot (the diffraction from a particle cluster is the
coherent sum of the particles' structure factors):

    μ = Φ g r_e² P ΔΩ |Σ_j F_j(R_jᵀ s) exp(2πi s·t_j)|² + g B,

with s = (û − ẑ)/λ the pixel's scattering vector, Φ the nominal fluence (photons/m²), g the
shot's fluence scale (Gamma-distributed jitter with mean 1: without it multiple hits would
separate on their total photon count alone), r_e the classical electron radius, P the
polarisation factor and ΔΩ the pixel's solid angle (all maps from `Geometry`), R_j and t_j
particle j's orientation and position (t₀ = 0), F_j its structure factor in electrons and
B an optional background (photons per pixel at the nominal fluence). Frames are Poisson
draws from μ, zero outside the mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import xarray as xr

from diffdask._version import __version__
from diffdask.backend import array_namespace, to_cpu
from diffdask.blocks import check_fits_in_memory, generate_frames
from diffdask.checks import check_choice, check_fraction, check_positive, check_range, check_seed
from diffdask.errors import ParameterError
from diffdask.frames import FRAME_DIMS, MASK_DIMS, frames_per_chunk, validate
from diffdask.geometry import Geometry
from diffdask.simulate.common import (
    ELECTRON_RADIUS_M,
    STREAM_PARAMETERS,
    apply_matrices,
    dot_vectors,
    frame_rng,
    poisson_frames,
    quaternion_to_matrix,
    random_quaternion,
    random_unit_vector,
)
from diffdask.simulate.formfactor import FormFactorVolume, form_factor_volume
from diffdask.simulate.particles import Particle

METHODS = ("auto", "exact", "slicing")
#: Pixels (frames × detector pixels) computed together inside a kernel: the float32
#: temporaries of a batch (≈ 512 KiB each) stay in the core's L2 cache, which measured 1.7×
#: faster than 2 MiB batches for 128×128 frames.
BATCH_PIXELS = 1 << 17
#: Attempts at placing a further particle of a cluster without overlapping the others.
PLACEMENT_TRIES = 20


@dataclass(frozen=True)
class _Shot:
    """Random choices of one frame (drawn from its own generator)."""

    single_hit: bool
    fluence_scale: float
    classes: tuple[int, ...]
    diameters_nm: tuple[float, ...]
    quaternions: np.ndarray  # (n_particles, 4)
    positions_nm: np.ndarray  # (n_particles, 3), the first at the origin


@dataclass(frozen=True)
class SPIModel:
    """Everything the SPI kernel needs besides the detector maps (picklable, hashable by Dask)."""

    particles: tuple[Particle, ...]
    fractions: tuple[float, ...]
    volumes: tuple[FormFactorVolume | None, ...]
    single_hit_fraction: float
    particles_per_multi_hit: tuple[int, int]
    gap_nm: tuple[float, float]
    fluence_jitter_shape: float | None
    noise: bool
    seed: int

    @property
    def max_particles(self) -> int:
        """Most particles a shot can hold."""
        return 1 if self.single_hit_fraction == 1.0 else self.particles_per_multi_hit[1]

    def draw_shot(self, frame: int) -> _Shot:
        """The random choices of global frame ``frame``."""
        rng = frame_rng(self.seed, STREAM_PARAMETERS, frame)
        single = bool(rng.random() < self.single_hit_fraction)
        lo, hi = self.particles_per_multi_hit
        n = 1 if single else int(rng.integers(lo, hi + 1))
        k = self.fluence_jitter_shape
        scale = float(rng.gamma(k, 1.0 / k)) if k is not None else 1.0
        classes, diameters, quats, pos, radii = [], [], [], [], []
        for j in range(n):
            c = int(rng.choice(len(self.particles), p=self.fractions))
            lo_d, hi_d = self.particles[c].size_range_nm
            d = float(rng.uniform(lo_d, hi_d)) if hi_d > lo_d else lo_d
            q = random_quaternion(rng)
            radius = self.particles[c].bounding_radius_nm(d)
            if j == 0:
                t = np.zeros(3)
            else:
                # The j-th particle sits at a surface gap from the first, in a random direction,
                # avoiding overlap with the others already placed where it can.
                gap = float(rng.uniform(*self.gap_nm))
                for _ in range(PLACEMENT_TRIES):
                    t = random_unit_vector(rng) * (radii[0] + radius + gap)
                    if all(np.linalg.norm(t - p) >= r + radius for p, r in zip(pos[1:], radii[1:])):
                        break
            classes.append(c)
            diameters.append(d)
            quats.append(q)
            pos.append(t)
            radii.append(radius)
        return _Shot(single, scale, tuple(classes), tuple(diameters), np.array(quats), np.array(pos))


def _structure_factors(model: SPIModel, shots: Sequence[_Shot], s_lab: Any, complex_out: bool) -> Any:
    """F of every particle of ``shots`` at the detector's s-vectors, rows in shot order."""
    xp = array_namespace(s_lab)
    cls = np.array([c for sh in shots for c in sh.classes])
    diam = np.array([d for sh in shots for d in sh.diameters_nm], dtype=np.float32)
    quats = np.concatenate([sh.quaternions for sh in shots]).astype(np.float32)
    n_pix = s_lab.shape[1]
    out = xp.empty((cls.size, n_pix), dtype=xp.complex64 if complex_out else xp.float32)
    for c in np.unique(cls):
        idx = np.flatnonzero(cls == c)
        particle, volume = model.particles[c], model.volumes[c]
        if volume is not None:
            f = volume.sample(quaternion_to_matrix(quats[idx]), s_lab, diam[idx] / np.float32(volume.diameter_nm))
        elif particle.shape == "sphere":
            # A sphere's F depends on |s| only: no rotation needed.
            f = particle.structure_factor(s_lab[None], diam[idx])
        else:
            rt = quaternion_to_matrix(quats[idx]).transpose(0, 2, 1)
            f = particle.structure_factor(apply_matrices(rt, s_lab), diam[idx])
        out[xp.asarray(idx)] = f if complex_out else f.real
    return out


def _expected_photons(model: SPIModel, shots: Sequence[_Shot], s_lab: Any, prefactor: Any, background: Any) -> Any:
    xp = array_namespace(s_lab)
    counts = np.array([len(sh.classes) for sh in shots])
    multi = bool((counts > 1).any())
    complex_out = multi or any(v is not None and np.iscomplexobj(v.values) for v in model.volumes)
    complex_out = complex_out or any(p.shape == "pdb" for p in model.particles)
    f = _structure_factors(model, shots, s_lab, complex_out)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    amplitude = f[xp.asarray(first)]
    if multi:
        for j in range(1, int(counts.max())):
            frames_j = np.flatnonzero(counts > j)
            rows = first[frames_j] + j
            t = np.stack([shots[i].positions_nm[j] for i in frames_j]).astype(np.float32)
            phase = xp.exp(1j * (2.0 * math.pi) * dot_vectors(t, s_lab))
            amplitude[xp.asarray(frames_j)] += f[xp.asarray(rows)] * phase
    intensity = amplitude.real**2 + amplitude.imag**2 if complex_out else amplitude * amplitude
    scale = xp.asarray(np.array([sh.fluence_scale for sh in shots], dtype=np.float32))[:, None]
    return scale * (prefactor * intensity + background)


def spi_kernel(
    start: int,
    stop: int,
    *,
    model: SPIModel,
    s_lab: Any,
    prefactor: Any,
    background: Any,
    mask: np.ndarray,
) -> dict[str, np.ndarray]:
    """Simulate SPI frames ``start, ..., stop − 1`` (a `generate_frames` kernel).

    Parameters
    ----------
    start, stop : int
        Global frame range.
    model : SPIModel
        Particles, grids and random settings.
    s_lab : array, shape (3, ny·nx), float32
        Laboratory scattering vectors of the pixels, nm⁻¹ (NumPy or CuPy: the physics runs
        where this array lives).
    prefactor : array, shape (ny·nx,), float32
        Φ r_e² P ΔΩ per pixel, photons per electron².
    background : array, shape (ny·nx,), float32
        Background photons per pixel at the nominal fluence.
    mask : ndarray of bool, shape (ny, nx)
        True = good pixel; other pixels read 0.

    Returns
    -------
    dict
        ``frames`` (n, ny, nx) float32 photons and the per-frame labels.
    """
    n = stop - start
    ny, nx = mask.shape
    frames = np.empty((n, ny, nx), dtype=np.float32)
    shots = [model.draw_shot(start + i) for i in range(n)]
    batch_frames = max(1, BATCH_PIXELS // (ny * nx))
    for b0 in range(0, n, batch_frames):
        batch = shots[b0 : b0 + batch_frames]
        mu = _expected_photons(model, batch, s_lab, prefactor, background)
        if model.noise:
            frames[b0 : b0 + len(batch)] = poisson_frames(mu, model.seed, start + b0).reshape(-1, ny, nx)
        else:
            frames[b0 : b0 + len(batch)] = to_cpu(mu).reshape(-1, ny, nx)
    frames[:, ~mask] = 0
    slots = model.max_particles
    positions = np.full((n, slots, 3), np.nan)
    orientations = np.full((n, slots, 4), np.nan)
    diameters = np.full((n, slots), np.nan, dtype=np.float32)
    classes = np.full((n, slots), -1, dtype=np.int16)
    for i, sh in enumerate(shots):
        k = len(sh.classes)
        positions[i, :k] = sh.positions_nm
        orientations[i, :k] = sh.quaternions
        diameters[i, :k] = sh.diameters_nm
        classes[i, :k] = sh.classes
    return {
        "particle_position_nm": positions,
        "particle_orientation": orientations,
        "particle_diameter_nm": diameters,
        "particle_class": classes,
        "frames": frames,
        "n_particles": np.array([len(sh.classes) for sh in shots], dtype=np.uint8),
        "orientation": np.stack([sh.quaternions[0] for sh in shots]),
        "fluence_scale": np.array([sh.fluence_scale for sh in shots], dtype=np.float32),
        "diameter_nm": np.array([sh.diameters_nm[0] for sh in shots], dtype=np.float32),
        "shape_class": np.array([sh.classes[0] for sh in shots], dtype=np.int16),
        "single_hit": np.array([len(sh.classes) == 1 for sh in shots], dtype=bool),
    }


def _particle_attrs(p: Particle) -> dict[str, Any]:
    d = {k: v for k, v in asdict(p).items() if not k.startswith("_")}
    d["diameter_nm"] = list(d["diameter_nm"]) if d["diameter_nm"] is not None else None
    d["axes_ratio"] = list(d["axes_ratio"])
    return d


def simulate_spi(
    n_frames: int,
    geometry: Geometry,
    particles: Particle | Sequence[Particle] | None = None,
    fractions: Sequence[float] | None = None,
    single_hit_fraction: float = 1.0,
    particles_per_multi_hit: tuple[int, int] = (2, 4),
    gap_nm: float | tuple[float, float] = (20.0, 50.0),
    fluence_photons_per_m2: float = 1e24,
    fluence_jitter_shape: float | None = 2.0,
    background_photons: float | np.ndarray = 0.0,
    polarization: str = "x",
    mask: np.ndarray | None = None,
    noise: bool = True,
    method: str = "auto",
    oversampling: float = 8.0,
    grid_size: int | None = None,
    seed: int = 0,
    chunks: int | None = None,
) -> xr.Dataset:
    """A lazy stack of simulated single-particle diffraction frames with ground-truth labels.

    Parameters
    ----------
    n_frames : int
        Number of shots.
    geometry : Geometry
        Detector geometry: s-vectors, polarisation and solid angle of each pixel.
    particles : Particle or sequence of Particle, optional
        Particle classes of the sample (default: one 70 nm protein sphere). Several classes
        make a heterogeneous ensemble (cubes, rounded cubes, spheres, contaminants).
    fractions : sequence of float, optional
        Probability of each class (each in [0, 1], summing to 1); equal by default.
    single_hit_fraction : float
        Probability in [0, 1] that a shot holds one particle (0.80–0.99 in sorting studies).
    particles_per_multi_hit : (int, int)
        Smallest and largest number of particles of a multiple hit, drawn uniformly (≥ 2).
    gap_nm : float or (float, float)
        Surface gap between the first particle of a cluster and each further one, nm, drawn
        uniformly from the range (the particles' bounding spheres never overlap).
    fluence_photons_per_m2 : float
        Nominal fluence at the particle, photons/m² (1e24 = 10¹² photons/µm²).
    fluence_jitter_shape : float or None
        Shape k of the Gamma(k, 1/k) shot-to-shot fluence scale (mean 1, variance 1/k; the
        default 2 is Gamma(2, ½)); None for a constant fluence.
    background_photons : float or ndarray of shape (ny, nx)
        Expected background photons per pixel at the nominal fluence (scales with the shot's
        fluence).
    polarization : {"x", "y", "none"}
        Beam polarisation, see `Geometry.polarization_factor`.
    mask : ndarray of bool, shape (ny, nx), optional
        Good pixels (see `detector_mask`); all good by default. Bad pixels read 0.
    noise : bool
        Poisson photon counts if True, else the expected photons μ.
    method : {"auto", "exact", "slicing"}
        ``"exact"`` evaluates closed-form structure factors per pixel (spheres, ellipsoids,
        boxes, PDB atoms); ``"slicing"`` interpolates a precomputed reciprocal grid on the
        Ewald sphere (any shape, fastest for atoms); ``"auto"`` is exact where possible.
    oversampling, grid_size :
        Reciprocal-grid sampling for slicing, see `form_factor_volume`.
    seed : int
        Seed of every random choice; frame f uses generators keyed by (seed, f), so the
        bytes do not depend on ``chunks`` or on the number of workers.
    chunks : int, optional
        Frames per Dask chunk (and per task); defaults to about 96 MiB of frames.

    Returns
    -------
    xarray.Dataset
        A lazy frame stack: ``frames`` (frame, y, x) float32 photons, ``mask`` and the
        per-frame labels ``n_particles``, ``orientation`` (frame, quaternion; the first
        particle's active rotation as w, x, y, z), ``fluence_scale``, ``diameter_nm``,
        ``shape_class`` (index into ``attrs["shape_classes"]``) and ``single_hit`` of the
        shot's first particle, and the full ground truth of every particle of the shot:
        ``particle_position_nm`` (frame, particle, xyz; laboratory frame, the first at the
        origin), ``particle_orientation``, ``particle_diameter_nm`` (NaN for absent
        particles) and ``particle_class`` (−1 for absent); geometry and simulation
        parameters in attrs.

    Raises
    ------
    ParameterError
        For out-of-range parameters, unknown shapes or methods, or grids too coarse.
    """
    if not isinstance(geometry, Geometry):
        raise ParameterError(f"geometry must be a diffdask.Geometry, got {type(geometry).__name__}.")
    seed = check_seed(seed)
    method = check_choice("method", method, METHODS)
    plist = [Particle()] if particles is None else [particles] if isinstance(particles, Particle) else list(particles)
    if not plist or not all(isinstance(p, Particle) for p in plist):
        raise ParameterError("particles must be a Particle or a non-empty sequence of Particle.")
    if fractions is None:
        frac = np.full(len(plist), 1.0 / len(plist))
    else:
        frac = np.array([check_fraction("fractions", f) for f in np.ravel(fractions)])
        if frac.size != len(plist):
            raise ParameterError(f"give one fraction per particle class: {len(plist)} classes, {frac.size} fractions.")
        if not math.isclose(frac.sum(), 1.0, rel_tol=0, abs_tol=1e-6):
            raise ParameterError(f"fractions must sum to 1, got {list(frac)} (sum {frac.sum():.6g}).")
    single = check_fraction("single_hit_fraction", single_hit_fraction)
    lo, hi = (int(v) for v in particles_per_multi_hit)
    if not 2 <= lo <= hi or (lo, hi) != tuple(particles_per_multi_hit):
        raise ParameterError(
            f"particles_per_multi_hit must be integers (low, high) with 2 ≤ low ≤ high, got {particles_per_multi_hit!r}."
        )
    gap = check_range("gap_nm", gap_nm, "nm", allow_zero=True)
    fluence = check_positive("fluence_photons_per_m2", fluence_photons_per_m2, "photons/m²")
    jitter = None if fluence_jitter_shape is None else check_positive("fluence_jitter_shape", fluence_jitter_shape)
    shape = tuple(geometry.shape)
    # About a dozen float64 maps of the detector are made below (positions, s, solid angle, ...).
    check_fits_in_memory(12 * 8 * float(np.prod(shape)), f"a {shape[0]}×{shape[1]} detector", "use a smaller detector")
    if mask is None:
        good = np.ones(shape, dtype=bool)
    else:
        good = np.asarray(mask, dtype=bool)
        if good.shape != shape:
            raise ParameterError(f"mask shape {good.shape} differs from the detector shape {shape}.")
    bg = np.asarray(background_photons, dtype=float)
    if bg.shape not in ((), shape) or not np.all(np.isfinite(bg)) or np.any(bg < 0):
        raise ParameterError(
            f"background_photons must be ≥ 0 and finite, one number or a {shape} map; got shape {bg.shape}."
        )
    s_vec = geometry.scattering_vectors_inv_nm
    s_max = float(np.sqrt((s_vec**2).sum(axis=0)).max())
    volumes: list[FormFactorVolume | None] = []
    for p in plist:
        if method == "exact" and not p.exact:
            raise ParameterError(
                f"a {p.shape!r} particle has no closed-form structure factor; use method='slicing' or 'auto'."
            )
        slicing = method == "slicing" or (method == "auto" and not p.exact)
        volumes.append(form_factor_volume(p, s_max, oversampling, grid_size) if slicing else None)
    model = SPIModel(
        particles=tuple(plist),
        fractions=tuple(float(f) for f in frac),
        volumes=tuple(volumes),
        single_hit_fraction=single,
        particles_per_multi_hit=(lo, hi),
        gap_nm=gap,
        fluence_jitter_shape=jitter,
        noise=bool(noise),
        seed=seed,
    )
    prefactor = fluence * ELECTRON_RADIUS_M**2 * geometry.polarization_factor(polarization) * geometry.solid_angle_sr
    n_chunk = int(chunks) if chunks is not None else frames_per_chunk(shape, np.float32)
    outputs = {
        "frames": (shape, np.float32),
        "n_particles": ((), np.uint8),
        "orientation": ((4,), np.float64),
        "fluence_scale": ((), np.float32),
        "diameter_nm": ((), np.float32),
        "shape_class": ((), np.int16),
        "single_hit": ((), bool),
        "particle_position_nm": ((model.max_particles, 3), np.float64),
        "particle_orientation": ((model.max_particles, 4), np.float64),
        "particle_diameter_nm": ((model.max_particles,), np.float32),
        "particle_class": ((model.max_particles,), np.int16),
    }
    kwargs = {
        "model": model,
        "s_lab": s_vec.reshape(3, -1).astype(np.float32),
        "prefactor": prefactor.reshape(-1).astype(np.float32),
        "background": np.broadcast_to(bg, shape).reshape(-1).astype(np.float32),
        "mask": good,
    }
    arrays = generate_frames(spi_kernel, n_frames, n_chunk, outputs, kwargs, name="simulate-spi")
    attrs = {
        **geometry.to_attrs(),
        "units": "photons",
        "shape_classes": [p.label for p in plist],
        "simulation": {
            "simulator": "spi",
            "diffdask_version": __version__,
            "seed": seed,
            "particles": [_particle_attrs(p) for p in plist],
            "fractions": list(model.fractions),
            "single_hit_fraction": single,
            "particles_per_multi_hit": [lo, hi],
            "gap_nm": list(gap),
            "fluence_photons_per_m2": fluence,
            "fluence_jitter_shape": jitter,
            "background_photons_mean": float(bg.mean()),
            "polarization": polarization,
            "noise": bool(noise),
            "method": method,
            "oversampling": float(oversampling),
            "grid_size": grid_size,
        },
    }
    data = {
        "frames": (FRAME_DIMS, arrays["frames"]),
        "mask": (MASK_DIMS, good),
        "orientation": (("frame", "quaternion"), arrays["orientation"]),
    }
    for name in ("n_particles", "fluence_scale", "diameter_nm", "shape_class", "single_hit"):
        data[name] = (("frame",), arrays[name])
    data["particle_position_nm"] = (("frame", "particle", "xyz"), arrays["particle_position_nm"])
    data["particle_orientation"] = (("frame", "particle", "quaternion"), arrays["particle_orientation"])
    data["particle_diameter_nm"] = (("frame", "particle"), arrays["particle_diameter_nm"])
    data["particle_class"] = (("frame", "particle"), arrays["particle_class"])
    return validate(xr.Dataset(data, attrs=attrs))
