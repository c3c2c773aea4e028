"""Ptychography region of interest (Lin et al.) on scans whose object footprint is known."""

from __future__ import annotations

import math
from pathlib import Path

import dask
import matplotlib
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from diffdask import (
    DiffdaskError,
    Geometry,
    GeometryError,
    ParameterError,
    SchemaError,
    differential_phase,
    find_roi,
    grow_roi,
    make_frame_stack,
    scan_grid,
    scan_maps,
    simulate_ptycho,
)
from diffdask.cli import main
from diffdask.io import open_results, save_frames
from diffdask.simulate import make_probe, object_ground_truth, scan_positions

matplotlib.use("Agg")

LAM, DIST, PIX, N = 1.409e-10, 2.0, 75e-6, 32
GEOM = Geometry((N, N), PIX, DIST, LAM)
DX = LAM * DIST / (N * PIX)  # object-plane pixel, m
# A 0.5 µm probe stepped by 0.3 µm over 30 × 30 positions; cells of 3–5 µm unless said.
SCAN = dict(probe_diameter_m=0.5e-6, overlap=0.4, coverage=0.3, particle_diameter_m=(3e-6, 5e-6), chunks=150)
PHANTOMS = {
    "weak absorber": dict(beta=1e-7, photons_per_frame=1e5, seed=1),
    "strong absorber": dict(beta=5e-6, photons_per_frame=1e4, seed=2),
    "small cells": dict(particle_diameter_m=(1e-6, 2e-6), photons_per_frame=1e5, seed=1),
    "fly scan": dict(scan="fly", beta=1e-6, photons_per_frame=1e4, seed=3),
    # Position errors of a third of the step: no raster, positions in units of the step.
    "irregular positions": dict(position_jitter_m=0.1e-6, beta=1e-6, photons_per_frame=1e4, seed=1),
}


@pytest.fixture(autouse=True)
def _sync_scheduler(request):
    if "client" in request.fixturenames:
        yield
        return
    with dask.config.set(scheduler="synchronous"):
        yield


_STACKS: dict[str, xr.Dataset] = {}


def phantom(name: str) -> xr.Dataset:
    """A simulated scan held in memory (made once per session, rechunked by the tests)."""
    if name not in _STACKS:
        with dask.config.set(scheduler="synchronous"):
            _STACKS[name] = simulate_ptycho(900, GEOM, **{**SCAN, **PHANTOMS[name]}).compute()
    return _STACKS[name]


def lazy(ds: xr.Dataset, chunk: int = 150) -> xr.Dataset:
    return ds.chunk({"frame": chunk})


# --------------------------------------------------------------------------- the method


@pytest.mark.parametrize("name", list(PHANTOMS))
def test_recall_of_the_footprint_and_kept_fraction(name):
    ds = phantom(name)
    roi = find_roi(lazy(ds)).compute()
    truth, kept = ds.in_object.values, roi.in_roi.values
    recall = (kept & truth).sum() / truth.sum()
    precision = (kept & truth).sum() / kept.sum()
    fraction = float(roi.roi_fraction)
    # The footprint and a rim of one scan step: the reach of the 3 × 3 window.
    rim = grow_roi(roi.assign(in_roi=("frame", truth)), 1).in_roi.values
    print(f"\n{name}: footprint {truth.mean():.3f}, kept {fraction:.3f}, recall {recall:.3f}, "
          f"precision {precision:.3f}, footprint + 1 step {rim.mean():.3f}")
    assert int(roi.n_in_roi) == kept.sum() and fraction == pytest.approx(kept.mean())
    assert recall >= 0.95
    # Kept, but not on the object: only the rim the window adds, never the far background.
    assert truth.mean() <= fraction <= rim.mean()
    assert not (kept & ~rim).any()
    raster = name != "irregular positions"
    assert np.all(roi.grid_y.values == np.rint(roi.grid_y.values)) == raster


