"""Detector geometry: pixel radii, scattering angles, q, solid angles and polar grids.

Conventions (kept everywhere in diffdask):

- pixel centres sit at integer indices; ``(i, j)`` is (row, column) = (y, x);
- the detector is flat and normal to the beam, which travels along +z;
- ``beam_center_yx`` is where the direct beam meets the detector, in pixel-index units;
- q = 4π sinθ / λ in nm⁻¹, with 2θ the scattering angle;
- angles are radians; the azimuth φ = atan2(y − cy, x − cx) runs from +x towards +y.

This is the only module that computes these maps; everything else asks a `Geometry`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

import numpy as np

from diffdask.checks import check_positive
from diffdask.errors import GeometryError, ParameterError

#: Dataset attribute names that hold a geometry (all lengths in metres, centre in pixels).
GEOMETRY_ATTRS = ("wavelength_m", "distance_m", "pixel_size_m", "beam_center_yx")

_POLARIZATIONS = ("x", "y", "none")


def ray_polarization_factor(unit_vectors: np.ndarray, polarization: str) -> np.ndarray:
    """Thomson polarisation factor of scattered rays (the beam runs along +z).

    Parameters
    ----------
    unit_vectors : ndarray, shape (3, ...)
        Unit ray directions (x, y, z).
    polarization : {"x", "y", "none"}
        Direction of the beam's linear polarisation, or "none": P = (1 + cos² 2θ)/2.
    """
    if polarization not in _POLARIZATIONS:
        raise ParameterError(f"polarization must be one of {_POLARIZATIONS}, got {polarization!r}.")
    if polarization == "none":
        return (1.0 + unit_vectors[2] ** 2) / 2.0
    u = unit_vectors[0 if polarization == "x" else 1]
    return 1.0 - u * u


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def pixel_radius_map(shape: tuple[int, int], center_yx: tuple[float, float]) -> np.ndarray:
    """Distance of each pixel centre from ``center_yx``, in pixels (no geometry needed).

    Parameters
    ----------
    shape : tuple of int
        Detector shape ``(ny, nx)``.
    center_yx : tuple of float
        Centre ``(row, column)`` in pixel-index units; it must lie on the detector (within
        half a pixel of its edge pixels).

    Returns
    -------
    ndarray, shape (ny, nx), float64
        r = hypot(i − cy, j − cx) for the pixel at row i, column j.

    Raises
    ------
    GeometryError
        If the centre is not two finite numbers or lies off the detector.
    """
    try:
        center = tuple(float(c) for c in center_yx)
    except (TypeError, ValueError):
        raise GeometryError(f"a centre must be (row, column) in pixels, got {center_yx!r}.") from None
    if len(center) != 2 or not all(math.isfinite(c) for c in center):
        raise GeometryError(f"a centre must be two finite numbers (row, column), got {center_yx!r}.")
    for axis, (c, n) in enumerate(zip(center, shape)):
        if not -0.5 <= c <= n - 0.5:
            raise GeometryError(
                f"centre {center} lies outside the {shape[0]}×{shape[1]} detector "
                f"({'row' if axis == 0 else 'column'} must be in [-0.5, {n - 0.5}]). "
                "Give it in pixel-index units (row, column), not in metres."
            )
    i = np.arange(shape[0], dtype=float)[:, None] - center[0]
    j = np.arange(shape[1], dtype=float)[None, :] - center[1]
    return np.hypot(i, j)


@dataclass(frozen=True)
class Geometry:
    """Flat-detector geometry of a diffraction experiment.

    Parameters
    ----------
    shape : tuple of int
        Detector shape ``(ny, nx)`` in pixels.
    pixel_size_m : float or tuple of float
        Pixel pitch in metres; a pair gives ``(y, x)`` pitches of non-square pixels.
    distance_m : float
        Sample-to-detector distance in metres.
    wavelength_m : float
        X-ray wavelength in metres (1 Å = 1e-10 m).
    beam_center_yx : tuple of float, optional
        Direct-beam position in pixel-index units ``(row, column)``. Defaults to the array
        centre ``((ny - 1) / 2, (nx - 1) / 2)``. It must lie on the detector (within half a
        pixel of its edge pixels).

    Raises
    ------
    GeometryError
        For non-positive or non-finite lengths, a bad shape, or a beam centre off the detector.

    Examples
    --------
    >>> g = Geometry((128, 128), pixel_size_m=75e-6, distance_m=0.2, wavelength_m=1e-10)
    >>> float(g.q_inv_nm[64, 127]) > 0
    True
    """

    shape: tuple[int, int]
    pixel_size_m: float | tuple[float, float]
    distance_m: float
    wavelength_m: float
    beam_center_yx: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(n) for n in self.shape)
        except (TypeError, ValueError):
            raise GeometryError(f"shape must be (ny, nx) integers, got {self.shape!r}.") from None
        if len(shape) != 2 or min(shape) < 1:
            raise GeometryError(f"shape must be two positive integers (ny, nx), got {self.shape!r}.")
        ps = self.pixel_size_m
        if np.ndim(ps) == 0:
            pixel = check_positive("pixel_size_m", ps, "metres", GeometryError)
        else:
            pair = tuple(np.asarray(ps, dtype=float).ravel())
            if len(pair) != 2:
                raise GeometryError(f"pixel_size_m must be one pitch or a (y, x) pair, got {ps!r}.")
            pixel = tuple(
                check_positive(f"pixel_size_m[{axis}]", v, "metres", GeometryError) for axis, v in zip("yx", pair)
            )
            if pixel[0] == pixel[1]:
                pixel = pixel[0]
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "pixel_size_m", pixel)
        object.__setattr__(self, "distance_m", check_positive("distance_m", self.distance_m, "metres", GeometryError))
        object.__setattr__(self, "wavelength_m", check_positive("wavelength_m", self.wavelength_m, "metres", GeometryError))
        if self.beam_center_yx is None:
            center = ((shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0)
        else:
            try:
                center = tuple(float(c) for c in self.beam_center_yx)
            except (TypeError, ValueError):
                raise GeometryError(
                    f"beam_center_yx must be (row, column) in pixels, got {self.beam_center_yx!r}."
                ) from None
            if len(center) != 2 or not all(math.isfinite(c) for c in center):
                raise GeometryError(
                    f"beam_center_yx must be two finite numbers (row, column), got {self.beam_center_yx!r}."
                )
        for axis, (c, n) in enumerate(zip(center, shape)):
            if not -0.5 <= c <= n - 0.5:
                raise GeometryError(
                    f"beam centre {center} lies outside the {shape[0]}×{shape[1]} detector "
                    f"({'row' if axis == 0 else 'column'} must be in [-0.5, {n - 0.5}]). "
                    "Give beam_center_yx in pixel-index units (row, column), not in metres."
                )
        object.__setattr__(self, "beam_center_yx", center)

    # The cached maps can be large (detector-sized float64); never ship them in a Dask graph.
    def __getstate__(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)

    # ------------------------------------------------------------------ attrs round trip
    def to_attrs(self) -> dict[str, Any]:
        """Geometry as JSON-serialisable Dataset attributes (lengths in metres)."""
        ps = self.pixel_size_m
        return {
            "wavelength_m": self.wavelength_m,
            "distance_m": self.distance_m,
            "pixel_size_m": list(ps) if isinstance(ps, tuple) else ps,
            "beam_center_yx": list(self.beam_center_yx),
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], shape: tuple[int, int]) -> Geometry | None:
        """Rebuild a geometry from Dataset attributes, or None if the attrs hold none.

        Raises
        ------
        GeometryError
            If some but not all geometry attributes are present, or their values are invalid.
        """
        present = [k for k in ("wavelength_m", "distance_m", "pixel_size_m") if k in attrs]
        if not present:
            return None
        missing = [k for k in ("wavelength_m", "distance_m", "pixel_size_m") if k not in attrs]
        if missing:
            raise GeometryError(
                f"the dataset attrs hold part of a geometry ({', '.join(present)}) but not "
                f"{', '.join(missing)}; set all of them (e.g. ds.attrs.update(Geometry(...).to_attrs()))."
            )
        return cls(
            shape=shape,
            pixel_size_m=attrs["pixel_size_m"],
            distance_m=attrs["distance_m"],
            wavelength_m=attrs["wavelength_m"],
            beam_center_yx=attrs.get("beam_center_yx"),
        )

    def with_beam_center(self, beam_center_yx: tuple[float, float]) -> Geometry:
        """A copy of this geometry with another beam centre (pixels)."""
        return Geometry(self.shape, self.pixel_size_m, self.distance_m, self.wavelength_m, beam_center_yx)

    # ------------------------------------------------------------------ scalar conversions
    @property
    def pixel_size_yx_m(self) -> tuple[float, float]:
        """Pixel pitch ``(y, x)`` in metres."""
        ps = self.pixel_size_m
        return ps if isinstance(ps, tuple) else (ps, ps)

    @property
    def _square_pixel_m(self) -> float:
        py, px = self.pixel_size_yx_m
        if py != px:
            raise GeometryError(
                "radius-to-q conversions need square pixels; this geometry has "
                f"(y, x) pitches {self.pixel_size_yx_m} m. Use the per-pixel maps instead."
            )
        return py

    def two_theta_of_radius_px(self, r_px: Any) -> np.ndarray:
        """Scattering angle 2θ (radians) at a distance ``r_px`` pixels from the beam centre."""
        return np.arctan(np.asarray(r_px, dtype=float) * self._square_pixel_m / self.distance_m)

    def q_of_radius_px(self, r_px: Any) -> np.ndarray:
        """Momentum transfer q = 4π sinθ/λ (nm⁻¹) at ``r_px`` pixels from the beam centre."""
        theta = self.two_theta_of_radius_px(r_px) / 2.0
        return 4.0 * np.pi * np.sin(theta) / (self.wavelength_m * 1e9)

    def radius_px_of_q(self, q_inv_nm: Any) -> np.ndarray:
        """Inverse of `q_of_radius_px`: radius in pixels where q (nm⁻¹) falls.

        Raises
        ------
        ParameterError
            If some q exceeds 4π/λ (backscattering), which no pixel can reach.
        """
        q = np.asarray(q_inv_nm, dtype=float)
        sin_theta = q * self.wavelength_m * 1e9 / (4.0 * np.pi)
        if np.any(np.abs(sin_theta) >= 1):
            raise ParameterError(
                f"q up to {float(np.max(q)):.4g} nm⁻¹ is beyond 4π/λ = "
                f"{4 * np.pi / (self.wavelength_m * 1e9):.4g} nm⁻¹ for this wavelength."
            )
        return np.tan(2.0 * np.arcsin(sin_theta)) * self.distance_m / self._square_pixel_m

    # ------------------------------------------------------------------ per-pixel maps
    @cached_property
    def _offsets_m(self) -> tuple[np.ndarray, np.ndarray]:
        cy, cx = self.beam_center_yx
        py, px = self.pixel_size_yx_m
        y = (np.arange(self.shape[0], dtype=float) - cy) * py
        x = (np.arange(self.shape[1], dtype=float) - cx) * px
        return y[:, None], x[None, :]

    @cached_property
    def radius_px(self) -> np.ndarray:
        """Distance of each pixel centre from the beam centre, in pixels, shape ``(ny, nx)``."""
        return _readonly(pixel_radius_map(self.shape, self.beam_center_yx))

    @cached_property
    def radius_m(self) -> np.ndarray:
        """Distance of each pixel centre from the beam centre on the detector, in metres."""
        y, x = self._offsets_m
        return _readonly(np.hypot(y, x))

    @cached_property
    def azimuth_rad(self) -> np.ndarray:
        """Azimuth φ = atan2(y − cy, x − cx) of each pixel, radians in (−π, π]."""
        y, x = self._offsets_m
        return _readonly(np.arctan2(np.broadcast_to(y, self.shape), np.broadcast_to(x, self.shape)))

    @cached_property
    def two_theta_rad(self) -> np.ndarray:
        """Scattering angle 2θ of each pixel, radians."""
        return _readonly(np.arctan2(self.radius_m, self.distance_m))

    @cached_property
    def q_inv_nm(self) -> np.ndarray:
        """Momentum transfer q = 4π sinθ/λ of each pixel, nm⁻¹."""
        return _readonly(4.0 * np.pi * np.sin(self.two_theta_rad / 2.0) / (self.wavelength_m * 1e9))

    @cached_property
    def unit_vectors(self) -> np.ndarray:
        """Unit vector û from the sample to each pixel centre, shape ``(3, ny, nx)`` as (x, y, z)."""
        y, x = self._offsets_m
        y, x = np.broadcast_to(y, self.shape), np.broadcast_to(x, self.shape)
        z = np.full(self.shape, self.distance_m)
        norm = np.sqrt(x * x + y * y + z * z)
        return _readonly(np.stack([x / norm, y / norm, z / norm]))

    @cached_property
    def scattering_vectors_inv_nm(self) -> np.ndarray:
        """Scattering vector s = (û − ẑ)/λ of each pixel, nm⁻¹, shape ``(3, ny, nx)`` as (x, y, z).

        |s| = 2 sinθ/λ, so q = 2π|s|.
        """
        s = self.unit_vectors.copy()
        s[2] -= 1.0
        return _readonly(s / (self.wavelength_m * 1e9))

    @cached_property
    def solid_angle_sr(self) -> np.ndarray:
        """Solid angle ΔΩ subtended by each pixel, steradians (flat pixel, normal to the beam)."""
        py, px = self.pixel_size_yx_m
        cos2t = np.cos(self.two_theta_rad)
        return _readonly(py * px * cos2t**3 / self.distance_m**2)

    def polarization_factor(self, polarization: str = "x") -> np.ndarray:
        """Thomson polarisation factor P of each pixel.

        Parameters
        ----------
        polarization : {"x", "y", "none"}
            Direction of linear polarisation of the beam ("x" is horizontal at most XFELs), or
            "none" for an unpolarised source, P = (1 + cos² 2θ)/2.
        """
        return ray_polarization_factor(self.unit_vectors, polarization)

    # ------------------------------------------------------------------ tilted detector
    @staticmethod
    def tilt_matrix(pitch_rad: float = 0.0, yaw_rad: float = 0.0) -> np.ndarray:
        """Rotation of a tilted detector: pitch about +x, then yaw about +y, R = R_y R_x.

        A detector pixel at in-plane offset (x, y) from the beam centre sits in the laboratory
        at ``(0, 0, distance) + R @ (x, y, 0)``: the detector turns about the point where the
        beam meets it, so the beam centre stays where it was.
        """
        cp, sp = math.cos(pitch_rad), math.sin(pitch_rad)
        cy, sy = math.cos(yaw_rad), math.sin(yaw_rad)
        r_x = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
        r_y = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
        return r_y @ r_x

    def pixel_positions_m(self, pitch_rad: float = 0.0, yaw_rad: float = 0.0) -> np.ndarray:
        """Laboratory position of each pixel centre, metres, shape ``(3, ny, nx)`` as (x, y, z).

        Parameters
        ----------
        pitch_rad, yaw_rad : float
            Detector tilt about +x and +y (see `tilt_matrix`); zero gives the flat detector
            normal to the beam at ``distance_m``.
        """
        y, x = self._offsets_m
        local = np.stack([np.broadcast_to(x, self.shape), np.broadcast_to(y, self.shape), np.zeros(self.shape)])
        pos = np.tensordot(self.tilt_matrix(pitch_rad, yaw_rad), local, axes=1)
        pos[2] += self.distance_m
        return pos

    def tilted_maps(
        self, pitch_rad: float = 0.0, yaw_rad: float = 0.0, polarization: str = "x"
    ) -> dict[str, np.ndarray]:
        """Scattering vectors, 2θ, solid angles and polarisation of a tilted detector.

        Parameters
        ----------
        pitch_rad, yaw_rad : float
            Detector tilt (see `tilt_matrix`).
        polarization : {"x", "y", "none"}
            Beam polarisation of the ``polarization_factor`` map (see `polarization_factor`).

        Returns
        -------
        dict
            ``unit_vectors`` (3, ny, nx), ``scattering_vectors_inv_nm`` s = (û − ẑ)/λ
            (3, ny, nx), ``two_theta_rad``, ``solid_angle_sr`` (ny, nx), the latter
            A cos ψ / r² with ψ the angle between the ray and the detector normal, and
            ``polarization_factor`` (ny, nx).
        """
        pos = self.pixel_positions_m(pitch_rad, yaw_rad)
        r = np.sqrt((pos**2).sum(axis=0))
        u = pos / r
        normal = self.tilt_matrix(pitch_rad, yaw_rad)[:, 2]
        cos_psi = np.abs(np.tensordot(normal, u, axes=1))
        py, px = self.pixel_size_yx_m
        s = u.copy()
        s[2] -= 1.0
        return {
            "unit_vectors": u,
            "scattering_vectors_inv_nm": s / (self.wavelength_m * 1e9),
            "two_theta_rad": np.arccos(np.clip(u[2], -1.0, 1.0)),
            "solid_angle_sr": py * px * cos_psi / r**2,
            "polarization_factor": ray_polarization_factor(u, polarization),
        }

    def project_directions(
        self, directions: Any, pitch_rad: float = 0.0, yaw_rad: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates where rays from the sample along ``directions`` meet the detector.

        Parameters
        ----------
        directions : array_like, shape (3, ...)
            Ray directions (x, y, z), any length.
        pitch_rad, yaw_rad : float
            Detector tilt (see `tilt_matrix`).

        Returns
        -------
        rows, cols : ndarray
            Fractional pixel indices (NaN where a ray runs parallel to or away from the
            detector plane); they may fall outside the detector.
        """
        d = np.asarray(directions, dtype=float)
        rot = self.tilt_matrix(pitch_rad, yaw_rad)
        normal = rot[:, 2]
        anchor = np.array([0.0, 0.0, self.distance_m])
        along = np.tensordot(normal, d, axes=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(along > 0, normal @ anchor / along, np.nan)
        hit = d * t - anchor.reshape((3,) + (1,) * (d.ndim - 1))
        local = np.tensordot(rot.T, hit, axes=1)
        py, px = self.pixel_size_yx_m
        cy, cx = self.beam_center_yx
        return cy + local[1] / py, cx + local[0] / px

    # ------------------------------------------------------------------ polar sampling
    def polar_grid(
        self,
        n_radii: int,
        n_angles: int,
        r_max_px: float | None = None,
        r_min_px: float = 0.0,
        full_circle: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Sampling points of a polar grid centred on the beam; see `polar_grid`."""
        return polar_grid(self.shape, self.beam_center_yx, n_radii, n_angles, r_max_px, r_min_px, full_circle)


def polar_grid(
    shape: tuple[int, int],
    center_yx: tuple[float, float],
    n_radii: int,
    n_angles: int,
    r_max_px: float | None = None,
    r_min_px: float = 0.0,
    full_circle: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sampling points of a polar grid about ``center_yx``, in pixel-index coordinates.

    Images without a detector geometry (class averages, models) have a centre but no
    distances; `Geometry.polar_grid` calls this with the beam centre.

    Parameters
    ----------
    shape : tuple of int
        Image shape ``(ny, nx)`` in pixels.
    center_yx : tuple of float
        Centre ``(row, column)`` in pixel-index units.
    n_radii, n_angles : int
        Number of radial and angular samples.
    r_max_px : float, optional
        Outer radius in pixels; defaults to the largest circle that fits in the image.
    r_min_px : float
        Inner radius in pixels.
    full_circle : bool
        Angles φ_k = k·2π/n over [0, 2π) if True, else k·π/n over [0, π).

    Returns
    -------
    rows, cols : ndarray
        Pixel-index coordinates, shape ``(n_angles, n_radii)``, for interpolation.
    radii_px : ndarray
        Radii of the samples (pixels), shape ``(n_radii,)``.
    angles_rad : ndarray
        Azimuths of the samples (radians), shape ``(n_angles,)``.
    """
    if int(n_radii) < 1 or int(n_angles) < 1:
        raise ParameterError(f"n_radii and n_angles must be ≥ 1, got {n_radii}, {n_angles}.")
    cy, cx = center_yx
    if r_max_px is None:
        r_max_px = min(cy, cx, shape[0] - 1 - cy, shape[1] - 1 - cx)
    if not 0 <= r_min_px < r_max_px:
        raise ParameterError(
            f"need 0 ≤ r_min_px < r_max_px, got r_min_px={r_min_px}, r_max_px={r_max_px}."
        )
    radii = np.linspace(r_min_px, r_max_px, int(n_radii))
    span = 2.0 * np.pi if full_circle else np.pi
    angles = np.arange(int(n_angles)) * (span / int(n_angles))
    rows = cy + np.sin(angles)[:, None] * radii[None, :]
    cols = cx + np.cos(angles)[:, None] * radii[None, :]
    return rows, cols, radii, angles
