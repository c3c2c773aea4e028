"""Per-frame reductions against slow, obvious references (explicit loops over pixels)."""

from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

import diffdask as dd
from diffdask.errors import (
    DiffdaskError,
    GeometryError,
    NonFinitePixelsWarning,
    ParameterError,
    SchemaError,
)
from diffdask.reduce.kernel import build_plan, reduce_block

# The NaN/inf pixels planted below are announced at the door; that warning is tested once.
pytestmark = pytest.mark.filterwarnings("ignore::diffdask.errors.NonFinitePixelsWarning")

SHAPE = (23, 31)


def random_stack(seed: int, n: int = 9, dtype=np.float32, geometry=None, chunks: int = 4, bad_pixels=True):
    """Random masked frames with NaN/inf pixels and negative values, plus a random centre."""
    rng = np.random.default_rng(seed)
    frames = rng.gamma(2.0, 3.0, size=(n,) + SHAPE) - 1.0  # some pixels negative
    if np.dtype(dtype).kind in "ui":
        frames = rng.poisson(4.0, size=(n,) + SHAPE)
    frames = frames.astype(dtype)
    if bad_pixels and np.dtype(dtype).kind == "f":
        frames[1, 3, 4] = np.nan
        frames[2, 7, 9] = np.inf
        frames[2, 0, 0] = -np.inf
        frames[5, 11, 20] = np.nan
    mask = rng.random(SHAPE) > 0.15
    mask[:, 0] = False  # a dead column
    center = (rng.uniform(0, SHAPE[0] - 1), rng.uniform(0, SHAPE[1] - 1))
    ds = dd.make_frame_stack(frames, mask=mask, geometry=geometry, chunks=chunks)
    return ds, frames, mask, center


def good_pixels(frame, mask):
    """(i, j, value) of each good, finite pixel — the reference's notion of a usable pixel."""
    for i in range(frame.shape[0]):
        for j in range(frame.shape[1]):
            v = float(frame[i, j])
            if mask[i, j] and math.isfinite(v):
                yield i, j, v


def ref_com(frame, mask):
    total = sy = sx = 0.0
    for i, j, v in good_pixels(frame, mask):
        total += v
        sy += i * v
        sx += j * v
    if total == 0:
        return math.nan, math.nan, 0.0
    return sy / total, sx / total, total


def ref_bin(r, width):
    k = 0
    while (k + 1) * width <= r:
        k += 1
    return k


def ref_radial(frame, mask, center, width, n_bins):
    sums, counts = [0.0] * n_bins, [0] * n_bins
    for i, j, v in good_pixels(frame, mask):
        k = ref_bin(math.hypot(i - center[0], j - center[1]), width)
        if k < n_bins:
            sums[k] += v
            counts[k] += 1
    return np.array([s / c if c else math.nan for s, c in zip(sums, counts)])


def ref_n_bins(mask, center, width):
    return 1 + max(
        ref_bin(math.hypot(i - center[0], j - center[1]), width)
        for i in range(mask.shape[0])
        for j in range(mask.shape[1])
        if mask[i, j]
    )


def ref_lit(frame, mask, threshold):
    return sum(1 for _, _, v in good_pixels(frame, mask) if math.isfinite(v) and v > threshold)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_center_of_mass_matches_loop_reference(dtype):
    ds, frames, mask, _ = random_stack(1, dtype=dtype)
    res = dd.center_of_mass(ds).compute()
    for f in range(frames.shape[0]):
        cy, cx, total = ref_com(frames[f], mask)
        np.testing.assert_allclose(res.total.values[f], total, rtol=2e-6)
        np.testing.assert_allclose(res.com_y.values[f], cy, rtol=0, atol=2e-5 * SHAPE[0])
        np.testing.assert_allclose(res.com_x.values[f], cx, rtol=0, atol=2e-5 * SHAPE[1])
    assert np.isfinite(res.com_y.values).all() and np.isfinite(res.total.values).all()


