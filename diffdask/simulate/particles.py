"""Particle models for single-particle imaging and their Fourier transforms.

A particle's structure factor F(s) (electrons) is evaluated in its body frame at scattering
vectors s (nm⁻¹), with the convention F(s) = ∫ ρ(r) exp(2πi s·r) d³r.

- Exact shapes (`sphere`, `ellipsoid`, `cube`, `pdb`) have closed forms (the PDB case is the
  direct sum over atoms with element form factors) that a kernel evaluates per pixel.
- Every shape can also be tabulated on a reciprocal-space grid (`form_factor_volume`) that a
  kernel slices along the Ewald sphere by trilinear interpolation. Shapes without a closed
  form (`superellipsoid`, `icosahedral_shell`) get their grid from the Fourier transform of a
  real-space density.

Sampling rule for the grids: the reciprocal step must be ≤ 1/(4 D), D the particle's largest
extent; coarser grids give 10–30 % per-pixel errors. Trilinear interpolation of F at step
1/(k D) has a worst-case amplitude error ≈ (π/k)²/8 of the local fringe envelope, i.e. a
median per-pixel intensity error of ≈ 7 % (k = 4), 2 % (k = 8, the default), 0.9 % (k = 12).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import erfc, ndtr, owens_t

from diffdask.backend import array_namespace
from diffdask.checks import check_nonnegative, check_positive, check_range
from diffdask.errors import ParameterError
from diffdask.simulate.atoms import atomic_form_factor, read_pdb
from diffdask.simulate.common import apply_matrices

SHAPES = ("sphere", "ellipsoid", "cube", "superellipsoid", "icosahedral_shell", "pdb")
#: Shapes whose structure factor has a closed form.
EXACT_SHAPES = ("sphere", "ellipsoid", "cube", "pdb")

#: Typical electron density of protein, e⁻/nm³ (1.35 g/cm³, 0.54 e⁻ per dalton).
PROTEIN_E_PER_NM3 = 430.0
#: Size of a particle when none is given, nm (PR772-like).
DEFAULT_DIAMETER_NM = 70.0
#: Smallest allowed grid oversampling k (reciprocal step 1/(k D)).
MIN_OVERSAMPLING = 4.0
#: Largest reciprocal-space grid built without being asked for explicitly, bytes.
MAX_VOLUME_BYTES = 1 << 30


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
            return rho * 0.5 * erfc(_box_distance(r, self.semi_axes_nm(diameter_nm)) * scale)
        if self.shape in ("sphere", "ellipsoid", "superellipsoid"):
            a = self.semi_axes_nm(diameter_nm)
            p = self.exponent if self.shape == "superellipsoid" else 2.0
            dist, curvature = _superellipsoid_surface(r, a, p)
            # The blurred indicator of a curved body is ½ erfc(d/(√2σ)) − σH e^(−d²/2σ²)/√(2π)
            # to second order in σ/R (H the mean curvature); without the curvature term F would
            # be off by ~σ/R at high |s|. Curvature radii below σ (sharp edges) are clipped.
            bend = np.clip(sigma_nm * curvature, -1.0, 1.0)
            return rho * (0.5 * erfc(dist * scale) - bend * np.exp(-((dist * scale) ** 2)) / math.sqrt(2.0 * math.pi))
        if self.shape == "icosahedral_shell":
            outer = 0.5 * diameter_nm
            inner = outer * (1.0 - self.shell_fraction)
            occ_out = _icosahedron_occupancy(r, outer, sigma_nm)
            occ_in = _icosahedron_occupancy(r, inner, sigma_nm) if inner > 0 else 0.0
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


def _superellipsoid_surface(r: np.ndarray, a: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance to the surface Σ|x_i/a_i|^p = 1 and the level set's mean curvature.

    g(r) = (Σ|x_i/a_i|^p)^(1/p) is homogeneous of degree 1; the distance is the step along
    the normal to g = 1, to second order (exact for the sphere). With u_i = |x_i|/a_i,
    G = ∇g has G_i = (u_i/g)^(p−1) sign(x_i)/a_i and the Hessian is
    (p−1)/g [diag((u_i/g)^(p−2)/a_i²) − G Gᵀ], so the mean curvature ½ ∇·(G/|G|) is
    (p−1)/(2 g |G|) Σ (1 − n_i²)(u_i/g)^(p−2)/a_i², n = G/|G| (1/r for a sphere).
    """
    u = [np.abs(r[i]) / a[i] for i in range(3)]
    umax = np.maximum(np.maximum(u[0], u[1]), u[2])
    umax_safe = np.where(umax > 0, umax, 1.0)
    # Factor out the largest term: large p would otherwise overflow.
    g = umax * sum((ui / umax_safe) ** p for ui in u) ** (1.0 / p)
    g_safe = np.where(g > 0, g, 1.0)
    ratio = [ui / g_safe for ui in u]
    grad = [ri ** (p - 1.0) / ai for ri, ai in zip(ratio, a)]
    grad_norm = np.sqrt(sum(gi * gi for gi in grad))
    grad_norm = np.where(grad_norm > 0, grad_norm, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        diag = [np.where(ri > 0, ri ** (p - 2.0), 0.0 if p > 2 else 1.0) / ai**2 for ri, ai in zip(ratio, a)]
    normal2 = [(gi / grad_norm) ** 2 for gi in grad]
    scale = (p - 1.0) / g_safe
    curvature = scale / (2.0 * grad_norm) * sum((1.0 - n2) * di for n2, di in zip(normal2, diag))
    # Second-order step along the normal: g(r + t n) ≈ g + t|G| + ½t² nᵀ(∇∇g)n = 1.
    normal_hessian = scale * (sum(n2 * di for n2, di in zip(normal2, diag)) - grad_norm**2)
    first = (g - 1.0) / grad_norm
    # The expansion only holds near the surface (the Hessian diverges at the centre); bounding
    # the correction by |first|/2 keeps the sign, and |d| ≫ σ there anyway.
    step2 = np.clip(0.5 * first**2 * normal_hessian / grad_norm, -0.5 * np.abs(first), 0.5 * np.abs(first))
    dist = np.where(g > 0, first + step2, -1.0 / np.max(1.0 / a))
    return dist, curvature


def _box_distance(r: np.ndarray, a: np.ndarray) -> np.ndarray:
    q = [np.abs(r[i]) - a[i] for i in range(3)]
    outside = np.sqrt(sum(np.maximum(qi, 0.0) ** 2 for qi in q))
    inside = np.minimum(np.maximum(np.maximum(q[0], q[1]), q[2]), 0.0)
    return outside + inside


def _icosahedron_normals() -> np.ndarray:
    phi = (1.0 + math.sqrt(5.0)) / 2.0
    # Face normals of the icosahedron with vertices (0, ±1, ±φ) and cyclic permutations are
    # the dodecahedron's vertex directions.
    normals = [(sx, sy, sz) for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
    for s1 in (-1, 1):
        for s2 in (-1, 1):
            normals += [(0, s1 / phi, s2 * phi), (s1 / phi, s2 * phi, 0), (s2 * phi, 0, s1 / phi)]
    n = np.asarray(normals, dtype=float)
    return n / np.linalg.norm(n, axis=1, keepdims=True)


_ICOSA_NORMALS = _icosahedron_normals()
_PHI = (1.0 + math.sqrt(5.0)) / 2.0
#: Inradius / circumradius of the icosahedron, φ²/(√3 √(1 + φ²)).
ICOSAHEDRON_IN_OVER_CIRCUM = _PHI**2 / (math.sqrt(3.0) * math.sqrt(1.0 + _PHI**2))


def bivariate_normal_cdf(h: np.ndarray, k: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """P(X < h, Y < k) for standard normals X, Y of correlation ρ (|ρ| < 1).

    Owen (1956): ½Φ(h) + ½Φ(k) − T(h, a_h) − T(k, a_k) − β with a_h = (k − ρh)/(h√(1 − ρ²)),
    a_k = (h − ρk)/(k√(1 − ρ²)), T Owen's function and β = ½ when h and k have opposite signs.
    """
    h = np.where(h == 0, 1e-300, h)
    k = np.where(k == 0, 1e-300, k)
    root = np.sqrt(1.0 - rho * rho)
    with np.errstate(over="ignore"):
        a_h = (k - rho * h) / (h * root)
        a_k = (h - rho * k) / (k * root)
    beta = np.where(h * k > 0, 0.0, 0.5)
    return 0.5 * ndtr(h) + 0.5 * ndtr(k) - owens_t(h, a_h) - owens_t(k, a_k) - beta


def _icosahedron_occupancy(r: np.ndarray, circumradius: float, sigma: float) -> np.ndarray:
    # The icosahedron is the intersection of 20 half-spaces. Blurred by a Gaussian, a point
    # near a face sees one plane and near an edge the wedge of two, whose blurred indicator
    # is exactly a bivariate normal probability with correlation n₁·n₂; only points within
    # a few σ of a vertex, a σ³-sized volume, remain approximate.
    inradius = circumradius * ICOSAHEDRON_IN_OVER_CIRCUM
    first = np.full(r.shape[1:], -np.inf)
    second = np.full(r.shape[1:], -np.inf)
    i_first = np.zeros(r.shape[1:], dtype=np.int8)
    i_second = np.zeros(r.shape[1:], dtype=np.int8)
    for index, n in enumerate(_ICOSA_NORMALS):
        plane = n[0] * r[0] + n[1] * r[1] + n[2] * r[2] - inradius
        top = plane > first
        runner_up = ~top & (plane > second)
        second = np.where(top, first, np.where(runner_up, plane, second))
        i_second = np.where(top, i_first, np.where(runner_up, index, i_second)).astype(np.int8)
        first = np.where(top, plane, first)
        i_first = np.where(top, index, i_first).astype(np.int8)
    rho = np.einsum("...k,...k->...", _ICOSA_NORMALS[i_first], _ICOSA_NORMALS[i_second])
    return bivariate_normal_cdf(-first / sigma, -second / sigma, rho)


# ---------------------------------------------------------------------- reciprocal grids
@dataclass(frozen=True)
class FormFactorVolume:
    """A particle's structure factor tabulated on a cubic reciprocal-space grid.

    Attributes
    ----------
    values : ndarray, shape (n, n, n)
        F (electrons) along body (x, y, z). For an ``even`` particle (F(±s_x, ±s_y, ±s_z)
        all equal: every built-in continuum shape) only the octant s ≥ 0 is stored, index i
        at s = i·step; otherwise index i at s = (i − (n − 1)/2)·step. float32 when F is real,
        complex64 for atoms.
    step_inv_nm : float
        Grid step, nm⁻¹.
    diameter_nm : float
        Diameter the grid was built for; a particle of diameter d has
        F_d(s) = (d/d₀)³ F_d₀(s d/d₀).
    even : bool
        Whether ``values`` holds one octant.
    """

    values: Any
    step_inv_nm: float
    diameter_nm: float
    even: bool

    @property
    def center(self) -> float:
        """Index of s = 0 along each axis."""
        return 0.0 if self.even else (self.values.shape[0] - 1) / 2.0

    @property
    def s_max_inv_nm(self) -> float:
        """Largest |s| along each axis that interpolation reaches, nm⁻¹."""
        return (self.values.shape[0] - 1 - self.center) * self.step_inv_nm

    def sample(self, rotation: Any, s_lab: Any, scale: Any) -> Any:
        """F of rotated, scaled particles on the Ewald sphere, by trilinear slicing.

        Parameters
        ----------
        rotation : array, shape (m, 3, 3)
            Active rotation matrices R of the ``m`` particles (body → laboratory).
        s_lab : array, shape (3, P), float32
            Laboratory scattering vectors, nm⁻¹ (NumPy or CuPy); the body frame sees Rᵀs.
        scale : array, shape (m,)
            Diameter of each particle over ``diameter_nm``.

        Returns
        -------
        array, shape (m, P)
            (d/d₀)³ F_d₀(Rᵀ s d/d₀), electrons.
        """
        xp = array_namespace(s_lab)
        k = np.asarray(scale, dtype=np.float32)
        # Fold the scale and the grid step into the 3×3 matrices: one pass less over (m, 3, P).
        to_grid = np.asarray(rotation, dtype=np.float32).transpose(0, 2, 1) * (k / np.float32(self.step_inv_nm))[:, None, None]
        g = apply_matrices(to_grid, s_lab)
        if self.even:
            xp.abs(g, out=g)
        else:
            g += np.float32(self.center)
        k = xp.asarray(k)
        if np.iscomplexobj(self.values):
            f = trilinear(xp.asarray(self.values), g)
        else:
            f = _trilinear_quads(self._quads(xp), self.values.shape[0], g)
        return f * (k**3)[:, None]

    def _quads(self, xp: Any) -> Any:
        # Each voxel's four (y, z) neighbours side by side, viewed as one complex128: the
        # eight corners of a cell then take two 16-byte gathers instead of eight 4-byte
        # ones, which is what bounds slicing speed. Built once per process and kept out of
        # pickles (see __getstate__), so a Dask worker builds it on its first task.
        cache = self.__dict__.get("_quad_cache")
        if cache is None or array_namespace(cache) is not xp:
            v = xp.asarray(self.values)
            q = xp.empty(v.shape + (4,), dtype=xp.float32)
            q[..., 0] = v
            q[..., 1] = xp.roll(v, -1, axis=2)
            q[..., 2] = xp.roll(v, -1, axis=1)
            q[..., 3] = xp.roll(q[..., 1], -1, axis=1)
            cache = q.reshape(-1).view(xp.complex128)
            object.__setattr__(self, "_quad_cache", cache)
        return cache

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_quad_cache"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def required_grid_size(particle: Particle, s_max_inv_nm: float, oversampling: float = MIN_OVERSAMPLING) -> int:
    """Points per axis of a reciprocal grid spanning ±``s_max_inv_nm`` at step 1/(k D)."""
    extent = 2.0 * particle.bounding_radius_nm(particle.size_range_nm[1])
    return 2 * (int(math.ceil(s_max_inv_nm * oversampling * extent)) + 1) + 1


def form_factor_volume(
    particle: Particle,
    s_max_inv_nm: float,
    oversampling: float = 8.0,
    grid_size: int | None = None,
) -> FormFactorVolume:
    """Tabulate a particle's structure factor on a reciprocal grid for Ewald-sphere slicing.

    Parameters
    ----------
    particle : Particle
        The particle, built at its largest diameter (smaller ones reuse the grid by scaling).
    s_max_inv_nm : float
        Largest |s| that will be sampled, nm⁻¹ (the detector's corner).
    oversampling : float
        k in the grid step 1/(k D), D the particle's largest extent; ≥ 4. The default 8 keeps
        the median per-pixel intensity error of trilinear slicing near 2 %.
    grid_size : int, optional
        Points per axis of the grid spanning ±``s_max_inv_nm``, overriding
        ``oversampling``; it must still give a step ≤ 1/(4 D).

    Returns
    -------
    FormFactorVolume

    Raises
    ------
    ParameterError
        If the grid is too coarse for the particle (the message gives the needed
        ``grid_size``) or would exceed `MAX_VOLUME_BYTES` without an explicit ``grid_size``.
    """
    s_max = check_positive("s_max_inv_nm", s_max_inv_nm, "nm⁻¹")
    d0 = particle.size_range_nm[1]
    extent = 2.0 * particle.bounding_radius_nm(d0)
    needed = required_grid_size(particle, s_max, MIN_OVERSAMPLING)
    even = particle.shape != "pdb"
    if grid_size is None:
        k = check_positive("oversampling", oversampling)
        if k < MIN_OVERSAMPLING:
            raise ParameterError(
                f"oversampling={k} gives a reciprocal step 1/({k:g} D) coarser than 1/(4 D), which "
                "causes 10–30 % per-pixel errors; use oversampling ≥ 4 (default 8)."
            )
        n = required_grid_size(particle, s_max, k)
        nbytes = ((n + 1) // 2) ** 3 * 4 if even else n**3 * 8
        if nbytes > MAX_VOLUME_BYTES:
            raise ParameterError(
                f"the reciprocal grid for a {extent:.4g} nm particle up to |s| = {s_max:.4g} nm⁻¹ would take "
                f"{nbytes / 2**30:.1f} GiB; lower oversampling (≥ 4 needs grid_size={needed}), crop the "
                "detector, or pass grid_size explicitly."
            )
    else:
        n = int(grid_size)
        if n < needed:
            raise ParameterError(
                f"grid_size={grid_size} is too coarse for a particle of extent {extent:.4g} nm up to "
                f"|s| = {s_max:.4g} nm⁻¹: the reciprocal step must be ≤ 1/(4·{extent:.4g} nm), which needs "
                f"grid_size ≥ {needed}."
            )
    half = (n - 1) // 2
    step = s_max / (half - 1)
    axis = np.arange(0 if even else -half, half + 1) * step
    if particle.exact:
        values = _tabulate_exact(particle, axis, d0)
    else:
        values = _transform_density(particle, axis, d0, s_max)
    return FormFactorVolume(values=values, step_inv_nm=float(step), diameter_nm=float(d0), even=even)


def _tabulate_exact(particle: Particle, axis: np.ndarray, diameter: float) -> np.ndarray:
    n = axis.size
    real = particle.shape != "pdb"
    out = np.empty((n, n, n), dtype=np.float32 if real else np.complex64)
    sy, sz = np.meshgrid(axis, axis, indexing="ij")
    for i in range(n):
        s = np.stack([np.full(sy.size, axis[i]), sy.ravel(), sz.ravel()])[None]
        f = particle.structure_factor(s, np.array([diameter]))[0]
        out[i] = (f.real if real else f).reshape(n, n)
    return out


def _transform_density(particle: Particle, axis: np.ndarray, diameter: float, s_max: float) -> np.ndarray:
    # Real-space spacing with Nyquist at ≥ 2 s_max and a blur σ = dx: aliases then come from
    # |s| ≥ 3 s_max, where the Gaussian is below 2e-5, and the deconvolution gain at s_max
    # is at most exp(2π²/16) ≈ 3.4. σ also stays below 1/16 of the curvature scale, since the
    # blurred-surface model is exact only to second order in σ over the curvature radius.
    dx = min(1.0 / (4.0 * s_max), particle.curvature_scale_nm(diameter) / 16.0)
    sigma = dx
    half = int(math.ceil((particle.bounding_radius_nm(diameter) + 6.0 * sigma) / dx))
    x = np.arange(-half, half + 1) * dx
    grid = np.stack(np.meshgrid(x, x, x, indexing="ij"))
    rho = particle.density(grid, diameter, sigma)
    del grid
    # The built-in bodies are even in each body coordinate, so F is a product of cosine
    # transforms: real and separable.
    cos = np.cos(2.0 * math.pi * np.outer(axis, x)) * dx
    f = np.tensordot(cos, rho, axes=(1, 0))
    f = np.tensordot(cos, f, axes=(1, 1)).transpose(1, 0, 2)
    f = np.tensordot(f, cos, axes=(2, 1))
    s2 = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
    f *= np.exp(2.0 * math.pi**2 * sigma**2 * s2)
    return f.astype(np.float32)


def _trilinear_quads(quads: Any, n: int, coords: Any) -> Any:
    xp = array_namespace(coords)
    g = xp.clip(coords, 0.0, n - 1.0 - 1e-3)
    frac, whole = xp.modf(g)
    # Flat cell index; exact in float32 while n³ < 2²⁴, else computed in int32.
    if n**3 < 2**24:
        base = ((whole[:, 0] * n + whole[:, 1]) * n + whole[:, 2]).astype(xp.int32)
    else:
        i0 = whole.astype(xp.int32)
        base = (i0[:, 0] * n + i0[:, 1]) * n + i0[:, 2]
    fx, fy, fz = frac[:, 0], frac[:, 1], frac[:, 2]
    shape = base.shape + (4,)
    lower = xp.take(quads, base).view(xp.float32).reshape(shape)
    upper = xp.take(quads, base + n * n).view(xp.float32).reshape(shape)

    def plane(q: Any) -> Any:
        c0 = q[..., 0] + fz * (q[..., 1] - q[..., 0])
        c1 = q[..., 2] + fz * (q[..., 3] - q[..., 2])
        return c0 + fy * (c1 - c0)

    c_lower = plane(lower)
    return c_lower + fx * (plane(upper) - c_lower)


def trilinear(values: Any, coords: Any) -> Any:
    """Trilinear interpolation of a 3-D grid at many points.

    Parameters
    ----------
    values : array, shape (n, n, n)
        Grid values (NumPy or CuPy, real or complex).
    coords : array, shape (m, 3, P)
        Fractional indices (i, j, k) of the points; points beyond the grid are clamped to
        its edge cells.

    Returns
    -------
    array, shape (m, P)
    """
    xp = array_namespace(coords)
    n = values.shape[0]
    flat = values.reshape(-1)
    g = xp.clip(coords, 0.0, n - 1.0 - 1e-3)
    frac, whole = xp.modf(g)
    f = frac.astype(values.real.dtype, copy=False)
    i0 = whole.astype(xp.int32)
    base = (i0[:, 0] * n + i0[:, 1]) * n + i0[:, 2]
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    nn = n * n

    def along_z(b: Any) -> Any:
        v0 = xp.take(flat, b)
        return v0 + fz * (xp.take(flat, b + 1) - v0)

    c00, c01 = along_z(base), along_z(base + n)
    c10, c11 = along_z(base + nn), along_z(base + nn + n)
    c0 = c00 + fy * (c01 - c00)
    c1 = c10 + fy * (c11 - c10)
    return c0 + fx * (c1 - c0)
