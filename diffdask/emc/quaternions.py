"""Orientation sets for 3D EMC: Dragonfly's refined 600-cell and point-group fundamental zones.

Quaternions are unit ``(w, x, y, z)``, scalar first; q and −q are the same rotation and only
one of them is listed. `quaternion_set` builds Dragonfly's sampling (``make_quaternion``):
the 120 vertices of the 600-cell, which tiles S³ with 600 regular tetrahedra, with every edge,
triangle and cell divided into ``n`` parts along each side; the lattice points are projected
onto S³ and weighted by the area change of that projection, f·(v·c)/(|v|⁴|c|) (v the point
before projection, c the centre of a cell that holds it, f = 5/6 for vertices, 35/36 for edge
points, 1 otherwise). That gives 10(5n³ + n) rotations, with neighbours about 72°/n apart.

`fundamental_zone` keeps the rotations that are closest to the identity among their images
under a point group G (orientation R and R·g explain a frame of a G-symmetric object equally),
so a G-symmetric model needs only about 1/|G| of them.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np

from diffdask.checks import check_choice, check_int
from diffdask.errors import ParameterError

TAU = (1.0 + 5.0**0.5) / 2.0
#: Largest refinement level: 10(5n³+n) rotations at n = 100 are 5·10⁷ already.
MAX_LEVEL = 100
#: Point groups by the names users give them (Schoenflies; for intensities with Friedel's law
#: the inversion is implied, so Oh ≡ O and Ih ≡ I).
POINT_GROUPS = {"1": "1", "C1": "1", "O": "O", "Oh": "O", "octahedral": "O", "I": "I", "Ih": "I", "icosahedral": "I"}


def _even_permutations() -> list[tuple[int, ...]]:
    def parity(p: tuple[int, ...]) -> int:
        return sum(1 for i in range(4) for j in range(i + 1, 4) if p[i] > p[j]) % 2

    return [p for p in itertools.permutations(range(4)) if parity(p) == 0]


@lru_cache(maxsize=1)
def cell600_vertices() -> np.ndarray:
    """The 120 unit quaternions of the 600-cell (the binary icosahedral group), shape (120, 4)."""
    verts = []
    for i in range(4):
        for s in (1.0, -1.0):
            v = np.zeros(4)
            v[i] = s
            verts.append(v)
    verts += [np.array(signs) for signs in itertools.product((0.5, -0.5), repeat=4)]
    base = (TAU, 1.0, 1.0 / TAU, 0.0)
    for perm in _even_permutations():
        for signs in itertools.product((1.0, -1.0), repeat=3):
            v = np.array([base[0] * signs[0], base[1] * signs[1], base[2] * signs[2], 0.0]) / 2.0
            verts.append(v[list(perm)])
    out = np.array(verts)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=1)
def _cells() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges (720, 2), triangles (1200, 3) and tetrahedra (600, 4) of the 600-cell, as vertex indices."""
    v = cell600_vertices()
    near = np.isclose(v @ v.T, TAU / 2.0)
    edges = np.array([(i, j) for i, j in zip(*np.nonzero(np.triu(near)))])
    faces = np.array([(i, j, k) for i, j in edges for k in range(j + 1, 120) if near[i, k] and near[j, k]])
    cells = np.array([(i, j, k, m) for i, j, k in faces for m in range(k + 1, 120) if near[i, m] and near[j, m] and near[k, m]])
    return edges, faces, cells


def _compositions(n: int, parts: int) -> np.ndarray:
    """All tuples of ``parts`` positive integers summing to ``n``, lexicographic."""
    return np.array([c for c in itertools.product(range(1, n), repeat=parts) if sum(c) == n], dtype=float).reshape(-1, parts)


def _canonical(q: np.ndarray) -> np.ndarray:
    """Whether each quaternion is the listed one of its ± pair: its first non-zero component is positive."""
    rounded = np.where(np.abs(q) < 1e-9, 0.0, q)
    first = np.argmax(rounded != 0, axis=1)
    return rounded[np.arange(q.shape[0]), first] > 0


