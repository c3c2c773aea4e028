"""Latent spaces: preprocessing kernels, IPCA / randomized fits, transform, outlier flags, storage."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

import diffdask as dd
from diffdask import latent, metrics
from diffdask.cli import main
from diffdask.simulate import Particle, detector_mask


@pytest.fixture(scope="module")
def mixture() -> xr.Dataset:
    """300 simulated 48×48 frames of 65–75 nm capsids, 85 % single hits, fluence jitter, in memory."""
    g = dd.Geometry((48, 48), 1.2e-3, 0.3, 6e-10)
    ds = dd.simulate_spi(
        300, g, Particle("icosahedral_shell", (65.0, 75.0)), single_hit_fraction=0.85,
        mask=detector_mask(g, gap_px=2, beamstop_radius_px=2), seed=5, chunks=100,
    )
    with dask.config.set(scheduler="synchronous"):
        return ds.compute()


@pytest.fixture(scope="module")
def lowrank() -> xr.Dataset:
    """Noiseless frames from 4 smooth patterns (a well-separated spectrum), with a mask."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:20, :24]
    basis = np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0) for cy, cx in [(5, 5), (14, 18), (10, 12), (3, 20)]])
    weights = rng.gamma(2.0, 1.0, size=(157, 4)) * np.array([4.0, 2.0, 1.0, 0.5])
    frames = 5.0 + np.einsum("nk,kyx->nyx", weights, basis)
    mask = np.ones((20, 24), dtype=bool)
    mask[9, :] = False
    return dd.make_frame_stack(frames.astype(np.float32), mask=mask, chunks=40)


# ------------------------------------------------------------------ preprocessing kernels
def test_binning_kernel_against_loops():
    rng = np.random.default_rng(1)
    frames = rng.poisson(3.0, size=(5, 12, 12)).astype(np.float32)
    mask = np.ones((12, 12), dtype=bool)
    mask[0, 0] = mask[0, 1] = mask[1, 0] = False  # 3 of 4 pixels of bin (0, 0) masked: dropped
    mask[4, 4] = False  # 1 of 4 masked: bin (2, 2) is the mean of the other 3
    prep = latent.Preprocessing(downsample="bin", factor=2, normalize=False)
    layout = latent.feature_layout(mask, prep)
    out = latent.preprocess_block(frames, prep=prep, layout=layout, mask=mask)
    expected = []
    for f in frames:
        row = []
        for by in range(6):
            for bx in range(6):
                good = mask[2 * by : 2 * by + 2, 2 * bx : 2 * bx + 2]
                if good.mean() >= 0.5:
                    row.append(f[2 * by : 2 * by + 2, 2 * bx : 2 * bx + 2][good].mean())
        expected.append(row)
    assert layout.n_features == 35
    np.testing.assert_allclose(out, np.array(expected), rtol=1e-6)


def test_fourier_crop_is_an_ideal_lowpass():
    # A band-limited image (only frequencies |k| < 3 of 32) survives the ÷4 crop exactly at
    # the coarse sample points.
    y, x = np.mgrid[:32, :32]
    img = 2.0 + np.cos(2 * np.pi * 2 * x / 32) + 0.5 * np.sin(2 * np.pi * 1 * y / 32)
    mask = np.ones((32, 32), dtype=bool)
    prep = latent.Preprocessing(downsample="fourier", factor=4, normalize=False)
    layout = latent.feature_layout(mask, prep)
    out = latent.preprocess_block(img[None], prep=prep, layout=layout, mask=mask)[0].reshape(8, 8)
    np.testing.assert_allclose(out, img[::4, ::4], atol=1e-5)


def test_crop_normalize_and_intensity():
    rng = np.random.default_rng(2)
    frames = rng.poisson(2.0, size=(3, 30, 40)).astype(np.float32)
    mask = np.ones((30, 40), dtype=bool)
    prep = latent.Preprocessing(crop=10, intensity="sqrt")
    layout = latent.feature_layout(mask, prep, center_yx=(3.0, 35.0))
    # Centred on the beam, slid inside the frame: rows 0..9, columns 30..39.
    assert layout.box == (0, 10, 30, 40)
    out = latent.preprocess_block(frames, prep=prep, layout=layout, mask=mask)
    sub = frames[:, 0:10, 30:40].reshape(3, -1)
    np.testing.assert_allclose(out, np.sqrt(sub / sub.mean(axis=1, keepdims=True)), rtol=1e-6)


def test_nonfinite_pixels_are_masked():
    frames = np.ones((2, 8, 8), dtype=np.float32)
    frames[0, 3, 3] = np.nan
    mask = np.ones((8, 8), dtype=bool)
    prep = latent.Preprocessing(downsample="bin", factor=2, normalize=False)
    out = latent.preprocess_block(frames, prep=prep, layout=latent.feature_layout(mask, prep), mask=mask)
    np.testing.assert_allclose(out, 1.0)


