"""Ring refinement of the detector geometry against simulated frames of known geometry."""

from __future__ import annotations

import math

import dask
import numpy as np
import pytest
import xarray as xr

import diffdask as dd
from diffdask import ParameterError, SchemaError
from diffdask.refine import GEOMETRY_FIELDS
from diffdask.simulate.bragg import PLASTIC_RING, WATER_RING

#: The simulator's rings as (q centre, q σ) in nm⁻¹; q = 2π/d.
RINGS = [(2 * math.pi * WATER_RING[0], 2 * math.pi * WATER_RING[1]),
         (2 * math.pi * PLASTIC_RING[0], 2 * math.pi * PLASTIC_RING[1])]
GEOMETRY = dd.Geometry((96, 96), 500e-6, 0.06, 1e-10)
#: Few reflections, as on a real detector (the default crystal lights up most pixels of 96×96).
SPARSE = {"mosaicity_deg": 0.02, "domain_size_nm": 1000.0}


def _truth(ds):
    return np.stack([ds[f].values for f in GEOMETRY_FIELDS], axis=1)


def test_noise_free_rings_give_the_true_geometry_from_a_distant_start():
    ds = dd.simulate_bragg(3, GEOMETRY, spot_photons=1e-9, noise=False, hot_pixel_fraction=0,
                           dead_pixel_fraction=0, beamstop_radius_px=0, seed=3).persist()
    truth = _truth(ds)
    start = truth + np.array([1.5, -1.0, 1.5, -2.0, 0.08 * GEOMETRY.distance_m])
    fit = dd.refine_geometry(ds, RINGS, initial=dict(zip(GEOMETRY_FIELDS, start.T))).compute()
    got = _truth(fit)
    assert fit["refined"].all()
    assert np.abs(got[:, :2] - truth[:, :2]).max() < 1e-3  # pixels
    assert np.abs(got[:, 2:4] - truth[:, 2:4]).max() < 1e-3  # degrees
    assert np.abs(got[:, 4] / truth[:, 4] - 1).max() < 1e-5


def test_noisy_frames_with_spots_scatter_as_the_reported_errors():
    ds = dd.simulate_bragg(16, GEOMETRY, beamstop_radius_px=5, seed=8, **SPARSE).persist()
    fit = dd.refine_geometry(ds, RINGS, exclude_radius_px=7).compute()  # start: nominal, untilted
    assert fit["refined"].all()
    truth, got = _truth(ds)[:, :4], _truth(fit)[:, :4]
    sigma = np.stack([fit[f"{f}_error"].values for f in GEOMETRY_FIELDS[:4]], axis=1)
    pulls = (got - truth) / sigma
    # Honest errors: the misses are as large as the fit says, no larger, no smaller.
    assert 0.5 < np.sqrt(np.mean(pulls**2)) < 2.0
    assert np.abs(pulls).max() < 5.0
    # The start (nominal, untilted) is 7.7 px and 1.5° off on average; the fit is within its
    # errors of the truth (≈ 0.15 px and ≈ 0.65° for frames this small).
    assert np.abs(got[:, 2:4] - truth[:, 2:4]).mean() < 1.1
    assert np.hypot(*(got[:, :2] - truth[:, :2]).T).mean() < 0.5


def test_frames_without_rings_keep_their_start_and_say_so():
    ds = dd.simulate_bragg(2, GEOMETRY, variant="flat", seed=2, **SPARSE)
    start = {"beam_center_y": [40.0, 50.0], "beam_center_x": [45.0, 47.5], "pitch_deg": [1.0, -2.0],
             "yaw_deg": [0.5, 0.0]}
    fit = dd.refine_geometry(ds, RINGS, initial=start).compute()
    assert not fit["refined"].any()
    for name, values in start.items():
        assert np.array_equal(fit[name].values, values)
        assert np.isnan(fit[f"{name}_error"].values).all()
    assert np.allclose(fit["distance_m"].values, GEOMETRY.distance_m)


def test_refinement_does_not_depend_on_chunking():
    ds = dd.simulate_bragg(4, GEOMETRY, seed=4, **SPARSE).persist()
    one = dd.refine_geometry(ds.chunk({"frame": 1}), RINGS, rounds=2).compute()
    four = dd.refine_geometry(ds.chunk({"frame": 4}), RINGS, rounds=2).compute()
    for name in (*GEOMETRY_FIELDS, "pitch_deg_error", "chi2_reduced"):
        assert np.array_equal(one[name].values, four[name].values)


