"""Every GPU path against its CPU result (marker ``gpu``; skipped where no CUDA device is usable).

On a GPU node: ``pip install -e .[gpu,test]`` then ``python -m pytest -m gpu``. Timings are
not asserted here; `benchmarks/gpu_check.py` times the same paths against the device floor.
"""

from __future__ import annotations

import numpy as np
import pytest

import diffdask as dd

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def stacks():
    rng = np.random.default_rng(0)
    s = 48
    frames = rng.poisson(2.0, size=(300, s, s)).astype("float32")
    frames[3, 5, 5] = np.nan
    mask = np.ones((s, s), bool)
    mask[s // 2 - 2 : s // 2 + 2] = False
    geometry = dd.Geometry((s, s), 75e-6, 0.15, 1e-10, beam_center_yx=(s / 2 - 0.3, s / 2 + 0.6))
    cpu = dd.make_frame_stack(frames, mask=mask, geometry=geometry, chunks=70)
    return cpu, dd.to_gpu(cpu)


@pytest.mark.parametrize("reduction", ["center_of_mass", "radial_profile", "summarize", "integrate1d", "integrate2d"])
def test_reductions_on_the_gpu_match_the_cpu(stacks, reduction):
    cpu_ds, gpu_ds = stacks
    args = {"summarize": {"threshold": 3.0}, "integrate1d": {"npt": 40, "error_model": "poisson"},
            "integrate2d": {"npt_rad": 30, "npt_azim": 12}}.get(reduction, {})  # fmt: skip
    cpu = getattr(dd, reduction)(cpu_ds, **args).compute(scheduler="sync")
    gpu = getattr(dd, reduction)(gpu_ds, **args).compute(scheduler="sync")
    for name in cpu.data_vars:
        np.testing.assert_allclose(dd.to_cpu(gpu[name].data), cpu[name].values, rtol=1e-12, atol=0, err_msg=name)


def test_common_lines_on_the_gpu_match_the_cpu():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(1)
    averages = rng.random((6, 33, 33))
    cpu = dd.line_samples(averages, n_angles=24).compute(scheduler="sync")
    gpu = dd.line_samples(cupy.asarray(averages), n_angles=24).compute(scheduler="sync")
    np.testing.assert_allclose(dd.to_cpu(gpu), cpu, rtol=1e-10, atol=1e-12)
