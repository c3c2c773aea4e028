"""Reductions from Zarr stores, on a 2-process LocalCluster, and through ``diffdask reduce``."""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
import pytest
from click.testing import CliRunner

import diffdask as dd
from diffdask.cli import main
from diffdask.demo import write_demo_cxi

GEOM = dd.Geometry((40, 36), pixel_size_m=150e-6, distance_m=0.2, wavelength_m=0.6e-9, beam_center_yx=(19.4, 17.2))


@pytest.fixture
def sphere_stack():
    """Poisson photon frames of spheres (uint16) with a beamstop and a dead row."""
    rng = np.random.default_rng(42)
    x = np.maximum(GEOM.q_inv_nm * 70.0 / 2.0, 1e-9)
    mu = (3.0 * (np.sin(x) - x * np.cos(x)) / x**3) ** 2
    mu *= 800.0 / mu.sum()
    frames = rng.poisson(mu * rng.gamma(2.0, 0.5, size=(60, 1, 1))).astype(np.uint16)
    mask = GEOM.radius_px > 2.5
    mask[30] = False
    return dd.make_frame_stack(frames, mask=mask, geometry=GEOM, chunks=13, attrs={"units": "photons"})


def assert_same(a, b, names):
    for name in names:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


SUMMARY_VARS = ("com_y", "com_x", "total", "radial_profile", "lit_pixels", "is_hit")


def test_summarize_from_zarr_equals_in_memory(sphere_stack, tmp_path):
    stored = dd.save_frames(sphere_stack, tmp_path / "run.zarr", batch_frames=16)
    assert stored.frames.data.chunks[0][0] == 16  # other chunking than in memory (13)
    ref = dd.summarize(sphere_stack, threshold=0.5, min_lit=20).compute(scheduler="threads")
    got = dd.summarize(stored, threshold=0.5, min_lit=20).compute(scheduler="threads")
    assert_same(got, ref, SUMMARY_VARS)
    np.testing.assert_array_equal(got.q_inv_nm.values, ref.q_inv_nm.values)


def test_results_identical_on_a_two_process_cluster(sphere_stack, client):
    assert len(client.scheduler_info()["workers"]) == 2
    local = dd.summarize(sphere_stack, threshold=0.5, min_lit=20).compute(scheduler="threads")
    mean_local = dd.mean_profile(sphere_stack).compute(scheduler="threads")
    distributed = dd.summarize(sphere_stack, threshold=0.5, min_lit=20).compute()  # the client
    mean_distributed = dd.mean_profile(sphere_stack).compute()
    assert_same(distributed, local, SUMMARY_VARS)
    np.testing.assert_array_equal(mean_distributed.values, mean_local.values)
    # The fit's float64 GEMMs round by row position too: compare equal chunkings.
    fit_local = dd.fit_sphere_diameter(local.radial_profile.chunk({"frame": 13})).compute(scheduler="threads")
    fit_distributed = dd.fit_sphere_diameter(distributed.radial_profile.chunk({"frame": 13})).compute()
    np.testing.assert_array_equal(fit_distributed.diameter_nm.values, fit_local.diameter_nm.values)


