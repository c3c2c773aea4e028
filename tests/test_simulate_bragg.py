"""Bragg simulator and tilted-detector geometry against independent geometric predictions."""

from __future__ import annotations

import math

import dask
import numpy as np
import pytest
from click.testing import CliRunner
from scipy.spatial.transform import Rotation

from diffdask import Geometry, ParameterError
from diffdask.cli import main
from diffdask.io import open_frames
from diffdask.simulate import bragg_reflections, cell_matrix, simulate_bragg
from diffdask.simulate.bragg import MIN_PARTIALITY


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


def test_tilted_projection_closed_form():
    g = Geometry((200, 200), 1e-4, 0.1, 1e-10, beam_center_yx=(90.0, 110.0))
    pitch, beta = math.radians(3.0), math.radians(4.0)
    # Ray in the y–z plane at angle β; plane through (0, 0, D) with normal (0, −sin p, cos p).
    z = 0.1 * math.cos(pitch) / (math.cos(pitch) - math.sin(pitch) * math.tan(beta))
    y = z * math.tan(beta)
    local_y = math.cos(pitch) * y + math.sin(pitch) * (z - 0.1)
    rows, cols = g.project_directions(np.array([0.0, math.tan(beta), 1.0]), pitch_rad=pitch)
    assert rows == pytest.approx(90.0 + local_y / 1e-4, abs=1e-9)
    assert cols == pytest.approx(110.0, abs=1e-9)
    # Yaw about +y: a ray in the x–z plane; normal (sin ψ, 0, cos ψ).
    yaw = math.radians(-2.0)
    z = 0.1 * math.cos(yaw) / (math.cos(yaw) + math.sin(yaw) * math.tan(beta))
    x = z * math.tan(beta)
    local_x = math.cos(yaw) * x - math.sin(yaw) * (z - 0.1)
    rows, cols = g.project_directions(np.array([math.tan(beta), 0.0, 1.0]), yaw_rad=yaw)
    assert cols == pytest.approx(110.0 + local_x / 1e-4, abs=1e-9)
    # Rays pointing away from the detector miss it.
    rows, cols = g.project_directions(np.array([0.0, 0.0, -1.0]))
    assert np.isnan(rows) and np.isnan(cols)


def test_tilted_maps_round_trip_and_flat_limit():
    g = Geometry((40, 50), 1e-4, 0.08, 1e-10, beam_center_yx=(12.0, 30.0))
    iy, ix = np.indices(g.shape)
    for pitch, yaw in ((0.0, 0.0), (0.04, -0.02)):
        rows, cols = g.project_directions(g.pixel_positions_m(pitch, yaw), pitch, yaw)
        np.testing.assert_allclose(rows, iy, atol=1e-9)
        np.testing.assert_allclose(cols, ix, atol=1e-9)
    flat = g.tilted_maps()
    np.testing.assert_allclose(flat["scattering_vectors_inv_nm"], g.scattering_vectors_inv_nm, atol=1e-12)
    np.testing.assert_allclose(flat["solid_angle_sr"], g.solid_angle_sr, rtol=1e-12)
    np.testing.assert_allclose(flat["two_theta_rad"], g.two_theta_rad, atol=1e-9)


def test_reflections_shell_enumeration_equals_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(3):
        cell = cell_matrix(rng.uniform(3, 8, 3), rng.uniform(80, 100, 3))
        rot = Rotation.random(random_state=rng).as_matrix()
        width = (0.002, 0.01)
        hkl, s, part = bragg_reflections(cell, rot, 0.1, 2.5, width)
        recip = rot @ np.linalg.inv(cell).T
        h_max = np.ceil(2.5 * np.linalg.norm(cell, axis=0)).astype(int)
        box = np.stack(np.meshgrid(*[np.arange(-m, m + 1) for m in h_max], indexing="ij"), -1).reshape(-1, 3)
        box = box[np.any(box != 0, axis=1)]
        sb = box @ recip.T
        s_len = np.linalg.norm(sb, axis=1)
        e = np.linalg.norm(sb + [0, 0, 10.0], axis=1) - 10.0
        p = np.exp(-0.5 * (e / (s_len * width[0] + width[1])) ** 2)
        expected = {tuple(h) for h in box[(p >= MIN_PARTIALITY) & (s_len <= 2.5)]}
        assert {tuple(h) for h in hkl} == expected and len(expected) > 50


