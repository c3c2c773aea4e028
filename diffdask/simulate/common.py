"""Pieces every simulator shares: per-frame seeding, orientations, detector masks, noise.

Determinism: every random number of frame ``f`` comes from generators keyed by
``(seed, stream, f)``, never by the chunk, so the bytes of a simulated stack do not depend
on the chunking or on the number of workers. Streams keep unrelated draws apart: switching
the Poisson noise off does not change the orientations or the fluences.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffdask.backend import array_namespace, to_cpu
from diffdask.checks import check_int, check_nonnegative
from diffdask.errors import ParameterError
from diffdask.geometry import Geometry

#: Classical electron radius r_e, metres (CODATA 2018).
ELECTRON_RADIUS_M = 2.8179403262e-15

#: Random streams of one frame (the second entry of its seed key).
STREAM_PARAMETERS = 0
STREAM_NOISE = 1
STREAM_DETECTOR = 2


def frame_rng(seed: int, stream: int, frame: int) -> np.random.Generator:
    """The random generator of one frame and one stream.

    Parameters
    ----------
    seed : int
        The user's seed (≥ 0).
    stream : int
        What the numbers are for (`STREAM_PARAMETERS`, `STREAM_NOISE`, ...).
    frame : int
        Global frame index.
    """
    return np.random.default_rng([int(seed), int(stream), int(frame)])


def random_quaternion(rng: np.random.Generator) -> np.ndarray:
    """A rotation drawn uniformly on SO(3), as a unit quaternion ``(w, x, y, z)`` with w ≥ 0.

    A normalised 4-D standard normal vector is uniform on the 3-sphere, which covers SO(3)
    twice with Haar measure; fixing the sign of w picks one of the two equivalent quaternions.
    """
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    return -q if q[0] < 0 else q


def quaternion_to_matrix(q: Any) -> Any:
    """Rotation matrices of unit quaternions.

    Parameters
    ----------
    q : array, shape (..., 4)
        Unit quaternions ``(w, x, y, z)``.

    Returns
    -------
    array, shape (..., 3, 3)
        Active rotation matrices R: a body vector r is at ``R @ r`` in the laboratory frame.
    """
    xp = array_namespace(q)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return xp.stack([xp.stack(r, axis=-1) for r in rows], axis=-2)


def apply_matrices(matrices: Any, vectors: Any) -> Any:
    """Many 3×3 matrices applied to one set of 3-vectors, with bit-reproducible results.

    BLAS (``@``) picks kernels, with or without fused multiply-adds, by the number of rows
    and threads, so the same product could differ in the last bit between a chunk of 5 and
    a chunk of 23 frames; plain element-wise products and sums in a fixed order cannot.

    Parameters
    ----------
    matrices : array, shape (m, 3, 3)
    vectors : array, shape (3, P)

    Returns
    -------
    array, shape (m, 3, P)
    """
    xp = array_namespace(vectors)
    mat = xp.asarray(matrices, dtype=vectors.dtype)
    out = xp.empty((mat.shape[0], 3, vectors.shape[1]), dtype=vectors.dtype)
    for i in range(3):
        out[:, i] = mat[:, i, 0, None] * vectors[0]
        out[:, i] += mat[:, i, 1, None] * vectors[1]
        out[:, i] += mat[:, i, 2, None] * vectors[2]
    return out


def dot_vectors(points: Any, vectors: Any) -> Any:
    """Dot products t·s of points (m, 3) with vectors (3, P) → (m, P), bit-reproducible."""
    xp = array_namespace(vectors)
    t = xp.asarray(points, dtype=vectors.dtype)
    out = t[:, 0, None] * vectors[0]
    out += t[:, 1, None] * vectors[1]
    out += t[:, 2, None] * vectors[2]
    return out


def random_unit_vector(rng: np.random.Generator) -> np.ndarray:
    """A direction drawn uniformly on the unit sphere, shape (3,)."""
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def detector_mask(
    geometry: Geometry,
    gap_px: int = 0,
    beamstop_radius_px: float = 0.0,
    gap_offset_px: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Good-pixel mask of a four-panel detector with a central beamstop.

    Parameters
    ----------
    geometry : Geometry
        Detector shape and beam centre.
    gap_px : int
        Width in pixels of the horizontal and vertical gaps between the four panels (0: one
        monolithic panel). The gaps are fixed to the detector, centred on its middle shifted
        by ``gap_offset_px``, not on the beam, as on a real segmented detector.
    beamstop_radius_px : float
        Radius in pixels of the beamstop disc centred on the direct beam (0: none).
    gap_offset_px : (float, float)
        Shift (rows, columns) of the gap cross from the detector's middle, pixels.

    Returns
    -------
    ndarray of bool, shape (ny, nx)
        True = good pixel.
    """
    if not isinstance(geometry, Geometry):
        raise ParameterError(f"geometry must be a diffdask.Geometry, got {type(geometry).__name__}.")
    gap_px = check_int("gap_px", gap_px, 0, what="pixels")
    radius = check_nonnegative("beamstop_radius_px", beamstop_radius_px, "pixels")
    ny, nx = geometry.shape
    good = np.ones((ny, nx), dtype=bool)
    if gap_px:
        gap = int(gap_px)
        for axis, n in enumerate((ny, nx)):
            first = int(round((n - gap) / 2 + gap_offset_px[axis]))
            lo, hi = max(first, 0), min(first + gap, n)
            if axis == 0:
                good[lo:hi, :] = False
            else:
                good[:, lo:hi] = False
    if radius > 0:
        good &= geometry.radius_px > radius
    if not good.any():
        raise ParameterError(
            f"the gaps ({gap_px} px) and beamstop (radius {radius:g} px) mask every pixel of a {ny}×{nx} "
            "detector; use a larger detector or a smaller gap or beamstop."
        )
    return good


def poisson_frames(mu: Any, seed: int, first_frame: int, stream: int = STREAM_NOISE) -> np.ndarray:
    """Photon counts drawn from per-frame Poisson generators.

    The draw runs on the host from NumPy generators keyed by the global frame index, so the
    counts are the same bytes whatever the chunking and whether ``mu`` came from the CPU or
    a GPU.

    Parameters
    ----------
    mu : array, shape (n, ...)
        Expected photons per pixel (≥ 0), NumPy or CuPy.
    seed : int
        The simulation seed.
    first_frame : int
        Global index of ``mu[0]``.

    Returns
    -------
    ndarray of float32, shape of ``mu``
        Photon counts (integers stored as float32, exact below 2²⁴).
    """
    mu = np.asarray(to_cpu(mu), dtype=np.float64)
    out = np.empty(mu.shape, dtype=np.float32)
    for k in range(mu.shape[0]):
        out[k] = frame_rng(seed, stream, first_frame + k).poisson(mu[k])
    return out