@pytest.mark.parametrize(
    ("seed", "width", "n_bins"), [(2, 1.0, None), (3, 0.7, None), (4, 2.5, None), (5, 1.3, 6), (6, 0.5, 40)]
)
def test_radial_profile_matches_loop_reference(seed, width, n_bins):
    ds, frames, mask, center = random_stack(seed)
    prof = dd.radial_profile(ds, bin_width_px=width, n_bins=n_bins, center=center)
    expected_bins = n_bins if n_bins is not None else ref_n_bins(mask, center, width)
    assert prof.dims == ("frame", "radius")
    assert prof.shape == (frames.shape[0], expected_bins)
    np.testing.assert_allclose(prof["radius_px"].values, (np.arange(expected_bins) + 0.5) * width)
    values = prof.values
    for f in range(frames.shape[0]):
        ref = ref_radial(frames[f], mask, center, width, expected_bins)
        np.testing.assert_array_equal(np.isnan(values[f]), np.isnan(ref))
        np.testing.assert_allclose(values[f], ref, rtol=2e-6, atol=1e-5)
    assert "q_inv_nm" not in prof.coords  # no geometry, no q


def test_radial_profile_q_axis_and_default_centre_from_geometry():
    wavelength, distance, pixel = 0.729e-9, 0.13, 75e-6
    geom = dd.Geometry(
        SHAPE, pixel_size_m=pixel, distance_m=distance, wavelength_m=wavelength, beam_center_yx=(9.3, 17.8)
    )
    ds, frames, mask, _ = random_stack(7, geometry=geom)
    prof = dd.radial_profile(ds, bin_width_px=1.5)
    r = (np.arange(prof.sizes["radius"]) + 0.5) * 1.5
    two_theta = np.arctan(r * pixel / distance)
    q = 4 * np.pi * np.sin(two_theta / 2) / (wavelength * 1e9)
    np.testing.assert_allclose(prof["q_inv_nm"].values, q, rtol=1e-12)
    for f in (0, 2):
        ref = ref_radial(frames[f], mask, (9.3, 17.8), 1.5, prof.sizes["radius"])
        np.testing.assert_allclose(prof.values[f], ref, rtol=2e-6, atol=1e-5)


def test_lit_pixels_and_hits_match_reference():
    ds, frames, mask, _ = random_stack(8, n=12)
    threshold = 6.1  # not a float32 number: the comparison must still be exact
    lit = dd.lit_pixels(ds, threshold).values
    expected = np.array([ref_lit(frames[f], mask, threshold) for f in range(frames.shape[0])])
    np.testing.assert_array_equal(lit, expected)
    min_lit = int(np.median(expected))
    np.testing.assert_array_equal(dd.find_hits(ds, threshold, min_lit).values, expected >= min_lit)


def test_lit_threshold_is_exact_at_float32_values():
    frames = np.full((2, 4, 4), np.float32(0.1))
    frames[1, 0, 0] = np.float32(0.3)
    ds = dd.make_frame_stack(frames)
    # float32(0.1) = 0.10000000149 > 0.1, so every pixel is above 0.1 ...
    np.testing.assert_array_equal(dd.lit_pixels(ds, 0.1).values, [16, 16])
    # ... and none is above its own float32 value.
    np.testing.assert_array_equal(dd.lit_pixels(ds, float(np.float32(0.1))).values, [0, 1])


def test_summarize_equals_the_separate_reductions_and_the_reference():
    geom = dd.Geometry(SHAPE, pixel_size_m=75e-6, distance_m=0.13, wavelength_m=0.729e-9)
    ds, frames, mask, center = random_stack(9, n=10, geometry=geom)
    s = dd.summarize(ds, threshold=5.0, min_lit=300, bin_width_px=0.8, center=center).compute()
    com = dd.center_of_mass(ds).compute()
    prof = dd.radial_profile(ds, bin_width_px=0.8, center=center).compute()
    for name in ("com_y", "com_x", "total", "n_nonfinite"):
        # One kernel, the same sums in the same order, with or without the bins.
        np.testing.assert_array_equal(s[name].values, com[name].values)
    np.testing.assert_array_equal(s.radial_profile.values, prof.values)
    np.testing.assert_array_equal(s.lit_pixels.values, dd.lit_pixels(ds, 5.0).values)
    np.testing.assert_array_equal(s.is_hit.values, s.lit_pixels.values >= 300)
    assert s.attrs["threshold"] == 5.0 and s.attrs["min_lit"] == 300
    for f in range(frames.shape[0]):
        np.testing.assert_allclose(s.com_y.values[f], ref_com(frames[f], mask)[0], atol=1e-3)
        assert s.lit_pixels.values[f] == ref_lit(frames[f], mask, 5.0)
    assert all(s[v].dims[0] == "frame" for v in s.data_vars)