def _slab_and_prism_scan(seed: int = 0) -> tuple[xr.Dataset, dict[str, np.ndarray]]:
    """A flat absorbing slab beside a non-absorbing phase prism, scanned by a Gaussian probe.

    The slab (intensity transmission e^-0.5, constant phase) deflects nothing inside, only at
    its rim; the prism (phase ramp 0.33 rad per pixel, no absorption) deflects the beam by
    0.33·N/2π ≈ 1.7 detector pixels everywhere and absorbs nothing.
    """
    rng = np.random.default_rng(seed)
    probe = make_probe((N, N), (DX, DX), "gaussian", 3 * DX, 0.0, LAM)
    side, step, radius = 24, 2, 9
    size = side * step + N
    yy, xx = np.mgrid[:size, :size] - size / 2
    slab = np.hypot(yy, xx + 11) < radius
    prism = np.hypot(yy, xx - 12) < radius
    obj = np.ones((size, size), complex)
    obj[slab] = np.exp(-0.25 - 1j)
    obj[prism] = np.exp(0.33j * xx[prism])
    frames, sy, sx, where = [], [], [], {"slab": [], "prism": [], "slab interior": []}
    for r in range(side):
        for c in range(side):
            patch = obj[r * step : r * step + N, c * step : c * step + N]
            wave = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(probe * patch), norm="ortho"))
            frames.append(rng.poisson(1e5 * np.abs(wave) ** 2))
            cy, cx = r * step + N // 2, c * step + N // 2  # probe centre in the object array
            sy.append(yy[cy, cx] * DX)
            sx.append(xx[cy, cx] * DX)
            where["slab"].append(slab[cy, cx])
            where["prism"].append(prism[cy, cx])
            where["slab interior"].append(np.hypot(yy[cy, cx], xx[cy, cx] + 11) < radius - 4)
    ds = make_frame_stack(np.array(frames, np.float32), geometry=GEOM.with_beam_center((N // 2, N // 2)),
                          per_frame={"scan_y": np.array(sy), "scan_x": np.array(sx)}, chunks=100)
    return ds, {k: np.array(v) for k, v in where.items()}


def test_absorption_misses_weak_absorbers_and_com_misses_flat_interiors():
    ds, where = _slab_and_prism_scan()
    roi = find_roi(ds).compute()
    a, c, kept = roi.in_absorption.values, roi.in_com.values, roi.in_roi.values
    slab, prism, interior = where["slab"], where["prism"], where["slab interior"]
    assert interior.sum() >= 15
    # Absorption finds the slab and misses the transparent prism...
    assert a[slab].mean() >= 0.95 and a[prism].mean() <= 0.05
    # ...the CoM finds the prism and the slab's rim but not its flat interior.
    assert c[prism].mean() >= 0.95 and c[interior].mean() <= 0.2
    # Each part adds object positions the other misses; the union finds the whole object.
    assert (a & ~c & slab).sum() >= 15 and (c & ~a & prism).sum() >= 40
    footprint = slab | prism
    assert (kept & footprint).sum() / footprint.sum() >= 0.95


def test_same_roi_on_a_cluster_and_in_memory_for_any_chunking(client):
    ds = phantom("strong absorber")
    with dask.config.set(scheduler="synchronous"):
        reference = find_roi(lazy(ds, 900)).compute()
    for chunk in (75, 128, 900):
        got = find_roi(lazy(ds, chunk)).compute()  # on the LocalCluster (client fixture)
        assert np.array_equal(got.in_roi.values, reference.in_roi.values), chunk
        assert np.array_equal(got.in_absorption.values, reference.in_absorption.values)
        for name in ("absorption_map", "com_map", "com_std_y", "total"):
            np.testing.assert_allclose(got[name].values, reference[name].values, rtol=1e-9, err_msg=name)
    grown = grow_roi(find_roi(lazy(ds, 75)), 2).compute()
    with dask.config.set(scheduler="synchronous"):
        assert np.array_equal(grown.in_roi.values, grow_roi(reference, 2).in_roi.values)


# --------------------------------------------------------------------------- the maps


def test_scan_maps_follow_eqs_1_and_2():
    ds = phantom("small cells")
    maps = scan_maps(lazy(ds)).compute()
    frames = ds.frames.values.astype(float)
    total = frames.sum(axis=(1, 2))
    np.testing.assert_allclose(maps.total.values, total, rtol=1e-6)
    # Eq. 1 with pixel centres at integer indices.
    rows = np.arange(N)
    np.testing.assert_allclose(maps.com_y.values, (frames.sum(axis=2) * rows).sum(axis=1) / total, rtol=1e-6)
    np.testing.assert_allclose(maps.com_x.values, (frames.sum(axis=1) * rows).sum(axis=1) / total, rtol=1e-6)
    # Eq. 2: zero mean, unit variance of each component over the scan.
    for dev, std, com in (("com_dy", "com_std_y", "com_y"), ("com_dx", "com_std_x", "com_x")):
        np.testing.assert_allclose(maps[dev].values, maps[com].values - maps[com].values.mean(), atol=1e-9)
        assert maps[std].values.mean() == pytest.approx(0, abs=1e-9)
        assert maps[std].values.std() == pytest.approx(1, rel=1e-9)
    np.testing.assert_allclose(maps.com_magnitude.values, np.hypot(maps.com_std_y.values, maps.com_std_x.values))
    assert maps.total.attrs["units"] == "photons" and maps.com_dx.attrs["units"] == "pixel"
    # The raster of 30 × 30 positions, as an image.
    image = scan_grid(maps, "total")
    assert image.shape == (30, 30)
    row, col = maps.grid_y.values.astype(int), maps.grid_x.values.astype(int)
    np.testing.assert_array_equal(image.values[row, col], maps.total.values)
    np.testing.assert_allclose(np.diff(image.x_m.values), 0.3e-6, rtol=1e-9)


def _uniform_stack(totals: np.ndarray, y: np.ndarray, x: np.ndarray) -> xr.Dataset:
    """Flat frames with given totals: the CoM sits at the detector centre in every frame."""
    frames = np.repeat(totals[:, None, None] / 16.0, 16, axis=1).reshape(-1, 4, 4)
    return make_frame_stack(frames, per_frame={"scan_y": y, "scan_x": x}, chunks=7)


def _box_mean(image: np.ndarray, good: np.ndarray, half: int) -> np.ndarray:
    """Mean over the good pixels of each (2·half + 1)² window, written out with loops."""
    out = np.full(image.shape, np.nan)
    for r in range(image.shape[0]):
        for c in range(image.shape[1]):
            if good[r, c]:
                win = (slice(max(r - half, 0), r + half + 1), slice(max(c - half, 0), c + half + 1))
                out[r, c] = image[win][good[win]].mean()
    return out


@pytest.mark.parametrize("filter_size", [1, 3, 5])
def test_filter_is_the_box_mean_on_the_raster_in_any_frame_order(filter_size):
    rng = np.random.default_rng(3)
    pos, (rows, cols) = scan_positions(28, 0.2e-6)  # 5 lines of 6, the last one partial
    totals = rng.uniform(100, 200, 28)
    image, good = np.zeros((rows, cols)), np.zeros((rows, cols), bool)
    image.flat[:28], good.flat[:28] = totals, True
    expected = np.log(_box_mean(image, good, filter_size // 2)).ravel()[:28]
    roi = find_roi(_uniform_stack(totals, pos[:, 0], pos[:, 1]), filter_size=filter_size).compute()
    np.testing.assert_allclose(roi.absorption_map.values, expected, rtol=1e-12)
    # Another acquisition order (snake lines, reversed) and an offset, rotated-free raster:
    # the same value at each position.
    order = rng.permutation(28)
    again = find_roi(_uniform_stack(totals[order], pos[order, 0] + 1e-3, pos[order, 1] - 2e-3),
                     filter_size=filter_size).compute()
    np.testing.assert_allclose(again.absorption_map.values, expected[order], rtol=1e-12)
    np.testing.assert_array_equal(again.grid_y.values, roi.grid_y.values[order])
    # No CoM contrast at all (every CoM identical): nothing joins through the CoM.
    assert not roi.in_com.values.any() and np.all(roi.com_magnitude.values == 0)


def test_irregular_positions_use_the_step_as_unit():
    rng = np.random.default_rng(5)
    pos, _ = scan_positions(100, 1e-6)
    moved = pos + rng.uniform(-0.3e-6, 0.3e-6, pos.shape)
    maps = scan_maps(_uniform_stack(rng.uniform(1, 2, 100), moved[:, 0], moved[:, 1])).compute()
    gy, gx = maps.grid_y.values, maps.grid_x.values
    assert not np.all(gy == np.rint(gy))
    # Coordinates in units of the estimated step (≈ 1 µm).
    np.testing.assert_allclose(np.ptp(gx), np.ptp(moved[:, 1]) / 1e-6, rtol=0.2)
    with pytest.raises(ParameterError, match="not on a raster"):
        scan_grid(maps, "total")


def test_empty_frames_are_flagged_and_left_out():
    ds = phantom("strong absorber").copy(deep=True)
    ds["frames"].values[[0, 450, 899]] = 0
    roi = find_roi(lazy(ds)).compute()
    assert roi.empty.values[[0, 450, 899]].all() and roi.empty.values.sum() == 3
    assert not roi.in_roi.values[[0, 450, 899]].any()
    assert np.isnan(roi.com_map.values[[0, 450, 899]]).all()
    assert np.isfinite(roi.com_map.values[~roi.empty.values]).all()


# --------------------------------------------------------------------------- DPC


def test_differential_phase_measures_the_prism_slope_and_the_phantom_phase():
    ds, where = _slab_and_prism_scan()
    dpc = differential_phase(ds).compute()
    x, y = ds.scan_x.values / DX, ds.scan_y.values / DX
    inside = np.hypot(y, x - 12) < 9 - 3  # prism positions a probe width from its rim
    # The prism's ramp is 0.33 rad per object pixel along x and flat along y.
    np.testing.assert_allclose(dpc.phase_gradient_x.values[inside] * DX, 0.33, rtol=0.03)
    assert np.abs(dpc.phase_gradient_y.values[inside] * DX).max() < 0.02
    interior = where["slab interior"]
    assert np.abs(dpc.phase_gradient_x.values[interior] * DX).max() < 0.02
    # Integrated phase of a simulated scan against the phantom's −kδt at the positions.
    scan = phantom("strong absorber")
    phase = differential_phase(lazy(scan)).compute().dpc_phase.values
    truth = object_ground_truth(scan).thickness_m.sel(y_m=scan.scan_y, x_m=scan.scan_x, method="nearest").values
    true_phase = -2 * math.pi / LAM * 1e-5 * truth
    assert np.corrcoef(phase, true_phase)[0, 1] > 0.95
    assert np.std(phase) == pytest.approx(np.std(true_phase), rel=0.15)
    with pytest.raises(ParameterError, match="raster"):
        differential_phase(lazy(phantom("irregular positions"))).compute()
    with pytest.raises(GeometryError, match="geometry"):
        differential_phase(_stack(scan_y=np.zeros(6), scan_x=np.arange(6.0)))


# --------------------------------------------------------------------------- border


def _region(pattern: str, jitter: float = 0.0) -> xr.Dataset:
    """A region on a raster of unit steps, each position moved by up to ``jitter`` steps."""
    rows = [[ch == "#" for ch in line] for line in pattern.split()]
    inside = np.array(rows)
    r, c = np.indices(inside.shape)
    rng = np.random.default_rng(0)
    gy = r.ravel() + rng.uniform(-jitter, jitter, r.size)
    gx = c.ravel() + rng.uniform(-jitter, jitter, r.size)
    return xr.Dataset({"in_roi": ("frame", inside.ravel()), "grid_y": ("frame", gy), "grid_x": ("frame", gx)})


def _pattern(ds: xr.Dataset, shape: tuple[int, int]) -> str:
    return "\n".join("".join("#" if v else "." for v in row) for row in ds.in_roi.values.reshape(shape))


REGION = """
....###
.######
.######
.#####.
.......
.......
"""


@pytest.mark.parametrize("jitter", [0.0, 0.2])
def test_grow_and_shrink_by_whole_steps(jitter):
    region = _region(REGION, jitter)
    # Shrinking by one step keeps the positions with no outside position among their 8
    # neighbours; the scan's own edge (row 0, column 6) is not an outside.
    shrunk = grow_roi(region, -1).compute()
    assert _pattern(shrunk, (6, 7)) == "\n".join([".....##", ".....##", "..###..", ".......", ".......", "......."])
    grown = grow_roi(region, 1).compute()
    assert _pattern(grown, (6, 7)) == "\n".join(["#######"] * 5 + ["......."])
    assert int(grown.n_in_roi) == 35 and float(grown.roi_fraction) == pytest.approx(35 / 42)
    assert grown.attrs["border_steps"] == 1 and grow_roi(grown, -3).attrs["border_steps"] == -2
    point = _region("\n".join(["......."] * 3 + ["...#..."] + ["......."] * 3), jitter)
    square = grow_roi(point, 2).compute()
    assert _pattern(square, (7, 7)) == "\n".join(["......."] + [".#####."] * 5 + ["......."])
    # Closing and opening a square give it back.
    assert _pattern(grow_roi(square, -2).compute(), (7, 7)) == _pattern(point, (7, 7))
    assert _pattern(grow_roi(square, 0).compute(), (7, 7)) == _pattern(square, (7, 7))


def test_grow_roi_of_a_found_region():
    roi = find_roi(lazy(phantom("weak absorber")))
    base = roi.in_roi.values
    grown, shrunk = grow_roi(roi, 2).compute(), grow_roi(roi, -2).compute()
    assert np.all(grown.in_roi.values >= base) and grown.in_roi.values.sum() > base.sum()
    assert np.all(shrunk.in_roi.values <= base) and shrunk.in_roi.values.sum() < base.sum()
    # The maps travel with the region; only the selection and its counts change.
    np.testing.assert_array_equal(grown.com_map.values, roi.com_map.values)


# --------------------------------------------------------------------------- bad input


def _stack(n: int = 6, **per_frame) -> xr.Dataset:
    frames = np.ones((n, 4, 4), np.float32)
    return make_frame_stack(frames, per_frame=per_frame or None)


def test_bad_input_gives_clear_errors():
    with pytest.raises(SchemaError, match="no scan_y or scan_x"):
        find_roi(_stack())
    with pytest.raises(SchemaError, match="no scan_x"):
        scan_maps(_stack(scan_y=np.arange(6.0)))
    with pytest.raises(SchemaError, match="1 frame"):
        find_roi(_stack(1, scan_y=[0.0], scan_x=[0.0]))
    with pytest.raises(SchemaError, match="real number per frame"):
        find_roi(_stack(scan_y=np.array(list("abcdef")), scan_x=np.arange(6.0)))
    good = _stack(scan_y=np.zeros(6), scan_x=np.arange(6.0))
    for kwargs, match in [
        ({"filter_size": 0}, "filter_size"),
        ({"filter_size": 2}, "odd"),
        ({"filter_size": 1.5}, "filter_size"),
        ({"filter_size": True}, "filter_size"),
        ({"n_init": 0}, "n_init"),
        ({"seed": -1}, "seed"),
    ]:
        with pytest.raises(ParameterError, match=match):
            find_roi(good, **kwargs)
    with pytest.raises(SchemaError, match="expected an xarray.Dataset"):
        find_roi(np.ones((3, 4, 4)))  # validate's own message
    with pytest.raises(ParameterError, match="steps"):
        grow_roi(find_roi(good), 1.5)
    with pytest.raises(SchemaError, match="find_roi"):
        grow_roi(good, 1)
    # Found when the scan is computed: positions and counts live with the frames.
    with pytest.raises(SchemaError, match="one scan position"):
        find_roi(_stack(scan_y=np.zeros(6), scan_x=np.zeros(6))).compute()
    with pytest.raises(SchemaError, match="NaN"):
        find_roi(_stack(scan_y=np.zeros(6), scan_x=np.array([0, 1, 2, np.nan, 4, 5]))).compute()
    empty = make_frame_stack(np.zeros((6, 4, 4)), per_frame={"scan_y": np.zeros(6), "scan_x": np.arange(6.0)})
    with pytest.raises(ParameterError, match="every frame is empty"):
        find_roi(empty).compute()
    assert issubclass(ParameterError, DiffdaskError) and issubclass(SchemaError, DiffdaskError)


# --------------------------------------------------------------------------- CLI and figures


def test_cli_roi_writes_the_region_and_figures(cluster, tmp_path):
    store = tmp_path / "scan.zarr"
    ds = phantom("weak absorber")
    save_frames(ds, store, batch_frames=200)
    figure = tmp_path / "roi.png"
    args = ["roi", str(store), "--border", "1", "--figure", str(figure), "--scheduler", cluster.scheduler_address]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "region of interest" in result.output
    saved = open_results(store, "roi").compute()
    with dask.config.set(scheduler="synchronous"):
        expected = grow_roi(find_roi(lazy(ds)), 1).compute()
    np.testing.assert_array_equal(saved.in_roi.values, expected.in_roi.values)
    assert saved.attrs["border_steps"] == 1 and saved.attrs["filter_size"] == 3
    assert figure.stat().st_size > 10_000
    # Other parameters into the same group: refused unless --overwrite.
    again = CliRunner().invoke(main, ["roi", str(store), "--scheduler", cluster.scheduler_address])
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = CliRunner().invoke(main, ["roi", str(store), "--filter-size", "2", "--group", "other"])
    assert bad.exit_code == 2 and "odd" in bad.output


def test_cli_roi_without_positions_fails_clearly(cluster, tmp_path):
    store = tmp_path / "plain.zarr"
    save_frames(make_frame_stack(np.ones((4, 4, 4), np.float32)), store)
    result = CliRunner().invoke(main, ["roi", str(store), "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 2 and "scan_y" in result.output and "Traceback" not in result.output


def test_figures_on_a_raster_and_on_irregular_positions(tmp_path):
    from diffdask.viz import plot_com_quiver, plot_roi

    for name in ("small cells", "irregular positions"):
        roi = find_roi(lazy(phantom(name)))
        path = tmp_path / f"{name}.png"
        plot_roi(roi, path)
        assert path.stat().st_size > 10_000
    ax = plot_com_quiver(scan_maps(lazy(phantom("small cells"))))
    assert len(ax.collections) == 1 and math.isclose(ax.get_xlim()[1], 4.5, rel_tol=0.1)
    matplotlib.pyplot.close("all")


def test_readme_roi_example_runs(tmp_path, monkeypatch):
    import diffdask

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("## Ptychography region of interest")[1].split("```python")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    namespace = {"dd": diffdask, "ds": lazy(phantom("small cells"))}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["kept"].sizes["frame"] == int(namespace["roi"].n_in_roi)
    assert namespace["image"].shape == (30, 30) and (tmp_path / "roi.png").exists()
    matplotlib.pyplot.close("all")
