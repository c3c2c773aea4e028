"""The common-line CC matrix against a slow, obvious pairwise loop with np.corrcoef."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from scipy.interpolate import RectBivariateSpline

import diffdask as dd
from diffdask.commonlines import cc_matrix, line_grid, line_samples

RNG = np.random.default_rng(8)
M, S, A, R = 7, 24, 8, 3
AVERAGES = RNG.random((M, S, S)) + 0.1


def reference_lines(image, n_angles, mask_radius, interp, full_circle=False):
    """Dragonfly's sampling written out: RectBivariateSpline (kx = ky = 1) or rounded indices."""
    size = image.shape[-1]
    inds = np.arange(size) - size // 2
    rads = inds[np.abs(inds) > mask_radius]
    step = (2 * np.pi if full_circle else np.pi) / n_angles
    x = np.array([rads * np.cos(i * step) for i in range(n_angles)]) + size // 2
    y = np.array([rads * np.sin(i * step) for i in range(n_angles)]) + size // 2
    if interp == "nearest":
        return image[np.round(x).astype(int), np.round(y).astype(int)]
    grid = np.arange(size)
    return RectBivariateSpline(grid, grid, image, kx=1, ky=1)(x, y, grid=False)


def reference_cc(averages, n_angles, mask_radius, interp, masks=None, full_circle=False, min_overlap=10):
    """Loop over pairs of averages and pairs of angles, one np.corrcoef each."""
    n = len(averages)
    lines, measured = [], []
    for k, image in enumerate(averages):
        good = np.ones(image.shape, bool) if masks is None else masks[k]
        clean = np.where(good, image, 0.0)
        lines.append(reference_lines(clean / clean.sum(), n_angles, mask_radius, interp, full_circle))
        # A sample is measured when no unmeasured pixel contributes to it.
        spill = reference_lines((~good).astype(float), n_angles, mask_radius, interp, full_circle)
        measured.append(spill < 1e-12)
    cc = np.ones((n, n))
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            best = -np.inf
            for p in range(n_angles):
                for q in range(n_angles):
                    joint = measured[i][p] & measured[j][q]
                    if joint.sum() < min_overlap:
                        continue
                    best = max(best, np.corrcoef(lines[i][p][joint], lines[j][q][joint])[0, 1])
            cc[i, j] = best
    return cc


@pytest.fixture(scope="module", params=["nearest", "bilinear"])
def interp_and_reference(request):
    return request.param, reference_cc(AVERAGES, A, R, request.param)


@pytest.mark.parametrize("screen", [True, False])
@pytest.mark.parametrize("block_size", [1, 2, 3, 7])
def test_cc_matrix_equals_the_pairwise_loop_for_any_block_size(interp_and_reference, block_size, screen):
    interp, ref = interp_and_reference
    cc = cc_matrix(AVERAGES, A, R, interp, block_size=block_size, screen=screen)
    assert cc.dtype == np.float64 and cc.chunks[0][0] == block_size
    got = cc.compute(scheduler="sync")
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    assert np.array_equal(got, got.T) and np.all(np.diag(got) == 1.0)


def test_near_ties_fall_back_to_float64_products(monkeypatch):
    from diffdask.commonlines import ccmatrix

    dense, original = [], ccmatrix._dense_max
    monkeypatch.setattr(ccmatrix, "_dense_max", lambda r, w: dense.append(r.shape) or original(r, w))
    y, x = np.indices((S, S)) - S // 2
    radial = np.stack([np.cos(np.hypot(y, x) * f) + 2 for f in (0.5, 0.7, 0.9)])  # same along every line
    got = cc_matrix(radial, A, R, "bilinear", block_size=2).compute(scheduler="sync")
    np.testing.assert_allclose(got, reference_cc(radial, A, R, "bilinear"), rtol=0, atol=1e-12)
    assert dense  # every angle pair ties: the screen gave way to the dense float64 product


def test_low_rank_screening_keeps_the_exact_maximum():
    from diffdask.commonlines.ccmatrix import _screen_vectors, normalised_lines
    from diffdask.commonlines.lines import as_average_stack, sampling_inputs

    y, x = np.indices((40, 40)) - 20.0
    smooth = []
    for k in range(6):  # anisotropic Gaussians at several angles: smooth, low-rank lines
        t = 0.4 * k
        u, v = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
        smooth.append(np.exp(-(u / (6 + k)) ** 2 - (v / 3) ** 2) + 0.3 * np.exp(-(u**2 + v**2) / 150))
    smooth = np.stack(smooth)
    grid = line_grid(40, 12, 3)
    _, kwargs = sampling_inputs(as_average_stack(smooth), grid, "bilinear")
    lines = normalised_lines(smooth, dtype=np.float64, **kwargs)["lines"][:, 0, 0].reshape(-1, grid.shape[-1])
    rank = _screen_vectors(lines, lines, 12)[-1]
    assert rank <= grid.shape[-1] // 2  # the low-rank path is the one taken
    for block_size in (2, 6):
        got = cc_matrix(smooth, 12, 3, "bilinear", block_size=block_size).compute(scheduler="sync")
        np.testing.assert_allclose(got, reference_cc(smooth, 12, 3, "bilinear"), rtol=0, atol=1e-12)


