"""Geometry against hand-computed, analytic values."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from diffdask import Geometry, GeometryError, ParameterError


def test_maps_match_hand_computation_at_every_pixel():
    g = Geometry((5, 7), pixel_size_m=100e-6, distance_m=0.1, wavelength_m=1.5e-10, beam_center_yx=(1.0, 4.5))
    for i in range(5):
        for j in range(7):
            dy, dx = (i - 1.0) * 100e-6, (j - 4.5) * 100e-6
            r = math.hypot(dy, dx)
            two_theta = math.atan(r / 0.1)
            q = 4 * math.pi * math.sin(two_theta / 2) / 1.5e-10 * 1e-9
            assert g.radius_px[i, j] == pytest.approx(math.hypot(i - 1.0, j - 4.5))
            assert g.radius_m[i, j] == pytest.approx(r)
            assert g.two_theta_rad[i, j] == pytest.approx(two_theta)
            assert g.q_inv_nm[i, j] == pytest.approx(q)
            assert g.azimuth_rad[i, j] == pytest.approx(math.atan2(dy, dx))
            norm = math.sqrt(dx * dx + dy * dy + 0.01)
            s = np.array([dx / norm, dy / norm, 0.1 / norm - 1]) / 1.5e-10 * 1e-9
            assert np.allclose(g.scattering_vectors_inv_nm[:, i, j], s)
            # |s| = 2 sinθ / λ, q = 2π|s|
            assert 2 * math.pi * np.linalg.norm(s) == pytest.approx(q)
            assert g.solid_angle_sr[i, j] == pytest.approx(1e-8 / 0.01 * math.cos(two_theta) ** 3)
            assert g.polarization_factor("x")[i, j] == pytest.approx(1 - (dx / norm) ** 2)
            assert g.polarization_factor("y")[i, j] == pytest.approx(1 - (dy / norm) ** 2)
            assert g.polarization_factor("none")[i, j] == pytest.approx((1 + math.cos(two_theta) ** 2) / 2)


def test_solid_angles_of_a_large_detector_sum_to_the_analytic_cone():
    # A 2001×2001 detector of 1 mm pixels at 1 m spans the square pyramid of half-side 1.0005 m;
    # Ω of a square of half-side a at distance d is 4 arcsin(a² / (a² + d²)).
    g = Geometry((2001, 2001), pixel_size_m=1e-3, distance_m=1.0, wavelength_m=1e-10)
    a = 1.0005
    assert g.solid_angle_sr.sum() == pytest.approx(4 * math.asin(a * a / (a * a + 1.0)), rel=1e-5)


def test_q_radius_conversions_invert_and_match_the_map():
    g = Geometry((64, 64), pixel_size_m=75e-6, distance_m=0.05, wavelength_m=1e-10)
    r = np.array([0.0, 3.0, 17.5, 40.0])
    assert np.allclose(g.radius_px_of_q(g.q_of_radius_px(r)), r)
    i, j = 10, 50
    assert g.q_of_radius_px(g.radius_px[i, j]) == pytest.approx(g.q_inv_nm[i, j])
    with pytest.raises(ParameterError, match="beyond 4π/λ"):
        g.radius_px_of_q(4 * math.pi / 0.1 + 1)


def test_polar_grid_points_lie_on_circles_around_the_beam():
    g = Geometry((50, 60), pixel_size_m=1e-4, distance_m=0.1, wavelength_m=1e-10, beam_center_yx=(20.0, 31.0))
    rows, cols, radii, angles = g.polar_grid(n_radii=10, n_angles=36, r_max_px=15)
    assert rows.shape == cols.shape == (36, 10)
    assert np.allclose(np.hypot(rows - 20.0, cols - 31.0), radii[None, :])
    assert np.allclose(np.arctan2(rows[:, -1] - 20.0, cols[:, -1] - 31.0) % (2 * np.pi), angles)
    _, _, radii, _ = g.polar_grid(5, 4)
    assert radii[-1] == pytest.approx(20.0)  # largest circle on the detector: row 20 to the top edge
    with pytest.raises(ParameterError):
        g.polar_grid(5, 4, r_min_px=20, r_max_px=10)


def test_attrs_round_trip_and_pickle_without_cached_maps():
    g = Geometry((10, 12), pixel_size_m=(100e-6, 50e-6), distance_m=0.3, wavelength_m=6e-10, beam_center_yx=(4, 6))
    assert Geometry.from_attrs(g.to_attrs(), (10, 12)) == g
    assert Geometry.from_attrs({}, (10, 12)) is None
    g.q_inv_nm  # fill the cache
    h = pickle.loads(pickle.dumps(g))
    assert h == g and "q_inv_nm" not in h.__dict__
    assert np.array_equal(h.q_inv_nm, g.q_inv_nm)
    with pytest.raises(ValueError):
        g.q_inv_nm[0, 0] = 1.0  # maps are read-only: shared caches must not be edited


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"distance_m": 0.0}, "distance_m"),
        ({"distance_m": -1.0}, "distance_m"),
        ({"wavelength_m": 0}, "wavelength_m"),
        ({"wavelength_m": float("nan")}, "wavelength_m"),
        ({"pixel_size_m": -75e-6}, "pixel_size_m"),
        ({"pixel_size_m": "big"}, "pixel_size_m"),
        ({"beam_center_yx": (50.0, 5.0)}, "outside"),
        ({"beam_center_yx": (5.0, -3.0)}, "outside"),
        ({"shape": (0, 10)}, "shape"),
        ({"shape": (10,)}, "shape"),
    ],
)
def test_unphysical_geometry_is_refused(kwargs, match):
    args = {"shape": (20, 20), "pixel_size_m": 75e-6, "distance_m": 0.1, "wavelength_m": 1e-10}
    args.update(kwargs)
    with pytest.raises(GeometryError, match=match):
        Geometry(**args)


def test_partial_geometry_attrs_are_refused():
    with pytest.raises(GeometryError, match="distance_m"):
        Geometry.from_attrs({"wavelength_m": 1e-10, "pixel_size_m": 1e-4}, (4, 4))


def test_unknown_polarization_is_refused():
    with pytest.raises(ParameterError):
        Geometry((4, 4), 1e-4, 0.1, 1e-10).polarization_factor("circular")