def test_network_predictions_start_the_fit_and_a_cluster_gives_the_same_bytes(client):
    ds = dd.simulate_bragg(4, GEOMETRY, beamstop_radius_px=5, seed=6, **SPARSE)
    truth = _truth(ds.compute())
    noisy = truth[:, :4] + np.array([0.7, -0.6, 1.0, -1.2])
    # A `predict` result's array: outputs named on an "output" dimension.
    predictions = xr.DataArray(noisy, dims=("frame", "output"), coords={"output": list(GEOMETRY_FIELDS[:4])})
    fit = dd.refine_geometry(ds, RINGS, initial=predictions, exclude_radius_px=7).compute()
    with dask.config.set(scheduler="synchronous"):
        local = dd.refine_geometry(ds, RINGS, initial=predictions, exclude_radius_px=7).compute()
    assert fit["refined"].all()
    for name in GEOMETRY_FIELDS:
        assert np.array_equal(fit[name].values, local[name].values)
    assert np.hypot(*(_truth(fit)[:, :2] - truth[:, :2]).T).mean() < 0.5 * np.hypot(0.7, 0.6)


def test_bad_input_is_refused_with_a_clear_error():
    ds = dd.simulate_bragg(2, GEOMETRY, seed=1)
    with pytest.raises(ParameterError, match="non-empty list"):
        dd.refine_geometry(ds, [])
    with pytest.raises(ParameterError, match="positive and finite"):
        dd.refine_geometry(ds, [(19.6, -2.2)])
    with pytest.raises(ParameterError, match="pairs"):
        dd.refine_geometry(ds, [(19.6, 2.2, 1.0)])
    with pytest.raises(ParameterError, match="lacks \\['pitch_deg'"):
        dd.refine_geometry(ds, RINGS, initial={"beam_center_y": [1, 2], "beam_center_x": [1, 2], "yaw_deg": [0, 0]})
    with pytest.raises(ParameterError, match="one value per frame"):
        dd.refine_geometry(ds, RINGS, initial={k: [0.0, 0.0, 0.0] for k in GEOMETRY_FIELDS[:4]})
    with pytest.raises(ParameterError, match="polarization"):
        dd.refine_geometry(ds, RINGS, polarization="z")
    with pytest.raises(ParameterError, match="rounds"):
        dd.refine_geometry(ds, RINGS, rounds=0)
    with pytest.raises(ParameterError, match="reject_sigma"):
        dd.refine_geometry(ds, RINGS, reject_sigma=-1.0)
    with pytest.raises(ParameterError, match="initial must be"):
        dd.refine_geometry(ds, RINGS, initial=[1, 2, 3])
    bare = dd.make_frame_stack(np.ones((2, 8, 8), dtype=np.float32))
    with pytest.raises(SchemaError, match="geometry"):
        dd.refine_geometry(bare, RINGS)


