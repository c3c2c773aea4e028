"""Particle models for single-particle imaging: shapes, sizes and closed-form structure factors.

A particle's structure factor F(s) (electrons) is evaluated in its body frame at scattering
vectors s (nm⁻¹), with the convention F(s) = ∫ ρ(r) exp(2πi s·r) d³r.

- Exact shapes (`sphere`, `ellipsoid`, `cube`, `pdb`) have closed forms (the PDB case is the
  direct sum over atoms with element form factors) that a kernel evaluates per pixel.
- Every shape can also be tabulated on a reciprocal-space grid
  (`diffdask.simulate.formfactor.form_factor_volume`); shapes without a closed form
  (`superellipsoid`, `icosahedral_shell`) get their grid from the Fourier transform of the
  blurred real-space density `Particle.density`, whose surfaces `diffdask.simulate.shapes`
  describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import erfc

from diffdask.backend import array_namespace
from diffdask.checks import check_nonnegative, check_positive, check_range
from diffdask.errors import ParameterError
from diffdask.simulate.atoms import atomic_form_factor, read_pdb
from diffdask.simulate.shapes import box_distance, icosahedron_occupancy, superellipsoid_surface

SHAPES = ("sphere", "ellipsoid", "cube", "superellipsoid", "icosahedral_shell", "pdb")
#: Shapes whose structure factor has a closed form.
EXACT_SHAPES = ("sphere", "ellipsoid", "cube", "pdb")

#: Typical electron density of protein, e⁻/nm³ (1.35 g/cm³, 0.54 e⁻ per dalton).
PROTEIN_E_PER_NM3 = 430.0
#: Size of a particle when none is given, nm (PR772-like).
DEFAULT_DIAMETER_NM = 70.0


@dataclass(frozen=True)
class Particle:
    """One class of particles of a single-particle imaging sample.

    Parameters
    ----------
    shape : str
        ``"sphere"``, ``"ellipsoid"``, ``"cube"`` (rectangular box), ``"superellipsoid"``
        (|x/a|^p + |y/b|^p + |z/c|^p ≤ 1: p = 2 is the ellipsoid, large p the box, between
        them rounded cubes), ``"icosahedral_shell"`` (virus-like capsid, e.g. PR772 ≈ 70 nm)
        or ``"pdb"`` (atoms of a PDB file).
    diameter_nm : float or (float, float)
        Size, nm: the sphere diameter; twice the largest semi-axis of an (super)ellipsoid,
        i.e. the edge of a cube; the vertex-to-vertex diameter of an icosahedral shell. A
        ``(low, high)`` pair draws it uniformly per particle (e.g. ``(55, 84)``). Defaults to
        `DEFAULT_DIAMETER_NM`; must stay None for ``"pdb"``, whose atoms fix the size.
    axes_ratio : (float, float, float)
        Relative semi-axes (a, b, c) along body x, y, z of ellipsoids, boxes and
        superellipsoids; the largest becomes ``diameter_nm / 2``.
    exponent : float
        Superellipsoid exponent p ≥ 1.
    shell_fraction : float
        Icosahedral shell thickness as a fraction (0, 1] of the circumradius.
    core_density_ratio : float
        Electron density inside an icosahedral shell relative to the shell (≥ 0), e.g. 0.8
        for a packed genome.
    electron_density_e_per_nm3 : float
        Electron density of the material (contrast against vacuum), e⁻/nm³; protein ≈ 430,
        gold ≈ 4 660.
    pdb_path : str, optional
        PDB file of a ``"pdb"`` particle.
    name : str, optional
        Label of the class in ``shape_class``; defaults to ``shape``.

    Raises
    ------
    ParameterError
        For unknown shapes or out-of-range sizes and densities; errors of `read_pdb` for PDB
        files that are missing or hold unknown elements.
    """

    shape: str = "sphere"
    diameter_nm: float | tuple[float, float] | None = None
    axes_ratio: tuple[float, float, float] = (1.0, 1.0, 1.0)
    exponent: float = 2.0
    shell_fraction: float = 0.15
    core_density_ratio: float = 0.0
    electron_density_e_per_nm3: float = PROTEIN_E_PER_NM3
    pdb_path: str | None = None
    name: str | None = None
    _atoms: tuple[tuple[str, ...], np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ParameterError(f"unknown particle shape {self.shape!r}; choose one of {', '.join(SHAPES)}.")
        check_positive("electron_density_e_per_nm3", self.electron_density_e_per_nm3, "e⁻/nm³")
        if self.shape == "pdb":
            if self.pdb_path is None:
                raise ParameterError('a "pdb" particle needs pdb_path, the path of a PDB file.')
            if self.diameter_nm is not None:
                raise ParameterError(
                    'a "pdb" particle takes its size from its atoms; leave diameter_nm unset (None).'
                )
            elements, xyz, occ = read_pdb(self.pdb_path)
            # Centre the atoms so that orientations rotate about the particle's centroid.
            xyz = xyz - xyz.mean(axis=0)
            object.__setattr__(self, "_atoms", (tuple(elements), xyz, occ))
            object.__setattr__(self, "pdb_path", str(Path(self.pdb_path)))
        else:
            size = DEFAULT_DIAMETER_NM if self.diameter_nm is None else self.diameter_nm
            object.__setattr__(self, "diameter_nm", check_range("diameter_nm", size, "nm"))
        ratio = tuple(float(r) for r in np.asarray(self.axes_ratio, dtype=float).ravel())
        if len(ratio) != 3 or not all(math.isfinite(r) and r > 0 for r in ratio):
            raise ParameterError(f"axes_ratio must be three positive numbers (a, b, c), got {self.axes_ratio!r}.")
        object.__setattr__(self, "axes_ratio", ratio)
        p = check_positive("exponent", self.exponent)
        if p < 1:
            raise ParameterError(f"superellipsoid exponent must be ≥ 1 (convex shapes), got {self.exponent!r}.")
        shell = check_positive("shell_fraction", self.shell_fraction)
        if shell > 1:
            raise ParameterError(f"shell_fraction must be in (0, 1], got {self.shell_fraction!r}.")
        check_nonnegative("core_density_ratio", self.core_density_ratio)

    # ------------------------------------------------------------------ sizes
    @property
    def label(self) -> str:
        """Name of the class in labels."""
        return self.name or self.shape

    @property
    def exact(self) -> bool:
        """True when the structure factor has a closed form."""
        return self.shape in EXACT_SHAPES

    @property
    def size_range_nm(self) -> tuple[float, float]:
        """(smallest, largest) ``diameter_nm``; for PDB particles twice the largest atom radius."""
        if self.shape == "pdb":
            d = 2.0 * float(np.max(np.linalg.norm(self._atoms[1], axis=1)))
            return d, d
        return self.diameter_nm  # type: ignore[return-value]

    def semi_axes_nm(self, diameter_nm: float) -> np.ndarray:
        """Semi-axes (a, b, c) in nm at a given ``diameter_nm``."""
        r = np.asarray(self.axes_ratio)
        return 0.5 * diameter_nm * r / r.max()

    def bounding_radius_nm(self, diameter_nm: float) -> float:
        """Radius of the smallest centred sphere holding the particle, nm."""
        if self.shape in ("sphere", "icosahedral_shell", "ellipsoid", "pdb"):
            return 0.5 * diameter_nm
        a = self.semi_axes_nm(diameter_nm)
        if self.shape == "cube":
            return float(np.linalg.norm(a))
        # max |r| over Σ|x_i/a_i|^p = 1 is ≤ a_max·max‖u‖₂ over ‖u‖_p = 1 = a_max·3^(1/2 − 1/p).
        return float(min(np.linalg.norm(a), a.max() * 3.0 ** max(0.0, 0.5 - 1.0 / self.exponent)))

    def curvature_scale_nm(self, diameter_nm: float) -> float:
        """Smallest length over which the surface bends, nm: the blur of a density grid must
        stay well below it (smallest semi-axis; inner circumradius of a shell)."""
        if self.shape == "icosahedral_shell":
            # Flat faces blur exactly at any σ; edges and vertices, set by the size of the inner
            # surface (of a thick shell, the outer one), are what bends.
            return 0.5 * diameter_nm * max(1.0 - self.shell_fraction, 0.5)
        if self.shape == "pdb":
            return self.bounding_radius_nm(diameter_nm)
        return float(self.semi_axes_nm(diameter_nm).min())

    # ------------------------------------------------------------------ closed forms
    def structure_factor(self, s: Any, diameter_nm: Any) -> Any:
        """Closed-form structure factor at body-frame scattering vectors.

        Parameters
        ----------
        s : array, shape (m, 3, P)
            Body-frame scattering vectors of ``m`` particles, nm⁻¹.
        diameter_nm : array, shape (m,)
            Diameters of the ``m`` particles, nm.

        Returns
        -------
        array, shape (m, P)
            F in electrons (real for the centrosymmetric shapes, complex for atoms).
        """
        xp = array_namespace(s)
        d = xp.asarray(diameter_nm, dtype=s.dtype)[:, None]
        rho = self.electron_density_e_per_nm3
        if self.shape == "sphere":
            radius = 0.5 * d
            x = 2.0 * math.pi * radius * xp.sqrt(xp.sum(s * s, axis=1))
            return (rho * 4.0 / 3.0 * math.pi) * radius**3 * sphere_amplitude(x)
        if self.shape == "ellipsoid":
            a = xp.asarray(self.semi_axes_nm(1.0), dtype=s.dtype)[None, :, None] * d[:, :, None]
            x = 2.0 * math.pi * xp.sqrt(xp.sum((a * s) ** 2, axis=1))
            return (rho * 4.0 / 3.0 * math.pi) * xp.prod(a, axis=1) * sphere_amplitude(x)
        if self.shape == "cube":
            a = xp.asarray(self.semi_axes_nm(1.0), dtype=s.dtype)[None, :, None] * d[:, :, None]
            # FT of the box |x_i| ≤ a_i is Π 2a_i sinc(2 a_i s_i), with sinc(u) = sin(πu)/(πu).
            return rho * xp.prod(2.0 * a * xp.sinc(2.0 * a * s), axis=1)
        if self.shape == "pdb":
            return self._atom_sum(s)
        raise ParameterError(f"shape {self.shape!r} has no closed-form structure factor; use a form_factor_volume.")

    def _atom_sum(self, s: Any) -> Any:
        xp = array_namespace(s)
        elements, xyz, occ = self._atoms  # type: ignore[misc]
        s_len = xp.sqrt(xp.sum(s * s, axis=1))
        cdtype = xp.complex64 if s.dtype == xp.float32 else xp.complex128
        total = xp.zeros(s_len.shape, dtype=cdtype)
        pos = xp.asarray(xyz, dtype=s.dtype)
        weights = xp.asarray(occ, dtype=s.dtype)
        for element in sorted(set(elements)):
            idx = [i for i, e in enumerate(elements) if e == element]
            f = atomic_form_factor(element, s_len)
            # Σ_j occ_j exp(2πi s·r_j), atoms of one element share f(|s|).
            phase_sum = xp.zeros(s_len.shape, dtype=cdtype)
            for i in idx:
                phase = 2.0 * math.pi * (s[:, 0] * pos[i, 0] + s[:, 1] * pos[i, 1] + s[:, 2] * pos[i, 2])
                phase_sum += weights[i] * xp.exp(1j * phase)
            total += f * phase_sum
        return total

    # ------------------------------------------------------------------ densities
    def density(self, r: Any, diameter_nm: float, sigma_nm: float) -> np.ndarray:
        """Electron density blurred by a Gaussian of width σ, e⁻/nm³, at body positions.

        The blurred density is ½ erfc(d/(√2 σ)) × ρ, with d the signed distance to the
        surface (exact for flat surfaces, O((σ/R)²) off for curved ones); a grid sampled with
        spacing ≈ σ then carries no aliasing, and dividing its transform by the Gaussian's,
        exp(−2π²σ²|s|²), gives the sharp particle's F.

        Parameters
        ----------
        r : ndarray, shape (3, ...)
            Body-frame positions (x, y, z), nm.
        diameter_nm : float
            Particle size (see `Particle`).
        sigma_nm : float
            Blur width σ, nm.
        """
        scale = 1.0 / (math.sqrt(2.0) * sigma_nm)
        rho = self.electron_density_e_per_nm3
        if self.shape == "cube":
            return rho * 0.5 * erfc(box_distance(r, self.semi_axes_nm(diameter_nm)) * scale)
        if self.shape in ("sphere", "ellipsoid", "superellipsoid"):
            a = self.semi_axes_nm(diameter_nm)
            p = self.exponent if self.shape == "superellipsoid" else 2.0
            dist, curvature = superellipsoid_surface(r, a, p)
            # The blurred indicator of a curved body is ½ erfc(d/(√2σ)) − σH e^(−d²/2σ²)/√(2π)
            # to second order in σ/R (H the mean curvature); without the curvature term F would
            # be off by ~σ/R at high |s|. Curvature radii below σ (sharp edges) are clipped.
            bend = np.clip(sigma_nm * curvature, -1.0, 1.0)
            return rho * (0.5 * erfc(dist * scale) - bend * np.exp(-((dist * scale) ** 2)) / math.sqrt(2.0 * math.pi))
        if self.shape == "icosahedral_shell":
            outer = 0.5 * diameter_nm
            inner = outer * (1.0 - self.shell_fraction)
            occ_out = icosahedron_occupancy(r, outer, sigma_nm)
            occ_in = icosahedron_occupancy(r, inner, sigma_nm) if inner > 0 else 0.0
            return rho * (occ_out - occ_in + self.core_density_ratio * occ_in)
        raise ParameterError(f"a {self.shape!r} particle has no continuum density; it is built from atoms.")


#: Electron density of crystalline gold, e⁻/nm³ (19.32 g/cm³, Z = 79, 196.97 g/mol).
GOLD_E_PER_NM3 = 79 * 19.32 / 196.97 * 6.02214076e23 * 1e-21
#: Density of molten (randomly close-packed) gold over crystalline gold, 17.31/19.32.
MOLTEN_GOLD_RATIO = 17.31 / 19.32


def melting_ensemble(
    edge_nm: float = 42.0,
    fractions: tuple[float, float, float, float] = (0.55, 0.15, 0.2, 0.1),
    electron_density_e_per_nm3: float = GOLD_E_PER_NM3,
) -> tuple[list[Particle], list[float]]:
    """Classes of a nanocube sample partly melted by the previous pulse (cube → sphere).

    The gold-nanocube ensemble of an SPI run at a MHz XFEL: crystalline cubes, cubes whose
    edges and corners have rounded (superellipsoid p = 6), spheres of the molten metal (same
    electrons, 10 % more volume: crystalline 19.32 g/cm³ → molten 17.31 g/cm³) and
    elongated contaminants (prolate ellipsoids of 0.6–1.4 edge lengths).

    Parameters
    ----------
    edge_nm : float or (float, float)
        Cube edge, nm (a range draws it per particle).
    fractions : 4 floats
        Fractions of cubes, rounded cubes, spheres and contaminants (sum 1).
    electron_density_e_per_nm3 : float
        Electron density of the crystalline material.

    Returns
    -------
    particles : list of Particle
        Classes named ``"cube"``, ``"rounded cube"``, ``"sphere"``, ``"contaminant"``.
    fractions : list of float
        Their fractions, to pass to `simulate_spi`.
    """
    low, high = check_range("edge_nm", edge_nm, "nm")
    rho = check_positive("electron_density_e_per_nm3", electron_density_e_per_nm3, "e⁻/nm³")
    # A sphere with the cube's electrons at molten density: π d³/6 = a³ / ratio.
    to_sphere = (6.0 / (math.pi * MOLTEN_GOLD_RATIO)) ** (1.0 / 3.0)
    particles = [
        Particle("cube", (low, high), electron_density_e_per_nm3=rho, name="cube"),
        Particle("superellipsoid", (low, high), exponent=6.0, electron_density_e_per_nm3=rho, name="rounded cube"),
        Particle("sphere", (low * to_sphere, high * to_sphere), electron_density_e_per_nm3=rho * MOLTEN_GOLD_RATIO,
                 name="sphere"),
        Particle("ellipsoid", (0.6 * low, 1.4 * high), axes_ratio=(1.0, 0.55, 0.45), electron_density_e_per_nm3=rho,
                 name="contaminant"),
    ]
    return particles, [float(f) for f in fractions]


def sphere_amplitude(x: Any) -> Any:
    """Normalised sphere form factor 3(sin x − x cos x)/x³ (1 at x = 0)."""
    xp = array_namespace(x)
    small = x < 0.5
    xs = xp.where(small, 1.0, x)
    exact = 3.0 * (xp.sin(xs) - xs * xp.cos(xs)) / xs**3
    x2 = x * x
    # Taylor series where sin x − x cos x cancels: 3 Σ (−1)^(k+1) 2k x^(2k−2)/(2k+1)!.
    series = 1.0 - x2 / 10.0 + x2 * x2 / 280.0 - x2**3 / 15120.0 + x2**4 / 1330560.0
    return xp.where(small, series, exact)