def test_cell_matrix_lengths_and_angles():
    cell = cell_matrix((3.0, 4.0, 5.0), (80.0, 95.0, 105.0))
    a, b, c = cell.T
    assert np.linalg.norm(a) == pytest.approx(3) and np.linalg.norm(c) == pytest.approx(5)
    assert math.degrees(math.acos(b @ c / 20)) == pytest.approx(80)
    assert math.degrees(math.acos(a @ c / 15)) == pytest.approx(95)
    assert math.degrees(math.acos(a @ b / 12)) == pytest.approx(105)
    with pytest.raises(ParameterError, match="no unit cell"):
        cell_matrix((3, 3, 3), (10, 10, 170))


def test_spot_positions_equal_geometric_prediction():
    geom = Geometry((160, 170), 172e-6, 0.1, 0.1e-9, beam_center_yx=(75.4, 88.2))
    a = 3.0
    ds = simulate_bragg(6, geom, cell_lengths_nm=a, cell_angles_deg=90.0, seed=12, noise=False,
                        water_photons=0, plastic_photons=0, hot_pixel_fraction=0, dead_pixel_fraction=0,
                        beamstop_radius_px=0, beam_center_jitter_px=5.0, max_tilt_deg=3.0,
                        mosaicity_deg=0.05, domain_size_nm=300.0)
    frames = ds.frames.values
    checked = 0
    for i, frame in enumerate(frames):
        cy, cx = float(ds.beam_center_y[i]), float(ds.beam_center_x[i])
        pitch, yaw = math.radians(float(ds.pitch_deg[i])), math.radians(float(ds.yaw_deg[i]))
        dist = float(ds.distance_m[i])
        assert abs(cy - 75.4) <= 5 and abs(cx - 88.2) <= 5 and abs(pitch) <= math.radians(3) + 1e-12
        q = ds.orientation.values[i]
        rot = Rotation.from_quat([q[1], q[2], q[3], q[0]]).as_matrix()
        recip = rot / a  # cubic cell: a* = x̂/a, rotated
        hkl = np.stack(np.meshgrid(*[np.arange(-12, 13)] * 3, indexing="ij"), -1).reshape(-1, 3)
        s = hkl @ recip.T
        k_out = s + np.array([0, 0, 10.0])
        width = np.linalg.norm(s, axis=1) * math.radians(0.05) + 1 / 300.0
        partiality = np.exp(-0.5 * ((np.linalg.norm(k_out, axis=1) - 10.0) / width) ** 2)
        drawn = partiality >= MIN_PARTIALITY
        k_out, partiality = k_out[drawn], partiality[drawn]
        # Intersect each diffracted ray with the tilted plane through (0, 0, D).
        cp, sp, cyw, syw = math.cos(pitch), math.sin(pitch), math.cos(yaw), math.sin(yaw)
        tilt = np.array([[cyw, 0, syw], [0, 1, 0], [-syw, 0, cyw]]) @ np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
        normal = tilt[:, 2]
        t = dist * normal[2] / (k_out @ normal)
        local = (k_out * t[:, None] - [0, 0, dist]) @ tilt
        rows, cols = cy + local[:, 1] / 172e-6, cx + local[:, 0] / 172e-6
        strong = partiality > 0.3
        for r, c in zip(rows[strong], cols[strong]):
            if not (8 <= r < 152 and 8 <= c < 162):
                continue
            if np.sum(np.hypot(rows - r, cols - c) < 10) > 1:
                continue  # another drawn reflection nearby would bias the centroid
            r0, c0 = int(round(r)), int(round(c))
            win = frame[r0 - 5 : r0 + 6, c0 - 5 : c0 + 6].astype(float)
            if win.sum() <= 0:
                continue
            yy, xx = np.mgrid[r0 - 5 : r0 + 6, c0 - 5 : c0 + 6]
            assert (win * yy).sum() / win.sum() == pytest.approx(r, abs=0.02)
            assert (win * xx).sum() / win.sum() == pytest.approx(c, abs=0.02)
            checked += 1
    assert checked >= 5


