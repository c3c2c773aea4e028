"""Ptychography simulator against optics written out here: Parseval, Airy pupils, Beer–Lambert."""

from __future__ import annotations

import math

import dask
import numpy as np
import pytest
from click.testing import CliRunner

from diffdask import Geometry, ParameterError
from diffdask.cli import main
from diffdask.io import open_frames
from diffdask.simulate import (
    make_probe,
    object_ground_truth,
    ptycho_sample,
    scan_positions,
    simulate_ptycho,
)


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


LAM, DIST, PIX, N = 0.1409e-9, 2.0, 75e-6, 64
GEOM = Geometry((N, N), PIX, DIST, LAM)
DX = LAM * DIST / (N * PIX)  # object-plane pixel, m


def test_empty_field_gives_the_pupil_disc_and_all_photons():
    d = 0.6e-6
    ds = simulate_ptycho(4, GEOM, probe="airy", probe_diameter_m=d, coverage=0.0, noise=False,
                         photons_per_frame=1e5, seed=1)
    frames = ds.frames.values.astype(float)
    np.testing.assert_allclose(frames.sum(axis=(1, 2)), 1e5, rtol=1e-5)  # Parseval
    # An in-focus Airy probe comes from a uniformly lit circular pupil: the far field is a
    # flat disc whose radius is the pupil cut-off k_c = 3.8317/(π d), i.e. k_c λD/p pixels.
    radius_px = 3.831705970207512 / (math.pi * d) * LAM * DIST / PIX
    iy, ix = np.indices((N, N))
    r = np.hypot(iy - N // 2, ix - N // 2)
    f = frames[0]
    inside, outside = r < radius_px - 1, r > radius_px + 1
    assert np.ptp(f[inside]) < 1e-6 * f[inside].max()
    assert f[outside].max() < 1e-9 * f.max()
    assert ds.attrs["beam_center_yx"] == [N // 2, N // 2]
    assert not ds.in_object.values.any()


def test_probe_shapes():
    d = 0.8e-6
    gauss = make_probe((N, N), (DX, DX), "gaussian", d, 0.0, LAM)
    intensity = np.abs(gauss) ** 2
    row = intensity[N // 2]
    x = (np.arange(N) - N // 2) * DX
    # FWHM of the intensity is the diameter.
    half = x[row >= row.max() / 2]
    assert half.max() - half.min() == pytest.approx(d, abs=2 * DX)
    assert intensity.sum() == pytest.approx(1.0, rel=1e-12)
    pinhole = np.abs(make_probe((N, N), (DX, DX), "aperture", d, 0.0, LAM)) ** 2
    r = np.hypot(*np.meshgrid(x, x, indexing="ij"))
    assert np.all(pinhole[r > d / 2] == 0) and np.ptp(pinhole[r <= d / 2]) < 1e-12
    # Defocus spreads the probe but keeps its photons (free-space propagation is unitary).
    # Numerical aperture k_c λ ≈ 2e-4: 3 mm from focus the probe spreads to ≈ 0.6 µm radius.
    far = np.abs(make_probe((N, N), (DX, DX), "airy", d, 3e-3, LAM)) ** 2
    near = np.abs(make_probe((N, N), (DX, DX), "airy", d, 0.0, LAM)) ** 2
    assert far.sum() == pytest.approx(1.0) and far.max() < 0.5 * near.max()


def test_raster_positions_and_overlap():
    d, overlap = 1e-6, 0.7
    ds = simulate_ptycho(30, GEOM, probe_diameter_m=d, overlap=overlap, seed=3, noise=False, coverage=0.0)
    y, x = ds.scan_y.values, ds.scan_x.values
    step = d * (1 - overlap)
    np.testing.assert_allclose(np.diff(x[:6]), step)  # 6 points per line for 30 frames
    assert y[6] - y[0] == pytest.approx(step)
    pos, shape = scan_positions(30, step)
    assert shape == (5, 6)
    np.testing.assert_allclose(pos[:6, 1], (np.arange(6) - 2.5) * step)
    np.testing.assert_allclose(pos[::6, 0], (np.arange(5) - 2) * step)


def test_absorption_follows_beer_lambert_and_phase_conserves_photons():
    kw = dict(probe="gaussian", probe_diameter_m=0.2e-6, coverage=0.3, particle_diameter_m=(0.4e-6, 0.6e-6),
              noise=False, photons_per_frame=1e6, seed=4, overlap=0.0)
    pure_phase = simulate_ptycho(36, GEOM, beta=0.0, **kw)
    np.testing.assert_allclose(pure_phase.frames.values.sum(axis=(1, 2)), 1e6, rtol=1e-5)
    absorbing = simulate_ptycho(36, GEOM, beta=1e-5, **kw)
    sample = ptycho_sample(absorbing)
    probe = np.abs(make_probe((N, N), (DX, DX), "gaussian", 0.2e-6, 0.0, LAM)) ** 2
    g = (np.arange(N) - N // 2) * DX
    k = 2 * math.pi / LAM
    for frame, y0, x0 in zip(absorbing.frames.values, absorbing.scan_y.values, absorbing.scan_x.values):
        t, _ = sample.thickness(y0 + g[:, None], x0 + g[None, :])
        # Transmitted photons: Σ|P|² exp(−2kβt) (Beer–Lambert through the local thickness).
        expected = 1e6 * (probe * np.exp(-2 * k * 1e-5 * t)).sum()
        assert frame.sum() == pytest.approx(expected, rel=1e-5)
    totals = absorbing.frames.values.sum(axis=(1, 2))
    assert totals.min() < 0.9e6 and np.all(absorbing.in_object.values == (absorbing.footprint_fraction.values >= 0.1))
    assert absorbing.in_object.values.any() and not absorbing.in_object.values.all()


def test_ellipsoid_chord_and_footprint():
    ds = simulate_ptycho(16, GEOM, coverage=0.3, particle_diameter_m=(0.4e-6, 0.8e-6), seed=6, noise=False)
    sample = ptycho_sample(ds)
    assert len(sample.densities) == ds.attrs["simulation"]["n_particles"] > 0
    (cy, cx), (a, _, c), angle, rho = sample.centers_m[0], sample.semi_axes_m[0], sample.angles_rad[0], sample.densities[0]
    t, footprint = sample.thickness(np.array([cy]), np.array([cx]))
    # Through the centre: the cell's full thickness 2c plus its nucleus 2c·0.4 at half density.
    assert t[0] == pytest.approx(rho * 2 * c * (1 + 0.4 * 0.5))
    assert footprint[0]
    # Half-way along the long axis (outside the nucleus, which ends at 0.4 a): 2c √(1 − ¼).
    half = np.array([cy + 0.5 * a * math.sin(angle)]), np.array([cx + 0.5 * a * math.cos(angle)])
    assert sample.thickness(*half)[0][0] == pytest.approx(rho * 2 * c * math.sqrt(0.75))
    outside = np.array([cy + 1.01 * a * math.sin(angle)]), np.array([cx + 1.01 * a * math.cos(angle)])
    t_out, fp_out = sample.thickness(*outside)
    assert t_out[0] == 0 and not fp_out[0]
    tr, _ = sample.transmission(np.array([cy]), np.array([cx]))
    k = 2 * math.pi / LAM
    assert np.angle(tr[0]) == pytest.approx(math.remainder(-k * sample.delta * t[0], 2 * math.pi), abs=1e-9)


def test_ground_truth_footprint_matches_in_object_labels():
    ds = simulate_ptycho(100, GEOM, probe="gaussian", probe_diameter_m=0.2e-6, overlap=0.0, coverage=0.3,
                         particle_diameter_m=(0.4e-6, 0.8e-6), seed=12, noise=False)
    truth = object_ground_truth(ds)
    assert truth.footprint.values.any() and not truth.footprint.values.all()
    # The footprint under each scan position (nearest map pixel) agrees with in_object except
    # where the probe straddles a cell's edge.
    under = truth.footprint.sel(y_m=ds.scan_y, x_m=ds.scan_x, method="nearest").values
    fraction = ds.footprint_fraction.values
    clear = (fraction < 0.02) | (fraction > 0.98)
    assert clear.sum() > 50
    assert np.array_equal(under[clear], ds.in_object.values[clear])
    phase = np.angle(truth.transmission.values)
    k = 2 * math.pi / LAM
    np.testing.assert_allclose(phase, np.angle(np.exp(-1j * k * 1e-5 * truth.thickness_m.values)), atol=1e-9)


def test_fly_scan_averages_sub_exposures_along_the_line():
    kw = dict(probe="gaussian", probe_diameter_m=0.3e-6, noise=False, seed=8, coverage=0.3, beta=0.0, overlap=0.5,
              particle_diameter_m=(0.3e-6, 0.5e-6), delta=1e-4)
    fly = simulate_ptycho(9, GEOM, scan="fly", fly_substeps=4, **kw)
    step = simulate_ptycho(9, GEOM, scan="raster", **kw).frames.values
    sample = ptycho_sample(fly)
    probe = make_probe((N, N), (DX, DX), "gaussian", 0.3e-6, 0.0, LAM)
    g = (np.arange(N) - N // 2) * DX
    move = 0.15e-6  # one step, 0.3 µm × (1 − 0.5)
    for i in (0, 4, 8):
        y0, x0 = fly.scan_y.values[i], fly.scan_x.values[i]
        expected = 0
        # The sample moves one step along x during the exposure: mean of 4 sub-exposures.
        for offset in (-0.375, -0.125, 0.125, 0.375):
            t, _ = sample.transmission(y0 + g[:, None], x0 + offset * move + g[None, :])
            wave = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(probe * t), norm="ortho"))
            expected = expected + 1e6 * np.abs(wave) ** 2 / 4
        np.testing.assert_allclose(fly.frames.values[i], expected, rtol=1e-4, atol=1e-6 * expected.max())
    assert np.max(np.abs(fly.frames.values - step)) > 1e-4 * step.max()


def test_photon_noise_and_chunking_determinism():
    kw = dict(seed=10, photons_per_frame=1e4, position_jitter_m=5e-9)
    a = simulate_ptycho(13, GEOM, chunks=3, **kw).compute()
    b = simulate_ptycho(13, GEOM, chunks=13, **kw).compute()
    for name in a.data_vars:
        assert a[name].values.tobytes() == b[name].values.tobytes(), name
    f = a.frames.values
    assert np.all(f == np.round(f)) and abs(f.sum(axis=(1, 2)).mean() - 1e4) < 0.1e4
    nominal, _ = scan_positions(13, 1e-6 * 0.3)
    assert 0 < np.abs(a.scan_y.values - nominal[:, 0]).max() < 5 * 5e-9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"probe": "bessel"}, "unknown probe"),
        ({"scan": "spiral"}, "unknown scan"),
        ({"overlap": 1.0}, "overlap"),
        ({"overlap": -0.1}, "overlap"),
        ({"probe_diameter_m": -1e-6}, "probe_diameter_m"),
        ({"particle_diameter_m": (-1e-6, 1e-6)}, "particle_diameter_m"),
        ({"coverage": 1.5}, "coverage"),
        ({"fly_substeps": 0, "scan": "fly"}, "fly_substeps"),
        ({"particle_aspect": (0.5, 2.0)}, "particle_aspect"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        simulate_ptycho(4, GEOM, **kwargs)


def test_cli_simulate_ptycho(cluster, tmp_path):
    store = tmp_path / "scan.zarr"
    result = CliRunner().invoke(main, ["simulate", "ptycho", str(store), "--n-frames", "20", "--shape", "32",
                                       "--probe-diameter", "3e-7", "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 0, result.output
    stored = open_frames(store)
    assert stored.frames.shape == (20, 32, 32) and stored.scan_x.shape == (20,)
    assert stored.attrs["simulation"]["simulator"] == "ptycho"