def test_refine_command_starts_from_saved_predictions(cluster, tmp_path):
    from click.testing import CliRunner

    from diffdask.cli import main
    from diffdask.io import open_results, save_frames, save_results

    ds = dd.simulate_bragg(4, GEOMETRY, beamstop_radius_px=5, seed=12, **SPARSE)
    save_frames(ds, tmp_path / "bragg.zarr")
    truth = _truth(ds.compute())
    start = truth[:, :4] + np.array([0.6, 0.5, -1.0, 1.0])
    predictions = xr.DataArray(start, dims=("frame", "output"), coords={"output": list(GEOMETRY_FIELDS[:4])})
    save_results(xr.Dataset({"predictions": predictions}), tmp_path / "bragg.zarr", "predict")
    rings = [f"{q},{w}" for q, w in RINGS]
    runner = CliRunner()
    result = runner.invoke(main, ["refine", str(tmp_path / "bragg.zarr"), "--ring", rings[0], "--ring", rings[1],
                                  "--start", "predict", "--exclude-radius", "7",
                                  "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 0, result.output
    assert "4 of 4 frames refined" in result.output
    saved = open_results(tmp_path / "bragg.zarr", "refine")
    assert np.hypot(*(_truth(saved)[:, :2] - truth[:, :2]).T).mean() < 0.5 * np.hypot(0.6, 0.5)
    result = runner.invoke(main, ["refine", str(tmp_path / "bragg.zarr"), "--ring", "19.6"])
    assert result.exit_code == 2 and "Q,SIGMA" in result.output
    result = runner.invoke(main, ["refine", str(tmp_path / "bragg.zarr"), "--ring", rings[0], "--json", "g.json"])
    assert result.exit_code == 2 and "--shared" in result.output


FIXED = dd.Geometry((96, 96), 500e-6, 0.06, 1e-10, (50.2, 45.6))
FIXED_TILT = (1.3, -0.7)


def _fixed_run(n, **kw):
    """A run whose detector never moves: centre (50.2, 45.6), tilt FIXED_TILT, 6.1 cm."""
    return dd.simulate_bragg(n, FIXED, beam_center_jitter_px=0, tilt_deg=FIXED_TILT, distance_m=0.061, seed=3, **kw)


def test_run_geometry_of_noise_free_frames_is_exact():
    ds = _fixed_run(2, spot_photons=1e-9, noise=False, beamstop_radius_px=0, hot_pixel_fraction=0,
                    dead_pixel_fraction=0).persist()
    fit = dd.refine_run_geometry(ds, RINGS, initial={"beam_center_y": 48.0, "beam_center_x": 47.0})
    assert abs(float(fit["beam_center_y"]) - 50.2) < 1e-3 and abs(float(fit["beam_center_x"]) - 45.6) < 1e-3
    assert abs(float(fit["pitch_deg"]) - FIXED_TILT[0]) < 1e-3 and abs(float(fit["yaw_deg"]) - FIXED_TILT[1]) < 1e-3
    assert abs(float(fit["distance_m"]) / 0.061 - 1) < 1e-5


def test_run_geometry_sharpens_as_the_square_root_of_the_frames(client):
    ds = _fixed_run(32, beamstop_radius_px=5, **SPARSE).persist()
    run = dd.refine_run_geometry(ds, RINGS, exclude_radius_px=7)  # from the nominal geometry, untilted
    per_frame = dd.refine_geometry(ds, RINGS, exclude_radius_px=7).compute()
    truth = {"beam_center_y": 50.2, "beam_center_x": 45.6, "pitch_deg": FIXED_TILT[0], "yaw_deg": FIXED_TILT[1],
             "distance_m": 0.061}
    for name, value in truth.items():
        error = float(run[f"{name}_error"])
        assert abs(float(run[name]) - value) < 4 * error, name
        if name != "distance_m":
            # 32 frames: √32 ≈ 5.7 times sharper than one frame (allow for the spread of frames).
            assert error < np.median(per_frame[f"{name}_error"].values) / 3.5, name
    assert int(run["n_frames"]) == 32 and float(run["pitch_deg_error"]) < 0.2


def test_run_geometry_refuses_bad_input():
    ds = _fixed_run(2)
    with pytest.raises(ParameterError, match="unknown entries"):
        dd.refine_run_geometry(ds, RINGS, initial={"tilt": 1.0})
    with pytest.raises(ParameterError, match="initial geometry is not usable"):
        dd.refine_run_geometry(ds, RINGS, initial={"beam_center_y": 500.0})
    with pytest.raises(ParameterError, match="must be numbers"):
        dd.refine_run_geometry(ds, RINGS, initial={"pitch_deg": "up"})
    with pytest.raises(ParameterError, match="max_iterations"):
        dd.refine_run_geometry(ds, RINGS, max_iterations=0)
    with pytest.raises(ParameterError, match="non-empty list"):
        dd.refine_run_geometry(ds, [])


def test_refine_command_shared_geometry_of_a_run(tmp_path):
    import json

    from click.testing import CliRunner

    from diffdask.cli import main
    from diffdask.io import save_frames, save_results

    save_frames(_fixed_run(8, beamstop_radius_px=5, **SPARSE), tmp_path / "run.zarr")
    # Per-frame network guesses around the truth: --shared starts from their median.
    guesses = np.array([50.2, 45.6, *FIXED_TILT]) + np.random.default_rng(0).normal(0, [0.5, 0.5, 1, 1], (8, 4))
    save_results(xr.Dataset({"predictions": (("frame", "output"), guesses)},
                            coords={"output": list(GEOMETRY_FIELDS[:4])}), tmp_path / "run.zarr", "predict")
    out = tmp_path / "geometry.json"
    runner = CliRunner()
    result = runner.invoke(main, ["refine", str(tmp_path / "run.zarr"), "--shared", "--json", str(out),
                                  "--start", "predict", "--exclude-radius", "7", *[a for q, w in RINGS for a in ("--ring", f"{q},{w}")]])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["n_frames"] == 8 and "pitch_deg" in result.output
    assert abs(saved["pitch_deg"] - FIXED_TILT[0]) < 4 * saved["pitch_deg_error"]
    assert abs(saved["beam_center_x"] - 45.6) < 4 * saved["beam_center_x_error"]