def test_summarize_reads_each_chunk_once():
    ds, frames, mask, _ = random_stack(10, n=12, chunks=5)
    calls = []

    def counted(block):
        calls.append(block.shape[0])
        return block

    read = ds.frames.data.map_blocks(counted, meta=np.empty((0, 0, 0), ds.frames.dtype))
    counted_ds = ds.assign(frames=(ds.frames.dims, read))
    s = dd.summarize(counted_ds, threshold=3.0, min_lit=10)
    dask.compute(*[s[v].data for v in s.data_vars], scheduler="threads")
    assert sorted(calls) == [2, 5, 5]


def test_results_do_not_depend_on_chunking():
    ds, frames, mask, center = random_stack(11, n=23, chunks=23)
    ref = dd.summarize(ds, threshold=4.0, center=center).compute()
    for chunks in (1, 5, 8):
        other = dd.make_frame_stack(frames, mask=mask, chunks=chunks)
        got = dd.summarize(other, threshold=4.0, center=center).compute()
        for name in ("com_y", "com_x", "total", "radial_profile", "lit_pixels"):
            np.testing.assert_array_equal(got[name].values, ref[name].values, err_msg=f"{name}, chunks={chunks}")
        np.testing.assert_allclose(dd.mean_profile(other).values, dd.mean_profile(ds).values, rtol=1e-12)


def test_mean_profile_is_the_pooled_mean_of_good_pixels():
    ds, frames, mask, center = random_stack(12, n=7)
    got = dd.mean_profile(ds, bin_width_px=1.7, center=center)
    n_bins = got.sizes["radius"]
    sums, counts = np.zeros(n_bins), np.zeros(n_bins)
    for f in range(frames.shape[0]):
        for i, j, v in good_pixels(frames[f], mask):
            k = ref_bin(math.hypot(i - center[0], j - center[1]), 1.7)
            sums[k] += v
            counts[k] += 1
    np.testing.assert_allclose(got.values, sums / counts, rtol=1e-10)
    assert got.dims == ("radius",)


def test_nonfinite_pixels_are_masked_in_their_frame_only():
    with pytest.warns(NonFinitePixelsWarning, match="treats them as masked"):
        ds, frames, mask, center = random_stack(13, bad_pixels=True)
    s = dd.summarize(ds, threshold=2.0, center=center).compute()
    for name in ("com_y", "com_x", "total", "lit_pixels"):
        assert np.isfinite(s[name].values).all(), name
    # The frame with inf pixels equals that frame with those pixels masked.
    clean_mask = mask & np.isfinite(frames[2])
    single = dd.make_frame_stack(np.nan_to_num(frames[2:3], posinf=0, neginf=0), mask=clean_mask)
    one = dd.summarize(single, threshold=2.0, center=center, n_bins=s.sizes["radius"]).compute()
    # Skipping a pixel inline and masking it sum the same values in the same order.
    for name in ("total", "com_y", "com_x", "radial_profile"):
        np.testing.assert_array_equal(s[name].values[2], one[name].values[0], err_msg=name)
    assert s.n_nonfinite.values[2] == (mask & ~np.isfinite(frames[2])).sum() > 0
    assert s.lit_pixels.values[2] == one.lit_pixels.values[0]


def test_empty_and_zero_total_frames_give_nan_com():
    frames = np.zeros((3, 8, 9), np.float32)
    frames[1, 2, 3] = 5.0
    frames[2, 1, 1], frames[2, 6, 7] = 2.0, -2.0  # total 0 but not empty
    res = dd.center_of_mass(dd.make_frame_stack(frames)).compute()
    np.testing.assert_array_equal(res.total.values, [0.0, 5.0, 0.0])
    assert np.isnan(res.com_y.values[[0, 2]]).all() and np.isnan(res.com_x.values[[0, 2]]).all()
    assert (res.com_y.values[1], res.com_x.values[1]) == (2.0, 3.0)