def test_line_samples_follow_dragonflys_convention():
    for interp in ("nearest", "bilinear"):
        got = line_samples(AVERAGES, A, R, interp, block_size=3).compute()
        ref = np.stack([reference_lines(a / a.sum(), A, R, interp) for a in AVERAGES])
        assert got.shape == (M, A, S - 2 * R - 1)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-15)
    # Odd sizes too: radii run over [-S//2, S - S//2).
    odd = RNG.random((2, 25, 25))
    np.testing.assert_array_equal(
        line_samples(odd, 5, 4).compute(), np.stack([reference_lines(a / a.sum(), 5, 4, "nearest") for a in odd])
    )


def test_masked_pearson_equals_the_loop_over_jointly_measured_samples():
    masks = np.ones((M, S, S), bool)
    masks[:, 10:13, :] = False  # a detector gap
    masks[2, :, 15:17] = False  # a gap in one average only
    data = AVERAGES.copy()
    data[~masks] = np.nan  # unmeasured pixels may hold anything
    for interp in ("nearest", "bilinear"):
        ref = reference_cc(data, A, R, interp, masks=masks, min_overlap=6)
        for block_size in (2, 7):
            got = cc_matrix(data, A, R, interp, mask=masks, min_overlap=6, block_size=block_size).compute()
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    sampled = line_samples(data, A, R, "bilinear", mask=masks).compute()
    spill = np.stack([reference_lines((~m).astype(float), A, R, "bilinear") for m in masks])
    np.testing.assert_array_equal(np.isnan(sampled), spill >= 1e-12)  # NaN = not measured
    gap = np.where(masks[0], AVERAGES[:4], np.nan)
    shared = cc_matrix(gap, A, R, mask=masks[0], min_overlap=6, block_size=3).compute()
    ref = reference_cc(gap, A, R, "nearest", masks=np.broadcast_to(masks[0], gap.shape), min_overlap=6)
    np.testing.assert_allclose(shared, ref, rtol=0, atol=1e-12)