# ------------------------------------------------------------------ fits
def _match_up_to_sign(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    signs = np.sign(np.sum(a * b, axis=0))
    return b * signs


@pytest.mark.parametrize("method", ["incremental", "randomized"])
def test_same_latent_space_for_any_chunking(lowrank, method):
    z = []
    for chunk in (40, 17, 157):
        ds = lowrank.chunk({"frame": chunk})
        model = latent.fit_latent(ds, 3, method, batch_frames=50, n_power_iter=4)
        z.append(latent.transform(ds, model)["latent"].values)
    for other in z[1:]:
        np.testing.assert_allclose(_match_up_to_sign(z[0], other), z[0], atol=1e-6 * np.abs(z[0]).max())


def test_incremental_and_randomized_agree(mixture):
    # Default batches (256 frames): much smaller ones lose variance of the near-degenerate
    # orientation components (64-frame batches: −9 % on the third).
    inc = latent.fit_latent(mixture, 3, "incremental", crop=32)
    rnd = latent.fit_latent(mixture, 3, "randomized", crop=32, n_power_iter=4)
    np.testing.assert_allclose(rnd.explained_variance_ratio, inc.explained_variance_ratio, rtol=0.03)
    # And both match an exact PCA of the same features.
    x = latent.latent_features(mixture, inc.prep).values.astype(np.float64)
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    exact = (s**2 / (len(x) - 1))[:3]
    np.testing.assert_allclose(rnd.explained_variance, exact, rtol=0.01)
    np.testing.assert_allclose(inc.explained_variance, exact, rtol=0.03)


def test_transform_matches_the_model(lowrank):
    model = latent.fit_latent(lowrank, 2, batch_frames=60)
    out = latent.transform(lowrank, model)
    assert isinstance(out["latent"].data, dask.array.Array)  # lazy until asked
    x = latent.latent_features(lowrank, model.prep).values.astype(np.float64) - model.mean
    z = x @ model.components.T
    np.testing.assert_allclose(out["latent"].values, z, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(out["residual"].values, ((x - z @ model.components) ** 2).mean(axis=1), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(model.components @ model.components.T, np.eye(2), atol=1e-10)


def test_model_save_load_round_trip(lowrank, tmp_path):
    model = latent.fit_latent(lowrank, 3, crop=16, downsample="bin", factor=2, intensity="log", batch_frames=40)
    model.save(tmp_path / "model.zarr")
    back = latent.LatentModel.load(tmp_path / "model.zarr")
    assert back.prep == model.prep and back.method == model.method and back.n_frames == model.n_frames
    assert back.layout.box == model.layout.box and back.layout.frame_shape == model.layout.frame_shape
    np.testing.assert_array_equal(back.components, model.components)
    np.testing.assert_array_equal(back.layout.feature_mask, model.layout.feature_mask)
    np.testing.assert_array_equal(latent.transform(lowrank, back)["latent"].values,
                                  latent.transform(lowrank, model)["latent"].values)
    # No pickles: the group holds only arrays and JSON.
    files = {p.name for p in (tmp_path / "model.zarr").rglob("*") if p.is_file()}
    assert "zarr.json" in files and not any(name.endswith((".pkl", ".pickle")) for name in files)
    with pytest.raises(dd.StoreExistsError):
        model.save(tmp_path / "model.zarr")


# ------------------------------------------------------------------ sorting
def test_sorting_a_simulated_mixture(mixture):
    truth = mixture["single_hit"].values
    model, res = latent.sort_single_hits(mixture, 3, crop=32)
    res = res.compute()
    assert res.attrs["outliers"]["contamination"] == pytest.approx(0.15)  # from the simulation attrs
    report = metrics.classification_report(truth, res["single_hit"].values, -res["outlier_score"].values)
    assert report["roc_auc"] > 0.97
    assert report["tpr"] > 0.9 and report["fpr"] < 0.3
    # The poster's envelope on the latent coordinates alone does far worse on size-varying capsids.
    flags = latent.flag_outliers(res["latent"], 0.15).compute()
    assert metrics.roc_auc(truth, -flags["outlier_score"].values) < report["roc_auc"]


def test_flag_outliers_is_seeded_and_counts_the_contamination():
    rng = np.random.default_rng(3)
    z = np.concatenate([rng.normal(size=(380, 2)), rng.normal(8.0, 1.0, size=(20, 2))])
    # contamination 0.08 > the 5 % true outliers: the threshold sits inside the inlier cloud.
    a = latent.flag_outliers(z, 0.08, seed=1, max_fit_frames=300).compute()
    b = latent.flag_outliers(z, 0.08, seed=1, max_fit_frames=300).compute()
    xr.testing.assert_identical(a, b)
    assert a.attrs["fit_frames"] == 300
    assert a["single_hit"].values[:380].mean() > 0.93 and not a["single_hit"].values[380:].any()
    d = latent.flag_outliers(z, expected_single_fraction=0.9).compute()
    assert d.attrs["contamination"] == pytest.approx(0.1)


def test_sorting_on_a_cluster(client, mixture):
    with dask.config.set(scheduler="synchronous"):
        local = latent.fit_latent(mixture, 3, crop=32, batch_frames=64)
    ds = client.persist(mixture.chunk({"frame": 64}))
    model = latent.fit_latent(ds, 3, crop=32, batch_frames=64)
    np.testing.assert_allclose(model.components, local.components, atol=1e-8)
    z = latent.transform(ds, model).compute()
    assert z["latent"].shape == (300, 3)


# ------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors(lowrank):
    with pytest.raises(dd.ParameterError, match="larger than the .* pixels"):
        latent.fit_latent(lowrank, 20 * 24)
    with pytest.raises(dd.ParameterError, match="larger than the number of frames"):
        latent.fit_latent(lowrank.isel(frame=slice(0, 3)), 4)
    with pytest.raises(dd.ParameterError, match="method"):
        latent.fit_latent(lowrank, 2, "exact")
    with pytest.raises(dd.ParameterError, match="factor=2 needs downsample"):
        latent.fit_latent(lowrank, 2, factor=2)
    with pytest.raises(dd.ParameterError, match="crop=30 is larger"):
        latent.fit_latent(lowrank, 2, crop=30)
    z = np.random.default_rng(0).normal(size=(50, 2))
    for c in (0.0, -0.1, 0.6, "a lot"):
        with pytest.raises(dd.ParameterError, match=r"contamination must be .*\(0, 0.5\]"):
            latent.flag_outliers(z, c)
    with pytest.raises(dd.ParameterError, match="one value per frame"):
        latent.flag_outliers(z, 0.1, residual=np.ones(3))
    with pytest.raises(dd.ParameterError, match="2-D"):
        latent.flag_outliers(z[:, 0], 0.1)


def test_frames_without_photons_raise(lowrank):
    frames = lowrank["frames"].values.copy()
    frames[42] = 0
    ds = dd.make_frame_stack(frames, mask=lowrank["mask"].values, chunks=40)
    with pytest.raises(dd.ParameterError, match=r"frames \[42\] hold no photons"):
        latent.fit_latent(ds, 2)
    with pytest.raises(dd.ParameterError, match=r"frames \[42\] hold no photons"):
        latent.fit_latent(ds, 2, "randomized")
    model = latent.fit_latent(lowrank, 2)
    with pytest.raises(dd.ParameterError, match=r"frames \[42\]"):
        latent.transform(ds, model).compute()
    other = dd.make_frame_stack(np.ones((4, 10, 10), dtype=np.float32))
    with pytest.raises(dd.SchemaError, match="fitted on"):
        latent.transform(other, model)


# ------------------------------------------------------------------ command line
def test_cli_latent_writes_results(cluster, mixture, tmp_path):
    store = tmp_path / "mix.zarr"
    dd.save_frames(mixture, store)
    runner = CliRunner()
    args = ["latent", str(store), "--crop", "32", "--contamination", "0.15", "--scheduler", cluster.scheduler_address]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "vs ground truth" in result.output
    res = dd.open_results(store, "latent")
    assert {"latent", "residual", "single_hit", "outlier_score", "components", "mean"} <= set(res.variables)
    assert res["latent"].shape == (300, 3) and res["single_hit"].dtype == bool
    model = latent.LatentModel.from_dataset(res)
    assert model.prep.crop == 32
    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = runner.invoke(main, ["latent", str(store), "--contamination", "0.7", "--overwrite"])
    assert bad.exit_code == 2 and "(0, 0.5]" in bad.output


def test_pipeline_latent_step(tmp_path):
    from diffdask.demo import write_demo_cxi
    from diffdask.pipeline import load_pipeline, run_pipeline

    (tmp_path / "archive").mkdir()
    write_demo_cxi(str(tmp_path / "archive" / "run_00.cxi"), n_frames=80, shape=(32, 32), seed=2, block=40)
    (tmp_path / "pipeline.yaml").write_text(
        "inputs: archive/run_*.cxi\noutput: processed/{stem}.zarr\nsteps:\n"
        "  - ingest: {batch_frames: 40}\n  - latent: {components: 2, single_fraction: 0.9}\n"
    )
    with dask.config.set(scheduler="synchronous"):
        report = run_pipeline(load_pipeline(str(tmp_path / "pipeline.yaml")))
    assert [r.status for r in report.steps] == ["done", "done"], report.steps
    res = dd.open_results(tmp_path / "processed" / "run_00.zarr", "latent")
    assert res["latent"].shape == (80, 2) and res.attrs["outliers"]["contamination"] == pytest.approx(0.1)
    assert latent.LatentModel.from_dataset(res).n_components == 2
    assert "frames flagged single hits" in report.steps[1].message
