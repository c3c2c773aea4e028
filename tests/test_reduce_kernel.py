"""The compiled reduction kernel: the same bits for any chunking, thread count, BLAS kernel or
CPU; every input dtype; azimuthal integration against slow loops; the GPU twin in numba's
CUDA simulator; one task per chunk from a Zarr store."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import dask
import numpy as np
import pytest

import diffdask as dd
from diffdask.errors import BackendError, GeometryError, ParameterError, SchemaError
from diffdask.reduce.kernel import build_plan, radial_bins, reduce_block

pytestmark = pytest.mark.filterwarnings("ignore::diffdask.errors.NonFinitePixelsWarning")

SHAPE = (96, 128)
GEOM = dd.Geometry(SHAPE, pixel_size_m=75e-6, distance_m=0.12, wavelength_m=0.2e-9, beam_center_yx=(41.3, 70.8))


def detector_frames(n: int = 100, seed: int = 18) -> tuple[np.ndarray, np.ndarray]:
    """Dense float32 frames with NaN in the gaps and a few NaN/inf pixels, and the mask."""
    rng = np.random.default_rng(seed)
    frames = rng.gamma(2.0, 3.0, size=(n,) + SHAPE).astype(np.float32) - 1.0
    mask = rng.random(SHAPE) > 0.1
    mask[40:44] = False
    frames[5 % n, 3, 3] = np.nan
    frames[9 % n, 50, 60] = np.inf
    frames[20 % n : 80, ~mask] = np.nan  # detectors that store NaN in their gaps
    frames[30 % n] = 0.0  # an empty frame
    return frames, mask


def everything(ds) -> dict[str, np.ndarray]:
    """Every per-frame result of the kernel, computed."""
    s = dd.summarize(ds, threshold=5.0, bin_width_px=1.5)
    i1 = dd.integrate1d(ds, 60, error_model="poisson")
    i2 = dd.integrate2d(ds, 20, 12, unit="2th_deg")
    got = dask.compute(dict(s.data_vars), dict(i1.data_vars), dict(i2.data_vars))
    out = {}
    for prefix, part in zip(("summarize", "integrate1d", "integrate2d"), got):
        out.update({f"{prefix}.{k}": np.asarray(v) for k, v in part.items()})
    return out


@pytest.fixture(scope="module")
def reference():
    frames, mask = detector_frames()
    ds = dd.make_frame_stack(frames, mask=mask, geometry=GEOM, chunks=100)
    with dask.config.set(scheduler="sync"):
        return frames, mask, everything(ds)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunks", [1, 7, 48, 100])
def test_bit_identical_for_any_chunking_and_thread_count(reference, chunks, threads):
    frames, mask, ref = reference
    ds = dd.make_frame_stack(frames, mask=mask, geometry=GEOM, chunks=chunks)
    with dask.config.set(scheduler="threads", num_workers=threads):
        got = everything(ds)
    assert got.keys() == ref.keys()
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=f"{name}, chunks={chunks}, threads={threads}")


def test_a_frames_results_do_not_depend_on_its_neighbours(reference):
    # Each frame is its own lane of the kernel: reduced alone it gives the same bits.
    frames, mask, ref = reference
    for f in (0, 5, 9, 30, 99):
        one = dd.make_frame_stack(frames[f : f + 1], mask=mask, geometry=GEOM)
        s = dd.summarize(one, threshold=5.0, bin_width_px=1.5, n_bins=ref["summarize.radial_profile"].shape[1])
        s = s.compute(scheduler="sync")
        for name in ("com_y", "com_x", "total", "lit_pixels", "radial_profile", "n_nonfinite"):
            np.testing.assert_array_equal(s[name].values[0], ref[f"summarize.{name}"][f], err_msg=f"{name}, frame {f}")


SUBPROCESS = textwrap.dedent(
    """
    import hashlib, json, sys
    import dask, numpy as np
    import diffdask as dd
    sys.path.insert(0, {tests!r})
    from test_reduce_kernel import GEOM, detector_frames, everything
    frames, mask = detector_frames(40)
    ds = dd.make_frame_stack(frames, mask=mask, geometry=GEOM, chunks=9)
    with dask.config.set(scheduler="threads", num_workers=2):
        out = everything(ds)
    print(json.dumps({{k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in out.items()}}))
    """
)


def test_same_bits_under_every_openblas_kernel(tmp_path):
    """Subprocesses with OpenBLAS forced to other CPU kernels give the same bytes."""
    script = tmp_path / "run.py"
    script.write_text(SUBPROCESS.format(tests=os.path.dirname(__file__)))
    results = {}
    for coretype in (None, "Prescott", "Haswell", "SkylakeX"):
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
        env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba")
        if coretype:
            env["OPENBLAS_CORETYPE"] = coretype
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        results[coretype] = json.loads(run.stdout.strip().splitlines()[-1])
    first = results[None]
    assert len(first) > 10
    for coretype, hashes in results.items():
        assert hashes == first, f"OPENBLAS_CORETYPE={coretype} changed {[k for k in first if hashes[k] != first[k]]}"


# ---------------------------------------------------------------------------- input dtypes
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "int32", "float32", "float64"])
def test_every_detector_dtype_is_read_as_it_comes(dtype):
    rng = np.random.default_rng(3)
    counts = rng.poisson(5.0, size=(11, 20, 26))
    mask = rng.random((20, 26)) > 0.2
    ds = dd.make_frame_stack(counts.astype(dtype), mask=mask, chunks=4)
    exact = dd.make_frame_stack(counts.astype(np.float64), mask=mask, chunks=4)
    got = dd.summarize(ds, threshold=6).compute()
    ref = dd.summarize(exact, threshold=6).compute()
    for name in ref.data_vars:  # integers convert to float64 exactly: the same bits
        np.testing.assert_array_equal(got[name].values, ref[name].values, err_msg=name)
    for f in range(counts.shape[0]):
        assert got.total.values[f] == counts[f][mask].sum()
        assert got.lit_pixels.values[f] == (counts[f][mask] > 6).sum()


@pytest.mark.parametrize("dtype", [np.complex64, object, bool, np.float16])
def test_frames_the_kernel_cannot_read_are_a_clear_error(dtype):
    with pytest.raises(SchemaError, match="dtype|integer or floating"):
        frames = np.ones((2, 5, 6), dtype=dtype)
        dd.summarize(dd.make_frame_stack(frames)).compute()


def test_kernel_rejects_a_block_of_the_wrong_shape():
    plan = build_plan(np.ones((5, 6), bool))
    with pytest.raises(SchemaError, match=r"\(n, ny, nx\)"):
        reduce_block(np.ones((2, 6, 5), np.float32), plan)
    with pytest.raises(ParameterError, match="no bins"):
        reduce_block(np.ones((2, 5, 6), np.float32), plan, bins=True)


def test_mask_that_does_not_fit_the_detector_is_a_schema_error():
    frames = np.ones((2, 5, 6), np.float32)
    with pytest.raises(SchemaError, match="mask"):
        dd.make_frame_stack(frames, mask=np.ones((6, 5), bool))


# ---------------------------------------------------------------------------- integration
def slow_geometry(i: int, j: int) -> tuple[float, float, float]:
    """(q nm⁻¹, 2θ degrees, χ degrees) of pixel (i, j) from the geometry's definitions."""
    cy, cx = GEOM.beam_center_yx
    r_m = math.hypot((i - cy) * 75e-6, (j - cx) * 75e-6)
    two_theta = math.atan2(r_m, 0.12)
    q = 4 * math.pi * math.sin(two_theta / 2) / 0.2
    return q, math.degrees(two_theta), math.degrees(math.atan2(i - cy, j - cx))