def test_full_circle_searches_lines_and_their_reverses():
    ref = reference_cc(AVERAGES[:4], 6, R, "bilinear", full_circle=True)
    got = cc_matrix(AVERAGES[:4], 6, R, "bilinear", full_circle=True, block_size=3).compute()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    # A reversed copy (rotated by π) matches only with the full circle.
    half = RNG.random((S, S))
    pair = np.stack([half, np.roll(half[::-1, ::-1], (1, 1), axis=(0, 1))])
    assert cc_matrix(pair, 8, R, full_circle=True).compute()[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert cc_matrix(pair, 8, R).compute()[0, 1] < 0.9


def test_argmax_angles_point_at_the_maximum_and_mirror():
    cc, angles = cc_matrix(AVERAGES, A, R, block_size=3, return_angles=True)
    cc, angles = dask.compute(cc, angles)
    lines = np.stack([reference_lines(a / a.sum(), A, R, "nearest") for a in AVERAGES])
    step = np.pi / A
    for i in range(M):
        for j in range(M):
            if i != j:
                p, q = np.rint(angles[i, j, :2] / step).astype(int)
                assert np.corrcoef(lines[i, p], lines[j, q])[0, 1] == pytest.approx(cc[i, j], abs=1e-12)
    np.testing.assert_array_equal(angles[..., :2], angles.swapaxes(0, 1)[..., ::-1][..., 1:])
    assert np.all(angles[..., 2] == 0)


def test_common_arcs_reduce_to_straight_lines_at_zero_tilt():
    geometry = dd.Geometry((S, S), pixel_size_m=75e-6, distance_m=0.05, wavelength_m=1e-10)
    straight = line_grid(S, A, R)
    flat = line_grid(S, A, R, tilts_deg=[0.0], geometry=geometry)
    np.testing.assert_array_equal(flat.rows, straight.rows)
    np.testing.assert_array_equal(flat.cols, straight.cols)
    np.testing.assert_array_equal(
        cc_matrix(AVERAGES, A, R, tilts_deg=[0.0], geometry=geometry, block_size=3).compute(),
        cc_matrix(AVERAGES, A, R, block_size=3).compute(),
    )
    bent = line_grid(S, A, R, tilts_deg=[10.0], geometry=geometry)
    assert bent.shape == (2, A, S - 2 * R - 1) and np.allclose(bent.tilts_rad, np.deg2rad([-10, 10]))
    # The arcs of +β and −β bend to opposite sides of the straight line (θ = 0 runs along rows).
    offset = bent.cols[:, 0] - S // 2
    assert np.abs(offset).max() > 1e-3 and np.allclose(offset[0], -offset[1])


def test_common_arcs_find_the_tilt_of_two_ewald_slices():
    """Two Ewald-sphere slices of one 3-D intensity, tilted by 12° about the x axis."""
    geometry = dd.Geometry((41, 41), pixel_size_m=1e-3, distance_m=0.04, wavelength_m=1e-10)
    s = geometry.scattering_vectors_inv_nm  # (3, y, x), nm⁻¹
    reach = np.abs(s[:2]).max()
    blobs = RNG.normal(size=(8, 3)) * 0.5 * reach

    def intensity(q):
        return sum(np.exp(-np.sum((q - c[:, None, None]) ** 2, axis=0) / (0.3 * reach) ** 2) for c in blobs)

    beta = np.deg2rad(12.0)
    rot = np.array([[1, 0, 0], [0, np.cos(beta), -np.sin(beta)], [0, np.sin(beta), np.cos(beta)]])
    views = np.stack([intensity(s), intensity(np.einsum("ab,byx->ayx", rot, s))])
    straight = cc_matrix(views, 90, 2, "bilinear").compute()[0, 1]
    arcs, angles = cc_matrix(
        views, 90, 2, "bilinear", tilts_deg=[4, 8, 12, 16], geometry=geometry, return_angles=True
    )
    arcs, angles = dask.compute(arcs, angles)
    assert 1 - arcs[0, 1] < (1 - straight) / 10
    assert abs(abs(np.rad2deg(angles[0, 1, 2])) - 12) < 1e-9


def test_result_on_a_cluster_equals_the_in_memory_one(client):
    lazy = cc_matrix(da.from_array(AVERAGES, chunks=3), A, R, "bilinear", block_size=2)
    on_cluster = client.compute(lazy).result()
    np.testing.assert_array_equal(on_cluster, lazy.compute(scheduler="sync"))


def test_frame_stack_input_uses_its_mask():
    masks = np.ones((S, S), bool)
    masks[:, :2] = False
    ds = dd.make_frame_stack(AVERAGES, mask=masks, chunks=4)
    np.testing.assert_array_equal(
        cc_matrix(ds, A, R, block_size=3).compute(), cc_matrix(AVERAGES, A, R, mask=masks, block_size=3).compute()
    )


def test_float32_is_close_to_float64():
    lo = cc_matrix(AVERAGES, A, R, dtype="float32").compute()
    assert lo.dtype == np.float32
    np.testing.assert_allclose(lo, cc_matrix(AVERAGES, A, R).compute(), atol=1e-5)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((np.ones((3, 24, 20)),), {}, "square"),
        ((np.ones((24, 24)),), {}, "3-D"),
        ((AVERAGES,), {"mask_radius": 12}, "mask_radius"),
        ((AVERAGES,), {"mask_radius": 11}, "mask_radius"),
        ((AVERAGES,), {"n_angles": 1}, "n_angles"),
        ((AVERAGES,), {"n_angles": 2.5}, "n_angles"),
        ((AVERAGES,), {"interp": "cubic", "mask_radius": R}, "interp"),
        ((AVERAGES,), {"tilts_deg": [5], "mask_radius": R}, "geometry"),
        ((AVERAGES,), {"mask": np.ones((5, 5), bool)}, "mask"),
        ((AVERAGES,), {"dtype": "int32"}, "dtype"),
        ((AVERAGES,), {"min_overlap": 1, "mask_radius": R}, "min_overlap"),
    ],
)
def test_bad_input_is_a_clear_error(args, kwargs, match):
    with pytest.raises(dd.DiffdaskError, match=match):
        cc_matrix(*args, **kwargs)


def test_nan_pixels_are_an_error_unless_masked():
    data = AVERAGES.copy()
    data[1, 5, 5] = np.nan
    with pytest.raises(dd.ParameterError, match=r"NaN or inf \(averages 1\).*mask="):
        cc_matrix(data, A, R)
    with pytest.raises(dd.ParameterError, match="NaN or inf"):
        cc_matrix(da.from_array(data, chunks=2), A, R).compute(scheduler="sync")
    cc = cc_matrix(data, A, R, mask=np.isfinite(data)).compute()
    assert np.isfinite(cc).all()