def test_bins_without_good_pixels_are_nan():
    frames = np.ones((2, 9, 9), np.float32)
    mask = np.ones((9, 9), bool)
    mask[4, 4] = False  # the centre pixel is the only one in bin 0
    prof = dd.radial_profile(dd.make_frame_stack(frames, mask=mask), center=(4, 4)).values
    assert np.isnan(prof[:, 0]).all()
    np.testing.assert_array_equal(prof[:, 1:], 1.0)


@pytest.mark.parametrize("center", [(-3.0, 5.0), (5.0, 40.0), (23.0, 0.0), (np.nan, 3.0), (1.0,), "middle"])
def test_centre_outside_detector_or_malformed_is_a_geometry_error(center):
    ds, *_ = random_stack(14)
    with pytest.raises(GeometryError, match="centre|center"):
        dd.radial_profile(ds, center=center)


@pytest.mark.parametrize("width", [0, -1.0, math.nan, math.inf, "wide"])
def test_bad_bin_width_is_a_parameter_error(width):
    ds, *_ = random_stack(15)
    with pytest.raises(ParameterError, match="bin_width_px"):
        dd.radial_profile(ds, bin_width_px=width)


def test_bad_parameters_are_clear_errors():
    ds, *_ = random_stack(16)
    with pytest.raises(ParameterError, match="n_bins"):
        dd.radial_profile(ds, n_bins=0)
    with pytest.raises(ParameterError, match="threshold"):
        dd.lit_pixels(ds, math.nan)
    with pytest.raises(ParameterError, match="min_lit"):
        dd.find_hits(ds, 1.0, -2)
    with pytest.raises(ParameterError, match="threshold"):
        dd.summarize(ds, min_lit=3)


def test_all_pixels_masked_is_a_schema_error():
    frames = np.ones((2, 5, 6), np.float32)
    ds = dd.make_frame_stack(frames, mask=np.zeros((5, 6), bool))
    for reduction in (dd.center_of_mass, dd.radial_profile, dd.summarize, dd.mean_profile):
        with pytest.raises(SchemaError, match="every pixel"):
            reduction(ds)


def test_wrong_dimension_input_is_a_schema_error():
    flat = xr.Dataset({"frames": (("y", "x"), np.ones((5, 6), np.float32))})
    with pytest.raises(SchemaError, match="3-D"):
        dd.center_of_mass(flat)
    with pytest.raises(SchemaError, match="Dataset"):
        dd.radial_profile(np.ones((2, 5, 6)))
    with pytest.raises(SchemaError, match="3-D"):
        dd.make_frame_stack(np.ones((5, 6)))
    plan = build_plan(np.ones((5, 6), bool))
    with pytest.raises(SchemaError, match=r"\(n, ny, nx\)"):
        reduce_block(np.ones((5, 6), np.float32), plan)
    assert issubclass(SchemaError, DiffdaskError)


def test_results_are_lazy_and_carry_provenance():
    ds, *_ = random_stack(17)
    s = dd.summarize(ds, threshold=1.0)
    assert all(isinstance(s[v].data, da.Array) for v in s.data_vars)
    assert s.attrs["diffdask_function"] == "diffdask.summarize"
    assert "diffdask_version" in s.attrs


def test_full_size_frames_are_bit_identical_for_any_chunking():
    # 96×128 frames, chunks that split the kernel's groups of 8 frames every which way.
    rng = np.random.default_rng(18)
    frames = rng.gamma(2.0, 3.0, size=(100, 96, 128)).astype(np.float32)
    mask = rng.random((96, 128)) > 0.1
    frames[5, 3, 3] = np.nan
    frames[20:80, ~mask] = np.nan  # detectors that store NaN in their gaps
    ref = dd.summarize(dd.make_frame_stack(frames, mask=mask, chunks=100), threshold=5.0).compute()
    for chunks in (1, 7, 48, 61):
        got = dd.summarize(dd.make_frame_stack(frames, mask=mask, chunks=chunks), threshold=5.0).compute()
        for name in ("com_y", "com_x", "total", "radial_profile", "lit_pixels"):
            np.testing.assert_array_equal(got[name].values, ref[name].values, err_msg=f"{name}, chunks={chunks}")
