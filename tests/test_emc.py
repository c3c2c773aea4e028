"""2D EMC: exact agreement with Dragonfly, chunk/worker independence, classification, bootstrap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import diffdask as dd
from diffdask.emc import EMC2D, bootstrap, bootstrap_membership
from diffdask.io.dragonfly import read_emc, read_emc_output, write_emc, write_emc_output

REF = Path(__file__).parents[2] / "shared" / "data" / "dragonfly_emc2d"
if not REF.exists():
    REF = Path("/work/shared/data/dragonfly_emc2d")


def _reference(i: int) -> dict:
    return read_emc_output(str(REF / f"output_{i:03d}.h5"))


def _sorted_probabilities(place, prob):
    order = np.argsort(place)
    return place[order], prob[order]


def _check_against_dragonfly(result) -> None:
    for it in result.iterations:
        ref = _reference(it.iteration)
        m, rm = it.models[0], ref["intens"]
        assert np.abs(m - rm).max() <= 1e-6 * np.abs(rm).max()
        assert np.allclose(it.weights[0], ref["inter_weight"], rtol=1e-10, atol=0)
        assert np.allclose(it.scale[:, 0], ref["scale"], rtol=1e-6, atol=0)
        assert np.array_equal(it.orientation[:, 0], ref["orientations"])
        assert np.allclose(it.occupancy[:, 0], ref["occupancies"], rtol=0, atol=1e-8)
        assert np.allclose(it.likelihood[:, 0], ref["likelihood"], rtol=1e-10)
        assert np.allclose(it.mutual_info[:, 0], ref["mutual_info"], rtol=0, atol=1e-10)
        probs = it.probabilities.tocsr()
        for d, (place, prob) in enumerate(zip(*ref["probabilities"])):
            place, prob = _sorted_probabilities(place, prob)
            row = probs[d]
            ours_place, ours_prob = _sorted_probabilities(row.indices, row.data)
            assert np.array_equal(ours_place, place), d
            assert np.abs(ours_prob - prob).max() <= 1e-8


@pytest.fixture(scope="module")
def dragonfly_stack():
    return read_emc(str(REF / "photons.emc"), str(REF / "det_sim.h5"), chunks=3000)


def test_two_iterations_reproduce_dragonfly_in_memory(dragonfly_stack):
    start = _reference(0)["intens"]
    result = EMC2D(6, 24, keep_probabilities=True).run(dragonfly_stack, 2, start_models=start)
    _check_against_dragonfly(result)
    # Dragonfly's EMC.log: iteration 1 log-likelihood −1.364583e+03, rms change 3.1905e-01, β 0.060082
    first = result.iterations[0]
    assert first.log_likelihood[0] == pytest.approx(-1.364583e3, rel=1e-6)
    assert first.rms_change[0] == pytest.approx(3.1905e-1, rel=1e-4)
    assert first.beta_mean == pytest.approx(0.060082, rel=1e-5)


def test_many_chunks_on_a_cluster_give_the_same_results(client, dragonfly_stack):
    start = _reference(0)["intens"]
    one = EMC2D(6, 24, keep_probabilities=True).run(dragonfly_stack, 2, start_models=start)
    many_ds = dragonfly_stack.chunk({"frame": 430})
    many = EMC2D(6, 24, keep_probabilities=True).run(many_ds, 2, start_models=start)
    _check_against_dragonfly(many)
    for a, b in zip(one.iterations, many.iterations):
        assert np.allclose(a.models, b.models, rtol=1e-12, atol=0)
        assert np.allclose(a.scale, b.scale, rtol=1e-12, atol=0)
        assert np.array_equal(a.orientation, b.orientation)


def test_dragonfly_files_round_trip(tmp_path, dragonfly_stack):
    sub = dragonfly_stack.isel(frame=slice(0, 200))
    write_emc(sub, str(tmp_path / "p.emc"), str(tmp_path / "d.h5"))
    back = read_emc(str(tmp_path / "p.emc"), str(tmp_path / "d.h5"))
    assert np.array_equal(back.frames.values, sub.frames.values)
    for name in ("emc_mask", "emc_pixel", "mask"):
        assert np.array_equal(back[name].values, sub[name].values), name
    assert np.allclose(back.emc_x.values, sub.emc_x.values, equal_nan=True)
    assert np.allclose(back.corr.values, sub.corr.values)
    # the original photon file's bytes come back exactly for the same frames and pixels
    write_emc(dragonfly_stack, str(tmp_path / "all.emc"))
    assert (tmp_path / "all.emc").read_bytes() == (REF / "photons.emc").read_bytes()


def test_outputs_write_in_dragonfly_layout(tmp_path, dragonfly_stack):
    start = _reference(0)["intens"]
    result = EMC2D(6, 24, keep_probabilities=True).run(dragonfly_stack, 1, start_models=start)
    (path,) = result.write_dragonfly(str(tmp_path))
    assert path.endswith("output_001.h5")
    ours, ref = read_emc_output(path), _reference(1)
    for key in ("intens", "inter_weight", "scale", "occupancies", "likelihood", "mutual_info"):
        assert np.allclose(ours[key], ref[key], rtol=1e-9, atol=1e-12), key
    assert np.array_equal(ours["orientations"], ref["orientations"])
    assert [len(p) for p in ours["probabilities"][0]] == [len(p) for p in ref["probabilities"][0]]
    write_emc_output(str(tmp_path / "bare.h5"), start)
    assert np.array_equal(read_emc_output(str(tmp_path / "bare.h5"))["intens"], start)


# ----------------------------------------------------------------- simulated classification
def _synthetic_stack(n_frames: int = 360, seed: int = 3, n_pix: int = 41):
    """Flat-Ewald diffraction of spheres (3 diameters) and a cube at random in-plane angles."""
    g = dd.Geometry((n_pix, n_pix), pixel_size_m=600e-6, distance_m=0.5, wavelength_m=4e-10)
    rng = np.random.default_rng(seed)
    s = g.scattering_vectors_inv_nm  # (3, y, x), |s| = 2 sinθ/λ
    qx, qy = 2 * np.pi * s[0], 2 * np.pi * s[1]
    q = np.hypot(qx, qy)
    labels = rng.integers(0, 4, n_frames)
    angles = rng.uniform(0, 2 * np.pi, n_frames)
    frames = np.empty((n_frames, n_pix, n_pix), dtype=np.uint16)
    for d in range(n_frames):
        if labels[d] < 3:
            radius = (30.0, 45.0, 60.0)[labels[d]] / 2
            x = np.maximum(q * radius, 1e-9)
            intensity = (3 * (np.sin(x) - x * np.cos(x)) / x**3) ** 2
        else:
            c, sn = np.cos(angles[d]), np.sin(angles[d])
            u, v = c * qx + sn * qy, -sn * qx + c * qy
            half = 50.0 / 2
            intensity = (np.sinc(u * half / np.pi) * np.sinc(v * half / np.pi)) ** 2
        mu = intensity * g.solid_angle_sr
        mu *= rng.uniform(800, 1500) / mu.sum()
        frames[d] = rng.poisson(mu)
    mask = g.radius_px > 2.5
    return dd.make_frame_stack(frames, mask=mask, geometry=g, per_frame={"label": labels, "angle": angles}, chunks=90)


def _purity(labels: np.ndarray, classes: np.ndarray) -> float:
    agree = 0
    for k in np.unique(classes):
        agree += np.bincount(labels[classes == k]).max()
    return agree / labels.size


def test_classes_and_in_plane_angles_are_recovered():
    ds = _synthetic_stack()
    labels, angles = ds.label.values, ds.angle.values
    n_rot = 36
    emc = EMC2D(n_classes=5, n_rotations=n_rot, beta=0.4, beta_schedule=(1.5, 4))
    result = emc.run(ds, 14, seed=11)
    final = result.final
    classes = final.occupancy[:, 0].argmax(axis=1)
    purity = _purity(labels, classes)
    assert purity >= 0.9, purity
    # In-plane angle of the cubes: EMC rotates (row, column) coordinates, the simulation rotated
    # (x, y) = (column, row), so a frame at angle φ is found at θ_j = φ − const: the offset
    # φ − θ_j is the same for every cube frame (modulo the cube's 4-fold axis).
    cubes = labels == 3
    j = final.orientation[cubes, 0] // 5
    offset = (angles[cubes] - 2 * np.pi * j / n_rot) % (np.pi / 2)
    ref = np.angle(np.mean(np.exp(4j * offset))) / 4
    err = np.abs(((offset - ref) + np.pi / 4) % (np.pi / 2) - np.pi / 4)
    assert np.mean(err < 2 * np.pi / n_rot) >= 0.9


def test_frames_without_photons_are_excluded_with_a_warning():
    ds = _synthetic_stack(n_frames=60)
    frames = ds.frames.values.copy()
    frames[[5, 17]] = 0
    ds = ds.assign(frames=(("frame", "y", "x"), frames)).chunk({"frame": 30})
    with pytest.warns(UserWarning, match="2 of 60 frames have no photons"):
        result = EMC2D(3, 8).run(ds, 2, seed=0)
    final = result.final
    assert np.isnan(final.scale[[5, 17], 0]).all() and (final.orientation[[5, 17], 0] == -1).all()
    assert np.isfinite(np.delete(final.scale[:, 0], [5, 17])).all()


# ----------------------------------------------------------------- bootstrap
def test_bootstrap_is_reproducible_and_runs_match_independent_runs(dragonfly_stack):
    ds = dragonfly_stack.isel(frame=slice(0, 600)).chunk({"frame": 250})
    kwargs = dict(n_runs=3, fraction=0.8, n_classes=3, n_rotations=8, iterations=2, seed=5)
    a = bootstrap(ds, **kwargs)
    b = bootstrap(ds, **kwargs)
    assert np.array_equal(a.final.models, b.final.models)
    member = bootstrap_membership(600, 3, 0.8, 5)
    assert np.array_equal(a.member, member) and (member.sum(axis=0) == 480).all()
    assert not np.array_equal(member[:, 0], member[:, 1])
    assert np.all(a.final.orientation[~member] == -1) and np.isnan(a.final.scale[~member]).all()
    assert np.all(a.final.orientation[member] >= 0)
    # Run 1 advanced inside the bootstrap equals an independent EMC run on its subset.
    subset = ds.isel(frame=np.flatnonzero(member[:, 1]))
    photons = subset.frames.values.reshape(480, -1)[:, dd.get_mask(subset).ravel() & (subset.emc_mask.values.ravel() == 0)]
    n_used = int((subset.emc_mask.values == 0).sum())
    start = np.random.default_rng([5, 1]).random((3, 93, 93)) * photons.sum(axis=1).mean() / n_used * 2
    alone = EMC2D(3, 8).run(subset, 2, start_models=start)
    assert np.allclose(a.final.models[1], alone.final.models[0], rtol=1e-10)
    assert np.allclose(a.final.scale[member[:, 1], 1], alone.final.scale[:, 0], rtol=1e-10)
    averages = a.averages()
    assert averages.frames.shape == (9, 93, 93)
    assert np.array_equal(averages.run.values, np.repeat([0, 1, 2], 3))
    assert averages.n_members.values.reshape(3, 3).sum(axis=1).tolist() == [480, 480, 480]


# ----------------------------------------------------------------- bad input
def test_bad_emc_inputs_are_clear_errors(tmp_path, dragonfly_stack):
    with pytest.raises(dd.ParameterError, match="n_classes"):
        EMC2D(0, 24)
    with pytest.raises(dd.ParameterError, match="n_rotations"):
        EMC2D(6, 0)
    with pytest.raises(dd.SchemaError, match=r"\(6, 93, 93\)"):
        EMC2D(6, 24).run(dragonfly_stack, 1, start_models=np.ones((6, 64, 64)))
    with pytest.raises(dd.ParameterError, match="fraction"):
        bootstrap(dragonfly_stack, fraction=1.5)
    with pytest.raises(dd.ParameterError, match="7 classes for 6 frames"):
        EMC2D(7, 24).run(dragonfly_stack.isel(frame=slice(0, 6)), 1)
    # photons and detector with different pixel counts
    sub = dragonfly_stack.isel(frame=slice(0, 10))
    write_emc(sub, str(tmp_path / "p.emc"))
    with h5py_file(tmp_path / "small_det.h5") as f:
        for key in ("qx", "qy", "qz", "corr", "mask"):
            f[key] = np.zeros(100)
        f["detd"], f["ewald_rad"] = 250.0, 250.0
    with pytest.raises(dd.SchemaError, match="4096 pixels per frame but detector"):
        read_emc(str(tmp_path / "p.emc"), str(tmp_path / "small_det.h5"))
    data = (REF / "photons.emc").read_bytes()
    (tmp_path / "cut.emc").write_bytes(data[: len(data) - 1000])
    with pytest.raises(dd.StoreFormatError, match="truncated"):
        read_emc(str(tmp_path / "cut.emc"), str(REF / "det_sim.h5"))
    (tmp_path / "header.emc").write_bytes(data[:100])
    with pytest.raises(dd.StoreFormatError, match="truncated"):
        read_emc(str(tmp_path / "header.emc"), str(REF / "det_sim.h5"))
    with pytest.raises(dd.StoreNotFoundError):
        read_emc(str(tmp_path / "missing.emc"), str(REF / "det_sim.h5"))
    with pytest.raises(dd.GeometryError, match="Geometry"):
        EMC2D(2, 4).run(dd.make_frame_stack(np.ones((4, 8, 8), "uint16")), 1)


def h5py_file(path):
    import h5py

    return h5py.File(path, "w")


# ----------------------------------------------------------------- command line
def test_emc2d_command_on_dragonfly_files_and_on_a_store(cluster, tmp_path, dragonfly_stack):
    from click.testing import CliRunner

    from diffdask.cli import main
    from diffdask.io import list_results, open_frames, open_results, save_frames

    runner = CliRunner()
    result = runner.invoke(main, [
        "emc2d", "--photons", str(REF / "photons.emc"), "--detector", str(REF / "det_sim.h5"),
        "--classes", "6", "--rotations", "24", "--start-model", str(REF / "output_000.h5"),
        "--iterations", "1", "--save-probabilities", "--out", str(tmp_path / "df"),
        "--scheduler", cluster.scheduler_address,
    ])
    assert result.exit_code == 0, result.output
    assert "iteration   1  log-likelihood -1.364583e+03" in result.output
    ours, ref = read_emc_output(str(tmp_path / "df" / "output_001.h5")), _reference(1)
    assert np.allclose(ours["intens"], ref["intens"], rtol=1e-9)

    store = tmp_path / "run.zarr"
    save_frames(dragonfly_stack.isel(frame=slice(0, 300)), store, batch_frames=100)
    result = runner.invoke(main, ["emc2d", str(store), "--classes", "2", "--rotations", "6", "--iterations", "2",
                                  "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 0, result.output
    assert list_results(store) == ["emc2d/iter_001", "emc2d/iter_002"]
    it2 = open_results(store, "emc2d/iter_002")
    assert it2.models.shape == (2, 93, 93) and it2.scale.shape == (300,)

    result = runner.invoke(main, ["bootstrap", str(store), "--runs", "2", "--classes", "2", "--rotations", "6",
                                  "--iterations", "1", "--out", str(tmp_path / "avg.zarr"),
                                  "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 0, result.output
    averages = open_frames(tmp_path / "avg.zarr")
    assert averages.frames.shape == (4, 93, 93) and averages.run.values.tolist() == [0, 0, 1, 1]

    result = runner.invoke(main, ["emc2d", "--classes", "2", "--rotations", "6"])
    assert result.exit_code == 2 and "STORE or --photons" in result.output


def test_iterations_are_written_to_zarr(tmp_path, dragonfly_stack):
    import xarray as xr

    start = _reference(0)["intens"]
    EMC2D(6, 24).run(dragonfly_stack, 2, start_models=start, out=str(tmp_path / "emc.zarr"))
    it2 = xr.open_zarr(tmp_path / "emc.zarr", group="iter_002")
    assert np.allclose(it2.models.values, _reference(2)["intens"], rtol=1e-9)
    assert np.allclose(it2.scale.values, _reference(2)["scale"], rtol=1e-9)
    assert it2.attrs["iteration"] == 2


def test_a_worker_killed_mid_iteration_changes_nothing(dragonfly_stack):
    """Persisted photon chunks lost with a worker are recomputed from their lineage."""
    import os
    import threading

    from distributed import Client, LocalCluster

    start = _reference(0)["intens"]
    ds = dragonfly_stack.chunk({"frame": 750})
    reference = EMC2D(6, 24).run(ds, 3, start_models=start)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        killed = []

        def kill(victim):
            try:
                client.run(os._exit, 1, workers=[victim])
            except Exception:  # the worker dies before it can answer
                pass
            killed.append(victim)

        def kill_one(it):
            if it.iteration == 1:
                victim = sorted(client.scheduler_info()["workers"])[0]
                # Kill a worker shortly after iteration 2 has started, while it holds photon chunks.
                timer = threading.Timer(0.3, kill, args=(victim,))
                timer.start()
                timers.append(timer)

        timers = []
        result = EMC2D(6, 24).run(ds, 3, start_models=start, callback=kill_one)
        timers[0].join()
        assert killed and killed[0] not in client.scheduler_info()["workers"]
    for a, b in zip(reference.iterations, result.iterations):
        assert np.array_equal(a.models, b.models)
        assert np.array_equal(a.scale, b.scale, equal_nan=True)