def slow_bins(frame, mask, key, edges):
    """Pixel lists per bin, then mean, count, Poisson sem and std — explicit loops."""
    n = len(edges) - 1
    members = [[] for _ in range(n)]
    for i in range(frame.shape[0]):
        for j in range(frame.shape[1]):
            v = float(frame[i, j])
            if not (mask[i, j] and math.isfinite(v)):
                continue
            k = key(i, j)
            if k is not None:
                members[k].append(v)
    mean, count, sem, std = (np.full(n, np.nan) for _ in range(4))
    for k, vals in enumerate(members):
        count[k] = len(vals)
        if vals:
            var = sum(max(1.0, v) for v in vals)
            mean[k] = sum(vals) / len(vals)
            sem[k] = math.sqrt(var) / len(vals)
            std[k] = math.sqrt(var / len(vals))
    return mean, count, sem, std


def _find(edges: np.ndarray, value: float) -> int | None:
    for k in range(len(edges) - 1):
        if edges[k] <= value < edges[k + 1]:
            return k
    return None


@pytest.mark.parametrize("unit, column", [("q_nm^-1", 0), ("2th_deg", 1)])
def test_integrate1d_matches_a_pixel_loop_with_poisson_errors(unit, column):
    frames, mask = detector_frames(4, seed=5)
    ds = dd.make_frame_stack(frames, mask=mask, geometry=GEOM, chunks=3)
    lo, hi = (1.0, 9.0) if unit == "q_nm^-1" else (1.0, 8.0)
    res = dd.integrate1d(ds, 25, unit=unit, radial_range=(lo, hi), error_model="poisson").compute()
    edges = np.linspace(lo, hi, 26)
    coord = "q_inv_nm" if unit == "q_nm^-1" else "two_theta_deg"
    np.testing.assert_allclose(res[coord].values, (edges[:-1] + edges[1:]) / 2, rtol=1e-12)
    for f in range(frames.shape[0]):
        ref = slow_bins(frames[f], mask, lambda i, j: _find(edges, slow_geometry(i, j)[column]), edges)
        np.testing.assert_array_equal(res["count"].values[f], ref[1])
        for name, r in zip(("intensity", "sigma", "std"), (ref[0], ref[2], ref[3])):
            np.testing.assert_allclose(res[name].values[f], r, rtol=1e-12, err_msg=name)
    assert res.intensity.dims == ("frame", "radial") and res.attrs["error_model"] == "poisson"


