"""Surfaces of the continuum particle shapes, for their densities blurred by a Gaussian.

Signed distances to the surface (superellipsoids, of which spheres and ellipsoids are cases,
and boxes), the mean curvature of a superellipsoid's surface and the blurred occupancy of an
icosahedron, from which `diffdask.simulate.particles.Particle.density` builds the real-space
density of each shape. Pure NumPy/SciPy on position grids (nm).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr, owens_t

_PHI = (1.0 + math.sqrt(5.0)) / 2.0
#: Inradius / circumradius of the icosahedron, φ²/(√3 √(1 + φ²)).
ICOSAHEDRON_IN_OVER_CIRCUM = _PHI**2 / (math.sqrt(3.0) * math.sqrt(1.0 + _PHI**2))


def superellipsoid_surface(r: np.ndarray, a: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
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


def box_distance(r: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Signed distance (nm) from body positions ``r`` (3, ...) to the box |x_i| ≤ a_i; < 0 inside."""
    q = [np.abs(r[i]) - a[i] for i in range(3)]
    outside = np.sqrt(sum(np.maximum(qi, 0.0) ** 2 for qi in q))
    inside = np.minimum(np.maximum(np.maximum(q[0], q[1]), q[2]), 0.0)
    return outside + inside


def _icosahedron_normals() -> np.ndarray:
    # Face normals of the icosahedron with vertices (0, ±1, ±φ) and cyclic permutations are
    # the dodecahedron's vertex directions.
    normals = [(sx, sy, sz) for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
    for s1 in (-1, 1):
        for s2 in (-1, 1):
            normals += [(0, s1 / _PHI, s2 * _PHI), (s1 / _PHI, s2 * _PHI, 0), (s2 * _PHI, 0, s1 / _PHI)]
    n = np.asarray(normals, dtype=float)
    return n / np.linalg.norm(n, axis=1, keepdims=True)


_ICOSA_NORMALS = _icosahedron_normals()


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


def icosahedron_occupancy(r: np.ndarray, circumradius: float, sigma: float) -> np.ndarray:
    """Occupancy in [0, 1] of a centred icosahedron blurred by a Gaussian of width σ.

    Parameters
    ----------
    r : ndarray, shape (3, ...)
        Body-frame positions (x, y, z), nm; vertices along (0, ±1, ±φ) and its cyclic permutations.
    circumradius : float
        Centre-to-vertex distance, nm.
    sigma : float
        Blur width σ, nm.
    """
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