def quaternion_set(level: int) -> tuple[np.ndarray, np.ndarray]:
    """Dragonfly's quaternion sampling of SO(3) at refinement ``level`` n.

    Parameters
    ----------
    level : int
        Divisions n ≥ 1 of each 600-cell edge.

    Returns
    -------
    quaternions : ndarray, shape (10(5n³+n), 4)
        Unit quaternions (w, x, y, z), vertex points first, then edge, face and cell points.
    weights : ndarray, shape (10(5n³+n),)
        Sampling weights, normalised to sum 1.

    Raises
    ------
    ParameterError
        For a level that is not an integer in [1, `MAX_LEVEL`].
    """
    n = check_int("quaternion level", level, minimum=1, maximum=MAX_LEVEL)
    v = cell600_vertices()
    edges, faces, cells = _cells()
    centres = v[cells].sum(axis=1)  # (600, 4)
    # A cell holding each edge/face: the first in cell order that contains it.
    cell_sets = [set(c) for c in cells.tolist()]

    def holder(simplex: np.ndarray) -> np.ndarray:
        return np.array([next(c for c, s in enumerate(cell_sets) if set(p) <= s) for p in simplex.tolist()])

    vertex_cell = holder(np.arange(120)[:, None])
    points = [v]
    cell_of = [vertex_cell]
    factor = [np.full(120, 5.0 / 6.0)]
    for simplex, parts, f in ((edges, 2, 35.0 / 36.0), (faces, 3, 1.0), (cells, 4, 1.0)):
        lattice = _compositions(n, parts) / n  # barycentric coordinates, all positive
        if lattice.size == 0:
            continue
        pts = np.einsum("lp,spc->slc", lattice, v[simplex]).reshape(-1, 4)
        owner = np.arange(len(cells)) if parts == 4 else holder(simplex)
        points.append(pts)
        cell_of.append(np.repeat(owner, lattice.shape[0]))
        factor.append(np.full(pts.shape[0], f))
    raw = np.concatenate(points)
    owner = np.concatenate(cell_of)
    c = centres[owner]
    norm = np.linalg.norm(raw, axis=1)
    weight = np.concatenate(factor) * np.einsum("ij,ij->i", raw, c) / (norm**4 * np.linalg.norm(c, axis=1))
    quats = raw / norm[:, None]
    keep = _canonical(quats)
    quats, weight = quats[keep], weight[keep]
    expected = 10 * (5 * n**3 + n)
    if quats.shape[0] != expected:  # pragma: no cover - a broken construction, not a user error
        raise AssertionError(f"quaternion level {n} gave {quats.shape[0]} rotations, expected {expected}.")
    return quats, weight / weight.sum()


def group_quaternions(point_group: str) -> np.ndarray:
    """Unit quaternions of a point group's rotations (one of each ± pair), shape (|G|, 4).

    ``"1"`` (no symmetry), ``"O"`` (the 24 rotations of a cube; also ``"Oh"``, ``"octahedral"``),
    ``"I"`` (the 60 rotations of an icosahedron with 2-fold axes along x, y, z; also ``"Ih"``,
    ``"icosahedral"``).
    """
    group = POINT_GROUPS[check_choice("point group", point_group, tuple(POINT_GROUPS))]
    if group == "1":
        return np.array([[1.0, 0.0, 0.0, 0.0]])
    if group == "I":
        q = cell600_vertices()
    else:
        axes = [np.eye(4)[i] for i in range(4)]
        halves = [np.array(s) / 2.0 for s in itertools.product((1.0, -1.0), repeat=4)]
        diag = []
        for i, j in itertools.combinations(range(4), 2):
            for si, sj in itertools.product((1.0, -1.0), repeat=2):
                e = np.zeros(4)
                e[i], e[j] = si, sj
                diag.append(e / 2.0**0.5)
        q = np.array(axes + halves + diag)
    return q[_canonical(q)]


def multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton products a·b of quaternion arrays (broadcast over leading axes)."""
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack(
        [aw * bw - ax * bx - ay * by - az * bz,
         aw * bx + ax * bw + ay * bz - az * by,
         aw * by - ax * bz + ay * bw + az * bx,
         aw * bz + ax * by - ay * bx + az * bw],
        axis=-1,
    )  # fmt: skip


def fundamental_zone(quaternions: np.ndarray, weights: np.ndarray, point_group: str) -> tuple[np.ndarray, np.ndarray]:
    """The rotations of a set that lie in the fundamental zone of a point group.

    A rotation q is kept when no symmetry image q·g (g ∈ G) is closer to the identity
    (|w| largest). A rotation on the zone's boundary, with m images as close as itself, keeps
    1/m of its weight; the weights are renormalised to sum 1.

    Parameters
    ----------
    quaternions : ndarray, shape (R, 4)
    weights : ndarray, shape (R,)
    point_group : str
        See `group_quaternions`.

    Returns
    -------
    quaternions, weights : ndarray
        The kept rotations (in their original order) and their weights.
    """
    q = np.asarray(quaternions, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != 4 or w.shape != (q.shape[0],):
        raise ParameterError(f"quaternions must be (R, 4) with one weight each, got {q.shape} and {w.shape}.")
    g = group_quaternions(point_group)
    closeness = np.abs(multiply(q[:, None, :], g[None, :, :])[..., 0])  # (R, |G|)
    best = closeness.max(axis=1)
    keep = np.abs(q[:, 0]) >= best - 1e-10
    ties = np.sum(closeness >= best[:, None] - 1e-10, axis=1)
    kept_w = w[keep] / ties[keep]
    return q[keep], kept_w / kept_w.sum()