def test_integrate2d_cake_matches_a_pixel_loop_and_sums_to_the_1d_profile():
    frames, mask = detector_frames(3, seed=6)
    ds = dd.make_frame_stack(frames, mask=mask, geometry=GEOM, chunks=2)
    qr, chi = (0.5, 10.0), (-90.0, 90.0)
    cake = dd.integrate2d(ds, 16, 9, radial_range=qr, azimuth_range=chi).compute()
    qe, ce = np.linspace(*qr, 17), np.linspace(*chi, 10)

    def key(i, j):
        q, _, c = slow_geometry(i, j)
        kq, kc = _find(qe, q), _find(ce, c)
        return None if kq is None or kc is None else kc * 16 + kq

    assert cake.intensity.shape == (3, 9, 16)
    for f in range(3):
        mean, count, _, _ = slow_bins(frames[f], mask, key, np.arange(9 * 16 + 1))
        np.testing.assert_array_equal(cake["count"].values[f].ravel(), count)
        np.testing.assert_allclose(cake.intensity.values[f].ravel(), mean, rtol=1e-12)
    # Weighted by counts, the cake's χ bins add up to the 1-D profile over the same χ span.
    one = dd.integrate1d(ds, 16, radial_range=qr, azimuth_range=chi).compute()
    c = cake["count"].values
    with np.errstate(invalid="ignore"):  # radial bins with no pixel in any χ bin are NaN in both
        pooled = np.nansum(cake.intensity.values * c, axis=1) / c.sum(axis=1)
    np.testing.assert_allclose(pooled, one.intensity.values, rtol=1e-12)
    np.testing.assert_array_equal(c.sum(axis=1), one["count"].values)


def test_integrate_bad_input_is_a_clear_error():
    frames, mask = detector_frames(2)
    ds = dd.make_frame_stack(frames, mask=mask, geometry=GEOM)
    bare = dd.make_frame_stack(frames, mask=mask)
    with pytest.raises(ParameterError, match="unit"):
        dd.integrate1d(ds, 10, unit="q_A^-1")
    with pytest.raises(ParameterError, match="npt"):
        dd.integrate1d(ds, 0)
    with pytest.raises(ParameterError, match="radial_range"):
        dd.integrate1d(ds, 10, radial_range=(5.0, 1.0))
    with pytest.raises(ParameterError, match="error_model"):
        dd.integrate1d(ds, 10, error_model="azimuthal")
    with pytest.raises(ParameterError, match="npt_azim"):
        dd.integrate2d(ds, 10, npt_azim=-1)
    with pytest.raises(GeometryError, match="geometry"):
        dd.integrate1d(bare, 10)
    with pytest.raises(GeometryError, match="centre|center"):
        dd.integrate1d(ds, 10, center=(500.0, 3.0))
    # Pixels need no geometry.
    assert dd.integrate1d(bare, 10, unit="r_px").sizes["radial"] == 10