def test_labels_masks_and_variants():
    geom = Geometry((64, 64), 344e-6, 0.1, 0.1e-9)
    ds = simulate_bragg(6, geom, seed=2, hot_pixel_fraction=0.01, dead_pixel_fraction=0.01, max_tilt_deg=2.0,
                        distance_m=(0.09, 0.12), cell_lengths_nm=(2.0, 3.0))
    frames, mask = ds.frames.values, ds.mask.values
    assert 0 < (~mask).sum() < 0.05 * mask.size
    bad = frames[:, ~mask]
    assert np.all((bad == 0) | (bad == 65535))
    assert np.all(np.abs(ds.pitch_deg.values) <= 2) and np.all(np.abs(ds.yaw_deg.values) <= 2)
    assert np.all((ds.distance_m.values >= 0.09) & (ds.distance_m.values <= 0.12))
    cells = ds.cell.values
    assert np.all((cells[:, :3] >= 2) & (cells[:, :3] <= 3)) and np.all((cells[:, 3:] >= 80) & (cells[:, 3:] <= 100))
    good = frames[:, mask]
    assert np.all(good == np.round(good)) and good.max() > 20
    binary = simulate_bragg(3, geom, seed=2, variant="binary", cell_lengths_nm=(2.0, 3.0)).frames.values
    assert set(np.unique(binary)) == {0.0, 1.0}
    # The binary variant is the same crystals' spot image, thresholded (beamstop included).
    spots = simulate_bragg(3, geom, seed=2, cell_lengths_nm=(2.0, 3.0), noise=False, water_photons=0,
                           plastic_photons=0, hot_pixel_fraction=0, dead_pixel_fraction=0).frames.values
    np.testing.assert_array_equal(binary, (spots >= 20.0).astype(np.float32))
    flat = simulate_bragg(2, geom, seed=2, variant="flat", flat_photons=5.0, spot_photons=1e-3,
                          beamstop_radius_px=0, hot_pixel_fraction=0, dead_pixel_fraction=0).frames.values
    assert abs(flat.mean() - 5.0) < 4 * math.sqrt(5.0 / flat.size) + 0.01


def test_water_ring_at_3_2_angstrom():
    geom = Geometry((128, 128), 400e-6, 0.06, 0.1e-9)
    ds = simulate_bragg(1, geom, seed=1, noise=False, spot_photons=1e-6, plastic_photons=0, max_tilt_deg=0,
                        beam_center_jitter_px=0, distance_m=0.06, beamstop_radius_px=0,
                        hot_pixel_fraction=0, dead_pixel_fraction=0)
    image = ds.frames.values[0]
    s_len = np.linalg.norm(geom.scattering_vectors_inv_nm, axis=0)
    weight = geom.polarization_factor("x") * geom.solid_angle_sr / geom.solid_angle_sr.max()
    profile = image / weight
    peak_s = s_len.ravel()[np.argmax(profile)]
    assert peak_s == pytest.approx(1 / 0.32, abs=0.05)


def test_same_seed_same_bytes_for_any_chunking():
    geom = Geometry((40, 40), 344e-6, 0.1, 0.1e-9)
    a = simulate_bragg(9, geom, seed=5, chunks=2).compute()
    b = simulate_bragg(9, geom, seed=5, chunks=9).compute()
    for name in a.data_vars:
        assert a[name].values.tobytes() == b[name].values.tobytes(), name


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "fuzzy"}, "unknown variant"),
        ({"cell_lengths_nm": -3.0}, "cell_lengths_nm"),
        ({"hot_pixel_fraction": 1.5}, "hot_pixel_fraction"),
        ({"max_tilt_deg": 60}, "max_tilt_deg"),
        ({"cell_angles_deg": (60, 190)}, "cell angles"),
        ({"spot_sigma_px": 0}, "spot_sigma_px"),
        ({"distance_m": (0.2, 0.1)}, "low ≤ high"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        simulate_bragg(2, Geometry((16, 16), 1e-4, 0.1, 1e-10), **kwargs)


def test_cli_simulate_bragg(cluster, tmp_path):
    store = tmp_path / "stills.zarr"
    result = CliRunner().invoke(main, ["simulate", "bragg", str(store), "--n-frames", "6", "--shape", "48",
                                       "--variant", "binary", "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 0, result.output
    stored = open_frames(store)
    assert set(np.unique(stored.frames.values)) <= {0.0, 1.0} and stored.pitch_deg.shape == (6,)


def test_fixed_tilt_keeps_every_other_draw():
    g = Geometry((48, 48), 400e-6, 0.06, 1e-10)
    free = simulate_bragg(3, g, seed=4).compute()
    fixed = simulate_bragg(3, g, seed=4, tilt_deg=(1.25, -0.5)).compute()
    assert np.all(fixed["pitch_deg"].values == 1.25) and np.all(fixed["yaw_deg"].values == -0.5)
    for name in ("cell", "orientation", "beam_center_y", "distance_m"):
        assert np.array_equal(free[name].values, fixed[name].values)
    with pytest.raises(ParameterError, match="tilt_deg"):
        simulate_bragg(2, g, tilt_deg=(50.0, 0.0))
    with pytest.raises(ParameterError, match="pair"):
        simulate_bragg(2, g, tilt_deg=1.0)