def test_cli_reduce_writes_results_and_figure(sphere_stack, cluster, tmp_path):
    store = tmp_path / "run.zarr"
    dd.save_frames(sphere_stack, store, batch_frames=16)
    runner = CliRunner()
    args = ["reduce", str(store), "--scheduler", cluster.scheduler_address, "--threshold", "0.5", "--min-lit", "20"]
    result = runner.invoke(main, args + ["--figure", str(tmp_path / "summary.png")])
    assert result.exit_code == 0, result.output
    assert "results/summary" in result.output and "hits" in result.output and "mean PSD" in result.output
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    saved = dd.open_results(store, "summary")
    with dask.config.set(scheduler="threads"):
        ref = dd.summarize(dd.open_frames(store), threshold=0.5, min_lit=20).compute()
    assert_same(saved, ref, SUMMARY_VARS)
    assert saved.attrs["diffdask_function"] == "diffdask.summarize" and saved.attrs["min_lit"] == 20

    only_com = runner.invoke(main, ["reduce", str(store), "--what", "com", "--group", "com",
                                    "--scheduler", cluster.scheduler_address])
    assert only_com.exit_code == 0, only_com.output
    assert set(dd.open_results(store, "com").data_vars) == {"com_y", "com_x", "total", "n_nonfinite"}

    same = runner.invoke(main, args)  # an identical re-run (e.g. after a crash) is fine
    assert same.exit_code == 0, same.output
    other = args[:-1] + ["5"]  # other parameters into the same group: refused ...
    refused = runner.invoke(main, other)
    assert refused.exit_code == 2 and "error:" in refused.output
    replaced = runner.invoke(main, other + ["--overwrite"])  # ... unless asked
    assert replaced.exit_code == 0, replaced.output
    assert dd.open_results(store, "summary").attrs["min_lit"] == 5
    bad = runner.invoke(main, ["reduce", str(store), "--what", "com,psd"])
    assert bad.exit_code == 2 and "com,radial,hits" in bad.output


def test_readme_reduction_example_runs(cluster, tmp_path, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    quick = readme.split("## Quick start (Python)")[1].split("```python")[1].split("```")[0]
    reductions = readme.split("## Per-frame reductions")[1].split("```python")[1].split("```")[0]
    write_demo_cxi(str(tmp_path / "run.cxi"), n_frames=30, shape=(128, 128), seed=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFDASK_SCHEDULER", cluster.scheduler_address)
    namespace: dict = {}
    exec(compile(quick, "README.md", "exec"), namespace)
    exec(compile(reductions, "README.md", "exec"), namespace)
    assert namespace["keep"].sizes["frame"] == 30
    assert set(dd.open_results("run.zarr", "summary").data_vars) >= {"com_y", "radial_profile", "is_hit"}


def test_saving_a_summary_reads_each_chunk_once(sphere_stack, tmp_path, monkeypatch):
    import diffdask.reduce._graph as graph

    calls = []
    kernel = graph.reduce_block

    def counted(block, **kwargs):
        calls.append(block.shape[0])
        return kernel(block, **kwargs)

    monkeypatch.setattr(graph, "reduce_block", counted)
    store = tmp_path / "run.zarr"
    stored = dd.save_frames(sphere_stack, store, batch_frames=16)
    with dask.config.set(scheduler="threads"):
        dd.save_results(dd.summarize(stored, threshold=0.5, min_lit=20), store, "summary")
    assert sorted(calls) == [12, 16, 16, 16]  # six result variables, one kernel call per chunk


def test_a_worker_killed_mid_summarize_gives_the_same_bits(tmp_path):
    """Lost chunks are recomputed; with retries the result is bit-identical."""
    import os
    import time

    import dask.array as da
    from distributed import Client, LocalCluster

    # Frames made on the workers (seeded per chunk), so the computation takes seconds.
    frames = da.random.RandomState(3).poisson(1.0, size=(24_000, 48, 48), chunks=(500, 48, 48)).astype("float32")
    ds = dd.make_frame_stack(frames, chunks=500, geometry=dd.Geometry((48, 48), 75e-6, 0.1, 1e-10))
    reference = dd.summarize(ds, threshold=1.5, min_lit=10).compute(scheduler="threads")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        victim = sorted(client.scheduler_info()["workers"])[0]
        future = client.compute(dd.summarize(ds, threshold=1.5, min_lit=10), retries=2)
        while not client.who_has() or not any(client.has_what().values()):
            time.sleep(0.02)
        assert not future.done()  # the kill below lands in the middle of the computation
        try:
            client.run(os._exit, 1, workers=[victim])
        except Exception:  # the worker dies before it answers
            pass
        result = future.result()
        assert victim not in client.scheduler_info()["workers"]
    for name in reference.data_vars:
        assert np.array_equal(reference[name].values, result[name].values, equal_nan=True), name