# ---------------------------------------------------------------------------- the GPU twin
GPU_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from diffdask.reduce.kernel import build_plan, radial_bins, reduce_block
    from diffdask.reduce.gpu import reduce_block_gpu
    rng = np.random.default_rng(0)
    mask = rng.random((9, 11)) > 0.2
    index, nb = radial_bins((9, 11), (3.2, 6.1), 1.3, None, mask)
    plan = build_plan(mask, index, nb)
    for dtype in ("float32", "uint16"):
        if dtype == "uint16":
            block = rng.poisson(3.0, (2, 9, 11)).astype(dtype)
        else:
            block = (rng.gamma(2.0, 3.0, (2, 9, 11)) - 1.0).astype(dtype)
            block[0, 2, 2], block[1, 4, 5] = np.nan, np.inf
        gpu = reduce_block_gpu(block, plan, threshold=2.5, com=True, bins=True, variance=True)
        cpu = reduce_block(block, plan, threshold=2.5, com=True, bins=True, variance=True)
        assert gpu.keys() == cpu.keys(), (gpu.keys(), cpu.keys())
        for k in cpu:
            assert gpu[k].dtype == cpu[k].dtype, k
            np.testing.assert_allclose(gpu[k], cpu[k], rtol=1e-12, atol=0, err_msg=k)
    print("ok")
    """
)


def test_gpu_kernels_match_the_cpu_kernel_in_the_cuda_simulator(tmp_path):
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    run = subprocess.run([sys.executable, "-c", GPU_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@pytest.mark.skipif(dd.backend.gpu_available(), reason="checks the message shown where no GPU is present")
def test_without_a_gpu_the_gpu_paths_say_how_to_fix_it():
    frames = np.ones((2, 5, 6), np.float32)
    with pytest.raises(BackendError, match="diffdask\\[gpu\\]"):
        dd.to_gpu(dd.make_frame_stack(frames))
    from diffdask.reduce.gpu import reduce_block_gpu

    with pytest.raises(BackendError, match="no CUDA device"):
        reduce_block_gpu(frames, build_plan(np.ones((5, 6), bool)), com=True, bins=False)


# ---------------------------------------------------------------------------- from a store
def test_from_zarr_each_chunk_is_read_and_reduced_in_one_task(tmp_path):
    frames, mask = detector_frames(30)
    ds = dd.make_frame_stack(frames, mask=mask, geometry=GEOM, chunks=30)
    dd.save_frames(ds, tmp_path / "run.zarr", batch_frames=8)
    stored = dd.open_frames(tmp_path / "run.zarr")
    assert stored.frames.data.numblocks[0] == 4
    s = dd.summarize(stored, threshold=5.0)
    (opt,) = dask.optimize(s.com_y.data)
    graph = dict(opt.__dask_graph__())
    # The kernel's parameters (mask, bin index) are one shared node, not a task per chunk.
    tasks = [v for k, v in graph.items() if isinstance(v, dask._task_spec.Task) and "-kwargs-" not in str(k)]
    readers = [t for t in tasks if getattr(t, "func", None) is dask.array.core.getter]
    assert not readers and len(tasks) == 4  # no separate read tasks: read + reduce is one task
    got = s.compute()
    ref = dd.summarize(ds, threshold=5.0).compute()
    for name in ref.data_vars:
        np.testing.assert_array_equal(got[name].values, ref[name].values, err_msg=name)


def test_radial_bins_follow_the_stated_inequality():
    mask = np.ones((7, 9), bool)
    index, nb = radial_bins((7, 9), (3.0, 4.0), 0.1, None, mask)
    for i in range(7):
        for j in range(9):
            r = math.hypot(i - 3.0, j - 4.0)
            k = index[i, j]
            assert k * 0.1 <= r < (k + 1) * 0.1, (i, j, r, k)
    assert nb == index.max() + 1


def test_an_empty_stack_gives_empty_results_not_a_crash():
    ds = dd.make_frame_stack(np.zeros((0, 8, 9), np.float32))
    s = dd.summarize(ds, threshold=1.0).compute()
    assert s.sizes["frame"] == 0 and s.radial_profile.shape[0] == 0
    assert dd.integrate1d(ds, 5, unit="r_px").compute().intensity.shape == (0, 5)
