"""PSD contrast and sphere sizing against the analytic sphere form factor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr
from scipy.optimize import brentq

import diffdask as dd
from diffdask.errors import GeometryError, ParameterError, SchemaError


def sphere(x):
    """|3 (sin x − x cos x) / x³|², written out independently of the library."""
    x = np.asarray(x, dtype=float)
    return (3.0 * (np.sin(x) - x * np.cos(x)) / x**3) ** 2


def dsphere_amplitude(x):
    """d/dx of 3 (sin x − x cos x)/x³ (zero at the maxima of the intensity between its zeros)."""
    return 3.0 * ((x * x - 3.0) * math.sin(x) + 3.0 * x * math.cos(x)) / x**4


def analytic_extrema(n):
    """First n zeros (minima) and the n secondary maxima after them, in x = qR."""
    minima = [
        brentq(lambda x: math.tan(x) - x, k * math.pi + 0.1, k * math.pi + math.pi / 2 - 1e-9) for k in range(1, n + 1)
    ]
    maxima = [brentq(dsphere_amplitude, a + 0.1, b - 0.1) for a, b in zip(minima, minima[1:] + [minima[-1] + math.pi])]
    return np.array(minima), np.array(maxima)


@pytest.mark.parametrize("background", [0.0, 2e-4])
def test_psd_contrast_of_analytic_sphere_profile(background):
    x = np.linspace(1e-3, 14.0, 14001)
    profile = sphere(x) + background
    minima, maxima = analytic_extrema(3)
    i_min = sphere(minima) + background  # sphere(minima) is 0 up to round-off
    i_max = sphere(maxima) + background
    expected = np.mean((i_max - i_min) / (i_max + i_min))
    assert dd.psd_contrast(profile, n_pairs=3) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # Two pairs only average the first two.
    exp2 = np.mean(((i_max - i_min) / (i_max + i_min))[:2])
    assert dd.psd_contrast(profile, n_pairs=2) == pytest.approx(exp2, rel=1e-4, abs=1e-6)


def test_psd_contrast_is_robust_to_noise_and_vectorised():
    rng = np.random.default_rng(0)
    x = np.linspace(0.05, 14.0, 300)
    clean = sphere(x) + 1e-4
    noisy = clean * (1 + 0.03 * rng.standard_normal((5, x.size)))
    exact = dd.psd_contrast(clean)
    arr = xr.DataArray(noisy, dims=("frame", "radius"))
    got = dd.psd_contrast(arr)
    assert got.dims == ("frame",)
    np.testing.assert_allclose(got.values, exact, atol=0.03)
    # Fewer fringes than pairs asked for: NaN, not an error.
    assert math.isnan(dd.psd_contrast(sphere(np.linspace(0.05, 6.0, 100)), n_pairs=3))


def test_psd_contrast_bad_inputs():
    with pytest.raises(ParameterError, match="n_pairs"):
        dd.psd_contrast(np.ones(10), n_pairs=0)
    with pytest.raises(ParameterError, match="tolerance"):
        dd.psd_contrast(np.ones(10), tolerance=1.5)
    with pytest.raises(SchemaError, match="radius"):
        dd.psd_contrast(xr.DataArray(np.ones(10), dims=("q",)))


GEOM = dd.Geometry((128, 128), pixel_size_m=75e-6, distance_m=0.13, wavelength_m=0.729e-9, beam_center_yx=(63.2, 64.7))


def simulated_spheres(diameter_nm, n, photons, seed):
    """Poisson frames of a sphere of the given diameter with ``photons`` expected per frame."""
    rng = np.random.default_rng(seed)
    x = np.maximum(GEOM.q_inv_nm * diameter_nm / 2.0, 1e-9)
    mu = sphere(x)
    mu *= photons / mu.sum()
    return rng.poisson(mu, size=(n, *mu.shape)).astype(np.uint16)


@pytest.mark.parametrize("diameter", [55.0, 70.0, 84.0])
def test_sphere_fit_recovers_diameter(diameter):
    mask = GEOM.radius_px > 3.0  # a beamstop
    frames = np.concatenate(
        [simulated_spheres(diameter, 12, 1e3, seed=1), simulated_spheres(diameter, 6, 1e4, seed=2)]
    )
    ds = dd.make_frame_stack(frames, mask=mask, geometry=GEOM, chunks=7)
    fit = dd.fit_sphere_diameter(dd.radial_profile(ds)).compute()
    rel = fit.diameter_nm.values / diameter - 1.0
    # 10³ photons per frame: unbiased and within 2 % (RMS over frames); 10⁴: every frame.
    assert np.sqrt(np.mean(rel[:12] ** 2)) < 0.02
    assert abs(np.median(rel[:12])) < 0.01
    assert np.all(np.abs(rel[12:]) < 0.02)
    assert np.all(fit.r_squared.values > 0.8)
    assert np.all(fit.scale.values > 0)
    keep = dd.size_filter(fit, 55.0, 84.0)
    assert keep.dtype == bool and keep.sizes["frame"] == frames.shape[0]


def test_sphere_fit_uses_geometry_when_profile_has_no_q_and_is_lazy():
    frames = simulated_spheres(70.0, 4, 1e4, seed=3)
    ds = dd.make_frame_stack(frames, geometry=GEOM)
    prof = dd.radial_profile(ds)
    lazy = dd.fit_sphere_diameter(prof)
    assert lazy.diameter_nm.chunks is not None
    no_q = prof.drop_vars("q_inv_nm")
    fit = dd.fit_sphere_diameter(no_q, geometry=GEOM).compute()
    np.testing.assert_allclose(fit.diameter_nm.values, lazy.diameter_nm.values)
    np.testing.assert_allclose(fit.diameter_nm.values, 70.0, rtol=0.02)
    with pytest.raises(GeometryError, match="q_inv_nm"):
        dd.fit_sphere_diameter(no_q)
    with pytest.raises(ParameterError, match="d_min_nm"):
        dd.fit_sphere_diameter(prof, d_min_nm=100, d_max_nm=50)
    with pytest.raises(SchemaError, match="radius"):
        dd.fit_sphere_diameter(np.ones((3, 10)))


def test_size_filter_selects_the_range():
    d = xr.DataArray([50.0, 55.0, 70.0, 84.0, 90.0, np.nan], dims=("frame",))
    np.testing.assert_array_equal(dd.size_filter(d).values, [False, True, True, True, False, False])
    fit = xr.Dataset({"diameter_nm": d, "r_squared": ("frame", [1, 1, 0.2, 1, 1, 1.0])})
    np.testing.assert_array_equal(
        dd.size_filter(fit, min_r_squared=0.5).values, [False, True, False, True, False, False]
    )
    with pytest.raises(ParameterError, match="min_r_squared"):
        dd.size_filter(d, min_r_squared=0.5)
    with pytest.raises(ParameterError, match="d_min_nm"):
        dd.size_filter(d, 90.0, 50.0)
